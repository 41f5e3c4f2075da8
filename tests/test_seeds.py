"""Seed loader (self-instruct JSONL, Alpaca JSON/JSONL) and the project's own bundled seed tasks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from instructflow.tasks.config import load_config
from instructflow.tasks.seeds import (SeedFormatError, SeedInstance, SeedTask, bundled_seed_dir, load_seed_file,
                                      load_seeds, seeds_content_hash)

OFFICIAL = Path("/work/shared/data/self_instruct_seed_tasks.jsonl")
needs_official = pytest.mark.skipif(not OFFICIAL.exists(), reason=f"{OFFICIAL} not on this machine")

# The generation filters reject machine instructions containing these words (self-instruct's blacklist).
BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram", "configurable"]


@pytest.fixture(scope="module")
def bundled() -> list[SeedTask]:
    return load_seeds([bundled_seed_dir() / "seed_tasks.jsonl"])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def line(**record) -> str:
    return json.dumps(record)


GOOD = {"instruction": "Name a color.", "instances": [{"input": "", "output": "Blue."}]}


# --- the bundled seeds --------------------------------------------------------------------------------
def test_bundled_seeds_load_with_unique_ids_and_about_15_percent_classification(bundled):
    assert len(bundled) >= 175
    ids = [t.id for t in bundled]
    assert len(set(ids)) == len(ids)
    assert len({t.name for t in bundled}) == len(bundled)
    share = sum(t.is_classification for t in bundled) / len(bundled)
    assert 0.10 <= share <= 0.20, share
    assert all(t.source.endswith("seed_tasks.jsonl") for t in bundled)
    assert load_seed_file(bundled_seed_dir() / "seed_tasks.jsonl") == bundled


def test_bundled_instructions_pass_the_generation_filters(bundled):
    for t in bundled:
        text = t.instruction
        words = len(text.split())
        assert 4 <= words <= 150, (t.id, words)
        assert 6 <= words <= 60, (t.id, words)  # our own, stricter authoring rule
        for word in BLACKLIST:
            assert not re.search(rf"\b{word}\b", text, re.IGNORECASE), (t.id, word)
        assert text.isascii() and text[0].isalnum(), t.id
        assert not text.lower().startswith("write a program"), t.id


def test_bundled_instances_are_complete_and_varied(bundled):
    outputs = [t.instances[0].output for t in bundled]
    assert all(o.strip() for o in outputs)
    assert all(len(o.split()) < 150 for o in outputs)
    assert sum(len(o.split()) < 120 for o in outputs) >= 0.9 * len(outputs)
    empty_input = sum(not t.instances[0].input for t in bundled) / len(bundled)
    assert 0.2 <= empty_input <= 0.4, empty_input


def test_bundled_seeds_have_no_near_duplicates_among_themselves(bundled):
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    texts = [t.instruction for t in bundled]
    for i, a in enumerate(texts):
        for b in texts[i + 1:]:
            assert scorer.score(a, b)["rougeL"].fmeasure <= 0.7, (a, b)


@needs_official
def test_bundled_seeds_are_not_near_duplicates_of_the_official_seeds(bundled):
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    official = [t.instruction for t in load_seed_file(OFFICIAL)]
    for t in bundled:
        for other in official:
            assert scorer.score(other, t.instruction)["rougeL"].fmeasure <= 0.7, (t.instruction, other)


@needs_official
def test_official_self_instruct_seed_file_loads():
    tasks = load_seed_file(OFFICIAL)
    assert len(tasks) == 175
    assert sum(t.is_classification for t in tasks) == 26
    assert tasks[0].id == "seed_task_0" and tasks[0].name == "breakfast_suggestion"
    assert tasks[1].instances == (SeedInstance("Night : Day :: Right : Left",
                                               "The relation between the given pairs is that they are opposites."),)


# --- formats ------------------------------------------------------------------------------------------
def test_self_instruct_defaults_blank_lines_and_bom(tmp_path):
    path = tmp_path / "mine.jsonl"
    text = "\n".join([line(**GOOD),
                      "",
                      line(id="x1", name="pick", instruction="  Pick one.  ", is_classification=True,
                           instances=[{"input": "a, b", "output": "a"}, {"output": "b"}])]) + "\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    first, second = load_seed_file(path)
    assert first == SeedTask(id="mine_1", name="mine_1", instruction="Name a color.",
                             instances=(SeedInstance("", "Blue."),), is_classification=False, source=str(path))
    assert second.id == "x1" and second.name == "pick" and second.instruction == "Pick one."
    assert second.is_classification is True
    assert second.instances == (SeedInstance("a, b", "a"), SeedInstance("", "b"))


def test_alpaca_json_array(tmp_path):
    path = write(tmp_path / "alpaca.json", json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hello.", "output": "Hello!"},
    ], indent=2))
    tasks = load_seed_file(path)
    assert [t.id for t in tasks] == ["alpaca_0", "alpaca_1"]
    assert tasks[0].instances == (SeedInstance("2 and 3", "5"),)
    assert tasks[1].instances == (SeedInstance("", "Hello!"),)
    assert not any(t.is_classification for t in tasks)


def test_alpaca_jsonl(tmp_path):
    path = write(tmp_path / "alp.jsonl", line(instruction="Say hi.", output="Hi.") + "\n\n"
                 + line(instruction="Double it.", input="4", output="8") + "\n")
    tasks = load_seed_file(path)
    assert [t.id for t in tasks] == ["alp_0", "alp_1"]
    assert tasks[1].instances == (SeedInstance("4", "8"),)


# --- malformed input: one-line errors that name the file and the line -----------------------------------
ARRAY_MISSING_OUTPUT = """[
  {"instruction": "One.", "output": "1"},
  {
    "instruction": "Two.",
    "input": "x"
  }
]"""

MALFORMED = {
    "invalid_json": (line(**GOOD) + "\n\n" + '{"instruction": "x", ', 3, "invalid JSON"),
    "not_an_object": (line(**GOOD) + "\n[1, 2]\n", 2, "must be a JSON object"),
    "missing_instruction": (line(**GOOD) + "\n" + line(instances=[{"output": "y"}]), 2, "missing field 'instruction'"),
    "empty_instruction": (line(**{**GOOD, "instruction": "   "}), 1, "'instruction' is empty"),
    "instruction_not_string": (line(**{**GOOD, "instruction": 42}), 1, "'instruction' must be str"),
    "instances_not_list": (line(**GOOD) + "\n" + line(instruction="x", instances="y"), 2, "must be a list"),
    "instances_empty": (line(instruction="x", instances=[]), 1, "'instances' is empty"),
    "instances_missing": (line(**GOOD) + "\n" + line(instruction="x", output="y"), 2, "missing field 'instances'"),
    "instance_without_output": (line(**GOOD) + "\n" + line(instruction="x", instances=[{"input": "y"}]), 2,
                                "instance 0: missing field 'output'"),
    "instance_not_object": (line(instruction="x", instances=["y"]), 1, "instance 0 must be an object"),
    "classification_not_bool": (line(**{**GOOD, "is_classification": "yes"}), 1, "'is_classification' must be bool"),
    "id_not_string": (line(**{**GOOD, "id": 7}), 1, "'id' must be str"),
    "duplicate_id": (line(**{**GOOD, "id": "a"}) + "\n" + line(**GOOD) + "\n" + line(**{**GOOD, "id": "a"}), 3,
                     "duplicate id 'a'"),
    "neither_format": (line(instruction="x", answer="y"), 1, "missing field 'instances' (self-instruct) or 'output'"),
    "array_record_missing_output": (ARRAY_MISSING_OUTPUT, 3, "missing field 'output'"),
    "array_invalid_json": ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]', 3, "invalid JSON"),
    "array_element_not_object": ('[\n  {"instruction": "a", "output": "b"},\n  "oops"\n]', 3, "must be a JSON object"),
    "empty_file": ("\n\n", 1, "no seed tasks"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_seed_file_raises_one_line_error_with_path_and_line(tmp_path, case):
    text, line_no, fragment = MALFORMED[case]
    path = write(tmp_path / "bad.jsonl", text)
    with pytest.raises(SeedFormatError) as err:
        load_seed_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line_no}: "), message
    assert fragment in message, message
    assert "\n" not in message


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(line(**GOOD).encode() + b'\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(SeedFormatError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        load_seed_file(path)


def test_duplicate_ids_across_files_name_both_places(tmp_path):
    a = write(tmp_path / "a.jsonl", line(**{**GOOD, "id": "same"}) + "\n")
    b = write(tmp_path / "b.jsonl", line(**GOOD) + "\n" + line(**{**GOOD, "id": "same"}) + "\n")
    with pytest.raises(SeedFormatError) as err:
        load_seeds([a, b])
    assert str(err.value) == f"{b}:2: duplicate id 'same' (first at {a}:1)"


def test_one_bad_file_loads_nothing(tmp_path):
    good = write(tmp_path / "good.jsonl", line(**GOOD) + "\n")
    bad = write(tmp_path / "bad.jsonl", line(**GOOD) + "\n{not json\n")
    with pytest.raises(SeedFormatError, match=re.escape(f"{bad}:2:")):
        load_seeds([good, bad])


def test_directories_expand_to_sorted_seed_files(tmp_path):
    write(tmp_path / "b.jsonl", line(**GOOD) + "\n")
    write(tmp_path / "a.json", json.dumps([{"instruction": "First.", "output": "1"}]))
    write(tmp_path / "notes.txt", "not a seed file")
    tasks = load_seeds([tmp_path, tmp_path / "b.jsonl"])  # the file named twice is read once
    assert [t.id for t in tasks] == ["a_0", "b_1"]
    assert [Path(t.source).name for t in tasks] == ["a.json", "b.jsonl"]


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(SeedFormatError, match="no such seed file"):
        load_seeds([tmp_path / "nope.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeedFormatError, match="no \\*.jsonl or \\*.json seed files"):
        load_seeds([tmp_path / "empty"])


def test_a_seed_longer_than_the_limit_is_refused_with_file_and_line(tmp_path):
    huge = {"instruction": "Summarize the text.", "instances": [{"input": "x" * 5_000_000, "output": "Short."}]}
    path = write(tmp_path / "seeds.jsonl", line(**GOOD) + "\n\n" + line(**huge) + "\n")
    assert len(load_seeds([path])) == 2                       # no limit given: the loader alone takes it
    with pytest.raises(SeedFormatError) as err:
        load_seeds([path], max_chars=4000)
    assert str(err.value) == (f"{path}:3: seed task 'seeds_3' is 5000025 characters (instruction + instances), "
                              "over the limit of 4000 (generate.max_seed_chars)")
    # the limit counts the instruction and every instance; a task of exactly the limit is fine
    exact = {"instruction": "abcd", "instances": [{"input": "ef", "output": "gh"}, {"input": "", "output": "ij"}]}
    alpaca = write(tmp_path / "a.json", json.dumps([{"instruction": "Add.", "output": "2"},
                                                   {"instruction": "Long.", "input": "", "output": "y" * 100}],
                                                  indent=1))
    assert [t.id for t in load_seeds([write(tmp_path / "e.jsonl", line(**exact) + "\n")], max_chars=10)] == ["e_1"]
    with pytest.raises(SeedFormatError, match=rf"^{re.escape(str(tmp_path / 'e.jsonl'))}:1: .* 11 characters"):
        load_seeds([write(tmp_path / "e.jsonl", line(**{**exact, "instruction": "abcde"}) + "\n")], max_chars=10)
    with pytest.raises(SeedFormatError, match=rf"^{re.escape(str(alpaca))}:6: seed task 'a_1' is 105 characters"):
        load_seed_file(alpaca, max_chars=50)


@pytest.mark.slow
def test_generate_stage_refuses_an_oversized_seed_and_keeps_the_stored_seeds(seeded_home):
    from instructflow.flows.common import warehouse_for
    from instructflow.flows.filter import filter_flow
    from instructflow.flows.generate import generate_flow

    home, config, seeds = seeded_home
    filter_flow(load_config("t", config), str(home))        # stores the seed tasks
    wh = warehouse_for(home)
    stored = wh.scalar("SELECT count(*) FROM seed_tasks")
    n_lines = len(seeds.read_text().splitlines())
    with seeds.open("a") as handle:                                      # the 5 MB line from the issue
        handle.write(line(instruction="Translate this.", instances=[{"input": "z" * 5_000_000, "output": "ok"}]) + "\n")
    with pytest.raises(SeedFormatError, match=rf"^{re.escape(str(seeds))}:{n_lines + 1}: .*generate.max_seed_chars"):
        generate_flow(load_config("t", config), str(home))
    assert wh.scalar("SELECT count(*) FROM seed_tasks") == stored
    failed = wh.last_stage_run("generate")
    assert failed.status == "failed" and f"{seeds}:{n_lines + 1}:" in failed.error
    assert wh.scalar("SELECT count(*) FROM teacher_requests") == 0      # refused before any request


# --- content hash -------------------------------------------------------------------------------------
def test_content_hash_tracks_content_and_order_but_not_location(tmp_path):
    text = line(**{**GOOD, "id": "a"}) + "\n" + line(**{**GOOD, "id": "b", "instruction": "Name a fruit."}) + "\n"
    tasks = load_seed_file(write(tmp_path / "one.jsonl", text))
    digest = seeds_content_hash(tasks)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    (tmp_path / "elsewhere").mkdir()
    assert seeds_content_hash(load_seed_file(write(tmp_path / "elsewhere" / "one.jsonl", text))) == digest
    edited = load_seed_file(write(tmp_path / "two.jsonl", text.replace("Name a fruit.", "Name a fruit!")))
    assert seeds_content_hash(edited) != digest
    assert seeds_content_hash(list(reversed(tasks))) != digest


def test_both_bundled_spellings_name_the_shipped_files(tmp_path):
    from instructflow.flows.common import seed_paths
    from instructflow.flows.preferences import resolve_import_files
    from instructflow.tasks.config import load_config

    config = tmp_path / "instructflow.toml"
    config.write_text("[profiles.a]\ninherits = 'tiny'\nseeds = ['bundled']\n"
                      "[profiles.b]\ninherits = 'tiny'\nseeds = ['bundled:seed_tasks.jsonl', '~/my-seeds.jsonl']\n"
                      "[profiles.b.preferences]\nimport_files = ['bundled']\n")
    short, canonical = load_config("a", config), load_config("b", config)
    assert seed_paths(canonical)[0] == seed_paths(short)[0] and seed_paths(short)[0].is_file()
    assert load_seeds(seed_paths(short)) == load_seeds(seed_paths(canonical)[:1])
    assert seed_paths(canonical)[1] == Path.home() / "my-seeds.jsonl"
    # the shipped preference sample, spelled either way
    assert resolve_import_files(canonical.preferences.import_files) == \
        resolve_import_files(["bundled:preferences_sample.jsonl"])
    assert resolve_import_files(["bundled"])[0].is_file()

"""`export` writes what SFT trains on (and says how many of each source); `status` reads a home
with the profile its last run used, and says so. Real DuckDB home, real Prefect API, the CLI entry point."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from cliutil import cli
from instructflow.flows.common import close_warehouses, warehouse_for
from instructflow.tasks.config import load_config
from instructflow.warehouse import queries
from test_filter_stage import store_candidates

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains

NEW_INSTRUCTIONS = ["Explain how a lighthouse keeper schedules maintenance during long winter storms.",
                    "List three reasons why sourdough dough rises slowly in a cold kitchen.",
                    "Describe the yearly migration route of arctic terns across both hemispheres."]


def filtered_home_with_instances(seeded_home) -> tuple:
    """A home where filter ran (profile t): the seeds are stored, three generated instructions are
    kept and two of them have instances (2 + 1), the third has none yet."""
    from instructflow.flows.filter import filter_flow

    home, config, seeds = seeded_home
    wh = warehouse_for(home)
    ids = store_candidates(wh, [NEW_INSTRUCTIONS])
    filter_flow(load_config("t", config), str(home))
    assert [r["candidate_id"] for r in queries.kept_candidates(wh)] == ids
    queries.insert_instances_result(wh, ids[0], False, [("", "Check the lamp."), ("storm", "Wait it out.")], [])
    queries.insert_instances_result(wh, ids[1], False, [("", "Cold slows yeast.")], [])
    return home, config, seeds, wh


def test_export_writes_what_sft_trains_on_and_counts_each_source(seeded_home, tmp_path):
    from instructflow.flows.sft import build_examples
    from instructflow.tasks.config import load_config

    home, config, seeds, wh = filtered_home_with_instances(seeded_home)
    seed_instances = sum(len(json.loads(line)["instances"]) for line in seeds.read_text().splitlines() if line.strip())
    sft_set = Counter((e.instruction, e.input, e.output) for e in build_examples(load_config("t", config), wh))
    assert len(sft_set) > 0
    close_warehouses()  # the CLI process needs the DuckDB lock

    out = tmp_path / "data.json"
    done = cli("export", "alpaca", "--out", str(out), "--config", str(config), home=home)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert Counter((r["instruction"], r["input"], r["output"]) for r in rows) == sft_set
    assert len(rows) == 3 + seed_instances
    assert done.stderr.strip().splitlines() == [
        f"wrote {len(rows)} records to {out}: 3 generated, {seed_instances} from seeds "
        "(--source all: what SFT trains on under profile t)"]

    for source, n, generated, from_seeds in (("generated", 3, 3, 0), ("seeds", seed_instances, 0, seed_instances),
                                             ("all", 3 + seed_instances, 3, seed_instances)):
        part = tmp_path / f"{source}.jsonl"
        done = cli("export", "jsonl", "--out", str(part), "--source", source, home=home)
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in part.read_text().splitlines()]
        assert len(lines) == n and {"prompt", "completion"} == set(lines[0])
        assert f"wrote {n} records to {part}: {generated} generated, {from_seeds} from seeds (--source {source})" \
            in done.stderr
    assert any(line["completion"] == "Wait it out." and "### Input:\nstorm" in line["prompt"]
               for line in map(json.loads, (tmp_path / "generated.jsonl").read_text().splitlines()))

    # a profile whose SFT set leaves the seeds out exports only the generated part by default
    with config.open("a") as handle:
        handle.write("[profiles.gen_only]\ninherits = 't'\n[profiles.gen_only.sft]\ninclude_seed_instances = false\n")
    done = cli("export", "alpaca", "--out", str(out), "--profile", "gen_only", "--config", str(config), home=home)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(out.read_text())) == 3
    assert "3 generated, 0 from seeds (--source generated: what SFT trains on under profile gen_only)" in done.stderr

    bad = cli("export", "alpaca", "--out", str(out), "--source", "everything", home=home)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == ["error: --source 'everything': expected one of generated, seeds, all"]


def test_export_hf_writes_a_dataset_folder_load_dataset_reads_and_a_card_with_the_counts(seeded_home, tmp_path):
    import yaml
    from datasets import load_dataset

    home, config, seeds, wh = filtered_home_with_instances(seeded_home)
    seed_instances = sum(len(json.loads(line)["instances"]) for line in seeds.read_text().splitlines() if line.strip())
    close_warehouses()

    alpaca, folder = tmp_path / "data.json", tmp_path / "hf"
    assert cli("export", "alpaca", "--out", str(alpaca), "--config", str(config), home=home).returncode == 0
    done = cli("export", "hf", "--out", str(folder), "--config", str(config), home=home)
    assert done.returncode == 0, done.stderr
    [data_file] = [p.relative_to(folder).as_posix() for p in (folder / "data").iterdir()]
    assert re.fullmatch(r"data/train-[0-9a-f]{16}\.parquet", data_file), data_file
    data = load_dataset(str(folder))
    assert list(data) == ["train"] and data["train"].column_names == ["instruction", "input", "output"]
    assert list(data["train"]) == json.loads(alpaca.read_text())   # the rows `export alpaca` writes, in order
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "other" and meta["size_categories"] == ["n<1K"]
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": data_file}]}]
    assert "| generated (kept instructions x instances) | 3 |" in card
    assert f"| seeds (their own instances) | {seed_instances} |" in card
    assert f"| seed files | {seeds} |" in card and "| ROUGE-L filter threshold | 0.7 |" in card
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"wrote a Hugging Face dataset to {folder} ({data_file}, README.md): 3 generated, "
        f"{seed_instances} seeds (--source all: what SFT trains on under profile t)")

    # one line for what cannot be exported: no pairs yet, no checkpoint yet, an occupied folder
    for args, line in ((("hf", "--what", "pairs", "--out", str(tmp_path / "pairs")),
                        "error: no preference pairs in this home yet: run `instructflow stage preferences` first"),
                       (("model", "--stage", "sft", "--out", str(tmp_path / "model")),
                        "error: no sft checkpoint in this home yet: run `instructflow stage sft` first"),
                       (("hf", "--out", str(folder)), f"error: --out {folder} is not empty: give a new folder (or "
                                                      "empty this one)")):
        refused = cli("export", *args, "--config", str(config), home=home) if args[0] == "hf" else \
            cli("export", *args, home=home)
        assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [line], refused.stderr


def test_a_folder_exported_again_under_the_same_name_loads_its_new_rows_not_the_cached_ones(tmp_path):
    """datasets caches a folder by its name and its card's data_files: the data file is named by its content."""
    from datasets import load_dataset

    from instructflow.tasks.export import PAIR_COLUMNS, dataset_card, hf_data_file, write_hf_dataset

    loaded = []
    for parent, n in (("first", 3), ("second", 5)):
        rows = [{"prompt": f"Q{i}?", "chosen": f"A{i}", "rejected": f"B{i}", "source": "imported"} for i in range(n)]
        data_file = hf_data_file(rows, PAIR_COLUMNS)
        folder = write_hf_dataset(rows, PAIR_COLUMNS, tmp_path / parent / "pairs",
                                  dataset_card("pairs", n, {"imported": n}, [], "made by the test", data_file), data_file)
        loaded.append(len(load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))["train"]))
    assert loaded == [3, 5]


def test_status_defaults_to_the_last_runs_profile_and_says_so(seeded_home):
    from instructflow.flows.filter import filter_flow

    home, config, _ = seeded_home
    with config.open("a") as handle:  # t's filter differs from the default profile's (cpu)
        handle.write("[profiles.t.filter]\nthreshold = 0.6\n")
    filter_flow(load_config("t", config), str(home))
    close_warehouses()

    out = cli("status", "--json", "--config", str(config), home=home)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["profile"] == "t" and report["profile_source"] == "last_run"
    assert report["stages"]["filter"]["state"] == "fresh", report["stages"]["filter"]
    assert report["stages"]["generate"]["state"] == "never"

    # an explicit profile still wins, and against it the same run is stale because of its config
    out = cli("status", "--json", "--profile", "cpu", "--config", str(config), home=home)
    report = json.loads(out.stdout)
    assert report["profile"] == "cpu" and report["profile_source"] == "option"
    assert report["stages"]["filter"]["state"] == "stale" and "config changed" in report["stages"]["filter"]["why"]

    # the table says which profile the states refer to
    text = cli("status", "--config", str(config), home=home, COLUMNS="200")
    assert text.returncode == 0 and "profile t (the last run's)" in text.stdout

    # the last run's profile is not in the config in use: the config's default, said so
    out = cli("status", "--json", home=home)
    report = json.loads(out.stdout)
    assert report["profile"] == "cpu" and report["profile_source"] == "default"

"""Held-out evaluation prompts (`evaluate.prompts_file`): self-instruct JSONL, Alpaca JSONL and an
Alpaca JSON list load; every bad file is one line naming file and line; duplicates and prompts the
training data holds are found."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructflow.tasks.eval_prompts import (EvalPrompt, EvalPromptError, load_eval_prompts, read_eval_prompt_file,
                                             training_overlap)

OFFICIAL = Path("/work/shared/data/self_instruct_seed_tasks.jsonl")
needs_official = pytest.mark.skipif(not OFFICIAL.exists(), reason=f"{OFFICIAL} not on this machine")


def jsonl(path: Path, *records) -> Path:
    """One line per record: a dict is written as JSON, a str as it is (blank or broken lines)."""
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


@needs_official
def test_the_self_instruct_seed_tasks_load_with_their_first_instance_input():
    prompts = load_eval_prompts(OFFICIAL)
    assert len(prompts) == 175
    tasks = [json.loads(line) for line in OFFICIAL.read_text(encoding="utf-8").splitlines()]
    assert [p.instruction for p in prompts] == [t["instruction"].strip() for t in tasks]
    assert [p.input for p in prompts] == [t["instances"][0]["input"].strip() for t in tasks]
    assert sum(bool(p.input) for p in prompts) > 0
    assert prompts[0].origin == f"{OFFICIAL}:1" and prompts[-1].origin == f"{OFFICIAL}:175"


def test_self_instruct_and_alpaca_lines_load_side_by_side(tmp_path):
    path = jsonl(tmp_path / "mixed.jsonl",
                 {"id": "t1", "instruction": "Sort the numbers.", "is_classification": False,
                  "instances": [{"input": "3, 1, 2", "output": "1, 2, 3"}, {"input": "9, 8", "output": "8, 9"}]},
                 "",
                 {"instruction": "  Name a color. ", "input": "", "output": "Blue."},
                 {"instruction": "Translate to French.", "input": "Good morning"},
                 {"instruction": "Tell a joke.", "instances": []},
                 "   ",
                 {"instruction": "Give a synonym.", "instances": [{"output": "big"}]},
                 {"instruction": "Greet me.", "input": None})
    assert load_eval_prompts(path) == [
        EvalPrompt("Sort the numbers.", "3, 1, 2", f"{path}:1"),
        EvalPrompt("Name a color.", "", f"{path}:3"),
        EvalPrompt("Translate to French.", "Good morning", f"{path}:4"),
        EvalPrompt("Tell a joke.", "", f"{path}:5"),
        EvalPrompt("Give a synonym.", "", f"{path}:7"),
        EvalPrompt("Greet me.", "", f"{path}:8"),
    ]


def test_an_alpaca_json_list_loads_with_item_numbers(tmp_path):
    path = tmp_path / "alpaca_data.json"
    records = [{"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
               {"instruction": "Classify the animal.", "input": "whale", "output": "mammal"}]
    path.write_text(json.dumps(records, indent=4), encoding="utf-8")
    assert load_eval_prompts(path) == [EvalPrompt("Give three tips for staying healthy.", "", f"{path}:item 1"),
                                       EvalPrompt("Classify the animal.", "whale", f"{path}:item 2")]


def test_a_byte_order_mark_and_windows_line_ends_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"instruction": "A."}\r\n\r\n{"instruction": "B.", "input": "x"}\r\n')
    assert load_eval_prompts(path) == [EvalPrompt("A.", "", f"{path}:1"), EvalPrompt("B.", "x", f"{path}:3")]


def test_duplicates_are_kept_once_first_wins_and_are_listed(tmp_path):
    path = jsonl(tmp_path / "dup.jsonl",
                 {"instruction": "Name a color.", "output": "Blue."},
                 {"instruction": "Name a fruit."},
                 {"instruction": "name  a COLOR.", "output": "Red."},            # same prompt: case and spacing
                 {"instruction": "Name a color.", "instances": [{"input": "", "output": "Green."}]},
                 {"instruction": "Name a color.", "input": "in French"})          # another input: another prompt
    loaded = read_eval_prompt_file(path)
    assert [p.origin for p in loaded.prompts] == [f"{path}:1", f"{path}:2", f"{path}:5"]
    assert loaded.prompts[0].instruction == "Name a color."
    assert loaded.duplicates == [(f"{path}:3", f"{path}:1"), (f"{path}:4", f"{path}:1")]
    assert load_eval_prompts(path) == loaded.prompts


@pytest.mark.parametrize("content, line, message", [
    (b'{"instruction": "Fine."}\n{"instruction": "Caf\xe9"}\n', 2, "not valid UTF-8 (byte 21 of the line)"),
    (b'{"instruction": "Fine."}\n\n{"instruction": "Broken",\n', 3, "invalid JSON: Expecting property name"),
    (b'{"instruction": "Fine."}\n["Name a color."]\n', 2, "expected a JSON object, got list ['Name a color.']"),
    (b'{"instruction": "Fine."}\n42\n', 2, "expected a JSON object, got int 42"),
    (b'{"input": "x", "output": "y"}\n', 1, "missing field 'instruction'"),
    (b'{"instruction": null}\n', 1, "missing field 'instruction'"),
    (b'{"instruction": "   "}\n', 1, "field 'instruction' is empty"),
    (b'{"instruction": ["Name", "a color"]}\n', 1, "field 'instruction' must be a string, got list"),
    (b'{"instruction": "Add.", "input": 3}\n', 1, "field 'input' must be a string, got int 3"),
    (b'{"instruction": "Add.", "instances": {"input": "1"}}\n', 1,
     "field 'instances' must be a list of objects, got dict"),
    (b'{"instruction": "Add.", "instances": [{"input": "1"}, "2"]}\n', 1, "instances[1] must be an object, got str"),
    (b'{"instruction": "Add.", "instances": [{"input": 1}]}\n', 1, "instances[0]: field 'input' must be a string"),
    (b'{"instruction": "Add.", "input": "1", "instances": []}\n', 1, "both 'input' (Alpaca) and 'instances'"),
    (b'\n  \n', 1, "no prompts (the file is empty)"),
    (b'[\n  {"instruction": "A."},\n  {"instruction": "B."\n]\n', 4, "invalid JSON: Expecting ',' delimiter"),
    (b'[\n  {"instruction": "A."},\n  {"instruction": "\xff"}\n]\n', 3, "not valid UTF-8"),
    (b'[]', 1, "no prompts (the JSON list is empty)"),
])
def test_a_bad_file_is_one_line_naming_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(EvalPromptError) as caught:
        load_eval_prompts(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:{line}: ") and message in text, text
    assert "\n" not in text
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("item, message", [
    ('"Name a color."', "item 2: expected a JSON object, got str"),
    ('{"output": "Blue."}', "item 2: missing field 'instruction'"),
    ('{"instruction": "Name a color.", "input": ["a"]}', "item 2: field 'input' must be a string, got list"),
])
def test_a_bad_record_of_a_json_list_is_named_by_its_item_number(tmp_path, item, message):
    path = tmp_path / "alpaca.json"
    path.write_text(f'[{{"instruction": "Fine."}},\n {item}]', encoding="utf-8")
    with pytest.raises(EvalPromptError, match=f"^{path}:{message}"):
        load_eval_prompts(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(EvalPromptError, match=f"^{tmp_path / 'none.jsonl'}: no such prompts file$"):
        load_eval_prompts(tmp_path / "none.jsonl")


def test_the_prompts_the_training_data_holds_are_found(tmp_path):
    path = jsonl(tmp_path / "eval.jsonl",
                 {"instruction": "Name a color."},
                 {"instruction": "Sort the numbers.", "input": "3, 1, 2"},
                 {"instruction": "Sort the numbers.", "input": "9, 8"},
                 {"instruction": "Write a haiku about rain."})
    prompts = load_eval_prompts(path)
    training = [("name a   color.", ""),              # case and spacing do not hide a copy
                ("Sort the numbers.", "9,  8"),
                ("Sort the numbers.", ""),            # same instruction, other input: not the same prompt
                ("Write a haiku about snow.", "")]
    assert [p.origin for p in training_overlap(prompts, iter(training))] == [f"{path}:1", f"{path}:3"]
    assert training_overlap(prompts, []) == []

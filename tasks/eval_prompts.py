"""A user's held-out evaluation prompts (`evaluate.prompts_file`): loading them, and finding the ones
the training data also holds (contamination).

Two layouts, told apart by content (as seed files are, `tasks/seeds.py`):
  1. JSONL, one record per non-blank line, each line on its own either
     - a self-instruct task: {"instruction", "instances": [{"input", "output"}, ...], ...}; the input
       of the first instance is the prompt's input (no instances, or none with an input: ""), or
     - an Alpaca record: {"instruction", "input"?, "output"?}.
     Other fields ("id", "name", "output", ...) are ignored. The origin of a prompt is "FILE:LINE".
  2. A JSON list of those records (the Alpaca release, alpaca_data.json): a file whose first
     non-blank character is "[". The origin is "FILE:item N", N counted from 1.

Loading is all-or-nothing: the first problem raises EvalPromptError with one line,
"FILE:LINE: what is wrong" ("FILE:item N: ..." for a record of a JSON list).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


@dataclass(frozen=True)
class EvalPrompt:
    instruction: str  # stripped, never empty
    input: str        # stripped, "" when the prompt has none
    origin: str       # "FILE:LINE" (JSONL) or "FILE:item N" (JSON list)


@dataclass(frozen=True)
class EvalPromptFile:
    """A loaded prompts file: its distinct prompts in file order, and the duplicates left out."""
    prompts: list[EvalPrompt]
    duplicates: list[tuple[str, str]]  # (origin of a left-out duplicate, origin of the prompt it repeats)


class EvalPromptError(ValueError):
    """One-line error: "FILE:LINE: what is wrong"."""


def prompt_key(instruction: str, input: str) -> tuple[str, str]:
    """What makes two prompts the same: instruction and input, lowercased, whitespace collapsed."""
    return " ".join(instruction.lower().split()), " ".join(input.lower().split())


# --- reading ----------------------------------------------------------------------------------------
def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)  # repr keeps the message on one line (newlines become \n)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decoded_lines(path: Path) -> list[str]:
    """The file's lines as text, decoded one at a time so that invalid UTF-8 is reported with its line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalPromptError(f"{path}: cannot read: {e.strerror or e}") from None
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8-sig" if number == 1 else "utf-8"))  # tolerate a byte-order mark
        except UnicodeDecodeError as e:
            raise EvalPromptError(f"{path}:{number}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
    return lines


def _jsonl_records(path: Path, lines: list[str]) -> list[tuple[Any, str]]:
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), f"{path}:{number}"))
        except json.JSONDecodeError as e:
            raise EvalPromptError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from None
    return records


def _json_list_records(path: Path, lines: list[str]) -> list[tuple[Any, str]]:
    try:
        items = json.loads("\n".join(lines))
    except json.JSONDecodeError as e:
        raise EvalPromptError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    # the text starts with "[", so valid JSON here is a list
    return [(item, f"{path}:item {index}") for index, item in enumerate(items, start=1)]


# --- validating -------------------------------------------------------------------------------------
def _text(where: str, obj: dict, key: str, *, required: bool) -> str:
    """A string field, stripped; an absent or null optional field is ""."""
    value = obj.get(key)
    if value is None:
        if required:
            raise EvalPromptError(f"{where}: missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise EvalPromptError(f"{where}: field '{key}' must be a string, got {type(value).__name__} {_short(value)}")
    if required and not value.strip():
        raise EvalPromptError(f"{where}: field '{key}' is empty")
    return value.strip()


def _prompt(value: Any, where: str) -> EvalPrompt:
    if not isinstance(value, dict):
        raise EvalPromptError(f"{where}: expected a JSON object, got {type(value).__name__} {_short(value)}")
    instruction = _text(where, value, "instruction", required=True)
    if "instances" not in value:  # Alpaca
        return EvalPrompt(instruction, _text(where, value, "input", required=False), where)
    if "input" in value:
        raise EvalPromptError(f"{where}: both 'input' (Alpaca) and 'instances' (self-instruct); keep one")
    instances = value["instances"]
    if not isinstance(instances, list):
        raise EvalPromptError(f"{where}: field 'instances' must be a list of objects, "
                              f"got {type(instances).__name__} {_short(instances)}")
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise EvalPromptError(f"{where}: instances[{index}] must be an object, "
                                  f"got {type(instance).__name__} {_short(instance)}")
    first_input = _text(f"{where}: instances[0]", instances[0], "input", required=False) if instances else ""
    return EvalPrompt(instruction, first_input, where)


# --- public API -------------------------------------------------------------------------------------
def read_eval_prompt_file(path: str | Path) -> EvalPromptFile:
    """Every distinct prompt of a prompts file, in file order, and the duplicates it left out.

    Two prompts with the same `prompt_key` (instruction and input, ignoring case and spacing) are one:
    the first is kept, each later one is listed in `duplicates`. A file with no record is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalPromptError(f"{path}: no such prompts file")
    lines = _decoded_lines(path)
    is_list = "\n".join(lines).lstrip().startswith("[")
    records = _json_list_records(path, lines) if is_list else _jsonl_records(path, lines)
    if not records:
        raise EvalPromptError(f"{path}:1: no prompts (the {'JSON list' if is_list else 'file'} is empty)")
    prompts: list[EvalPrompt] = []
    duplicates: list[tuple[str, str]] = []
    first: dict[tuple[str, str], str] = {}  # prompt_key -> origin of its first occurrence
    for value, where in records:
        prompt = _prompt(value, where)
        key = prompt_key(prompt.instruction, prompt.input)
        if key in first:
            duplicates.append((where, first[key]))
            continue
        first[key] = where
        prompts.append(prompt)
    return EvalPromptFile(prompts, duplicates)


def load_eval_prompts(path: str | Path) -> list[EvalPrompt]:
    """The distinct prompts of a prompts file, in file order (see `read_eval_prompt_file`, which also
    says which duplicates were left out)."""
    return read_eval_prompt_file(path).prompts


def training_overlap(prompts: Iterable[EvalPrompt], training_texts: Iterable[tuple[str, str]]) -> list[EvalPrompt]:
    """The prompts whose (instruction, input) the training data also holds, compared by `prompt_key`
    (case and spacing ignored), in the prompts' order: scores on them measure recall, not generalisation."""
    trained = {prompt_key(instruction, input) for instruction, input in training_texts}
    return [p for p in prompts if prompt_key(p.instruction, p.input) in trained]

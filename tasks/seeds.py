"""Seed tasks: load hand-written tasks from self-instruct JSONL or Alpaca JSON/JSONL files.

Two formats are read, told apart by content (not by extension):
  1. self-instruct JSONL, one task per line:
     {"id", "name", "instruction", "instances": [{"input", "output"}, ...], "is_classification"}
     `id` defaults to "<file stem>_<line>", `name` to a slug of the id, `is_classification` to false.
  2. Alpaca: a JSON array of {"instruction", "input", "output"} records (or the same records as
     JSONL lines); each record is one task with one instance, id "<file stem>_<index>".
The first record of a file decides its format; every later record must match it.

Loading is all-or-nothing: any bad record raises SeedFormatError("<path>:<line>: <what>") and
nothing from that file (or from the other files of a load_seeds call) is returned. With `max_chars`,
a task whose instruction and instances together are longer is a bad record too: every prompt it
would be a demonstration in would overflow the teacher's context or time out.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

SEED_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class SeedInstance:
    input: str
    output: str


@dataclass(frozen=True)
class SeedTask:
    id: str
    name: str
    instruction: str
    instances: tuple[SeedInstance, ...]
    is_classification: bool
    source: str  # the file path it came from (not part of seeds_content_hash)


class SeedFormatError(ValueError):
    """One-line error: "<path>:<line>: <what is wrong>"."""


@dataclass(frozen=True)
class _Record:
    """One raw JSON value of a seed file and where it sits."""
    value: Any
    line: int   # 1-based line where the record starts
    index: int  # 0-based position among the file's records


# --- reading records --------------------------------------------------------------------------------
def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)  # repr keeps the message on one line (newlines become \n)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SeedFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")  # tolerate a UTF-8 byte-order mark
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SeedFormatError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _array_records(path: Path, text: str) -> list[_Record]:
    """A JSON array; each element is a record, with the line its text starts on."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise SeedFormatError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(items, list):
        raise SeedFormatError(f"{path}:1: expected a JSON array of records, got {type(items).__name__}")
    # The text is valid JSON, so walking it element by element cannot fail; it only finds start lines.
    decoder = json.JSONDecoder()
    records = []
    pos = _skip_space(text, _skip_space(text, 0) + 1)  # just past "["
    for index in range(len(items)):
        pos = _skip_space(text, pos)
        line = text.count("\n", 0, pos) + 1
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_space(text, pos) + 1  # past "," (or the closing "]")
        records.append(_Record(items[index], line, index))
    return records


def _line_records(path: Path, text: str) -> list[_Record]:
    """JSONL: one JSON value per non-blank line."""
    records = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise SeedFormatError(f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno})") from None
        records.append(_Record(value, line_no, len(records)))
    return records


# --- validating records -----------------------------------------------------------------------------
def _field(where: str, obj: dict, key: str, kind: type, *, required: bool, default: Any = None,
           non_empty: bool = False) -> Any:
    if key not in obj or (obj[key] is None and not required):  # JSON null means "use the default"
        if required:
            raise SeedFormatError(f"{where}: missing field '{key}'")
        return default
    value = obj[key]
    if not isinstance(value, kind):
        raise SeedFormatError(f"{where}: field '{key}' must be {kind.__name__}, got {type(value).__name__} "
                              f"{_short(value)}")
    if non_empty and not value.strip():
        raise SeedFormatError(f"{where}: field '{key}' is empty")
    return value


def _instance(loc: str, value: Any) -> SeedInstance:
    if not isinstance(value, dict):
        raise SeedFormatError(f"{loc} must be an object, got {type(value).__name__}")
    text_in = _field(loc, value, "input", str, required=False, default="")
    text_out = _field(loc, value, "output", str, required=True, non_empty=True)
    return SeedInstance(input=text_in, output=text_out)


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_") or "task"


def _task(path: Path, record: _Record, fmt: str) -> SeedTask:
    where = f"{path}:{record.line}"
    obj = record.value
    if not isinstance(obj, dict):
        raise SeedFormatError(f"{where}: record must be a JSON object, got {type(obj).__name__}")
    instruction = _field(where, obj, "instruction", str, required=True, non_empty=True).strip()
    if fmt == "self-instruct":
        default_id = f"{path.stem}_{record.line}"
        if "instances" not in obj:
            raise SeedFormatError(f"{where}: missing field 'instances' (the file's first record is self-instruct)")
        raw = obj["instances"]
        if not isinstance(raw, list):
            raise SeedFormatError(f"{where}: field 'instances' must be a list, got {type(raw).__name__}")
        if not raw:
            raise SeedFormatError(f"{where}: field 'instances' is empty")
        instances = tuple(_instance(f"{where}: instance {i}", item) for i, item in enumerate(raw))
    else:  # alpaca
        default_id = f"{path.stem}_{record.index}"
        if "instances" in obj:
            raise SeedFormatError(f"{where}: unexpected field 'instances' (the file's first record is Alpaca)")
        if record.index == 0 and "output" not in obj:
            raise SeedFormatError(f"{where}: missing field 'instances' (self-instruct) or 'output' (Alpaca)")
        instances = (_instance(where, obj),)
    task_id = _field(where, obj, "id", str, required=False, default=default_id, non_empty=True)
    name = _field(where, obj, "name", str, required=False, default=_slug(task_id), non_empty=True)
    is_cls = _field(where, obj, "is_classification", bool, required=False, default=False)
    return SeedTask(id=task_id, name=name, instruction=instruction, instances=instances,
                    is_classification=is_cls, source=str(path))


def task_chars(task: SeedTask) -> int:
    return len(task.instruction) + sum(len(i.input) + len(i.output) for i in task.instances)


def _load(path: Path, max_chars: int | None = None) -> list[tuple[SeedTask, int]]:
    """Every task of one file with the line it starts on; raises on the first bad record."""
    text = _read_text(path)
    if not text.strip():
        raise SeedFormatError(f"{path}:1: no seed tasks (the file is empty)")
    is_array = text.lstrip().startswith("[")
    records = _array_records(path, text) if is_array else _line_records(path, text)
    if not records:
        raise SeedFormatError(f"{path}:1: no seed tasks (the JSON array is empty)")
    first = records[0].value
    fmt = "self-instruct" if isinstance(first, dict) and "instances" in first else "alpaca"
    loaded: list[tuple[SeedTask, int]] = []
    first_line: dict[str, int] = {}
    for record in records:
        task = _task(path, record, fmt)
        if max_chars is not None and task_chars(task) > max_chars:
            raise SeedFormatError(f"{path}:{record.line}: seed task {task.id!r} is {task_chars(task)} characters "
                                  f"(instruction + instances), over the limit of {max_chars} (generate.max_seed_chars)")
        if task.id in first_line:
            raise SeedFormatError(f"{path}:{record.line}: duplicate id {task.id!r} "
                                  f"(first at {path}:{first_line[task.id]})")
        first_line[task.id] = record.line
        loaded.append((task, record.line))
    return loaded


# --- public API -------------------------------------------------------------------------------------
def load_seed_file(path: str | Path, max_chars: int | None = None) -> list[SeedTask]:
    """All tasks of one seed file (self-instruct JSONL, Alpaca JSON array or Alpaca JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise SeedFormatError(f"{path}: no such seed file")
    return [task for task, _ in _load(path, max_chars)]


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for entry in paths:
        entry = Path(entry)
        if entry.is_dir():
            inside = sorted(p for p in entry.iterdir() if p.is_file() and p.suffix in SEED_SUFFIXES)
            if not inside:
                raise SeedFormatError(f"{entry}: directory has no *.jsonl or *.json seed files")
            files.extend(inside)
        elif entry.is_file():
            files.append(entry)
        else:
            raise SeedFormatError(f"{entry}: no such seed file or directory")
    unique: dict[Path, Path] = {}
    for f in files:  # a file named directly and again through its folder is read once
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def load_seeds(paths: Sequence[str | Path], max_chars: int | None = None) -> list[SeedTask]:
    """Tasks from files and directories (their *.jsonl / *.json, sorted by name), in that order.
    Ids must be unique across all of them; none may be longer than `max_chars` (None: no limit)."""
    if isinstance(paths, (str, Path)):
        raise TypeError("load_seeds takes a list of paths; use load_seed_file for a single file")
    if not paths:
        raise SeedFormatError("no seed paths given")
    tasks: list[SeedTask] = []
    seen: dict[str, str] = {}  # id -> "path:line" where it first appeared
    for path in _expand(paths):
        for task, line in _load(path, max_chars):
            here = f"{path}:{line}"
            if task.id in seen:
                raise SeedFormatError(f"{here}: duplicate id {task.id!r} (first at {seen[task.id]})")
            seen[task.id] = here
            tasks.append(task)
    return tasks


def bundled_seed_dir() -> Path:
    """The installed seeds/ folder of the package (holds seed_tasks.jsonl)."""
    return Path(str(resources.files("instructflow.seeds")))


def sync_seed_tasks(wh, paths: Sequence[str | Path], max_chars: int | None = None) -> int:
    """Mirror the seed files into the warehouse's seed_tasks (all-or-nothing: a bad file changes nothing)."""
    from instructflow.warehouse import queries

    seeds = load_seeds(paths, max_chars=max_chars)
    queries.replace_seed_tasks(wh, seeds)
    return len(seeds)


def shipped_path(entry: str, default_name: str) -> Path:
    """A configured data file or folder. `bundled:NAME` (the canonical spelling) is the file NAME shipped
    in the package's seeds/ folder; a bare `bundled` is accepted too and means `bundled:<default_name>`;
    anything else is a path (`~` expanded)."""
    if entry == "bundled":
        entry = f"bundled:{default_name}"
    if entry.startswith("bundled:"):
        return bundled_seed_dir() / entry.split(":", 1)[1]
    return Path(entry).expanduser()


def seeds_content_hash(tasks: Sequence[SeedTask]) -> str:
    """sha256 over a canonical JSON of the tasks, in order. `source` is left out on purpose: the same
    seeds installed at another path (CI, a wheel) must hash the same."""
    canonical = [{"id": t.id, "name": t.name, "instruction": t.instruction, "is_classification": t.is_classification,
                  "instances": [{"input": i.input, "output": i.output} for i in t.instances]} for t in tasks]
    blob = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()

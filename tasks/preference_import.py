"""Importing preference files into the warehouse: streamed, checked before anything is written, and
idempotent by content.

Two steps, so the preferences stage can fail on a bad file before it samples anything and still
import only once its own work has succeeded:

- `plan_imports` hashes every listed file (SHA-256 of its bytes, streamed). A file whose hash the
  warehouse recorded as imported (`imported_files`) is `unchanged` and not read again; one listed
  twice is a `repeat`. Every other file is read through once (`check_preference_file`), so the
  first bad line of any of them raises `FILE:LINE: what is wrong` before anything is written.
- `import_planned` reads each file to import again, line by line, and stores its pairs in batches
  (`BATCH_ROWS` rows or `BATCH_CHARS` characters, one INSERT each), committed in chunks of
  `CHUNK_CHARS` characters. The pairs carry the import's id, and the file's `imported_files` row
  says `importing` until the transaction of the last chunk marks it `done`. A bad line (the file was
  edited since the check) or any error deletes every pair of that import and its row, so nothing of
  the file stays; a kill leaves the row `importing`, and the next writer to open the warehouse
  (`discard_unfinished_imports`) deletes the same before anything reads the pairs. Only keys not
  stored yet are inserted (an anti-join in SQL: no key of the warehouse is loaded into Python), so
  an import's pairs are exactly what it added and taking them out restores what was there.

Why chunks and not one transaction per file: DuckDB keeps part of a transaction's uncommitted rows
pinned in memory (~8.5 KB per row with 12,000-character fields), so one transaction over a 1.1 GB
file ran out of memory under the cap below; committed chunks are flushed and evictable. A commit
holds about twice its chunk in memory while it writes the WAL, hence chunks of 16M characters
(64M: 140 MB more peak RSS on a 200 MB file, for 20% less time).

Memory stays flat in the number of pairs: one batch in Python, DuckDB's buffer pool capped while
the import runs (`import_memory_limit`). A pair with a prompt, chosen or rejected longer than
`max_field_chars` is refused and counted, not an error. A changed file is a new hash: it is read
again and adds the pairs whose keys are new; the pairs stored from its earlier content stay (the
warehouse keeps what it stored), as do the pairs of a file taken off the list.
"""
from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from instructflow.tasks.preferences import (FileScan, PreferenceFormatError, check_preference_file, file_sha256,
                                            iter_preference_file)
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse

BATCH_ROWS = 5000               # pairs per INSERT ...
BATCH_CHARS = 4_000_000         # ... or fewer, once their prompt + chosen + rejected reach this many characters
CHUNK_CHARS = 16_000_000        # batches committed together (one transaction) until they hold this many characters
# DuckDB's buffer pool while importing (its default is 80% of the RAM, and it keeps every page it wrote up to
# that): this much, plus INDEX_BYTES_PER_PAIR for every pair stored and to come. An insert needs the whole
# unique index on pair_key in memory (~70 bytes a key: 195 MB at 3M pairs), and what the cap cannot hold
# otherwise spills to the warehouse's .tmp folder.
IMPORT_MEMORY_BASE = 256 << 20
INDEX_BYTES_PER_PAIR = 100


@dataclass
class FilePlan:
    path: Path
    sha256: str
    action: str                 # import | unchanged (imported before) | repeat (same bytes listed earlier)
    scan: FileScan | None = None


@dataclass
class ImportReport:
    files_imported: int = 0
    files_unchanged: int = 0    # unchanged since an earlier import, or listed twice: not read
    imported_now: int = 0       # new pair keys stored by this import
    pairs_read: int = 0         # valid pairs within the limit in the files read (repeats of stored keys too)
    refused_too_long: int = 0
    seconds: float = 0.0        # planning (hash + check) and import
    check_s: float = 0.0        # of which planning
    files: list = field(default_factory=list)   # per file: path, action, pairs, imported, refused_too_long

    def metrics(self) -> dict:
        return {"imported_now": self.imported_now, "refused_too_long": self.refused_too_long,
                "files_imported": self.files_imported, "files_unchanged": self.files_unchanged,
                "import_s": round(self.seconds, 2)}


def plan_imports(wh: Warehouse, paths: Sequence[str | Path], max_field_chars: int,
                 reread: bool = False) -> list[FilePlan]:
    """What importing `paths` would do; every file to import is read through and checked. Writes nothing.
    `reread` (the stage's --force) reads unchanged files again too (their stored keys are still skipped)."""
    queries.discard_unfinished_imports(wh)   # a killed import's pairs (the CLI already did this at open)
    plans: list[FilePlan] = []
    seen: set[str] = set()
    for entry in paths:
        path = Path(entry)
        if not path.is_file():
            raise PreferenceFormatError(f"{path}: preference file not found")
        sha256 = file_sha256(path)
        if sha256 in seen:
            plans.append(FilePlan(path, sha256, "repeat"))
        elif not reread and queries.file_imported_before(wh, sha256, max_field_chars):
            plans.append(FilePlan(path, sha256, "unchanged"))
        else:
            plans.append(FilePlan(path, sha256, "import", check_preference_file(path, max_field_chars)))
        seen.add(sha256)
    return plans


class _Batch:
    """Parallel columns of the pairs waiting for the next INSERT."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.chosen: list[str] = []
        self.rejected: list[str] = []
        self.origins: list[str] = []
        self.keys: list[str] = []
        self.chars = 0

    def add(self, pair) -> bool:
        """Add a pair; True when the batch is full."""
        self.prompts.append(pair.prompt)
        self.chosen.append(pair.chosen)
        self.rejected.append(pair.rejected)
        self.origins.append(pair.origin)
        self.keys.append(pair.key)
        self.chars += len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
        return len(self.keys) >= BATCH_ROWS or self.chars >= BATCH_CHARS

    def flush(self, wh: Warehouse, import_id: str) -> int:
        stored = queries.insert_imported_pairs(wh, import_id, self.prompts, self.chosen, self.rejected, self.origins,
                                               self.keys)
        self.__init__()
        return stored


def import_file(wh: Warehouse, path: Path, sha256: str, max_field_chars: int) -> tuple[FileScan, int]:
    """One file, in chunks, all of it or none of it: returns what was read and how many pairs were new."""
    import_id = queries.start_file_import(wh, sha256, str(path), max_field_chars)
    scan = FileScan(path, max_field_chars)
    imported = 0
    batch = _Batch()
    pairs = iter_preference_file(path, max_field_chars, scan)
    try:
        finished = False
        while not finished:
            with wh.transaction():
                chunk = 0
                for pair in pairs:
                    if batch.add(pair):
                        chunk += batch.chars
                        imported += batch.flush(wh, import_id)
                        if chunk >= CHUNK_CHARS:
                            break
                else:  # the last line was read: the last chunk and the `done` mark commit together
                    imported += batch.flush(wh, import_id)
                    queries.finish_file_import(wh, import_id, scan.sha256, scan.bytes, scan.pairs, imported,
                                               scan.refused_too_long)
                    finished = True
    except BaseException:
        with suppress(Exception):  # if even this fails, the row stays `importing` and the next open cleans it
            queries.discard_imports(wh, [import_id])
        raise
    return scan, imported


def import_memory_limit(stored_pairs: int, incoming_pairs: int) -> str:
    return f"{(IMPORT_MEMORY_BASE + INDEX_BYTES_PER_PAIR * (stored_pairs + incoming_pairs)) >> 20}MB"


def import_planned(wh: Warehouse, plans: Sequence[FilePlan], max_field_chars: int,
                   planning_s: float = 0.0) -> ImportReport:
    """Import the planned files, each in chunks, all of it or none of it (the file is read again: it may
    have changed since the plan, and is checked again line by line as it is stored)."""
    start = time.perf_counter()
    report = ImportReport(check_s=planning_s)
    to_import = [plan for plan in plans if plan.action == "import"]
    report.files_unchanged = len(plans) - len(to_import)
    report.files = [{"path": str(plan.path), "action": plan.action, "sha256": plan.sha256}
                    for plan in plans if plan.action != "import"]
    if to_import:
        incoming = sum(plan.scan.pairs for plan in to_import if plan.scan is not None)
        with wh.bulk_write(import_memory_limit(queries.preference_pair_count(wh), incoming)):
            for plan in to_import:
                scan, imported = import_file(wh, plan.path, plan.sha256, max_field_chars)
                report.files_imported += 1
                report.imported_now += imported
                report.pairs_read += scan.pairs
                report.refused_too_long += scan.refused_too_long
                report.files.append({"path": str(plan.path), "action": "import", "sha256": scan.sha256,
                                     "pairs": scan.pairs, "imported": imported,
                                     "refused_too_long": scan.refused_too_long})
    report.seconds = planning_s + time.perf_counter() - start
    return report


def import_preference_files(wh: Warehouse, paths: Sequence[str | Path], max_field_chars: int,
                            reread: bool = False) -> ImportReport:
    """Plan (check every new or changed file), then import: a bad line anywhere imports nothing."""
    start = time.perf_counter()
    plans = plan_imports(wh, paths, max_field_chars, reread)
    return import_planned(wh, plans, max_field_chars, planning_s=time.perf_counter() - start)

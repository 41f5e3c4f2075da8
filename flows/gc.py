"""`instructflow gc`: remove the run folders of a data home that no current stage result points to.

A training stage writes one folder per job (`HOME/stages/<stage>/run-<hash>`, evaluate's held-out reward
model `HOME/stages/evaluate/holdout-reward-<hash>`), named by its inputs, so a change of data or settings
leaves the old folder behind. A folder is kept when

* a current stage result points into it: a checkpoint registered by the latest successful run of a stage,
  the newest checkpoint of each kind, or a path among the metrics of a stage's latest successful run
  (evaluate's `rm_holdout_checkpoint`); or
* it is unfinished (no final/) and its stage's newest run failed or was interrupted: its resume state is
  what a rerun of that stage continues from.

Everything else is removed. gc holds the warehouse (DuckDB's lock) while it decides and deletes, so no
run starts meanwhile, and it refuses, removing nothing, while a run holds it. `dry_run` only lists."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from instructflow.flows.report import last_attempt
from instructflow.tasks.exhaustion import tree_bytes
from instructflow.warehouse import queries
from instructflow.warehouse.store import WAREHOUSE_FILE, Warehouse, WarehouseError, open_warehouse

RUN_FOLDERS = ("run-*", "holdout-reward-*")  # under HOME/stages/<stage>/


@dataclass
class Collected:
    """What gc removed (or, dry run, would remove) and kept, folders relative to the home's stages/."""
    home: Path
    dry_run: bool
    removed: list[tuple[Path, int]] = field(default_factory=list)  # (folder, bytes)
    kept: list[tuple[Path, str]] = field(default_factory=list)     # (folder, why)

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.removed)


def run_folders(home: Path) -> list[Path]:
    stages = Path(home) / "stages"
    return sorted(folder for pattern in RUN_FOLDERS for folder in stages.glob(f"*/{pattern}") if folder.is_dir())


def collect_garbage(home: Path, dry_run: bool = False) -> Collected:
    """Remove (or only list) the run folders of `home` that no current stage result points to."""
    home = Path(home)
    if not (home / WAREHOUSE_FILE).exists():
        raise WarehouseError(f"no warehouse in {home}: nothing to collect")
    try:
        wh = open_warehouse(home, read_only=dry_run)  # the lock: no run starts while gc deletes
    except WarehouseError as exc:
        raise WarehouseError(f"gc removed nothing: {exc}") from None
    try:
        found = Collected(home, dry_run)
        in_use = _paths_in_use(wh, home)
        resumable = {folder.parent.name for folder in run_folders(home)
                     if last_attempt(wh, folder.parent.name) is not None}
        for folder in run_folders(home):
            if any(path == folder or folder in path.parents for path in in_use):
                found.kept.append((folder, "current"))
            elif folder.parent.name in resumable and not (folder / "final").is_dir():
                found.kept.append((folder, "resume state of an interrupted or failed run"))
            else:
                found.removed.append((folder, tree_bytes(folder)))
        if not dry_run:
            for folder, _ in found.removed:
                shutil.rmtree(folder)
        return found
    finally:
        wh.close()


def _paths_in_use(wh: Warehouse, home: Path) -> set[Path]:
    """Checkpoints the current results point to, and any path under HOME/stages a latest successful stage
    run names among its metrics."""
    stages = (home / "stages").resolve()
    paths = {Path(p).resolve() for p in queries.checkpoint_paths_in_use(wh)}
    for run in queries.last_successful_stage_runs(wh):
        for value in _strings(json.loads(run["metrics"] or "{}")):
            path = Path(value)
            if path.is_absolute() and stages in path.resolve().parents:
                paths.add(path.resolve())
    return {_under(path, home) for path in paths}


def _under(path: Path, home: Path) -> Path:
    """`path` spelled under `home` as given (not resolved), so it compares with the folders listed there."""
    try:
        return home / path.relative_to(home.resolve())
    except ValueError:
        return path


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []

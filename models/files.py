"""Files a recipe or the model cache publishes: JSON written then renamed, and directories built under a
temp name next to their target, then renamed, so a kill mid-write never leaves one that looks finished.
No torch here: models/bundled.py and models/recipe_io.py both build on it."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write then rename, so a kill mid-write never leaves a truncated file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def replace_dir(tmp: Path, target: Path) -> Path:
    """Rename the finished `tmp` onto `target`; an existing target is removed only once the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.tmp-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    return target


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a fresh temp dir next to `target`, then `replace_dir`; a failed write leaves no trace."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; model dirs and caches are meant to be shared
        return replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Resource exhaustion (a full disk, a file size limit, RAM or GPU memory) turned into one line that
says what ran out, where, and what to free or change.

`exhausted(exc)` recognises it anywhere in an exception's chain (`__cause__`, `__context__`, groups):
by errno (ENOSPC, EDQUOT, EFBIG, ENOMEM), by type (MemoryError, torch's OutOfMemoryError) or by the
words libraries use when they do not raise an OSError: safetensors' `IoError(Os { code: 28, kind:
StorageFull ... })`, torch's `DefaultCPUAllocator: can't allocate memory` and `CUDA out of memory`,
SQLite's `database or disk is full`, and an accelerate rank's first error line. torch's own
`PytorchStreamWriter failed writing file` names no cause: it counts as a full disk only when the
disk under the stage's folder is nearly full now. `exhaustion_line` builds the message, with the
free space now (`shutil.disk_usage`) and a size estimate from the checkpoints and model on disk.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import re
import shutil
from pathlib import Path

DISK, FILE_SIZE, MEMORY, GPU_MEMORY = "disk", "file size", "memory", "gpu memory"

_WORDS = [
    (DISK, re.compile(r"(?i)no space left on device|StorageFull|os error 28\b|disk quota exceeded|"
                      r"database or disk is full|\bENOSPC\b|\bEDQUOT\b")),
    (FILE_SIZE, re.compile(r"(?i)file too large|FileTooLarge|os error 27\b|\bEFBIG\b")),
    (GPU_MEMORY, re.compile(r"(?i)(CUDA|HIP|MPS|XPU)( backend)? out of memory|CUDA error: out of memory|"
                            r"CUBLAS_STATUS_ALLOC_FAILED")),
    (MEMORY, re.compile(r"(?i)DefaultCPUAllocator: can't allocate memory|cannot allocate memory|"
                        r"os error 12\b|std::bad_alloc|\bENOMEM\b")),
]
_WRITE_FAILED = re.compile(r"(?i)PytorchStreamWriter failed writing|file write failed|unexpected pos \d+")
NEARLY_FULL = 0.02  # a write that failed for no stated reason on a disk this full: the disk is why
_ERRNOS = {errno.ENOSPC: DISK, errno.EDQUOT: DISK, errno.EFBIG: FILE_SIZE, errno.ENOMEM: MEMORY}


class ResourceExhausted(RuntimeError):
    """A stage ran out of disk, memory or GPU memory: one line; the original is its __cause__."""


def _chain(exc: BaseException):
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]


def exhausted(exc: BaseException, where: Path | None = None) -> str | None:
    """DISK, FILE_SIZE, MEMORY or GPU_MEMORY when `exc` (or what it was raised from) is resource
    exhaustion; `where`: the folder being written, to judge a write failure that gives no reason."""
    write_failed = False
    for current in _chain(exc):
        if isinstance(current, ResourceExhausted):
            return None  # already said, in one line
        if isinstance(current, OSError) and current.errno in _ERRNOS:
            return _ERRNOS[current.errno]
        if isinstance(current, MemoryError):
            return MEMORY
        text = f"{type(current).__name__}: {current}"
        if type(current).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError / torch.cuda.OutOfMemoryError
            return GPU_MEMORY if re.search(r"(?i)cuda|gpu|hip|mps|xpu", text) else MEMORY
        for kind, words in _WORDS:
            if words.search(text):
                return kind
        write_failed = write_failed or bool(_WRITE_FAILED.search(text))
    if write_failed and where is not None:
        usage = _usage(where)
        if usage is not None and usage.free <= NEARLY_FULL * usage.total:
            return DISK
    return None


def _usage(path: Path):
    for candidate in [Path(path), *Path(path).parents]:
        try:
            return shutil.disk_usage(candidate)
        except OSError:
            continue
    return None


def mount_point(path: Path) -> Path:
    path = Path(os.path.realpath(path))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def filesystem_type(mount: Path) -> str | None:
    """tmpfs, ext4, ... of a mount point (Linux /proc/mounts); None elsewhere."""
    found = None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1].replace("\\040", " ") == str(mount):
                found = fields[2]  # the last mount on that point is the visible one
    except OSError:
        return None
    return found


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def tree_bytes(path: Path, patterns: tuple[str, ...] = ("*",)) -> int:
    """Bytes of the files under `path` whose names match one of `patterns` (0 when it does not exist); a
    file or folder removed while it walks (a run publishing a dir) is skipped, not an error."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except OSError:
                    continue
    return total


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest complete Trainer checkpoint (it has trainer_state.json) under `folder`, or None."""
    found = [p.parent for p in Path(folder).glob("**/checkpoint-*/trainer_state.json")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def disk_need(stage_dir: Path, base_model: Path | None, checkpoints_kept: int) -> tuple[int, str] | None:
    """(bytes, how it was estimated) a training stage writes under `stage_dir`: `checkpoints_kept`
    Trainer checkpoints plus the final model. A checkpoint is the newest complete one on disk, else
    three times the base model's weights (fp32 weights and Adam's two moments)."""
    weights = tree_bytes(base_model, WEIGHTS) if base_model is not None and Path(base_model).is_dir() else 0
    checkpoint = newest_checkpoint(stage_dir)
    if checkpoint is not None:
        each, source = tree_bytes(checkpoint), f"the newest checkpoint on disk, {checkpoint.name}"
    elif weights:
        each, source = 3 * weights, f"3 x the base model's {size_text(weights)} of weights"
    else:
        return None
    final = weights or each // 3
    return (checkpoints_kept * each + final,
            f"{checkpoints_kept} checkpoints of ~{size_text(each)} ({source}) + the final model ~{size_text(final)}")


PARTIAL_DIRS = (".final.tmp", ".adapter.tmp")  # models/recipe_io.py writes a final model here, then publishes it


def free_partial_saves(folder: Path) -> int:
    """Delete the model saves a full disk cut short under a stage's folder; returns the bytes freed.
    A Trainer checkpoint without trainer_state.json (HF writes it last) is partial: the recipe's next
    start deletes it anyway (models/recipe_io.py `start_or_resume`) and resumes from the newest complete
    one; a final model is written to a temporary dir and published by a rename. Freed now, the disk
    has room again for the traceback and the run records."""
    folder = Path(folder)
    partial = [p for p in folder.glob("**/checkpoints/checkpoint-*")
               if p.is_dir() and p.name.split("-")[-1].isdigit() and not (p / "trainer_state.json").is_file()]
    partial += [p for name in PARTIAL_DIRS for p in folder.glob(f"**/{name}") if p.is_dir()]
    freed = 0
    for path in partial:
        freed += tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
    return freed


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def exhaustion_line(kind: str, stage: str, where: Path, *, need: tuple[int, str] | None = None,
                    knobs: tuple[str, ...] = (), log: Path | None = None, freed: int = 0) -> str:
    """One line: what ran out, where (and how much is free now), and what to free or change."""
    rerun = "then rerun the same command to resume" + (f" (traceback: {log})" if log else "")
    if kind == DISK:
        mount = mount_point(where)
        usage = _usage(where)
        fs = filesystem_type(mount)
        state = (f"{size_text(usage.free)} free of {size_text(usage.total)} now" if usage else "free space unknown")
        if freed:
            state += f", after deleting {size_text(freed)} of partly written model files"
        wanted = f"; the stage needs roughly {size_text(need[0])} there ({need[1]})" if need else ""
        return (f"{stage}: no space left on the disk under {where} ({mount}{', ' + fs if fs else ''}: {state})"
                f"{wanted}: free space there, or point --home / INSTRUCTFLOW_HOME at a larger disk; {rerun}")
    if kind == FILE_SIZE:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        shown = "unlimited" if limit == resource.RLIM_INFINITY else size_text(limit)
        wanted = f" (the stage needs roughly {size_text(need[0])}: {need[1]})" if need else ""
        return (f"{stage}: a file under {where} reached this process's file size limit ({shown}, `ulimit -f`)"
                f"{wanted}: raise it (`ulimit -f unlimited`); {rerun}")
    change = f"lower {' or '.join(knobs)}" if knobs else "use a smaller model or batch"
    if kind == GPU_MEMORY:
        return (f"{stage}: out of GPU memory: {change} (or set lora / gradient_checkpointing), or free the GPU "
                f"from other processes (nvidia-smi); {rerun}")
    available, total = _meminfo("MemAvailable"), _meminfo("MemTotal")
    state = f" ({size_text(available)} available of {size_text(total)} now)" if available and total else ""
    return f"{stage}: out of memory (RAM){state}: {change}, or close other programs; {rerun}"

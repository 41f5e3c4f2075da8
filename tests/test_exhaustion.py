"""Running out of disk or memory ends the command with one line that says what ran out, where, how
much is free and roughly how much the stage needs (issue: a full disk during sft printed a 402-line
SafetensorError traceback). The traceback still goes to HOME/logs/."""
from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from cliutil import cli_env, exe, shared_api


# --- recognising it --------------------------------------------------------------------------------------
def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the exception is what is tested
        return exc
    raise AssertionError("nothing was raised")


def test_real_memory_errors_are_recognised():
    import torch

    from instructflow.tasks.exhaustion import GPU_MEMORY, MEMORY, exhausted

    assert exhausted(raised(lambda: bytearray(1 << 62))) == MEMORY                 # MemoryError
    assert exhausted(raised(lambda: torch.empty(1 << 50))) == MEMORY               # DefaultCPUAllocator
    # torch's own type and words for a CUDA allocation failure (no GPU here to fill)
    assert exhausted(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == GPU_MEMORY


def test_a_full_disk_is_recognised_anywhere_in_the_chain_and_in_library_words():
    from safetensors import SafetensorError

    from instructflow.tasks.exhaustion import DISK, FILE_SIZE, exhausted

    def chained():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("saving the checkpoint failed") from exc

    assert exhausted(raised(chained)) == DISK
    # safetensors' own words (Rust's io::Error), and an accelerate rank's first error line as launch.py reports it
    assert exhausted(SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                     'message: "No space left on device" })')) == DISK
    assert exhausted(RuntimeError("accelerate launch failed (1): safetensors_rust.SafetensorError: Error while "
                                  "serializing: IoError(Os { code: 28, kind: StorageFull })")) == DISK
    assert exhausted(OSError(errno.EFBIG, "File too large")) == FILE_SIZE
    assert exhausted(ValueError("no space for the model in the prompt")) is None
    # torch's writer names no cause: a full disk only when the disk under `where` is nearly full now
    # (the run below meets it on a full tmpfs; here the test's own disk has room)
    torch_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25171328 vs 25171220")
    assert exhausted(torch_write) is None and exhausted(torch_write, Path.cwd()) is None


def test_the_line_names_the_filesystem_free_space_and_what_the_stage_needs(tmp_path):
    from instructflow.tasks.exhaustion import DISK, MEMORY, disk_need, exhaustion_line, free_partial_saves

    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"\0" * 1_000_000)
    stage = tmp_path / "stages" / "sft" / "run-1"
    complete = stage / "checkpoints" / "checkpoint-2"
    complete.mkdir(parents=True)
    (complete / "trainer_state.json").write_text("{}")
    (complete / "optimizer.pt").write_bytes(b"\0" * 2_500_000)
    partial = stage / "checkpoints" / "checkpoint-4"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 700_000)
    (stage / ".final.tmp").mkdir()
    (stage / ".final.tmp" / "model.safetensors").write_bytes(b"\0" * 300_000)

    need = disk_need(tmp_path / "stages" / "sft", base, checkpoints_kept=2)
    assert need is not None and need[0] == 2 * 2_500_002 + 1_000_000 and "checkpoint-2" in need[1]
    assert free_partial_saves(tmp_path / "stages" / "sft") == 1_000_000
    assert complete.exists() and not partial.exists() and not (stage / ".final.tmp").exists()
    line = exhaustion_line(DISK, "sft", tmp_path, need=need, log=tmp_path / "logs" / "sft-x.txt", freed=1_000_000)
    usage = shutil.disk_usage(tmp_path)
    assert line.startswith(f"sft: no space left on the disk under {tmp_path} (") and "\n" not in line
    assert f"free of {usage.total / 1e9:.1f} GB" in line or "free of" in line
    assert "needs roughly 6.0 MB" in line and "--home" in line and "traceback: " in line
    memory = exhaustion_line(MEMORY, "sft", tmp_path, knobs=("sft.batch_size", "sft.max_length"))
    assert memory.startswith("sft: out of memory (RAM)") and "lower sft.batch_size or sft.max_length" in memory


# --- a full disk under a real run -----------------------------------------------------------------------
MOUNT_SIZE_MB = 24  # the warehouse and the filter's files fit; sft's first checkpoint (~39 MB with Adam) does not
FSIZE_LIMIT = 8_000_000


def mount_namespace() -> list[str] | None:
    """The `unshare` prefix under which `mount -t tmpfs` works here, or None: root's own mount namespace
    (CI runs `make test` as root), else a user namespace that maps us to root (unprivileged, where the
    kernel allows it)."""
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m instructflow-probe \"$d\" && umount \"$d\"; rc=$?; " \
            "rmdir \"$d\"; exit $rc"
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--mount", "--map-root-user", "--propagation", "private"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "sh", "-c", probe], capture_output=True,
                                                      timeout=30).returncode == 0:
            return prefix
    return None


@pytest.mark.slow
def test_a_full_disk_during_sft_is_one_line_and_the_traceback_is_in_the_logs(tmp_path, prefect_api):
    """A real filesystem that fills: a 24 MB tmpfs as the data home, mounted inside a private mount
    namespace (`unshare --mount`) that lives exactly as long as the command, so nothing is left mounted
    if the test dies, and nothing outside sees it. As root (CI: a fresh VM of this image, `make test` as
    root) plain `unshare --mount` works; unprivileged, `--map-root-user` does where user namespaces are
    allowed. A tmpfs fails a write with ENOSPC exactly as a full disk does, through safetensors'
    and torch's own writers. Where no namespace can mount (a locked-down container), the test does not
    skip: it runs the command under RLIMIT_FSIZE instead (writes past the limit fail with EFBIG, "File too
    large"), which exercises the same path to the one-line message with the file-size wording."""
    from instructflow.flows.common import cache_dir
    from instructflow.models.bundled import ensure_bundled_hf_dir
    from instructflow.models.tiny import build_tiny_llama

    build_tiny_llama(cache_dir() / "tiny-llama", tokenizer_dir=ensure_bundled_hf_dir(cache_dir()))  # not on the tmpfs
    config = tmp_path / "test.toml"
    config.write_text("[profiles.t]\ninherits = 'tiny'\n[profiles.t.sft]\nmax_steps = 2\nsave_steps = 1\n"
                      "eval_steps = 2\n")
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    command = [exe(), "run", "--profile", "t", "--config", str(config), "--stages", "filter,sft"]
    env = cli_env(home, **shared_api(), COLUMNS="300")
    prefix = None if os.environ.get("INSTRUCTFLOW_TEST_NO_MOUNT") else mount_namespace()
    if prefix is not None:
        # the home's files exist only inside the namespace: copy out what the test reads before it ends
        script = (f'mount -t tmpfs -o size={MOUNT_SIZE_MB}m instructflow-test "$H" || exit 97\n'
                  '"$@" > "$O/stdout" 2> "$O/stderr"; echo $? > "$O/rc"\n'
                  'cp -r "$H/logs" "$O/logs"; cp "$H"/warehouse.duckdb* "$O/"; df -B1 "$H" > "$O/df"\n')
        done = subprocess.run([*prefix, "sh", "-c", script, "sh", *command], env={**env, "H": str(home), "O": str(out)},
                              timeout=600)
        assert done.returncode == 0, "the namespace script failed"
        rc, stderr, logs = int((out / "rc").read_text()), (out / "stderr").read_text(), out / "logs"
        warehouse = out
    else:
        def limit_file_size():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))

        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                              preexec_fn=limit_file_size)
        rc, stderr, logs, warehouse = done.returncode, done.stderr, home / "logs", home

    assert rc == 1, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sft: "), stderr[-3000:]
    if prefix is not None:
        total = int((out / "df").read_text().splitlines()[1].split()[1])
        assert f"no space left on the disk under {home}" in lines[0] and "tmpfs: " in lines[0], lines[0]
        assert f"free of {total / 1e6:.1f} MB now" in lines[0], lines[0]
        assert "the stage needs roughly" in lines[0] and "MB there (2 checkpoints of ~" in lines[0], lines[0]
    else:
        assert "file size limit (8.0 MB, `ulimit -f`)" in lines[0], lines[0]
    assert "--home" in lines[0] or "ulimit -f unlimited" in lines[0]
    traceback = [p for p in logs.glob("sft-*.txt")]
    assert traceback and f"traceback: {home / 'logs' / traceback[0].name}" in lines[0], lines[0]
    text = traceback[0].read_text()
    assert text.startswith("Traceback") and ("No space left" in text or "unexpected pos" in text
                                             or "file write failed" in text or "File too large" in text), text[-2000:]
    import duckdb

    con = duckdb.connect(str(warehouse / "warehouse.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT status, error FROM stage_runs WHERE stage = 'sft'").fetchall() == \
            [("failed", lines[0][len("error: "):])]
    finally:
        con.close()

"""The embedded teacher: `transformers serve` on a local HF model dir, as a child process.

    with TeacherServer(model_dir) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none")
        await client.chat.completions.create(model=server.model_name, messages=[...])

The server is started with the model dir as its FORCE_MODEL argument: it loads the model before
it starts listening (so /health answering means "ready to generate"), and it rejects any request
whose `model` differs from that exact string, which is why `model_name` is the dir path itself.

Continuous batching (`continuous_batching=True`, `teacher.continuous_batching`; off by default, on in the gpu profile):
every request in flight decodes in the same forward pass (paged attention), several times the
completion tokens/s of the one-at-a-time server at 8 concurrent requests (bench/teacher_throughput.py).
What the pinned transformers 5.24 serve does NOT do on that path: per-request sampling (the FIRST
request's temperature/top_p/do_sample apply to every later one), `stop` strings (generation runs to
eos or max_tokens) and per-request `seed` (batch composition changes what is sampled).

Lifetime: the child runs in its own process group (so Ctrl-C in a terminal reaches only us, and
stop() can kill the whole group), and asks the kernel to SIGKILL it when its parent dies (PR_SET_PDEATHSIG,
models/processes.py), so a SIGKILLed pipeline run leaves no orphan server holding RAM and a port.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from instructflow.models.processes import die_with_parent

STOP_GRACE_S = 5.0  # SIGTERM first (uvicorn shuts down cleanly), SIGKILL after this
LOG_TAIL_LINES = 20

# The child is pointed at a local dir: it never needs the network. The update check would
# otherwise call PyPI once a day from every fresh HOME; the progress bars only clutter the log.
CHILD_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}

# Continuous batching (paged attention) on a CPU: the library sizes the KV cache and the batch from
# free memory (90% of RAM, 8192-token batches, whose attention masks alone take GBs), which suits a GPU,
# not a shared 2-core box. These caps hold 16 requests of ~1k tokens (SmolLM2-135M: ~0.75 GB of
# fp32 KV) and keep one forward pass short, so new requests join the batch quickly. On CUDA the
# library's memory-based defaults are kept.
CPU_CONTINUOUS_BATCHING_ARGS = ("--cb-block-size", "256", "--cb-num-blocks", "64", "--cb-max-batch-tokens", "512")
# One intra-op thread: when other processes hold the cores (the pipeline itself, a shared box), two
# threads stall on each other at every op (~10x fewer tokens/s at 8 concurrent requests on a loaded
# 2-core machine). An OMP_NUM_THREADS in the caller's environment still wins.
CPU_CONTINUOUS_BATCHING_ENV = {"OMP_NUM_THREADS": "1"}

# `python -m transformers.cli.transformers` works too; calling main() keeps us on this venv's
# interpreter even when the console script is not on PATH.
SERVE_LAUNCHER = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()"


class TeacherServerError(RuntimeError):
    pass


def _free_loopback_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TeacherServer:
    """A `transformers serve` child process for one model dir; a context manager that always stops it.

    Note: PR_SET_PDEATHSIG fires when the *thread* that started the child exits, so call start()
    and stop() from the same long-lived thread (the `with` block guarantees this).
    """

    def __init__(self, model_dir: Path, *, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout_s: float = 120, log_path: Path | None = None, extra_args: Sequence[str] = (),
                 continuous_batching: bool = False):
        self.model_dir = Path(model_dir).expanduser().resolve()
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path is not None else None
        self.extra_args = list(extra_args)
        self.continuous_batching = continuous_batching
        self.model_name = str(self.model_dir)  # the server accepts only its FORCE_MODEL string
        self.startup_s: float | None = None  # seconds from launch to a healthy /health
        self._process: subprocess.Popen | None = None
        self._launched_at = 0.0
        self._log_file = None
        self._log_start = 0  # this run's first byte in the (appended) log
        self._own_log: Path | None = None  # temp log we created and delete on stop

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise TeacherServerError("TeacherServer.base_url: the server has no port yet; call start() first")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{self.host}:{self.port}/health"

    # ------------------------------------------------------------------------------------------

    def start(self) -> "TeacherServer":
        if self._process is not None:
            raise TeacherServerError(f"TeacherServer for {self.model_dir} is already running (pid {self._process.pid})")
        if "@" in self.model_name:  # the server would read what follows "@" as a hub revision
            raise TeacherServerError(f"teacher model dir {self.model_dir} contains '@'; move it to a path without one")
        if not (self.model_dir / "config.json").is_file():
            raise TeacherServerError(f"teacher model dir {self.model_dir} has no config.json; "
                                     "expected a saved Hugging Face model directory")
        pick_port = self.port is None
        for attempt in range(3):  # a picked port can be taken by someone else before the child binds it
            if pick_port:
                self.port = _free_loopback_port(self.host)
            try:
                self._launch()
                self._wait_healthy()
                return self
            except TeacherServerError as error:
                self.stop()
                if pick_port and attempt < 2 and "address already in use" in str(error).lower():
                    continue
                raise
            except BaseException:  # Ctrl-C while waiting: __exit__ will not run, so clean up here
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="teacher-server-", suffix=".log")
            os.close(fd)
            self._own_log = Path(name)
        log_path = self.log_path or self._own_log
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log_path, "ab")
        self._log_start = self._log_file.tell()
        command = [sys.executable, "-c", SERVE_LAUNCHER, "serve", self.model_name,
                   "--host", self.host, "--port", str(self.port), *self.batching_args(), *self.extra_args]
        self._log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode())
        self._log_file.flush()
        env = {**CHILD_ENV_DEFAULTS, **self.batching_env(), **os.environ}  # the caller's environment wins
        parent_pid = os.getpid()
        self._launched_at = time.monotonic()
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=lambda: die_with_parent(parent_pid),
        )

    def _batching_on_cpu(self) -> bool:
        import torch  # the child picks `--device auto` the same way

        return self.continuous_batching and not torch.cuda.is_available()

    def batching_args(self) -> list[str]:
        """`--continuous-batching` plus, unless the child will see a GPU, the CPU caps above."""
        if not self.continuous_batching:
            return []
        return ["--continuous-batching", *(CPU_CONTINUOUS_BATCHING_ARGS if self._batching_on_cpu() else ())]

    def batching_env(self) -> dict[str, str]:
        return dict(CPU_CONTINUOUS_BATCHING_ENV) if self._batching_on_cpu() else {}

    def _wait_healthy(self) -> None:
        deadline = self._launched_at + self.startup_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                tail = self.log_tail()
                reason = tail.splitlines()[-1].strip() if tail.strip() else "no output"
                raise TeacherServerError(f"teacher server for {self.model_dir} exited with code {code} during startup: "
                                         f"{reason}\nlast log lines:\n{tail}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as response:
                    if response.status == 200:
                        self.startup_s = time.monotonic() - self._launched_at
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass  # not listening yet (the model loads before the socket opens)
            if time.monotonic() > deadline:
                raise TeacherServerError(f"teacher server for {self.model_dir} not healthy at {self.health_url} after "
                                         f"{self.startup_timeout_s:.0f}s; last log lines:\n{self.log_tail()}")
            time.sleep(0.25)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines this run wrote to the server log (for error messages)."""
        log_path = self.log_path or self._own_log
        try:
            with open(log_path, "rb") as handle:
                handle.seek(self._log_start)
                text = handle.read().decode(errors="replace")
        except (OSError, TypeError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    # ------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it if still alive after a grace period. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
            self._signal_group(process, signal.SIGKILL)  # anything the server itself spawned
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_log is not None:
            self._own_log.unlink(missing_ok=True)
            self._own_log = None

    @staticmethod
    def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)  # start_new_session: the group id is the child's pid
        except ProcessLookupError:
            pass

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> "TeacherServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:  # also runs on KeyboardInterrupt
        self.stop()

    def __del__(self) -> None:
        if getattr(self, "_process", None) is not None:
            self.stop()

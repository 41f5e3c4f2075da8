"""A local Prefect server (SQLite under the data home, loopback only) for the dashboard and for
scheduled deployments. While it runs, `home/dashboard.json` tells other instructflow commands to
send their flow runs to it, so the dashboard shows them live."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MARKER = "dashboard.json"
SERVER_LOG = Path("logs") / "prefect-server.log"  # under the home; appended to by each start
SERVER_START = "instructflow: prefect server start"  # the line each start writes first


def server_alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def running_dashboard(home: Path) -> str | None:
    """The API URL of a live dashboard for this home, or None (a stale marker is removed)."""
    marker = home / MARKER
    if not marker.exists():
        return None
    try:
        api_url = json.loads(marker.read_text())["api_url"]
    except (ValueError, KeyError):
        api_url = None
    if api_url and server_alive(api_url):
        return api_url
    marker.unlink(missing_ok=True)
    return None


def last_scheduler_error(home: Path) -> str | None:
    """The last scheduler ERROR the home's server logged since it last started, as one line (the
    log record and its exception's last line), or None."""
    path = home / SERVER_LOG
    if not path.exists():
        return None
    lines = path.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if SERVER_START in line]
    lines = lines[starts[-1] + 1:] if starts else lines
    errors = [i for i, line in enumerate(lines) if "| ERROR" in line and "schedul" in line.lower()]
    if not errors:
        return None
    record = lines[errors[-1]]
    # its traceback runs to the next log record ("HH:MM:SS.mmm | LEVEL | ..."); the exception is its last line
    following = []
    for line in lines[errors[-1] + 1:]:
        if " | " in line[:16] and line[:2].isdigit():
            break
        if line.strip():
            following.append(line.strip())
    return " ".join(record.split()) + (f" ... {following[-1]}" if following else "")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread: it unwinds the command as Ctrl-C does (every
    `finally` and context manager stops what it started), then the command exits 128 + signum."""

    def __init__(self, signum: int):
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(self.name)


def stop_on_term_and_hangup() -> None:
    """SIGTERM and SIGHUP unwind a command as Ctrl-C does, so the `finally` blocks stop what it
    started: the embedded teacher, an accelerate launch and its ranks, a Prefect server (in its own
    session, it would outlive the command otherwise), the ephemeral API (at exit)."""
    def interrupt(signum, frame):
        raise Terminated(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    # a command started in the background by a script (`cmd &` in a non-interactive shell) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt: `kill -INT` would not stop it or what it started
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def local_prefect_server(home: Path, port: int = 4200, timeout_s: float = 120) -> Iterator[str]:
    """Start `prefect server start` on 127.0.0.1:port with its database under home/prefect; yields the API URL."""
    existing = running_dashboard(home)
    if existing:
        yield existing
        return
    if not port_free(port):
        raise RuntimeError(f"port {port} is taken: pass --port with a free one")
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=api_url)  # without it the UI calls port 4200 whatever port it is on
    env.pop("PREFECT_API_URL", None)
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    log = open(home / SERVER_LOG, "ab")
    log.write(f"{time.strftime('%H:%M:%S')} | {SERVER_START} on port {port}\n".encode())
    log.flush()
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    follow_with_reaper(process.pid)  # a SIGKILLed dashboard cannot stop it itself
    try:
        deadline = time.monotonic() + timeout_s
        while not server_alive(api_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not start (see {home / 'logs' / 'prefect-server.log'})")
            time.sleep(0.5)
        (home / MARKER).write_text(json.dumps({"api_url": api_url, "pid": process.pid}))
        yield api_url
    finally:
        (home / MARKER).unlink(missing_ok=True)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()


# A SIGKILLed `instructflow run` cannot stop the ephemeral Prefect API it started (prefect's atexit
# never runs), nor a SIGKILLed `dashboard` its server, which would leave a process holding RAM and a
# port. A tiny reaper, started beside each server, stops it once the command's process is gone.
REAPER = """
import os, signal, sys, time
owner, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):  # a zombie counts as gone
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
while alive(server):
    if os.getppid() != owner or not alive(owner):
        os.kill(server, signal.SIGTERM)
        break
    time.sleep(1)
"""


def follow_with_reaper(server_pid: int) -> None:
    subprocess.Popen([sys.executable, "-c", REAPER, str(os.getpid()), str(server_pid)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def guard_ephemeral_server() -> None:
    """Wrap prefect 3.8.8's ephemeral server (pinned exactly): a reaper follows each server, and a
    start that times out (a loaded machine) is stopped and tried once more before the run fails."""
    from prefect.server.api.server import SubprocessASGIServer

    start_server = SubprocessASGIServer._run_uvicorn_command
    if getattr(start_server, "_instructflow_reaped", False):
        return

    def start_with_reaper(self):
        process = start_server(self)
        follow_with_reaper(process.pid)
        return process

    start_and_wait = SubprocessASGIServer.start

    def start_with_one_retry(self, timeout=None):
        try:
            start_and_wait(self, timeout)
        except RuntimeError as exc:
            if "Timed out" not in str(exc):
                raise
            if self.server_process is not None and self.server_process.poll() is None:
                self.server_process.kill()  # prefect leaves a timed-out server running
                self.server_process.wait()
            start_and_wait(self, timeout)

    start_with_reaper._instructflow_reaped = True
    SubprocessASGIServer._run_uvicorn_command = start_with_reaper
    SubprocessASGIServer.start = start_with_one_retry


def scheduler_check(home_path: Path) -> tuple[str, str, bool]:
    """Is the Prefect server this home's runs go to creating the scheduled runs of its deployments?"""
    from datetime import datetime, timezone
    from importlib import metadata

    import httpx

    sqlalchemy = metadata.version("sqlalchemy")
    bad_sqlalchemy = tuple(int(part) for part in sqlalchemy.split(".")[:2]) >= (2, 1)
    prefix = (f"sqlalchemy {sqlalchemy}: prefect 3.8.8's scheduler fails on 2.1 (pip install 'sqlalchemy<2.1' or "
              "`make setup`); " if bad_sqlalchemy else "")
    own_api = running_dashboard(home_path)
    api = os.environ.get("PREFECT_API_URL") or own_api
    if not api:
        return ("scheduler", prefix + "no server running for this home: schedules fire only while `instructflow "
                "dashboard` or `instructflow deploy` runs (the per-process API has no scheduler)", not bad_sqlalchemy)
    error = last_scheduler_error(home_path) if api == own_api else None
    log_note = f" (server log: {home_path / SERVER_LOG})" if api == own_api else ""
    upcoming_after = datetime.now(timezone.utc).isoformat()
    try:
        with httpx.Client(base_url=api.rstrip("/"), timeout=10) as client:
            flows = {f["id"]: f["name"] for f in client.post("/flows/filter", json={}).raise_for_status().json()}
            upcoming = {}
            for deployment in client.post("/deployments/filter", json={}).raise_for_status().json():
                if deployment.get("paused") or not any(s.get("active") for s in deployment.get("schedules") or []):
                    continue
                runs = {"deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}},
                        "expected_start_time": {"after_": upcoming_after}}
                name = f"{flows.get(deployment['flow_id'], '?')}/{deployment['name']}"
                upcoming[name] = client.post("/flow_runs/count", json={"flow_runs": runs}).raise_for_status().json()
    except httpx.HTTPError as exc:
        return ("scheduler", f"{prefix}{api} unreachable: {type(exc).__name__}{log_note}", False)
    if not upcoming:
        text, ok = f"no deployment with an active schedule on {api}", True
    else:
        text = "; ".join(f"{name}: {count} upcoming scheduled runs" if count else
                         f"{name}: NO upcoming run created (the server's scheduler is not working)"
                         for name, count in upcoming.items())
        ok = all(upcoming.values())
    if error:
        text, ok = f"{text}; last scheduler error: {error}", False
    return ("scheduler", prefix + text + log_note, ok and not bad_sqlalchemy)

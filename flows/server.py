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


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


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
    log = open(home / "logs" / "prefect-server.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
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
# never runs), which would leave a uvicorn process holding RAM and a port. A tiny reaper, started
# beside each ephemeral server, stops it once the run's process is gone.
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


def reap_ephemeral_server_with_this_process() -> None:
    """Wrap prefect 3.8.8's ephemeral server start (pinned exactly) so a reaper follows each server."""
    from prefect.server.api.server import SubprocessASGIServer

    start_server = SubprocessASGIServer._run_uvicorn_command
    if getattr(start_server, "_instructflow_reaped", False):
        return

    def start_with_reaper(self):
        process = start_server(self)
        subprocess.Popen([sys.executable, "-c", REAPER, str(os.getpid()), str(process.pid)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        return process

    start_with_reaper._instructflow_reaped = True
    SubprocessASGIServer._run_uvicorn_command = start_with_reaper

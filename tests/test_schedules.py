"""Schedules fire by themselves: `instructflow deploy --interval/--cron` against the local Prefect
server that deploy starts (a real `prefect server start`, its scheduler loop shortened), and no one
triggers a run. Also `instructflow doctor`'s scheduler line against a healthy server and against one
whose scheduler service is off (the state a failing scheduler leaves: deployments, no runs)."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time

import httpx
import pytest

from cliutil import cli, cli_env, exe
from instructflow.tasks.seeds import bundled_seed_dir

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains

# what the tests may shorten: the scheduler's loops and the runner's polling, not the schedules
FAST_SCHEDULER = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
# from the first `deploy`: server start (70 s seen on a loaded 2-core machine), registration, the
# first cron minute, the run; a passing test returns as soon as its run has completed
DEADLINE_S = 210


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check, processes, deadline: float, every: float = 1.0, explain=lambda: ""):
    while time.monotonic() < deadline:
        for process, log in processes:
            assert process.poll() is None, f"deploy exited {process.returncode}: {log.read_text()[-3000:]}"
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}{explain()}")


def api_of(home) -> str | None:
    try:  # deploy writes it once its server answers
        return json.loads((home / "dashboard.json").read_text())["api_url"]
    except (FileNotFoundError, ValueError):
        return None


def deployment_id(api: str, name: str) -> str | None:
    found = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": [name]}}}, timeout=10)
    return found.json()[0]["id"] if found.status_code == 200 and found.json() else None


def completed_runs(api: str, deployment: str) -> list[dict]:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment]}, "state": {"type": {"any_": ["COMPLETED"]}}}}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).raise_for_status().json()


def runs_of(api: str, deployment: str) -> int:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment]}}}
    return httpx.post(f"{api}/flow_runs/count", json=body, timeout=10).raise_for_status().json()


def scheduler_errors(home) -> list[str]:
    log = (home / "logs" / "prefect-server.log").read_text(errors="replace")
    return [line for line in log.splitlines() if "ERROR" in line and "schedul" in line.lower()]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Three `instructflow deploy` processes: every 20 s on home `a` (it starts the local server),
    every minute by cron on home `b` against a's server, and one on home `c` whose own server runs
    with its scheduler service off."""
    root = tmp_path_factory.mktemp("schedules")
    seeds = root / "seeds.jsonl"
    shutil.copy(bundled_seed_dir() / "seed_tasks.jsonl", seeds)
    config = root / "instructflow.toml"
    config.write_text(f"[profiles.t]\ninherits = 'tiny'\nseeds = ['{seeds}']\n")
    homes = {key: root / key for key in "abc"}
    processes = []

    def deploy(home, *args, **env):
        log = root / f"deploy-{home.name}.log"
        environment = cli_env(home, **FAST_SCHEDULER, COLUMNS="200", **env)
        if "PREFECT_API_URL" not in env:
            environment.pop("PREFECT_API_URL", None)  # deploy then starts the home's local server
        process = subprocess.Popen([exe(), "deploy", *args, "--stages", "filter", "--profile", "t",
                                    "--config", str(config)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   env=environment)
        processes.append((process, log))

    start = time.monotonic()
    deadline = start + DEADLINE_S
    try:
        deploy(homes["a"], "--interval", "20", "--name", "every20", "--port", str(free_port()))
        api = wait_for("the local server of home a", lambda: api_of(homes["a"]), processes, deadline)
        deploy(homes["b"], "--cron", "* * * * *", "--name", "everyminute", PREFECT_API_URL=api)
        deploy(homes["c"], "--interval", "30", "--name", "unscheduled", "--port", str(free_port()),
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
        yield {"api": api, "homes": homes, "config": config, "processes": processes, "deadline": deadline}
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # deploy stops its runner and the server it started
        for process, _ in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.parametrize("name", ["every20", "everyminute"])
def test_schedule_fires_by_itself(served, name):
    api, processes = served["api"], served["processes"]
    registered_by = max(served["deadline"], time.monotonic() + 30)  # an earlier test may have used the time
    deployment = wait_for(f"pipeline/{name} to register", lambda: deployment_id(api, name), processes, registered_by)
    home = served["homes"]["a"]
    run = wait_for(f"a scheduled run of pipeline/{name} to complete", lambda: completed_runs(api, deployment),
                   processes, served["deadline"], every=2,
                   explain=lambda: f"; scheduler errors in the server log: {scheduler_errors(home)[-2:]}")[0]
    # nobody triggered it: the server's scheduler created it from the deployment's schedule
    assert run["auto_scheduled"] is True and run["created_by"]["type"] == "SCHEDULE", run
    assert run["parameters"]["stages_to_run"] == ["filter"]
    assert scheduler_errors(home) == []


def scheduler_row(home, config) -> tuple[int, str]:
    out = cli("doctor", "--profile", "t", "--config", str(config), home=home, COLUMNS="400", timeout=120)
    rows = [line for line in out.stdout.splitlines() if "scheduler" in line]
    assert len(rows) == 1, out.stdout + out.stderr
    return out.returncode, " ".join(rows[0].split())


def test_doctor_says_scheduled_runs_are_created(served):
    api, processes = served["api"], served["processes"]
    deadline = max(served["deadline"], time.monotonic() + 60)
    for name in ("every20", "everyminute"):
        deployment = wait_for(f"pipeline/{name} to register", lambda: deployment_id(api, name), processes, deadline)
        wait_for(f"runs of pipeline/{name}", lambda: runs_of(api, deployment), processes, deadline)
    _, row = scheduler_row(served["homes"]["a"], served["config"])
    assert "pipeline/every20: " in row and "pipeline/everyminute: " in row, row
    assert "NO upcoming run" not in row and "last scheduler error" not in row and row.endswith("│ ok │"), row
    assert str(served["homes"]["a"] / "logs" / "prefect-server.log") in row


def test_doctor_flags_a_server_that_creates_no_scheduled_runs(served):
    home = served["homes"]["c"]
    deadline = max(served["deadline"], time.monotonic() + 60)
    api = wait_for("the local server of home c", lambda: api_of(home), served["processes"], deadline)
    wait_for("pipeline/unscheduled to register", lambda: deployment_id(api, "unscheduled"), served["processes"],
             deadline)
    time.sleep(7)  # more than the (disabled) scheduler's 5 s loop
    code, row = scheduler_row(home, served["config"])
    assert code == 1 and "pipeline/unscheduled: NO upcoming run created" in row and row.endswith("│ problem │"), row

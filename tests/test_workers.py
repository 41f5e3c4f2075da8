"""Deployments run by a real Prefect worker: `instructflow deploy --work-pool NAME` registers the
pipeline and a deployment per stage on a real API (the session's `prefect_api`) and exits; a real
`prefect worker start --pool NAME` subprocess runs a triggered stage deployment to COMPLETED against
a tiny-profile home; then two runs of the same home, started while another process holds the home's
DuckDB lock, both wait (and say so in their logs), then run one after the other."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
import pytest

from cliutil import cli, cli_env, exe, query, shared_api

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains

DEADLINE_S = 150   # for each wait below; a passing test returns as soon as what it waits for is there
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def children_of(pid: int) -> list[int]:
    """Every live descendant of pid (the worker starts each flow run in a session of its own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:  # a zombie counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def stop(process: subprocess.Popen) -> list[int]:
    """SIGINT the worker (its clean shutdown), SIGKILL it after 20 s, and whatever it started; those pids."""
    started = children_of(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return started


def wait_until(what: str, check, worker: subprocess.Popen, log: Path, deadline_s: float = DEADLINE_S):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"worker exited {worker.returncode}: {log.read_text()[-3000:]}"
        found = check()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; worker log: {log.read_text()[-3000:]}")


def test_a_worker_runs_the_stage_deployments_and_runs_of_one_home_wait_for_each_other(seeded_home, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    home, config, _ = seeded_home
    api = PREFECT_API_URL.value()
    tag = uuid.uuid4().hex[:8]  # the session's API is shared with other tests
    pool, name = f"pool-{tag}", f"w-{tag}"
    started = time.monotonic()

    out = cli("deploy", "--work-pool", pool, "--name", name, "--stages", "filter", "--cron", "0 3 * * *",
              "--profile", "t", "--config", str(config), home=home, PREFECT_API_URL=api, COLUMNS="300", timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"work pool {pool}: created (type process)" in out.stderr, out.stderr
    assert f"pipeline/{name}-filter" in out.stderr, out.stderr
    deploy_s = time.monotonic() - started

    with get_client(sync_client=True) as client:
        assert client.read_work_pool(pool).type == "process"
        whole = client.read_deployment_by_name(f"pipeline/{name}")
        single = client.read_deployment_by_name(f"pipeline/{name}-filter")
        with pytest.raises(Exception):  # --stages filter: no deployment for the other stages
            client.read_deployment_by_name(f"pipeline/{name}-sft")
    # the worker imports the flow from its environment: a module path, no pull step
    for deployment in (whole, single):
        assert deployment.work_pool_name == pool and deployment.entrypoint == "instructflow.flows.pipeline.pipeline"
        assert not deployment.pull_steps and deployment.parameters["home"] == str(home)
        assert deployment.parameters["config"] == str(config.resolve()) and deployment.parameters["profile"] == "t"
    assert [s.schedule.cron for s in whole.schedules] == ["0 3 * * *"] and whole.parameters["stages_to_run"] == ["filter"]
    assert single.schedules == [] and single.parameters["stages_to_run"] == ["filter"]
    assert single.parameters["force"] is False

    log = tmp_path / "worker.log"
    env = dict(os.environ, PREFECT_API_URL=api, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_RUNNER_POLL_FREQUENCY="1",
               PREFECT_LOGGING_LEVEL="INFO")  # the worker logs which flow runs it submits
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    holder = None
    try:
        with get_client(sync_client=True) as client:
            def final(run_id):
                run = client.read_flow_run(run_id)
                return run if run.state and run.state.type.value in FINAL else None

            # 1. a triggered stage deployment reaches COMPLETED through this worker
            first = run_deployment(f"pipeline/{name}-filter", timeout=0)
            run = wait_until("the first run to finish", lambda: final(first.id), worker, log)
            assert run.state.is_completed(), (run.state, log.read_text()[-3000:])
            assert run.work_pool_name == pool and run.work_queue_name == "default"
            assert f"submitting flow run '{first.id}'" in log.read_text()  # this worker took it
            rows = query(home, "SELECT s.status FROM stage_runs s JOIN runs r USING (run_id) "
                               "WHERE r.flow_run_id = ? AND s.stage = 'filter'", [str(first.id)])
            assert rows == [("success",)], rows
            first_s = time.monotonic() - started

            # 2. another process holds the home (as a CLI run would); two runs of it start meanwhile
            holder = duckdb.connect(str(home / "warehouse.duckdb"))
            pair = [run_deployment(f"pipeline/{name}-filter", parameters={"force": True}, timeout=0).id
                    for _ in range(2)]

            def waiting_lines() -> dict:
                logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=pair)))
                found: dict = {}
                for entry in logs:
                    match = re.search(rf"waiting for the run holding {re.escape(str(home))} \(pid (\d+)\)",
                                      entry.message)
                    if match:
                        found.setdefault(entry.flow_run_id, []).append(int(match.group(1)))
                return found

            def both_wait():
                for run_id in pair:  # waiting is not failing: neither run may have ended
                    done = final(run_id)
                    assert done is None, (done.state, log.read_text()[-3000:])
                found = waiting_lines()
                return found if all(os.getpid() in found.get(run_id, []) for run_id in pair) else None

            wait_until("both runs to wait for the process holding the home", both_wait, worker, log)
            holder.close()
            holder = None
            runs = [wait_until("a waiting run to finish", lambda r=run_id: final(r), worker, log) for run_id in pair]
            assert all(r.state.is_completed() for r in runs), ([r.state for r in runs], log.read_text()[-3000:])
            # one writer at a time: the two stage runs do not overlap, and the later one waited for the earlier
            spans = query(home, "SELECT r.flow_run_id, s.started_at, s.finished_at FROM stage_runs s JOIN runs r "
                                "USING (run_id) WHERE r.flow_run_id IN (?, ?) AND s.stage = 'filter' "
                                "AND s.status = 'success' ORDER BY s.started_at", [str(i) for i in pair])
            assert len(spans) == 2, spans
            assert spans[0][2] <= spans[1][1], spans
            # ... and the later one then waited for the earlier one's process (the pid its worker started)
            later = uuid.UUID(spans[1][0])
            [earlier] = [r for r in runs if r.id != later]
            assert int(earlier.infrastructure_pid) in waiting_lines()[later], (earlier.infrastructure_pid,
                                                                               waiting_lines())
        print(f"deploy {deploy_s:.0f} s, first run done at {first_s:.0f} s, all at {time.monotonic() - started:.0f} s")
    finally:
        if holder is not None:
            holder.close()
        left = stop(worker)
    time.sleep(1)
    assert not [pid for pid in [worker.pid, *left] if alive(pid)], "the worker or its flow runs outlived the test"


def test_a_cli_run_waits_for_the_process_holding_its_home(seeded_home, tmp_path):
    """The CLI's own runs wait too (a Prefect concurrency limit would not cover them): `stage filter`
    started while another process holds the home says whom it waits for, then runs once it is free."""
    home, config, _ = seeded_home
    holder = duckdb.connect(str(home / "warehouse.duckdb"))
    err = tmp_path / "stage.err"
    run = subprocess.Popen([exe(), "stage", "filter", "--profile", "t", "--config", str(config)],
                           stdout=subprocess.DEVNULL, stderr=err.open("w"), env=cli_env(home, **shared_api()))
    try:
        deadline = time.monotonic() + 120
        line = f"waiting for the run holding {home} (pid {os.getpid()})"
        while line not in err.read_text() and time.monotonic() < deadline:
            assert run.poll() is None, err.read_text()[-3000:]
            time.sleep(0.5)
        assert line in err.read_text(), err.read_text()[-3000:]
        time.sleep(1.5)
        assert run.poll() is None  # still waiting, not failed
        holder.close()
        assert run.wait(timeout=180) == 0, err.read_text()[-3000:]
    finally:
        holder.close()
        if run.poll() is None:
            run.kill()
    assert query(home, "SELECT status FROM stage_runs WHERE stage = 'filter'") == [("success",)]

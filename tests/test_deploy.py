"""`instructflow deploy` registers a scheduled deployment on a real Prefect API, serves it, and a
triggered run of it completes (and really ran the stage against the data home)."""
from __future__ import annotations

import shutil
import signal
import time

import duckdb
import pytest

from cliutil import cli_popen
from instructflow.tasks.seeds import bundled_seed_dir

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains


def test_scheduled_deployment_runs_to_completion(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    seeds = tmp_path / "seeds.jsonl"
    shutil.copy(bundled_seed_dir() / "seed_tasks.jsonl", seeds)
    config = tmp_path / "instructflow.toml"
    config.write_text(f"[profiles.t]\ninherits = 'tiny'\nseeds = ['{seeds}']\n")
    home = tmp_path / "home"
    served = cli_popen("deploy", "--cron", "0 3 * * *", "--name", "nightly", "--stages", "filter",
                       "--profile", "t", "--config", str(config), home=home, PREFECT_API_URL=PREFECT_API_URL.value(),
                       PREFECT_SERVER_ANALYTICS_ENABLED="false")
    try:
        deployment = None
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while deployment is None and time.monotonic() < deadline:
                assert served.poll() is None, served.stderr.read()[-3000:]
                try:
                    deployment = client.read_deployment_by_name("pipeline/nightly")
                except Exception:
                    time.sleep(1)
        assert deployment is not None, "deployment never registered"
        assert deployment.parameters["profile"] == "t" and deployment.parameters["stages_to_run"] == ["filter"]
        assert any(getattr(s.schedule, "cron", None) == "0 3 * * *" for s in deployment.schedules)
        flow_run = run_deployment("pipeline/nightly", timeout=240)
        assert flow_run.state.is_completed(), flow_run.state
    finally:
        served.send_signal(signal.SIGINT)
        try:
            served.wait(timeout=30)
        except Exception:
            served.kill()
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT status FROM stage_runs WHERE stage = 'filter'").fetchall() == [("success",)]
    finally:
        con.close()


def test_prefect_yaml_deploys_with_the_prefect_cli(prefect_api):
    """The team path: `prefect deploy --all` reads the repository's prefect.yaml and registers its
    deployments (entrypoint, parameters, schedule, work pool) on a real API: the pipeline, a refilter
    chain, and one deployment per stage."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.flows import load_flow_from_entrypoint
    from prefect.settings import PREFECT_API_URL

    repo = Path(__file__).resolve().parents[1]
    prefect_cli = [sys.executable, "-m", "prefect"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "INSTRUCTFLOW_REPO": str(repo),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def prefect(*args):
        done = subprocess.run([*prefect_cli, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    prefect("work-pool", "create", "local", "--type", "process", "--overwrite")
    prefect("--no-prompt", "deploy", "--all")
    assert load_flow_from_entrypoint(str(repo / "flows/pipeline.py") + ":pipeline").name == "pipeline"
    from instructflow.flows.stages import stage_names

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("pipeline/nightly")
        refilter = client.read_deployment_by_name("pipeline/refilter")
        # the set `instructflow deploy --work-pool local --name nightly` registers: one per stage, on demand
        for stage in stage_names():
            single = client.read_deployment_by_name(f"pipeline/nightly-{stage}")
            assert single.work_pool_name == "local" and single.schedules == [], stage
            assert single.parameters == {"profile": "gpu", "stages_to_run": [stage], "force": False}, stage
    assert nightly.entrypoint == "flows/pipeline.py:pipeline" and nightly.work_pool_name == "local"
    assert nightly.parameters == {"profile": "gpu"}
    assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
    assert refilter.parameters["stages_to_run"][0] == "filter"
    assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(repo)

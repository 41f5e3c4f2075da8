"""The README's guarantees, checked the way a user meets them: Prefect's startup timeout really applies, SIGTERM/SIGHUP/SIGKILL leave no process a
long-lived command started, an expected error is one line, a failed stage imports nothing, `status`
and `report` answer while a run holds the warehouse, and library warnings stay out of the console."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cliutil import cli, cli_env, cli_popen, exe, shared_api

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains


def python(code: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    """A fresh interpreter: the test process has imported prefect already, with its own settings."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


# --- 3. Prefect's startup timeout ---------------------------------------------------------------------
def test_doctor_prints_the_effective_prefect_startup_timeout(tmp_path):
    env = cli_env(tmp_path / "h")
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    out = subprocess.run([exe(), "doctor"], capture_output=True, text=True, env=env, timeout=300)
    assert re.search(r"Prefect startup timeout\s*│\s*120 s", out.stdout), out.stdout[-2000:]
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "45"  # the user's own setting wins
    out = subprocess.run([exe(), "doctor"], capture_output=True, text=True, env=env, timeout=300)
    assert re.search(r"Prefect startup timeout\s*│\s*45 s", out.stdout), out.stdout[-2000:]


def test_run_commands_start_prefect_with_the_120_s_timeout(tmp_path):
    """What `run`/`stage` set up before their flows start: the setting prefect itself reads back."""
    env = cli_env(tmp_path / "h")
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    code = ("from instructflow.flows import cli\n"
            "cli._prepare(None, None, 'tiny')\n"
            "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as T, PREFECT_HOME\n"
            "print(T.value(), PREFECT_HOME.value())\n")
    out = python(code, env)
    assert out.returncode == 0, out.stderr[-2000:]
    timeout, prefect_home = out.stdout.split()
    assert float(timeout) == 120
    assert Path(prefect_home) == (tmp_path / "h" / "prefect").resolve()


def test_an_ephemeral_start_that_times_out_is_retried_once_and_leaves_no_server(tmp_path):
    env = cli_env(tmp_path / "h", PREFECT_HOME=str(tmp_path / "prefect"),
                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")  # below a cold start (~5 s)
    (tmp_path / "prefect").mkdir()
    code = ("import json, os\n"
            "from instructflow.flows.server import guard_ephemeral_server\n"
            "guard_ephemeral_server()\n"
            "from prefect.server.api.server import SubprocessASGIServer\n"
            "started = []\n"
            "run = SubprocessASGIServer._run_uvicorn_command\n"
            "def counted(self):\n"
            "    process = run(self)\n"
            "    started.append(process)\n"
            "    return process\n"
            "SubprocessASGIServer._run_uvicorn_command = counted\n"
            "server = SubprocessASGIServer()\n"
            "try:\n"
            "    server.start()\n"
            "    error = None\n"
            "except RuntimeError as exc:\n"
            "    error = str(exc)\n"
            "server.stop()\n"
            "print(json.dumps({'error': error, 'alive': [p.poll() is None for p in started]}))\n")
    out = python(code, env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["error"] and "Timed out" in result["error"]
    assert result["alive"] == [False, False]  # two attempts, neither left running


# --- 4. SIGTERM and SIGHUP stop everything a long-lived command started -------------------------------
def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every live process; zombies count as gone."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def started_by(pid: int) -> set[int]:
    """The processes `pid` started, also those in a session of their own, and theirs, transitively."""
    table = process_table()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        found |= frontier
        frontier = {p for p, (parent, session) in table.items()
                    if (parent in found or session in found) and p not in found}
    return found - {pid}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the command ended first (rc {proc.returncode})")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def stop_and_check_nothing_is_left(command: subprocess.Popen, signum: int, home: Path, api_url: str) -> None:
    from instructflow.flows.server import server_alive

    children = started_by(command.pid)
    assert children, "the command started no process: nothing was tested"
    command.send_signal(signum)
    command.wait(timeout=60)
    wait_for(lambda: not (children & set(process_table())), 30, "the command's processes to stop")
    assert not server_alive(api_url)
    if signum != signal.SIGKILL:  # a killed command cannot tidy up; the next reader drops the stale marker
        assert not (home / "dashboard.json").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_a_signalled_dashboard_leaves_no_process_behind(tmp_path, signum):
    from instructflow.flows.server import server_alive

    home, port = tmp_path / "home", free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    dashboard = cli_popen("dashboard", "--port", str(port), home=home)
    try:
        wait_for(lambda: server_alive(api_url), 180, "the dashboard's server", dashboard)
        stop_and_check_nothing_is_left(dashboard, signum, home, api_url)
    finally:
        if dashboard.poll() is None:
            dashboard.kill()


def test_a_sigtermed_deploy_leaves_no_process_behind(tmp_path):
    from instructflow.flows.server import server_alive

    home, port = tmp_path / "home", free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    served = cli_popen("deploy", "--interval", "3600", "--stages", "filter", "--profile", "tiny",
                       "--port", str(port), home=home)
    try:
        wait_for(lambda: server_alive(api_url), 180, "deploy's server", served)
        wait_for(lambda: deployment_registered(api_url), 120, "the deployment", served)
        stop_and_check_nothing_is_left(served, signal.SIGTERM, home, api_url)
    finally:
        if served.poll() is None:
            served.kill()


def deployment_registered(api_url: str) -> bool:
    import urllib.request

    request = urllib.request.Request(f"{api_url}/deployments/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return any(d["name"] == "instructflow" for d in json.loads(response.read()))
    except OSError:
        return False


# --- 6. An expected error is one line; a failed stage imports nothing ------------------------------------
def project(tmp_path: Path, body: str) -> Path:
    config = tmp_path / "instructflow.toml"
    config.write_text("[profiles.t]\ninherits = 'tiny'\n" + body)
    return config


GOOD_SEED = json.dumps({"instruction": "Name a color.", "instances": [{"input": "", "output": "Blue."}]})


@pytest.mark.parametrize("kind", ["seed", "preference", "preference-utf8"])
def test_a_bad_input_file_prints_one_line_naming_file_and_line(tmp_path, kind, prefect_api):
    bad = tmp_path / f"{kind}s.jsonl"
    if kind == "seed":
        bad.write_text(GOOD_SEED + "\n{bad json\n")
        config, stage = project(tmp_path, f"seeds = ['{bad}']\n"), "generate"
    else:
        second = b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}' if kind == "preference-utf8" else b"{bad json"
        bad.write_bytes(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode() + b"\n" + second + b"\n")
        config, stage = project(tmp_path, f"[profiles.t.preferences]\nimport_files = ['{bad}']\n"), "preferences"
    home = tmp_path / "home"
    out = cli("stage", stage, "--profile", "t", "--config", str(config), home=home, **shared_api())
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr[-3000:]
    assert f"{bad}:2" in out.stderr and out.stderr.startswith("error:")
    assert "Traceback" in (home / "logs" / "console.log").read_text()  # the details are kept, in the log
    if kind == "seed":
        verbose = cli("stage", stage, "--profile", "t", "--config", str(config), "-v", home=home, **shared_api())
        assert verbose.returncode == 1 and "Traceback" in verbose.stderr
        assert verbose.stderr.strip().splitlines()[-1].startswith("error:")


def test_a_failed_preferences_stage_imports_nothing(tmp_path, prefect_api):
    """The import is part of the stage's success: here the stage fails (no SFT model to sample from)."""
    from instructflow.warehouse.store import open_warehouse

    home = tmp_path / "home"
    out = cli("stage", "preferences", "--profile", "tiny", home=home, **shared_api())  # tiny imports a bundled file
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-3000:]
    assert "stage sft" in out.stderr
    wh = open_warehouse(home, read_only=True)
    try:
        assert wh.scalar("SELECT count(*) FROM preference_pairs") == 0
        assert wh.rows("SELECT status FROM stage_runs WHERE stage = 'preferences'") == [{"status": "failed"}]
    finally:
        wh.close()


# --- 7 and the quiet console: `status` during a run; library warnings in logs/, not on the console -------
def test_status_and_report_answer_during_a_run_whose_console_stays_quiet(tmp_path, prefect_api):
    home = tmp_path / "home"
    stderr = (tmp_path / "run.stderr").open("w")
    # no generate: filter keeps nothing, and sft trains on the seed tasks' instances (~10 s of CPU)
    run = subprocess.Popen([exe(), "run", "--profile", "tiny", "--stages", "filter,sft"],
                           stdout=subprocess.DEVNULL, stderr=stderr, env=cli_env(home, **shared_api()))
    seen: list[dict] = []
    try:
        while run.poll() is None and not any(s.get("stage") == "sft" for s in seen):
            out = cli("status", "--json", home=home)
            if out.stdout.strip():
                seen.append(json.loads(out.stdout))  # --json prints one JSON object, run or no run
            time.sleep(3)  # each call is a process start: leave the 2 cores to the run
        assert any(s["running"] and s.get("stage") == "sft" for s in seen), seen[-3:]
        during = next(s for s in seen if s.get("stage") == "sft")
        assert during["stages"]["filter"]["state"] == "fresh" and during["stages"]["sft"]["state"] == "never"
        report = cli("report", "--out", str(tmp_path / "r.html"), home=home)
        assert report.returncode == 0 and "a run is going" in report.stderr, report.stderr
        assert "filter" in (tmp_path / "r.html").read_text()
        assert run.wait(timeout=600) == 0, (tmp_path / "run.stderr").read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
        stderr.close()
    after = json.loads(cli("status", "--json", home=home).stdout)
    assert after["running"] is False and after["stages"]["sft"]["state"] == "fresh"
    console = (tmp_path / "run.stderr").read_text()
    noisy = [line for line in console.splitlines() if "Warning" in line or "deprecated" in line
             or line.startswith("[transformers]") or "Loading weights" in line]
    assert not noisy, noisy[:5]
    assert "deprecated" in (home / "logs" / "console.log").read_text()  # routed there, not lost


def test_python_warnings_and_library_loggers_go_to_the_log_unless_verbose(tmp_path):
    code = ("import logging, sys, warnings\n"
            "from pathlib import Path\n"
            "from instructflow.flows.common import quiet_console\n"
            "quiet_console(Path(sys.argv[1]), verbose=sys.argv[2] == 'v')\n"
            "import transformers.utils.logging as tl\n"
            "warnings.warn('old thing', FutureWarning)\n"
            "tl.get_logger('transformers.trainer').warning('transformers says')\n"
            "logging.getLogger('trl.trainer').warning('trl says')\n"
            "logging.getLogger('prefect.flow_runs').error('prefect says')\n"
            "for _ in tl.tqdm(range(3), desc='Loading weights'): pass\n"  # as from_pretrained draws it
            "import datasets\n"
            "datasets.Dataset.from_dict({'x': list(range(3))}).map(lambda row: row, desc='Tokenizing')\n")
    env = cli_env(None, PREFECT_HOME=str(tmp_path / "prefect"))
    for switch in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):  # set in this process by an earlier recipe
        env.pop(switch, None)
    (tmp_path / "prefect").mkdir()
    quiet = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q"), "-"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    logged = (tmp_path / "q" / "logs" / "console.log").read_text()
    for said in ("FutureWarning: old thing", "transformers says", "trl says", "prefect says"):
        assert said in logged
    loud = subprocess.run([sys.executable, "-c", code, str(tmp_path / "v"), "v"], capture_output=True, text=True,
                          env=env, timeout=120)
    for said in ("FutureWarning: old thing", "transformers says", "trl says", "prefect says", "Loading weights",
                 "Tokenizing"):
        assert said in loud.stderr


# --- SIGTERM is Ctrl-C with a line of its own; a killed stage is `interrupted` ---------------------------
def test_a_sigtermed_stage_says_so_in_one_line_exits_143_and_stops_every_child(tmp_path):
    """`stage generate` on the embedded teacher with the home's own ephemeral Prefect API: SIGTERM in
    the middle prints one line, exits 143, and leaves none of the processes it started (the teacher
    server, Prefect's API, their reapers); `status` then calls the stage interrupted."""
    home = tmp_path / "home"
    config = project(tmp_path, "[profiles.t.generate]\nmax_requests = 16\ntarget_kept = 1000\n"
                               "[profiles.t.teacher]\nmax_concurrency = 1\n")
    run = cli_popen("stage", "generate", "--profile", "t", "--config", str(config), home=home)
    try:
        log = home / "logs" / "teacher-server.log"
        wait_for(lambda: log.exists() and log.read_text(errors="replace").count("POST /v1/") >= 2, 240,
                 "the teacher's first answers", run)
        children = started_by(run.pid)
        assert len(children) >= 3, children  # teacher server, Prefect's API, a reaper at least
        run.send_signal(signal.SIGTERM)
        stderr = run.stderr.read()
        assert run.wait(timeout=120) == 143, stderr[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines[-1] == "terminated (SIGTERM): rerun the same command to resume", stderr[-3000:]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    wait_for(lambda: not (children & set(process_table())), 30, "every process the command started to stop")
    status = json.loads(cli("status", "--json", "--profile", "t", "--config", str(config), home=home).stdout)
    assert status["stages"]["generate"]["state"] == "interrupted", status["stages"]["generate"]
    assert status["stages"]["generate"]["why"] == ["interrupted (SIGTERM): rerun the same command to resume"]

"""The generate stage with real parts: the CLI, a real `transformers serve` teacher (tiny Llama),
a real DuckDB file; a SIGKILL mid-run and a fault-injecting proxy in front of the real server."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import duckdb

from cliutil import cli, cli_popen
from fault_proxy import FaultProxy

GENERATE_METRICS = {"requests", "failed_requests", "retries", "candidates", "rejected_by_reason", "prompt_tokens",
                    "completion_tokens", "cost_usd", "teacher_model"}


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "test.toml"
    path.write_text("[profiles.t]\ninherits = 'tiny'\n" + body)
    return path


def query(home: Path, sql: str, params=()):
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def test_generate_stage_end_to_end_against_embedded_teacher(tmp_path):
    home = tmp_path / "home"
    out = cli("stage", "generate", "--profile", "tiny", home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    requests = query(home, "SELECT purpose, count(*), count(error) FROM teacher_requests GROUP BY purpose")
    assert dict((p, n) for p, n, _ in requests)["instructions"] == 8          # tiny: max_requests = 8
    (n_seeds,) = query(home, "SELECT count(*) FROM seed_tasks")[0]
    assert n_seeds >= 175
    # every stored request has its accounting; every candidate has a verdict and a reason when rejected
    assert query(home, "SELECT count(*) FROM teacher_requests WHERE prompt_hash IS NULL OR latency_s IS NULL "
                       "OR (error IS NULL AND completion_tokens = 0)")[0][0] == 0
    assert query(home, "SELECT count(*) FROM candidates WHERE verdict IS NULL "
                       "OR (verdict = 'rejected' AND reason IS NULL)")[0][0] == 0
    status = json.loads(cli("status", "--json", "--profile", "tiny", home=home).stdout)
    generate = status["stages"]["generate"]
    assert generate["state"] == "fresh" and GENERATE_METRICS <= set(generate["metrics"])
    assert generate["metrics"]["requests"] == sum(n for _, n, _ in requests)
    assert generate["metrics"]["teacher_model"].endswith("tiny-llama")
    # a second run has its target or its request cap already: it sends nothing new
    again = cli("stage", "generate", "--profile", "tiny", home=home)
    assert again.returncode == 0, again.stderr[-2000:]
    assert query(home, "SELECT count(*) FROM teacher_requests")[0][0] == sum(n for _, n, _ in requests)


def prefect_servers_of(home: Path) -> list[int]:
    """Live ephemeral Prefect API processes started by a run on this data home."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"prefect.server.api.server:create_app" not in (proc / "cmdline").read_bytes():
                continue
            if f"INSTRUCTFLOW_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0") and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(proc.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def test_sigkill_mid_run_resumes_without_duplicates_or_loss(tmp_path):
    home = tmp_path / "home"
    config = write_config(tmp_path, "[profiles.t.generate]\nmax_requests = 30\ntarget_kept = 1000\n"
                                    "requests_per_round = 2\n[profiles.t.teacher]\nmax_concurrency = 1\n")
    run = cli_popen("stage", "generate", "--profile", "t", "--config", str(config), home=home)
    log = home / "logs" / "teacher-server.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and run.poll() is None:
        if log.exists() and log.read_text(errors="replace").count("POST /v1/") >= 6:
            break
        time.sleep(0.2)
    assert run.poll() is None, f"run ended before it could be killed: {run.stderr.read()[-2000:]}"
    servers = prefect_servers_of(home)
    assert servers, "the run's ephemeral Prefect API was not found"
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    deadline = time.monotonic() + 20      # its reaper stops the ephemeral Prefect API too
    while prefect_servers_of(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not prefect_servers_of(home), "the killed run left its Prefect server running"
    stored = query(home, "SELECT request_key, created_at FROM teacher_requests")
    assert 0 < len(stored) < 30
    candidates_before = query(home, "SELECT candidate_id, request_key, position, instruction FROM candidates")

    out = cli("stage", "generate", "--profile", "t", "--config", str(config), home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    after = dict(query(home, "SELECT request_key, created_at FROM teacher_requests"))
    for key, created in stored:            # nothing stored was sent again (a resend would rewrite the row)
        assert after[key] == created
    assert query(home, "SELECT count(*) FROM teacher_requests WHERE purpose = 'instructions'")[0][0] == 30
    keys = [k for k in after if k.startswith("instructions:")]
    assert sorted(keys) == [f"instructions:{i:06d}" for i in range(30)]  # no gap, no duplicate
    candidates_after = query(home, "SELECT candidate_id, request_key, position, instruction FROM candidates")
    assert set(candidates_before) <= set(candidates_after)                # no loss
    assert query(home, "SELECT count(*) FROM candidates c WHERE NOT EXISTS "
                       "(SELECT 1 FROM teacher_requests r WHERE r.request_key = c.request_key)")[0][0] == 0
    runs = query(home, "SELECT status, error FROM stage_runs WHERE stage = 'generate' ORDER BY started_at")
    assert runs[0] == ("failed", "interrupted (process killed)") and runs[-1][0] == "success"


def test_faults_are_retried_counted_and_never_dropped(tmp_path):
    from instructflow.flows.common import cache_dir
    from instructflow.models.bundled import ensure_bundled_hf_dir
    from instructflow.models.teacher_server import TeacherServer
    from instructflow.models.tiny import build_tiny_llama

    tiny = build_tiny_llama(cache_dir() / "tiny-llama", tokenizer_dir=ensure_bundled_hf_dir(cache_dir()))
    home = tmp_path / "home"
    # one request at a time (rounds of 1) so the schedule maps onto requests deterministically:
    # request 1: 429 then ok; request 2: 500, timeout, ok; request 3: 503 x3 -> gives up (max_retries 2)
    schedule = ["429", "pass", "500", "timeout", "pass", "503", "503", "503"] + ["pass"] * 20
    with TeacherServer(tiny) as server, FaultProxy(server.base_url, schedule, hold_s=12.0) as proxy:
        config = write_config(tmp_path, f"""
[profiles.t.teacher]
endpoint = "{proxy.base_url}"
model = "{server.model_name}"
max_concurrency = 1
max_retries = 2
timeout_s = 8
backoff_base_s = 0.05
backoff_max_s = 0.2
[profiles.t.generate]
max_requests = 4
requests_per_round = 1
instances = false
""")
        out = cli("stage", "generate", "--profile", "t", "--config", str(config), home=home)
        assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(cli("status", "--json", "--profile", "t", "--config", str(config),
                             home=home).stdout)["stages"]["generate"]["metrics"]
    assert metrics["requests"] == 4                       # every request recorded, the failed one too
    assert metrics["failed_requests"] == 1
    assert metrics["retries"] == 1 + 2 + 2                # attempts beyond the first, over all requests
    failed = query(home, "SELECT error, attempts FROM teacher_requests WHERE error IS NOT NULL")
    assert len(failed) == 1 and failed[0][1] == 3 and "503" in failed[0][0]

"""No secret reaches anything instructflow writes (issue: a key in the endpoint URL leaked to stderr,
stage_runs.error, logs/console.log, the stage traceback and Prefect's database).

The CLI is run as a user runs it (the rule itself, tasks/secrets.py: tests/test_redaction.py), a
failing and a succeeding generate, with a secret in the key env var, in the URL's userinfo and in an
`?api-key=` query, and every file of the data home, both Prefect databases the runs wrote to, and
every command's stdout and stderr are searched for the secrets, byte for byte and (DuckDB compresses
strings) value by value. The succeeding run goes through tests/fault_proxy.py in front of a real
`transformers serve`, which records what was sent: the credentials still reach the endpoint."""
from __future__ import annotations

import base64
import socket
import sqlite3
import uuid
from pathlib import Path

import duckdb
import pytest

from cliutil import cli, query, shared_api
from fault_proxy import FaultProxy


def closed_port() -> int:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(tmp_path: Path, model: str) -> Path:
    path = tmp_path / "test.toml"
    path.write_text(f"""[profiles.t]
inherits = 'tiny'
[profiles.t.teacher]
model = "{model}"
max_concurrency = 2
max_retries = 1
backoff_base_s = 0.01
backoff_max_s = 0.05
[profiles.t.generate]
target_kept = 1000
max_requests = 4
instances = false
""")
    return path


def found_in_files(paths, needles: list[str]) -> list[str]:
    hits = []
    for path in paths:
        data = Path(path).read_bytes()
        hits += [f"{path}: {needle}" for needle in needles if needle.encode() in data]
    return hits


def found_in_duckdb(path: Path, needles: list[str]) -> list[str]:
    """Every text value of every table (DuckDB may store strings compressed, so bytes alone do not tell)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        hits = []
        for table, column in con.execute("SELECT table_name, column_name FROM information_schema.columns "
                                         "WHERE data_type IN ('VARCHAR', 'JSON')").fetchall():
            for (value,) in con.execute(f'SELECT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL').fetchall():
                hits += [f"{table}.{column}: {needle}" for needle in needles if needle in str(value)]
        return hits
    finally:
        con.close()


def found_in_sqlite(path: Path, needles: list[str]) -> list[str]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        hits = []
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            columns = [row[1] for row in con.execute(f'PRAGMA table_info("{table}")')]
            for column in columns:
                for needle in needles:
                    n = con.execute(f'SELECT count(*) FROM "{table}" WHERE instr(CAST("{column}" AS TEXT), ?) > 0',
                                    [needle]).fetchone()[0]
                    if n:
                        hits.append(f"{table}.{column}: {needle} ({n} rows)")
        return hits
    finally:
        con.close()


@pytest.fixture(scope="module")
def server():
    """A real `transformers serve` on the tiny Llama, behind the proxy of the succeeding run."""
    from instructflow.flows.common import cache_dir
    from instructflow.models.bundled import ensure_bundled_hf_dir
    from instructflow.models.teacher_server import TeacherServer
    from instructflow.models.tiny import build_tiny_llama

    tiny = build_tiny_llama(cache_dir() / "tiny-llama", tokenizer_dir=ensure_bundled_hf_dir(cache_dir()))
    with TeacherServer(tiny) as running:
        yield running


@pytest.mark.slow
def test_no_secret_reaches_the_console_the_data_home_or_prefects_database(tmp_path, server, prefect_api):
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    tag = uuid.uuid4().hex[:10]
    in_userinfo, in_query, in_env = f"sk-userinfo-{tag}", f"qk-query-{tag}", f"sk-env-{tag}"
    basic = base64.b64encode(f"user:{in_userinfo}".encode()).decode()  # what the userinfo is sent as
    needles = [in_userinfo, in_query, in_env, basic]
    home = tmp_path / "home"
    config = write_config(tmp_path, server.model_name)
    outputs = []

    def run(*args, endpoint: str, **env):
        out = cli(*args, home=home, INSTRUCTFLOW_TEACHER_ENDPOINT=endpoint, INSTRUCTFLOW_TEACHER_API_KEY=in_env,
                  COLUMNS="300", **env)
        outputs.append(out)
        return out

    profile = ("--profile", "t", "--config", str(config))

    # failing: userinfo and query key on a closed port; Prefect's ephemeral API in HOME/prefect, as for a user
    dead = f"http://user:{in_userinfo}@127.0.0.1:{closed_port()}/v1?api-key={in_query}"
    failed = run("stage", "generate", *profile, endpoint=dead)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "http://***@127.0.0.1" in failed.stderr and "api-key=***" in failed.stderr, failed.stderr[-2000:]

    # succeeding, through a proxy that records what arrives; its first answer echoes the Authorization header
    with FaultProxy(f"http://{server.host}:{server.port}", ["400;echo-auth"]) as proxy:
        working = f"http://user:{in_userinfo}@127.0.0.1:{proxy.port}/v1?api-key={in_query}"
        ok = run("stage", "generate", *profile, endpoint=working, **shared_api())
        assert ok.returncode == 0, ok.stderr[-3000:]
        doctor = run("doctor", *profile, endpoint=working)
        assert "http://***@127.0.0.1" in doctor.stdout, doctor.stdout[-3000:]
        sent = [e for e in proxy.events if e.path.startswith("/v1/chat/completions")]
    assert sent and all(f"api-key={in_query}" in e.path and e.authorization == f"Basic {basic}" for e in sent)
    for command in (("status", "--json", *profile), ("report",)):
        assert run(*command, endpoint=working).returncode == 0, outputs[-1].stderr[-2000:]
    echoed = query(home, "SELECT error FROM teacher_requests WHERE error LIKE '%Authorization%'")
    assert echoed and "Authorization: Basic ***" in echoed[0][0], echoed  # the echoed header, masked

    prefect_db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])  # the shared API's
    own_db = home / "prefect" / "prefect.db"                                                  # the failing run's
    assert own_db.exists() and prefect_db.exists()
    files = [p for p in home.rglob("*") if p.is_file()] + \
            [p for p in prefect_db.parent.glob(prefect_db.name + "*") if p.is_file()]
    assert {home / "logs" / "console.log", home / "report.html", own_db} <= set(files)
    assert any(p.name.startswith("generate-") for p in (home / "logs").iterdir())  # the failed stage's traceback
    leaks = found_in_files(files, needles) + found_in_duckdb(home / "warehouse.duckdb", needles) + \
        found_in_sqlite(own_db, needles) + found_in_sqlite(prefect_db, needles) + \
        [f"{' '.join(o.args[1:3])} {stream}: {n}" for o in outputs for stream in ("stdout", "stderr")
         for n in needles if n in getattr(o, stream)]
    assert not leaks, leaks

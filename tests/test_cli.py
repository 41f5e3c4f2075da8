"""The CLI through its installed entry point, as a user runs it."""
from __future__ import annotations

import json

import pytest

from instructflow.warehouse.store import open_warehouse

from cliutil import cli

STAGES = ["generate", "filter", "sft", "preferences", "reward", "ppo", "evaluate"]


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("run", "stage", "status", "doctor"):
        assert command in out.stdout


@pytest.mark.slow
def test_status_on_empty_home(tmp_path):
    home = tmp_path / "fresh"
    out = cli("status", "--json", home=home)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["home"] == str(home.resolve())
    assert list(report["stages"]) == STAGES
    for entry in report["stages"].values():
        assert entry == {"state": "never", "last_run": None, "input_hash": None, "metrics": {}, "why": []}
    text = cli("status", home=home)
    assert text.returncode == 0 and "No runs yet" in text.stderr


@pytest.mark.parametrize("args, message", [
    (["status", "--profile", "nope"], "unknown profile 'nope'"),
    (["run", "--profile", "nope"], "unknown profile 'nope'"),
    (["stage", "nosuch", "--profile", "tiny"], "unknown stage 'nosuch'"),
    (["report"], "no warehouse in"),
    (["export", "alpaca", "--out", "x.json"], "no warehouse in"),
])
@pytest.mark.slow
def test_bad_arguments_one_line(tmp_path, args, message):
    out = cli(*args, home=tmp_path / "h")
    assert out.returncode != 0
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_malformed_config_names_file(tmp_path):
    bad = tmp_path / "instructflow.toml"
    bad.write_text("[profiles.cpu.sft]\nmax_stepz = 3\n")
    out = cli("status", home=tmp_path / "h", cwd=tmp_path)
    assert out.returncode != 0
    assert "instructflow.toml: profiles.cpu.sft.max_stepz: unknown key" in out.stderr


@pytest.mark.slow
def test_unwritable_home(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = cli("status", home=blocker / "home")
    assert out.returncode != 0 and "is not writable" in out.stderr


@pytest.mark.slow
def test_locked_and_newer_warehouse_are_refused_untouched(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    wh = open_warehouse(home)
    out = cli("status", home=home)
    assert out.returncode != 0 and "in use by process" in out.stderr
    wh.execute("INSERT INTO schema_version VALUES (?, ?, now())", [999, "future"])
    wh.close()
    out = cli("run", "--profile", "tiny", home=home)
    assert out.returncode != 0 and "newer than this instructflow supports" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_doctor_reports_every_check_and_exits_1_on_a_problem(tmp_path):
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    home = tmp_path / "h"
    out = cli("doctor", "--profile", "tiny", home=home, COLUMNS="400", INSTRUCTFLOW_TEACHER_ENDPOINT=dead,
              INSTRUCTFLOW_TEACHER_MODEL="m", INSTRUCTFLOW_TEACHER_API_KEY="sk-doctor-secret")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if line.count("│") == 4}
    for check in ("python", "torch", "prefect", "duckdb", "config", "data home", "bundled model", "teacher", "gpu",
                  "prefect api", "Prefect startup timeout", "scheduler"):
        assert check in rows, (check, out.stdout[-3000:])
    assert "problem" in rows["teacher"] and f"{dead} unreachable" in rows["teacher"]
    assert [name for name, line in rows.items() if "problem" in line] == ["teacher"]   # the one problem, said once
    assert str(home.resolve()) in rows["data home"] and ".gguf" in rows["bundled model"]
    assert "sk-doctor-secret" not in out.stdout + out.stderr

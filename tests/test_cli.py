"""The CLI through its installed entry point, as a user runs it."""
from __future__ import annotations

import json
import subprocess

import pytest

from instructflow.warehouse.store import open_warehouse

from cliutil import cli, cli_env, exe

STAGES = ["generate", "filter", "sft", "preferences", "reward", "ppo", "dpo", "grpo", "evaluate"]


def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("run", "stage", "status", "doctor", "gc", "export"):
        assert command in out.stdout


@pytest.mark.slow
def test_status_on_empty_home(tmp_path):
    home = tmp_path / "fresh"
    out = cli("status", "--json", home=home)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["home"] == str(home.resolve())
    assert list(report["stages"]) == STAGES
    for name, entry in report["stages"].items():   # grpo is not among the default (cpu) profile's methods
        assert entry == {"state": "off" if name == "grpo" else "never", "last_run": None, "input_hash": None,
                         "metrics": {}, "why": entry["why"] if name == "grpo" else [], "disk_bytes": 0}
    assert report["disk_bytes"] == 0
    text = cli("status", home=home)
    assert text.returncode == 0 and "No runs yet" in text.stderr


@pytest.mark.parametrize("args, message", [
    (["status", "--profile", "nope"], "unknown profile 'nope'"),
    (["run", "--profile", "nope"], "unknown profile 'nope'"),
    (["stage", "nosuch", "--profile", "tiny"], "unknown stage 'nosuch'"),
    (["report"], "no warehouse in"),
    (["export", "alpaca", "--out", "x.json"], "no warehouse in"),
    (["export", "model", "--stage", "ppo", "--out", "m"], "no warehouse in"),
    (["gc", "--dry-run"], "nothing to collect"),
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


def _home_with_a_filter_run(home):
    """A warehouse whose filter stage succeeded once: `status` then reads the seed files to judge it."""
    home.mkdir(parents=True, exist_ok=True)
    wh = open_warehouse(home)
    run = wh.start_run("t", "stage filter")
    stage_run = wh.start_stage_run(run, "filter", "h", {"config": "c"})
    wh.finish_stage_run(stage_run, "success", {"kept": 0}, "o")
    wh.close()


def _home_before_the_last_migration(home):
    """A warehouse as the previous instructflow left it: every migration but the last applied."""
    import duckdb

    from instructflow.warehouse.store import migrations

    home.mkdir(parents=True)
    con = duckdb.connect(str(home / "warehouse.duckdb"))
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
    for version, name, sql in migrations()[:-1]:
        con.execute(sql)
        con.execute("INSERT INTO schema_version VALUES (?, ?, now())", [version, name])
    con.close()
    version, name, _ = migrations()[-1]
    return f"{version:03d}_{name}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bad seed file", "corrupt warehouse", "migration pending", "config is a directory",
                                  "config is /dev/null", "config unreadable"])
def test_status_answers_whatever_is_wrong_one_line_and_with_json_one_object(tmp_path, case):
    """`status` never ends in a traceback or an empty stdout: one line on stderr, exit 1, and with --json
    one JSON object whose "error" is that line."""
    import os

    home, config, prefix = tmp_path / "h", None, []
    if case == "bad seed file":
        bad = tmp_path / "seeds.jsonl"
        bad.write_text("{bad json\n")
        config = tmp_path / "c.toml"
        config.write_text(f"[profiles.t]\ninherits = 'tiny'\nseeds = ['{bad}']\n")
        _home_with_a_filter_run(home)
        expected = f"{bad}:1: invalid JSON"
    elif case == "corrupt warehouse":
        home.mkdir()
        (home / "warehouse.duckdb").write_bytes(b"not a database\n" * 1000)
        expected = "not a valid DuckDB database file"
    elif case == "migration pending":
        pending = _home_before_the_last_migration(home)
        expected = f"migration {pending} pending: a writing command"
    elif case == "config is a directory":
        config, expected = tmp_path, f"{tmp_path} is a directory, not a config file"
    elif case == "config is /dev/null":
        config, expected = "/dev/null", "/dev/null is a character device, not a config file"
    else:
        config = tmp_path / "c.toml"
        config.write_text("[profiles.t]\ninherits = 'tiny'\n")
        config.chmod(0)
        # root reads any file: without the capabilities that let it (CI runs the suite as root)
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
        expected = f"{config}: config file is not readable (permission denied)"
    args = ["status"] + (["--config", str(config)] if config else [])
    for as_json in (False, True):
        out = subprocess.run([*prefix, exe(), *args, *(["--json"] if as_json else [])], capture_output=True, text=True,
                             timeout=300, env=cli_env(home, COLUMNS="400"))
        assert out.returncode == 1, (out.stdout[-2000:], out.stderr[-3000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr[-3000:]
        if as_json:
            report = json.loads(out.stdout)
            assert report["error"] == lines[0][len("error: "):] and report["running"] is False
            assert report["home"] == str(home.resolve())
            if case == "migration pending":
                assert report["pending_migrations"] == [pending] and report["schema_version"] == int(pending[:3]) - 1
        else:
            assert out.stdout == ""

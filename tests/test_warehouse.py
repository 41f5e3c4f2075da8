"""The warehouse on a real DuckDB file: migrations, schema guard, lock handling, parameterised SQL."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import duckdb
import pytest

from instructflow.warehouse.store import WAREHOUSE_FILE, Warehouse, WarehouseError, migrations, open_warehouse


def test_migrations_create_every_table_once(tmp_path):
    wh = open_warehouse(tmp_path)
    latest = migrations()[-1][0]
    assert wh.schema_version() == latest
    tables = set(wh.table_counts())
    for needed in ("runs", "stage_runs", "seed_tasks", "teacher_requests", "candidates", "instances",
                   "sft_examples", "responses", "preference_pairs", "checkpoints", "step_metrics"):
        assert needed in tables
    assert wh.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = 'kept_instructions'") == 1
    wh.execute("INSERT INTO seed_tasks VALUES (?, ?, ?, ?, ?, ?, now())", ["s1", "n", "Say hi.", False, "x", "[]"])
    wh.close()
    # reopening applies nothing again and keeps the data
    wh = open_warehouse(tmp_path)
    assert wh.schema_version() == latest
    assert wh.scalar("SELECT count(*) FROM schema_version") == len(migrations())
    assert wh.scalar("SELECT instruction FROM seed_tasks WHERE seed_id = ?", ["s1"]) == "Say hi."
    wh.close()


def test_newer_schema_is_refused_without_touching_data(tmp_path):
    wh = open_warehouse(tmp_path)
    wh.execute("INSERT INTO schema_version VALUES (?, ?, now())", [999, "future"])
    wh.execute("INSERT INTO seed_tasks VALUES (?, ?, ?, ?, ?, ?, now())", ["s1", "n", "Keep me.", False, "x", "[]"])
    wh.close()
    before = (tmp_path / WAREHOUSE_FILE).read_bytes()
    with pytest.raises(WarehouseError, match="schema version 999, newer"):
        open_warehouse(tmp_path)
    assert (tmp_path / WAREHOUSE_FILE).read_bytes() == before
    con = duckdb.connect(str(tmp_path / WAREHOUSE_FILE), read_only=True)
    assert con.execute("SELECT instruction FROM seed_tasks").fetchone()[0] == "Keep me."
    con.close()


def test_second_writer_gets_one_line_error_naming_the_holder(tmp_path):
    wh = open_warehouse(tmp_path)
    script = textwrap.dedent(f"""
        from instructflow.warehouse.store import open_warehouse, WarehouseError
        try:
            open_warehouse({str(tmp_path)!r})
        except WarehouseError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stdout.strip()
    assert "in use by process" in out and "wait for it" in out
    assert len(out.splitlines()) == 1
    wh.close()


def hold_lock(path) -> subprocess.Popen:
    """Another process holding the warehouse's DuckDB lock until its stdin closes; returns once it does."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, duckdb
        con = duckdb.connect({str(path / WAREHOUSE_FILE)!r})
        print("held", flush=True)
        sys.stdin.read()
        con.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_waits_for_the_holder_and_says_so(tmp_path):
    """`warehouse_for` (every run: CLI, served, worker) waits for the process holding the home instead
    of failing, with one line naming it; then it has the warehouse."""
    import threading

    from instructflow.flows.common import wait_for_warehouse

    open_warehouse(tmp_path).close()
    holder = hold_lock(tmp_path)
    said = []
    release = threading.Timer(2.0, holder.stdin.close)
    release.start()
    try:
        wh = wait_for_warehouse(tmp_path, 60, said.append)
    finally:
        release.cancel()
        if not holder.stdin.closed:
            holder.stdin.close()
        holder.wait(timeout=30)
    assert said == [f"waiting for the run holding {tmp_path} (pid {holder.pid})"]
    wh.execute("INSERT INTO seed_tasks VALUES ('s', 'i', '', true, 'x', '[]', now())")
    wh.close()


def test_a_writer_that_waited_too_long_gets_one_line(tmp_path):
    from instructflow.flows.common import wait_for_warehouse

    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(WarehouseError) as caught:
            wait_for_warehouse(tmp_path, 1.0, lambda line: None)
        message = str(caught.value)
        assert f"is still in use by process {holder.pid} after 1 s of waiting (INSTRUCTFLOW_LOCK_WAIT_S=1)" in message
        assert len(message.splitlines()) == 1
        with pytest.raises(WarehouseError, match=f"in use by process {holder.pid}"):   # 0: fail at once
            wait_for_warehouse(tmp_path, 0, lambda line: None)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_values_are_parameters_not_sql(tmp_path):
    wh = open_warehouse(tmp_path)
    hostile = "x'); DROP TABLE seed_tasks; --"
    wh.execute("INSERT INTO seed_tasks VALUES (?, ?, ?, ?, ?, ?, now())", [hostile, hostile, hostile, True, "x", "[]"])
    assert wh.scalar("SELECT seed_id FROM seed_tasks") == hostile
    assert "seed_tasks" in wh.table_counts()
    wh.close()


def test_stage_runs_record_and_interrupted_runs_become_failed(tmp_path):
    wh = open_warehouse(tmp_path)
    run_id = wh.start_run("tiny", "run")
    sr = wh.start_stage_run(run_id, "generate", "h1", {"config": "c1"})
    wh.add_step_metrics(sr, "generate", 1, {"kept": 3, "note": "not a number"})
    assert wh.step_series(sr, "kept") == ([1], [3.0])
    wh.close()  # as if the process died with the stage still 'running'
    wh = Warehouse(tmp_path / WAREHOUSE_FILE)
    assert wh.mark_interrupted_stage_runs() == 1
    last = wh.last_stage_run("generate")
    assert last.status == "failed" and "interrupted" in last.error
    sr2 = wh.start_stage_run(run_id, "generate", "h2", {"config": "c1"})
    wh.finish_stage_run(sr2, "success", {"kept": 5}, "out1")
    ok = wh.last_stage_run("generate", status="success")
    assert ok.metrics == {"kept": 5} and ok.output_hash == "out1" and ok.seconds is not None
    wh.close()


def test_rows_a_killed_writer_left_in_the_wal_stay_in_their_unique_index(tmp_path):
    """DuckDB 1.5.6: rows replayed from a killed writer's WAL reach a unique index only lazily, and the
    checkpoint at the next close dropped them, so deleting such a row later was a FATAL error that
    invalidated the database (a killed preference import is taken back out exactly that way)."""
    script = textwrap.dedent(f"""
        import os, signal
        from instructflow.warehouse.store import open_warehouse
        wh = open_warehouse({str(tmp_path)!r})
        for i in range(3):
            wh.execute("INSERT INTO preference_pairs (pair_id, source, prompt, response_a, response_b, outcome, "
                       "pair_key, created_at) VALUES (?, 'imported', 'p', 'a', 'b', 'a', ?, now())", [i, f"key{{i}}"])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == -9
    assert (tmp_path / f"{WAREHOUSE_FILE}.wal").exists()
    wh = open_warehouse(tmp_path)   # replays the WAL; this process never touches the index ...
    assert wh.scalar("SELECT count(*) FROM preference_pairs") == 3
    wh.close()                      # ... and closes: the checkpoint that lost the index entries
    wh = open_warehouse(tmp_path)
    try:
        wh.execute("DELETE FROM preference_pairs WHERE pair_key = ?", ["key1"])
        assert wh.scalar("SELECT count(*) FROM preference_pairs") == 2
        with pytest.raises(duckdb.ConstraintException):   # the index still guards the keys it holds
            wh.execute("INSERT INTO preference_pairs (pair_id, source, prompt, response_a, response_b, outcome, "
                       "pair_key, created_at) VALUES (9, 'imported', 'p', 'a', 'b', 'a', 'key2', now())")
    finally:
        wh.close()

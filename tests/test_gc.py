"""`instructflow gc`'s rules on a real DuckDB home with run folders on disk (the whole pipeline's superseded
folders are collected in tests/test_pipeline.py): what a current result points to stays, a superseded
folder goes, the resume state of a stage whose last run failed stays, a dry run removes nothing, and
nothing is removed while another process holds the warehouse."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from instructflow.flows.gc import collect_garbage, run_folders
from instructflow.warehouse.store import WarehouseError, open_warehouse


def folder(home: Path, stage: str, name: str, finished: bool = True, mb: int = 1) -> Path:
    path = home / "stages" / stage / name
    (path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (path / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"\0" * mb * 1_000_000)
    if finished:
        (path / "final").mkdir()
        (path / "final" / "config.json").write_text("{}")
    return path


def stage_run(wh, run_id: str, stage: str, status: str, metrics: dict | None = None) -> str:
    stage_run_id = wh.start_stage_run(run_id, stage, "h", {})
    wh.finish_stage_run(stage_run_id, status, metrics or {}, "out", None if status == "success" else "boom")
    return stage_run_id


def test_gc_keeps_what_current_results_use_and_resume_state_of_a_failed_stage(tmp_path):
    home = tmp_path / "home"
    old_sft, sft = folder(home, "sft", "run-old"), folder(home, "sft", "run-new")
    old_reward, reward = folder(home, "reward", "run-old"), folder(home, "reward", "run-new")
    killed_reward = folder(home, "reward", "run-killed", finished=False)     # superseded by a later success
    ppo, killed_ppo = folder(home, "ppo", "run-a"), folder(home, "ppo", "run-b", finished=False)
    old_holdout, holdout = folder(home, "evaluate", "holdout-reward-old"), folder(home, "evaluate", "holdout-reward-new")
    wh = open_warehouse(home)
    run = wh.start_run("t", "run")
    for stage, old, new in (("sft", old_sft, sft), ("reward", old_reward, reward)):
        wh.register_checkpoint(stage_run(wh, run, stage, "success"), stage, str(old / "final"), None, None, {}, {})
        stage_run(wh, run, stage, "failed")
        wh.register_checkpoint(stage_run(wh, run, stage, "success"), stage, str(new / "final"), None, None, {}, {})
    wh.register_checkpoint(stage_run(wh, run, "ppo", "success"), "ppo_policy", str(ppo / "final" / "policy"), None,
                           None, {}, {})
    stage_run(wh, run, "ppo", "failed")   # the newest ppo run was killed: run-b holds what its rerun resumes from
    stage_run(wh, run, "evaluate", "success", {"rm_holdout_checkpoint": str(old_holdout / "final")})
    stage_run(wh, run, "evaluate", "success", {"rm_holdout_checkpoint": str(holdout / "final"), "prompts": 4})
    wh.close()
    everything = run_folders(home)
    superseded = sorted([old_sft, old_reward, killed_reward, old_holdout])

    dry = collect_garbage(home, dry_run=True)
    assert sorted(f for f, _ in dry.removed) == superseded and run_folders(home) == everything
    assert dry.freed == 4 * 1_000_000 + 3 * 2 and dry.freed == sum(size for _, size in dry.removed)
    assert dict(dry.kept)[killed_ppo] == "resume state of an interrupted or failed run"
    assert {f for f, why in dry.kept if why == "current"} == {sft, reward, ppo, holdout}

    # another process holds the warehouse (a run): nothing is removed, one line says why
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(home / "warehouse.duckdb")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WarehouseError, match=r"^gc removed nothing: warehouse .* is in use by process") as info:
            collect_garbage(home)
        assert "\n" not in str(info.value) and run_folders(home) == everything
    finally:
        holder.kill()
        holder.wait()

    done = collect_garbage(home)
    assert sorted(f for f, _ in done.removed) == superseded and done.freed == dry.freed
    assert run_folders(home) == sorted(set(everything) - set(superseded))
    assert collect_garbage(home).removed == []   # nothing left to collect


def test_gc_on_a_home_without_a_warehouse_says_so(tmp_path):
    with pytest.raises(WarehouseError, match="no warehouse in .*: nothing to collect"):
        collect_garbage(tmp_path)

"""What `status` and the report say about a stage, from stage runs recorded by the real `stage_context`
around a stage body (no Prefect API, no training): fresh, stale because its outputs vanished, failed."""
from __future__ import annotations

import dataclasses

import pytest

from instructflow.flows.common import stage_context, warehouse_for
from instructflow.flows.stages import stage_spec
from instructflow.flows.status import stage_status
from instructflow.tasks.config import load_config


def states(home) -> dict:
    return stage_status(load_config("tiny"), home, warehouse_for(home))["stages"]


def test_status_says_outputs_missing_then_failed_with_the_error(home, tmp_path):
    with stage_context(stage_spec("filter"), load_config("tiny"), str(home), None, False) as ctx:
        ctx.finish({"kept": 0})
    checkpoint = tmp_path / "sft-final"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    with stage_context(stage_spec("sft"), load_config("tiny"), str(home), None, False) as ctx:
        ctx.wh.register_checkpoint(ctx.stage_run_id, "sft", str(checkpoint), "tiny", "d0", {}, {})
        ctx.finish({"train_examples": 1})
    now = states(home)
    assert now["filter"]["state"] == "fresh" and now["sft"]["state"] == "fresh"
    assert now["sft"]["metrics"] == {"train_examples": 1} and now["preferences"]["state"] == "never"

    (checkpoint / "config.json").unlink()   # someone cleaned the stages folder
    sft = states(home)["sft"]
    assert sft["state"] == "stale" and sft["why"] == ["outputs missing"]

    with pytest.raises(RuntimeError):
        with stage_context(stage_spec("sft"), load_config("tiny"), str(home), None, False):
            raise RuntimeError("out of memory\n(details that belong in the log)")
    sft = states(home)["sft"]
    assert sft["state"] == "failed" and sft["why"] == ["RuntimeError: out of memory"]
    assert sft["metrics"] == {"train_examples": 1}   # the last success's numbers, not the failed run's
    assert list((home / "logs").glob("sft-*.txt"))   # the traceback went to the log
    assert states(home)["filter"]["state"] == "fresh"  # a failure does not touch the stages before it


def test_the_report_written_at_each_stage_end_says_what_every_stage_does(home):
    import dataclasses
    import html

    from instructflow.flows.pipeline import run_stage
    from instructflow.flows.stages import stages

    def body(cfg, home, run_id=None, force=False):  # the filter stage's bookkeeping, without its Prefect flow
        with stage_context(spec, cfg, home, run_id, force) as ctx:
            ctx.finish({"kept": 0})
        return {"kept": 0}

    spec = dataclasses.replace(stage_spec("filter"), flow=body)
    run_stage(spec, load_config("tiny"), home, None, False)
    report = (home / "report.html").read_text()   # no `report` command ran: the stage's end wrote it
    for spec in stages():
        assert f"<h2>{spec.name}</h2><p>{html.escape(spec.summary)}</p>" in report, spec.name
    assert report.count("never run") == len(stages()) - 1


def test_evaluate_is_stale_when_a_setting_it_reads_changes(home):
    """evaluate reads the reward settings (its held-out reward model) and the prompts the RL stages used:
    they are part of its input hash, and a change elsewhere (sft's learning rate) is not."""
    from instructflow.flows.common import freshness

    cfg, spec = load_config("tiny"), stage_spec("evaluate")
    with stage_context(spec, cfg, str(home), None, False) as ctx:
        ctx.finish({"prompts": 0})
    wh = warehouse_for(home)
    assert freshness(spec, cfg, wh)[0]
    for changed in ({"reward": {"learning_rate": 0.5}}, {"ppo": {"prompts": 3}}, {"grpo": {"seed": 5}},
                    {"evaluate": {"prompts": 9}}):
        fresh, last, inputs = freshness(spec, cfg.replace(**changed), wh)
        assert not fresh and inputs["config"] != last.inputs["config"], changed
    assert freshness(spec, cfg.replace(sft={"learning_rate": 0.5}), wh)[0]
    assert not freshness(spec, dataclasses.replace(cfg, methods=["dpo"]), wh)[0]   # which methods it compares

"""The parent flow: the registered stages in order, skipping those whose inputs are unchanged."""
from __future__ import annotations

from prefect import flow, get_run_logger

from instructflow.flows.common import _flow_run_id, data_home, freshness, input_hash, warehouse_for
from instructflow.flows.stages import stage_names, stage_spec, stages
from instructflow.tasks.config import load_config


@flow(name="pipeline", log_prints=True)
def pipeline(profile: str = "cpu", stages_to_run: list[str] | None = None, force: bool = False,
             home: str | None = None, config: str | None = None) -> dict:
    """Runs each registered stage whose input hash changed since its last success (all with force).
    A stage's input hash includes its upstream stages' output hashes, so a change flows downstream."""
    logger = get_run_logger()
    cfg = load_config(profile, config)
    wh = warehouse_for(data_home(home))
    unknown = set(stages_to_run or []) - set(stage_names())
    if unknown:
        raise ValueError(f"unknown stage(s): {', '.join(sorted(unknown))} (stages: {', '.join(stage_names())})")
    run_id = wh.start_run(cfg.profile, "run", flow_run_id=_flow_run_id())
    results: dict[str, dict] = {}
    try:
        # decided one stage at a time: an upstream rerun changes the inputs of the stages after it
        for spec in stages():
            if stages_to_run and spec.name not in stages_to_run:
                continue
            fresh, last, inputs = freshness(spec.name, cfg, wh)
            if fresh and not force:
                logger.info("%s: inputs unchanged since %s, skipped", spec.name, last.finished_at)
                wh.record_skip(run_id, spec.name, input_hash(inputs))
                results[spec.name] = {"skipped": True, **last.metrics}
                continue
            logger.info("%s: running", spec.name)
            results[spec.name] = spec.flow(profile=cfg.profile, home=home, config=config, run_id=run_id, force=force)
    except BaseException:
        wh.finish_run(run_id, "failed")
        raise
    wh.finish_run(run_id, "success")
    return results


def run_single(name: str, profile: str, home: str | None, config: str | None, force: bool, downstream: bool) -> dict:
    """`instructflow stage NAME`: that stage always runs; with downstream, the later stages run when stale."""
    spec = stage_spec(name)
    result = {name: spec.flow(profile=profile, home=home, config=config, run_id=None, force=force)}
    if downstream:
        later = stage_names()[stage_names().index(name) + 1:]
        if later:
            result.update(pipeline(profile=profile, stages_to_run=later, force=force, home=home, config=config))
    return result

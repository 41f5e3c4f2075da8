"""The parent flow: the registered stages in order, skipping those whose inputs are unchanged."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from instructflow.flows.common import (StageSpec, data_home, flow_run_id, freshness, holds_warehouse, input_hash,
                                       release_warehouse, warehouse_for)
from instructflow.flows.stages import stage_names, stage_spec, stages
from instructflow.flows.status import publish_status
from instructflow.tasks.config import Config, load_config
from instructflow.tasks.secrets import redact_log_handlers


def run_stage(spec: StageSpec, cfg: Config, home: Path, run_id: str | None, force: bool) -> dict:
    """One stage's flow, with the status snapshot and report published around it."""
    home = data_home(home)
    publish_status(cfg, home, spec.name)
    try:
        return spec.flow(cfg, str(home), run_id=run_id, force=force)
    finally:
        publish_status(cfg, home, None)


# validate_parameters=False: `cfg` is the frozen Config the command resolved, passed as it is
@flow(name="pipeline", log_prints=True, validate_parameters=False)
def pipeline(profile: str | None = None, config: str | None = None, home: str | None = None,
             stages_to_run: list[str] | None = None, force: bool = False, cfg: Config | None = None) -> dict:
    """Runs each registered stage whose input hash changed since its last success (all with force).
    A stage's input hash includes its upstream stages' output hashes, so a change flows downstream.
    The CLI passes the config it resolved as `cfg`; a deployment run passes profile and config file,
    resolved here, once, at the start of the run.
    One writer per home: while another process holds the home's warehouse, the run waits for it
    (`warehouse_for`, logged); a run that took the warehouse itself (a deployment's) frees it when it
    ends, so the next run of the home starts as soon as this one is over."""
    logger = get_run_logger()
    cfg = cfg or load_config(profile, config)  # loading remembers the config's secrets (tasks/secrets.py)
    redact_log_handlers()  # a served deployment's run never went through the CLI's quiet_console
    home_path = data_home(home)
    own_warehouse = not holds_warehouse(home_path)
    try:
        return _run_stages(logger, cfg, home_path, stages_to_run, force)
    finally:
        if own_warehouse:
            release_warehouse(home_path)


def _run_stages(logger, cfg: Config, home_path: Path, stages_to_run: list[str] | None, force: bool) -> dict:
    wh = warehouse_for(home_path)
    unknown = set(stages_to_run or []) - set(stage_names())
    if unknown:
        raise ValueError(f"unknown stage(s): {', '.join(sorted(unknown))} (stages: {', '.join(stage_names())})")
    run_id = wh.start_run(cfg.profile, "run", flow_run_id=flow_run_id())
    results: dict[str, dict] = {}
    try:
        # decided one stage at a time: an upstream rerun changes the inputs of the stages after it
        for spec in stages():
            if stages_to_run and spec.name not in stages_to_run:
                continue
            if spec.enabled is not None and not spec.enabled(cfg):
                logger.info("%s: not in this profile's methods, skipped", spec.name)
                continue
            fresh, last, inputs = freshness(spec, cfg, wh)
            if fresh and not force:
                logger.info("%s: inputs unchanged since %s, skipped", spec.name, last.finished_at)
                wh.record_skip(run_id, spec.name, input_hash(inputs))
                results[spec.name] = {"skipped": True, **last.metrics}
                continue
            logger.info("%s: running", spec.name)
            results[spec.name] = run_stage(spec, cfg, home_path, run_id, force)
    except BaseException:
        wh.finish_run(run_id, "failed")
        raise
    wh.finish_run(run_id, "success")
    return results


def run_single(name: str, cfg: Config, home: Path, force: bool, downstream: bool) -> dict:
    """`instructflow stage NAME`: that stage always runs (`force` redoes its reusable work); with downstream,
    the later stages run when stale (force is for NAME only: a fresh later stage is skipped)."""
    result = {name: run_stage(stage_spec(name), cfg, home, None, force)}
    if downstream:
        later = stage_names()[stage_names().index(name) + 1:]
        if later:
            result.update(pipeline(home=str(home), stages_to_run=later, force=False, cfg=cfg))
    return result

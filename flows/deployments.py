"""Deployments of the `pipeline` flow. `instructflow deploy` serves one (its runs happen in the deploy
process); `instructflow deploy --work-pool NAME` registers the pipeline and one deployment per stage
on a Prefect work pool and exits: a worker (`prefect worker start --pool NAME`) runs them.

The worker finds the flow by module path (`instructflow.flows.pipeline.pipeline`), imported from the
environment it runs in: no source directory, no pull step, no image build. A process worker started
from the same venv can import it; a Docker or Kubernetes pool needs an image with instructflow
installed (the worker's environment is the flow run's)."""
from __future__ import annotations

from pathlib import Path

from instructflow.flows.stages import stage_names, stage_spec
from instructflow.tasks.config import Config

FLOW_ENTRYPOINT = "instructflow.flows.pipeline.pipeline"


def deployment_parameters(cfg: Config, home: Path, stages: list[str] | None) -> dict:
    """What every run of a deployment passes the pipeline flow: the profile, the home and the config
    file as absolute paths (a worker runs in another directory and environment), the stages."""
    config = None if cfg.source.startswith("<packaged") else str(Path(cfg.source).resolve())
    return {"profile": cfg.profile, "home": str(home), "config": config, "stages_to_run": stages}


def stage_deployment_name(name: str, stage: str) -> str:
    return f"{name}-{stage}"


def deployment_stages(cfg: Config, stages: list[str] | None) -> list[str]:
    """The stages that get a deployment of their own: those named (all by default) that the profile runs."""
    unknown = [s for s in stages or [] if s not in stage_names()]
    if unknown:
        raise ValueError(f"unknown stage(s): {', '.join(unknown)} (stages: {', '.join(stage_names())})")
    chosen = [s for s in stage_names() if not stages or s in stages]
    return [s for s in chosen if stage_spec(s).enabled is None or stage_spec(s).enabled(cfg)]


def ensure_work_pool(pool: str) -> tuple[str, bool]:
    """(the pool's type, whether it was created): a missing pool is created as a `process` pool with
    Prefect's default job template, as `prefect work-pool create NAME --type process` does."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(pool).type, False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type=ProcessWorker.type,
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:  # created by someone else meanwhile
            return client.read_work_pool(pool).type, False
    return ProcessWorker.type, True


def register_on_work_pool(cfg: Config, home: Path, pool: str, name: str, stages: list[str] | None,
                          cron: str | None, interval: int | None) -> list[str]:
    """Create or update `pipeline/NAME` (the schedule, if any; the stages given) and, per stage,
    `pipeline/NAME-STAGE` (no schedule: triggered when wanted) on the work pool; their full names.

    A stage's deployment runs the pipeline restricted to that stage with force=false: the stage runs
    when its inputs (config, the data it reads, its upstream outputs) changed since its last success,
    which is exactly "after data changes", and is skipped otherwise, so a repeated or scheduled
    trigger never retrains for nothing. A run started with the parameter force=true redoes it."""
    from prefect.deployments.runner import EntrypointType

    from instructflow.flows.pipeline import pipeline

    parameters = deployment_parameters(cfg, home, stages)
    tags = ["instructflow", cfg.profile]
    deployments = [pipeline.to_deployment(
        name=name, cron=cron, interval=interval, parameters=parameters, tags=tags,
        entrypoint_type=EntrypointType.MODULE_PATH, work_pool_name=pool,
        description=f"The pipeline ({', '.join(stages) if stages else 'every stage'}) on home {home}; "
                    "stages whose inputs are unchanged are skipped.")]
    for stage in deployment_stages(cfg, stages):
        deployments.append(pipeline.to_deployment(
            name=stage_deployment_name(name, stage), parameters={**parameters, "stages_to_run": [stage], "force": False},
            tags=[*tags, f"stage:{stage}"], entrypoint_type=EntrypointType.MODULE_PATH, work_pool_name=pool,
            description=f"Stage {stage} alone on home {home}: runs when its inputs changed since its last "
                        "success (force=true redoes it)."))
    for deployment in deployments:
        # apply() is what prefect.deploy() does per deployment, without its image step and its printed
        # table, and it raises where deploy() would only print a failure
        deployment.apply(work_pool_name=pool)
    return [f"{pipeline.name}/{d.name}" for d in deployments]

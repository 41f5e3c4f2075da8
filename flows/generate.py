"""Stage 1, generate: expand the seed tasks into new instructions and instances with the teacher."""
from __future__ import annotations

import asyncio
import time

from prefect import flow, task
from prefect.cache_policies import NONE
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from instructflow.flows.common import StageContext, StageSpec, publish_artifacts, seed_paths, stage_context
from instructflow.flows.teacher import teacher_session
from instructflow.tasks.batch_generate import BatchGenerator
from instructflow.tasks.config import Config
from instructflow.tasks.generate import Generator, Tally
from instructflow.tasks.plots import plot_bars
from instructflow.tasks.seeds import sync_seed_tasks
from instructflow.tasks.teacher import TeacherClient, TeacherSettings
from instructflow.warehouse import queries


@task(name="generate-instructions", cache_policy=NONE)
def generate_instructions(ctx: StageContext, settings: TeacherSettings) -> Tally:
    target = ctx.cfg.generate.target_kept
    with Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}")) as progress:
        bar = progress.add_task("", total=target)

        def show(tally: Tally) -> None:
            progress.update(bar, completed=min(tally.kept, target), description=tally.line(target))

        async def go() -> Tally:
            client = TeacherClient(settings)
            try:
                kind = BatchGenerator if ctx.cfg.teacher.mode == "batch" else Generator
                generator = kind(ctx.wh, ctx.cfg, client, on_update=show)
                show(generator.tally)
                await generator.run()
                return generator.tally
            finally:
                await client.aclose()

        return asyncio.run(go())


@flow(name="generate", log_prints=True, validate_parameters=False)
def generate_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        started = time.monotonic()
        kept_before = queries.candidate_counts(ctx.wh)["kept"]
        sync_seed_tasks(ctx.wh, seed_paths(ctx.cfg), max_chars=ctx.cfg.generate.max_seed_chars)
        with teacher_session(ctx.cfg, ctx.home) as settings:
            tally = generate_instructions(ctx, settings)
        minutes = (time.monotonic() - started) / 60
        counts = queries.candidate_counts(ctx.wh)
        totals = queries.teacher_totals(ctx.wh, "generate")
        metrics = {
            "requests": totals["requests"], "failed_requests": totals["failed_requests"], "retries": totals["retries"],
            "candidates": counts["candidates"], "kept": counts["kept"],
            "kept_with_instances": counts["kept_with_instances"], "rejected_by_reason": counts["rejected_by_reason"],
            "prompt_tokens": totals["prompt_tokens"], "completion_tokens": totals["completion_tokens"],
            "cost_usd": round(totals["cost_usd"], 6), "teacher_model": settings.model,
            "kept_this_run": counts["kept"] - kept_before,
            "kept_per_minute": round((counts["kept"] - kept_before) / minutes, 3) if minutes else 0.0,
            "requests_this_run": tally.requests, "requests_per_s": round(tally.requests_per_s, 2),
            "cpu_ms_per_request": round(tally.cpu_ms_per_request, 3),
            "throttled": tally.throttled, "commits": tally.commits, "teacher_mode": ctx.cfg.teacher.mode,
        }
        ctx.finish(metrics, output_hash=queries.candidates_fingerprint(ctx.wh))
        plot = plot_bars(ctx.out_dir / "rejections.png", "candidates by verdict",
                         {"kept": counts["kept"], **counts["rejected_by_reason"]}, ylabel="candidates")
        publish_artifacts(ctx, "generate", metrics, samples=queries.candidate_samples(ctx.wh),
                          plots={"candidates by verdict": plot})
    return metrics


STAGE = StageSpec(
    name="generate", flow=generate_flow, config_sections=("seeds", "teacher", "generate", "filter"),
    summary="Self-Instruct / Alpaca expansion of the seed tasks by the teacher",
    headline=("kept", "kept_with_instances", "candidates", "requests", "failed_requests", "cost_usd"),
)

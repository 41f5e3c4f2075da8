"""Where the teacher lives for a stage: a remote OpenAI-compatible endpoint, or the embedded
default, `transformers serve` on a local model started for the stage and stopped after it
(also on error or Ctrl-C)."""
from __future__ import annotations

import asyncio
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from instructflow.flows.common import StageContext, cache_dir
from instructflow.tasks.batch import BatchAPIError, BatchJobs
from instructflow.tasks.config import Config, teacher_api_key, teacher_endpoint
from instructflow.tasks.judge import judge_pairs
from instructflow.tasks.teacher import TeacherSettings


def local_model_dir(name: str) -> Path:
    """'bundled' -> converted SmolLM2 (cached), 'tiny' -> tiny random Llama (cached), else a local HF dir."""
    from instructflow.models.bundled import ensure_bundled_hf_dir

    if name == "bundled":
        return ensure_bundled_hf_dir(cache_dir())
    if name == "tiny":
        from instructflow.models.tiny import build_tiny_llama

        return build_tiny_llama(cache_dir() / "tiny-llama", tokenizer_dir=ensure_bundled_hf_dir(cache_dir()))
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model directory {path} not found (no config.json); use 'bundled', 'tiny' or an HF dir")
    return path


@contextmanager
def teacher_session(cfg: Config, home: Path) -> Iterator[TeacherSettings]:
    teacher = cfg.teacher
    common = dict(api=teacher.api, max_concurrency=teacher.max_concurrency, max_retries=teacher.max_retries, timeout_s=teacher.timeout_s,
                  backoff_base_s=teacher.backoff_base_s, backoff_max_s=teacher.backoff_max_s,
                  prices={k: tuple(v) for k, v in teacher.prices.items()},
                  max_requests_per_minute=teacher.max_requests_per_minute, max_tokens_per_minute=teacher.max_tokens_per_minute)
    if teacher.endpoint != "embedded":
        if not teacher.model:
            raise ValueError("teacher.model (or INSTRUCTFLOW_TEACHER_MODEL) must name the model for a remote endpoint")
        yield TeacherSettings(base_url=teacher_endpoint(teacher), model=teacher.model, api_key=teacher_api_key(teacher),
                              **common)
        return
    from instructflow.models.teacher_server import TeacherServer

    model_dir = local_model_dir(teacher.embedded_model)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with TeacherServer(model_dir, startup_timeout_s=teacher.startup_timeout_s, continuous_batching=teacher.continuous_batching,
                       log_path=home / "logs" / "teacher-server.log") as server:
        yield TeacherSettings(base_url=server.base_url, model=server.model_name, api_key="none", **common)


def judge_with_teacher(ctx: StageContext, pairs: list[tuple[str, str, str]]) -> list[dict]:
    """The pairwise judge of the preferences and evaluate stages: this config's teacher, asked
    synchronously or (`teacher.mode = "batch"`) as Batch API jobs of the stage, with one progress line."""
    teacher = ctx.cfg.teacher
    with teacher_session(ctx.cfg, ctx.home) as settings, \
            Progress(SpinnerColumn(), TextColumn(f"[bold]{ctx.stage} judge"), TimeElapsedColumn(),
                     TextColumn("{task.description}")) as progress:
        line = progress.add_task(f"{len(pairs)} pairs, both orders", total=None)

        def show(text: str) -> None:
            progress.update(line, description=text or f"{len(pairs)} pairs, both orders")

        jobs = BatchJobs(ctx.wh, ctx.stage, settings, teacher.batch_prices, teacher.batch_poll_s,
                         on_status=show) if teacher.mode == "batch" else None
        try:
            return asyncio.run(judge_pairs(ctx.wh, settings, ctx.stage, pairs, force=ctx.force, jobs=jobs,
                                           on_progress=show))
        except BatchAPIError as exc:
            raise RuntimeError(f"{ctx.stage}: teacher endpoint {settings.endpoint} refused a Batch API call: {exc} "
                               f"(check teacher.endpoint and the API key env var {teacher.api_key_env}; the "
                               f"verdicts stored so far are kept)") from None
        finally:
            if jobs is not None:
                jobs.close()

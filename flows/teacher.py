"""Where the teacher lives for a stage: a remote OpenAI-compatible endpoint, or the embedded
default, `transformers serve` on a local model started for the stage and stopped after it
(also on error or Ctrl-C)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from instructflow.flows.common import cache_dir
from instructflow.tasks.config import Config, teacher_api_key
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
        yield TeacherSettings(base_url=teacher.endpoint, model=teacher.model, api_key=teacher_api_key(teacher), **common)
        return
    from instructflow.models.teacher_server import TeacherServer

    model_dir = local_model_dir(teacher.embedded_model)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with TeacherServer(model_dir, startup_timeout_s=teacher.startup_timeout_s, continuous_batching=teacher.continuous_batching,
                       log_path=home / "logs" / "teacher-server.log") as server:
        yield TeacherSettings(base_url=server.base_url, model=server.model_name, api_key="none", **common)

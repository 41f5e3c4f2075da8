"""`instructflow doctor`: every check a first run depends on, as (check, result, ok) rows; it reports,
it does not stop at the first problem."""
from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "trl", "prefect", "fastapi", "duckdb", "openai", "rouge-score", "gguf")


def doctor_rows(profile: str | None, home: str | None, config: str | None) -> list[tuple[str, str, bool]]:
    from instructflow.flows.common import data_home
    from instructflow.flows.server import scheduler_check
    from instructflow.tasks.config import load_config

    rows: list[tuple[str, str, bool]] = [("python", sys.version.split()[0], sys.version_info >= (3, 11))]
    for package in PACKAGES:
        try:
            rows.append((package, metadata.version(package), True))
        except metadata.PackageNotFoundError:
            rows.append((package, "missing", False))
    cfg = home_path = None
    try:
        cfg = load_config(profile, config)
        rows.append(("config", f"{cfg.source} · profile {cfg.profile}", True))
        home_path = data_home(home)
        rows.append(("data home", f"{home_path} (writable)", True))
    except Exception as exc:
        rows.append(("config/home", str(exc), False))
    rows.append(_bundled_model_check())
    if cfg is not None:
        rows.append(_teacher_check(cfg))
    rows.append(_gpu_check())
    rows.append(("prefect api", os.environ.get("PREFECT_API_URL") or "ephemeral (per process)", True))
    rows.append(_prefect_timeout_check())
    if home_path is not None:
        rows.append(scheduler_check(home_path))
    return rows


def _bundled_model_check() -> tuple[str, str, bool]:
    try:
        from instructflow.models.bundled import bundled_gguf_path

        gguf = bundled_gguf_path()
        return ("bundled model", f"{gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)", True)
    except Exception as exc:
        return ("bundled model", str(exc), False)


def _gpu_check() -> tuple[str, str, bool]:
    try:
        import torch

        return ("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)", True)
    except Exception as exc:
        return ("gpu", str(exc), False)


def _prefect_timeout_check() -> tuple[str, str, bool]:
    """The timeout Prefect really uses in this process (it reads settings at import, so order matters)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    seconds = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    return ("Prefect startup timeout", f"{seconds:g} s", True)


def _teacher_check(cfg) -> tuple[str, str, bool]:
    teacher = cfg.teacher
    if teacher.endpoint == "embedded":
        found = shutil.which("transformers") or (Path(sys.executable).parent / "transformers").exists()
        return ("teacher", f"embedded: transformers serve on {teacher.embedded_model} (started per stage)", bool(found))
    import httpx

    from instructflow.tasks.config import teacher_api_key, teacher_endpoint
    from instructflow.tasks.teacher import TeacherSettings

    # teacher.endpoint is the URL with its credentials masked: what this row shows
    args = TeacherSettings(base_url=teacher_endpoint(teacher), model="-", api_key=teacher_api_key(teacher)
                           ).openai_client_args()
    try:
        response = httpx.get(args["base_url"].rstrip("/") + "/models", params=args.get("default_query"),
                             headers={"Authorization": f"Bearer {args['api_key']}"}, timeout=10)
        return ("teacher", f"{teacher.endpoint} answered {response.status_code}", response.status_code < 400)
    except httpx.HTTPError as exc:
        return ("teacher", f"{teacher.endpoint} unreachable: {type(exc).__name__}", False)

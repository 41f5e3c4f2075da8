"""The one place stages are registered, in pipeline order. A new stage is a flow file plus one
entry here: `run`, `stage NAME`, `status` and the pipeline flow pick it up from this list."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from instructflow.tasks.config import Config
from instructflow.warehouse.store import Warehouse


@dataclass(frozen=True)
class StageSpec:
    name: str
    flow: Callable                       # the Prefect flow
    config_sections: tuple[str, ...]     # config sections its output depends on
    upstream: tuple[str, ...] = ()       # stages whose outputs it consumes (their output hashes feed its input hash)
    data_inputs: Callable[[Config, Warehouse], dict] | None = None   # warehouse/file fingerprints it consumes
    outputs_exist: Callable[[Config, Warehouse], bool] | None = None  # a fresh stage whose outputs vanished reruns
    summary: str = ""                    # one line under the stage's heading in the report


def _registry() -> list[StageSpec]:
    from instructflow.flows import evaluate, generate, ppo, preferences, reward, sft
    from instructflow.flows import filter as filter_stage

    return [generate.STAGE, filter_stage.STAGE, sft.STAGE, preferences.STAGE, reward.STAGE, ppo.STAGE, evaluate.STAGE]


_STAGES: list[StageSpec] | None = None


def stages() -> list[StageSpec]:
    global _STAGES
    if _STAGES is None:
        _STAGES = _registry()
    return _STAGES


def stage_names() -> list[str]:
    return [s.name for s in stages()]


def stage_spec(name: str) -> StageSpec:
    for spec in stages():
        if spec.name == name:
            return spec
    raise KeyError(f"unknown stage {name!r} (stages: {', '.join(stage_names())})")

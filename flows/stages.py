"""The one place stages are registered, in pipeline order. A new stage is a flow file plus one
entry here: `run`, `stage NAME`, `status`, the report and the pipeline flow pick it up from this list."""
from __future__ import annotations

from instructflow.flows import dpo, evaluate, filter as filter_stage, generate, grpo, ppo, preferences, reward, sft
from instructflow.flows.common import StageSpec

# the alignment methods (ppo, dpo, grpo) are siblings: each runs when the profile's `methods` name it
STAGES: list[StageSpec] = [generate.STAGE, filter_stage.STAGE, sft.STAGE, preferences.STAGE, reward.STAGE,
                           ppo.STAGE, dpo.STAGE, grpo.STAGE, evaluate.STAGE]


def stages() -> list[StageSpec]:
    return STAGES


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def stage_spec(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown stage {name!r} (stages: {', '.join(stage_names())})")

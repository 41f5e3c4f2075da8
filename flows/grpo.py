"""Stage grpo: TRL GRPOTrainer from the SFT checkpoint on the prompts PPO uses (the same selection
rule), rewarded by the trained reward model plus the missing-eos rule; no critic."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from instructflow.flows.common import StageSpec, checkpoint_exists, publish_artifacts, recipe_task, stage_context
from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.prompts import rl_inputs

train = recipe_task("train-grpo", "grpo")


@flow(name="grpo", log_prints=True, validate_parameters=False)
def grpo_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        sft, reward, prompts = rl_inputs(cfg, ctx.wh, "grpo")
        ctx.base_model = Path(sft)  # what a disk-full message estimates the stage's checkpoints from
        result = train(prompts, cfg.grpo, Path(sft), Path(reward), ctx.run_dir(sft, reward), on_step=ctx.step)
        metrics = {k: result.get(k) for k in ("prompts_used", "skipped_prompts", "steps", "num_generations", "beta",
                                              "reward_first", "reward_last", "reward_slope", "kl_last",
                                              "episodes_per_s", "tokens_per_s", "wall_s", "resumed_from",
                                              "world_size")}
        metrics.update(checkpoint=str(result["checkpoint"]))
        ctx.wh.register_checkpoint(ctx.stage_run_id, "grpo_policy", metrics["checkpoint"], sft, reward,
                                   {"grpo": vars(cfg.grpo)}, metrics)
        ctx.finish(metrics, output_hash=stable_hash([metrics["checkpoint"], ctx.inputs]))
        publish_artifacts(ctx, "grpo", metrics, plots={"reward and KL": result.get("plot")})
    return metrics


STAGE = StageSpec(
    name="grpo", flow=grpo_flow, config_sections=("grpo",), upstream=("sft", "reward"),
    outputs_exist=checkpoint_exists("grpo_policy"), enabled=lambda cfg: "grpo" in cfg.methods,
    summary="GRPO (TRL GRPOTrainer) from the SFT checkpoint, rewarded by the reward model; no critic",
    headline=("steps", "reward_first", "reward_last", "reward_slope", "kl_last", "wall_s"),
)

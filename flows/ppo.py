"""Stage 6, ppo: TRL PPO with four Llamas: actor (SFT), frozen reference (SFT), reward model, and a
critic initialised from the reward model. Saves the value model with the policy and resumes."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from instructflow.flows.common import StageSpec, checkpoint_exists, publish_artifacts, recipe_task, stage_context
from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.prompts import rl_inputs

train = recipe_task("train-ppo", "ppo")


@flow(name="ppo", log_prints=True, validate_parameters=False)
def ppo_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        sft, reward, prompts = rl_inputs(cfg, ctx.wh, "ppo")
        ctx.base_model = Path(sft)  # what a disk-full message estimates the stage's checkpoints from
        result = train(prompts, cfg.ppo, Path(sft), Path(reward), ctx.run_dir(sft, reward), on_step=ctx.step)
        metrics = {k: result.get(k) for k in ("steps", "episodes", "reward_first", "reward_last", "reward_slope", "kl_last",
                                              "policy_checkpoint", "value_checkpoint", "episodes_per_s", "wall_s",
                                              "resumed_from", "skipped_prompts", "world_size")}
        metrics.update(policy_checkpoint=str(result["policy_checkpoint"]), prompts=len(prompts))
        config = {"ppo": vars(cfg.ppo)}
        ctx.wh.register_checkpoint(ctx.stage_run_id, "ppo_policy", metrics["policy_checkpoint"], sft, reward, config,
                                   metrics)
        if metrics["value_checkpoint"]:  # the trained critic, kept only with ppo.keep_checkpoints
            ctx.wh.register_checkpoint(ctx.stage_run_id, "ppo_value", str(metrics["value_checkpoint"]), reward, reward,
                                       config, metrics)
        ctx.finish(metrics, output_hash=stable_hash([metrics["policy_checkpoint"], ctx.inputs]))
        publish_artifacts(ctx, "ppo", metrics, plots={"reward and KL": result.get("plot")})
    return metrics


STAGE = StageSpec(
    name="ppo", flow=ppo_flow, config_sections=("ppo",), upstream=("sft", "reward"),
    outputs_exist=checkpoint_exists("ppo_policy"), enabled=lambda cfg: "ppo" in cfg.methods, summary="PPO (TRL) with actor, reference, reward and critic Llamas",
    headline=("steps", "reward_first", "reward_last", "reward_slope", "kl_last", "wall_s"),
)

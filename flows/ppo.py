"""Stage 6, ppo: TRL PPO with four Llamas: actor (SFT), frozen reference (SFT), reward model, and a
critic initialised from the reward model. Saves the value model with the policy and resumes."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from instructflow.flows.common import StageContext, StageSpec, checkpoint_exists, publish_artifacts, stage_context
from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.prompts import heldout_prompts


@task(name="train-ppo", cache_policy=NONE)
def train(ctx: StageContext, prompts: list[str], policy: Path, reward: Path, output_dir: Path) -> dict:
    from instructflow.models.ppo import train_ppo

    return train_ppo(prompts, ctx.cfg.ppo, policy, reward, output_dir, on_step=ctx.step)


@flow(name="ppo", log_prints=True, validate_parameters=False)
def ppo_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        sft, reward = ctx.wh.latest_checkpoint("sft"), ctx.wh.latest_checkpoint("reward")
        if sft is None or reward is None:
            raise ValueError("PPO needs an SFT and a reward checkpoint: run the sft and reward stages first")
        ctx.base_model = Path(sft["path"])
        ppo_cfg = cfg.ppo
        prompts = [prompt for _, prompt in heldout_prompts(cfg, ctx.wh, ppo_cfg.prompt_source, ppo_cfg.prompts, ppo_cfg.seed)]
        result = train(ctx, prompts, Path(sft["path"]), Path(reward["path"]), ctx.run_dir(sft["path"], reward["path"]))
        metrics = {k: result.get(k) for k in ("steps", "episodes", "reward_first", "reward_last", "reward_slope", "kl_last",
                                              "policy_checkpoint", "value_checkpoint", "episodes_per_s", "wall_s",
                                              "resumed_from", "skipped_prompts")}
        metrics.update(policy_checkpoint=str(result["policy_checkpoint"]), value_checkpoint=str(result["value_checkpoint"]),
                       prompts=len(prompts))
        config = {"ppo": vars(ppo_cfg)}
        ctx.wh.register_checkpoint(ctx.stage_run_id, "ppo_policy", metrics["policy_checkpoint"], sft["path"],
                                   reward["path"], config, metrics)
        ctx.wh.register_checkpoint(ctx.stage_run_id, "ppo_value", metrics["value_checkpoint"], reward["path"],
                                   reward["path"], config, metrics)
        ctx.finish(metrics, output_hash=stable_hash([metrics["policy_checkpoint"], ctx.inputs]))
        publish_artifacts(ctx, "ppo", metrics, plots={"reward and KL": result.get("plot")})
    return metrics


STAGE = StageSpec(
    name="ppo", flow=ppo_flow, config_sections=("ppo",), upstream=("sft", "reward"),
    outputs_exist=checkpoint_exists("ppo_policy"), enabled=lambda cfg: "ppo" in cfg.methods, summary="PPO (TRL) with actor, reference, reward and critic Llamas",
    headline=("steps", "reward_first", "reward_last", "reward_slope", "kl_last", "wall_s"),
)

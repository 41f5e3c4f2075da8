"""Stage grpo: TRL GRPOTrainer from the SFT checkpoint on the prompts PPO uses (the same selection
rule), rewarded by the trained reward model plus the missing-eos rule; no critic."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from instructflow.flows.common import StageContext, StageSpec, checkpoint_exists, publish_artifacts, stage_context
from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.prompts import heldout_prompts


@task(name="train-grpo", cache_policy=NONE)
def train(ctx: StageContext, prompts: list[str], policy: Path, reward: Path, output_dir: Path) -> dict:
    from instructflow.models.grpo import train_grpo

    return train_grpo(prompts, ctx.cfg.grpo, policy, reward, output_dir, on_step=ctx.step)


@flow(name="grpo", log_prints=True, validate_parameters=False)
def grpo_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        sft, reward = ctx.wh.latest_checkpoint("sft"), ctx.wh.latest_checkpoint("reward")
        if sft is None or reward is None:
            raise ValueError("GRPO needs an SFT and a reward checkpoint: run the sft and reward stages first")
        grpo = cfg.grpo
        prompts = [prompt for _, prompt in heldout_prompts(cfg, ctx.wh, grpo.prompt_source, grpo.prompts, grpo.seed)]
        result = train(ctx, prompts, Path(sft["path"]), Path(reward["path"]), ctx.run_dir(sft["path"], reward["path"]))
        metrics = {k: result.get(k) for k in ("prompts_used", "skipped_prompts", "steps", "num_generations", "beta",
                                              "reward_first", "reward_last", "reward_slope", "kl_last",
                                              "episodes_per_s", "tokens_per_s", "wall_s", "resumed_from")}
        metrics.update(checkpoint=str(result["checkpoint"]))
        ctx.wh.register_checkpoint(ctx.stage_run_id, "grpo_policy", metrics["checkpoint"], sft["path"],
                                   reward["path"], {"grpo": vars(grpo)}, metrics)
        ctx.finish(metrics, output_hash=stable_hash([metrics["checkpoint"], ctx.inputs]))
        publish_artifacts(ctx, "grpo", metrics, plots={"reward and KL": result.get("plot")})
    return metrics


STAGE = StageSpec(
    name="grpo", flow=grpo_flow, config_sections=("grpo",), upstream=("sft", "reward"),
    outputs_exist=checkpoint_exists("grpo_policy"), enabled=lambda cfg: "grpo" in cfg.methods,
    summary="GRPO (TRL GRPOTrainer) from the SFT checkpoint, rewarded by the reward model; no critic",
    headline=("steps", "reward_first", "reward_last", "reward_slope", "kl_last", "wall_s"),
)

"""Stage 6, ppo: TRL PPO with four Llamas: actor (SFT), frozen reference (SFT), reward model, and a
critic initialised from the reward model. Saves the value model with the policy and resumes."""
from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from instructflow.flows.common import StageContext, publish_artifacts, stable_hash, stage_context
from instructflow.flows.stages import StageSpec
from instructflow.tasks.config import Config
from instructflow.tasks.prompts import heldout_prompts
from instructflow.warehouse.store import Warehouse


@task(name="train-ppo", cache_policy=NONE)
def train(ctx: StageContext, prompts: list[str], policy: Path, reward: Path, output_dir: Path) -> dict:
    from instructflow.models.ppo import train_ppo

    return train_ppo(prompts, ctx.cfg.ppo, policy, reward, output_dir, on_step=ctx.step)


@flow(name="ppo", log_prints=True)
def ppo_flow(profile: str = "cpu", home: str | None = None, config: str | None = None,
             run_id: str | None = None, force: bool = False) -> dict:
    with stage_context("ppo", profile, home, config, run_id, force) as ctx:
        sft, reward = ctx.wh.latest_checkpoint("sft"), ctx.wh.latest_checkpoint("reward")
        if sft is None or reward is None:
            raise ValueError("PPO needs an SFT and a reward checkpoint: run the sft and reward stages first")
        ppo_cfg = ctx.cfg.ppo
        prompts = [prompt for _, prompt in heldout_prompts(ctx.cfg, ctx.wh, ppo_cfg.prompt_source, ppo_cfg.prompts, ppo_cfg.seed)]
        output_dir = ctx.out_dir / f"run-{stable_hash([sft['path'], reward['path'], ctx.inputs['config']])}"
        if ctx.force and output_dir.exists():
            shutil.rmtree(output_dir)
        result = train(ctx, prompts, Path(sft["path"]), Path(reward["path"]), output_dir)
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


def ppo_outputs_exist(cfg: Config, wh: Warehouse) -> bool:
    last = wh.latest_checkpoint("ppo_policy")
    return last is not None and (Path(last["path"]) / "config.json").exists()


STAGE = StageSpec(
    name="ppo", flow=ppo_flow, config_sections=("ppo",), upstream=("sft", "reward"),
    outputs_exist=ppo_outputs_exist, summary="PPO (TRL) with actor, reference, reward and critic Llamas",
)

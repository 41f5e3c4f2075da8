"""Stage dpo: TRL DPOTrainer from the SFT checkpoint on the stored preference pairs, with the reward
stage's train/eval split (so the evaluation pairs stay unseen by every method); the reference is the
SFT model. No reward model and no sampling: it learns from the pairs directly."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from instructflow.flows.common import StageSpec, checkpoint_exists, publish_artifacts, recipe_task, stage_context
from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.prompts import pairs_input, preference_split

train = recipe_task("train-dpo", "dpo")


@flow(name="dpo", log_prints=True, validate_parameters=False)
def dpo_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        split = preference_split(cfg, ctx.wh)
        ctx.base_model = Path(split.sft_path)  # what a disk-full message estimates the stage's checkpoints from
        # train_dpo keeps prompt, chosen and rejected of each row
        result = train(split.train, split.eval, cfg.dpo, Path(split.sft_path), ctx.run_dir(split.set_hash, split.sft_path),
                       on_step=ctx.step)
        metrics = {k: result.get(k) for k in ("train_pairs", "eval_pairs", "eval_accuracy", "eval_margin",
                                              "eval_reward_chosen", "eval_reward_rejected", "eval_loss", "beta",
                                              "loss_type", "steps", "tokens_per_s", "wall_s", "resumed_from",
                                              "world_size")}
        metrics.update(checkpoint=str(result["checkpoint"]), preference_set_hash=split.set_hash)
        ctx.wh.register_checkpoint(ctx.stage_run_id, "dpo_policy", metrics["checkpoint"], split.sft_path,
                                   split.set_hash, {"dpo": vars(cfg.dpo)}, metrics)
        ctx.finish(metrics, output_hash=stable_hash([metrics["checkpoint"], split.set_hash, ctx.inputs["config"]]))
        publish_artifacts(ctx, "dpo", metrics, plots={"implicit reward margin": result.get("plot")})
    return metrics


STAGE = StageSpec(
    name="dpo", flow=dpo_flow, upstream=("sft", "preferences"), data_inputs=pairs_input,
    # the reward stage's split of the pairs: the same held-out pairs for every method
    config_sections=("dpo", "reward.eval_fraction", "reward.seed"),
    outputs_exist=checkpoint_exists("dpo_policy"), enabled=lambda cfg: "dpo" in cfg.methods,
    summary="DPO (TRL DPOTrainer) from the SFT checkpoint on the preference pairs, reference = SFT",
    headline=("train_pairs", "eval_accuracy", "eval_margin", "beta", "tokens_per_s", "wall_s"),
)

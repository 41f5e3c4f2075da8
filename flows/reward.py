"""Stage 5, reward: TRL RewardTrainer on the kept preference pairs, a LlamaForSequenceClassification
initialised from the SFT checkpoint (so it shares the actor's tokenizer, as PPO requires)."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from instructflow.flows.common import StageSpec, checkpoint_exists, publish_artifacts, recipe_task, stage_context
from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.prompts import pairs_input, preference_split

train = recipe_task("train-reward", "reward")


@flow(name="reward", log_prints=True, validate_parameters=False)
def reward_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        split = preference_split(cfg, ctx.wh)
        ctx.base_model = Path(split.sft_path)  # what a disk-full message estimates the stage's checkpoints from
        set_hash = split.set_hash
        # train_reward keeps prompt, chosen and rejected of each row (pair_key stays here)
        result = train(split.train, split.eval, cfg.reward, Path(split.sft_path), ctx.run_dir(set_hash, split.sft_path),
                       on_step=ctx.step)
        metrics = {"train_pairs": len(split.train), "eval_pairs": len(split.eval),
                   "accuracy_before": result["accuracy_before"], "accuracy_after": result["accuracy_after"],
                   "margin_before": result.get("margin_before"), "margin_after": result["margin_after"],
                   "checkpoint": str(result["checkpoint"]), "preference_set_hash": set_hash,
                   "wall_s": result.get("wall_s"), "resumed_from": result.get("resumed_from"),
                   "world_size": result.get("world_size")}
        ctx.wh.register_checkpoint(ctx.stage_run_id, "reward", str(result["checkpoint"]), split.sft_path, set_hash,
                                   {"reward": vars(cfg.reward)}, metrics)
        ctx.finish(metrics, output_hash=stable_hash([str(result["checkpoint"]), set_hash, ctx.inputs["config"]]))
        publish_artifacts(ctx, "reward", metrics, plots={"held-out rewards": result.get("plot")})
    return metrics


STAGE = StageSpec(
    name="reward", flow=reward_flow, config_sections=("reward",), upstream=("sft", "preferences"),
    data_inputs=pairs_input, outputs_exist=checkpoint_exists("reward"),
    summary="reward model (TRL RewardTrainer) from the SFT checkpoint on the preference pairs",
    headline=("train_pairs", "eval_pairs", "accuracy_before", "accuracy_after", "margin_after", "wall_s"),
)

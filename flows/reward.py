"""Stage 5, reward: TRL RewardTrainer on the kept preference pairs, a LlamaForSequenceClassification
initialised from the SFT checkpoint (so it shares the actor's tokenizer, as PPO requires)."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from instructflow.flows.common import StageContext, StageSpec, checkpoint_exists, publish_artifacts, stage_context
from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.prompts import reward_split
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse


@task(name="train-reward", cache_policy=NONE)
def train(ctx: StageContext, train_rows: list[dict], eval_rows: list[dict], sft_path: Path, output_dir: Path) -> dict:
    from instructflow.models.reward import train_reward

    return train_reward(train_rows, eval_rows, ctx.cfg.reward, sft_path, output_dir, on_step=ctx.step)


@flow(name="reward", log_prints=True, validate_parameters=False)
def reward_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    from transformers import AutoTokenizer

    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        sft = ctx.wh.latest_checkpoint("sft")
        if sft is None:
            raise ValueError("no SFT checkpoint yet: run `instructflow stage sft` first")
        ctx.base_model = Path(sft["path"])
        pairs = queries.training_pairs(ctx.wh)
        if len(pairs) < 4:
            raise ValueError(f"only {len(pairs)} usable preference pairs (need >= 4): judge more prompts "
                             "(preferences.prompts) or import a file (preferences.import_files)")
        train_rows, eval_rows = reward_split(cfg, AutoTokenizer.from_pretrained(sft["path"]), pairs)
        set_hash = stable_hash(sorted(p["pair_key"] for p in pairs))
        output_dir = ctx.run_dir(set_hash, sft["path"])
        result = train(ctx, train_rows, eval_rows, Path(sft["path"]), output_dir)  # train_reward drops pair_key
        metrics = {"train_pairs": len(train_rows), "eval_pairs": len(eval_rows),
                   "accuracy_before": result["accuracy_before"], "accuracy_after": result["accuracy_after"],
                   "margin_before": result.get("margin_before"), "margin_after": result["margin_after"],
                   "checkpoint": str(result["checkpoint"]), "preference_set_hash": set_hash,
                   "wall_s": result.get("wall_s"), "resumed_from": result.get("resumed_from")}
        ctx.wh.register_checkpoint(ctx.stage_run_id, "reward", str(result["checkpoint"]), sft["path"], set_hash,
                                   {"reward": vars(cfg.reward)}, metrics)
        ctx.finish(metrics, output_hash=stable_hash([str(result["checkpoint"]), set_hash, ctx.inputs["config"]]))
        publish_artifacts(ctx, "reward", metrics, plots={"held-out rewards": result.get("plot")})
    return metrics


def reward_data_inputs(cfg: Config, wh: Warehouse) -> dict:
    return {"pairs": queries.pairs_fingerprint(wh)}


STAGE = StageSpec(
    name="reward", flow=reward_flow, config_sections=("reward",), upstream=("sft", "preferences"),
    data_inputs=reward_data_inputs, outputs_exist=checkpoint_exists("reward"),
    summary="reward model (TRL RewardTrainer) from the SFT checkpoint on the preference pairs",
    headline=("train_pairs", "eval_pairs", "accuracy_before", "accuracy_after", "margin_after", "wall_s"),
)

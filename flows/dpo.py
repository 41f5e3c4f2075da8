"""Stage dpo: TRL DPOTrainer from the SFT checkpoint on the stored preference pairs, with the reward
stage's train/eval split (so the evaluation pairs stay unseen by every method); the reference is the
SFT model. No reward model and no sampling: it learns from the pairs directly."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from instructflow.flows.common import StageContext, StageSpec, checkpoint_exists, publish_artifacts, stage_context
from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.prompts import reward_split
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse


@task(name="train-dpo", cache_policy=NONE)
def train(ctx: StageContext, train_rows: list[dict], eval_rows: list[dict], sft_path: Path, output_dir: Path) -> dict:
    from instructflow.models.dpo import train_dpo

    return train_dpo(train_rows, eval_rows, ctx.cfg.dpo, sft_path, output_dir, on_step=ctx.step)


@flow(name="dpo", log_prints=True, validate_parameters=False)
def dpo_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    from transformers import AutoTokenizer

    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        sft = ctx.wh.latest_checkpoint("sft")
        if sft is None:
            raise ValueError("no SFT checkpoint yet: run `instructflow stage sft` first")
        pairs = queries.training_pairs(ctx.wh)
        if len(pairs) < 4:
            raise ValueError(f"only {len(pairs)} usable preference pairs (need >= 4): judge more prompts "
                             "(preferences.prompts) or import a file (preferences.import_files)")
        split = reward_split(cfg, AutoTokenizer.from_pretrained(sft["path"]), pairs)
        train_rows, eval_rows = ([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] for rows in split)
        set_hash = stable_hash(sorted(p["pair_key"] for p in pairs))
        result = train(ctx, train_rows, eval_rows, Path(sft["path"]), ctx.run_dir(set_hash, sft["path"]))
        metrics = {k: result.get(k) for k in ("train_pairs", "eval_pairs", "eval_accuracy", "eval_margin",
                                              "eval_reward_chosen", "eval_reward_rejected", "eval_loss", "beta",
                                              "loss_type", "steps", "tokens_per_s", "wall_s", "resumed_from")}
        metrics.update(checkpoint=str(result["checkpoint"]), preference_set_hash=set_hash)
        ctx.wh.register_checkpoint(ctx.stage_run_id, "dpo_policy", metrics["checkpoint"], sft["path"], set_hash,
                                   {"dpo": vars(cfg.dpo)}, metrics)
        ctx.finish(metrics, output_hash=stable_hash([metrics["checkpoint"], set_hash, ctx.inputs["config"]]))
        publish_artifacts(ctx, "dpo", metrics, plots={"implicit reward margin": result.get("plot")})
    return metrics


def dpo_data_inputs(cfg: Config, wh: Warehouse) -> dict:
    return {"pairs": queries.pairs_fingerprint(wh)}


STAGE = StageSpec(
    name="dpo", flow=dpo_flow, upstream=("sft", "preferences"), data_inputs=dpo_data_inputs,
    # the reward stage's split of the pairs: the same held-out pairs for every method
    config_sections=("dpo", "reward.eval_fraction", "reward.seed"),
    outputs_exist=checkpoint_exists("dpo_policy"), enabled=lambda cfg: "dpo" in cfg.methods,
    summary="DPO (TRL DPOTrainer) from the SFT checkpoint on the preference pairs, reference = SFT",
    headline=("train_pairs", "eval_accuracy", "eval_margin", "beta", "tokens_per_s", "wall_s"),
)

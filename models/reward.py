"""Reward-model recipe (TRL RewardTrainer): preference pairs in, a LlamaForSequenceClassification dir out.

The reward model starts from the SFT checkpoint (same tokenizer as the actor, which PPO requires) with
a fresh one-output `score` head, and learns -log sigmoid(r(chosen) - r(rejected)) plus a small
penalty on (r(chosen) + r(rejected))^2 that keeps rewards centred on zero (`center_rewards_coefficient`).

A reward is read at the last non-pad token of `prompt + response + eos`, exactly as TRL tokenizes the
pairs during training; `score()` does the same, so held-out accuracy and margin before and after
training (and the scores PPO and evaluation see) are all measured one way.

Pairs longer than `max_length` tokens are dropped by TRL during training (counted in `dropped_pairs`);
`score()` keeps the last `max_length` tokens of a long input instead, so the reply's end is scored.

Resume, final dir, metrics.json and the empty-eval fallback work as in `models/sft.py` (models/recipe_io.py).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

from instructflow.models.launch import job_main
from instructflow.models.recipe_io import (ProgressCallback, ReportSteps, StepCallback, check_model_dir, drop_printer,
                                           ensure_pad, is_main_rank, load_model, loaded_by_one_rank, lora_config,
                                           pair_length_grouped, publish_final, save_trained_model, start_job,
                                           trainer_args, update_run)
from instructflow.tasks.config import RewardConfig
from instructflow.tasks.library_output import quiet_progress_bars

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class RewardInputError(ValueError):
    """Bad pairs or settings, reported in one line before any training starts."""


# ----------------------------------------------------------------------------------------------
# Scoring

def reward_text(prompt: str, response: str, eos: str) -> str:
    """What the reward model reads: prompt + response + eos (TRL appends eos the same way)."""
    return prompt + response + ("" if response.endswith(eos) else eos)


def score_with(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8,
               max_length: int = 512) -> list[float]:
    """Rewards from an in-memory model; inputs longer than max_length keep their last max_length tokens."""
    import torch

    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token or ""
    ids = [tokenizer(text=reward_text(p, r, eos))["input_ids"][-max_length:] for p, r in zip(prompts, responses)]
    # longest first, so each batch pads to a width close to its own members' (the scores go back in input order)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    was_training = model.training
    model.eval()
    scores = [0.0] * len(ids)
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            rows = order[start:start + batch_size]
            batch = [ids[i] for i in rows]
            width = max(len(x) for x in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, x in enumerate(batch):  # right padding: the model reads the last non-pad token
                input_ids[row, :len(x)] = torch.tensor(x)
                attention_mask[row, :len(x)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            for i, value in zip(rows, logits[:, 0].float().cpu().tolist()):
                scores[i] = value
    model.train(was_training)
    return scores


def score(model_dir: Path, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8,
          max_length: int = 512) -> list[float]:
    """One scalar reward per (prompt, response) from a saved reward model (GPU if there is one)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = check_model_dir(model_dir, "reward model", RewardInputError)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise RewardInputError(f"{model_dir} has num_labels={model.config.num_labels}; a reward model has 1")
    if model.config.pad_token_id is None:
        raise RewardInputError(f"{model_dir}/config.json has no pad_token_id: batched rewards would be read "
                               "at the wrong token")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return score_with(model, tokenizer, prompts, responses, batch_size, max_length)


def score_each(model_dir: Path, prompts: Sequence[str], *response_sets: Sequence[str]) -> list[list[float]]:
    """score() of several response sets to the same prompts (SFT's and PPO's, say), one load of the model."""
    flat = score(model_dir, list(prompts) * len(response_sets), [r for responses in response_sets for r in responses])
    n = len(prompts)
    return [flat[i * n:(i + 1) * n] for i in range(len(response_sets))]


def pair_stats(chosen: Sequence[float], rejected: Sequence[float]) -> tuple[float, float]:
    """(accuracy: share of pairs with r_chosen > r_rejected, ties count as wrong; mean margin)."""
    diffs = [c - r for c, r in zip(chosen, rejected)]
    return sum(d > 0 for d in diffs) / len(diffs), sum(diffs) / len(diffs)


def score_pairs(model, tokenizer, rows: Sequence[dict], max_length: int, batch_size: int = 8):
    prompts = [r["prompt"] for r in rows]
    chosen = score_with(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size, max_length)
    rejected = score_with(model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size, max_length)
    return chosen, rejected


# ----------------------------------------------------------------------------------------------
# The recipe

def count_too_long(tokenizer, rows: Sequence[dict], max_length: int) -> int:
    """Pairs TRL will drop: chosen or rejected text longer than max_length tokens."""
    eos = tokenizer.eos_token or ""
    return sum(max(len(tokenizer(text=reward_text(r["prompt"], r[side], eos))["input_ids"])
                   for side in ("chosen", "rejected")) > max_length for r in rows)


def load_reward_model(sft_model: Path, cfg: RewardConfig):
    """LlamaForSequenceClassification (num_labels=1) from the SFT weights (recipe_io.load_model: the section's
    attention kernel and RoPE scaling); the new head is seeded with `cfg.seed`."""
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning  # hides the expected "score.weight is new"

    set_seed(cfg.seed)
    with suppress_seqcls_warning():
        return load_model(AutoModelForSequenceClassification, sft_model, cfg, num_labels=1, dtype=torch.float32)


def train_reward(train: Sequence[dict], eval: Sequence[dict], cfg: RewardConfig, sft_model: Path, output_dir: Path,
                 on_step: StepCallback | None = None, on_progress: ProgressCallback | None = None) -> dict:
    """Train a reward model from `sft_model` on prompt/chosen/rejected rows with the `reward` section `cfg`;
    returns metrics (also in output_dir/final/metrics.json)."""
    started = time.time()
    # 1-2. inputs (rows, models, machine); already done? else start, or resume from the newest complete checkpoint
    job = start_job(train, eval, PAIR_FIELDS, cfg, {"sft_model": sft_model}, output_dir, RewardInputError,
                    empty="no preference pairs to learn from")
    if job.done is not None:
        return job.done
    train_rows, eval_rows, eval_on_train, sft_model, output_dir, precision = job[:6]
    run, resume_from = job.run, job.resume_from

    # 3. tokenizer, model, data
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    quiet_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    model = load_reward_model(sft_model, cfg)
    ensure_pad(tokenizer, model)  # pad != eos: the reward is read at the eos that ends each reply
    dropped = count_too_long(tokenizer, train_rows, cfg.max_length)
    if dropped == len(train_rows):
        raise RewardInputError(f"every train pair is longer than max_length={cfg.max_length} tokens; "
                               "raise max_length")

    # 4. held-out accuracy and margin before training (measured once per job, kept across resumes;
    #    only rank 0 reports metrics, so only rank 0 measures)
    if "accuracy_before" not in run and is_main_rank():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        accuracy, margin = pair_stats(*score_pairs(model.to(device), tokenizer, eval_rows, cfg.max_length,
                                                   cfg.batch_size * 2))
        run = update_run(output_dir, run, accuracy_before=accuracy, margin_before=margin)
        if on_step is not None:
            on_step(0, {"heldout_accuracy": accuracy, "heldout_margin": margin})

    # 5. train (resume_from_checkpoint restores weights, optimizer, scheduler, RNG and step)
    config = TRLRewardConfig(
        **trainer_args(cfg, output_dir / "checkpoints", precision),
        max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient or None,
    )
    peft_config = lora_config(cfg, "SEQ_CLS") if cfg.lora else None
    trainer = pair_length_grouped(RewardTrainer)(
        model=model, args=config, train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows), processing_class=tokenizer, peft_config=peft_config,
        callbacks=[ReportSteps(on_step, on_progress)])
    drop_printer(trainer)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    # 6. final model (LoRA and its trained score head merged), held-out scores through score(), metrics, plot
    tmp = save_trained_model(trainer, output_dir, tokenizer,
                             (lambda: load_reward_model(sft_model, cfg)) if peft_config else None)
    metrics: dict[str, Any] = {}
    if is_main_rank():
        prompts = [r["prompt"] for r in eval_rows]
        with loaded_by_one_rank():
            chosen = score(tmp, prompts, [r["chosen"] for r in eval_rows], cfg.batch_size * 2, cfg.max_length)
            rejected = score(tmp, prompts, [r["rejected"] for r in eval_rows], cfg.batch_size * 2, cfg.max_length)
        accuracy_after, margin_after = pair_stats(chosen, rejected)
        if on_step is not None:
            on_step(trainer.state.global_step, {"heldout_accuracy": accuracy_after, "heldout_margin": margin_after})
        plot = plot_rewards(output_dir / "rewards.png", chosen, rejected)
        metrics = {
            "train_pairs": len(train_rows), "eval_pairs": 0 if eval_on_train else len(eval_rows),
            "eval_on_train": eval_on_train, "dropped_pairs": dropped,
            "accuracy_before": float(run["accuracy_before"]), "accuracy_after": accuracy_after,
            "margin_before": float(run["margin_before"]), "margin_after": margin_after,
            "reward_chosen_mean": sum(chosen) / len(chosen), "reward_rejected_mean": sum(rejected) / len(rejected),
            "steps": int(trainer.state.global_step), "checkpoint": str(output_dir / "final"),
            "wall_s": time.time() - started, "resumed_from": str(resume_from) if resume_from else None,
            "precision": precision, "lora": "lora" if cfg.lora else None,
            "plot": str(plot), "fingerprint": job.fingerprint,
        }
    return publish_final(trainer, tmp, metrics, cfg.keep_checkpoints)


def plot_rewards(path: Path, chosen: Sequence[float], rejected: Sequence[float]) -> Path:
    from instructflow.tasks.plots import plot_histograms

    return plot_histograms(path, "held-out rewards after training", {"chosen": list(chosen),
                                                                     "rejected": list(rejected)},
                           xlabel="reward")


# ----------------------------------------------------------------------------------------------
# `accelerate launch ... -m instructflow.models.reward --job job.json` (models/launch.py)

def main(argv: Sequence[str] | None = None) -> int:
    """`python -m instructflow.models.reward --job FILE`: what every rank of a launch runs."""
    return job_main("reward", argv, RewardInputError)


if __name__ == "__main__":
    sys.exit(main())

"""DPO recipe (TRL DPOTrainer): preference pairs in, a plain causal-LM dir out.

Direct preference optimisation trains the policy on the pairs themselves, with no reward model and no
sampling: it raises log pi(chosen) - log pi(rejected) relative to the reference (the SFT model), the
implicit reward r(x, y) = beta * (log pi(y|x) - log ref(y|x)). The reference is the SFT checkpoint
the policy starts from; with `precompute_ref_log_probs` its log-probabilities of every pair are
computed once, before training, and no second model stays in memory (with LoRA the reference is the
adapter-disabled base, as TRL does).

Read top to bottom, `train_dpo` does:

  1. check the rows (prompt/chosen/rejected strings, the reward stage's split) and the machine,
  2. return the stored metrics if `output_dir/final` is already complete for the same job,
  3. load tokenizer (pad != eos) and the policy from the SFT checkpoint (optional LoRA/QLoRA; the section's
     attention kernel and RoPE scaling, also for the reference),
  4. train, resuming from the newest complete `output_dir/checkpoints/checkpoint-N`,
  5. evaluate the implicit reward on the held-out pairs (accuracy: share of pairs whose chosen reply
     gets the higher implicit reward; margin: its mean difference), save `final/` (LoRA merged).

Before training the implicit reward is 0 for every reply (policy = reference), so there is no
"before" figure to report: accuracy and margin are measured after training only.

TRL appends eos to chosen and rejected and drops pairs whose prompt alone fills `max_length`; longer
pairs are cut at the end (`keep_start`). Resume, final dir and metrics.json work as in `models/sft.py`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

from instructflow.models.launch import job_main
from instructflow.models.recipe_io import (ProgressCallback, ReportSteps, StepCallback, dataset_in, drop_printer,
                                           ensure_pad, hidden_log_lines, is_main_rank, load_causal_lm, lora_config,
                                           model_kwargs, pair_length_grouped, publish_final, save_policy, series,
                                           session_rates, start_job, trained_tokens, trainer_args)
from instructflow.tasks.config import DPOConfig
from instructflow.tasks.library_output import quiet_progress_bars

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class DPOInputError(ValueError):
    """Bad pairs or settings, reported in one line before any training starts."""


def train_dpo(train: Sequence[dict], eval: Sequence[dict], cfg: DPOConfig, sft_model: Path, output_dir: Path,
              on_step: StepCallback | None = None, on_progress: ProgressCallback | None = None) -> dict:
    """Train the policy from `sft_model` on prompt/chosen/rejected rows with the `dpo` section `cfg`; returns
    metrics (also in output_dir/final/metrics.json). Rerunning with the same output_dir resumes."""
    started = time.time()
    # 1-2. the pairs, the SFT model, the machine; then: done already, or start, or resume from a checkpoint
    job = start_job(train, eval, PAIR_FIELDS, cfg, {"sft_model": sft_model}, output_dir, DPOInputError,
                    empty="no preference pairs to learn from")
    if job.done is not None:
        return job.done
    output_dir, resume_from = job.output_dir, job.resume_from

    # 3. tokenizer, policy, data
    import torch
    from transformers import AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    quiet_progress_bars()
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    model = load_causal_lm(job.model_dir, cfg, job.precision)
    ensure_pad(tokenizer, model)
    config = TRLDPOConfig(
        **trainer_args(cfg, output_dir / "checkpoints", job.precision),
        max_length=cfg.max_length,
        beta=cfg.beta,
        loss_type=[cfg.loss_type] + (["sft"] if cfg.sft_weight else []),
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight else None,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        model_init_kwargs=model_kwargs(job.model_dir, cfg),  # the reference TRL loads: as the policy was
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=None,
    )
    peft_config = lora_config(cfg, "CAUSAL_LM") if (cfg.lora or cfg.qlora) else None
    # ref_model=None: TRL loads the reference from the same SFT dir with model_init_kwargs, the policy's
    # attention kernel and RoPE scaling (or precomputes its log-probs, or disables the LoRA adapter): always the
    # model the policy started from. TRL's warning that model_init_kwargs are ignored for an instantiated
    # policy forgets that very reference. The pairs are stored in the run folder, where TRL caches the
    # precomputed log-probs for every rank (recipe_io.dataset_in)
    with hidden_log_lines("trl.trainer.dpo_trainer", "model_init_kwargs"):
        trainer = pair_length_grouped(DPOTrainer)(
            model=model, ref_model=None, args=config,
            train_dataset=dataset_in(job.train, output_dir / "pairs" / "train", config),
            eval_dataset=dataset_in(job.eval, output_dir / "pairs" / "eval", config), processing_class=tokenizer,
            peft_config=peft_config, callbacks=[ReportSteps(on_step, on_progress)])
    drop_printer(trainer)

    # 4. train (resume_from_checkpoint restores weights, optimizer, scheduler, RNG and step)
    tokens_before = trained_tokens(resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    # 5. held-out implicit reward (the periodic eval may already have run at the last step)
    at_end = [e for e in trainer.state.log_history
              if "eval_rewards/accuracies" in e and e.get("step") == trainer.state.global_step]
    evaluated = at_end[-1] if at_end else trainer.evaluate()
    tmp = save_policy(trainer, job, tokenizer, lora=peft_config is not None)  # LoRA merged into the SFT model
    metrics: dict[str, Any] = {}
    if is_main_rank():
        rates = session_rates(trainer, result, tokens_before)
        plot = plot_dpo(output_dir / "dpo.png", trainer.state.log_history)
        metrics = {
            "train_pairs": len(job.train), "eval_pairs": 0 if job.eval_on_train else len(job.eval),
            "eval_on_train": job.eval_on_train, "beta": cfg.beta, "loss_type": cfg.loss_type,
            "sft_weight": cfg.sft_weight,
            "eval_accuracy": float(evaluated["eval_rewards/accuracies"]),
            "eval_margin": float(evaluated["eval_rewards/margins"]),
            "eval_reward_chosen": float(evaluated["eval_rewards/chosen"]),
            "eval_reward_rejected": float(evaluated["eval_rewards/rejected"]),
            "eval_loss": float(evaluated["eval_loss"]),
            "train_loss_last": (series(trainer.state.log_history, "loss")[1] or [None])[-1],
            "steps": int(trainer.state.global_step), "checkpoint": str(output_dir / "final"),
            "tokens_seen": rates["tokens_seen"], "tokens_per_s": rates["tokens_per_s"],
            "wall_s": time.time() - started, "resumed_from": str(resume_from) if resume_from else None,
            "precision": job.precision, "lora": "qlora" if cfg.qlora else "lora" if cfg.lora else None,
            "plot": str(plot), "fingerprint": job.fingerprint,
        }
    return publish_final(trainer, tmp, metrics, cfg.keep_checkpoints)


def plot_dpo(path: Path, log_history: Sequence[dict]) -> Path:
    from instructflow.tasks.plots import plot_lines

    return plot_lines(path, "DPO: implicit reward margin (chosen - rejected) and loss",
                      {"train margin": series(log_history, "rewards/margins"),
                       "held-out margin": series(log_history, "eval_rewards/margins"),
                       "train loss": series(log_history, "loss")}, xlabel="step")


# ----------------------------------------------------------------------------------------------
# `accelerate launch ... -m instructflow.models.dpo --job job.json` (models/launch.py)

def main(argv: Sequence[str] | None = None) -> int:
    """`python -m instructflow.models.dpo --job FILE`: what every rank of a launch runs."""
    return job_main("dpo", argv, DPOInputError)


if __name__ == "__main__":
    sys.exit(main())

"""GRPO recipe (TRL GRPOTrainer): prompts and the trained reward model in, a plain causal-LM dir out.

Group relative policy optimisation samples `num_generations` completions per prompt from the policy,
scores each, and uses the group's mean (and spread, `scale_rewards`) as the baseline: no critic, so
two Llamas fewer than PPO. The KL to the SFT reference is a term in the loss (`beta`; 0 loads no
reference). The reward of a completion is

    reward-model score of prompt + completion + eos    (`models/reward.score_with`, the one scoring rule:
                                                        the same text and token the reward model trained
                                                        on and that evaluate scores)
  - missing_eos_penalty if the completion did not end with eos within max_completion_length

(the same rule reward PPO applies). Both are logged per update with reward, KL and entropy.

Read top to bottom, `train_grpo` does:

  1. check the prompts (already in the policy's format) and the models: the policy and reward model
     must share the tokenizer the SFT stage saved (the reward model was trained from the SFT model),
  2. return the stored metrics if `output_dir/final` is already complete for the same job,
  3. load tokenizer, policy (optional LoRA/QLoRA) and the frozen reward model (both, and TRL's reference,
     with the section's attention kernel and RoPE scaling),
  4. train, resuming from the newest complete `output_dir/checkpoints/checkpoint-N` (Trainer state:
     weights, optimizer, scheduler, RNG, step),
  5. save `final/` (LoRA merged), the reward/KL plot and the metrics: reward first/last and its
     least-squares slope per update, as for PPO.

Prompts longer than `max_length - max_completion_length` tokens are skipped (counted). With
`scale_rewards = "group"` a group whose completions all score the same contributes no gradient.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

from instructflow.models.launch import job_main
from instructflow.models.recipe_io import (ProgressCallback, ReportSteps, StepCallback, drop_printer, ensure_pad,
                                           hidden_log_lines, is_main_rank, load_causal_lm, load_model, lora_config,
                                           model_kwargs, publish_final, save_policy, series, session_rates, start_job,
                                           trained_tokens, trainer_args)
from instructflow.tasks.config import GRPOConfig
from instructflow.tasks.library_output import quiet_progress_bars

# our name -> the key GRPOTrainer logs once per optimizer step
METRIC_NAMES = {
    "reward": "reward",                        # mean total reward of the step's completions (penalty included)
    "reward_model": "rewards/reward_model/mean",
    "missing_eos": "rewards/missing_eos/mean",   # mean penalty term (<= 0)
    "reward_std": "reward_std",
    "kl": "kl",                                # mean per-token KL to the reference (k3), when beta > 0
    "entropy": "entropy",
    "completion_length": "completions/mean_length",
    "clipped_ratio": "completions/clipped_ratio",  # share of completions that hit max_completion_length
    "loss": "loss",
    "lr": "learning_rate",
}


class GRPOInputError(ValueError):
    """Bad prompts, models or settings, reported in one line before any training starts."""


def rule_and_model_rewards(reward_model, tokenizer, eos_token_id: int, penalty: float, max_length: int):
    """The two reward functions GRPOTrainer sums: the reward model's score and the missing-eos rule."""
    from instructflow.models.reward import score_with

    def reward_model_score(prompts, completions, **_):
        return score_with(reward_model, tokenizer, prompts, completions, max_length=max_length)

    def missing_eos(prompts, completions, completion_ids, **_):
        return [0.0 if ids and ids[-1] == eos_token_id else -penalty for ids in completion_ids]

    reward_model_score.__name__, missing_eos.__name__ = "reward_model", "missing_eos"
    return [reward_model_score, missing_eos]


def train_grpo(prompts: Sequence[str], cfg: GRPOConfig, policy_model: Path, reward_model: Path, output_dir: Path,
               on_step: StepCallback | None = None, on_progress: ProgressCallback | None = None) -> dict:
    """Train the policy from `policy_model` (the SFT checkpoint, also the KL reference) on `prompts` (already
    formatted as the policy saw them in SFT) with the `grpo` section `cfg`, rewarded by `reward_model`;
    returns metrics (also in output_dir/final/metrics.json). Rerunning with the same output_dir resumes."""
    started = time.time()
    # 1-2. inputs (the prompts as rows, both models, the machine); already done? else start or resume
    rows = [{"prompt": p} for p in prompts]
    job = start_job(rows, [], ("prompt",), cfg, {"policy_model": policy_model, "reward_model": reward_model},
                    output_dir, GRPOInputError, empty="no prompts to sample from")
    if job.done is not None:
        return job.done
    train_rows, _, _, policy_model, output_dir, precision = job[:6]
    resume_from = job.resume_from

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_model)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise GRPOInputError(f"policy_model {policy_model}: the tokenizer needs a pad token distinct from eos")
    if AutoTokenizer.from_pretrained(reward_model).get_vocab() != tokenizer.get_vocab():
        raise GRPOInputError(f"reward_model {reward_model} has another tokenizer than the policy {policy_model}")
    budget = cfg.max_length - cfg.max_completion_length
    usable = [r for r in train_rows
              if 0 < len(tokenizer(text=r["prompt"], add_special_tokens=False)["input_ids"]) <= budget]
    if not usable:
        raise GRPOInputError(f"none of the {len(train_rows)} prompts fits in max_length - max_completion_length "
                             f"= {budget} tokens")

    # 3. policy, reward model, trainer
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import GRPOConfig as TRLGRPOConfig, GRPOTrainer

    quiet_progress_bars()
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(policy_model, cfg, precision)
    ensure_pad(tokenizer, model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = load_model(AutoModelForSequenceClassification, reward_model, cfg, num_labels=1,
                        dtype=torch.bfloat16 if precision == "bf16" else torch.float32).to(device)
    scorer.config.pad_token_id = tokenizer.pad_token_id
    scorer.eval().requires_grad_(False)
    args = trainer_args(cfg, output_dir / "checkpoints", precision)
    args.pop("train_sampling_strategy")  # GRPO's own sampler keeps each prompt's group together
    args.update(eval_strategy="no", per_device_eval_batch_size=cfg.batch_size)
    config = TRLGRPOConfig(
        **args,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=1.0, top_k=0,
        beta=cfg.beta, epsilon=cfg.epsilon, num_iterations=cfg.num_iterations,
        scale_rewards=cfg.scale_rewards, loss_type=cfg.loss_type,
        include_num_input_tokens_seen="non_padding",
        log_completions=False,
        model_init_kwargs=model_kwargs(policy_model, cfg),  # the reference TRL loads (beta > 0): as the policy
    )
    peft_config = lora_config(cfg, "CAUSAL_LM") if (cfg.lora or cfg.qlora) else None
    # TRL warns that model_init_kwargs are ignored for an instantiated policy, forgetting the reference it loads
    with hidden_log_lines("trl.trainer.grpo_trainer", "model_init_kwargs"):
        trainer = GRPOTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(usable), processing_class=tokenizer,
            reward_funcs=rule_and_model_rewards(scorer, tokenizer, tokenizer.eos_token_id, cfg.missing_eos_penalty,
                                                cfg.max_length),
            peft_config=peft_config, callbacks=[ReportSteps(on_step, on_progress, names=METRIC_NAMES)])
    drop_printer(trainer)

    # 4. train
    tokens_before = trained_tokens(resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    # 5. final model (LoRA merged into a fresh fp32 copy of the SFT model), plot, metrics
    tmp = save_policy(trainer, job, tokenizer, lora=peft_config is not None)
    metrics: dict[str, Any] = {}
    if is_main_rank():
        from instructflow.tasks.trend import least_squares_slope

        steps, rewards = series(trainer.state.log_history, "reward")
        kls = series(trainer.state.log_history, "kl")[1]
        rates = session_rates(trainer, result, tokens_before)
        steps_this_run = trainer.state.global_step - _step_of(resume_from)
        completions = steps_this_run * cfg.batch_size * cfg.grad_accum  # a batch row is one completion
        plot = plot_grpo(output_dir / "grpo.png", trainer.state.log_history)
        metrics = {
            "prompts": len(train_rows), "prompts_used": len(usable), "skipped_prompts": len(train_rows) - len(usable),
            "steps": int(trainer.state.global_step), "num_generations": cfg.num_generations, "beta": cfg.beta,
            "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
            "reward_slope": least_squares_slope(steps, rewards),
            "kl_last": kls[-1] if kls else None,
            "checkpoint": str(output_dir / "final"),
            "episodes_per_s": completions / rates["train_runtime"], "tokens_per_s": rates["tokens_per_s"],
            "wall_s": time.time() - started, "resumed_from": str(resume_from) if resume_from else None,
            "precision": precision, "lora": "qlora" if cfg.qlora else "lora" if cfg.lora else None,
            "plot": str(plot), "fingerprint": job.fingerprint,
        }
    return publish_final(trainer, tmp, metrics, cfg.keep_checkpoints)


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0


def plot_grpo(path: Path, log_history: Sequence[dict]) -> Path:
    from instructflow.tasks.plots import plot_lines

    return plot_lines(path, "GRPO: reward of the sampled completions and KL to the SFT model",
                      {"reward": series(log_history, "reward"), "kl": series(log_history, "kl")},
                      xlabel="optimizer step")


# ----------------------------------------------------------------------------------------------
# `accelerate launch ... -m instructflow.models.grpo --job job.json` (models/launch.py)

def main(argv: Sequence[str] | None = None) -> int:
    """`python -m instructflow.models.grpo --job FILE`: what every rank of a launch runs."""
    return job_main("grpo", argv, GRPOInputError)


if __name__ == "__main__":
    sys.exit(main())

"""Supervised fine-tuning recipe (TRL SFTTrainer) for the Llama actor: the `sft` config section in, a plain
HF model dir out.

Read top to bottom, `train_sft` does:

  1. check the rows and the section (one-line `SFTInputError`s that name the row, field or key),
  2. return the stored metrics if `output_dir/final` is already complete for the same job,
  3. load tokenizer (pad != eos) and model (fp32 weights; bf16/fp16 autocast on GPU; optional LoRA/QLoRA;
     the section's attention kernel and RoPE scaling),
  4. measure the held-out loss before training (stored, so a resumed run reports the original value),
  5. train, resuming from the newest complete `output_dir/checkpoints/checkpoint-N` if there is one,
  6. save `output_dir/final` (LoRA merged into a plain Llama) atomically, with `metrics.json` and `loss.png`.

Data: `{"prompt", "completion"}` rows (see `instructflow.tasks.sft_data.to_prompt_completion`); the loss
is on completion tokens only (TRL's default for prompt/completion data).

Truncation: a prompt+completion longer than `max_length` tokens is cut at the end (TRL "keep_start") and
counted in `truncated_examples`; a row whose prompt alone fills `max_length` has no completion token left,
TRL drops it, and it is counted in `dropped_examples` too.

Packing: `packing=True` uses TRL's "bfd" strategy (best-fit-decreasing bins, no example split across
bins, padding-free batches with per-example position ids). TRL warns that only FlashAttention keeps
packed examples apart, but transformers 5.x (masking_utils.find_packed_sequence_indices) derives a
block-diagonal causal mask from the position-id resets for sdpa and eager attention as well, whenever
no attention mask and no KV cache are passed, which is how TRL trains and evaluates. So bfd is exact with
every `attn_implementation` offered: flash_attention_2 by its varlen kernel (it reads the same position-id
resets), sdpa and eager by that mask. Tests: `tests/test_sft.py` (sdpa, LoRA) and
`tests/test_long_sequences.py` (each of tasks/config.PACKING_EXACT this machine can run) check the packed
eval loss against a per-example loss computed by hand, on a model whose loss visibly changes when examples
leak. The choice made: refuse rather than warn, at config load (SFTConfig's rule: packing needs an
implementation in PACKING_EXACT), because a packed run whose examples attend to each other trains on the
wrong context without failing; none of the offered implementations is refused today, so the rule only keeps
a future choice out until a test shows it exact. ("wrapped" packing, which cuts examples and lets them
attend to each other, is never used.) With packing, `batch_size` counts packed rows of up to `max_length`
tokens, so a step sees more examples than without, and far fewer pad tokens are computed
(`tests/test_long_sequences.py` counts them). Cost: a padding-free batch is one row of batch_size x
max_length tokens; FlashAttention's varlen kernel skips the masked blocks, sdpa/eager compute them and
throw them away, so without flash-attn packing is exact but rarely faster (bench/sft_throughput.py measured
0.9x on this CPU with 18% padding in the seed data).

Long sequences: the section's `attn_implementation` and RoPE scaling (`rope_scaling_type`, `rope_scaling_factor`)
apply to the model loaded and to the config.json saved (recipe_io.model_kwargs), so `max_length` may exceed
the model's `max_position_embeddings` by up to the factor (position interpolation).

Throughput: `tokens_seen` counts real (non-pad) input tokens, prompts included, over all ranks and
resumed sessions; `tokens_per_s` is this session's tokens over this session's training time.

Empty eval set: we evaluate on the training rows instead and say so with `eval_on_train: True`.

Distributed: the same function runs in-process and under
`accelerate launch --config_file models/accelerate/ddp.yaml -m instructflow.models.sft --job job.json`,
where every rank runs it and only the main rank writes files (models/launch.py `run_recipe` picks one
as `launcher` says; the job file holds train_sft's arguments, its section validated as a config file is).

Checkpoints, resume, the run record and the final dir: models/recipe_io.py (shared with reward and PPO).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from instructflow.models.launch import job_main
from instructflow.models.recipe_io import (ProgressCallback, ReportSteps, StepCallback, drop_printer, ensure_pad,
                                           hidden_log_lines, is_main_rank, load_causal_lm, lora_config, publish_final,
                                           save_policy, series, session_rates, start_job, trained_tokens, trainer_args,
                                           update_run)
from instructflow.tasks.config import SFTConfig
from instructflow.tasks.library_output import quiet_progress_bars


class SFTInputError(ValueError):
    """Bad rows or settings, reported in one line before any training starts."""


# ----------------------------------------------------------------------------------------------
# The recipe

def count_truncated(tokenizer, rows: Sequence[Mapping[str, str]], max_length: int) -> tuple[int, int]:
    """(rows longer than max_length, rows whose prompt alone fills it), tokenized the way TRL does."""
    eos = tokenizer.eos_token or ""
    truncated = dropped = 0
    for row in rows:
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        full = len(tokenizer(text=row["prompt"] + completion)["input_ids"])
        prompt = len(tokenizer(text=row["prompt"])["input_ids"])
        truncated += full > max_length
        dropped += prompt >= max_length
    return truncated, dropped


def train_sft(train: Sequence[dict], eval: Sequence[dict], cfg: SFTConfig, base_model: Path, output_dir: Path,
              on_step: StepCallback | None = None, on_progress: ProgressCallback | None = None) -> dict:
    """Fine-tune `base_model` on prompt/completion rows with the `sft` section `cfg`; returns metrics
    (also in output_dir/final/metrics.json).

    `on_step(step, values)` receives every log entry (loss, learning_rate, grad_norm, eval_loss, ...);
    `on_progress(step, max_steps)` is called after every optimizer step. Rerunning with the same
    output_dir resumes from the last checkpoint, or returns the stored metrics once final/ exists.
    """
    started = time.time()
    # 1-2. inputs (rows, models, machine); already done? else start, or resume from the newest complete checkpoint
    job = start_job(train, eval, ("prompt", "completion"), cfg, {"base_model": base_model}, output_dir,
                    SFTInputError, empty="nothing to fine-tune on")
    if job.done is not None:
        return job.done
    train_rows, eval_rows, eval_on_train, base_model, output_dir, precision = job[:6]
    run, resume_from = job.run, job.resume_from

    # 3. tokenizer, model, data
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig as TRLSFTConfig, SFTTrainer

    quiet_progress_bars()
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = load_causal_lm(base_model, cfg, precision)
    ensure_pad(tokenizer, model)
    truncated, dropped = 0, 0
    for name, rows in [("train", train_rows)] + ([] if eval_on_train else [("eval", eval_rows)]):
        cut, lost = count_truncated(tokenizer, rows, cfg.max_length)
        if lost == len(rows):
            raise SFTInputError(f"every {name} prompt is >= max_length={cfg.max_length} tokens: no completion "
                                "token would be left; raise max_length")
        truncated, dropped = truncated + cut, dropped + lost

    config = TRLSFTConfig(
        **trainer_args(cfg, output_dir / "checkpoints", precision),
        max_length=cfg.max_length,
        packing=cfg.packing,
        packing_strategy="bfd",          # exact with every attn_implementation offered (module docstring)
        completion_only_loss=True,
        dataset_num_proc=None,
        include_num_input_tokens_seen="non_padding",
    )
    peft_config = lora_config(cfg, "CAUSAL_LM") if (cfg.lora or cfg.qlora) else None
    # TRL warns that bfd packing needs FlashAttention; on transformers 5.x sdpa/eager are exact too (tested)
    with hidden_log_lines("trl.trainer.sft_trainer", "Flash Attention variant"):
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(train_rows),
                             eval_dataset=Dataset.from_list(eval_rows), processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[ReportSteps(on_step, on_progress)])
    drop_printer(trainer)

    # 4. held-out loss before training (measured once per job, kept across resumes)
    if "eval_loss_before" not in run:
        run = update_run(output_dir, run, eval_loss_before=trainer.evaluate()["eval_loss"])

    # 5. train (resume_from_checkpoint restores weights, optimizer, scheduler, RNG and step)
    tokens_before = trained_tokens(resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    at_end = [e["eval_loss"] for e in trainer.state.log_history
              if "eval_loss" in e and e.get("step") == trainer.state.global_step]
    # the periodic eval may already have run at the final step; otherwise evaluate once more
    eval_loss_after = float(at_end[-1] if at_end else trainer.evaluate()["eval_loss"])
    train_losses = series(trainer.state.log_history, "loss")[1]

    # 6. final model (LoRA merged into a fresh unquantized base), metrics, plot
    tmp = save_policy(trainer, job, tokenizer, lora=peft_config is not None)
    metrics: dict[str, Any] = {}
    if is_main_rank():
        rates = session_rates(trainer, result, tokens_before)
        plot = plot_loss(output_dir / "loss.png", trainer.state.log_history, run["eval_loss_before"])
        metrics = {
            "train_examples": len(train_rows), "eval_examples": 0 if eval_on_train else len(eval_rows),
            "eval_on_train": eval_on_train,
            "eval_loss_before": float(run["eval_loss_before"]), "eval_loss_after": eval_loss_after,
            "train_loss_last": train_losses[-1] if train_losses else None,
            "steps": int(trainer.state.global_step),
            "checkpoint": str(output_dir / "final"), "tokens_seen": rates["tokens_seen"],
            "tokens_per_s": rates["tokens_per_s"],
            "wall_s": time.time() - started,
            "resumed_from": str(resume_from) if resume_from else None,
            "truncated_examples": truncated, "dropped_examples": dropped,
            "precision": precision, "packing": "bfd" if cfg.packing else None,
            "lora": "qlora" if cfg.qlora else "lora" if cfg.lora else None,
            "plot": str(plot), "fingerprint": job.fingerprint,
        }
    return publish_final(trainer, tmp, metrics, cfg.keep_checkpoints)


def plot_loss(path: Path, log_history: Sequence[Mapping[str, Any]], eval_loss_before: float) -> Path:
    from instructflow.tasks.plots import plot_lines

    eval_steps, eval_losses = series(log_history, "eval_loss")
    return plot_lines(path, "SFT loss (completion tokens)",
                      {"train": series(log_history, "loss"),
                       "held-out": ([0.0] + eval_steps, [eval_loss_before] + eval_losses)},
                      xlabel="step", ylabel="cross-entropy")


# ----------------------------------------------------------------------------------------------
# `accelerate launch ... -m instructflow.models.sft --job job.json` (models/launch.py)

def main(argv: Sequence[str] | None = None) -> int:
    """`python -m instructflow.models.sft --job FILE`: what every rank of a launch runs."""
    return job_main("sft", argv, SFTInputError)


if __name__ == "__main__":
    sys.exit(main())

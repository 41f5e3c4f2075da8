"""Supervised fine-tuning recipe (TRL SFTTrainer) for the Llama actor: settings in, a plain HF model dir out.

Read top to bottom, `train_sft` does:

  1. check the rows and settings (one-line `SFTInputError`s that name the row and field),
  2. return the stored metrics if `output_dir/final` is already complete for the same job,
  3. load tokenizer (pad != eos) and model (fp32 weights; bf16/fp16 autocast on GPU; optional LoRA/QLoRA),
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
no attention mask and no KV cache are passed, which is how TRL trains and evaluates. So bfd is exact on
CPU and on GPUs without flash-attn: `tests/test_sft.py` checks the packed eval loss against a per-example
loss computed by hand, on a model whose loss visibly changes when examples leak. ("wrapped" packing, which cuts
examples and lets them attend to each other, is never used.) With packing, `batch_size` counts packed
rows of up to `max_length` tokens, so a step sees more examples than without. Cost: a padding-free
batch is one row of batch_size x max_length tokens; FlashAttention's varlen kernel skips the masked
blocks, sdpa/eager compute them and throw them away, so without flash-attn packing is exact but rarely
faster (bench/sft_throughput.py measured 0.9x on this CPU with 18% padding in the seed data).

Throughput: `tokens_seen` counts real (non-pad) input tokens, prompts included, over all ranks and
resumed sessions; `tokens_per_s` is this session's tokens over this session's training time.

Empty eval set: we evaluate on the training rows instead and say so with `eval_on_train: True`.

Distributed: the same function runs in-process (Prefect calls it directly) and under
`accelerate launch --config_file models/accelerate/ddp.yaml -m instructflow.models.sft --job job.json`,
where every rank runs it and only the main rank writes files.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from transformers import TrainerCallback

StepCallback = Callable[[int, dict[str, float]], None]
ProgressCallback = Callable[[int, int], None]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # never lm_head
RUN_FILE = "run.json"          # job fingerprint + values measured before training, for resumes
METRICS_FILE = "metrics.json"  # written last into final/: its presence marks a complete result


@dataclass
class SFTSettings:
    base_model: Path
    output_dir: Path
    style: str = "alpaca"              # recorded only: rows arrive already formatted
    max_length: int = 512
    packing: bool = False
    epochs: float = 1.0
    max_steps: int = -1                # > 0 overrides epochs
    learning_rate: float = 2e-5
    batch_size: int = 4                # per device
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    qlora: bool = False                # 4-bit NF4 base + LoRA; CUDA + bitsandbytes only
    gradient_checkpointing: bool = False
    precision: str = "auto"            # auto: bf16 if the GPU supports it, else fp16 on GPU, fp32 on CPU
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 1
    seed: int = 42
    save_total_limit: int = 2


class SFTInputError(ValueError):
    """Bad rows or settings, reported in one line before any training starts."""


# ----------------------------------------------------------------------------------------------
# Helpers shared with models/reward.py

def check_rows(rows: Sequence[Mapping[str, Any]], name: str, fields: Sequence[str],
               error: type[ValueError]) -> list[dict[str, str]]:
    """Plain dicts with exactly `fields`, each a string; anything else names the row and field."""
    checked = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise error(f"{name}[{i}]: expected a dict with {', '.join(fields)}, got {type(row).__name__}")
        for field in fields:
            if field not in row:
                raise error(f"{name}[{i}]: missing field {field!r}")
            if not isinstance(row[field], str):
                raise error(f"{name}[{i}].{field}: expected a string, got {type(row[field]).__name__}")
        checked.append({field: row[field] for field in fields})
    return checked


def check_model_dir(path: Path, what: str, error: type[ValueError]) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise error(f"{what} {path} does not exist")
    if not (path / "config.json").is_file():
        raise error(f"{what} {path} has no config.json (expected a model saved with save_pretrained)")
    return path


def resolve_precision(precision: str, error: type[ValueError]) -> str:
    """'fp32' | 'bf16' | 'fp16'. Weights stay fp32; bf16/fp16 mean autocast (the Trainer's mixed precision)."""
    import torch

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise error(f"precision={precision!r}: expected auto, fp32, bf16 or fp16")
    if precision == "auto":
        if not torch.cuda.is_available():
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not torch.cuda.is_available():
        raise error("precision='fp16' needs a CUDA GPU (use fp32 or bf16 on CPU)")
    return precision


def fingerprint(settings: Any, *datasets: Sequence[Mapping[str, str]]) -> str:
    """What makes two calls the same job: every setting but output_dir, and the data."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()
              if k != "output_dir"}
    blob = json.dumps([config, [list(d) for d in datasets]], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write then rename, so a kill mid-write never leaves a truncated file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def finished_metrics(output_dir: Path, job: str, error: type[ValueError]) -> dict[str, Any] | None:
    """The stored metrics if `output_dir/final` is complete; an error if it belongs to another job."""
    metrics = read_json(Path(output_dir) / "final" / METRICS_FILE)
    if metrics is None:
        return None
    if metrics.get("fingerprint") != job:
        raise error(f"{output_dir}/final was trained with other settings or data; use a new output_dir or delete it")
    return {**metrics, "reused": True}


def is_main_rank() -> bool:
    """Rank 0 of a torchrun / accelerate launch job, or a plain process. Read from the launcher's
    environment because it is needed before the Trainer (and its Accelerator) exists."""
    return int(os.environ.get("RANK", "0")) == 0


def start_or_resume(output_dir: Path, job: str, error: type[ValueError]) -> tuple[dict[str, Any], Path | None]:
    """(the run record, the checkpoint to resume from). Checkpoints killed mid-save are deleted.

    HF writes trainer_state.json last into checkpoint-N, so a dir without it is a partial save.
    Call on every rank; only the main rank deletes or writes (the others decide from the same listing).
    """
    output_dir = Path(output_dir)
    run = read_json(output_dir / RUN_FILE)
    if run is not None and run.get("fingerprint") != job:
        raise error(f"{output_dir} holds a run with other settings or data; use a new output_dir or delete it")
    checkpoints = sorted((p for p in (output_dir / "checkpoints").glob("checkpoint-*")
                          if p.is_dir() and p.name.split("-")[-1].isdigit()),
                         key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    if complete and run is None:  # checkpoints without a run record: not ours to continue
        raise error(f"{output_dir}/checkpoints has checkpoints but no {RUN_FILE}; use a new output_dir or delete it")
    if is_main_rank():
        output_dir.mkdir(parents=True, exist_ok=True)
        for partial in set(checkpoints) - set(complete):
            shutil.rmtree(partial, ignore_errors=True)
        if run is None:
            write_json(output_dir / RUN_FILE, {"fingerprint": job})
    return run or {"fingerprint": job}, (complete[-1] if complete else None)


def update_run(output_dir: Path, run: dict[str, Any], **values: Any) -> dict[str, Any]:
    run = {**run, **values}
    if is_main_rank():
        write_json(Path(output_dir) / RUN_FILE, run)
    return run


def publish_final(tmp: Path, final: Path, metrics: Mapping[str, Any]) -> None:
    """metrics.json goes in last, then the dir is renamed into place (main rank only)."""
    write_json(tmp / METRICS_FILE, metrics)
    if final.exists():
        shutil.rmtree(final)  # an older incomplete result (no metrics.json)
    os.rename(tmp, final)


def trained_tokens(checkpoint: Path | None) -> int:
    state = read_json(checkpoint / "trainer_state.json") if checkpoint else None
    return int((state or {}).get("num_input_tokens_seen", 0))


def ensure_pad(tokenizer, model) -> None:
    """Pad must differ from eos (else padding masks the real end of a reply); resize if a token was added."""
    from instructflow.models.bundled import ensure_distinct_pad

    if ensure_distinct_pad(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def lora_config(settings: Any, task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=LORA_TARGETS, bias="none", task_type=task_type)


def series(log_history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(float(e["step"]), float(e[key])) for e in log_history if key in e and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


class ReportSteps(TrainerCallback):
    """Forward every Trainer log entry to `on_step(step, values)` and each step to `on_progress(step, total)`."""

    def __init__(self, on_step: StepCallback | None, on_progress: ProgressCallback | None = None):
        self.on_step = on_step
        self.on_progress = on_progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.on_step is not None and state.is_world_process_zero and logs:
            values = {k: float(v) for k, v in logs.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            if values:
                self.on_step(state.global_step, values)

    def on_step_end(self, args, state, control, **kwargs):
        if self.on_progress is not None and state.is_world_process_zero:
            self.on_progress(state.global_step, state.max_steps)


def quiet_progress_bars() -> None:
    """No tqdm bars from datasets.map / weight loading / saving: they flood Prefect and CI logs."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


class HideFlashAttentionPackingWarnings(logging.Filter):
    """TRL warns that bfd packing needs FlashAttention; on transformers 5.x sdpa/eager are exact too (tested)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Flash Attention variant" not in record.getMessage()


def drop_printer(trainer) -> None:
    """The caller gets every log entry through on_step; the Trainer need not print them too."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


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


def load_model(settings: SFTSettings, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    if not settings.qlora:
        return AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=torch.float32)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return AutoModelForCausalLM.from_pretrained(settings.base_model, quantization_config=quantization,
                                                dtype=torch.float32)


def save_merged_lora(settings: SFTSettings, adapter_dir: Path, out_dir: Path, tokenizer) -> None:
    """Reload the base unquantized, merge the adapter, save a plain Llama (downstream never sees peft)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=torch.float32)
    if base.get_input_embeddings().num_embeddings < len(tokenizer):
        base.resize_token_embeddings(len(tokenizer))
    base.config.pad_token_id = tokenizer.pad_token_id
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def train_sft(train: Sequence[dict], eval: Sequence[dict], settings: SFTSettings,
              on_step: StepCallback | None = None, on_progress: ProgressCallback | None = None) -> dict:
    """Fine-tune `settings.base_model` on prompt/completion rows; returns metrics (also in final/metrics.json).

    `on_step(step, values)` receives every log entry (loss, learning_rate, grad_norm, eval_loss, ...);
    `on_progress(step, max_steps)` is called after every optimizer step. Rerunning with the same
    output_dir resumes from the last checkpoint, or returns the stored metrics once final/ exists.
    """
    started = time.time()
    # 1. inputs
    train_rows = check_rows(train, "train", ("prompt", "completion"), SFTInputError)
    eval_rows = check_rows(eval, "eval", ("prompt", "completion"), SFTInputError)
    if not train_rows:
        raise SFTInputError("train set is empty: nothing to fine-tune on")
    settings = dataclasses.replace(settings, base_model=check_model_dir(settings.base_model, "base_model",
                                                                         SFTInputError),
                                   output_dir=Path(settings.output_dir).expanduser().resolve())
    if settings.max_length < 8:
        raise SFTInputError(f"max_length={settings.max_length} is too small (need >= 8 tokens)")
    if settings.batch_size < 1 or settings.grad_accum < 1:
        raise SFTInputError(f"batch_size={settings.batch_size} and grad_accum={settings.grad_accum} must be >= 1")
    if not 0.0 <= settings.warmup_ratio < 1.0:
        raise SFTInputError(f"warmup_ratio={settings.warmup_ratio} must be in [0, 1)")
    if settings.max_steps <= 0 and settings.epochs <= 0:
        raise SFTInputError(f"nothing to train: max_steps={settings.max_steps} and epochs={settings.epochs}")
    if settings.qlora and not (importlib.util.find_spec("bitsandbytes") and _cuda_available()):
        raise SFTInputError("qlora=True needs a CUDA GPU and `pip install bitsandbytes`; use lora=True on this machine")
    precision = resolve_precision(settings.precision, SFTInputError)
    eval_on_train = not eval_rows  # documented fallback: in-sample loss, flagged in the metrics
    if eval_on_train:
        eval_rows = train_rows
    job = fingerprint(settings, train_rows, eval_rows)

    # 2. already done?
    done = finished_metrics(settings.output_dir, job, SFTInputError)
    if done is not None:
        return done
    run, resume_from = start_or_resume(settings.output_dir, job, SFTInputError)

    # 3. tokenizer, model, data
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    quiet_progress_bars()
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
    model = load_model(settings, precision)
    ensure_pad(tokenizer, model)
    truncated, dropped = 0, 0
    for name, rows in [("train", train_rows)] + ([] if eval_on_train else [("eval", eval_rows)]):
        cut, lost = count_truncated(tokenizer, rows, settings.max_length)
        if lost == len(rows):
            raise SFTInputError(f"every {name} prompt is >= max_length={settings.max_length} tokens: no completion "
                                "token would be left; raise max_length")
        truncated, dropped = truncated + cut, dropped + lost

    checkpoints_dir = settings.output_dir / "checkpoints"
    config = SFTConfig(
        output_dir=str(checkpoints_dir),
        # data
        max_length=settings.max_length,
        packing=settings.packing,
        packing_strategy="bfd",          # exact on sdpa/eager too (see module docstring)
        completion_only_loss=True,
        dataset_num_proc=None,
        # optimisation
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        activation_checkpointing=settings.gradient_checkpointing,  # the new name; TRL defaults the old one to True
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also makes `torchrun` on CPU real (gloo) data parallelism
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=settings.seed,
        # bookkeeping
        eval_strategy="steps",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        logging_steps=settings.logging_steps,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
    )
    peft_config = lora_config(settings, "CAUSAL_LM") if (settings.lora or settings.qlora) else None
    trl_log, hide = logging.getLogger("trl.trainer.sft_trainer"), HideFlashAttentionPackingWarnings()
    trl_log.addFilter(hide)
    try:
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(train_rows),
                             eval_dataset=Dataset.from_list(eval_rows), processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[ReportSteps(on_step, on_progress)])
    finally:
        trl_log.removeFilter(hide)
    drop_printer(trainer)

    # 4. held-out loss before training (measured once per job, kept across resumes)
    if "eval_loss_before" not in run:
        run = update_run(settings.output_dir, run, eval_loss_before=trainer.evaluate()["eval_loss"])

    # 5. train (resume_from_checkpoint restores weights, optimizer, scheduler, RNG and step)
    tokens_before = trained_tokens(resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    at_end = [e["eval_loss"] for e in trainer.state.log_history
              if "eval_loss" in e and e.get("step") == trainer.state.global_step]
    # the periodic eval may already have run at the final step; otherwise evaluate once more
    eval_loss_after = float(at_end[-1] if at_end else trainer.evaluate()["eval_loss"])
    train_losses = series(trainer.state.log_history, "loss")[1]

    # 6. final model, metrics, plot
    final = settings.output_dir / "final"
    tmp = settings.output_dir / ".final.tmp"
    adapter_dir = settings.output_dir / ".adapter.tmp"
    main_rank = is_main_rank()
    if main_rank:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(adapter_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(adapter_dir if peft_config else tmp))  # every rank: gathers sharded weights
    metrics: dict[str, Any] = {}
    if main_rank:
        if peft_config:
            save_merged_lora(settings, adapter_dir, tmp, tokenizer)
            shutil.rmtree(adapter_dir, ignore_errors=True)
        tokens_seen = int(trainer.state.num_input_tokens_seen)
        runtime = float(result.metrics.get("train_runtime", 0.0)) or 1e-9
        plot = plot_loss(settings.output_dir / "loss.png", trainer.state.log_history, run["eval_loss_before"])
        metrics = {
            "train_examples": len(train_rows), "eval_examples": 0 if eval_on_train else len(eval_rows),
            "eval_on_train": eval_on_train,
            "eval_loss_before": float(run["eval_loss_before"]), "eval_loss_after": eval_loss_after,
            "train_loss_last": train_losses[-1] if train_losses else None,
            "steps": int(trainer.state.global_step),
            "checkpoint": str(final), "tokens_seen": tokens_seen,
            "tokens_per_s": (tokens_seen - tokens_before) / runtime,
            "wall_s": time.time() - started,
            "resumed_from": str(resume_from) if resume_from else None,
            "truncated_examples": truncated, "dropped_examples": dropped,
            "precision": precision, "packing": "bfd" if settings.packing else None,
            "lora": "qlora" if settings.qlora else "lora" if settings.lora else None,
            "plot": str(plot), "fingerprint": job,
        }
        publish_final(tmp, final, metrics)
    trainer.accelerator.wait_for_everyone()
    return metrics if main_rank else {**(read_json(final / METRICS_FILE) or {})}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def plot_loss(path: Path, log_history: Sequence[Mapping[str, Any]], eval_loss_before: float) -> Path:
    from instructflow.tasks.plots import plot_lines

    eval_steps, eval_losses = series(log_history, "eval_loss")
    return plot_lines(path, "SFT loss (completion tokens)",
                      {"train": series(log_history, "loss"),
                       "held-out": ([0.0] + eval_steps, [eval_loss_before] + eval_losses)},
                      xlabel="step", ylabel="cross-entropy")


# ----------------------------------------------------------------------------------------------
# `accelerate launch ... -m instructflow.models.sft --job job.json`

def settings_from_dict(cls: type, values: Mapping[str, Any]):
    """A settings dataclass from JSON: unknown keys are an error, Path fields become Paths."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SFTInputError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}")
    return cls(**{k: Path(v) if fields[k].type in ("Path", Path) else v for k, v in values.items()})


def write_job(path: Path, train: Sequence[dict], eval: Sequence[dict], settings: SFTSettings) -> Path:
    """The JSON file `main` reads: what a caller writes before `accelerate launch`."""
    job = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
           "train": list(train), "eval": list(eval)}
    Path(path).write_text(json.dumps(job, ensure_ascii=False))
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructflow.models.sft",
                                     description="SFT from a job file (settings + prompt/completion rows).")
    parser.add_argument("--job", type=Path, required=True,
                        help='JSON {"settings": {SFTSettings fields}, "train": [rows], "eval": [rows]}')
    args = parser.parse_args(argv)
    job = read_json(args.job)
    if job is None or "settings" not in job or "train" not in job:
        raise SFTInputError(f"{args.job}: expected a JSON object with 'settings' and 'train' (and 'eval')")
    metrics = train_sft(job["train"], job.get("eval", []), settings_from_dict(SFTSettings, job["settings"]))
    if is_main_rank():
        print(json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the training recipes (models/sft.py, reward.py, ppo.py, dpo.py, grpo.py) share: checking inputs,
the run record and resume, the job fingerprint, the one precision rule, the one model loader (`load_model`:
attention kernel and RoPE scaling), the one LoRA builder, the TrainingArguments every Trainer-based recipe
sets from its section, and the one step-report callback.

A recipe's output_dir holds:

    run.json            the job fingerprint + values measured before training (for resumes)
    checkpoints/        the Trainer's checkpoint-N dirs (SFT, reward; PPO keeps its own rounds/)
    final/              the result; `metrics.json` is written last, then the dir is renamed into place

checkpoints/ and rounds/ are resume state: once final/ is in place `drop_resume_state` removes them
(unless the section's `keep_checkpoints`), so a finished run keeps its result, run.json and plots; a
rerun of the same job returns final/metrics.json without training.

Every directory a recipe (or models/bundled.py) publishes goes through models/files.py: built under a
temp name next to its target, then renamed, so a kill mid-write never leaves a dir that looks finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from transformers import TrainerCallback

from instructflow.models.files import read_json, replace_dir, write_dir_atomically, write_json
from instructflow.tasks.config import SAVE_TOTAL_LIMIT, TrainerConfig, TrainingConfig, result_settings

StepCallback = Callable[[int, dict[str, float]], None]
ProgressCallback = Callable[[int, int], None]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # never lm_head
LOGGING_STEPS = 1              # every optimizer step reaches on_step
RUN_FILE = "run.json"          # job fingerprint + values measured before training, for resumes
METRICS_FILE = "metrics.json"  # written last into final/: its presence marks a complete result
RESUME_STATE = ("checkpoints", "rounds")  # what only a resume reads (Trainer checkpoints, PPO rounds)


# ----------------------------------------------------------------------------------------------
# Inputs

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


def resolve_precision(precision: str, error: type[ValueError], fp16_ok: bool = True) -> str:
    """'fp32' | 'bf16' | 'fp16' on this machine. Weights stay fp32; bf16/fp16 mean autocast.

    auto: bf16 on a GPU that supports it, else fp16 on a GPU (fp32 where the caller has no fp16
    loss scaling, `fp16_ok=False`: PPO), fp32 on CPU. The values are checked when the config loads;
    what depends on the machine (fp16 needs CUDA) can only be checked here.
    """
    import torch

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise error(f"precision={precision!r}: expected auto, fp32, bf16 or fp16")
    if precision == "auto":
        if not torch.cuda.is_available():
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16" if fp16_ok else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise error("precision='fp16' needs a CUDA GPU (use fp32 or bf16 on CPU)")
    return precision


class Job(NamedTuple):
    """Steps 1 and 2 of every Trainer-based recipe (sft, reward, dpo, grpo), checked: see `start_job`."""
    train: list[dict[str, str]]
    eval: list[dict[str, str]]       # the train rows when no eval rows were given
    eval_on_train: bool              # that documented fallback: in-sample numbers, flagged in the metrics
    model_dir: Path                  # the model trained (the first input model), absolute
    output_dir: Path                 # absolute
    precision: str                   # resolved for this machine
    fingerprint: str                 # of (section, input models, rows)
    done: dict[str, Any] | None      # the stored metrics when output_dir/final is complete for this job
    run: dict[str, Any]              # the run record (values measured before training, for resumes)
    resume_from: Path | None         # the newest complete checkpoint
    section: TrainingConfig          # the config section the job trains with


def start_job(train: Sequence[Mapping[str, Any]], eval: Sequence[Mapping[str, Any]], fields: Sequence[str],
              cfg: TrainingConfig, models: Mapping[str, Path], output_dir: Path, error: type[ValueError],
              empty: str) -> Job:
    """Rows (each a dict of `fields`; `empty` says why no train rows is an error), the precision and what
    the machine must have (`check_machine`), the input models (name -> dir; the first is the one trained)
    and whether the section's RoPE scaling applies to them; then whether this job is already done, or where
    it resumes. The section checked itself when it was built."""
    train_rows = check_rows(train, "train", fields, error)
    eval_rows = check_rows(eval, "eval", fields, error)
    if not train_rows:
        raise error(f"train set is empty: {empty}")
    precision = resolve_precision(cfg.precision, error)
    check_machine(cfg, precision, error)
    models = {name: check_model_dir(path, name, error) for name, path in models.items()}
    for path in models.values():
        model_kwargs(path, cfg, error)
    eval_rows, eval_on_train = eval_rows or train_rows, not eval_rows
    job = fingerprint(cfg, models, train_rows, eval_rows)
    output_dir = Path(output_dir).expanduser().resolve()
    done, run, resume_from = start_or_resume(output_dir, job, error)
    if done is not None and not cfg.keep_checkpoints and is_main_rank():
        drop_resume_state(output_dir)  # left by a run killed after publishing final/
    return Job(train_rows, eval_rows, eval_on_train, next(iter(models.values())), output_dir, precision, job, done,
               run, resume_from, cfg)


def check_machine(section: TrainingConfig, precision: str, error: type[ValueError]) -> None:
    """What only the machine a recipe runs on can refuse, one line each (the section checked the rest when it
    was built): qlora needs CUDA + bitsandbytes; flash_attention_2 needs CUDA + flash-attn and a 16-bit
    `precision` (as resolved here: auto is fp32 on a GPU without bf16 for PPO)."""
    if section.qlora and not (importlib.util.find_spec("bitsandbytes") and _cuda_available()):
        raise error("qlora=True needs a CUDA GPU and `pip install bitsandbytes`; use lora=True on this machine")
    if section.attn_implementation == "flash_attention_2":
        missing = [what for what, there in (("no CUDA GPU", _cuda_available()),
                                            ("no flash-attn package", importlib.util.find_spec("flash_attn")))
                   if not there]
        if missing:
            raise error(f"{section.SECTION}.attn_implementation = 'flash_attention_2' needs a CUDA GPU and "
                        f"`pip install flash-attn`, this machine has {' and '.join(missing)}: use 'sdpa' here")
        if precision == "fp32":
            raise error(f"{section.SECTION}.attn_implementation = 'flash_attention_2' runs in bf16 or fp16, but "
                        "precision resolves to fp32 on this GPU: use 'sdpa' here, or precision = 'bf16'")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def fingerprint(section: Any, paths: Mapping[str, Path], *datasets: Sequence[Mapping[str, str]]) -> str:
    """What makes two calls the same job: the config section, the input models and the data (not output_dir)."""
    config = {**result_settings(section), **{k: str(v) for k, v in paths.items()}}
    blob = json.dumps([config, [list(d) for d in datasets]], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Run record, resume, final/

def rank() -> int:
    """This process's rank in a torchrun / accelerate launch job (0 in a plain process). Read from the
    launcher's environment because it is needed before the Trainer (and its Accelerator) exists."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The processes of this torchrun / accelerate launch job (1 in a plain process); every recipe reports it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def loaded_by_one_rank():
    """Around a model that one rank loads alone while a DeepSpeed ZeRO-3 Trainer exists (reward's held-out
    scores of final/, LoRA's merge): transformers would otherwise build it inside deepspeed.zero.Init, whose
    collectives the other ranks never join. A no-op without DeepSpeed (not run here: no GPU, no DeepSpeed)."""
    from transformers.integrations import deepspeed

    held = deepspeed._hf_deepspeed_config_weak_ref  # set by TrainingArguments under a DeepSpeed launch
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = held


def is_main_rank() -> bool:
    """Rank 0 of a launch, or a plain process: the one that writes checkpoints, final/ and metrics."""
    return rank() == 0


def finished_metrics(output_dir: Path, job: str, error: type[ValueError]) -> dict[str, Any] | None:
    """The stored metrics if `output_dir/final` is complete; an error if it belongs to another job."""
    metrics = read_json(Path(output_dir) / "final" / METRICS_FILE)
    if metrics is None:
        return None
    if metrics.get("fingerprint") != job:
        raise error(f"{output_dir}/final was trained with other settings or data; use a new output_dir or delete it")
    return {**metrics, "reused": True}


def start_or_resume(output_dir: Path, job: str,
                    error: type[ValueError]) -> tuple[dict[str, Any] | None, dict[str, Any], Path | None]:
    """(the stored metrics if final/ is already complete for this job, else None; the run record; the
    checkpoint to resume from). Checkpoints killed mid-save are deleted.

    HF writes trainer_state.json last into checkpoint-N, so a dir without it is a partial save.
    Call on every rank; only the main rank deletes or writes (the others decide from the same listing).
    """
    output_dir = Path(output_dir)
    done = finished_metrics(output_dir, job, error)
    if done is not None:
        return done, {}, None
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
    return None, run or {"fingerprint": job}, (complete[-1] if complete else None)


def trained_tokens(checkpoint: Path | None) -> int:
    """Input tokens a Trainer had seen at `checkpoint` (0 for a fresh start): this session's tokens/s subtracts it."""
    state = read_json(checkpoint / "trainer_state.json") if checkpoint else None
    return int((state or {}).get("num_input_tokens_seen", 0))


def update_run(output_dir: Path, run: dict[str, Any], **values: Any) -> dict[str, Any]:
    run = {**run, **values}
    if is_main_rank():
        write_json(Path(output_dir) / RUN_FILE, run)
    return run


def save_trained_model(trainer, output_dir: Path, tokenizer, load_base: Callable[[], Any] | None = None) -> Path:
    """The trained model as a plain HF dir in `output_dir/.final.tmp` (returned); call on every rank.

    With LoRA, pass `load_base` (a fresh base model): the adapter is merged into it, so downstream
    never sees peft. `publish_final` then moves the dir into place.
    """
    tmp, adapter_dir = Path(output_dir) / ".final.tmp", Path(output_dir) / ".adapter.tmp"
    if is_main_rank():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(adapter_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(adapter_dir if load_base else tmp))  # every rank: gathers sharded weights
    if is_main_rank() and load_base is not None:
        with loaded_by_one_rank():
            save_merged_lora(load_base(), adapter_dir, tmp, tokenizer)
        shutil.rmtree(adapter_dir, ignore_errors=True)
    return tmp


def save_policy(trainer, job: "Job", tokenizer, lora: bool) -> Path:
    """`save_trained_model` for a causal LM (sft, dpo, grpo): with LoRA the adapter is merged into a fresh,
    unquantized fp32 copy of the model the job started from."""
    def unquantized_base():
        import torch
        from transformers import AutoModelForCausalLM

        return load_model(AutoModelForCausalLM, job.model_dir, job.section, dtype=torch.float32)

    return save_trained_model(trainer, job.output_dir, tokenizer, unquantized_base if lora else None)


def session_rates(trainer, train_result, tokens_before: int) -> dict[str, float]:
    """{"tokens_seen": real input tokens over every session and rank, "tokens_per_s": this session's tokens
    over this session's training time, "train_runtime": that time}; `tokens_before` from `trained_tokens`
    of the checkpoint it resumed from, read before training (the Trainer may prune that checkpoint)."""
    runtime = float(train_result.metrics.get("train_runtime", 0.0)) or 1e-9
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    return {"tokens_seen": tokens_seen, "tokens_per_s": (tokens_seen - tokens_before) / runtime,
            "train_runtime": runtime}


def publish_final(trainer, tmp: Path, metrics: Mapping[str, Any], keep_checkpoints: bool) -> dict[str, Any]:
    """metrics.json (with `world_size`) goes into `tmp` last, then it becomes `final/`, and the resume state is
    dropped unless `keep_checkpoints` (main rank); every rank returns the metrics."""
    output_dir = Path(tmp).parent
    final = output_dir / "final"
    metrics = {**metrics, "world_size": world_size()}
    if is_main_rank():
        write_json(tmp / METRICS_FILE, metrics)
        replace_dir(tmp, final)
        if not keep_checkpoints:
            drop_resume_state(output_dir)
    trainer.accelerator.wait_for_everyone()
    return dict(metrics) if is_main_rank() else {**(read_json(final / METRICS_FILE) or {})}


def drop_resume_state(output_dir: Path) -> None:
    """Remove what only a resume reads (checkpoints/, rounds/) from a run whose final/ is in place: the one
    place every recipe (sft, reward, dpo, grpo, and PPO's rounds) frees it."""
    for name in RESUME_STATE:
        shutil.rmtree(Path(output_dir) / name, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Models

def ensure_pad(tokenizer, model) -> None:
    """Pad must differ from eos (else padding masks the real end of a reply); resize if a token was added."""
    from instructflow.models.bundled import ensure_distinct_pad

    if ensure_distinct_pad(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def lora_config(section: TrainingConfig, task_type: str):
    """The one LoRA builder of every recipe: rank, alpha and dropout from the section, every linear layer
    of the blocks (never lm_head). task_type SEQ_CLS also trains the score head in full (modules_to_save)."""
    from peft import LoraConfig

    return LoraConfig(r=section.lora_r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
                      target_modules=LORA_TARGETS, bias="none", task_type=task_type)


ROPE_TYPES_REPLACED = ("default", "linear", "dynamic", "yarn")  # a model's RoPE that rope_scaling_type may replace


def model_kwargs(model_dir: Path, section: TrainingConfig, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The from_pretrained keywords of every model a stage runs (`load_model`; TRL's own reference copy gets
    them as `model_init_kwargs`): the section's `attn_implementation` and, with a `rope_scaling_type`, the
    model's `rope_parameters` (transformers 5.x's name for the old `rope_scaling`; the model's `rope_theta`
    kept) with that type and factor. They go into the config, so every config.json a recipe saves carries
    the scaling and whatever loads the result (sampling, evaluate, the teacher server, the next stage) gets it
    from there. `max_position_embeddings` stays the pretrained length: dynamic NTK scales only beyond it and
    yarn reads it as `original_max_position_embeddings`. Set, not compounded: a model already scaled by an
    earlier stage gets the same parameters again. A RoPE the model was pretrained with (llama3, longrope...)
    is not replaced: refused, as is a model without RoPE parameters."""
    kwargs: dict[str, Any] = {"attn_implementation": section.attn_implementation}
    if section.rope_scaling_type == "none":
        return kwargs
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    rope = getattr(config, "rope_parameters", None)
    what = f"{section.SECTION}.rope_scaling_type = {section.rope_scaling_type!r}"
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        raise error(f"{what}: {model_dir} has no single set of RoPE parameters in its config.json to scale")
    if rope.get("rope_type", "default") not in ROPE_TYPES_REPLACED:
        raise error(f"{what}: {model_dir} was built with rope_type {rope['rope_type']!r}, which this would "
                    "replace; keep it with rope_scaling_type = 'none'")
    scaled = {"rope_type": section.rope_scaling_type, "factor": section.rope_scaling_factor,
              "rope_theta": rope["rope_theta"]}
    if "partial_rotary_factor" in rope:
        scaled["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if section.rope_scaling_type == "yarn":
        scaled["original_max_position_embeddings"] = (rope.get("original_max_position_embeddings")
                                                      or config.max_position_embeddings)
    return {**kwargs, "rope_parameters": scaled}


def load_model(auto_class, model_dir: Path, section: TrainingConfig, **kwargs):
    """`auto_class.from_pretrained(model_dir, **kwargs)` with the section's `model_kwargs`: how every recipe
    loads every model it runs, trained or frozen (sft, reward, dpo, grpo and its reward model, ppo's actor,
    critic, reference and reward model), so that all of them see the same positions and attention kernel."""
    return auto_class.from_pretrained(model_dir, **model_kwargs(model_dir, section), **kwargs)


def load_causal_lm(model_dir: Path, section: TrainingConfig, precision: str):
    """A causal LM to train (`load_model`): fp32 weights (bf16/fp16 run as autocast), or with `qlora` a 4-bit
    NF4 base (CUDA + bitsandbytes, checked by `start_job`)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not section.qlora:
        return load_model(AutoModelForCausalLM, model_dir, section, dtype=torch.float32)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return load_model(AutoModelForCausalLM, model_dir, section, quantization_config=quantization, dtype=torch.float32)


def save_merged_lora(base, adapter_dir: Path, out_dir: Path, tokenizer) -> None:
    """Merge the adapter (and any modules_to_save, e.g. a trained score head) into `base`; save a plain model."""
    from peft import PeftModel

    if base.get_input_embeddings().num_embeddings < len(tokenizer):
        base.resize_token_embeddings(len(tokenizer))
    base.config.pad_token_id = tokenizer.pad_token_id
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------
# Trainer plumbing

def trainer_args(section: TrainerConfig, checkpoints_dir: Path, precision: str) -> dict[str, Any]:
    """The TrainingArguments every Trainer-based recipe (sft, reward, dpo, grpo) sets the same way from its section."""
    import torch

    return dict(
        output_dir=str(checkpoints_dir),
        num_train_epochs=section.epochs,
        max_steps=section.max_steps,
        per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.batch_size,
        gradient_accumulation_steps=section.grad_accum,
        learning_rate=section.learning_rate,
        lr_scheduler_type=section.lr_scheduler,
        warmup_steps=section.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        activation_checkpointing=section.gradient_checkpointing,  # the new name; TRL defaults the old one to True
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also makes `torchrun` on CPU real (gloo) data parallelism
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=section.seed,
        train_sampling_strategy="group_by_length" if section.group_by_length else "random",
        eval_strategy="steps",
        eval_steps=section.eval_steps,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        logging_steps=LOGGING_STEPS,
        report_to="none",
        disable_tqdm=True,
    )


def dataset_in(rows: Sequence[Mapping[str, Any]], path: Path, args):
    """`rows` as a Dataset stored in `path` (written once, by the first rank of each machine, while the others
    wait; `args` are the Trainer's arguments), so that every rank's copy lives in the same folder: where TRL's
    DPOTrainer caches the reference log-probs it precomputes on rank 0 for all (an in-memory Dataset's cache is
    a temp dir of each process, which the other ranks never see)."""
    from datasets import Dataset, load_from_disk

    with args.main_process_first(desc=f"storing {path}"):
        if not (Path(path) / "state.json").is_file():
            write_dir_atomically(Path(path), lambda tmp: Dataset.from_list(list(rows)).save_to_disk(str(tmp)))
        return load_from_disk(str(path))


def series(log_history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(float(e["step"]), float(e[key])) for e in log_history if key in e and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


class ReportSteps(TrainerCallback):
    """The one step-report callback of every recipe: each Trainer log entry to `on_step(step, values)`,
    each optimizer step to `on_progress(step, total)`; rank 0 only. Under a launch every rank also prints
    `instructflow: rank R of W: step S (N of M parameters held here)` after each optimizer step.

    Values are the entry's finite numbers; with `names` (ours -> the trainer's key) only those, renamed,
    and an entry holding none of them is skipped (PPO logs one dict per update). `first_step` offsets
    the step for trainers that run in chunks (PPO)."""

    def __init__(self, on_step: StepCallback | None, on_progress: ProgressCallback | None = None,
                 names: Mapping[str, str] | None = None, first_step: int = 0):
        self.on_step, self.on_progress, self.names, self.first_step = on_step, on_progress, names, first_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.on_step is None or not state.is_world_process_zero or not logs:
            return
        if self.names is not None:
            logs = {ours: logs[theirs] for ours, theirs in self.names.items() if theirs in logs}
        values = {k: float(v) for k, v in logs.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if values:
            self.on_step(self.first_step + state.global_step, values)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if world_size() > 1:  # every rank of a launch says what it did, in the launch's log (models/launch.py),
            # as its trainer sees it: "rank 0 of 1" on every process would be processes training alone
            print(f"instructflow: rank {args.process_index} of {args.world_size}: step "
                  f"{self.first_step + state.global_step}{held_here(model)}", flush=True)
        if self.on_progress is not None and state.is_world_process_zero:
            self.on_progress(self.first_step + state.global_step, state.max_steps)


def held_here(model) -> str:
    """What this rank holds of the trained model, as ' (N of M parameters held here)': all of it under DDP, a
    shard under FSDP (DTensors) or DeepSpeed ZeRO-3 (partitions)."""
    if model is None:
        return ""
    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):       # ZeRO-3: the local partition is ds_tensor
            held, total = held + p.ds_tensor.numel(), total + p.ds_numel
        elif hasattr(p, "to_local"):     # FSDP2: a DTensor, numel() is the global size
            held, total = held + p.to_local().numel(), total + p.numel()
        else:
            held, total = held + p.numel(), total + p.numel()
    return f" ({held} of {total} parameters held here)"


def pair_length_grouped(trainer_class):
    """`trainer_class` (TRL's RewardTrainer or DPOTrainer) whose length-grouped samplers (`group_by_length`)
    read each pair's padded width: HF's sampler looks for `input_ids`, but a pair is `chosen_ids` and
    `rejected_ids` (after `prompt_ids` for DPO), padded together to the longer of the two."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    def widths(dataset) -> list[int]:
        prompts = dataset["prompt_ids"] if "prompt_ids" in dataset.column_names else [()] * len(dataset)
        return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, dataset["chosen_ids"], dataset["rejected_ids"])]

    class PairLengthGrouped(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=widths(dataset))

        def _get_eval_sampler(self, eval_dataset):
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_eval_sampler(eval_dataset)
            return LengthGroupedSampler(self.args.eval_batch_size, lengths=widths(eval_dataset),
                                        generator=torch.Generator().manual_seed(self.args.seed))

    return PairLengthGrouped


@contextlib.contextmanager
def hidden_log_lines(logger_name: str, fragment: str):
    """Inside the block, records of the logger `logger_name` whose message holds `fragment` are dropped: a
    library warning that is wrong for how the recipe calls it (each use says why)."""
    class Hide(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return fragment not in record.getMessage()

    logger, hide = logging.getLogger(logger_name), Hide()
    logger.addFilter(hide)
    try:
        yield
    finally:
        logger.removeFilter(hide)


def drop_printer(trainer) -> None:
    """The caller gets every log entry through on_step; the Trainer need not print them too."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

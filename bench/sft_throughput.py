"""Benchmark: SFT training throughput with packed vs padded batches, measured in one run.

    python bench/sft_throughput.py [--model DIR | --tiny] [--steps N] [--warmup N] [--batch-size B]
                                   [--max-length L] [--peak-tflops T]

Data: the bundled seed tasks (every instance), Alpaca-formatted exactly as the SFT stage does.
Both runs use the SFT recipe's trainer setup (TRL SFTTrainer, completion-only loss, chunked CE,
fp32 on CPU / bf16 or fp16 autocast on GPU) and the same model, batch size (rows per step) and
max_length; they differ only in batching:

  padded  one example per row, each batch padded to its longest row;
  packed  TRL "bfd" packing: whole examples best-fit into rows of max_length tokens, padding-free
          (exact: examples do not attend to each other, see models/sft.py).

Expect little or no gain without FlashAttention: a padding-free batch is one row of about
batch_size x max_length tokens, and sdpa/eager compute its full masked attention matrix (the varlen
flash-attn kernel skips the masked blocks); packing wins when padding is large or flash-attn is used.

tokens/s counts real (non-pad) tokens, prompt included, over the timed steps (after --warmup
untimed steps); padded runs also report how many of the computed token slots were padding. On CUDA,
MFU = 6 * parameters * tokens/s / peak (dense bf16/fp16 peak of the GPU from a small table, or
--peak-tflops). The last line printed is one JSON object:
  model, device, precision, batch_size, max_length, steps
  padded_tokens_per_s, packed_tokens_per_s, packed_over_padded (ratio)
  padded_pad_fraction, padded_mfu, packed_mfu (null on CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from the vendors' datasheets.
# torch names the SXM part "NVIDIA H100 80GB HBM3" (HBM3 = SXM; the PCIe card has HBM2e).
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 756.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0, "RTX 4090": 165.0,
               "V100": 125.0, "T4": 65.0}


def cache_root() -> Path:
    return Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow")


def pick_model(args) -> Path:
    from instructflow.models.bundled import ensure_bundled_hf_dir

    if args.model:
        return Path(args.model)
    bundled = ensure_bundled_hf_dir(cache_root())
    if args.tiny:
        from instructflow.models.tiny import build_tiny_llama

        return build_tiny_llama(cache_root() / "tiny-llama", tokenizer_dir=bundled)
    return bundled


def seed_rows(tokenizer) -> list[dict]:
    from instructflow.tasks.seeds import bundled_seed_dir, load_seed_file
    from instructflow.tasks.sft_data import InstructionExample, to_prompt_completion

    tasks = load_seed_file(bundled_seed_dir() / "seed_tasks.jsonl")
    return [to_prompt_completion(InstructionExample(t.instruction, i.input, i.output, "seed"), "alpaca", tokenizer)
            for t in tasks for i in t.instances]


class StepTimer(TrainerCallback):
    """Wall time and real tokens of the steps after `warmup` (GPU work is waited for at both ends)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = 0.0
        self.tokens = self.tokens_at_start = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()
        if state.global_step > self.warmup:
            self.tokens = state.num_input_tokens_seen - self.tokens_at_start


class SlotCounter:
    """Wraps the collator to record (token slots computed, real tokens) per batch. The dataloader fetches
    one batch ahead, so only the first batches, the ones actually trained on, are summed."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        real = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
        self.batches.append((batch["input_ids"].numel(), int(real)))
        return batch

    def pad_fraction(self, n: int) -> float:
        slots, real = (sum(column) for column in zip(*self.batches[:n]))
        return 1 - real / slots


def measure(model_dir: Path, rows: list[dict], packed: bool, args, precision: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from instructflow.models.recipe_io import drop_printer, ensure_pad, hidden_log_lines

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ensure_pad(tokenizer, model)
    config = SFTConfig(output_dir=args.scratch, max_length=args.max_length,
                       packing=packed, packing_strategy="bfd", completion_only_loss=True,
                       max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=1e-5, activation_checkpointing=False, bf16=precision == "bf16",
                       fp16=precision == "fp16", dataloader_pin_memory=torch.cuda.is_available(),
                       include_num_input_tokens_seen="non_padding", save_strategy="no", eval_strategy="no",
                       logging_steps=10_000, report_to="none", disable_tqdm=True, seed=0)
    timer = StepTimer(args.warmup)
    with hidden_log_lines("trl.trainer.sft_trainer", "Flash Attention variant"):  # exact on sdpa too: models/sft.py
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[timer])
    drop_printer(trainer)
    slots = SlotCounter(trainer.data_collator)
    trainer.data_collator = slots
    trainer.train()
    seconds = timer.end - timer.start
    params = sum(p.numel() for p in model.parameters())
    tokens_per_s = timer.tokens / seconds
    return {"tokens_per_s": tokens_per_s, "seconds": seconds, "tokens": timer.tokens,
            "pad_fraction": slots.pad_fraction(args.warmup + args.steps), "params": params}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an HF model dir (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (seconds, for smoke runs)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 3 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default 4 on CPU, 16 on GPU)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default 256 CPU, 512 GPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU when not in the table")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.steps = args.steps or (20 if cuda else 3)
    args.batch_size = args.batch_size or (16 if cuda else 4)
    args.max_length = args.max_length or (512 if cuda else 256)

    from transformers import AutoTokenizer

    from instructflow.models.recipe_io import resolve_precision
    from instructflow.models.sft import SFTInputError
    from instructflow.tasks.library_output import quiet_progress_bars

    quiet_progress_bars()
    args.scratch = tempfile.mkdtemp(prefix="sft-throughput-")  # the Trainer wants an output_dir; nothing is saved
    precision = resolve_precision("auto", SFTInputError)
    model_dir = pick_model(args)
    rows = seed_rows(AutoTokenizer.from_pretrained(model_dir))
    print(f"model {model_dir} | {len(rows)} seed examples | {precision} on {'cuda' if cuda else 'cpu'} | "
          f"{args.batch_size} rows x {args.max_length} tokens | {args.warmup}+{args.steps} steps per mode",
          file=sys.stderr)
    results = {}
    try:
        for mode in ("padded", "packed"):
            results[mode] = measure(model_dir, rows, mode == "packed", args, precision)
            print(f"{mode:>6}: {results[mode]['tokens_per_s']:,.0f} tokens/s ({results[mode]['tokens']} tokens in "
                  f"{results[mode]['seconds']:.2f} s, padding {results[mode]['pad_fraction']:.0%} of slots)",
                  file=sys.stderr)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    peak = peak_tflops(args.peak_tflops)

    def mfu(mode: str) -> float | None:
        r = results[mode]
        return 6 * r["params"] * r["tokens_per_s"] / (peak * 1e12) if peak else None

    summary = {"model": str(model_dir), "device": torch.cuda.get_device_name() if cuda else "cpu",
               "precision": precision, "batch_size": args.batch_size, "max_length": args.max_length,
               "steps": args.steps, "padded_tokens_per_s": results["padded"]["tokens_per_s"],
               "packed_tokens_per_s": results["packed"]["tokens_per_s"],
               "packed_over_padded": results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"],
               "padded_pad_fraction": results["padded"]["pad_fraction"],
               "padded_mfu": mfu("padded"), "packed_mfu": mfu("packed")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

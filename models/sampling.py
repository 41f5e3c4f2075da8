"""Sample responses from a local causal LM dir: k per prompt, batched, reproducible for a seed.

Used by the preferences stage (k samples per prompt from the SFT model) and by evaluation (one
greedy reply per prompt from SFT and from each aligned policy, with whether it ended by eos).

    responses = generate_responses(model_dir, prompts, k=4, temperature=0.7, seed=0)
    responses[i][j]  # the j-th sample for prompts[i]: decoded text after the prompt, special tokens stripped
    replies = greedy_replies(model_dir, prompts, max_new_tokens=64)
    replies[i].text, replies[i].ended  # ended: eos came within max_new_tokens (else the budget cut it)

Prompts are passed through exactly as the model sees them (the caller applies the chat / SFT
format), so they are tokenized without adding special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


def generate_responses(model_dir: Path, prompts: Sequence[str], *, k: int = 1, temperature: float = 0.7,
                       top_p: float = 1.0, max_new_tokens: int = 128, batch_size: int = 8, seed: int = 0,
                       on_progress: Callable[[int, int], None] | None = None) -> list[list[str]]:
    """`k` responses for each prompt, in prompt order; greedy (and so k identical copies) when temperature == 0.

    Deterministic for a given (model, prompts, batch_size, seed): each batch reseeds the RNG with
    `seed + batch index` (inside a forked RNG, so the caller's global RNG state is left alone).
    Generation stops at the tokenizer's eos; `on_progress(prompts_done, prompts_total)` runs after each batch.
    """
    import torch
    from transformers import GenerationConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"generate_responses: {model_dir}/config.json not found (not a model dir)")
    for name, value, ok in (("k", k, k >= 1), ("temperature", temperature, temperature >= 0),
                            ("top_p", top_p, 0 < top_p <= 1), ("max_new_tokens", max_new_tokens, max_new_tokens >= 1),
                            ("batch_size", batch_size, batch_size >= 1)):
        if not ok:
            raise ValueError(f"generate_responses: invalid {name}={value!r}")
    prompts = list(prompts)
    if not prompts:
        return []

    tokenizer, model, device = _load_for_generation(model_dir)
    greedy = temperature == 0
    # top_k=0: no implicit top-k cut (OpenAI semantics, as in the teacher server's generation config)
    generation = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=None if greedy else 0, max_new_tokens=max_new_tokens,
        num_return_sequences=1 if greedy else k,  # greedy: k identical samples, computed once
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model.generation_config = generation  # replace, not merge: the saved config's sampling flags must not leak in

    responses: list[list[str]] = []
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed + batch_index)
            output = model.generate(**encoded)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]  # left padding: every prompt ends at the same column
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        per_prompt = 1 if greedy else k
        for i in range(len(batch)):
            samples = [text.strip() for text in texts[i * per_prompt:(i + 1) * per_prompt]]
            responses.append(samples * k if greedy else samples)
        if on_progress is not None:
            on_progress(len(responses), len(prompts))
    return responses


def _load_for_generation(model_dir: Path):
    """(tokenizer with left padding, model in eval mode on the best device, device)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructflow.models.recipe_io import resolve_precision

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    if tokenizer.pad_token_id is None:  # only for batching here: the attention mask keeps eos-as-pad harmless
        tokenizer.pad_token = tokenizer.eos_token
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the recipes' precision rule (bf16 where the GPU has it, else fp32), applied to the weights: no autocast here
    dtype = torch.bfloat16 if resolve_precision("auto", ValueError, fp16_ok=False) == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return tokenizer, model, device


@dataclass(frozen=True)
class Reply:
    text: str     # decoded after the prompt, special tokens stripped, whitespace trimmed
    ended: bool   # the model emitted eos within max_new_tokens (False: the budget cut the reply)
    tokens: int   # new tokens generated, eos included


def greedy_replies(model_dir: Path, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16,
                   on_progress: Callable[[int, int], None] | None = None) -> list[Reply]:
    """One greedy reply per prompt (in prompt order), batched longest prompts first so that a batch pads
    little; evaluation compares policies on these, so decoding has no randomness."""
    import torch
    from transformers import GenerationConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"greedy_replies: {model_dir}/config.json not found (not a model dir)")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"greedy_replies: invalid max_new_tokens={max_new_tokens!r} or batch_size={batch_size!r}")
    prompts = list(prompts)
    if not prompts:
        return []
    tokenizer, model, device = _load_for_generation(model_dir)
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    replies: list[Reply | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        encoded = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
        with torch.no_grad():
            output = model.generate(**encoded)
        for row, ids in zip(rows, output[:, encoded["input_ids"].shape[1]:].tolist()):
            ended = tokenizer.eos_token_id in ids
            kept = ids[:ids.index(tokenizer.eos_token_id) + 1] if ended else ids
            replies[row] = Reply(tokenizer.decode(kept, skip_special_tokens=True).strip(), ended, len(kept))
        if on_progress is not None:
            on_progress(min(start + batch_size, len(order)), len(order))
    return replies

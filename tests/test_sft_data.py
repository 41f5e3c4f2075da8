"""SFT rows: Alpaca and chat prompt formats, the hash-based train/eval split, the dataset hash."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructflow.tasks.sft_data import (InstructionExample, alpaca_prompt, dataset_hash, split_train_eval,
                                         to_prompt_completion)


def ex(i: int, output: str = "out", input: str = "") -> InstructionExample:
    return InstructionExample(f"Instruction number {i}", input, f"{output} {i}", "generated")


# ---- prompt formats ----------------------------------------------------------------------------

def test_alpaca_prompts_are_the_stanford_templates_verbatim():
    assert alpaca_prompt("Add 2 and 3.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    assert alpaca_prompt("Summarize.", "The cat sat.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarize.\n\n"
        "### Input:\nThe cat sat.\n\n### Response:\n")


class FakeChatTokenizer:
    """Only for the no-tokenizer paths; the real chat template is tested below with SmolLM2's tokenizer."""
    eos_token = "</s>"


def test_alpaca_row_puts_the_output_plus_eos_in_the_completion():
    row = to_prompt_completion(InstructionExample("Say hi.", "", "Hi!", "seed"), "alpaca", FakeChatTokenizer())
    assert row == {"prompt": alpaca_prompt("Say hi."), "completion": "Hi!</s>"}
    assert to_prompt_completion(InstructionExample("Say hi.", "", "Hi!", "seed"), "alpaca")["completion"] == "Hi!"


def test_unknown_style_and_chat_without_tokenizer_are_clear_errors():
    with pytest.raises(ValueError, match="unknown style 'markdown'"):
        to_prompt_completion(ex(1), "markdown")
    with pytest.raises(ValueError, match="style 'chat' needs the tokenizer"):
        to_prompt_completion(ex(1), "chat")


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from instructflow.models.bundled import ensure_bundled_hf_dir

    cache = Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow")
    return AutoTokenizer.from_pretrained(ensure_bundled_hf_dir(cache))


def test_chat_row_uses_the_chat_template_with_a_generation_prompt(smollm_tokenizer):
    row = to_prompt_completion(InstructionExample("Translate to French.", "Good morning", "Bonjour", "seed"),
                               "chat", smollm_tokenizer)
    assert row["prompt"].endswith("<|im_start|>user\nTranslate to French.\n\nGood morning<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert row["completion"] == "Bonjour<|im_end|>"
    # prompt + completion is exactly how the template renders the finished conversation (up to its newline)
    full = smollm_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Translate to French.\n\nGood morning"},
         {"role": "assistant", "content": "Bonjour"}], tokenize=False)
    assert full.rstrip("\n") == row["prompt"] + row["completion"]
    no_input = to_prompt_completion(InstructionExample("Count to 3.", "", "1 2 3", "seed"), "chat", smollm_tokenizer)
    assert "<|im_start|>user\nCount to 3.<|im_end|>" in no_input["prompt"]


# ---- split --------------------------------------------------------------------------------------

def test_split_is_deterministic_and_independent_of_order_and_of_other_examples():
    examples = [ex(i) for i in range(200)]
    train, held = split_train_eval(examples, 0.2, seed=7)
    assert len(train) + len(held) == 200 and 20 <= len(held) <= 60  # ~40 expected
    held_keys = {e.instruction for e in held}

    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    assert {e.instruction for e in split_train_eval(shuffled, 0.2, seed=7)[1]} == held_keys

    subset = examples[50:120]  # other examples gone: each survivor stays on its side
    assert {e.instruction for e in split_train_eval(subset, 0.2, seed=7)[1]} == held_keys & {e.instruction
                                                                                            for e in subset}
    assert train == [e for e in examples if e.instruction not in held_keys]  # input order kept

    other_seed = {e.instruction for e in split_train_eval(examples, 0.2, seed=8)[1]}
    assert other_seed != held_keys


def test_split_keeps_examples_sharing_a_prompt_together():
    examples = [InstructionExample(f"task {i % 30}", "", f"answer {i}", "generated") for i in range(120)]
    train, held = split_train_eval(examples, 0.3, seed=0)
    assert {e.instruction for e in train}.isdisjoint({e.instruction for e in held})


def test_split_ignores_output_and_source():
    a = [ex(i, output="first") for i in range(50)]
    b = [InstructionExample(e.instruction, e.input, "second", "imported") for e in a]
    assert [e.instruction for e in split_train_eval(a, 0.3, 1)[1]] == [e.instruction for e in split_train_eval(b, 0.3, 1)[1]]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 12), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_split_always_has_an_eval_and_a_train_example_from_two_examples_on(n, fraction, seed):
    train, held = split_train_eval([ex(i) for i in range(n)], fraction, seed)
    assert held and train and len(train) + len(held) == n


def test_split_edge_cases():
    assert split_train_eval([], 0.2, 0) == ([], [])
    assert split_train_eval([ex(1)], 0.5, 0) == ([ex(1)], [])  # one example: train on it
    assert split_train_eval([ex(i) for i in range(10)], 0.0, 0) == ([ex(i) for i in range(10)], [])
    with pytest.raises(ValueError, match=r"eval_fraction=1.0 must be in \[0, 1\)"):
        split_train_eval([ex(1)], 1.0, 0)


# ---- hash ---------------------------------------------------------------------------------------

def test_dataset_hash_ignores_order_but_sees_every_field():
    examples = [ex(i) for i in range(20)]
    h = dataset_hash(examples)
    assert len(h) == 64 and h == dataset_hash(list(reversed(examples)))
    assert h != dataset_hash(examples[:-1])
    assert h != dataset_hash(examples[:-1] + [InstructionExample(examples[-1].instruction, "", "out 19", "seed")])
    assert h != dataset_hash(examples[:-1] + [InstructionExample(examples[-1].instruction, "x", "out 19", "generated")])
    assert h != dataset_hash(examples + examples[:1])  # duplicates count
    assert dataset_hash([]) == dataset_hash([])

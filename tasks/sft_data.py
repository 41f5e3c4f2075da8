"""Instruction examples -> SFT rows: prompt formats, a deterministic train/eval split, a content hash.

Pure Python (no torch): the SFT flow builds `{"prompt", "completion"}` rows here and hands them to
`instructflow.models.sft.train_sft`; later stages rebuild prompts with the same functions so the
policy always sees exactly the format it was fine-tuned on.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence

SOURCES = ("seed", "generated", "imported", "heldout")
STYLES = ("alpaca", "chat")

# Stanford Alpaca's training prompts (github.com/tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class InstructionExample:
    instruction: str
    input: str
    output: str
    source: str  # "seed" | "generated" | "imported" ("heldout" for prompt-only rows built downstream)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt; the input block is left out when `input` is empty or whitespace."""
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def user_message(instruction: str, input: str = "") -> str:
    """The single user turn of the chat style: the instruction, then the input after a blank line."""
    return instruction + ("\n\n" + input if input.strip() else "")


def to_prompt_completion(ex: InstructionExample, style: str, tokenizer=None) -> dict[str, str]:
    """One SFT row. The loss is on `completion` only (TRL's default for prompt/completion data).

    alpaca: prompt = `alpaca_prompt(...)`, completion = output + eos text (as Alpaca does).
    chat:   prompt = the tokenizer's chat template with one user turn and the generation prompt,
            completion = output + eos text (for SmolLM2 `<|im_end|>`, the end-of-turn token),
            so the model learns to stop exactly where the chat template ends a reply.
    """
    if style not in STYLES:
        raise ValueError(f"to_prompt_completion: unknown style {style!r} (expected one of {', '.join(STYLES)})")
    if tokenizer is None and style == "chat":
        raise ValueError("to_prompt_completion: style 'chat' needs the tokenizer (its chat template and eos token)")
    eos = tokenizer.eos_token if tokenizer is not None else ""
    if style == "alpaca":
        prompt = alpaca_prompt(ex.instruction, ex.input)
    else:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user_message(ex.instruction, ex.input)}],
                                               tokenize=False, add_generation_prompt=True)
    return {"prompt": prompt, "completion": ex.output + (eos or "")}


def _unit_hash(seed: int, instruction: str, input: str) -> float:
    """A number in [0, 1) that depends only on (seed, instruction, input)."""
    digest = hashlib.sha256(json.dumps([seed, instruction, input], ensure_ascii=False).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_train_eval(examples: Sequence[InstructionExample], eval_fraction: float,
                     seed: int) -> tuple[list[InstructionExample], list[InstructionExample]]:
    """Split by a seeded hash of (instruction, input), never by position.

    The same example lands on the same side whatever the order or the other examples, and all
    examples sharing an (instruction, input) land together (no prompt leaks from train into eval).
    Only tiny sets look at the others: with `eval_fraction > 0`, >= 2 examples and none hashed into
    eval, the example with the smallest hash moves to eval (an eval set always exists); if all
    hashed into eval, the one with the largest hash moves to train (train is never empty).
    Input order is kept within each side.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"split_train_eval: eval_fraction={eval_fraction} must be in [0, 1)")
    keys = [_unit_hash(seed, ex.instruction, ex.input) for ex in examples]
    in_eval = [key < eval_fraction for key in keys]
    if eval_fraction > 0 and len(examples) >= 2 and not any(in_eval):
        smallest = min(range(len(examples)), key=lambda i: (keys[i], _canonical(examples[i])))
        in_eval[smallest] = True
    if examples and all(in_eval):  # only possible with tiny sets: keep one example to train on
        largest = max(range(len(examples)), key=lambda i: (keys[i], _canonical(examples[i])))
        in_eval[largest] = False
    train = [ex for ex, held in zip(examples, in_eval) if not held]
    held_out = [ex for ex, held in zip(examples, in_eval) if held]
    return train, held_out


def _canonical(ex: InstructionExample) -> str:
    return json.dumps(asdict(ex), ensure_ascii=False, sort_keys=True)


def dataset_hash(examples: Sequence[InstructionExample]) -> str:
    """sha256 of the sorted canonical JSON of all examples: independent of order, sensitive to every field."""
    canonical = sorted(_canonical(ex) for ex in examples)
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode("utf-8")).hexdigest()

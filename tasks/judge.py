"""AlpacaFarm-style pairwise judge as pure logic: the prompt, the verdict parser, and the rule that
combines the two orders.

The caller asks each pair twice, once as (a=x, b=y) and once swapped (a=y, b=x), to cancel the
judge's position bias: a pair counts only when both orders agree.
"""
from __future__ import annotations

import re

JUDGE_DECODING: dict = {"temperature": 0.0, "max_tokens": 12}

JUDGE_HEADER = """\
You compare two answers to the same instruction and pick the better one. The better answer follows \
the instruction more closely and is more correct, helpful and clear. Ignore which answer comes first \
and how long it is. Reply with exactly one of: Output (a), Output (b), Tie.

## Instruction:
Name the capital of France.

## Output (a):
The capital of France is Paris.

## Output (b):
The capital of France is Lyon.

## Which is better, Output (a) or Output (b)?
Output (a)

## Instruction:
Give an antonym of "happy".

## Output (a):
Happy is a feeling.

## Output (b):
Sad.

## Which is better, Output (a) or Output (b)?
Output (b)

"""


def pairwise_judge_prompt(instruction: str, output_a: str, output_b: str) -> str:
    return (JUDGE_HEADER
            + f"## Instruction:\n{instruction.strip()}\n\n"
            + f"## Output (a):\n{output_a.strip()}\n\n"
            + f"## Output (b):\n{output_b.strip()}\n\n"
            + "## Which is better, Output (a) or Output (b)?\n")


# "Output (a)", "output a", "Response (b)", "(a)", "[b]" all name a side explicitly.
_NAMES = {side: re.compile(rf"\((?:{side})\)|\[{side}\]|\b(?:output|response)\s*{side}\b")
          for side in ("a", "b")}
_TIE = re.compile(r"\btie\b|\bequally (?:good|bad)\b")
_BARE_LETTER = re.compile(r"^(a|b)(?:[.:!)]?$|[.:,)]?\s+(?:is|wins|better)\b)")


def parse_pairwise_verdict(text: str) -> str | None:
    """"a" | "b" | "tie", or None when the reply names both sides (without calling it a tie), neither,
    or one side and a tie at once.

    The first non-empty line decides when it holds a verdict: small judges answer and then echo the
    prompt (SmolLM2-135M: 'Output (a)\n\nOutput (b):\nParis'). Otherwise the whole reply is read, so
    a preamble line ("Here is my verdict:") does not hide the answer below it."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        first = _verdict(lines[0])
        if first is not None:
            return first
    return _verdict(text)


def _verdict(text: str) -> str | None:
    t = re.sub(r"[*_`#\"']", "", text).strip().lower()
    named = {side for side, pattern in _NAMES.items() if pattern.search(t)}
    tie = bool(_TIE.search(t))
    if not named and not tie:
        bare = _BARE_LETTER.match(t)    # a bare "A", "b.", "A is better"
        return bare.group(1) if bare else None
    if tie:
        return "tie" if len(named) != 1 else None
    return named.pop() if len(named) == 1 else None


def combine_orders(first: str | None, second_swapped: str | None) -> str:
    """first: verdict when asked (a=x, b=y); second_swapped: verdict when asked (a=y, b=x).
    Returns "x" | "y" | "tie" when both orders agree, "disagree" when they differ (a side vs a tie
    counts as a disagreement), "invalid" when either verdict could not be parsed."""
    if first is None or second_swapped is None:
        return "invalid"
    as_first = {"a": "x", "b": "y", "tie": "tie"}
    as_second = {"a": "y", "b": "x", "tie": "tie"}
    if first not in as_first or second_swapped not in as_second:
        raise ValueError(f"verdicts must be 'a', 'b', 'tie' or None, got {first!r} and {second_swapped!r}")
    x_first, x_second = as_first[first], as_second[second_swapped]
    return x_first if x_first == x_second else "disagree"

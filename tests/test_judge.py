"""Judge prompt shape, verdict parsing variants, and the two-order combination table."""
from __future__ import annotations

import pytest

from instructflow.tasks.judge import JUDGE_DECODING, combine_orders, pairwise_judge_prompt, parse_pairwise_verdict


def test_prompt_puts_the_pair_last_in_order():
    prompt = pairwise_judge_prompt("  Name a prime number.\n", "Seven.", "Eight.")
    assert prompt.endswith("## Instruction:\nName a prime number.\n\n## Output (a):\nSeven.\n\n"
                           "## Output (b):\nEight.\n\n## Which is better, Output (a) or Output (b)?\n")
    assert "Output (a), Output (b), Tie" in prompt
    swapped = pairwise_judge_prompt("Name a prime number.", "Eight.", "Seven.")
    assert swapped.index("Eight.") < swapped.index("Seven.", len(swapped) - 120)
    assert JUDGE_DECODING["temperature"] == 0 and JUDGE_DECODING["max_tokens"] <= 16


@pytest.mark.parametrize("text, verdict", [
    ("Output (a)", "a"),
    ("Output (b)", "b"),
    ("output (b)", "b"),
    ("OUTPUT (A)", "a"),
    ("(a)", "a"),
    (" (B).", "b"),
    ("Output (b) is better.", "b"),
    ("**Output (a)**", "a"),
    ("## Output (b)", "b"),
    ("`Output (a)`", "a"),
    ("Output a", "a"),
    ("Response (b)", "b"),
    ("A", "a"),
    ("b", "b"),
    ("B.", "b"),
    ("A is better", "a"),
    ("I prefer Output (a) because it is correct.", "a"),
    ("Tie", "tie"),
    ("tie.", "tie"),
    ("It's a tie.", "tie"),
    ("A tie", "tie"),
    ("Both are equally good.", "tie"),
    ("Tie: Output (a) and Output (b) are equally good.", "tie"),
    # names both, neither, or one side plus a tie: unparseable
    ("Output (a) is better than Output (b)", None),
    ("Output (a), Output (b)", None),
    # the first line decides when it holds a verdict; else the whole reply is read
    ("Output (a)\n\nOutput (b):\nParis", "a"),       # SmolLM2-135M's real reply: verdict, then an echo
    ("Output (b)\nOutput (a) is wrong because ...", "b"),
    ("Here is my verdict:\n\nOutput (b)", "b"),
    ("Both answers mention a city.\nOutput (a) is better than Output (b)", None),
    ("Output (a), not a tie", None),
    ("", None),
    ("I cannot decide.", None),
    ("A good answer would mention Paris.", None),
    ("Output (c)", None),
])
def test_parse_verdict(text, verdict):
    assert parse_pairwise_verdict(text) == verdict


@pytest.mark.parametrize("first, second_swapped, outcome", [
    ("a", "b", "x"),          # x won as (a), and again as (b) after the swap
    ("b", "a", "y"),
    ("tie", "tie", "tie"),
    ("a", "a", "disagree"),   # position bias: whatever came first won both times
    ("b", "b", "disagree"),
    ("a", "tie", "disagree"),
    ("tie", "a", "disagree"),
    (None, "a", "invalid"),
    ("b", None, "invalid"),
    (None, None, "invalid"),
])
def test_combine_orders(first, second_swapped, outcome):
    assert combine_orders(first, second_swapped) == outcome


def test_combine_orders_rejects_unknown_verdicts():
    with pytest.raises(ValueError, match="verdicts must be"):
        combine_orders("x", "a")


def test_parse_then_combine_end_to_end():
    ab = parse_pairwise_verdict("**Output (a)** is clearly better.")
    ba = parse_pairwise_verdict("Output (b)")
    assert combine_orders(ab, ba) == "x"

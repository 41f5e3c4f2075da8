"""Judge prompt shape, verdict parsing variants, the two-order combination table, what a stored
verdict is keyed by, and the win rate evaluate reports."""
from __future__ import annotations

import pytest

from instructflow.tasks import judge
from instructflow.tasks.judge import (JUDGE_DECODING, combine_orders, judge_requests, pairwise_judge_prompt,
                                      parse_pairwise_verdict, win_rate)


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


def test_request_keys_name_the_judge_and_the_prompt_version(monkeypatch):
    pair = ("Name a prime number.", "Seven.", "Eight.")
    ab, ba = judge_requests("judge-one", *pair)
    assert (ab.key, ba.key) == tuple(r.key for r in judge_requests("judge-one", *pair))   # stable across runs
    assert ab.key.endswith(":ab") and ba.key.endswith(":ba") and ab.key[:-3] == ba.key[:-3]
    assert not {ab.key, ba.key} & {r.key for r in judge_requests("judge-two", *pair)}      # another judge asks again
    assert ab.prompt == pairwise_judge_prompt(*pair) and ba.prompt == pairwise_judge_prompt(pair[0], pair[2], pair[1])
    monkeypatch.setattr(judge, "JUDGE_PROMPT_VERSION", "edited")   # a changed prompt asks again too
    assert judge_requests("judge-one", *pair)[0].key != ab.key


@pytest.mark.parametrize("outcomes, rate", [
    (["ppo", "ppo", "sft", "sft"], 0.5),
    (["ppo", "ppo", "ppo", "sft"], 0.75),
    (["ppo", "tie"], 0.75),                                # a tie is half a win
    (["tie", "tie", "tie"], 0.5),
    (["sft", "disagree", "invalid", None], 0.0),           # only prompts both orders agreed on are judged
    (["ppo", "disagree", "disagree", "disagree"], 1.0),
    (["disagree", "invalid"], None),                       # nothing judged: no rate, not 0
    ([], None),
])
def test_win_rate(outcomes, rate):
    assert win_rate(outcomes, "ppo") == rate
    if rate is not None:
        assert win_rate(outcomes, "sft") == pytest.approx(1 - rate)   # the two sides' rates add up to one

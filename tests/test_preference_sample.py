"""The bundled preference sample's rules (tasks/preference_sample.py) on known text, and the shipped file:
it holds what the README says it holds."""
from __future__ import annotations

import json
import random
import statistics

import pytest

from instructflow.tasks.preference_sample import (BUDGET_TOKENS, CHOSEN_TOKENS, KINDS, classify, concise, sample_pairs,
                                                  truncated)
from instructflow.tasks.seeds import bundled_seed_dir


def words(text: str) -> int:
    """A stand-in token count for the rules' tests: one token a word."""
    return len(text.split())


def test_concise_keeps_whole_sentences_or_lines_that_fit():
    answer = "One two three four. Five six seven eight. Nine ten eleven twelve thirteen."
    assert concise(answer, words, limit=8) == "One two three four. Five six seven eight."
    assert concise(answer, words, limit=2) == "One two three four."          # the first sentence, whatever its length
    lines = "- apples are red\n- bananas are yellow\n- grapes are green or red"
    assert concise(lines, words, limit=3) == "- apples are red\n- bananas are yellow"  # a list keeps two lines


@pytest.mark.parametrize("reply, ended, tokens, kind", [
    ("Paris is the capital of France.", True, 8, None),
    ("Dear Sam,\n\nDear Sam,\n\nDear Sam,", True, 12, "loop"),
    ("I am glad you are here and I am glad you are here and I am glad", False, 60, "loop"),
    ("A firewall is a device that filters traffic between networks and", False, 48, "runaway"),
    ("Plants need light.\n\n### Instruction:\nName a fruit.", True, 20, "runaway"),
    ("A long answer that did end, but only after the budget was spent.", True, BUDGET_TOKENS + 1, "runaway"),
])
def test_classify_names_how_a_reply_fails(reply, ended, tokens, kind):
    assert classify(reply, ended, tokens) == kind


def test_pairs_take_the_first_failing_reply_and_balance_the_lengths():
    answers = [(f"Question {i}?", f"Answer {i} is short and complete and ends here now.") for i in range(6)]
    runaway = " ".join(f"word{i}" for i in range(14))   # no eos within the budget, nothing repeated
    replies = [[("Fine reply that ends.", True, 4), (runaway, False, 14)] if i < 4 else [("Fine.", True, 1)]
               for i in range(6)]
    pairs = sample_pairs(answers, replies, words, seed=1)
    failing = [p for p in pairs if p["kind"] != "truncated"]
    assert [p["rejected"] for p in failing] == [runaway] * 4 and {p["kind"] for p in failing} == {"runaway"}
    assert {p["prompt"] for p in failing} == {f"Question {i}?" for i in range(4)}   # fine replies make no pair
    gap = statistics.fmean(p["rejected_tokens"] for p in pairs) - statistics.fmean(words(p["chosen"]) for p in pairs)
    assert gap <= 0 and any(p["kind"] == "truncated" for p in pairs)
    assert truncated("one two three", random.Random(0)) is None


def test_the_bundled_sample_is_concise_answers_over_the_models_failures_at_balanced_lengths():
    from transformers import AutoTokenizer

    from instructflow.flows.teacher import local_model_dir

    tokenizer = AutoTokenizer.from_pretrained(local_model_dir("tiny"))   # the bundled model's tokenizer
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    rows = [json.loads(line) for line in (bundled_seed_dir() / "preferences_sample.jsonl").read_text().splitlines()]
    assert len(rows) >= 150 and {r["kind"] for r in rows} <= set(KINDS)
    for row in rows:
        if row["kind"] != "truncated":
            assert classify(row["rejected"], row["rejected_ended"], row["rejected_tokens"]) == row["kind"], row
    concise_share = statistics.fmean(count(r["chosen"]) <= CHOSEN_TOKENS + 16 for r in rows)
    assert concise_share > 0.9
    gap = lambda pairs: (statistics.fmean(r["rejected_tokens"] for r in pairs)  # noqa: E731
                         - statistics.fmean(count(r["chosen"]) for r in pairs))
    # the model's failures run long (62 tokens against 28 in the shipped file); a truncated pair for every
    # prompt whose answer can be cut narrows that to a few tokens, never to "longer is always worse"
    cuttable = {r["prompt"] for r in rows if len(r["chosen"].split()) >= 6}
    truncated_pairs = [r for r in rows if r["kind"] == "truncated"]
    assert gap(rows) <= 1 or len(truncated_pairs) == len(cuttable)
    assert gap(rows) < gap([r for r in rows if r["kind"] != "truncated"]) / 3

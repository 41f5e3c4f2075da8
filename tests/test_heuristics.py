"""Every heuristic reason, the fixed order in which they are checked, and the configurable limits."""
from __future__ import annotations

import pytest

from instructflow.tasks.config import load_config
from instructflow.tasks.generate import build_filter, judge_candidate
from instructflow.tasks.heuristics import heuristic_reject_reason

# self-instruct's blacklist plus alpaca's additions, as the reference scripts spell them
REFERENCE_BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                       "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]


@pytest.mark.parametrize("profile", ["cpu", "tiny", "gpu"])
def test_the_packaged_profiles_reject_exactly_the_reference_words(profile):
    """Through the function generate and filter call, with the config they load: the list production uses."""
    cfg = load_config(profile)
    near_dup = build_filter(cfg, [])

    def verdict(instruction: str):
        return judge_candidate(cfg, near_dup, instruction, False, lambda: "cand:1")[:2]

    for word in REFERENCE_BLACKLIST:
        assert verdict(f"Please describe the {word} for our team today.") == ("rejected", f"blacklist:{word}"), word
    assert verdict("Please describe the weather for our team today.") == ("kept", None)  # no other word is listed


@pytest.mark.parametrize("instruction, reason", [
    ("Explain how vaccines train the immune system.", None),
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("Summarize this short text", None),                 # exactly 4 words passes
    ("Summarize the text.", "too_short"),                 # 3 words
    ("word " * 151, "too_long"),
    ("word " * 150, None),
    ("Describe the image in one sentence.", "blacklist:image"),
    ("Describe the IMAGES below in one sentence.", "blacklist:images"),
    ("Please go to the store and buy milk.", "blacklist:go to"),
    ("Plot the sales figures for each month.", "blacklist:plot"),
    ("Summarize the plotline of Hamlet briefly.", None),  # whole words only
    ("Write a program that sorts a list of numbers.", "write_a_program"),
    ("write a program that sorts a list of numbers.", None),  # the reference check is case-sensitive
    ("\"Quote\" this sentence back to me please.", "starts_with_punctuation"),
    ("- Give three tips for better sleep.", "starts_with_punctuation"),
    ("¿Cómo se dice hello en español, por favor?", "starts_with_non_ascii"),
    ("Ébauchez un plan pour une dissertation courte.", "starts_with_non_ascii"),
])
def test_reasons(instruction, reason):
    assert heuristic_reject_reason(instruction) == reason


def test_first_failing_reason_wins():
    # too short and blacklisted and punctuation: length is checked first
    assert heuristic_reject_reason("- draw it") == "too_short"
    # blacklisted and "Write a program": the blacklist comes first
    assert heuristic_reject_reason("Write a program that reads a file line by line.") == "blacklist:file"
    # first blacklisted word in list order, not in text order
    assert heuristic_reject_reason("Plot the data on a map for everyone.") == "blacklist:map"


def test_configurable_blacklist_and_limits():
    text = "Compose a short song about the sea."
    assert heuristic_reject_reason(text) is None
    assert heuristic_reject_reason(text, blacklist=["song", "sea"]) == "blacklist:song"
    assert heuristic_reject_reason(text, blacklist=[]) is None
    assert heuristic_reject_reason(text, blacklist=["c++"]) is None   # regex characters are escaped
    assert heuristic_reject_reason("Explain recursion in C++ simply.", blacklist=["c++"]) == "blacklist:c++"
    assert heuristic_reject_reason(text, min_words=8) == "too_short"
    assert heuristic_reject_reason(text, max_words=6) == "too_long"
    assert heuristic_reject_reason("Hi", min_words=0) is None

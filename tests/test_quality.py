"""The objective checks of a reply, on hand-written replies whose answers are counted by hand."""
from __future__ import annotations

import pytest

from instructflow.tasks.quality import ReplyChecks, checks, has_repeated_line, reply_words, trigram_repetition

NORMAL = ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. "
          "It happens in the chloroplasts of plant cells.")


def test_a_normal_reply_has_no_repetition():
    assert checks(NORMAL, True) == ReplyChecks(ended_within_budget=True, words=19, repetition=0.0,
                                               repeated_line=False)


def test_a_reply_stuck_on_one_line_is_all_repetition():
    reply = "\n".join(["- Repeats"] * 10)
    # ten words "repeats": eight 3-grams, all the same, so every one after the first repeats
    assert checks(reply, False) == ReplyChecks(ended_within_budget=False, words=10, repetition=7 / 8,
                                               repeated_line=True)


def test_a_looping_phrase_inside_one_line_is_repetition_and_a_repeated_sentence():
    reply = "I think so. I think so. I think so. I think so."
    # words: (i think so) x 4 = 12 words, 10 3-grams: the 3 distinct ones first seen in the first 3
    found = checks(reply, False)
    assert (found.words, found.repetition, found.repeated_line) == (12, 7 / 10, True)


@pytest.mark.parametrize("text, words", [
    ("Don't STOP!", ["don't", "stop"]),
    ("Step 1: add 2.5 cups.", ["step", "1", "add", "2", "5", "cups"]),
    ("well-known, e-mail", ["well", "known", "e", "mail"]),
    ("  \n\t", []),
    ("--- ***", []),
])
def test_words_are_lowercase_letters_digits_and_apostrophes(text, words):
    assert reply_words(text) == words


@pytest.mark.parametrize("words, share", [
    ([], 0.0),
    (["a", "a", "a"], 0.0),                      # one 3-gram: nothing earlier to repeat
    (["a", "b", "c", "a"], 0.0),                 # abc, bca: distinct
    (["a", "b", "c", "a", "b", "c"], 1 / 4),     # abc bca cab abc: the last repeats the first
    (["a", "a", "a", "a"], 1 / 2),               # aaa aaa
    (["a", "b", "a", "b", "a", "b", "a"], 3 / 5),  # aba bab aba bab aba
])
def test_repetition_is_the_share_of_3_grams_seen_before(words, share):
    assert trigram_repetition(words) == pytest.approx(share)


def test_repetition_ignores_case_and_punctuation():
    # words: the end the end the end; 3-grams: "the end the", "end the end", then both again
    assert checks("The end. THE END, the end!", True).repetition == pytest.approx(2 / 4)


@pytest.mark.parametrize("text, repeated", [
    (NORMAL, False),
    ("First line.\nSecond line.\nFirst line.", True),
    ("It works. Really, it works!", False),        # "really it works" is not "it works"
    ("It works. It WORKS!", True),                 # sentences compared by their words
    ("- Yes.\n- yes", True),
    ("1. Apples\n2. Apples", True),                # the same list item, whatever its number
    ("1. Mix the flour.\n2. Bake it.\n\nThen:\n1. Wash up.\n2) Rest.", False),  # list numbers are not sentences
    ("a) Red\nb) Blue\n* Green\n+ Red", True),
    ("Step one\n\n\nStep two\n\n", False),         # blank lines never count
    ("---\nA\n---\nB", False),                     # nor lines without a word
    ("def f():\n    return 1\n\ndef g():\n    return 1", True),
    ("", False),
])
def test_a_repeated_line_or_sentence_is_found(text, repeated):
    assert has_repeated_line(text) is repeated


def test_ended_within_budget_is_the_generators_report_not_a_guess():
    assert checks("Cut off mid", True).ended_within_budget is True
    assert checks("A complete sentence.", False).ended_within_budget is False
    assert checks("", True) == ReplyChecks(ended_within_budget=True, words=0, repetition=0.0, repeated_line=False)

"""Objective properties of one reply to a held-out prompt, as pure functions (no I/O, no model).

They need no judge: whether the reply ended on its own within the token budget, how long it is, and
whether it loops (a repeated phrase or a repeated line), the usual ways a policy degenerates.

Words are the matches of `[a-z0-9']+` in the lowercased reply, so case and punctuation never matter:
"Don't STOP!" is the words ["don't", "stop"]. (A letter outside a-z splits a word: "café" is ["caf"].
The replies evaluated are English; what matters is that both arms are counted the same way.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

_WORD = re.compile(r"[a-z0-9']+")
# A list marker at the start of a line ("- ", "* ", "1. ", "2) ", "a) "): not part of the item, and its
# "." must not end a sentence (else every "1." of two numbered lists would be a repeated sentence).
_LIST_MARKER = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)]|[a-z][)])\s+", re.IGNORECASE)
# A sentence ends at ".", "!" or "?" followed by whitespace; a line may hold several sentences.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class ReplyChecks:
    """What `checks` found in one reply."""
    ended_within_budget: bool  # the generator stopped on eos before max_new_tokens (its report, not guessed here)
    words: int                 # number of words
    repetition: float          # share of word 3-grams that repeat an earlier one, in [0, 1]
    repeated_line: bool        # some line or sentence with at least one word occurs twice or more


def reply_words(text: str) -> list[str]:
    """The words of `text`: lowercased `[a-z0-9']+` matches."""
    return _WORD.findall(text.lower())


def trigram_repetition(words: Sequence[str]) -> float:
    """The share of the word 3-grams (words i, i+1, i+2) that equal an earlier 3-gram of the same
    words: 0 when none repeats, close to 1 for a reply stuck in a loop. 0 for fewer than 4 words
    (at most one 3-gram: nothing it could repeat)."""
    if len(words) < 4:
        return 0.0
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for trigram in trigrams:
        if trigram in seen:
            repeats += 1
        seen.add(trigram)
    return repeats / len(trigrams)


def has_repeated_line(text: str) -> bool:
    """Whether some line, or some sentence within a line, occurs twice or more in `text`.

    Lines are split on newlines, lose a leading list marker ("- ", "* ", "1. ", "2) ", "a) "), and
    are split into sentences on ".", "!" or "?" followed by whitespace. Two sentences are the same
    when their words are (`reply_words`: case and punctuation are ignored, so "- Yes." and "yes"
    match, and so do "1. Apples" and "2. Apples"). One with no word at all (blank, "---", "}") never
    counts. A whole line that repeats always has a repeated sentence, so comparing sentences finds
    repeated lines too.
    """
    seen: set[tuple[str, ...]] = set()
    for line in text.splitlines():
        for sentence in _SENTENCE_END.split(_LIST_MARKER.sub("", line, count=1)):
            words = tuple(reply_words(sentence))
            if not words:
                continue
            if words in seen:
                return True
            seen.add(words)
    return False


def checks(reply: str, finished: bool) -> ReplyChecks:
    """The objective checks of one reply. `finished`: the generator's report that the reply ended with
    eos before max_new_tokens (a reply cut at the budget is False)."""
    words = reply_words(reply)
    return ReplyChecks(ended_within_budget=bool(finished), words=len(words), repetition=trigram_repetition(words),
                       repeated_line=has_repeated_line(reply))


def objective_values(replies: Sequence[tuple[str, bool]]) -> dict[str, list[float]]:
    """evaluate's objective measures of (reply, finished) pairs, one value per reply each: `ended` (1.0 or
    0.0), `repetition`, `words`."""
    found = [checks(reply, finished) for reply, finished in replies]
    return {"ended": [float(c.ended_within_budget) for c in found], "repetition": [c.repetition for c in found],
            "words": [float(c.words) for c in found]}

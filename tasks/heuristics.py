"""Heuristic filters for generated instructions (self-instruct / alpaca post-processing).

Each check returns a reason string or None; they run in a fixed order and the first failing reason is
recorded, so every rejected candidate carries exactly one reason:

    empty -> too_short -> too_long -> blacklist:<word> -> write_a_program
          -> starts_with_punctuation -> starts_with_non_ascii

`empty` comes first (as the reference's `if inst == ""` does) so a blank item is not reported as
too_short. Items dropped because the teacher hit its token limit get the reason `truncated`; that is
decided by the recipe parsers (`ParsedInstruction.truncated`), not here.
"""
from __future__ import annotations

import functools
import re
import string
from typing import Sequence

# Words a text-only model cannot act on (the self-instruct list plus alpaca's additions): the
# default of the `filter.blacklist` config key.
DEFAULT_BLACKLIST: tuple[str, ...] = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)


@functools.lru_cache(maxsize=1024)
def _word_pattern(word: str) -> re.Pattern:
    # The reference's \b(word)\b, written with lookarounds so that words ending in a non-word
    # character (a configured "c++") can match too; identical for ordinary words.
    return re.compile(rf"(?<!\w)({re.escape(word)})(?!\w)", flags=re.IGNORECASE)


def find_blacklisted(instruction: str, blacklist: Sequence[str] = DEFAULT_BLACKLIST) -> str | None:
    """The first blacklisted word (in list order) that occurs as a whole word, case-insensitively."""
    for word in blacklist:
        if _word_pattern(word).search(instruction):
            return word
    return None


def heuristic_reject_reason(instruction: str, blacklist: Sequence[str] = DEFAULT_BLACKLIST,
                            min_words: int = 4, max_words: int = 150) -> str | None:
    """Why `instruction` should be rejected, or None when it passes every heuristic.

    min_words: fewer words are rejected (the reference rejects <= 3 words, i.e. min_words=4).
    max_words: more words are rejected.
    """
    text = re.sub(r"\s+", " ", instruction).strip()
    if not text:
        return "empty"
    n_words = len(text.split())
    if n_words < min_words:
        return "too_short"
    if n_words > max_words:
        return "too_long"
    word = find_blacklisted(text, blacklist)
    if word is not None:
        return f"blacklist:{word}"
    # The teacher tends to prefix existing tasks with "Write a program"; it is unclear whether the
    # student should then write code or just answer, so self-instruct drops them.
    if text.startswith("Write a program"):
        return "write_a_program"
    if text[0] in string.punctuation:
        return "starts_with_punctuation"
    if not text[0].isascii():
        return "starts_with_non_ascii"
    return None

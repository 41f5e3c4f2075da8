"""The bundled preference sample (seeds/preferences_sample.jsonl): what it prefers, and how it was made.

Every pair prefers a complete, concise answer that ends well inside the evaluation's token budget over
a reply that fails the way the SFT model itself fails on held-out prompts. On the `make run` home a
third of SmolLM2-135M's greedy replies ran past a 48-token budget: explanations that go on, a new
"### Instruction:" block written after the answer, lists and lines that loop ("Dear [Name]" five times).
So the rejected replies are the SFT model's OWN replies to the same prompts (greedy, else one of two
samples), kept only when they fail, which is what lets a preference method change what the model does:
pairs whose rejected side the model would never write move little (measured: DPO on same-length loops and
rambles we wrote reached 98 % held-out preference accuracy and left 60 of 64 replies unchanged).

Kinds, by how the rejected reply fails (`classify`):
* `runaway`: no eos within the budget, more tokens than the budget, or a new "###" block after the answer;
* `loop`: a word 3-gram repetition of 0.2 or more, or a line or sentence said twice (tasks/quality.py).
* `truncated` (balance): the chosen answer cut in the middle; its rejected side is SHORTER than the chosen
  one, so that the rejected replies are not simply the longer ones: a model should learn "finish, and
  finish properly", not "shorter is better". One per prompt at most, so they narrow the gap rather than
  close it: in the shipped file the failures average 62 tokens against 28 for the chosen answers, and
  with the truncated pairs the whole sample's rejected replies average 36.
Each line also says how its rejected reply ended (`rejected_ended`: eos within the sampling limit) and its
length in tokens (`rejected_tokens`); the importer ignores these fields.

The chosen answers are the project's own reference answers (the seed tasks'), cut to whole sentences or
lines that fit in CHOSEN_TOKENS (`concise`). `python -m instructflow.models.preference_sample --model DIR`
samples DIR (an SFT checkpoint) and rewrites the file with these rules.
"""
from __future__ import annotations

import random
import re
from typing import Callable, Sequence

from instructflow.tasks.quality import checks

BUDGET_TOKENS = 48          # evaluate.max_new_tokens of the cpu profile: what "ends within the budget" means
CHOSEN_TOKENS = 32          # a chosen answer fits in this, well inside the budget
KINDS = ("runaway", "loop", "truncated")

Count = Callable[[str], int]  # tokens of a text (the policy's tokenizer)


def concise(answer: str, count: Count, limit: int = CHOSEN_TOKENS) -> str:
    """The answer's first lines (a list or a table: at least two) or sentences that fit in `limit` tokens;
    at least the first one, whatever its length."""
    lines = [line for line in answer.splitlines() if line.strip()]
    if len(lines) > 1:
        parts, joiner, minimum = lines, "\n", 2
    else:
        parts, joiner, minimum = re.split(r"(?<=[.!?])\s+", answer.strip()), " ", 1
    kept: list[str] = []
    for part in parts:
        if len(kept) >= minimum and count(joiner.join(kept + [part])) > limit:
            break
        kept.append(part)
    return joiner.join(kept)


def classify(reply: str, ended: bool, tokens: int, budget: int = BUDGET_TOKENS) -> str | None:
    """How a reply of the model fails ("runaway", "loop"), or None when it does not."""
    found = checks(reply, ended)
    if found.repetition >= 0.2 or found.repeated_line:
        return "loop"
    if not ended or tokens > budget or "###" in reply:
        return "runaway"
    return None


def truncated(chosen: str, rng: random.Random) -> str | None:
    """The chosen answer stopped mid-way (between a third and two thirds of its words); None under 6 words."""
    words = chosen.split()
    if len(words) < 6:
        return None
    return " ".join(words[:rng.randint(len(words) // 3, 2 * len(words) // 3)])


def sample_pairs(answers: Sequence[tuple[str, str]], replies: Sequence[Sequence[tuple[str, bool, int]]],
                 count: Count, seed: int = 0) -> list[dict]:
    """For each (prompt, reference answer) and the model's replies to it ((text, ended, tokens), greedy
    first): a pair of the concise answer over the first failing reply, if any, and a `truncated` pair for
    as many prompts as it takes to bring the rejected replies' mean length to the chosen ones' (in tokens)."""
    rng = random.Random(seed)
    failing, balance = [], []
    for (prompt, answer), candidates in zip(answers, replies):
        chosen = concise(answer, count)
        for text, ended, tokens in candidates:
            kind = classify(text, ended, tokens)
            if kind and text.strip() and text.strip() != chosen.strip():
                failing.append({"prompt": prompt, "chosen": chosen, "rejected": text, "kind": kind,
                                "rejected_ended": ended, "rejected_tokens": tokens})
                break
        cut = truncated(chosen, rng)
        if cut:
            balance.append({"prompt": prompt, "chosen": chosen, "rejected": cut, "kind": "truncated",
                            "rejected_ended": False, "rejected_tokens": count(cut)})
    pairs = list(failing)
    rng.shuffle(balance)

    def mean_gap() -> float:  # mean rejected tokens minus mean chosen tokens
        return (sum(p["rejected_tokens"] for p in pairs) - sum(count(p["chosen"]) for p in pairs)) / len(pairs)

    while balance and pairs and mean_gap() > 0:
        pairs.append(balance.pop())
    rng.shuffle(pairs)
    return pairs

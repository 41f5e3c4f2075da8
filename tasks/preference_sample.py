"""The bundled preference sample (seeds/preferences_sample.jsonl): what it prefers, and how it was made.

Every pair prefers a complete, direct answer that ends on its own over a reply of the SAME length in
words that fails in one of the two ways a small SFT model fails on held-out prompts (measured on the
`make run` home: a third of SmolLM2-135M's greedy replies ran past a 48-token budget, and loops such as
"Dear [Name]" five times were common):

* `loop`: the answer's opening sentence (or list line; for a one-sentence answer its first third)
  said again and again, cut at the chosen answer's length: the repetition loop of greedy decoding;
* `ramble`: a preamble that talks about answering without answering, cut mid-sentence at the chosen
  answer's length: a reply that would run past any budget.

Matched lengths keep the length confound out: a model (reward model or DPO policy) cannot learn
"longer is better" or "shorter is better" from these pairs, only "finish, and do not repeat". The
objective checks in evaluate (ended within the budget, 3-gram repetition, length) measure exactly that.

The prompts and chosen answers are the project's own (the seed tasks' reference answers); the
rejected replies are derived from them by the rules below, seeded per prompt, so
`python -m instructflow.tasks.preference_sample` rewrites the file identically.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

KINDS = ("loop", "ramble")

# openings that talk about answering without answering (our own text)
PREAMBLES = [
    "Sure! This is a really interesting question, and there are quite a few different things that we should "
    "think about carefully before we get to the actual answer, so let us start by looking at the background "
    "and the context of the question in some detail, because",
    "Great question. To answer this properly it helps to first take a step back and consider the bigger "
    "picture, since there are many factors involved and each of them deserves some attention on its own, "
    "and only after that does it make sense to",
    "Thank you for asking. Before I give you my answer, I would like to explain a little bit about how I "
    "usually approach questions like this one, because the way we think about a problem often matters just "
    "as much as the final result, and in this case",
    "Let me think about this step by step. First of all, it is important to understand exactly what the "
    "question is asking, and then we can go through the possible options one at a time, weighing the "
    "advantages and the disadvantages of each of them, so that",
]


def words(text: str) -> list[str]:
    return text.split()


def opening(text: str) -> str:
    """The first line of a multi-line answer, else its first sentence (at least three words when it has them)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[0].strip()
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    first = sentences[0]
    return first if len(words(first)) >= 3 or len(sentences) == 1 else " ".join(sentences[:2])


def cut_to_words(text: str, n: int, keep_lines: bool = False) -> str:
    """The first n words of `text`; with keep_lines the line breaks between them survive."""
    if not keep_lines:
        return " ".join(words(text)[:n])
    kept, count = [], 0
    for line in text.splitlines():
        line_words = words(line)
        if count + len(line_words) > n:
            kept.append(" ".join(line_words[:n - count]))
            break
        kept.append(line)
        count += len(line_words)
    return "\n".join(kept).strip()


def rejected_for(chosen: str, kind: str, rng: random.Random) -> str:
    """A reply of the chosen answer's length (in words; at least six) that loops or rambles."""
    n = max(len(words(chosen)), 6)
    if kind == "loop":
        first = opening(chosen)
        if len(words(first)) > n / 2:  # a one-sentence answer: its first third is what goes round
            first = " ".join(words(first)[:max(2, n // 3)])
        multiline = len([line for line in chosen.splitlines() if line.strip()]) > 1
        repeated = ("\n" if multiline else " ").join([first] * (n // max(len(words(first)), 1) + 2))
        return cut_to_words(repeated, n, keep_lines=multiline)
    if kind == "ramble":  # preambles in a seeded order, as many as the length needs
        return cut_to_words(" ".join(rng.sample(PREAMBLES, len(PREAMBLES)) * (n // 150 + 1)), n)
    raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")


def sample_pairs(answers: list[tuple[str, str]], seed: int = 0) -> list[dict]:
    """Two pairs per (prompt, chosen answer): one loop, one ramble, in a seeded order."""
    pairs = []
    for prompt, chosen in answers:
        rng = random.Random(f"{seed}:{prompt}")
        pairs += [{"prompt": prompt, "chosen": chosen, "rejected": rejected_for(chosen, kind, rng), "kind": kind}
                  for kind in KINDS]
    random.Random(seed).shuffle(pairs)
    return pairs


def main(argv: list[str] | None = None) -> int:
    """Rewrite the sample from the (prompt, chosen) answers it already holds."""
    path = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "seeds" / "preferences_sample.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = list({row["prompt"]: (row["prompt"], row["chosen"]) for row in rows}.values())
    with path.open("w", encoding="utf-8") as handle:
        for pair in sample_pairs(answers):
            handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
    print(f"wrote {2 * len(answers)} pairs for {len(answers)} prompts to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

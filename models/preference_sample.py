"""Rewrite the bundled preference sample from an SFT checkpoint's own failures (tasks/preference_sample.py
says what the pairs prefer and why):

    python -m instructflow.models.preference_sample --model HOME/stages/sft/run-*/final

For every prompt of the sample it asks the model once greedily and twice sampled (temperature 0.8,
top-p 0.95, seeded) for up to BUDGET_TOKENS + 24 tokens, in the prompt format of the cpu profile's SFT,
and keeps the first failing reply as the rejected side of the prompt's concise reference answer.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Sequence

from instructflow.models.sampling import generate_responses, greedy_replies
from instructflow.tasks.config import load_config
from instructflow.tasks.preference_sample import BUDGET_TOKENS, sample_pairs
from instructflow.tasks.prompts import format_prompt

SAMPLE = Path(__file__).resolve().parents[1] / "seeds" / "preferences_sample.jsonl"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructflow.models.preference_sample", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="an SFT checkpoint (a HF model dir)")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="the sample file, read for its prompts and "
                        "reference answers and rewritten")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    count = functools.lru_cache(maxsize=None)(lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    rows = [json.loads(line) for line in args.sample.read_text(encoding="utf-8").splitlines() if line.strip()]
    # one reference answer per prompt: the longest chosen text stored for it (a concise one is cut from it)
    answers = {}
    for row in rows:
        if len(row["chosen"]) > len(answers.get(row["prompt"], "")):
            answers[row["prompt"]] = row["chosen"]
    cfg = load_config("cpu")
    prompts = [format_prompt(cfg, tokenizer, prompt) for prompt in answers]
    limit = BUDGET_TOKENS + 24
    greedy = greedy_replies(args.model, prompts, max_new_tokens=limit)
    sampled = generate_responses(args.model, prompts, k=2, temperature=0.8, top_p=0.95, max_new_tokens=limit, seed=1)
    replies = [[(g.text, g.ended, g.tokens)] + [(s, count(s) < limit, count(s)) for s in samples]
               for g, samples in zip(greedy, sampled)]
    pairs = sample_pairs(list(answers.items()), replies, count)
    with args.sample.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps(pair, ensure_ascii=False) + "\n")
    print(f"wrote {len(pairs)} pairs for {len(answers)} prompts to {args.sample}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

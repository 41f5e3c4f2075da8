"""DPO settings on an existing SFT checkpoint: train DPO on a preference file with the reward stage's split,
then compare its greedy replies with the SFT model's on the bundled eval prompts (README "dpo").

    python bench/dpo_settings.py --sft HOME/stages/sft/run-*/final --out /tmp/dpo-a \
        [--reward RM_DIR] [--pairs seeds/preferences_sample.jsonl] [--dpo '{"learning_rate": 3e-5, "max_steps": 24}']

Without --reward it first trains a reward model (the cpu profile's `reward` settings) on the same split, to
score the replies; pass one RM to every run you want to compare. Everything runs through the stages' own
code (train_reward, train_dpo, greedy_replies, evaluate's objective values and compare_policies). It prints
evaluate's closing line for DPO against SFT and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from instructflow.tasks.config import load_config
from instructflow.tasks.eval_prompts import load_eval_prompts
from instructflow.tasks.evaluation import compare_policies, comparison_lines, flat_metrics
from instructflow.tasks.preferences import load_preference_file, split_pairs
from instructflow.tasks.prompts import format_prompt
from instructflow.tasks.quality import objective_values
from instructflow.tasks.seeds import bundled_seed_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, required=True, help="an SFT checkpoint (HF model dir)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the models and replies")
    parser.add_argument("--reward", type=Path, help="a reward model dir to score with (default: train one)")
    parser.add_argument("--pairs", type=Path, default=bundled_seed_dir() / "preferences_sample.jsonl")
    parser.add_argument("--dpo", default="{}", help="JSON: dpo section keys over the cpu profile's")
    parser.add_argument("--prompts", type=int, default=64, help="bundled eval prompts (the cpu profile's 64)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from instructflow.models.dpo import train_dpo
    from instructflow.models.reward import score_each, train_reward
    from instructflow.models.sampling import greedy_replies

    cfg = load_config("cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    rows = [{"pair_key": p.key, "prompt": format_prompt(cfg, tokenizer, p.prompt), "chosen": p.chosen,
             "rejected": p.rejected} for p in load_preference_file(args.pairs)]
    train, held = split_pairs(rows, cfg.reward.eval_fraction, cfg.reward.seed)   # the reward stage's split
    train, held = ([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in part] for part in (train, held))
    report: dict = {"pairs": str(args.pairs), "train_pairs": len(train), "eval_pairs": len(held)}
    if args.reward is None:
        started = time.time()
        rm = train_reward(train, held, cfg.reward, args.sft, args.out / "reward")
        args.reward = Path(rm["checkpoint"])
        report["reward"] = {"accuracy_after": rm["accuracy_after"], "wall_s": round(time.time() - started)}
    section = dataclasses.replace(cfg.dpo, **json.loads(args.dpo))
    started = time.time()
    dpo = train_dpo(train, held, section, args.sft, args.out / "dpo")
    report["dpo"] = {"settings": json.loads(args.dpo), "eval_accuracy": dpo["eval_accuracy"],
                     "eval_margin": dpo["eval_margin"], "wall_s": round(time.time() - started)}

    eval_prompts = load_eval_prompts(bundled_seed_dir() / "eval_prompts.jsonl")[:args.prompts]
    prompts = [format_prompt(cfg, tokenizer, p.instruction, p.input) for p in eval_prompts]
    replies = {name: greedy_replies(path, prompts, max_new_tokens=args.max_new_tokens)
               for name, path in (("sft", args.sft), ("dpo", Path(dpo["checkpoint"])))}
    scores = score_each(args.reward, prompts, [r.text for r in replies["sft"]], [r.text for r in replies["dpo"]])
    values = {name: {"rm_score": scores[arm], **objective_values([(r.text, r.ended) for r in replies[name]])}
              for arm, name in enumerate(("sft", "dpo"))}
    comparisons = compare_policies(values, seed=7)   # evaluate's comparison: paired bootstrap per measure
    for line in comparison_lines(comparisons, len(prompts)):
        print(line)
    report["differences"] = flat_metrics(comparisons)
    (args.out / "replies.json").write_text(json.dumps({n: [{"reply": r.text, "ended": r.ended} for r in replies[n]]
                                                       for n in replies}, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

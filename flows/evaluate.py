"""Stage evaluate: every aligned policy present (the profile's methods) against SFT on the same held-out
prompts and the same greedy decoding: reward-model score (and the held-out reward model's), KL to SFT,
the judge's win rate in both orders, and objective checks of the replies (ended with eos within the
token budget, repetition, length); for each method the mean difference to SFT with a seeded paired
bootstrap interval (tasks/evaluation.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE
from rich.progress import Progress

from instructflow.flows.common import StageContext, StageSpec, publish_artifacts, stage_context
from instructflow.flows.teacher import judge_with_teacher
from instructflow.tasks.config import Config, result_settings, stable_hash
from instructflow.tasks.eval_prompts import read_eval_prompt_file, training_overlap
from instructflow.tasks.evaluation import (PAIRED_MEASURES, SINGLE_MEASURES, compare_policies, comparison_lines,
                                           comparison_rows, flat_metrics, judge_scores)
from instructflow.tasks.plots import plot_intervals
from instructflow.tasks.prompts import format_prompt, heldout_prompts, reward_split
from instructflow.tasks.quality import objective_values
from instructflow.tasks.seeds import shipped_path
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse

POLICY_CHECKPOINTS = {"ppo": "ppo_policy", "dpo": "dpo_policy", "grpo": "grpo_policy"}


def prompt_set(cfg: Config, wh: Warehouse, sft_path: str) -> tuple[list[tuple[str, str]], str, list[str]]:
    """(prompts as (task text for the judge, prompt in the SFT format), where they came from, the task texts
    that also appear in the data some stage trained on). From `evaluate.prompts_file` if set, else the SFT
    held-out split in a seeded order."""
    from transformers import AutoTokenizer

    evaluate = cfg.evaluate
    trained = [(r["instruction"], r["input"]) for r in queries.sft_examples(wh, wh.latest_checkpoint("sft")["dataset_hash"])]
    trained += [(p["prompt"], "") for p in queries.training_pairs(wh)]
    if evaluate.prompts_file:
        path = shipped_path(evaluate.prompts_file, "eval_prompts.jsonl")
        found = read_eval_prompt_file(path).prompts[:evaluate.prompts]
        tokenizer = AutoTokenizer.from_pretrained(sft_path)
        prompts = [(p.instruction + (f"\n\n{p.input}" if p.input else ""), format_prompt(cfg, tokenizer, p.instruction, p.input))
                   for p in found]
        overlap = [f"{p.origin}: {p.instruction[:80]}" for p in training_overlap(found, trained)]
        return prompts, f"file {path}", overlap
    prompts = heldout_prompts(cfg, wh, "eval", evaluate.prompts, evaluate.seed)
    # the RL stages sample their prompts from the same split: name the ones they trained on
    rl_prompts = {p for method in ("ppo", "grpo") if method in cfg.methods
                  for _, p in heldout_prompts(cfg, wh, getattr(cfg, method).prompt_source,
                                              getattr(cfg, method).prompts, getattr(cfg, method).seed)}
    judged = {p for _, p in trained}
    overlap = [text[:80] for text, prompt in prompts if prompt in rl_prompts or text in judged]
    return prompts, "sft held-out split", overlap


@task(name="generate-replies", cache_policy=NONE)
def generate(ctx: StageContext, policies: dict[str, str], prompts: list[str]) -> dict[str, list]:
    """One greedy reply per prompt and policy: the comparison is between policies, not sampling draws."""
    from instructflow.models.sampling import greedy_replies

    replies = {}
    with Progress() as progress:
        for name, path in policies.items():
            bar = progress.add_task(f"evaluate: {name} replies", total=len(prompts))
            replies[name] = greedy_replies(Path(path), prompts, max_new_tokens=ctx.cfg.evaluate.max_new_tokens,
                                           on_progress=lambda done, total, bar=bar: progress.update(bar, completed=done))
    return replies


@task(name="score-replies", cache_policy=NONE)
def score(reward_path: str, prompts: list[str], replies: dict[str, list[str]]) -> dict[str, list[float]]:
    """Every policy's replies scored by one reward model, loaded once."""
    from instructflow.models.reward import score_each

    return dict(zip(replies, score_each(Path(reward_path), prompts, *replies.values())))


@task(name="kl-to-sft", cache_policy=NONE)
def kl_to_sft(policies: dict[str, str], prompts: list[str], replies: dict[str, list[str]]) -> dict[str, list[float]]:
    from instructflow.models.evaluate import policy_kl

    return {name: policy_kl(Path(path), Path(policies["sft"]), prompts, replies[name])
            for name, path in policies.items() if name != "sft"}


HOLDOUT_CHECK_PAIRS = 32  # the held-out RM's accuracy is measured on this many of the reward stage's train pairs


@task(name="train-holdout-reward", cache_policy=NONE)
def train_holdout_reward(ctx: StageContext, sft: str) -> dict:
    """evaluate.holdout_reward: a second reward model from the SFT checkpoint, trained on the reward
    stage's eval split only (same split function and seed, so the policies' reward model never trained on
    one of its pairs) and checked on pairs that reward model trained on. Reused while its inputs are unchanged."""
    from transformers import AutoTokenizer

    from instructflow.models.launch import run_recipe

    seen, holdout = reward_split(ctx.cfg, AutoTokenizer.from_pretrained(sft), queries.training_pairs(ctx.wh))
    if len(holdout) < 2 or not seen:
        raise ValueError(f"evaluate.holdout_reward needs >= 2 pairs outside the reward model's training set, "
                         f"got {len(holdout)} of {len(seen) + len(holdout)}: raise reward.eval_fraction or add pairs")
    holdout_keys, seen_keys = [r["pair_key"] for r in holdout], {r["pair_key"] for r in seen}
    if seen_keys & set(holdout_keys):  # the whole point of this model: never a pair the policies' RM learned from
        raise RuntimeError("holdout reward split overlaps the reward model's training pairs")
    identity = [sorted(holdout_keys), sft, result_settings(ctx.cfg.reward)]  # reward.keep_checkpoints: disk only
    output_dir = ctx.out_dir / f"holdout-reward-{stable_hash(identity)}"
    # the reward recipe with the reward settings, launcher included
    result = run_recipe("reward", holdout, seen[:HOLDOUT_CHECK_PAIRS], ctx.cfg.reward, Path(sft), output_dir,
                        on_step=lambda step, values: ctx.step(step, {f"holdout_rm_{k}": v for k, v in values.items()}))
    return {"checkpoint": str(result["checkpoint"]), "train_pairs": len(holdout),
            "accuracy_after": result["accuracy_after"], "margin_after": result["margin_after"]}


@task(name="judge-vs-sft", cache_policy=NONE)
def judge(ctx: StageContext, tasks_text: list[str], replies: dict[str, list[str]]) -> dict[str, list[str | None]]:
    """The teacher judges each method's reply against SFT's, in both orders (one teacher session for all);
    identical replies are a tie without asking. Outcomes from the method's side: win, loss, tie, disagree, invalid."""
    limit = ctx.cfg.evaluate.judge_prompts or len(tasks_text)
    methods = [m for m in replies if m != "sft"]
    asked = [(m, i) for m in methods for i in range(min(limit, len(tasks_text)))
             if replies[m][i].strip() != replies["sft"][i].strip()]
    verdicts = judge_with_teacher(ctx, [(tasks_text[i], replies[m][i], replies["sft"][i]) for m, i in asked]) if asked else []
    outcomes = {m: [("tie" if i < limit else None) for i in range(len(tasks_text))] for m in methods}
    for (m, i), verdict in zip(asked, verdicts):
        outcomes[m][i] = {"a": "win", "b": "loss"}.get(verdict["outcome"], verdict["outcome"])
    return outcomes


@flow(name="evaluate", log_prints=True, validate_parameters=False)
def evaluate_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        evaluate = cfg.evaluate
        sft, reward = ctx.wh.latest_checkpoint("sft"), ctx.wh.latest_checkpoint("reward")
        if not (sft and reward):
            raise ValueError("evaluate needs SFT and reward checkpoints: run the earlier stages first")
        policies = {"sft": sft["path"]}
        for method in cfg.methods:
            checkpoint = ctx.wh.latest_checkpoint(POLICY_CHECKPOINTS[method])
            if checkpoint is None:
                raise ValueError(f"evaluate: no {method} policy yet: run `instructflow stage {method}` first")
            policies[method] = checkpoint["path"]
        prompts, prompt_source, overlap = prompt_set(cfg, ctx.wh, sft["path"])
        tasks_text, formatted = [t for t, _ in prompts], [p for _, p in prompts]
        replies = generate(ctx, policies, formatted)
        texts = {name: [r.text for r in rs] for name, rs in replies.items()}
        values: dict[str, dict[str, list]] = {name: {"rm_score": s} for name, s in score(reward["path"], formatted, texts).items()}
        for name, rs in replies.items():
            values[name].update(objective_values([(r.text, r.ended) for r in rs]))
        for name, kls in kl_to_sft(policies, formatted, texts).items():
            values[name]["kl_to_sft"] = kls
        holdout = train_holdout_reward(ctx, sft["path"]) if evaluate.holdout_reward else None
        if holdout:
            for name, scores in score(holdout["checkpoint"], formatted, texts).items():
                values[name]["rm_holdout_score"] = scores
        outcomes = judge(ctx, tasks_text, texts) if evaluate.judge and len(policies) > 1 else {}
        for name, found in outcomes.items():
            values[name]["win"] = judge_scores(found)

        comparisons = compare_policies(values, resamples=evaluate.bootstrap_resamples,
                                       confidence=evaluate.confidence, seed=evaluate.seed)
        queries.insert_eval_replies(ctx.wh, ctx.stage_run_id, [
            {"prompt_index": i, "prompt": formatted[i], "policy": name, "reply": texts[name][i],
             "ended": bool(values[name]["ended"][i]), "words": int(values[name]["words"][i]),
             "repetition": values[name]["repetition"][i], "rm_score": values[name]["rm_score"][i],
             "rm_holdout_score": values[name].get("rm_holdout_score", [None] * len(formatted))[i],
             "kl_to_sft": values[name].get("kl_to_sft", [None] * len(formatted))[i],
             "judge_outcome": outcomes.get(name, [None] * len(formatted))[i]}
            for name in policies for i in range(len(formatted))])
        metrics = {"prompts": len(formatted), "prompt_source": prompt_source, "prompts_in_training": len(overlap),
                   "methods": [m for m in policies if m != "sft"], "max_new_tokens": evaluate.max_new_tokens,
                   "confidence": evaluate.confidence, "bootstrap_resamples": evaluate.bootstrap_resamples,
                   "rm_score_sft": _mean(values["sft"]["rm_score"]), "ended_sft": _mean(values["sft"]["ended"]),
                   "repetition_sft": _mean(values["sft"]["repetition"]), "words_sft": _mean(values["sft"]["words"]),
                   **flat_metrics(comparisons),
                   **{f"judged_{m}": sum(o in ("win", "loss", "tie") for o in found) for m, found in outcomes.items()},
                   "comparison": comparison_rows(comparisons),
                   "summary": comparison_lines(comparisons, len(formatted))}
        if holdout:  # side by side with rm_score_*: a gain the policies' RM sees but this one does not is reward hacking
            metrics |= {"rm_holdout_train_pairs": holdout["train_pairs"], "rm_holdout_accuracy": holdout["accuracy_after"],
                        "rm_holdout_checkpoint": holdout["checkpoint"]}
        ctx.finish(metrics, output_hash=stable_hash([metrics, ctx.inputs]))
        labels = {**{k: label for k, (label, _) in PAIRED_MEASURES.items()}, **SINGLE_MEASURES}
        panels = {labels[c.measure] + (" (method - SFT)" if c.baseline is not None else ""): {} for c in comparisons}
        for c in comparisons:
            panels[labels[c.measure] + (" (method - SFT)" if c.baseline is not None else "")][c.method] = (c.diff, c.lo, c.hi)
        plot = plot_intervals(ctx.out_dir / "differences.png",
                              f"each method vs SFT on {len(formatted)} held-out prompts, "
                              f"{evaluate.confidence:.0%} paired bootstrap intervals", panels)
        notes = "\n".join(["## Method vs SFT", "", "| method | measure | SFT | method | difference [interval] |",
                           "|---|---|---|---|---|"] +
                          [f"| {r['method']} | {r['label']} | {_shown(r['baseline'])} | {_shown(r['mean'])} | {r['shown']} |"
                           for r in metrics["comparison"]] +
                          ["", f"Prompts: {prompt_source}; {len(overlap)} also appear in training data"
                           + (": " + "; ".join(overlap[:10]) if overlap else ".")])
        headline = {k: v for k, v in metrics.items() if k not in ("comparison", "summary")}
        publish_artifacts(ctx, "evaluate", headline, samples=queries.eval_samples(ctx.wh, ctx.stage_run_id),
                          plots={"differences to SFT": plot}, notes=notes)
    return metrics


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _shown(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def evaluate_data_inputs(cfg: Config, wh: Warehouse) -> dict:
    if not cfg.evaluate.prompts_file:
        return {}
    path = shipped_path(cfg.evaluate.prompts_file, "eval_prompts.jsonl")
    return {"prompts_file": hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(path)}


STAGE = StageSpec(
    name="evaluate", flow=evaluate_flow, upstream=("sft", "reward", "ppo", "dpo", "grpo"),
    data_inputs=evaluate_data_inputs,
    # which methods it compares; the held-out reward model trains with the reward settings on the reward split;
    # the held-out split and the RL stages' prompts (named as overlap) come from ppo / grpo settings
    config_sections=("evaluate", "methods", "reward", "ppo.prompt_source", "ppo.prompts", "ppo.seed",
                     "grpo.prompt_source", "grpo.prompts", "grpo.seed"),
    summary="every aligned policy vs SFT on the same held-out prompts: reward-model score, objective checks "
            "(ended within budget, repetition, length), KL, judge win rate; paired bootstrap intervals",
    headline=("prompts", "methods", "rm_score_sft", "ended_sft", "repetition_sft"),
)

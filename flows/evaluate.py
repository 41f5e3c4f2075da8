"""Stage 7, evaluate: on held-out prompts (after those PPO trained on), compare PPO with SFT by
reward-model score, KL of PPO to the reference (SFT), and the teacher's win rate in both orders."""
from __future__ import annotations

import statistics
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from instructflow.flows.common import StageContext, StageSpec, publish_artifacts, stage_context
from instructflow.flows.teacher import judge_with_teacher
from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.judge import win_rate
from instructflow.tasks.plots import plot_bars, plot_histograms
from instructflow.tasks.prompts import heldout_prompts, reward_split
from instructflow.warehouse import queries


@task(name="evaluate-models", cache_policy=NONE)
def measure(ctx: StageContext, prompts: list[tuple[str, str]], sft: str, ppo: str, reward: str) -> list[dict]:
    from instructflow.models.evaluate import policy_kl
    from instructflow.models.reward import score_each
    from instructflow.models.sampling import generate_responses

    evaluate = ctx.cfg.evaluate
    formatted = [prompt for _, prompt in prompts]
    # greedy decoding: the comparison is between policies, not between sampling draws
    sft_out = [r[0] for r in generate_responses(Path(sft), formatted, k=1, temperature=0.0,
                                                max_new_tokens=evaluate.max_new_tokens, seed=evaluate.seed)]
    ppo_out = [r[0] for r in generate_responses(Path(ppo), formatted, k=1, temperature=0.0,
                                                max_new_tokens=evaluate.max_new_tokens, seed=evaluate.seed)]
    rm_sft, rm_ppo = score_each(Path(reward), formatted, sft_out, ppo_out)
    kl = policy_kl(Path(ppo), Path(sft), formatted, ppo_out)
    return [{"instruction": inst, "prompt": fmt, "sft_response": s, "ppo_response": p, "rm_score_sft": a,
             "rm_score_ppo": b, "kl_ppo": k, "judge_outcome": None}
            for (inst, fmt), s, p, a, b, k in zip(prompts, sft_out, ppo_out, rm_sft, rm_ppo, kl)]


HOLDOUT_CHECK_PAIRS = 32  # the held-out RM's accuracy is measured on this many of the reward stage's train pairs


@task(name="train-holdout-reward", cache_policy=NONE)
def train_holdout_reward(ctx: StageContext, sft: str) -> dict:
    """evaluate.holdout_reward: a second reward model from the SFT checkpoint, trained on the reward
    stage's eval split only (same split function and seed, so PPO's reward model never trained on one
    of its pairs) and checked on pairs PPO's reward model trained on. Reused while its inputs are unchanged."""
    from transformers import AutoTokenizer

    from instructflow.models.reward import train_reward

    seen, holdout = reward_split(ctx.cfg, AutoTokenizer.from_pretrained(sft), queries.training_pairs(ctx.wh))
    if len(holdout) < 2 or not seen:
        raise ValueError(f"evaluate.holdout_reward needs >= 2 pairs outside the reward model's training set, "
                         f"got {len(holdout)} of {len(seen) + len(holdout)}: raise reward.eval_fraction or add pairs")
    holdout_keys, seen_keys = [r["pair_key"] for r in holdout], {r["pair_key"] for r in seen}
    if seen_keys & set(holdout_keys):  # the whole point of this model: never a pair PPO's RM learned from
        raise RuntimeError("holdout reward split overlaps the reward model's training pairs")
    output_dir = ctx.out_dir / f"holdout-reward-{stable_hash([sorted(holdout_keys), sft, vars(ctx.cfg.reward)])}"
    result = train_reward(holdout, seen[:HOLDOUT_CHECK_PAIRS], ctx.cfg.reward, Path(sft),
                          output_dir, on_step=lambda step, values: ctx.step(step, {f"holdout_rm_{k}": v
                                                                                   for k, v in values.items()}))
    return {"checkpoint": str(result["checkpoint"]), "train_pairs": len(holdout),
            "accuracy_after": result["accuracy_after"], "margin_after": result["margin_after"]}


@task(name="score-holdout-reward", cache_policy=NONE)
def score_holdout(rows: list[dict], checkpoint: str) -> None:
    from instructflow.models.reward import score_each

    sft_scores, ppo_scores = score_each(Path(checkpoint), [r["prompt"] for r in rows],
                                        [r["sft_response"] for r in rows], [r["ppo_response"] for r in rows])
    for row, sft_score, ppo_score in zip(rows, sft_scores, ppo_scores):
        row["rm_holdout_score_sft"], row["rm_holdout_score_ppo"] = sft_score, ppo_score


@task(name="judge-ppo-vs-sft", cache_policy=NONE)
def judge(ctx: StageContext, rows: list[dict]) -> None:
    pairs = [(r["instruction"], r["ppo_response"], r["sft_response"]) for r in rows]
    verdicts = judge_with_teacher(ctx, pairs)
    for row, verdict in zip(rows, verdicts):
        same = row["ppo_response"].strip() == row["sft_response"].strip()
        row["judge_outcome"] = "tie" if same else {"a": "ppo", "b": "sft"}.get(verdict["outcome"], verdict["outcome"])


@flow(name="evaluate", log_prints=True, validate_parameters=False)
def evaluate_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        evaluate = ctx.cfg.evaluate
        sft, reward, ppo = (ctx.wh.latest_checkpoint(k) for k in ("sft", "reward", "ppo_policy"))
        if not (sft and reward and ppo):
            raise ValueError("evaluate needs SFT, reward and PPO checkpoints: run the earlier stages first")
        # prompts after the ones PPO trained on (the split wraps around when it is too small)
        prompts = heldout_prompts(ctx.cfg, ctx.wh, ctx.cfg.ppo.prompt_source, evaluate.prompts, ctx.cfg.ppo.seed,
                                  skip=ctx.cfg.ppo.prompts)
        rows = measure(ctx, prompts, sft["path"], ppo["path"], reward["path"])
        holdout = train_holdout_reward(ctx, sft["path"]) if evaluate.holdout_reward else None
        if holdout:
            score_holdout(rows, holdout["checkpoint"])
        if evaluate.judge:
            judge(ctx, rows)
        queries.insert_eval_results(ctx.wh, ctx.stage_run_id, rows)
        outcomes = [r["judge_outcome"] for r in rows if r["judge_outcome"] in ("ppo", "sft", "tie")]
        metrics = {"prompts": len(rows),
                   "rm_score_sft": statistics.fmean(r["rm_score_sft"] for r in rows),
                   "rm_score_ppo": statistics.fmean(r["rm_score_ppo"] for r in rows),
                   "kl_ppo": statistics.fmean(r["kl_ppo"] for r in rows),
                   "win_rate_ppo_vs_sft": win_rate(outcomes, "ppo"),
                   "judged": len(outcomes),
                   "judge_disagreements": sum(r["judge_outcome"] == "disagree" for r in rows),
                   "judge_invalid": sum(r["judge_outcome"] == "invalid" for r in rows),
                   "policy_checkpoint": ppo["path"]}
        if holdout:  # side by side with rm_score_*: a gain PPO's own RM sees but this one does not is reward hacking
            metrics |= {"rm_holdout_score_sft": statistics.fmean(r["rm_holdout_score_sft"] for r in rows),
                        "rm_holdout_score_ppo": statistics.fmean(r["rm_holdout_score_ppo"] for r in rows),
                        "rm_holdout_train_pairs": holdout["train_pairs"],
                        "rm_holdout_accuracy": holdout["accuracy_after"],
                        "rm_holdout_checkpoint": holdout["checkpoint"]}
        ctx.finish(metrics, output_hash=stable_hash([metrics, ctx.inputs]))
        plots = {
            "reward-model score": plot_histograms(ctx.out_dir / "rm_scores.png", "reward-model score, held-out prompts",
                                                  {"SFT": [r["rm_score_sft"] for r in rows],
                                                   "PPO": [r["rm_score_ppo"] for r in rows]}, xlabel="score"),
            "held-out reward-model score": plot_histograms(
                ctx.out_dir / "rm_holdout_scores.png", "held-out reward model (never seen by PPO), held-out prompts",
                {"SFT": [r["rm_holdout_score_sft"] for r in rows], "PPO": [r["rm_holdout_score_ppo"] for r in rows]},
                xlabel="score") if holdout else None,
            "judge outcomes": plot_bars(ctx.out_dir / "judge.png", "teacher judge, PPO vs SFT (both orders)",
                                        {k: sum(r["judge_outcome"] == k for r in rows)
                                         for k in ("ppo", "sft", "tie", "disagree", "invalid")}, ylabel="prompts"),
        }
        publish_artifacts(ctx, "evaluate", metrics, samples=queries.eval_rows(ctx.wh, ctx.stage_run_id), plots=plots)
    return metrics


STAGE = StageSpec(
    name="evaluate", flow=evaluate_flow, upstream=("sft", "reward", "ppo"),
    # the prompts after PPO's (ppo.*), and the held-out reward model trains with the reward settings
    config_sections=("evaluate", "reward", "ppo.prompt_source", "ppo.prompts", "ppo.seed"),
    summary="held-out reward, KL and judge win rate of PPO vs SFT",
    headline=("prompts", "rm_score_sft", "rm_score_ppo", "kl_ppo", "win_rate_ppo_vs_sft"),
)

"""Stage 7, evaluate: on held-out prompts (after those PPO trained on), compare PPO with SFT by
reward-model score, KL of PPO to the reference (SFT), and the teacher's win rate in both orders."""
from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from instructflow.flows.common import StageContext, publish_artifacts, stable_hash, stage_context
from instructflow.flows.preferences import judge_pairs
from instructflow.flows.sft import heldout_prompts
from instructflow.flows.stages import StageSpec
from instructflow.flows.teacher import teacher_session
from instructflow.tasks.plots import plot_bars, plot_histograms
from instructflow.warehouse import queries


@task(name="evaluate-models", cache_policy=NONE)
def measure(ctx: StageContext, prompts: list[tuple[str, str]], sft: str, ppo: str, reward: str) -> list[dict]:
    from instructflow.models.evaluate import policy_kl
    from instructflow.models.reward import score
    from instructflow.models.sampling import generate_responses

    e = ctx.cfg.evaluate
    formatted = [p for _, p in prompts]
    # greedy decoding: the comparison is between policies, not between sampling draws
    sft_out = [r[0] for r in generate_responses(Path(sft), formatted, k=1, temperature=0.0,
                                                max_new_tokens=e.max_new_tokens, seed=e.seed)]
    ppo_out = [r[0] for r in generate_responses(Path(ppo), formatted, k=1, temperature=0.0,
                                                max_new_tokens=e.max_new_tokens, seed=e.seed)]
    rm_sft = score(Path(reward), formatted, sft_out)
    rm_ppo = score(Path(reward), formatted, ppo_out)
    kl = policy_kl(Path(ppo), Path(sft), formatted, ppo_out)
    return [{"instruction": inst, "prompt": fmt, "sft_response": s, "ppo_response": p, "rm_score_sft": a,
             "rm_score_ppo": b, "kl_ppo": k, "judge_outcome": None}
            for (inst, fmt), s, p, a, b, k in zip(prompts, sft_out, ppo_out, rm_sft, rm_ppo, kl)]


@task(name="judge-ppo-vs-sft", cache_policy=NONE)
def judge(ctx: StageContext, rows: list[dict]) -> None:
    pairs = [(r["instruction"], r["ppo_response"], r["sft_response"]) for r in rows]
    with teacher_session(ctx.cfg, ctx.home) as settings:
        verdicts = asyncio.run(judge_pairs(ctx.wh, settings, "evaluate", pairs))
    for row, verdict in zip(rows, verdicts):
        same = row["ppo_response"].strip() == row["sft_response"].strip()
        row["judge_outcome"] = "tie" if same else {"a": "ppo", "b": "sft"}.get(verdict["outcome"], verdict["outcome"])


@flow(name="evaluate", log_prints=True)
def evaluate_flow(profile: str = "cpu", home: str | None = None, config: str | None = None,
                  run_id: str | None = None, force: bool = False) -> dict:
    with stage_context("evaluate", profile, home, config, run_id, force) as ctx:
        e = ctx.cfg.evaluate
        sft, reward, ppo = (ctx.wh.latest_checkpoint(k) for k in ("sft", "reward", "ppo_policy"))
        if not (sft and reward and ppo):
            raise ValueError("evaluate needs SFT, reward and PPO checkpoints: run the earlier stages first")
        # prompts after the ones PPO trained on (the split wraps around when it is too small)
        prompts = heldout_prompts(ctx.cfg, ctx.wh, ctx.cfg.ppo.prompt_source, e.prompts, ctx.cfg.ppo.seed,
                                  skip=ctx.cfg.ppo.prompts)
        rows = measure(ctx, prompts, sft["path"], ppo["path"], reward["path"])
        if e.judge:
            judge(ctx, rows)
        queries.insert_eval_results(ctx.wh, ctx.stage_run_id, rows)
        outcomes = [r["judge_outcome"] for r in rows if r["judge_outcome"] in ("ppo", "sft", "tie")]
        wins = sum(1.0 if o == "ppo" else 0.5 if o == "tie" else 0.0 for o in outcomes)
        metrics = {"prompts": len(rows),
                   "rm_score_sft": statistics.fmean(r["rm_score_sft"] for r in rows),
                   "rm_score_ppo": statistics.fmean(r["rm_score_ppo"] for r in rows),
                   "kl_ppo": statistics.fmean(r["kl_ppo"] for r in rows),
                   "win_rate_ppo_vs_sft": wins / len(outcomes) if outcomes else None,
                   "judged": len(outcomes),
                   "judge_disagreements": sum(r["judge_outcome"] == "disagree" for r in rows),
                   "judge_invalid": sum(r["judge_outcome"] == "invalid" for r in rows),
                   "policy_checkpoint": ppo["path"]}
        ctx.finish(metrics, output_hash=stable_hash([metrics, ctx.inputs]))
        plots = {
            "reward-model score": plot_histograms(ctx.out_dir / "rm_scores.png", "reward-model score, held-out prompts",
                                                  {"SFT": [r["rm_score_sft"] for r in rows],
                                                   "PPO": [r["rm_score_ppo"] for r in rows]}, xlabel="score"),
            "judge outcomes": plot_bars(ctx.out_dir / "judge.png", "teacher judge, PPO vs SFT (both orders)",
                                        {k: sum(r["judge_outcome"] == k for r in rows)
                                         for k in ("ppo", "sft", "tie", "disagree", "invalid")}, ylabel="prompts"),
        }
        publish_artifacts(ctx, "evaluate", metrics, samples=queries.eval_rows(ctx.wh, ctx.stage_run_id), plots=plots)
    return metrics


STAGE = StageSpec(
    name="evaluate", flow=evaluate_flow, config_sections=("evaluate",), upstream=("sft", "reward", "ppo"),
    summary="held-out reward, KL and judge win rate of PPO vs SFT",
)

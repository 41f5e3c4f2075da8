"""Stage 2, filter: re-derive every candidate's verdict (heuristics, then exact ROUGE-L against
seeds + kept so far, greedy in arrival order) from the stored candidates. Sends no request."""
from __future__ import annotations

import time

from prefect import flow, task
from prefect.cache_policies import NONE
from rich.progress import track

from instructflow.flows.common import StageContext, StageSpec, publish_artifacts, seed_paths, stage_context
from instructflow.tasks.config import Config
from instructflow.tasks.generate import build_filter, candidate_pool_id, judge_candidate
from instructflow.tasks.plots import plot_histograms
from instructflow.tasks.seeds import load_seeds, seeds_content_hash, sync_seed_tasks
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse


@task(name="filter-candidates", cache_policy=NONE)
def refilter(ctx: StageContext) -> dict:
    near_dup = build_filter(ctx.cfg, queries.seed_rows(ctx.wh))
    updates, scores = [], {"kept": [], "near_duplicate": []}
    for row in track(queries.candidates_in_order(ctx.wh), description="filter", transient=True):
        verdict, reason, heuristic, rouge = judge_candidate(
            ctx.cfg, near_dup, row["instruction"], row["heuristic_reason"] == "truncated",
            lambda: candidate_pool_id(row["candidate_id"]))
        updates.append((verdict, reason, heuristic, rouge.max_score if rouge else None,
                        rouge.most_similar_id if rouge else None,
                        [list(t) for t in rouge.top_k] if rouge else None,
                        rouge.mean_score if rouge else None, row["candidate_id"]))
        if rouge is not None:
            scores["kept" if verdict == "kept" else "near_duplicate"].append(rouge.max_score)
    queries.update_verdicts(ctx.wh, updates)  # one transaction: a kill leaves the previous verdicts
    return scores


@flow(name="filter", log_prints=True, validate_parameters=False)
def filter_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        started = time.monotonic()
        sync_seed_tasks(ctx.wh, seed_paths(ctx.cfg), max_chars=ctx.cfg.generate.max_seed_chars)
        scores = refilter(ctx)
        counts = queries.candidate_counts(ctx.wh)
        metrics = {"candidates": counts["candidates"], "kept": counts["kept"],
                   "rejected_near_duplicate": counts["rejected_by_reason"].get("near_duplicate", 0),
                   "rejected_by_reason": counts["rejected_by_reason"], "threshold": ctx.cfg.filter.threshold,
                   "seconds": round(time.monotonic() - started, 3)}
        ctx.finish(metrics, output_hash=queries.kept_fingerprint(ctx.wh))
        plot = plot_histograms(ctx.out_dir / "max_rouge.png", "max ROUGE-L vs pool", scores, xlabel="max ROUGE-L F")
        publish_artifacts(ctx, "filter", metrics, samples=queries.candidate_samples(ctx.wh),
                          plots={"max ROUGE-L vs pool": plot})
    return metrics


def filter_data_inputs(cfg: Config, wh: Warehouse) -> dict:
    return {"seeds": seeds_content_hash(load_seeds(seed_paths(cfg))),
            "candidates": queries.candidates_fingerprint(wh)}


STAGE = StageSpec(
    name="filter", flow=filter_flow, config_sections=("filter", "generate.max_seed_chars"), data_inputs=filter_data_inputs,
    summary="heuristic filters + exact ROUGE-L near-duplicate filter over every stored candidate",
    headline=("candidates", "kept", "rejected_near_duplicate"),
)

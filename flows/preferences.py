"""Stage 4, preferences: sample K responses per held-out prompt from the SFT model, have the teacher
judge each pair in both orders (a pair is kept only when both orders agree), and import any
external preference files into the same table."""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE
from rich.progress import Progress

from instructflow.flows.common import StageContext, StageSpec, publish_artifacts, stage_context
from instructflow.flows.teacher import judge_with_teacher
from instructflow.tasks.config import Config, stable_hash
from instructflow.tasks.preference_import import FilePlan, ImportReport, import_planned, plan_imports
from instructflow.tasks.preferences import file_sha256, pair_key, sample_pairs
from instructflow.tasks.prompts import heldout_prompts
from instructflow.tasks.seeds import shipped_path
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse


@task(name="sample-responses", cache_policy=NONE)
def sample_responses(ctx: StageContext, model_path: str, prompts: list[str]) -> dict[str, list[str]]:
    """K samples per prompt from the SFT model; prompts sampled before (same model) are reused, unless forced."""
    from instructflow.models.sampling import generate_responses

    preferences = ctx.cfg.preferences
    if ctx.force:
        queries.forget_responses(ctx.wh, "preferences", model_path, prompts)
    stored = queries.stored_responses(ctx.wh, "preferences", model_path, prompts)
    missing = [q for q in prompts if len(stored.get(q, [])) < preferences.k]
    if missing:
        with Progress() as progress:
            bar = progress.add_task("sampling responses", total=len(missing))
            samples = generate_responses(Path(model_path), missing, k=preferences.k,
                                         temperature=preferences.temperature, top_p=preferences.top_p,
                                         max_new_tokens=preferences.max_new_tokens, seed=preferences.seed,
                                         on_progress=lambda done, total: progress.update(bar, completed=done))
        fresh = dict(zip(missing, samples))
        queries.insert_responses(ctx.wh, "preferences", model_path, fresh)
        stored.update(fresh)
    return stored


@task(name="judge-pairs", cache_policy=NONE)
def judge(ctx: StageContext, samples: dict[str, list[str]], instruction_of: dict[str, str]) -> int:
    pairs = [(instruction_of[prompt], texts[i], texts[j]) for prompt, texts in samples.items()
             for i, j in sample_pairs(len(texts)) if texts[i].strip() != texts[j].strip()]
    rows = judge_with_teacher(ctx, pairs)
    for row in rows:
        row.update(source="judged", pair_key=pair_key(row["prompt"], row["response_a"], row["response_b"]),
                   chosen={"a": row["response_a"], "b": row["response_b"]}.get(row["outcome"]),
                   rejected={"a": row["response_b"], "b": row["response_a"]}.get(row["outcome"]))
    return queries.replace_judged_pairs(ctx.wh, rows)


@task(name="import-preferences", cache_policy=NONE)
def import_files(wh: Warehouse, plans: list[FilePlan], max_field_chars: int, planning_s: float = 0.0) -> ImportReport:
    """The files `plan_imports` checked, streamed in batches, all of a file or none of it; unchanged files
    are not read."""
    return import_planned(wh, plans, max_field_chars, planning_s)


@flow(name="preferences", log_prints=True, validate_parameters=False)
def preferences_flow(cfg: Config, home: str, run_id: str | None = None, force: bool = False) -> dict:
    with stage_context(STAGE, cfg, home, run_id, force) as ctx:
        preferences = ctx.cfg.preferences
        start = time.perf_counter()
        # every new or changed import file is read through now: a bad line fails the stage in one line
        # before any sampling (files imported before, by content hash, are not read)
        plans = plan_imports(ctx.wh, resolve_import_files(preferences.import_files), preferences.max_field_chars,
                             reread=ctx.force)
        planning_s = time.perf_counter() - start
        sft = ctx.wh.latest_checkpoint("sft")
        if sft is None:
            raise RuntimeError("preferences samples from the SFT model, and there is none yet: "
                               "run `instructflow stage sft` first")
        chosen_prompts = heldout_prompts(ctx.cfg, ctx.wh, preferences.prompt_source, preferences.prompts,
                                         preferences.seed)
        instruction_of = {prompt: text for text, prompt in chosen_prompts}
        samples = sample_responses(ctx, sft["path"], [prompt for _, prompt in chosen_prompts])
        new_pairs = judge(ctx, samples, instruction_of)
        # imported once the stage's own work succeeded: a failed stage leaves no import behind it
        imports = import_files(ctx.wh, plans, preferences.max_field_chars, planning_s)
        counts = queries.preference_counts(ctx.wh)
        metrics = {"prompts": len(chosen_prompts), **counts, "new_pairs": new_pairs, **imports.metrics(),
                   "judge_model": ctx.cfg.teacher.model or ctx.cfg.teacher.embedded_model}
        ctx.finish(metrics, output_hash=queries.pairs_fingerprint(ctx.wh))
        publish_artifacts(ctx, "preferences", metrics, samples=queries.pair_samples(ctx.wh))
    return metrics


def resolve_import_files(files: list[str]) -> list[Path]:
    """`bundled:NAME` names a file shipped in the package's seeds/ folder (bare `bundled`: the sample)."""
    return [shipped_path(f, "preferences_sample.jsonl") for f in files]


def preferences_data_inputs(cfg: Config, wh: Warehouse) -> dict:
    files = resolve_import_files(cfg.preferences.import_files)
    return {"import_files": stable_hash([file_sha256(f) if f.is_file() else str(f) for f in files])}


STAGE = StageSpec(
    name="preferences", flow=preferences_flow, config_sections=("preferences", "teacher"), upstream=("sft",),
    data_inputs=preferences_data_inputs, summary="SFT samples judged pairwise by the teacher in both orders; imports",
    headline=("prompts", "pairs_kept", "imported", "order_disagreements"),
)

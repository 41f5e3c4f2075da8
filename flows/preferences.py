"""Stage 4, preferences: sample K responses per held-out prompt from the SFT model, have the teacher
judge each pair in both orders (a pair is kept only when both orders agree), and import any
external preference files into the same table."""
from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE
from rich.progress import Progress

from instructflow.flows.common import StageContext, publish_artifacts, stable_hash, stage_context
from instructflow.flows.sft import heldout_prompts
from instructflow.flows.stages import StageSpec
from instructflow.flows.teacher import teacher_session
from instructflow.tasks.config import Config
from instructflow.tasks.judge import JUDGE_DECODING, combine_orders, pairwise_judge_prompt, parse_pairwise_verdict
from instructflow.tasks.preferences import load_preference_file, pair_key, sample_pairs
from instructflow.tasks.teacher import TeacherClient, TeacherRequest, TeacherSettings
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse


@task(name="sample-responses", cache_policy=NONE)
def sample_responses(ctx: StageContext, model_path: str, prompts: list[str]) -> dict[str, list[str]]:
    """K samples per prompt from the SFT model; prompts sampled before (same model) are reused."""
    from instructflow.models.sampling import generate_responses

    p = ctx.cfg.preferences
    stored = queries.stored_responses(ctx.wh, "preferences", model_path, prompts)
    missing = [q for q in prompts if len(stored.get(q, [])) < p.k]
    if missing:
        with Progress() as progress:
            bar = progress.add_task("sampling responses", total=len(missing))
            samples = generate_responses(Path(model_path), missing, k=p.k, temperature=p.temperature, top_p=p.top_p,
                                         max_new_tokens=p.max_new_tokens, seed=p.seed,
                                         on_progress=lambda done, total: progress.update(bar, completed=done))
        fresh = dict(zip(missing, samples))
        queries.insert_responses(ctx.wh, "preferences", model_path, fresh)
        stored.update(fresh)
    return stored


def judge_requests(instruction: str, a: str, b: str) -> tuple[TeacherRequest, TeacherRequest]:
    key = pair_key(instruction, a, b)
    return (TeacherRequest(key=f"judge:{key}:ab", prompt=pairwise_judge_prompt(instruction, a, b),
                           params=dict(JUDGE_DECODING)),
            TeacherRequest(key=f"judge:{key}:ba", prompt=pairwise_judge_prompt(instruction, b, a),
                           params=dict(JUDGE_DECODING)))


async def judge_pairs(wh: Warehouse, settings: TeacherSettings, stage: str,
                      pairs: list[tuple[str, str, str]]) -> list[dict]:
    """Ask the teacher about each (instruction, a, b) in both orders; stored verdicts are not re-asked.
    Returns rows with verdicts mapped to the (a, b) order and the combined outcome a|b|tie|disagree|invalid."""
    requests = [r for inst, a, b in pairs for r in judge_requests(inst, a, b)]
    texts: dict[str, str | None] = {}
    todo = []
    for request in requests:
        stored = queries.stored_request(wh, request.key)
        if stored is not None:
            texts[request.key] = stored["texts"][0] if stored["texts"] and not stored["error"] else None
        else:
            todo.append(request)
    if todo:
        client = TeacherClient(settings)
        prompts = {r.key: r.prompt for r in todo}

        def keep(result) -> None:  # stored the moment it finishes: a killed run re-asks nothing
            queries.record_teacher_result(wh, result, stage, "judge", prompts[result.key])
            texts[result.key] = result.text if result.ok else None

        try:
            await client.complete_all(todo, on_result=keep)
        finally:
            await client.aclose()
    rows = []
    for inst, a, b in pairs:
        ab, ba = judge_requests(inst, a, b)
        verdict_ab = parse_pairwise_verdict(texts.get(ab.key) or "")
        swapped = parse_pairwise_verdict(texts.get(ba.key) or "")
        verdict_ba = {"a": "b", "b": "a"}.get(swapped, swapped)  # mapped back to the (a, b) order
        outcome = {"x": "a", "y": "b"}.get(combine_orders(verdict_ab, swapped), combine_orders(verdict_ab, swapped))
        rows.append({"prompt": inst, "response_a": a, "response_b": b, "verdict_ab": verdict_ab,
                     "verdict_ba": verdict_ba, "outcome": outcome, "judge_model": settings.model,
                     "judge_text_ab": texts.get(ab.key), "judge_text_ba": texts.get(ba.key)})
    return rows


@task(name="judge-pairs", cache_policy=NONE)
def judge(ctx: StageContext, samples: dict[str, list[str]], instruction_of: dict[str, str]) -> int:
    pairs = [(instruction_of[prompt], texts[i], texts[j]) for prompt, texts in samples.items()
             for i, j in sample_pairs(len(texts)) if texts[i].strip() != texts[j].strip()]
    with teacher_session(ctx.cfg, ctx.home) as settings:
        rows = asyncio.run(judge_pairs(ctx.wh, settings, "preferences", pairs))
    for row in rows:
        row.update(source="judged", pair_key=pair_key(row["prompt"], row["response_a"], row["response_b"]),
                   chosen={"a": row["response_a"], "b": row["response_b"]}.get(row["outcome"]),
                   rejected={"a": row["response_b"], "b": row["response_a"]}.get(row["outcome"]))
    return queries.insert_pairs(ctx.wh, rows)


@task(name="import-preferences", cache_policy=NONE)
def import_files(wh: Warehouse, files: list[str]) -> int:
    """All files are parsed before anything is written: one bad line imports nothing."""
    pairs = [pair for path in files for pair in load_preference_file(path)]
    return queries.insert_pairs(wh, [{"source": "imported", "prompt": p.prompt, "response_a": p.chosen,
                                      "response_b": p.rejected, "outcome": "a", "chosen": p.chosen,
                                      "rejected": p.rejected, "origin": p.origin, "pair_key": p.key}
                                     for p in pairs])


@flow(name="preferences", log_prints=True)
def preferences_flow(profile: str = "cpu", home: str | None = None, config: str | None = None,
                     run_id: str | None = None, force: bool = False) -> dict:
    with stage_context("preferences", profile, home, config, run_id, force) as ctx:
        p = ctx.cfg.preferences
        files = [str(Path(f).expanduser()) for f in resolve_import_files(p.import_files)]
        for path in files:  # a bad line fails the stage now, in one line, before any sampling
            load_preference_file(path)
        sft = ctx.wh.latest_checkpoint("sft")
        if sft is None:
            raise RuntimeError("preferences samples from the SFT model, and there is none yet: "
                               "run `instructflow stage sft` first")
        chosen_prompts = heldout_prompts(ctx.cfg, ctx.wh, p.prompt_source, p.prompts, p.seed)
        instruction_of = {prompt: text for text, prompt in chosen_prompts}
        samples = sample_responses(ctx, sft["path"], [prompt for _, prompt in chosen_prompts])
        new_pairs = judge(ctx, samples, instruction_of)
        # imported once the stage's own work succeeded: a failed stage leaves no import behind it
        imported_now = import_files(ctx.wh, files)
        counts = queries.preference_counts(ctx.wh)
        metrics = {"prompts": len(chosen_prompts), **counts, "new_pairs": new_pairs, "imported_now": imported_now,
                   "judge_model": ctx.cfg.teacher.model or ctx.cfg.teacher.embedded_model}
        ctx.finish(metrics, output_hash=queries.pairs_fingerprint(ctx.wh))
        publish_artifacts(ctx, "preferences", metrics, samples=queries.pair_samples(ctx.wh))
    return metrics


def resolve_import_files(files: list[str]) -> list[Path]:
    """'bundled:NAME' names a file shipped in the package's seeds/ folder."""
    from instructflow.tasks.seeds import bundled_seed_dir

    return [bundled_seed_dir() / f.split(":", 1)[1] if f.startswith("bundled:") else Path(f) for f in files]


def preferences_data_inputs(cfg: Config, wh: Warehouse) -> dict:
    files = resolve_import_files(cfg.preferences.import_files)
    return {"import_files": stable_hash([hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else str(f)
                                         for f in files]),
            "teacher": cfg.section_hash("teacher")}


STAGE = StageSpec(
    name="preferences", flow=preferences_flow, config_sections=("preferences",), upstream=("sft",),
    data_inputs=preferences_data_inputs, summary="SFT samples judged pairwise by the teacher in both orders; imports",
)

"""`instructflow export hf` and `export model`: what the cards state, gathered from the warehouse (the
stages' recorded metrics, the registered checkpoints and their settings, the last evaluate run); the
writing is tasks/export.py. Nothing here trains or loads a model."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from instructflow.tasks.config import Config
from instructflow.tasks.export import (BASE_MODEL_IDS, PAIR_COLUMNS, SFT_COLUMNS, ExportError, copy_model_dir,
                                       dataset_card, hf_data_file, model_card, write_hf_dataset)
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse

EXPORT_WHAT = ("sft", "pairs")
MODEL_KINDS = {"sft": "sft", "ppo": "ppo_policy", "dpo": "dpo_policy", "grpo": "grpo_policy"}  # checkpoint kinds


def _metrics(wh: Warehouse, stage: str) -> dict:
    last = wh.last_stage_run(stage, status="success")
    return last.metrics if last else {}


def export_dataset(wh: Warehouse, cfg: Config, what: str, source: str, out: Path) -> tuple[Path, str, str]:
    """The SFT set (`source` as for `export alpaca`) or the preference pairs as a Hugging Face dataset folder;
    returns (folder, its data file, how many rows of each source)."""
    if what not in EXPORT_WHAT:
        raise ExportError(f"--what {what!r}: expected one of {', '.join(EXPORT_WHAT)}")
    if what == "sft":
        rows, counts = queries.export_rows(wh, source)
        counts = {"generated (kept instructions x instances)": counts["generated"], "seeds (their own instances)":
                  counts["seeds"]}
        if not rows:
            raise ExportError("no SFT examples in this home yet: run `instructflow run` (generate and filter) first")
        generate, filtered = _metrics(wh, "generate"), _metrics(wh, "filter")
        facts = [("teacher model", generate.get("teacher_model", "-")),
                 ("generation recipe", f"{cfg.generate.recipe} (profile {cfg.profile})"),
                 ("seed files", ", ".join(queries.seed_sources(wh)) or "-"),
                 ("ROUGE-L filter threshold", filtered.get("threshold", cfg.filter.threshold)),
                 ("kept instructions / candidates", f"{filtered.get('kept', '-')} / {filtered.get('candidates', '-')}"),
                 ("rows exported", f"--source {source}")]
        how = ("Self-Instruct with a teacher LLM: instructions generated from the seed tasks, each kept only if it "
               "passed the heuristic filters and its ROUGE-L F against the seeds and everything kept before it was "
               "at most the threshold; rows are the kept instructions x their instances, then the seed tasks' own "
               "instances (the set SFT trains on; SFT holds out `sft.eval_fraction` of it by a seeded hash).")
        columns = SFT_COLUMNS
    else:
        rows = [{c: row[c] for c in PAIR_COLUMNS} for row in queries.training_pairs(wh)]
        if not rows:
            raise ExportError("no preference pairs in this home yet: run `instructflow stage preferences` first")
        counts = dict(Counter(row["source"] for row in rows))
        provenance, preferences = queries.pair_provenance(wh), _metrics(wh, "preferences")
        sft = wh.latest_checkpoint("sft")
        facts = [("judge models (judged pairs)", ", ".join(provenance.get("judged", [])) or "-"),
                 ("imported from", ", ".join(provenance.get("imported", [])) or "-"),
                 ("responses sampled from", sft["path"] if sft else "-"),
                 ("prompts / pairs judged / kept", f"{preferences.get('prompts', '-')} / "
                                                    f"{preferences.get('pairs_judged', '-')} / {preferences.get('pairs_kept', '-')}"),
                 ("ties / order disagreements (dropped)", f"{preferences.get('ties', '-')} / "
                                                          f"{preferences.get('order_disagreements', '-')}")]
        how = ("Judged pairs: K responses per held-out prompt sampled from the SFT model, consecutive pairs judged "
               "by the teacher in both orders, kept only when both orders agree. Imported pairs: read from "
               "preference files. `source` says which; every row is a usable (prompt, chosen, rejected) pair.")
        columns = PAIR_COLUMNS
    data_file = hf_data_file(rows, columns)
    folder = write_hf_dataset(rows, columns, out, dataset_card(what, len(rows), counts, facts, how, data_file), data_file)
    return folder, data_file, ", ".join(f"{n} {name.split(' (')[0]}" for name, n in counts.items())


def export_model(wh: Warehouse, stage: str, out: Path) -> tuple[Path, dict]:
    """The stage's registered checkpoint (a plain merged model) as a standalone folder with a model card;
    returns (folder, the checkpoint row)."""
    if stage not in MODEL_KINDS:
        raise ExportError(f"--stage {stage!r}: expected one of {', '.join(MODEL_KINDS)}")
    checkpoint = wh.latest_checkpoint(MODEL_KINDS[stage])
    if checkpoint is None:
        raise ExportError(f"no {stage} checkpoint in this home yet: run `instructflow stage {stage}` first")
    path = Path(checkpoint["path"])
    if not (path / "config.json").is_file():
        raise ExportError(f"the registered {stage} checkpoint {path} is no longer on disk: rerun "
                          f"`instructflow stage {stage}`")
    sft = checkpoint if stage == "sft" else queries.checkpoint_at(wh, "sft", checkpoint["base"])
    sft_settings = json.loads(sft["config"]).get("sft", {}) if sft else {}
    base_name = sft_settings.get("base_model", "?")
    base_path = sft["base"] if sft else "?"
    lineage = [("base model", base_name if base_name == base_path else f"{base_name} ({base_path})"),
               ("SFT checkpoint", sft["path"] if sft else checkpoint["base"])]
    if stage in ("ppo", "grpo"):
        lineage.append(("reward model", checkpoint["dataset_hash"]))
    if stage != "sft":
        lineage.append((f"{stage} checkpoint", str(path)))
    sections = [("Lineage", lineage)]
    if sft:
        counts = queries.sft_example_counts(wh, sft["dataset_hash"])
        sft_metrics = json.loads(sft["metrics"])
        sections.append(("SFT data", [(f"{split} examples", ", ".join(f"{n} {source}" for source, n in by.items()))
                                      for split, by in counts.items()] +
                         [(k, sft_metrics[k]) for k in ("eval_loss_before", "eval_loss_after", "tokens_seen")
                          if sft_metrics.get(k) is not None] + [("dataset hash", sft["dataset_hash"])]))
    metrics = json.loads(checkpoint["metrics"])
    if stage != "sft":
        if stage in ("ppo", "grpo"):
            reward = queries.checkpoint_at(wh, "reward", checkpoint["dataset_hash"])
            if reward:
                reward_metrics = json.loads(reward["metrics"])
                sections.append(("Reward model", [(k, reward_metrics[k]) for k in (
                    "train_pairs", "eval_pairs", "accuracy_before", "accuracy_after", "margin_after")
                    if reward_metrics.get(k) is not None]))
        sections.append((f"{stage} training", [(k, v) for k, v in metrics.items() if not isinstance(v, (dict, list))
                                                and not k.endswith("checkpoint") and k not in ("plot", "fingerprint")]))
    settings = json.loads(checkpoint["config"]).get(stage, {})
    sections.append((f"{stage} settings", sorted(settings.items())))
    evaluation, note = _evaluation(wh, stage, checkpoint)
    copy_model_dir(path, out)
    (Path(out) / "README.md").write_text(model_card(stage, base_name, BASE_MODEL_IDS.get(base_name), sections,
                                                    evaluation, note), encoding="utf-8")
    return Path(out), checkpoint


def _evaluation(wh: Warehouse, stage: str, checkpoint: dict) -> tuple[list[tuple[str, str]], str]:
    """The last successful evaluate run's figures for this checkpoint: each measure's SFT and method means and
    their difference with its interval (`<measure>_diff_<method>`, `..._ci`), KL and win rate; for SFT its
    own means. Nothing when that run measured another checkpoint of the stage."""
    evaluate = wh.last_stage_run("evaluate", status="success")
    if evaluate is None:
        return [], "No evaluate run yet (`instructflow stage evaluate`)."
    registered = wh.stage_run(checkpoint["stage_run_id"])
    if registered is None or evaluate.inputs.get(f"upstream:{stage}") != registered.output_hash:
        return [], (f"The last evaluate run measured an earlier {stage} checkpoint: rerun `instructflow stage evaluate` "
                    "for figures of this one.")
    m = evaluate.metrics
    note = (f"{m.get('prompts', '?')} held-out prompts ({m.get('prompt_source', '?')}), greedy replies of up to "
            f"{m.get('max_new_tokens', '?')} tokens; intervals: paired bootstrap, {m.get('confidence', 0.95):.0%}.")
    if stage == "sft":
        return [(key[:-len("_sft")], _number(value)) for key, value in m.items()
                if key.endswith("_sft") and "_vs_" not in key and isinstance(value, (int, float))], note
    rows = []
    for key, value in m.items():
        if key.endswith(f"_diff_{stage}") and isinstance(value, (int, float)):
            measure = key[:-len(f"_diff_{stage}")]
            rows.append((f"{measure}: {stage} - SFT", f"{_number(m.get(f'{measure}_{stage}'))} vs "
                         f"{_number(m.get(f'{measure}_sft'))}: {value:+.4g} {_interval(m.get(key + '_ci'))}"))
    for key in (f"kl_{stage}", f"win_rate_{stage}_vs_sft"):
        if isinstance(m.get(key), (int, float)):
            rows.append((key, f"{m[key]:.4g} {_interval(m.get(key + '_ci'))}"))
    return rows, note


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def _interval(ci) -> str:
    return f"[{ci[0]:+.4g}, {ci[1]:+.4g}]" if isinstance(ci, list) and len(ci) == 2 else ""

"""The whole pipeline on the tiny profile under a real Prefect API: every stage runs, a second run
does nothing, a seed edit reruns exactly filter and what follows, artifacts are readable back."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cliutil import cli, query
from instructflow.flows.common import close_warehouses, warehouse_for
from instructflow.tasks.config import load_config
from instructflow.tasks.exhaustion import tree_bytes
from instructflow.warehouse import queries

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains

STAGES = ["generate", "filter", "sft", "preferences", "reward", "ppo", "dpo", "grpo", "evaluate"]


def stage_rows(wh, run_id):
    return {r["stage"]: r["status"] for r in wh.rows("SELECT stage, status FROM stage_runs WHERE run_id = ?", [run_id])}


def read_artifacts(key: str) -> list[dict]:
    """Artifacts with this key, newest first, straight from the Prefect REST API (prefect 3.8.8's
    client sends unset filter fields as null or as empty joins, which its own API rejects or mis-reads)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=30,
                          json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 10, "offset": 0})
    response.raise_for_status()
    return response.json()


# This test's home after its first run, on the code before resume state was dropped (measured 2026-12-05):
# 579.7 MB, about 437 MB of it checkpoints/ of sft, reward, dpo, grpo and the held-out reward model (81 MB
# each) and PPO's rounds/ (32 MB)
HOME_BYTES_BEFORE = 579_700_000


def run_folders(home: Path) -> list[Path]:
    return sorted(p for pattern in ("run-*", "holdout-reward-*") for p in (home / "stages").glob(f"*/{pattern}"))


def check_disk_and_status(home: Path, config: Path) -> None:
    """Finished stages keep final/ (+ run.json, plots), no resume state; `status --json` has each stage's bytes."""
    resume_state = [p for p in (home / "stages").glob("*/*/*") if p.name in ("checkpoints", "rounds")]
    assert resume_state == []
    assert all((folder / "final").is_dir() for folder in run_folders(home))
    assert tree_bytes(home) <= HOME_BYTES_BEFORE / 3, tree_bytes(home)
    out = cli("status", "--json", "--profile", "t", "--config", str(config), home=home)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for stage in STAGES:
        assert report["stages"][stage]["disk_bytes"] == tree_bytes(home / "stages" / stage), stage
    assert report["stages"]["sft"]["disk_bytes"] > 1_000_000
    assert report["disk_bytes"] >= sum(e["disk_bytes"] for e in report["stages"].values())
    table = cli("status", "--profile", "t", "--config", str(config), home=home, COLUMNS="250")
    assert table.returncode == 0 and re.search(r"disk: [\d.]+ MB in ", table.stderr), table.stderr


def check_exports(home: Path, config: Path, evaluate: dict) -> None:
    """`export hf --what pairs` loads with datasets and its card counts each source; `export model` loads and
    generates, its card names the lineage and the evaluate figures for that method."""
    import torch
    import yaml
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs_dir = home.parent / "pairs-dataset"
    done = cli("export", "hf", "--what", "pairs", "--out", str(pairs_dir), "--config", str(config), home=home)
    assert done.returncode == 0, done.stderr
    pairs = load_dataset(str(pairs_dir))["train"]
    want = dict(query(home, "SELECT source, count(*) FROM preference_pairs WHERE chosen IS NOT NULL AND "
                            "rejected IS NOT NULL GROUP BY source"))
    assert pairs.column_names == ["prompt", "chosen", "rejected", "source"] and len(pairs) == sum(want.values())
    card = (pairs_dir / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    [data_file] = [p.relative_to(pairs_dir).as_posix() for p in (pairs_dir / "data").iterdir()]
    assert meta["license"] == "other" and meta["configs"][0]["data_files"][0]["path"] == data_file
    assert meta["size_categories"] == ["n<1K"] and meta["task_categories"] == ["text-generation"]
    for source, n in want.items():
        assert f"| {source} | {n} |" in card
    assert "License: not set" in card and "judge models" in card

    model_dir = home.parent / "ppo-model"
    done = cli("export", "model", "--stage", "ppo", "--out", str(model_dir), home=home)
    assert done.returncode == 0, done.stderr
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer("Name a colour.", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert (model_dir / "generation_config.json").is_file() and not (model_dir / "metrics.json").exists()
    card = (model_dir / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["license"] == "other"
    assert "## Lineage" in card and "SFT checkpoint" in card and "reward model" in card and "## ppo settings" in card
    assert f"{evaluate['rm_score_diff_ppo']:+.4g}" in card   # the evaluate figures of this very checkpoint
    again = cli("export", "model", "--stage", "ppo", "--out", str(model_dir), home=home)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"error: --out {model_dir} is not empty: give a new folder (or empty this one)"]


def check_gc(home: Path, wh) -> None:
    """After the seed edit every training stage wrote a new folder: gc --dry-run lists exactly the superseded ones
    and removes nothing; gc removes them and keeps the current ones; a run holding the warehouse stops it."""
    evaluate = wh.last_stage_run("evaluate", status="success")
    current_paths = [Path(wh.latest_checkpoint(kind)["path"])
                     for kind in ("sft", "reward", "ppo_policy", "dpo_policy", "grpo_policy")]
    current_paths.append(Path(evaluate.metrics["rm_holdout_checkpoint"]))
    before = run_folders(home)
    current = [f for f in before if any(f in p.parents for p in current_paths)]
    superseded = [f for f in before if f not in current]
    assert len(current) == 6 and len(superseded) == 6   # sft, reward, ppo, dpo, grpo, evaluate's held-out RM
    held = cli("gc", home=home)   # this process holds the warehouse, as a run does
    assert held.returncode == 1 and len(held.stderr.strip().splitlines()) == 1
    assert held.stderr.startswith("error: gc removed nothing: warehouse") and run_folders(home) == before
    close_warehouses()

    dry = cli("gc", "--dry-run", home=home)
    assert dry.returncode == 0, dry.stderr
    listed = [Path(m.group(1)) for m in re.finditer(r"^would remove (.+) \(", dry.stdout, re.M)]
    assert sorted(listed) == superseded and run_folders(home) == before
    freed = sum(tree_bytes(f) for f in superseded)
    assert "would free " in dry.stdout and f"({freed} bytes) in 6 run folder(s); kept 6" in dry.stdout

    done = cli("gc", home=home)
    assert done.returncode == 0, done.stderr
    assert sorted(Path(m.group(1)) for m in re.finditer(r"^removed (.+) \(", done.stdout, re.M)) == superseded
    assert f"({freed} bytes)" in done.stdout and run_folders(home) == current


def test_pipeline_end_to_end_rerun_and_seed_edit(seeded_home):
    from prefect.settings import PREFECT_API_URL

    from instructflow.flows.pipeline import pipeline
    from instructflow.flows.status import stage_status

    home, config, seeds = seeded_home
    config.write_text(config.read_text() + "[profiles.t.evaluate]\nholdout_reward = true\n")
    results = pipeline(home=str(home), cfg=load_config("t", config))
    assert list(results) == STAGES
    wh = warehouse_for(home)
    first_run = wh.last_run()
    assert first_run["status"] == "success"
    assert stage_rows(wh, first_run["run_id"]) == {s: "success" for s in STAGES}
    for kind in ("sft", "reward", "ppo_policy", "dpo_policy", "grpo_policy"):
        assert wh.latest_checkpoint(kind) is not None, kind
    assert wh.latest_checkpoint("ppo_value") is None  # the critic is resume state: kept only with keep_checkpoints
    assert results["evaluate"]["prompts"] > 0 and results["ppo"]["steps"] > 0
    assert results["dpo"]["steps"] > 0 and results["grpo"]["steps"] > 0
    # every method against SFT on the same prompts, each measure with its interval around the difference
    evaluate = results["evaluate"]
    assert evaluate["methods"] == ["ppo", "dpo", "grpo"]
    for method in ("ppo", "dpo", "grpo"):
        for measure in ("rm_score", "ended", "repetition", "words", "rm_holdout_score"):
            lo, hi = evaluate[f"{measure}_diff_{method}_ci"]
            assert lo <= evaluate[f"{measure}_diff_{method}"] <= hi, (method, measure)
        assert f"kl_{method}" in evaluate and f"judged_{method}" in evaluate
    policies = wh.rows("SELECT policy, count(*) AS n FROM eval_replies GROUP BY policy ORDER BY policy")
    assert policies == [{"policy": p, "n": evaluate["prompts"]} for p in ("dpo", "grpo", "ppo", "sft")]
    preferences = results["preferences"]   # tiny imports the bundled sample: read, hashed and recorded once
    assert preferences["files_imported"] == 1 and preferences["imported_now"] == preferences["imported"] > 0
    assert preferences["refused_too_long"] == 0 and preferences["import_s"] >= 0
    # evaluate.holdout_reward: a second RM trained on exactly the pairs the first one held out, scored
    # side by side with the first
    evaluate, reward = results["evaluate"], results["reward"]
    assert evaluate["rm_holdout_train_pairs"] == reward["eval_pairs"] > 0 and reward["train_pairs"] > 0
    assert reward["train_pairs"] + evaluate["rm_holdout_train_pairs"] == len(queries.training_pairs(wh))
    assert evaluate["rm_holdout_checkpoint"] != reward["checkpoint"]
    assert all(isinstance(evaluate[k], float) for k in ("rm_score_sft", "rm_score_ppo", "rm_holdout_score_sft",
                                                         "rm_holdout_score_ppo", "rm_holdout_accuracy"))
    assert evaluate["rm_holdout_score_sft"] != evaluate["rm_score_sft"]   # another model, not a copy of the first
    cfg = load_config("t", config)
    assert {e["state"] for e in stage_status(cfg, home, wh)["stages"].values()} == {"fresh"}

    # every stage published a keyed summary artifact (and the data stages a samples table)
    for stage in STAGES:
        summaries = read_artifacts(f"{stage}-summary")
        assert summaries and f"# {stage}" in summaries[0]["data"], stage
    assert read_artifacts("filter-samples")

    # nothing changed: a second run (through the CLI, as users do) skips every stage, sends no
    # teacher request, and closes with the headline numbers, the report and the dashboard
    requests_before = wh.scalar("SELECT count(*) FROM teacher_requests")
    close_warehouses()   # release the DuckDB lock for the CLI process
    check_disk_and_status(home, config)
    check_exports(home, config, evaluate)
    done = cli("run", "--profile", "t", "--config", str(config), home=home, PREFECT_API_URL=PREFECT_API_URL.value())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kept instructions" in done.stdout and "DPO preference accuracy" in done.stdout
    for method in ("ppo", "dpo", "grpo"):   # a line per method: its differences to SFT with their intervals
        assert f"{method} - sft on {evaluate['prompts']} prompts: RM " in done.stdout and "held-out RM" in done.stdout
    assert f"report: {home / 'report.html'}" in done.stdout and "instructflow dashboard" in done.stdout
    assert "<h2>evaluate</h2>" in (home / "report.html").read_text()
    wh = warehouse_for(home)
    second = wh.last_run()
    assert stage_rows(wh, second["run_id"]) == {s: "skipped" for s in STAGES}
    assert wh.scalar("SELECT count(*) FROM teacher_requests") == requests_before

    # edit one seed: exactly filter and everything after it are stale, then rerun
    lines = seeds.read_text().splitlines()
    first = json.loads(lines[0])
    first["instances"][0]["output"] += " (revised)"
    seeds.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    states = {s: e["state"] for s, e in stage_status(cfg, home, wh)["stages"].items()}
    assert states["generate"] == "fresh" and states["filter"] == "stale"
    assert {states[s] for s in STAGES[2:]} == {"stale"}
    pipeline(home=str(home), cfg=load_config("t", config))
    third = wh.last_run()
    rows = stage_rows(wh, third["run_id"])
    assert rows["generate"] == "skipped"
    assert rows["filter"] == "success" and rows["sft"] == "success"
    assert {rows[s] for s in STAGES[2:]} == {"success"}
    assert {e["state"] for e in stage_status(cfg, home, wh)["stages"].values()} == {"fresh"}
    check_gc(home, wh)
    wh = warehouse_for(home)
    assert {e["state"] for e in stage_status(cfg, home, wh)["stages"].values()} == {"fresh"}  # nothing current went

    # `stage ppo --force --downstream` after an evaluate-only config edit: ppo retrains from scratch
    # (its finished run folder is discarded), then of the stages after it only the stale one runs
    # ppo.keep_checkpoints is disk only: ppo stays fresh, and its forced rerun keeps its rounds/
    text = config.read_text()
    header = "[profiles.t.evaluate]\n"
    config.write_text((text.replace(header, header + "judge = false\n") if header in text else
                       text + header + "judge = false\n") + "[profiles.t.ppo]\nkeep_checkpoints = true\n")
    states = {s: e["state"] for s, e in stage_status(load_config("t", config), home, wh)["stages"].items()}
    assert states["ppo"] == "fresh" and states["evaluate"] == "stale"
    policy = Path(wh.latest_checkpoint("ppo_policy")["path"])
    [run_dir] = [d for d in (home / "stages" / "ppo").glob("run-*") if d in policy.parents]   # the current one
    (run_dir / "left-by-the-test").write_text("a forced rerun discards this folder")
    ran = "SELECT count(*) FROM stage_runs WHERE stage = ? AND status <> 'skipped'"   # a fresh stage's skip is no run
    runs_before = {s: wh.scalar(ran, [s]) for s in STAGES}
    close_warehouses()
    done = cli("stage", "ppo", "--force", "--downstream", "--profile", "t", "--config", str(config), home=home,
               PREFECT_API_URL=PREFECT_API_URL.value())
    assert done.returncode == 0, done.stderr[-3000:]
    wh = warehouse_for(home)
    runs_after = {s: wh.scalar(ran, [s]) for s in STAGES}
    assert {s: runs_after[s] - runs_before[s] for s in STAGES} == {**{s: 0 for s in STAGES}, "ppo": 1, "evaluate": 1}
    assert not (run_dir / "left-by-the-test").exists()
    # keep_checkpoints: rounds/ stays (without it the folder goes); of its rounds (4 updates, one per 2) tiny keeps
    # the newest (cpu's keep_rounds = 1), which became final/ (renamed, not copied)
    assert (run_dir / "rounds").is_dir() and not any((run_dir / "rounds").iterdir())
    assert json.loads((run_dir / "final" / "state.json").read_text())["global_step"] == 4
    assert Path(wh.latest_checkpoint("ppo_value")["path"]) == run_dir / "final" / "value"   # the critic kept too
    ppo = wh.last_stage_run("ppo")
    assert ppo.status == "success" and ppo.metrics["resumed_from"] is None and ppo.metrics["steps"] > 0
    evaluate = wh.last_stage_run("evaluate")
    assert evaluate.status == "success" and "judged_ppo" not in evaluate.metrics   # the edited config, judge off
    cfg = load_config("t", config)
    assert {e["state"] for e in stage_status(cfg, home, wh)["stages"].values()} == {"fresh"}

    # one method only, on a prompts file of the user's: evaluate compares just that method with SFT, and
    # names the prompt it finds in the training data (a seed task's instruction)
    seed = json.loads(seeds.read_text().splitlines()[1])
    prompts_file = home.parent / "my-prompts.jsonl"
    prompts_file.write_text(json.dumps({"instruction": seed["instruction"], "input": seed["instances"][0]["input"]})
                            + "\n" + json.dumps({"instruction": "Name a planet with rings."}) + "\n")
    config.write_text(config.read_text() + f"[profiles.one]\ninherits = 't'\nmethods = ['dpo']\n"
                                           f"[profiles.one.evaluate]\nprompts_file = '{prompts_file}'\n")
    close_warehouses()
    done = cli("stage", "evaluate", "--profile", "one", "--config", str(config), home=home,
               PREFECT_API_URL=PREFECT_API_URL.value())
    assert done.returncode == 0, done.stderr[-3000:]
    wh = warehouse_for(home)
    evaluate = wh.last_stage_run("evaluate")
    assert evaluate.metrics["methods"] == ["dpo"] and evaluate.metrics["prompts"] == 2
    assert evaluate.metrics["prompts_in_training"] == 1 and "ppo" not in json.dumps(evaluate.metrics["comparison"])
    assert wh.rows("SELECT DISTINCT policy FROM eval_replies WHERE stage_run_id = ? ORDER BY policy",
                   [evaluate.stage_run_id]) == [{"policy": "dpo"}, {"policy": "sft"}]
    assert "dpo - sft on 2 prompts" in done.stdout
    states = {s: e["state"] for s, e in stage_status(load_config("one", config), home, wh)["stages"].items()}
    assert states["ppo"] == states["grpo"] == "off" and states["evaluate"] == "fresh"

"""The filter stage re-derives every verdict from stored candidates, exactly as the reference would,
under a real Prefect API on a real DuckDB file; editing seeds or the threshold makes it stale."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from rouge_score import rouge_scorer

from instructflow.flows.common import warehouse_for
from instructflow.tasks.config import load_config
from instructflow.warehouse import queries

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains


@dataclass
class StoredResult:  # the shape the teacher client returns, for rows a teacher would have produced
    key: str
    prompt_hash: str = "h"
    model: str = "test-teacher"
    params: dict = field(default_factory=dict)
    texts: list = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 1
    completion_tokens: int = 1
    latency_s: float = 0.1
    attempts: int = 1
    error: str | None = None
    cost_usd: float = 0.0


def store_candidates(wh, batches: list[list[str]]) -> list[int]:
    ids = []
    for n, batch in enumerate(batches):
        batch_ids = wh.next_ids(len(batch))
        rows = [queries.CandidateRow(f"instructions:{n:06d}", i, text, None, None, None, "kept", None, None, None,
                                     None, None) for i, text in enumerate(batch)]
        queries.insert_request_with_candidates(wh, StoredResult(key=f"instructions:{n:06d}"), "generate", "p",
                                               rows, batch_ids)
        ids += batch_ids
    return ids


def reference_verdicts(seed_texts: list[str], candidates: list[str], threshold: float = 0.7) -> list[tuple[bool, float]]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool, out = list(seed_texts), []
    for text in candidates:
        best = max((scorer.score(p, text)["rougeL"].fmeasure for p in pool), default=0.0)
        kept = best <= threshold
        out.append((kept, best))
        if kept:
            pool.append(text)
    return out


def test_filter_matches_reference_greedy_in_arrival_order(seeded_home):
    from instructflow.flows.filter import filter_flow
    from instructflow.flows.status import stage_status

    home, config, seeds = seeded_home
    seed_texts = [json.loads(line)["instruction"] for line in seeds.read_text().splitlines() if line.strip()]
    wh = warehouse_for(home)
    batches = [
        [seed_texts[0],                                                   # exact copy of a seed
         "Explain how photosynthesis turns sunlight into chemical energy in plants.",
         "Explain how photosynthesis turns sunlight into chemical energy in green plants.",  # same batch near-dup
         "List three creative names for a bakery that sells only sourdough bread."],
        ["List three creative names for a small bakery that sells only sourdough bread.",
         "Describe a picture of a sunset.",                               # blacklist word
         "Hi there",                                                      # too short
         "Translate the sentence into French and explain any idioms you used."],
    ]
    ids = store_candidates(wh, batches)
    metrics = filter_flow(load_config("t", config), str(home))
    flat = [t for b in batches for t in b]
    rows = {r["candidate_id"]: r for r in wh.rows("SELECT * FROM candidates")}
    heuristics = {5: "blacklist:picture", 6: "too_short"}
    passing = [i for i in range(len(flat)) if i not in heuristics]
    expected = dict(zip(passing, reference_verdicts(seed_texts, [flat[i] for i in passing])))
    for i, cid in enumerate(ids):
        row = rows[cid]
        if i in heuristics:
            assert (row["verdict"], row["reason"]) == ("rejected", heuristics[i])
            continue
        kept, best = expected[i]
        assert row["verdict"] == ("kept" if kept else "rejected"), flat[i]
        assert row["max_score"] == pytest.approx(best, abs=0, rel=0) or row["max_score"] == best
        assert len(json.loads(row["top_k"])) <= 10
    # the within-batch near duplicate points at the earlier candidate of the same batch
    assert rows[ids[2]]["reason"] == "near_duplicate" and rows[ids[2]]["most_similar"] == f"cand:{ids[1]}"
    assert rows[ids[0]]["most_similar"] == "seed:" + json.loads(seeds.read_text().splitlines()[0])["id"]
    assert metrics["candidates"] == 8 and metrics["kept"] == sum(1 for k, _ in expected.values() if k)
    assert metrics["rejected_near_duplicate"] == sum(1 for k, _ in expected.values() if not k)

    cfg = load_config("t", config)
    assert stage_status(cfg, home, wh)["stages"]["filter"]["state"] == "fresh"
    # editing a seed makes the filter stale (and says why) ...
    lines = seeds.read_text().splitlines()
    first = json.loads(lines[0])
    first["instruction"] += " Keep it short."
    seeds.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    entry = stage_status(cfg, home, wh)["stages"]["filter"]
    assert entry["state"] == "stale" and entry["why"] == ["seeds changed"]
    # ... and so does a stricter threshold; rerunning re-derives every verdict without a teacher
    config.write_text(config.read_text() + "[profiles.t.filter]\nthreshold = 0.3\n")
    cfg = load_config("t", config)
    assert "config changed" in stage_status(cfg, home, wh)["stages"]["filter"]["why"]
    stricter = filter_flow(load_config("t", config), str(home))
    assert stricter["kept"] < metrics["kept"] and stricter["threshold"] == 0.3
    assert wh.scalar("SELECT count(*) FROM teacher_requests") == 2   # only the stored ones: nothing was sent
    assert stage_status(cfg, home, wh)["stages"]["filter"]["state"] == "fresh"

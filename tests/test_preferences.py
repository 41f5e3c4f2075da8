"""Preference data: external files (good forms, bad lines named, nothing half-imported, reimport
idempotent) and the pairwise judge against a real `transformers serve` hosting the bundled SmolLM2.
The streaming import itself (hashes, changed files, rollback, size limit, memory): test_preference_import.py."""
from __future__ import annotations

import asyncio
import json

import pytest

from instructflow.flows.common import cache_dir
from instructflow.models.bundled import ensure_bundled_hf_dir
from instructflow.models.teacher_server import TeacherServer
from instructflow.models.tiny import build_tiny_llama
from instructflow.tasks.judge import judge_pairs, parse_pairwise_verdict
from instructflow.tasks.preference_import import import_preference_files
from instructflow.tasks.preferences import PreferenceFormatError, load_preference_file, pair_key
from instructflow.tasks.teacher import TeacherSettings
from instructflow.warehouse import queries
from instructflow.warehouse.store import open_warehouse

GOOD = [
    {"prompt": "Name a prime number.", "chosen": "7 is prime.", "rejected": "8."},
    {"chosen": "Q: Capital of France?\nA: Paris.", "rejected": "Q: Capital of France?\nA: Lyon, I think."},
    {"chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
     "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "No."}]},
]


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_the_three_line_forms_parse(tmp_path):
    pairs = load_preference_file(write_jsonl(tmp_path / "good.jsonl", GOOD))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Name a prime number.", "7 is prime.", "8."),
        ("Q: Capital of France?\nA:", "Paris.", "Lyon, I think."),
        ("Say hi.", "Hi!", "No."),
    ]
    assert pairs[1].origin == f"{tmp_path / 'good.jsonl'}:2"


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "invalid JSON"),
    ({"prompt": "p", "chosen": "x"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are identical"),
    ({"prompt": "p", "chosen": 3, "rejected": "x"}, "must be strings or message lists"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no prefix"),
    ([1, 2], "expected a JSON object"),
])
def test_a_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], bad_line])
    with pytest.raises(PreferenceFormatError) as raised:
        load_preference_file(path)
    assert str(raised.value).startswith(f"{path}:2: ") and message in str(raised.value)
    assert len(str(raised.value).splitlines()) == 1


def imported(wh, paths, max_field_chars=20000) -> int:
    return import_preference_files(wh, [str(p) for p in paths], max_field_chars).imported_now


def test_import_is_all_or_nothing_and_idempotent(tmp_path):
    (tmp_path / "home").mkdir()
    wh = open_warehouse(tmp_path / "home")
    try:
        good = write_jsonl(tmp_path / "good.jsonl", GOOD)
        assert imported(wh, [good]) == 3
        assert imported(wh, [good]) == 0        # same pairs again: nothing new
        extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "p", "chosen": "long answer", "rejected": "no"}])
        bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], "{oops"])
        with pytest.raises(PreferenceFormatError, match="bad.jsonl:2"):
            imported(wh, [extra, bad])          # the good file before it is not imported either
        assert wh.scalar("SELECT count(*) FROM preference_pairs") == 3
        rows = wh.rows("SELECT source, outcome, chosen, rejected, origin FROM preference_pairs ORDER BY origin")
        assert {r["source"] for r in rows} == {"imported"} and {r["outcome"] for r in rows} == {"a"}
        assert rows[0]["chosen"] == "7 is prime." and rows[0]["origin"].endswith("good.jsonl:1")
    finally:
        wh.close()


def judged_row(prompt: str, a: str, b: str, outcome: str, judge_model: str) -> dict:
    return {"source": "judged", "prompt": prompt, "response_a": a, "response_b": b, "outcome": outcome,
            "chosen": {"a": a, "b": b}.get(outcome), "rejected": {"a": b, "b": a}.get(outcome),
            "judge_model": judge_model, "pair_key": pair_key(prompt, a, b)}


def test_judged_pairs_take_the_latest_verdict_and_imports_stay(tmp_path):
    (tmp_path / "home").mkdir()
    wh = open_warehouse(tmp_path / "home")
    try:
        assert imported(wh, [write_jsonl(tmp_path / "good.jsonl", GOOD[:1])]) == 1
        first = [judged_row("Name a colour.", "Red.", "Banana.", "a", "old-judge"),
                 judged_row("What is 2 + 2?", "4", "22", "disagree", "old-judge")]
        assert queries.replace_judged_pairs(wh, first) == 2
        fingerprint = queries.pairs_fingerprint(wh)
        # a new judge flips the first pair and now agrees on the second: both rows relabelled, none added
        second = [judged_row("Name a colour.", "Red.", "Banana.", "b", "new-judge"),
                  judged_row("What is 2 + 2?", "4", "22", "a", "new-judge")]
        assert queries.replace_judged_pairs(wh, second) == 0
        rows = wh.rows("SELECT prompt, outcome, chosen, judge_model FROM preference_pairs WHERE source = 'judged' "
                       "ORDER BY prompt")
        assert rows == [{"prompt": "Name a colour.", "outcome": "b", "chosen": "Banana.", "judge_model": "new-judge"},
                        {"prompt": "What is 2 + 2?", "outcome": "a", "chosen": "4", "judge_model": "new-judge"}]
        assert wh.scalar("SELECT count(*) FROM preference_pairs WHERE source = 'imported'") == 1
        assert queries.pairs_fingerprint(wh) != fingerprint   # reward sees that what it trains on changed
    finally:
        wh.close()


def judge_rows(wh) -> list[dict]:
    return wh.rows("SELECT request_key, model, purpose, texts, error, params, created_at FROM teacher_requests "
                   "ORDER BY request_key")


@pytest.mark.slow
def test_judge_round_trip_never_re_asks_but_force_and_a_new_judge_do(tmp_path):
    """Against real `transformers serve` judges: the bundled SmolLM2, then the tiny Llama as a changed teacher."""
    model_dir = ensure_bundled_hf_dir(cache_dir())
    pairs = [("Name a primary colour.", "Red is a primary colour.", "Banana."),
             ("What is 2 + 2?", "4", "2 + 2 is 22 because you write the digits side by side.")]
    (tmp_path / "home").mkdir()
    wh = open_warehouse(tmp_path / "home")
    try:
        with TeacherServer(model_dir, startup_timeout_s=90, log_path=tmp_path / "server.log") as server:
            settings = TeacherSettings(base_url=server.base_url, model=server.model_name, max_concurrency=2)
            rows = asyncio.run(judge_pairs(wh, settings, "preferences", pairs))
            requests = judge_rows(wh)
            assert len(requests) == 4 and {r["purpose"] for r in requests} == {"judge"}
            assert all(r["error"] is None for r in requests) and {r["model"] for r in requests} == {server.model_name}
            assert sorted(r["request_key"][-2:] for r in requests) == ["ab", "ab", "ba", "ba"]
            assert json.loads(requests[0]["params"])["temperature"] == 0.0
            again = asyncio.run(judge_pairs(wh, settings, "preferences", pairs))
            assert judge_rows(wh) == requests and again == rows          # nothing re-asked
            # --force asks every verdict again; the new answers replace the stored ones, kept in history
            asyncio.run(judge_pairs(wh, settings, "preferences", pairs, force=True))
            forced = judge_rows(wh)
            assert [r["request_key"] for r in forced] == [r["request_key"] for r in requests]
            assert all(new["created_at"] > old["created_at"] for new, old in zip(forced, requests))
            assert wh.scalar("SELECT count(*) FROM teacher_request_history") == 4
        for (instruction, a, b), row in zip(pairs, rows):
            assert (row["prompt"], row["response_a"], row["response_b"]) == (instruction, a, b)
            assert row["judge_text_ab"] and row["judge_text_ba"] and row["judge_model"] == server.model_name
            assert row["verdict_ab"] == parse_pairwise_verdict(row["judge_text_ab"])
            if row["verdict_ab"] is None or row["verdict_ba"] is None:
                assert row["outcome"] == "invalid"
            else:  # the verdicts are already in the (a, b) order: agreeing ones are the outcome
                assert row["outcome"] == (row["verdict_ab"] if row["verdict_ab"] == row["verdict_ba"] else "disagree")
        print("judge verdicts:", [(r["verdict_ab"], r["verdict_ba"], r["outcome"]) for r in rows])

        # the teacher changed: every pair is asked again, and the rows carry the new judge's own answers
        tiny = build_tiny_llama(cache_dir() / "tiny-llama", tokenizer_dir=model_dir)
        with TeacherServer(tiny, startup_timeout_s=90, log_path=tmp_path / "tiny.log") as other:
            other_settings = TeacherSettings(base_url=other.base_url, model=other.model_name, max_concurrency=2)
            relabelled = asyncio.run(judge_pairs(wh, other_settings, "preferences", pairs))
        assert wh.scalar("SELECT count(*) FROM teacher_requests") == 8
        by_key = {r["request_key"]: json.loads(r["texts"])[0] for r in judge_rows(wh) if r["model"] == other.model_name}
        assert len(by_key) == 4
        assert {r["judge_model"] for r in relabelled} == {other.model_name}
        assert sorted(t for r in relabelled for t in (r["judge_text_ab"], r["judge_text_ba"])) == sorted(by_key.values())
    finally:
        wh.close()

"""Preference data: external files (good forms, bad lines named, nothing half-imported, reimport
idempotent) and the pairwise judge against a real `transformers serve` hosting the bundled SmolLM2."""
from __future__ import annotations

import asyncio
import json

import pytest

from instructflow.flows.common import cache_dir
from instructflow.flows.preferences import import_files, judge_pairs
from instructflow.models.bundled import ensure_bundled_hf_dir
from instructflow.models.teacher_server import TeacherServer
from instructflow.tasks.judge import combine_orders, parse_pairwise_verdict
from instructflow.tasks.preferences import PreferenceFormatError, load_preference_file
from instructflow.tasks.teacher import TeacherSettings
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


def test_import_is_all_or_nothing_and_idempotent(tmp_path):
    (tmp_path / "home").mkdir()
    wh = open_warehouse(tmp_path / "home")
    try:
        good = write_jsonl(tmp_path / "good.jsonl", GOOD)
        assert import_files.fn(wh, [str(good)]) == 3
        assert import_files.fn(wh, [str(good)]) == 0        # same pairs again: nothing new
        extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "p", "chosen": "long answer", "rejected": "no"}])
        bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], "{oops"])
        with pytest.raises(PreferenceFormatError, match="bad.jsonl:2"):
            import_files.fn(wh, [str(extra), str(bad)])     # the good file before it is not imported either
        assert wh.scalar("SELECT count(*) FROM preference_pairs") == 3
        rows = wh.rows("SELECT source, outcome, chosen, rejected, origin FROM preference_pairs ORDER BY origin")
        assert {r["source"] for r in rows} == {"imported"} and {r["outcome"] for r in rows} == {"a"}
        assert rows[0]["chosen"] == "7 is prime." and rows[0]["origin"].endswith("good.jsonl:1")
    finally:
        wh.close()


def test_judge_round_trip_asks_both_orders_stores_everything_and_never_re_asks(tmp_path):
    model_dir = ensure_bundled_hf_dir(cache_dir())
    pairs = [("Name a primary colour.", "Red is a primary colour.", "Banana."),
             ("What is 2 + 2?", "4", "2 + 2 is 22 because you write the digits side by side.")]
    (tmp_path / "home").mkdir()
    wh = open_warehouse(tmp_path / "home")
    try:
        with TeacherServer(model_dir, startup_timeout_s=90, log_path=tmp_path / "server.log") as server:
            settings = TeacherSettings(base_url=server.base_url, model=server.model_name, max_concurrency=2)
            rows = asyncio.run(judge_pairs(wh, settings, "preferences", pairs))
            requests = wh.rows("SELECT request_key, purpose, texts, error, params FROM teacher_requests")
            assert len(requests) == 4 and {r["purpose"] for r in requests} == {"judge"}
            assert all(r["error"] is None for r in requests)
            assert sorted(r["request_key"][-2:] for r in requests) == ["ab", "ab", "ba", "ba"]
            assert json.loads(requests[0]["params"])["temperature"] == 0.0
            again = asyncio.run(judge_pairs(wh, settings, "preferences", pairs))
            assert wh.scalar("SELECT count(*) FROM teacher_requests") == 4 and again == rows
        for (instruction, a, b), row in zip(pairs, rows):
            assert (row["prompt"], row["response_a"], row["response_b"]) == (instruction, a, b)
            assert row["judge_text_ab"] and row["judge_text_ba"] and row["judge_model"] == server.model_name
            first, swapped = parse_pairwise_verdict(row["judge_text_ab"]), parse_pairwise_verdict(row["judge_text_ba"])
            assert row["verdict_ab"] == first
            assert row["outcome"] == {"x": "a", "y": "b"}.get(combine_orders(first, swapped), combine_orders(first, swapped))
        print("judge verdicts:", [(r["verdict_ab"], r["verdict_ba"], r["outcome"]) for r in rows])
    finally:
        wh.close()

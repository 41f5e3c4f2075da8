"""The streaming preference import on real DuckDB files: a file is imported once (its hash recorded),
a changed file adds only its new pairs, a bad line is one `FILE:LINE:` error that imports nothing of
its file (also when it turns bad between the check and the import), an oversized field is refused
and counted, and memory stays flat in the number of pairs (50,000 pairs in a child process)."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap

import pytest

from instructflow.tasks import preference_import
from instructflow.tasks.preference_import import import_planned, import_preference_files, plan_imports
from instructflow.tasks.preferences import PreferenceFormatError, pair_key
from instructflow.warehouse import queries
from instructflow.warehouse.store import open_warehouse

LIMIT = 20000


def line(i: int, prefix: str = "") -> str:
    return json.dumps({"prompt": f"{prefix}Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."})


def write_lines(path, lines) -> str:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return str(path)


@pytest.fixture
def wh(tmp_path):
    (tmp_path / "home").mkdir()
    warehouse = open_warehouse(tmp_path / "home")
    yield warehouse
    warehouse.close()


def stored(wh) -> int:
    return wh.scalar("SELECT count(*) FROM preference_pairs")


def test_a_file_imports_every_pair_once_and_a_second_run_reads_nothing(wh, tmp_path, monkeypatch):
    monkeypatch.setattr(preference_import, "BATCH_ROWS", 1000)   # several batches, one transaction
    n = 4321
    lines = [line(i) for i in range(n)] + [line(7)]               # a repeat, in another batch: stored once
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    first = import_preference_files(wh, [path], LIMIT)
    assert (first.imported_now, first.pairs_read, first.files_imported, first.files_unchanged) == (n, n + 1, 1, 0)
    assert stored(wh) == n
    assert wh.scalar("SELECT origin FROM preference_pairs WHERE prompt = 'Question 7?'") == f"{path}:8"  # first line
    assert wh.scalar("SELECT pair_key FROM preference_pairs WHERE prompt = 'Question 7?'") == \
        pair_key("Question 7?", "Answer 7.", "No 7.")
    [record] = queries.imported_files(wh)
    assert record["sha256"] == hashlib.sha256((tmp_path / "pairs.jsonl").read_bytes()).hexdigest()
    assert (record["path"], record["status"], record["pairs"], record["imported"], record["refused_too_long"]) == \
        (path, "done", n + 1, n, 0)
    assert record["bytes"] == (tmp_path / "pairs.jsonl").stat().st_size
    assert wh.rows("SELECT DISTINCT import_id FROM preference_pairs") == [{"import_id": record["import_id"]}]

    ids = wh.scalar("SELECT sum(pair_id) FROM preference_pairs")
    second = import_preference_files(wh, [path], LIMIT)
    assert (second.imported_now, second.files_imported, second.files_unchanged, second.pairs_read) == (0, 0, 1, 0)
    assert stored(wh) == n and wh.scalar("SELECT sum(pair_id) FROM preference_pairs") == ids
    assert len(queries.imported_files(wh)) == 1
    assert second.metrics()["files_unchanged"] == 1 and set(second.metrics()) == {
        "imported_now", "refused_too_long", "files_imported", "files_unchanged", "import_s"}
    # the same bytes listed twice (another name, or twice over) are read once
    copy = write_lines(tmp_path / "copy.jsonl", lines)
    assert [p.action for p in plan_imports(wh, [copy, copy], LIMIT)] == ["unchanged", "repeat"]
    # --force reads an unchanged file again; its keys are stored, so nothing is added
    forced = import_preference_files(wh, [path], LIMIT, reread=True)
    assert (forced.files_imported, forced.imported_now, stored(wh)) == (1, 0, n)


def test_a_changed_file_adds_only_its_new_pairs_and_the_old_ones_stay(wh, tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [line(i) for i in range(100)])
    assert import_preference_files(wh, [path], LIMIT).imported_now == 100
    write_lines(tmp_path / "pairs.jsonl", [line(i) for i in range(50, 130)])   # 50 kept, 50 dropped, 30 new
    again = import_preference_files(wh, [path], LIMIT)
    assert (again.files_imported, again.files_unchanged, again.imported_now, again.pairs_read) == (1, 0, 30, 80)
    assert stored(wh) == 130   # the pairs the new content dropped stay: the warehouse keeps what it stored
    assert [r["imported"] for r in queries.imported_files(wh)] == [100, 30]
    # a stored pair keeps the origin it was first imported from
    assert wh.scalar("SELECT origin FROM preference_pairs WHERE prompt = 'Question 60?'") == f"{path}:61"


GOOD = line(0)
BAD_LINES = [
    pytest.param(b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}', "not valid UTF-8 (byte 0xff at byte 14",
                 id="invalid-utf8"),
    pytest.param(b'{"prompt": "p", "chosen": "a", "rejected": ', "invalid JSON: Expecting value", id="invalid-json"),
    pytest.param(b'{"prompt": "p", "chosen": "a"}', "missing field 'rejected'", id="missing-field"),
    pytest.param(b'{"prompt": "p", "chosen": 5, "rejected": "b"}', "must be strings or message lists", id="non-string"),
    pytest.param(b'{"prompt": "p", "chosen": "same", "rejected": " same "}', "are identical", id="identical"),
    pytest.param(b'{"prompt": "p", "chosen": "a\\ud800", "rejected": "b"}', "unpaired surrogate escape (\\ud800)",
                 id="lone-surrogate"),
    pytest.param(b'{"prompt": "p", "chosen": "a", "rejected": "b", "n": ' + b"9" * 5000 + b"}", "invalid JSON: Exceeds",
                 id="huge-number"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "invalid JSON", id="deep-nesting"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_a_bad_line_is_one_line_naming_file_and_line_and_imports_nothing_of_its_file(wh, tmp_path, bad, message):
    before = write_lines(tmp_path / "before.jsonl", [line(i, "kept ") for i in range(5)])
    assert import_preference_files(wh, [before], LIMIT).imported_now == 5
    k = 9
    other = write_lines(tmp_path / "other.jsonl", [line(i, "other ") for i in range(3)])
    path = write_lines(tmp_path / "bad.jsonl", [line(i) for i in range(k - 2)] + [b"", bad, GOOD])
    with pytest.raises(PreferenceFormatError) as raised:
        import_preference_files(wh, [other, path], LIMIT)   # checked first: the good file listed before it waits too
    text = str(raised.value)
    assert text.startswith(f"{path}:{k}: ") and message in text, text
    assert len(text.splitlines()) == 1 and len(text) < 300
    assert stored(wh) == 5 and len(queries.imported_files(wh)) == 1


def test_a_file_that_turns_bad_after_its_check_is_taken_back_whole(wh, tmp_path, monkeypatch):
    """Edited between the stage's check (before sampling) and its import: chunks already committed go too."""
    monkeypatch.setattr(preference_import, "BATCH_ROWS", 10)
    monkeypatch.setattr(preference_import, "CHUNK_CHARS", 200)   # a transaction every batch or so
    default_limit = wh.scalar("SELECT current_setting('memory_limit')")
    before = write_lines(tmp_path / "before.jsonl", [line(i, "kept ") for i in range(5)])
    assert import_preference_files(wh, [before], LIMIT).imported_now == 5
    path = write_lines(tmp_path / "pairs.jsonl", [line(i) for i in range(50)])
    plans = plan_imports(wh, [path], LIMIT)
    assert [p.action for p in plans] == ["import"] and plans[0].scan.pairs == 50
    write_lines(tmp_path / "pairs.jsonl", [line(i) for i in range(35)] + ["{oops"] + [line(i) for i in range(35, 50)])
    with pytest.raises(PreferenceFormatError, match=rf"^{tmp_path / 'pairs.jsonl'}:36: invalid JSON"):
        import_planned(wh, plans, LIMIT)
    assert stored(wh) == 5 and [r["status"] for r in queries.imported_files(wh)] == ["done"]
    assert wh.scalar("SELECT current_setting('memory_limit')") == default_limit   # the import's cap is lifted
    write_lines(tmp_path / "pairs.jsonl", [line(i) for i in range(50)])          # fixed: the next run imports it
    assert import_preference_files(wh, [path], LIMIT).imported_now == 50


KILLED_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from instructflow.tasks import preference_import
    from instructflow.warehouse import queries
    from instructflow.warehouse.store import open_warehouse

    preference_import.BATCH_ROWS, preference_import.CHUNK_CHARS = 500, 20_000   # a commit every batch or two
    insert = queries.insert_imported_pairs

    def noisy(*args):
        stored = insert(*args)
        print("batch", flush=True)
        return stored

    queries.insert_imported_pairs = noisy
    preference_import.import_preference_files(open_warehouse(Path(sys.argv[1])), [sys.argv[2]], 20000)
    print("finished", flush=True)
""")


def test_a_killed_import_is_taken_out_by_the_next_writer_and_imported_again_whole(tmp_path):
    from instructflow.flows.common import close_warehouses, warehouse_for

    home = tmp_path / "home"
    home.mkdir()
    wh = open_warehouse(home)
    before = write_lines(tmp_path / "before.jsonl", [line(i, "kept ") for i in range(5)])
    assert import_preference_files(wh, [before], LIMIT).imported_now == 5
    wh.close()
    path = write_lines(tmp_path / "pairs.jsonl", [line(i) for i in range(20_000)])
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(home), path], stdout=subprocess.PIPE, text=True)
    try:
        seen = [child.stdout.readline() for _ in range(8)]   # 8 batches in: several chunks committed
        assert seen == ["batch\n"] * 8, seen
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    wh = open_warehouse(home)   # the bare warehouse: what the kill left
    try:
        assert [r["status"] for r in queries.imported_files(wh)] == ["done", "importing"]
        left = stored(wh) - 5
        assert 500 <= left < 20_000
    finally:
        wh.close()
    wh = warehouse_for(home)    # how every command opens it: the killed import's pairs are taken out
    try:
        assert stored(wh) == 5 and [r["status"] for r in queries.imported_files(wh)] == ["done"]
        again = import_preference_files(wh, [path], LIMIT)
        assert again.imported_now == 20_000 and stored(wh) == 20_005
        assert wh.scalar("SELECT count(DISTINCT pair_key) FROM preference_pairs") == 20_005
    finally:
        close_warehouses()


def test_an_oversized_field_is_refused_and_counted_and_a_raised_limit_reads_the_file_again(wh, tmp_path):
    long = "x" * 41
    path = write_lines(tmp_path / "pairs.jsonl", [
        line(1), json.dumps({"prompt": "p", "chosen": long, "rejected": "b"}), line(2),
        json.dumps({"chosen": f"Q: {long}\nA: yes", "rejected": f"Q: {long}\nA: no"}),   # the implicit prompt is long
        line(3)])
    report = import_preference_files(wh, [path], max_field_chars=40)
    assert (report.imported_now, report.refused_too_long, report.metrics()["refused_too_long"]) == (3, 2, 2)
    assert queries.imported_files(wh)[0]["refused_too_long"] == 2
    assert wh.scalar("SELECT count(*) FROM preference_pairs WHERE length(chosen) > 40 OR length(prompt) > 40") == 0
    assert import_preference_files(wh, [path], max_field_chars=40).files_unchanged == 1   # same limit: not read
    raised = import_preference_files(wh, [path], max_field_chars=100)                     # raised: read again
    assert (raised.files_imported, raised.imported_now, raised.refused_too_long) == (1, 2, 0)
    assert import_preference_files(wh, [path], max_field_chars=30).files_unchanged == 1   # nothing more to gain
    assert stored(wh) == 5


def test_an_empty_or_missing_file_is_one_line(wh, tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(PreferenceFormatError, match=rf"^{empty}:1: no preference pairs in the file$"):
        import_preference_files(wh, [empty], LIMIT)
    with pytest.raises(PreferenceFormatError, match="missing.jsonl: preference file not found"):
        import_preference_files(wh, [str(tmp_path / "missing.jsonl")], LIMIT)


MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from instructflow.tasks.preference_import import import_preference_files
    from instructflow.warehouse.store import open_warehouse

    wh = open_warehouse(Path(sys.argv[1]))
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = import_preference_files(wh, [sys.argv[2]], 20000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"imported": report.imported_now, "start_mb": start, "peak_mb": peak}))
""")


@pytest.mark.slow
def test_importing_50000_pairs_keeps_memory_flat(tmp_path):
    """50,000 pairs of ~4 KB (200 MB). Measured growth of the importing process: 370-400 MB, of which
    DuckDB's capped buffer pool 256 MB plus the index's share, the rest one chunk's commit and the closing
    checkpoint; ~450 MB at the bench's 160,000 pairs (400 MB). The code before streaming took 2 GB for
    5,000 tiny pairs and ran out of memory at 50,000; this file's pairs alone, as a list, take 210 MB."""
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
    with (tmp_path / "pairs.jsonl").open("w") as out:
        for i in range(50_000):
            filler = " ".join(words[(i + j) % len(words)] for j in range(130))
            out.write(json.dumps({"prompt": f"Question {i}: {filler}", "chosen": f"Answer {i}: {filler} {filler}",
                                  "rejected": f"No {i}: {filler} {filler}"}) + "\n")
    assert (tmp_path / "pairs.jsonl").stat().st_size > 190 * 2**20
    (tmp_path / "home").mkdir()
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "home"), str(tmp_path / "pairs.jsonl")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["imported"] == 50_000
    assert result["peak_mb"] - result["start_mb"] < 500, result

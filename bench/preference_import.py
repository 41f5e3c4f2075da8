"""Benchmark: importing a large preference file, the way the preferences stage does.

    python bench/preference_import.py [--pairs N] [--shape mixed|tiny] [--oversize-every K]

Writes N preference pairs (default 160,000, the size of HH-RLHF) as JSONL in a temp dir, then, in a
child process each (so each peak RSS is that import's own), imports the file into a fresh warehouse
through the stage's code path (`tasks/preference_import.import_preference_files`: hash, check every
line, then stream it into DuckDB in batches, committed in chunks, all of the file or none of it;
nothing is trained), and
imports it again into the same warehouse (the file is unchanged: it must import 0, and only hash).

Shapes: `mixed` (default), lines like the datasets users bring: half HH-RLHF's implicit-prompt
transcripts ({"chosen","rejected"} sharing the conversation), a quarter explicit {"prompt","chosen",
"rejected"}, a quarter UltraFeedback-style message lists, prompts ~100-1,500 and replies ~50-1,200
characters (~2 KB a line, ~330 MB for 160K); `tiny`: the user report's repro lines
({"prompt": "Q1?", "chosen": "A1", "rejected": "B1"}). Every K-th line (`--oversize-every`, default
10,000; 0 = none) has a 25,000-character reply, over the default `preferences.max_field_chars`.

The last line printed is one JSON object:
  pairs, shape, file_mb           lines written, their shape, the file's size
  seconds                         wall time of the first import (hash + check + import; the process
                                  start and imports are not counted)
  check_s                         of which planning: hashing and checking every line
  pairs_per_s                     pairs / seconds
  peak_rss_mb                     peak RSS of the importing process (ru_maxrss)
  start_rss_mb                    its RSS before the import (Python, DuckDB and the project loaded)
  imported, refused_too_long      pairs stored, pairs refused for a field over the limit
  target_seconds, target_peak_rss_mb   120 s and 1024 MB (for 160,000 pairs on a 2-core machine)
  ratio_to_target                 seconds / target_seconds: at most 1 meets the target
  rss_ratio_to_target             peak_rss_mb / target_peak_rss_mb: at most 1 meets it
  second_run_imported, second_run_seconds, second_run_files_unchanged, second_run_peak_rss_mb
                                  the same file imported again into the same warehouse
  warehouse_mb                    the warehouse file after the imports
  load_avg                        1-minute load average before and after (on 2 cores, above ~1.5 the
                                  seconds measure the neighbours as much as the code)
  reference                       the code before this bench (executemany with ON CONFLICT, all pairs
                                  in one list), measured on the same kind of machine: not re-run here
Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 120
TARGET_PEAK_RSS_MB = 1024
REFERENCE = ("before the streaming import (commit 58a2ddb: executemany + ON CONFLICT, every pair in one list), "
             "tiny repro pairs, measured on this 2-core machine at load ~7: 2,000 pairs 12.2 s, peak RSS 891 MB; "
             "5,000 pairs 40.3 s, 2.0 GB. User report: 5,000 pairs 58 s, 2.1 GB; 50,000 pairs 316 s, 10.9 GB, "
             "DuckDB out of memory, nothing imported")

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little only round man year "
         "came show every good me give our under name very through just form sentence great think say help low line "
         "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
         "small end put home read hand port large spell add even land here must big high such follow act why ask "
         "men change went light kind off need house picture try us again animal point mother world near build self "
         "earth father head stand own page should country found answer school grow study still learn plant cover "
         "food sun four between state keep eye never last let thought city tree cross farm hard start might story "
         "saw far sea draw left late run while press close night real life few north").split()


def text(rng: random.Random, lo: int, hi: int) -> str:
    """Words up to a length drawn between lo and hi characters."""
    target = rng.randint(lo, hi)
    out, size = [], 0
    while size < target:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out).capitalize() + "."


def mixed_line(rng: random.Random, i: int) -> dict:
    kind = i % 4
    if kind in (0, 1):  # HH-RLHF: whole transcripts, the prompt is their shared beginning
        turns = "".join(f"\n\nHuman: {text(rng, 40, 400)}\n\nAssistant: {text(rng, 40, 300)}"
                        for _ in range(rng.randint(0, 2)))
        conversation = f"{turns}\n\nHuman: Question {i}: {text(rng, 40, 500)}\n\nAssistant:"
        return {"chosen": f"{conversation} Sure: {text(rng, 50, 1200)}",
                "rejected": f"{conversation} No. {text(rng, 20, 600)}"}
    prompt = f"Task {i}: {text(rng, 100, 1500)}"
    chosen, rejected = f"Answer {i}: {text(rng, 50, 1200)}", f"Reply {i}: {text(rng, 20, 600)}"
    if kind == 2:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    user = {"role": "user", "content": prompt}  # UltraFeedback (binarized): message lists with the prompt too
    return {"prompt": prompt, "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}], "score_chosen": 8.0, "score_rejected": 4.5}


def write_pairs(path: Path, n: int, shape: str, oversize_every: int) -> None:
    rng = random.Random(1234)
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            line = ({"prompt": f"Q{i}?", "chosen": f"A{i}", "rejected": f"B{i}"} if shape == "tiny"
                    else mixed_line(rng, i))
            if oversize_every and i % oversize_every == oversize_every - 1:
                line = {"prompt": f"Long {i}?", "chosen": "x" * 25_000, "rejected": f"B{i}"}
            out.write(json.dumps(line) + "\n")


def child(home: str, path: str, max_field_chars: int) -> None:
    """One import, as the stage does it, in this process; prints its figures as JSON."""
    from instructflow.tasks.preference_import import import_preference_files
    from instructflow.warehouse.store import open_warehouse

    wh = open_warehouse(Path(home))
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    report = import_preference_files(wh, [path], max_field_chars)
    seconds = time.perf_counter() - started
    wh.close()
    print(json.dumps({"seconds": seconds, "start_rss_mb": start_rss,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      **report.metrics(), "check_s": report.check_s, "pairs_read": report.pairs_read}))


def run_child(home: Path, path: Path, max_field_chars: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(home), str(path), str(max_field_chars)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit code {out.returncode}"
        raise SystemExit(f"import failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=160_000)
    parser.add_argument("--shape", choices=("mixed", "tiny"), default="mixed")
    parser.add_argument("--oversize-every", type=int, default=10_000)
    parser.add_argument("--max-field-chars", type=int, default=None, help="default: preferences.max_field_chars")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    from instructflow.tasks.config import PreferencesConfig

    max_field_chars = args.max_field_chars or PreferencesConfig().max_field_chars
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="preference-import-") as tmp:
        path, home = Path(tmp) / "pairs.jsonl", Path(tmp) / "home"
        home.mkdir()
        print(f"writing {args.pairs:,} {args.shape} pairs ...", file=sys.stderr, flush=True)
        write_pairs(path, args.pairs, args.shape, args.oversize_every)
        print(f"importing {path.stat().st_size / 2**20:.0f} MB ...", file=sys.stderr, flush=True)
        first = run_child(home, path, max_field_chars)
        print(f"first import: {first['seconds']:.1f} s, peak RSS {first['peak_rss_mb']:.0f} MB; again ...",
              file=sys.stderr, flush=True)
        second = run_child(home, path, max_field_chars)
        file_mb, warehouse_mb = path.stat().st_size / 2**20, (home / "warehouse.duckdb").stat().st_size / 2**20
    seconds = first["seconds"]
    print(json.dumps({
        "pairs": args.pairs, "shape": args.shape, "file_mb": round(file_mb, 1), "seconds": round(seconds, 2),
        "check_s": round(first["check_s"], 2),
        "pairs_per_s": round(args.pairs / seconds), "peak_rss_mb": round(first["peak_rss_mb"]),
        "start_rss_mb": round(first["start_rss_mb"]), "imported": first["imported_now"],
        "refused_too_long": first["refused_too_long"], "max_field_chars": max_field_chars,
        "target_seconds": TARGET_SECONDS, "target_peak_rss_mb": TARGET_PEAK_RSS_MB,
        "ratio_to_target": round(seconds / TARGET_SECONDS, 3),
        "rss_ratio_to_target": round(first["peak_rss_mb"] / TARGET_PEAK_RSS_MB, 3),
        "second_run_imported": second["imported_now"], "second_run_seconds": round(second["seconds"], 2),
        "second_run_files_unchanged": second["files_unchanged"], "second_run_peak_rss_mb": round(second["peak_rss_mb"]),
        "warehouse_mb": round(warehouse_mb, 1), "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "reference": REFERENCE,
    }))


if __name__ == "__main__":
    main()

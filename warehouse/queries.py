"""Typed reads and writes for the stages (all SQL parameterised). Grouped by the stage that writes."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from instructflow.warehouse.store import Warehouse, now


# --- seeds ------------------------------------------------------------------------------------
def replace_seed_tasks(wh: Warehouse, tasks: Sequence[Any]) -> None:
    """Mirror the current seed files: all-or-nothing, so a bad load never leaves half the seeds."""
    ts = now()
    rows = [[t.id, t.name, t.instruction, t.is_classification, t.source,
             json.dumps([{"input": i.input, "output": i.output} for i in t.instances]), ts] for t in tasks]
    with wh.transaction():
        wh.con.execute("DELETE FROM seed_tasks")
        if rows:
            wh.con.executemany("INSERT INTO seed_tasks VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


def seed_rows(wh: Warehouse) -> list[dict]:
    found = wh.rows("SELECT seed_id, name, instruction, is_classification, instances FROM seed_tasks ORDER BY seed_id")
    for row in found:
        row["instances"] = json.loads(row["instances"])
    return found


# --- teacher requests ---------------------------------------------------------------------------
def teacher_request_row(result: Any, stage: str, purpose: str, prompt: str) -> list:
    return [result.key, stage, purpose, result.prompt_hash, result.model, json.dumps(dict(result.params), default=str),
            prompt, json.dumps(list(result.texts)), result.finish_reason, result.prompt_tokens,
            result.completion_tokens, result.latency_s, result.attempts, result.error, result.cost_usd, now()]


TEACHER_INSERT = "INSERT INTO teacher_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def replace_teacher_result(wh: Warehouse, result: Any, stage: str, purpose: str, prompt: str) -> None:
    """Store one answer; an answer stored before under the same key moves to the history table."""
    replace_teacher_results(wh, [teacher_request_row(result, stage, purpose, prompt)])


def replace_teacher_results(wh: Warehouse, rows: Sequence[Sequence[Any]]) -> None:
    """Store `teacher_request_row` rows in one transaction; answers stored before under their keys move
    to the history table."""
    with wh.transaction():
        _archive_requests(wh, [row[0] for row in rows], now())
        _insert_columns(wh, "teacher_requests", rows)


def _archive_requests(wh: Warehouse, keys: list[str], ts: Any) -> None:
    """Move the stored rows of `keys` to teacher_request_history (inside the caller's transaction)."""
    if keys:
        wh.con.execute("INSERT INTO teacher_request_history SELECT *, ? FROM teacher_requests "
                       "WHERE request_key IN (SELECT unnest(?))", [ts, keys])
        wh.con.execute("DELETE FROM teacher_requests WHERE request_key IN (SELECT unnest(?))", [keys])


def stored_requests(wh: Warehouse, keys: Sequence[str]) -> dict[str, dict]:
    """request key -> its stored row (texts decoded), for the keys that have one: one query."""
    found = wh.rows("SELECT * FROM teacher_requests WHERE request_key IN (SELECT unnest(?))", [list(keys)])
    for row in found:
        row["texts"] = json.loads(row["texts"] or "[]")
    return {row["request_key"]: row for row in found}


def teacher_totals(wh: Warehouse, stage: str) -> dict:
    row = wh.rows("SELECT count(*) AS requests, count(error) AS failed_requests, "
                  "coalesce(sum(attempts - 1), 0) AS retries, coalesce(sum(prompt_tokens), 0) AS prompt_tokens, "
                  "coalesce(sum(completion_tokens), 0) AS completion_tokens, coalesce(sum(cost_usd), 0) AS cost_usd, "
                  "coalesce(sum(latency_s), 0) AS latency_s FROM teacher_requests WHERE stage = ?", [stage])[0]
    return {k: (float(v) if k in ("cost_usd", "latency_s") else int(v)) for k, v in row.items()}


# --- candidates and instances -------------------------------------------------------------------
@dataclass
class CandidateRow:
    request_key: str
    position: int
    instruction: str
    input: str | None
    output: str | None
    heuristic_reason: str | None
    verdict: str
    reason: str | None
    max_score: float | None
    most_similar: str | None
    top_k: list | None
    mean_score: float | None


def insert_request_with_candidates(wh: Warehouse, result: Any, stage: str, prompt: str,
                                   candidates: Sequence[CandidateRow], ids: Sequence[int]) -> None:
    """The request row and its parsed candidates land together or not at all (kill-safe resume).
    `ids` come from `wh.next_ids` beforehand, because the filter names pool entries by id."""
    ts = now()
    with wh.transaction():
        wh.con.execute(TEACHER_INSERT, teacher_request_row(result, stage, "instructions", prompt))
        if candidates:
            wh.con.executemany(
                "INSERT INTO candidates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                [[cid, c.request_key, c.position, c.instruction, c.input, c.output, c.heuristic_reason, c.verdict,
                  c.reason, c.max_score, c.most_similar, json.dumps(c.top_k) if c.top_k is not None else None,
                  c.mean_score, ts] for cid, c in zip(ids, candidates)])


def insert_instances_result(wh: Warehouse, candidate_id: int, is_classification: bool | None,
                            instances: Sequence[tuple[str, str]], results: Sequence[tuple[Any, str, str]]) -> None:
    """Classification verdict, instances and the teacher requests that produced them, atomically."""
    with wh.transaction():
        for result, purpose, prompt in results:
            wh.con.execute(TEACHER_INSERT, teacher_request_row(result, "generate", purpose, prompt))
        wh.con.execute("UPDATE candidates SET is_classification = ? WHERE candidate_id = ?",
                       [is_classification, candidate_id])
        wh.con.execute("DELETE FROM instances WHERE candidate_id = ?", [candidate_id])
        if instances:
            wh.con.executemany("INSERT INTO instances VALUES (?, ?, ?, ?)",
                               [[candidate_id, i, inp, out] for i, (inp, out) in enumerate(instances)])


def candidates_in_order(wh: Warehouse) -> list[dict]:
    return wh.rows("SELECT candidate_id, instruction, input, output, heuristic_reason, verdict FROM candidates "
                   "ORDER BY candidate_id")


def kept_candidates(wh: Warehouse) -> list[dict]:
    return wh.rows("SELECT candidate_id, instruction FROM candidates WHERE verdict = 'kept' ORDER BY candidate_id")


# --- generate: resume plan and group commits ------------------------------------------------------
def instruction_key_states(wh: Warehouse) -> list[dict]:
    """Every stored instruction request: its key, whether it failed, and how many earlier attempts
    of the key were replaced (read once at the start of a run: the resume plan)."""
    return wh.rows("SELECT r.request_key, r.error IS NOT NULL AS failed, "
                   "(SELECT count(*) FROM teacher_request_history h WHERE h.request_key = r.request_key) AS replaced "
                   "FROM teacher_requests r WHERE r.stage = 'generate' AND r.purpose = 'instructions'")


def instance_steps_to_do(wh: Warehouse, steps: tuple[str, str] = ("classify", "instances")) -> list[dict]:
    """Kept instructions without instances whose instance step (its two requests' key prefixes:
    classify, instances; or instance_input, instance_output) is missing or failed, with `stored` (a
    failed attempt is stored and must be replaced) and `replaced` (earlier attempts)."""
    first, second = (f"{step}:" for step in steps)
    return wh.rows(
        "SELECT c.candidate_id, c.instruction, (clf.request_key IS NOT NULL) AS stored, "
        "(SELECT count(*) FROM teacher_request_history h WHERE h.request_key = ? || c.candidate_id::VARCHAR) "
        "AS replaced FROM candidates c "
        "LEFT JOIN teacher_requests clf ON clf.request_key = ? || c.candidate_id::VARCHAR "
        "LEFT JOIN teacher_requests inst ON inst.request_key = ? || c.candidate_id::VARCHAR "
        "WHERE c.verdict = 'kept' AND (clf.request_key IS NULL OR clf.error IS NOT NULL OR inst.request_key IS NULL OR inst.error IS NOT NULL) "
        # instances stored by the other instance_prompt style (the option changed between runs) are kept as they are
        "AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.candidate_id = c.candidate_id) "
        "ORDER BY c.candidate_id", [first, first, second])


@dataclass
class GenerateBatch:
    """Results buffered by the generate loop, written by `commit_generate_batch` in one transaction."""
    requests: list = field(default_factory=list)        # teacher_request_row(...) lists
    replaced_keys: list = field(default_factory=list)   # stored failed keys these results replace
    candidates: list = field(default_factory=list)      # (candidate_id, CandidateRow)
    classifications: list = field(default_factory=list)  # (candidate_id, is_classification)
    instances: list = field(default_factory=list)       # (candidate_id, idx, input, output)

    def __len__(self) -> int:
        return len(self.requests)


def _insert_columns(wh: Warehouse, table: str, rows: Sequence[Sequence[Any]]) -> None:
    """One INSERT for many rows: the rows go in as one list per column and are unnested (a row-by-row
    executemany costs ~0.5 ms a row; this, ~0.015 ms). `table` is one of ours, never input."""
    if rows:
        columns = [list(column) for column in zip(*rows)]
        wh.con.execute(f"INSERT INTO {table} SELECT {', '.join('unnest(?)' for _ in columns)}", columns)


def commit_generate_batch(wh: Warehouse, batch: GenerateBatch) -> None:
    """Requests, their candidates, classifications and instances: all of the batch or none of it."""
    ts = now()
    with wh.transaction():
        _archive_requests(wh, list(batch.replaced_keys), ts)
        _insert_columns(wh, "teacher_requests", batch.requests)
        _insert_columns(wh, "candidates", [
            [cid, c.request_key, c.position, c.instruction, c.input, c.output, c.heuristic_reason, c.verdict,
             c.reason, c.max_score, c.most_similar, json.dumps(c.top_k) if c.top_k is not None else None,
             c.mean_score, None, ts] for cid, c in batch.candidates])
        if batch.classifications:
            ids, flags = (list(column) for column in zip(*batch.classifications))
            wh.con.execute("UPDATE candidates SET is_classification = v.flag FROM "
                           "(SELECT unnest(?) AS id, unnest(?::BOOLEAN[]) AS flag) v WHERE candidate_id = v.id",
                           [ids, flags])
            wh.con.execute("DELETE FROM instances WHERE candidate_id IN (SELECT unnest(?))", [ids])
        _insert_columns(wh, "instances", batch.instances)


def update_verdicts(wh: Warehouse, verdicts: Iterable[Sequence[Any]]) -> None:
    """[(verdict, reason, heuristic_reason, max_score, most_similar, top_k, mean_score, candidate_id)], atomically."""
    rows = [[v[0], v[1], v[2], v[3], v[4], json.dumps(v[5]) if v[5] is not None else None, v[6], v[7]]
            for v in verdicts]
    if not rows:
        return
    with wh.transaction():
        wh.con.executemany("UPDATE candidates SET verdict = ?, reason = ?, heuristic_reason = ?, max_score = ?, "
                           "most_similar = ?, top_k = ?, mean_score = ? WHERE candidate_id = ?", rows)


def candidate_counts(wh: Warehouse) -> dict:
    total = wh.scalar("SELECT count(*) FROM candidates")
    kept = wh.scalar("SELECT count(*) FROM candidates WHERE verdict = 'kept'")
    by_reason = {r["reason"]: r["n"] for r in wh.rows(
        "SELECT reason, count(*) AS n FROM candidates WHERE verdict = 'rejected' GROUP BY reason ORDER BY n DESC")}
    with_instances = wh.scalar("SELECT count(DISTINCT candidate_id) FROM instances")
    return {"candidates": total, "kept": kept, "rejected_by_reason": by_reason, "kept_with_instances": with_instances}


def candidates_fingerprint(wh: Warehouse) -> str:
    """Content fingerprint of every stored candidate (what the filter stage consumes)."""
    row = wh.rows("SELECT count(*) AS n, coalesce(bit_xor(hash(candidate_id, instruction, input, output)), 0) AS h "
                  "FROM candidates")[0]
    return f"{row['n']}:{row['h']}"


def kept_fingerprint(wh: Warehouse) -> str:
    """Content fingerprint of the kept set and its instances (what SFT consumes)."""
    row = wh.rows("SELECT count(*) AS n, coalesce(bit_xor(hash(c.candidate_id, c.instruction, i.idx, i.input, i.output)), 0) AS h "
                  "FROM candidates c LEFT JOIN instances i USING (candidate_id) WHERE c.verdict = 'kept'")[0]
    return f"{row['n']}:{row['h']}"


def candidate_samples(wh: Warehouse, limit: int = 100) -> list[dict]:
    """Kept and rejected examples side by side, for the dashboard table."""
    return wh.rows("(SELECT candidate_id, verdict, reason, round(max_score, 3) AS max_score, most_similar, instruction "
                   " FROM candidates WHERE verdict = 'kept' ORDER BY candidate_id DESC LIMIT ?) UNION ALL "
                   "(SELECT candidate_id, verdict, reason, round(max_score, 3), most_similar, instruction "
                   " FROM candidates WHERE verdict = 'rejected' ORDER BY candidate_id DESC LIMIT ?)",
                   [limit // 2, limit // 2])


# --- sft ----------------------------------------------------------------------------------------
def kept_instances(wh: Warehouse) -> list[dict]:
    """Kept generated instructions x their instances, in arrival order."""
    return wh.rows("SELECT c.candidate_id, c.instruction, i.idx, i.input, i.output FROM candidates c "
                   "JOIN instances i USING (candidate_id) WHERE c.verdict = 'kept' ORDER BY c.candidate_id, i.idx")


def store_sft_examples(wh: Warehouse, dataset_hash: str, split_rows: Sequence[tuple[str, Any]]) -> None:
    """The exact set a checkpoint was trained on, by dataset hash (idempotent per hash)."""
    with wh.transaction():
        wh.con.execute("DELETE FROM sft_examples WHERE dataset_hash = ?", [dataset_hash])
        if split_rows:
            wh.con.executemany("INSERT INTO sft_examples VALUES (?, ?, ?, ?, ?, ?)",
                               [[dataset_hash, split, ex.instruction, ex.input, ex.output, ex.source]
                                for split, ex in split_rows])


def sft_examples(wh: Warehouse, dataset_hash: str, split: str | None = None) -> list[dict]:
    sql = "SELECT * FROM sft_examples WHERE dataset_hash = ?"
    params: list[Any] = [dataset_hash]
    if split:
        sql += " AND split = ?"
        params.append(split)
    return wh.rows(sql + " ORDER BY instruction, input", params)


# --- preferences --------------------------------------------------------------------------------
def stored_responses(wh: Warehouse, stage: str, model_path: str, prompts: Sequence[str]) -> dict[str, list[str]]:
    """prompt -> responses in sample order, for prompts already sampled from this model."""
    found = wh.rows("SELECT prompt, sample_idx, response FROM responses WHERE stage = ? AND model_path = ? "
                    "AND prompt IN (SELECT unnest(?)) ORDER BY prompt, sample_idx", [stage, model_path, list(prompts)])
    out: dict[str, list[str]] = {}
    for row in found:
        out.setdefault(row["prompt"], []).append(row["response"])
    return out


def insert_responses(wh: Warehouse, stage: str, model_path: str, by_prompt: dict[str, list[str]]) -> None:
    rows = [(prompt, i, text) for prompt, texts in by_prompt.items() for i, text in enumerate(texts)]
    if not rows:
        return
    ids = wh.next_ids(len(rows))
    ts = now()
    with wh.transaction():
        wh.con.executemany(
            "INSERT INTO responses (response_id, stage, model_path, prompt, sample_idx, response, created_at, "
            "response_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [[rid, stage, model_path, p, i, t, ts, f"{stage}:{model_path}:{i}:{p}"] for rid, (p, i, t) in zip(ids, rows)])


def forget_responses(wh: Warehouse, stage: str, model_path: str, prompts: Sequence[str]) -> None:
    """`--force`: the stored samples of these prompts are dropped, so they are sampled again."""
    wh.execute("DELETE FROM responses WHERE stage = ? AND model_path = ? AND prompt IN (SELECT unnest(?))",
               [stage, model_path, list(prompts)])


def replace_judged_pairs(wh: Warehouse, rows: Sequence[dict]) -> int:
    """Judged pairs take the latest verdicts (a new judge relabels a pair it judged again), all or
    nothing; returns how many pair keys were new. Imported pairs are never replaced."""
    keys = list({row["pair_key"] for row in rows})
    if not keys:
        return 0
    known = wh.scalar("SELECT count(*) FROM preference_pairs WHERE pair_key IN (SELECT unnest(?))", [keys])
    ids = wh.next_ids(len(rows))
    with wh.transaction():
        wh.con.execute("DELETE FROM preference_pairs WHERE source = 'judged' AND pair_key IN (SELECT unnest(?))", [keys])
        wh.con.executemany(PAIR_INSERT, _pair_rows(ids, rows))
    return len(keys) - known


PAIR_COLUMNS = ["source", "prompt", "response_a", "response_b", "verdict_ab", "verdict_ba", "outcome", "chosen",
                "rejected", "judge_model", "judge_text_ab", "judge_text_ba", "origin", "pair_key"]
PAIR_INSERT = (f"INSERT INTO preference_pairs (pair_id, {', '.join(PAIR_COLUMNS)}, created_at) VALUES "
               f"(?, {', '.join('?' for _ in PAIR_COLUMNS)}, ?) ON CONFLICT DO NOTHING")


def _pair_rows(ids: Sequence[int], rows: Sequence[dict]) -> list[list]:
    ts = now()
    return [[pid] + [row.get(c) for c in PAIR_COLUMNS] + [ts] for pid, row in zip(ids, rows)]


# One batch of imported pairs in one statement: the columns go in as lists and are unnested (a row-by-row
# executemany with ON CONFLICT cost ~6 ms a row and gigabytes at 50,000 rows). Keys already stored,
# and repeats inside the batch (the first line wins), are left out by the anti-join and QUALIFY, so
# no key of the warehouse is ever read into Python.
IMPORTED_PAIRS_INSERT = (
    "INSERT INTO preference_pairs (pair_id, source, prompt, response_a, response_b, outcome, chosen, rejected, "
    "origin, pair_key, created_at, import_id) "
    "SELECT nextval('id_seq'), 'imported', prompt, chosen, rejected, 'a', chosen, rejected, origin, pair_key, ?, ? "
    "FROM (SELECT unnest(?::VARCHAR[]) AS prompt, unnest(?::VARCHAR[]) AS chosen, unnest(?::VARCHAR[]) AS rejected, "
    "unnest(?::VARCHAR[]) AS origin, unnest(?::VARCHAR[]) AS pair_key, unnest(range(?)) AS position) batch "
    "WHERE NOT EXISTS (SELECT 1 FROM preference_pairs stored WHERE stored.pair_key = batch.pair_key) "
    "QUALIFY row_number() OVER (PARTITION BY batch.pair_key ORDER BY batch.position) = 1")


def insert_imported_pairs(wh: Warehouse, import_id: str, prompts: list[str], chosen: list[str], rejected: list[str],
                          origins: list[str], keys: list[str]) -> int:
    """Store the pairs of one import batch (parallel columns) whose key is new, tagged with the import;
    returns how many were new."""
    if not keys:
        return 0
    return int(wh.scalar(IMPORTED_PAIRS_INSERT,
                         [now(), import_id, prompts, chosen, rejected, origins, keys, len(keys)]))


def preference_pair_count(wh: Warehouse) -> int:
    return int(wh.scalar("SELECT count(*) FROM preference_pairs"))


def file_imported_before(wh: Warehouse, sha256: str, max_field_chars: int) -> bool:
    """Whether a file with these bytes was imported whole, with nothing refused that this limit would take."""
    return bool(wh.scalar("SELECT count(*) FROM imported_files WHERE sha256 = ? AND status = 'done' "
                          "AND (refused_too_long = 0 OR max_field_chars >= ?)", [sha256, max_field_chars]))


def start_file_import(wh: Warehouse, sha256: str, path: str, max_field_chars: int) -> str:
    """Record an import as `importing` (committed at once, so a kill leaves a trace to clean); returns its id."""
    import_id = uuid.uuid4().hex[:12]
    wh.execute("INSERT INTO imported_files (import_id, sha256, path, status, max_field_chars, started_at) "
               "VALUES (?, ?, ?, 'importing', ?, ?)", [import_id, sha256, path, max_field_chars, now()])
    return import_id


def finish_file_import(wh: Warehouse, import_id: str, sha256: str, size: int, pairs: int, imported: int,
                       refused_too_long: int) -> None:
    """Mark the import done with what it read (run in the transaction of its last chunk)."""
    wh.execute("UPDATE imported_files SET status = 'done', sha256 = ?, bytes = ?, pairs = ?, imported = ?, "
               "refused_too_long = ?, finished_at = ? WHERE import_id = ?",
               [sha256, size, pairs, imported, refused_too_long, now(), import_id])


def discard_imports(wh: Warehouse, import_ids: Sequence[str]) -> int:
    """Take unfinished imports back out, all or nothing: their pairs (only keys they added) and their rows."""
    if not import_ids:
        return 0
    with wh.transaction():
        removed = wh.scalar("SELECT count(*) FROM preference_pairs WHERE import_id IN (SELECT unnest(?::VARCHAR[]))",
                            [list(import_ids)])
        wh.execute("DELETE FROM preference_pairs WHERE import_id IN (SELECT unnest(?::VARCHAR[]))", [list(import_ids)])
        wh.execute("DELETE FROM imported_files WHERE import_id IN (SELECT unnest(?::VARCHAR[]))", [list(import_ids)])
    return int(removed)


def discard_unfinished_imports(wh: Warehouse) -> int:
    """Imports a killed process left `importing`: their pairs and rows go (the next stage run imports the
    file again). Only a writer calls this, and DuckDB's lock makes it the only one, so none is live."""
    ids = [r["import_id"] for r in wh.rows("SELECT import_id FROM imported_files WHERE status = 'importing'")]
    return discard_imports(wh, ids)


def imported_files(wh: Warehouse) -> list[dict]:
    return wh.rows("SELECT * FROM imported_files ORDER BY started_at, path")


def preference_counts(wh: Warehouse) -> dict:
    row = wh.rows("SELECT count(*) FILTER (WHERE source = 'judged') AS pairs_judged, "
                  "count(*) FILTER (WHERE source = 'judged' AND chosen IS NOT NULL) AS pairs_kept, "
                  "count(*) FILTER (WHERE outcome = 'tie') AS ties, "
                  "count(*) FILTER (WHERE outcome = 'disagree') AS order_disagreements, "
                  "count(*) FILTER (WHERE outcome = 'invalid') AS invalid_verdicts, "
                  "count(*) FILTER (WHERE source = 'imported') AS imported FROM preference_pairs")[0]
    return {k: int(v) for k, v in row.items()}


def training_pairs(wh: Warehouse) -> list[dict]:
    """Every usable pair (judged with agreeing verdicts, or imported), in a stable order."""
    return wh.rows("SELECT pair_key, source, prompt, chosen, rejected FROM preference_pairs "
                   "WHERE chosen IS NOT NULL AND rejected IS NOT NULL ORDER BY pair_key")


def pairs_fingerprint(wh: Warehouse) -> str:
    # the chosen side is part of it: a judge that flips a verdict changes what reward trains on
    row = wh.rows("SELECT count(*) AS n, coalesce(bit_xor(hash(pair_key || chosen)), 0) AS h FROM preference_pairs "
                  "WHERE chosen IS NOT NULL")[0]
    return f"{row['n']}:{row['h']}"


def pair_samples(wh: Warehouse, limit: int = 60) -> list[dict]:
    return wh.rows("SELECT source, outcome, verdict_ab, verdict_ba, left(prompt, 200) AS prompt, "
                   "left(response_a, 200) AS response_a, left(response_b, 200) AS response_b, origin "
                   "FROM preference_pairs ORDER BY created_at DESC LIMIT ?", [limit])


# --- evaluate -----------------------------------------------------------------------------------
EVAL_REPLY_FIELDS = ("prompt_index", "prompt", "policy", "reply", "ended", "words", "repetition", "rm_score",
                     "rm_holdout_score", "kl_to_sft", "judge_outcome")


def insert_eval_replies(wh: Warehouse, stage_run_id: str, rows: Sequence[dict]) -> None:
    """One row per (prompt, policy); a missing field is stored as NULL."""
    ts = now()
    wh.executemany(f"INSERT INTO eval_replies VALUES (?, {', '.join('?' * len(EVAL_REPLY_FIELDS))}, ?)",
                   [[stage_run_id, *(r.get(f) for f in EVAL_REPLY_FIELDS), ts] for r in rows])


def eval_samples(wh: Warehouse, stage_run_id: str, limit: int = 200) -> list[dict]:
    """The artifact's table: one row per prompt and policy, texts cut for display."""
    return wh.rows("SELECT prompt_index, policy, left(prompt, 200) AS prompt, left(reply, 300) AS reply, ended, words, "
                   "round(repetition, 3) AS repetition, round(rm_score, 4) AS rm_score, "
                   "round(kl_to_sft, 4) AS kl_to_sft, judge_outcome FROM eval_replies WHERE stage_run_id = ? "
                   "ORDER BY prompt_index, policy LIMIT ?", [stage_run_id, limit])


# --- stage runs ---------------------------------------------------------------------------------
def record_final_inputs(wh: Warehouse, stage_run_id: str, input_hash: str, inputs: dict) -> None:
    """A stage run is recorded against what it finally consumed (generate adds the candidates the
    filter hashes), not what there was when it started."""
    wh.execute("UPDATE stage_runs SET input_hash = ?, inputs = ? WHERE stage_run_id = ?",
               [input_hash, json.dumps(inputs), stage_run_id])


# --- export and report ----------------------------------------------------------------------------
EXPORT_SOURCES = ("generated", "seeds", "all")


def export_rows(wh: Warehouse, source: str) -> tuple[list[dict], dict[str, int]]:
    """(instruction/input/output records, how many of each source): kept generated instructions x
    their instances ("generated"), the seed tasks' own instances ("seeds"), or both ("all", generated
    first), the two parts the SFT set is made of."""
    if source not in EXPORT_SOURCES:
        raise ValueError(f"export source {source!r}: expected one of {', '.join(EXPORT_SOURCES)}")
    generated = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
                 for r in kept_instances(wh)] if source in ("generated", "all") else []
    seeds = [{"instruction": seed["instruction"], "input": i["input"], "output": i["output"]}
             for seed in seed_rows(wh) for i in seed["instances"]] if source in ("seeds", "all") else []
    return generated + seeds, {"generated": len(generated), "seeds": len(seeds)}


def seed_sources(wh: Warehouse) -> list[str]:
    """The files the stored seed tasks came from."""
    return [r["source"] for r in wh.rows("SELECT DISTINCT source FROM seed_tasks ORDER BY source")]


def sft_example_counts(wh: Warehouse, dataset_hash: str) -> dict[str, dict[str, int]]:
    """split -> source -> examples, of the SFT set stored under `dataset_hash` (what a checkpoint trained on)."""
    counts: dict[str, dict[str, int]] = {}
    for row in wh.rows("SELECT split, source, count(*) AS n FROM sft_examples WHERE dataset_hash = ? "
                       "GROUP BY split, source ORDER BY split, source", [dataset_hash]):
        counts.setdefault(row["split"], {})[row["source"]] = int(row["n"])
    return counts


def pair_provenance(wh: Warehouse) -> dict[str, list[str]]:
    """Who labelled the usable pairs: the judge models of judged pairs, the origins of imported ones."""
    rows = wh.rows("SELECT DISTINCT source, coalesce(CASE WHEN source = 'judged' THEN judge_model ELSE origin END, '?') "
                   "AS who FROM preference_pairs WHERE chosen IS NOT NULL AND rejected IS NOT NULL ORDER BY 1, 2")
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["source"], []).append(row["who"])
    return found


def checkpoint_at(wh: Warehouse, kind: str, path: str) -> dict | None:
    """The newest registration of the checkpoint of `kind` stored at `path` (what a later stage started from)."""
    found = wh.rows("SELECT * FROM checkpoints WHERE kind = ? AND path = ? ORDER BY created_at DESC, checkpoint_id DESC "
                    "LIMIT 1", [kind, path])
    return found[0] if found else None


def checkpoint_paths_in_use(wh: Warehouse) -> list[str]:
    """Paths of the checkpoints the current stage results point to: each kind's newest, and every one the
    latest successful run of a stage registered (`instructflow gc` keeps what holds them)."""
    return [r["path"] for r in wh.rows(
        "SELECT DISTINCT path FROM checkpoints WHERE stage_run_id IN (SELECT s.stage_run_id FROM stage_runs s "
        "JOIN (SELECT stage, max(started_at) AS t FROM stage_runs WHERE status = 'success' GROUP BY stage) l "
        "ON s.stage = l.stage AND s.started_at = l.t) OR checkpoint_id IN (SELECT checkpoint_id FROM checkpoints "
        "QUALIFY row_number() OVER (PARTITION BY kind ORDER BY created_at DESC, checkpoint_id DESC) = 1) ORDER BY path")]


def last_successful_stage_runs(wh: Warehouse) -> list[dict]:
    return wh.rows("SELECT s.* FROM stage_runs s JOIN (SELECT stage, max(started_at) AS t FROM stage_runs "
                   "WHERE status = 'success' GROUP BY stage) l ON s.stage = l.stage AND s.started_at = l.t "
                   "ORDER BY s.started_at")


# --- teacher batches (teacher.mode = "batch") ------------------------------------------------------
BATCH_OPEN = "collected_at IS NULL"  # uploaded, created or running: its lines are not downloaded yet


def record_batch_input(wh: Warehouse, input_file_id: str, stage: str, endpoint: str,
                       rows: Sequence[tuple[str, str, str, dict, dict]]) -> None:
    """An uploaded batch input and its (key, purpose, prompt, params, meta) lines, before the batch is
    created: a kill before `set_batch_created` leaves a row the next run looks the batch up by."""
    with wh.transaction():
        wh.con.execute("INSERT INTO teacher_batches (input_file_id, stage, endpoint, status, requests, created_at) "
                       "VALUES (?, ?, ?, 'uploaded', ?, ?)", [input_file_id, stage, endpoint, len(rows), now()])
        wh.con.executemany("INSERT INTO teacher_batch_requests (input_file_id, request_key, purpose, prompt, params, "
                           "meta) VALUES (?, ?, ?, ?, ?, ?)",
                           [[input_file_id, key, purpose, prompt, json.dumps(params, default=str), json.dumps(meta)]
                            for key, purpose, prompt, params, meta in rows])


def set_batch_state(wh: Warehouse, input_file_id: str, batch_id: str | None, status: str, completed: int | None,
                    failed: int | None) -> None:
    wh.execute("UPDATE teacher_batches SET batch_id = coalesce(?, batch_id), status = ?, completed = ?, failed = ? "
               "WHERE input_file_id = ?", [batch_id, status, completed, failed, input_file_id])


def store_batch_lines(wh: Warehouse, input_file_id: str, status: str, output_file_id: str | None,
                      error_file_id: str | None, error: str | None,
                      lines: Sequence[tuple[str, dict | None, str | None, bool]]) -> None:
    """A finished batch's (key, response body, error, missing) lines and its end state, atomically."""
    ts = now()
    with wh.transaction():
        wh.con.executemany("UPDATE teacher_batch_requests SET response = ?, error = ?, missing = ? "
                           "WHERE input_file_id = ? AND request_key = ?",
                           [[json.dumps(body) if body is not None else None, err, missing, input_file_id, key]
                            for key, body, err, missing in lines])
        wh.con.execute("UPDATE teacher_batches SET status = ?, output_file_id = ?, error_file_id = ?, error = ?, "
                       "finished_at = coalesce(finished_at, ?), collected_at = ? WHERE input_file_id = ?",
                       [status, output_file_id, error_file_id, error, ts, ts, input_file_id])


def open_batches(wh: Warehouse, stage: str | None = None) -> list[dict]:
    """Batches whose lines are not downloaded yet, oldest first."""
    sql = f"SELECT * FROM teacher_batches WHERE {BATCH_OPEN}"
    params: list[Any] = []
    if stage:
        sql += " AND stage = ?"
        params.append(stage)
    return wh.rows(sql + " ORDER BY created_at", params)


def batch_rows(wh: Warehouse, limit: int = 50) -> list[dict]:
    return wh.rows("SELECT * FROM teacher_batches ORDER BY created_at DESC LIMIT ?", [limit])


def batch_request_keys(wh: Warehouse, input_file_id: str) -> list[str]:
    return [r["request_key"] for r in wh.rows(
        "SELECT request_key FROM teacher_batch_requests WHERE input_file_id = ? ORDER BY request_key", [input_file_id])]


def batch_key_states(wh: Warehouse, stage: str) -> dict[str, dict]:
    """request key -> its line in the newest batch holding it, with that batch's state, how many batches
    held it (`batches`) and whether its answer is stored in teacher_requests since it was collected."""
    found = wh.rows(
        "SELECT r.*, b.batch_id, b.status, b.collected_at, "
        "(SELECT count(*) FROM teacher_batch_requests x WHERE x.request_key = r.request_key) AS batches, "
        "EXISTS (SELECT 1 FROM teacher_requests t WHERE t.request_key = r.request_key "
        "        AND t.created_at >= b.collected_at) AS stored "
        "FROM teacher_batch_requests r JOIN teacher_batches b USING (input_file_id) WHERE b.stage = ? "
        "QUALIFY row_number() OVER (PARTITION BY r.request_key ORDER BY b.created_at DESC) = 1", [stage])
    for row in found:
        for column in ("params", "meta", "response"):
            row[column] = json.loads(row[column]) if row[column] is not None else None
    return {row["request_key"]: row for row in found}


def mark_batch_cancelling(wh: Warehouse, batch_id: str, status: str) -> None:
    """After a user's cancel: the next run of its stage polls it to its end and collects what finished."""
    wh.execute("UPDATE teacher_batches SET status = ? WHERE batch_id = ?", [status, batch_id])


def batch_by_id(wh: Warehouse, batch_id: str) -> dict | None:
    found = wh.rows("SELECT * FROM teacher_batches WHERE batch_id = ?", [batch_id])
    return found[0] if found else None

"""The DuckDB warehouse: the only module that speaks SQL. Every statement is parameterised.

Opening applies numbered migrations (`migrations/NNN_name.sql`) in one transaction each and
refuses a file written by a newer schema. One process writes at a time: DuckDB's file lock is
turned into a one-line error that says which process holds it.
"""
from __future__ import annotations

import json
import re
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import duckdb

WAREHOUSE_FILE = "warehouse.duckdb"


class WarehouseError(RuntimeError):
    """One-line, actionable warehouse error."""


class WarehouseLocked(WarehouseError):
    """Another process holds the file's DuckDB lock; `pid` is the holder DuckDB names, if it does."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


class MigrationsPending(WarehouseError):
    """A reader (opened read-only, so it never migrates) met a warehouse from an older instructflow."""

    def __init__(self, path: Path, version: int, pending: list[str]):
        self.version, self.pending = version, pending
        super().__init__(f"warehouse {path} is at schema version {version}; migration"
                         f"{'s' if len(pending) > 1 else ''} {', '.join(pending)} pending: a writing command "
                         "(`instructflow run` or `instructflow stage NAME`) applies them; readers do not")


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) in order, from the packaged migrations folder."""
    folder = resources.files("instructflow.warehouse").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{3})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found)


def _friendly_open_error(path: Path, exc: Exception) -> WarehouseError:
    text = str(exc)
    if "lock" in text.lower():
        pid = re.search(r"PID (\d+)", text)
        holder = f"process {pid.group(1)}" if pid else "another process"
        return WarehouseLocked(f"warehouse {path} is in use by {holder} (a run holds the DuckDB lock); "
                               "wait for it to finish or stop it, then retry", int(pid.group(1)) if pid else None)
    if "permission" in text.lower() or "read-only" in text.lower():
        return WarehouseError(f"warehouse {path} is not writable ({text.splitlines()[0]}); "
                              "set INSTRUCTFLOW_HOME to a writable folder")
    return WarehouseError(f"cannot open warehouse {path}: {text.splitlines()[0]}")


@dataclass
class StageRun:
    stage_run_id: str
    run_id: str
    stage: str
    status: str
    input_hash: str | None
    inputs: dict
    output_hash: str | None
    metrics: dict
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    seconds: float | None


class Warehouse:
    def __init__(self, path: Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.RLock()  # Prefect runs tasks in threads; DuckDB connections are not thread-safe
        # a WAL left behind means the last writer died (SIGKILL) before its closing checkpoint
        replays_wal = not read_only and Path(f"{self.path}.wal").exists()
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only)
        except (duckdb.IOException, duckdb.Error) as exc:
            raise _friendly_open_error(self.path, exc) from None
        try:
            self._migrate()
            if replays_wal:
                # DuckDB 1.5.6 replays the WAL's rows into the unique indexes lazily, and a checkpoint
                # without a client context (the one at close) drops those buffered index entries: the
                # next DELETE of such a row is a FATAL "Failed to delete all rows from index" (duckdb
                # PRs #23848, #25771). A checkpoint from this connection binds the indexes first.
                self.con.execute("CHECKPOINT")
        except Exception:
            self.con.close()
            raise

    # --- schema -----------------------------------------------------------------------------
    def schema_version(self) -> int:
        exists = self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'").fetchone()[0]
        if not exists:
            return 0
        return self.con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]

    def _migrate(self) -> None:
        known = migrations()
        latest = known[-1][0] if known else 0
        current = self.schema_version()
        if current > latest:
            raise WarehouseError(f"warehouse {self.path} has schema version {current}, newer than this "
                                 f"instructflow supports ({latest}); upgrade instructflow or use another INSTRUCTFLOW_HOME")
        pending = [m for m in known if m[0] > current]
        if not pending:
            return
        if self.read_only:
            raise MigrationsPending(self.path, current, [f"{version:03d}_{name}" for version, name, _ in pending])
        for version, name, sql in pending:
            self.con.execute("BEGIN TRANSACTION")
            try:
                if version == 1 or current == 0:
                    self.con.execute("CREATE TABLE IF NOT EXISTS schema_version "
                                     "(version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
                self.con.execute(sql)
                self.con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [version, name, now()])
                self.con.execute("COMMIT")
            except Exception as exc:
                self.con.execute("ROLLBACK")
                raise WarehouseError(f"migration {version:03d}_{name} failed on {self.path}: {exc}") from None
            current = version

    def close(self) -> None:
        with self._lock:
            self.con.close()

    # --- generic helpers (parameterised only) -------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._lock:
            self.con.execute(sql, list(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [list(r) for r in rows]
        if rows:
            with self._lock:
                self.con.executemany(sql, rows)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        with self._lock:
            cursor = self.con.execute(sql, list(params))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._lock:
            row = self.con.execute(sql, list(params)).fetchone()
        return row[0] if row else None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All-or-nothing writes (seed loads, filter verdicts): a crash leaves the old rows intact."""
        with self._lock:
            self.con.execute("BEGIN TRANSACTION")
            try:
                yield
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")

    @contextmanager
    def bulk_write(self, memory_limit: str) -> Iterator[None]:
        """Settings for a bulk write of many commits (the preference import), set back afterwards:
        - DuckDB's buffer pool capped at `memory_limit` (e.g. "256MB"). Its default is 80% of the RAM, and
          it keeps every page it wrote cached up to that; under the cap pages spill to `<warehouse>.tmp/`.
        - no automatic checkpoint after each commit whose WAL passed 16 MB (they took 3/4 of the import's
          time, each rewriting what the earlier ones wrote): one CHECKPOINT once the write succeeded.
        Nothing here sets either elsewhere, so afterwards both return to DuckDB's defaults."""
        with self._lock:
            self.con.execute("SET memory_limit = ?", [memory_limit])
            self.con.execute("SET checkpoint_threshold = '1TB'")
            try:
                yield
                self.con.execute("CHECKPOINT")
            finally:
                self.con.execute("RESET checkpoint_threshold")
                self.con.execute("RESET memory_limit")

    def next_ids(self, n: int) -> list[int]:
        if n <= 0:
            return []
        with self._lock:
            return [r[0] for r in self.con.execute("SELECT nextval('id_seq') FROM range(?)", [n]).fetchall()]

    def table_counts(self) -> dict[str, int]:
        tables = [r["table_name"] for r in self.rows(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' ORDER BY 1")]
        # table names come from the catalogue, not from input: identifiers cannot be parameters
        return {t: self.scalar(f'SELECT count(*) FROM "{t}"') for t in tables}

    # --- runs and stage runs ----------------------------------------------------------------
    def start_run(self, profile: str, command: str, flow_run_id: str | None = None) -> str:
        run_id = uuid.uuid4().hex[:12]
        self.execute("INSERT INTO runs VALUES (?, ?, ?, 'running', ?, NULL, ?)",
                     [run_id, profile, command, now(), flow_run_id])
        return run_id

    def finish_run(self, run_id: str, status: str) -> None:
        self.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", [status, now(), run_id])

    def last_run(self) -> dict | None:
        found = self.rows("SELECT * FROM runs ORDER BY started_at DESC LIMIT 1")
        return found[0] if found else None

    def start_stage_run(self, run_id: str, stage: str, input_hash: str, inputs: dict) -> str:
        stage_run_id = uuid.uuid4().hex[:12]
        self.execute("INSERT INTO stage_runs (stage_run_id, run_id, stage, status, input_hash, inputs, "
                     "started_at) VALUES (?, ?, ?, 'running', ?, ?, ?)",
                     [stage_run_id, run_id, stage, input_hash, json.dumps(inputs), now()])
        return stage_run_id

    def finish_stage_run(self, stage_run_id: str, status: str, metrics: dict | None = None,
                         output_hash: str | None = None, error: str | None = None) -> None:
        finished = now()
        self.execute("UPDATE stage_runs SET status = ?, metrics = ?, output_hash = ?, error = ?, finished_at = ?, "
                     "seconds = date_diff('millisecond', started_at, ?::TIMESTAMP) / 1000.0 WHERE stage_run_id = ?",
                     [status, json.dumps(metrics or {}, default=str), output_hash, error, finished, finished,
                      stage_run_id])

    def mark_interrupted_stage_runs(self) -> int:
        """Stage runs left 'running' by a killed process become 'failed' (we hold the lock, so none is live)."""
        n = self.scalar("SELECT count(*) FROM stage_runs WHERE status = 'running'")
        if n:
            self.execute("UPDATE stage_runs SET status = 'failed', error = 'interrupted (process killed)' "
                         "WHERE status = 'running'")
            self.execute("UPDATE runs SET status = 'failed' WHERE status = 'running'")
        return n

    def _stage_run(self, row: dict) -> StageRun:
        return StageRun(stage_run_id=row["stage_run_id"], run_id=row["run_id"], stage=row["stage"],
                        status=row["status"], input_hash=row["input_hash"],
                        inputs=json.loads(row["inputs"] or "{}"), output_hash=row["output_hash"],
                        metrics=json.loads(row["metrics"] or "{}"), error=row["error"],
                        started_at=row["started_at"], finished_at=row["finished_at"], seconds=row["seconds"])

    def last_stage_run(self, stage: str, status: str | None = None) -> StageRun | None:
        sql = "SELECT * FROM stage_runs WHERE stage = ? AND status <> 'skipped'"
        params: list[Any] = [stage]
        if status:
            sql += " AND status = ?"
            params.append(status)
        found = self.rows(sql + " ORDER BY started_at DESC LIMIT 1", params)
        return self._stage_run(found[0]) if found else None

    def stage_run(self, stage_run_id: str) -> StageRun | None:
        found = self.rows("SELECT * FROM stage_runs WHERE stage_run_id = ?", [stage_run_id])
        return self._stage_run(found[0]) if found else None

    def record_skip(self, run_id: str, stage: str, input_hash: str) -> None:
        stage_run_id = uuid.uuid4().hex[:12]
        ts = now()
        self.execute("INSERT INTO stage_runs (stage_run_id, run_id, stage, status, input_hash, started_at, "
                     "finished_at, seconds) VALUES (?, ?, ?, 'skipped', ?, ?, ?, 0)",
                     [stage_run_id, run_id, stage, input_hash, ts, ts])

    def add_step_metrics(self, stage_run_id: str, stage: str, step: int, values: dict[str, float]) -> None:
        ts = now()
        self.executemany("INSERT INTO step_metrics VALUES (?, ?, ?, ?, ?, ?)",
                         [[stage_run_id, stage, int(step), k, float(v), ts] for k, v in values.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)])

    def step_series(self, stage_run_id: str, name: str) -> tuple[list[int], list[float]]:
        found = self.rows("SELECT step, value FROM step_metrics WHERE stage_run_id = ? AND name = ? ORDER BY step",
                          [stage_run_id, name])
        return [r["step"] for r in found], [r["value"] for r in found]

    # --- checkpoints --------------------------------------------------------------------------
    def register_checkpoint(self, stage_run_id: str, kind: str, path: str, base: str | None,
                            dataset_hash: str | None, config: dict, metrics: dict) -> int:
        checkpoint_id = self.next_ids(1)[0]
        self.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [checkpoint_id, stage_run_id, kind, str(path), base, dataset_hash,
                      json.dumps(config, default=str), json.dumps(metrics, default=str), now()])
        return checkpoint_id

    def latest_checkpoint(self, kind: str) -> dict | None:
        found = self.rows("SELECT * FROM checkpoints WHERE kind = ? ORDER BY created_at DESC, checkpoint_id DESC "
                          "LIMIT 1", [kind])
        return found[0] if found else None


def open_warehouse(home: Path, read_only: bool = False) -> Warehouse:
    home = Path(home)
    if read_only and not (home / WAREHOUSE_FILE).exists():
        raise WarehouseError(f"no warehouse at {home / WAREHOUSE_FILE} yet")
    return Warehouse(home / WAREHOUSE_FILE, read_only=read_only)

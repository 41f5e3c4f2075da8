"""What every stage flow shares: the data home, the open warehouse, `StageSpec` (what a stage declares
it reads), and `stage_context`, which records a stage run (input hash, status, metrics, timings)
around the stage's own story and publishes its Prefect artifacts. Flows hold no business logic; this
holds no stage logic, and imports no stage (the registry, flows/stages.py, imports the stages)."""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from instructflow.tasks.config import SAVE_TOTAL_LIMIT, Config, stable_hash
from instructflow.tasks.exhaustion import (DISK, ResourceExhausted, disk_need, exhausted, exhaustion_line,
                                           free_partial_saves)
from instructflow.tasks.library_output import quiet_progress_bars
from instructflow.tasks.secrets import redact, redact_exception, redact_log_handlers
from instructflow.warehouse import queries
from instructflow.warehouse.store import WAREHOUSE_FILE, Warehouse, WarehouseError, WarehouseLocked, open_warehouse


def data_home(explicit: str | Path | None = None) -> Path:
    """The project's data home: --home, $INSTRUCTFLOW_HOME, or ./.instructflow; created and checked writable."""
    home = Path(explicit or os.environ.get("INSTRUCTFLOW_HOME") or ".instructflow").expanduser().resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise WarehouseError(f"data home {home} is not writable ({exc.strerror}); "
                             "set INSTRUCTFLOW_HOME or --home to a writable folder") from None
    return home


class BestEffortFileHandler(logging.FileHandler):
    """HOME/logs/console.log: a record it cannot write (a full disk) is dropped, not reported on stderr,
    where it would bury the command's one-line error."""

    def handleError(self, record) -> None:
        pass


def quiet_console(home: Path, verbose: bool = False) -> Path:
    """Library output (Python warnings, Prefect's and transformers' log records, Prefect's tracebacks
    of a failed task) goes to HOME/logs/console.log, and the libraries draw no progress bars of their
    own; the console keeps our progress lines, result tables and the one-line error. With verbose,
    the console shows it all as well."""
    import transformers.utils.logging as transformers_logging
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect adds its console handler lazily; have it now, to take it out

    path = home / "logs" / "console.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = BestEffortFileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if not verbose:
        for handler in list(root.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
        transformers_logging.disable_default_handler()  # it writes to stderr and does not propagate
        transformers_logging.enable_propagation()
        quiet_progress_bars()
    root.addHandler(to_file)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the handlers above
    redact_log_handlers()  # every handler, Prefect's API log handler included: no secret is written or shipped
    return path


_warehouses: dict[Path, Warehouse] = {}

# How long a run waits for the run holding its home (DuckDB's lock) before it fails; 0: fail at once.
LOCK_WAIT_ENV = "INSTRUCTFLOW_LOCK_WAIT_S"
DEFAULT_LOCK_WAIT_S = 24 * 3600.0
LOCK_POLL_S = 0.5
LOCK_REMIND_S = 60.0


def lock_wait_s() -> float:
    raw = os.environ.get(LOCK_WAIT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_LOCK_WAIT_S
    except ValueError:
        raise WarehouseError(f"{LOCK_WAIT_ENV}={raw!r}: expected seconds (0: do not wait)") from None
    if value < 0:
        raise WarehouseError(f"{LOCK_WAIT_ENV}={raw!r}: expected seconds >= 0 (0: do not wait)")
    return value


def _say_waiting(line: str) -> None:
    """In a flow run: the run's log (the UI and the worker's output); elsewhere: the `instructflow` logger."""
    import logging

    try:
        from prefect import get_run_logger
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is not None:
            get_run_logger().warning(line)
            return
    except Exception:
        pass
    logging.getLogger("instructflow").warning(line)


def wait_for_warehouse(home: Path, wait_s: float, say: Callable[[str], None] = _say_waiting) -> Warehouse:
    """Open the home's warehouse for writing; while another process holds DuckDB's lock on it, wait
    (up to wait_s) instead of failing, saying which process it waits for (again when that changes,
    and once a minute). One writer per home, whatever started it: a worker, `serve`, or the CLI."""
    start = time.monotonic()
    said_pid, said_at = object(), 0.0
    while True:
        try:
            return open_warehouse(home)
        except WarehouseLocked as exc:
            waited = time.monotonic() - start
            if waited >= wait_s:
                if wait_s <= 0:
                    raise
                holder = f"process {exc.pid}" if exc.pid is not None else "another process"
                raise WarehouseError(f"warehouse {home / WAREHOUSE_FILE} is still in use by {holder} after {waited:.0f} s "
                                     f"of waiting ({LOCK_WAIT_ENV}={wait_s:g}); wait for that run or stop it, then "
                                     "retry") from None
            holder = f"pid {exc.pid}" if exc.pid is not None else "pid unknown"
            if exc.pid != said_pid:
                say(f"waiting for the run holding {home} ({holder})")
                said_pid, said_at = exc.pid, time.monotonic()
            elif time.monotonic() - said_at >= LOCK_REMIND_S:
                say(f"still waiting for the run holding {home} ({holder}), {waited:.0f} s so far")
                said_at = time.monotonic()
            time.sleep(min(LOCK_POLL_S, max(0.0, wait_s - waited)))


def warehouse_for(home: Path, say: Callable[[str], None] | None = None) -> Warehouse:
    """One writing connection per process and home: it holds DuckDB's lock for the whole run. A
    second process opening the same home waits for the first (`wait_for_warehouse`)."""
    home = Path(home)
    if home not in _warehouses:
        if not _warehouses:
            atexit.register(close_warehouses)  # a clean close at exit: no WAL replay, no binding noise
        wh = wait_for_warehouse(home, lock_wait_s(), say or _say_waiting)
        wh.mark_interrupted_stage_runs()
        queries.discard_unfinished_imports(wh)  # a killed preference import's pairs go before anything reads them
        _warehouses[home] = wh
    return _warehouses[home]


def check_warehouse(home: Path) -> None:
    """What opening the home would refuse (a newer schema, an unwritable file), without holding it;
    a warehouse in use is no error here (runs wait for it)."""
    try:
        open_warehouse(home).close()
    except WarehouseLocked:
        pass


def holds_warehouse(home: Path) -> bool:
    return Path(home) in _warehouses


def release_warehouse(home: Path) -> None:
    """Close this process's connection to the home (the lock is free for the next run at once)."""
    wh = _warehouses.pop(Path(home), None)
    if wh is not None:
        try:
            wh.close()
        except Exception:  # a connection a full disk invalidated: the lock goes with the process
            pass
        (Path(home) / STATUS_SNAPSHOT).unlink(missing_ok=True)  # the lock is free: `status` reads the warehouse again


def close_warehouses() -> None:
    for home in list(_warehouses):
        release_warehouse(home)


STATUS_SNAPSHOT = "status-snapshot.json"
INTERRUPTED = "interrupted"  # a stage run that did not end on its own: its recorded error starts so, status shows it so


def seed_paths(cfg: Config) -> list[Path]:
    """The configured seed files/dirs; `bundled` is the package's seed file (not its seeds/ folder,
    which also ships the preference sample)."""
    from instructflow.tasks.seeds import shipped_path

    return [shipped_path(entry, "seed_tasks.jsonl") for entry in cfg.seeds]


def cache_dir() -> Path:
    """Converted models and tiny test models, shared across data homes (they never change)."""
    path = Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class StageSpec:
    """What a stage declares: everything its output depends on feeds its input hash, so `run` skips it
    only when none of that changed and `status` says which part did."""
    name: str
    flow: Callable                       # the Prefect flow: flow(cfg, home, run_id=None, force=False) -> metrics
    config_sections: tuple[str, ...]     # config it reads: whole sections ("reward") or single keys ("ppo.seed")
    upstream: tuple[str, ...] = ()       # stages whose outputs it consumes (their output hashes feed its input hash)
    data_inputs: Callable[[Config, Warehouse], dict] | None = None   # warehouse/file fingerprints it consumes
    outputs_exist: Callable[[Config, Warehouse], bool] | None = None  # a fresh stage whose outputs vanished reruns
    enabled: Callable[[Config], bool] | None = None  # None: always; an alignment method: when the profile runs it
    summary: str = ""                    # one line under the stage's heading in the report
    headline: tuple[str, ...] = ()       # the metrics `run` prints for it (all of them: `status --json`)


def checkpoint_exists(kind: str) -> Callable[[Config, Warehouse], bool]:
    """`outputs_exist` of a training stage: its newest registered checkpoint of `kind` is still on disk."""
    def exists(cfg: Config, wh: Warehouse) -> bool:
        last = wh.latest_checkpoint(kind)
        return last is not None and (Path(last["path"]) / "config.json").exists()
    return exists


@dataclass
class StageContext:
    stage: str
    cfg: Config
    home: Path
    wh: Warehouse
    run_id: str
    stage_run_id: str
    force: bool
    inputs: dict
    metrics: dict = field(default_factory=dict)
    output_hash: str | None = None
    base_model: Path | None = None  # a training stage's starting model: sizes the disk a run needs, if it runs out

    @property
    def out_dir(self) -> Path:
        path = self.home / "stages" / self.stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run_dir(self, *identity: Any) -> Path:
        """The stage's folder for one job (same inputs -> same folder, so a killed run resumes in it);
        emptied first when the stage is forced."""
        path = self.out_dir / f"run-{stable_hash([*identity, self.inputs['config']])}"
        if self.force and path.exists():
            shutil.rmtree(path)
        return path

    def step(self, step: int, values: dict[str, float]) -> None:
        self.wh.add_step_metrics(self.stage_run_id, self.stage, step, values)

    def finish(self, metrics: dict, output_hash: str | None = None) -> None:
        self.metrics = metrics
        self.output_hash = output_hash


def stage_inputs(spec: StageSpec, cfg: Config, wh: Warehouse) -> dict:
    """The components of a stage's input hash: its config, its external data, its upstream outputs."""
    inputs: dict[str, Any] = {"config": cfg.section_hash(*spec.config_sections)}
    inputs.update(spec.data_inputs(cfg, wh) if spec.data_inputs else {})
    for upstream in spec.upstream:
        last = wh.last_stage_run(upstream, status="success")
        inputs[f"upstream:{upstream}"] = last.output_hash if last else None
    return inputs


def input_hash(inputs: dict) -> str:
    return stable_hash(inputs)


def freshness(spec: StageSpec, cfg: Config, wh: Warehouse):
    """(fresh, last successful StageRun or None, current inputs). Fresh: same input hash as the
    last success and its outputs still exist."""
    inputs = stage_inputs(spec, cfg, wh)
    last = wh.last_stage_run(spec.name, status="success")
    fresh = (last is not None and last.input_hash == input_hash(inputs)
             and (spec.outputs_exist is None or spec.outputs_exist(cfg, wh)))
    return fresh, last, inputs


@contextmanager
def stage_context(spec: StageSpec, cfg: Config, home: str | Path, run_id: str | None,
                  force: bool) -> Iterator[StageContext]:
    home_path = data_home(home)
    wh = warehouse_for(home_path)
    own_run = run_id is None
    if own_run:
        run_id = wh.start_run(cfg.profile, f"stage {spec.name}", flow_run_id=flow_run_id())
    inputs = stage_inputs(spec, cfg, wh)
    stage_run_id = wh.start_stage_run(run_id, spec.name, input_hash(inputs), inputs)
    ctx = StageContext(stage=spec.name, cfg=cfg, home=home_path, wh=wh, run_id=run_id, stage_run_id=stage_run_id,
                       force=force, inputs=inputs)
    try:
        yield ctx
    except BaseException as exc:
        redact_exception(exc)  # Prefect's state message and log of this exception come after us
        kind = exhausted(exc, home_path / "stages" / spec.name) if isinstance(exc, Exception) else None
        # a full disk: what the failed save left is useless (a rerun deletes it too); it is the room we need
        freed = free_partial_saves(home_path / "stages" / spec.name) if kind == DISK else 0
        log = home_path / "logs" / f"{spec.name}-{stage_run_id}.txt"
        if isinstance(exc, Exception):  # not Ctrl-C, a signal or an exit: those have no traceback to keep
            trace = redact(traceback.format_exc())
            if not _best_effort(lambda: (log.parent.mkdir(exist_ok=True), log.write_text(trace))):
                _best_effort(lambda: log.unlink(missing_ok=True))
                log = None  # still no room: Prefect's copy may reach console.log
        if kind:
            message = _exhaustion_message(kind, ctx, log, freed)
        elif interruption(exc):
            message = f"{INTERRUPTED} ({interruption(exc)})"
        else:
            message = redact(f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
        _best_effort(lambda: wh.finish_stage_run(stage_run_id, "failed", ctx.metrics, None, message[:1000]))
        if own_run:
            _best_effort(lambda: wh.finish_run(run_id, "failed"))
        if kind:
            raise ResourceExhausted(message) from exc
        raise
    # Inputs are re-read at the end: a stage that changes its own inputs (generate adds candidates
    # the filter hashes) must be recorded against what it finally consumed.
    final_inputs = stage_inputs(spec, cfg, wh)
    queries.record_final_inputs(wh, stage_run_id, input_hash(final_inputs), final_inputs)
    wh.finish_stage_run(stage_run_id, "success", ctx.metrics, ctx.output_hash or stable_hash(ctx.metrics))
    if own_run:
        wh.finish_run(run_id, "success")


def recipe_task(name: str, recipe: str):
    """A training stage's Prefect task: the `recipe` ("sft", "reward", "ppo", "dpo", "grpo": models/RECIPE.py
    `train_RECIPE`) called with the flow's arguments through models/launch.py `run_recipe`, in this process or
    under `accelerate launch`, as the section's `launcher` says; imported when the task runs, so torch loads
    only when a stage trains."""
    from prefect import task
    from prefect.cache_policies import NONE

    @task(name=name, cache_policy=NONE)
    def run(*args: Any, **kwargs: Any) -> dict:
        from instructflow.models.launch import run_recipe

        return run_recipe(recipe, *args, **kwargs)

    return run


def interruption(exc: BaseException) -> str | None:
    """What stopped a stage from outside: "Ctrl-C", "SIGTERM", "SIGHUP"; None for a failure of its own.
    SIGTERM arrives as Prefect's TerminationSignal inside a flow run (Prefect's handler, which hands the
    signal back to ours, flows/server.py `Terminated`, once the flow has unwound) and as Terminated outside."""
    number = getattr(exc, "signum", None) or getattr(exc, "signal", None)
    if isinstance(exc, (Exception, SystemExit)):
        return None
    if isinstance(number, int):
        try:
            return signal.Signals(number).name
        except ValueError:
            return f"signal {number}"
    return "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__


def _best_effort(write: Callable[[], Any]) -> bool:
    """A record of a failure that must not replace the failure (a full disk fails the record too)."""
    try:
        write()
        return True
    except Exception:
        return False


def _exhaustion_message(kind: str, ctx: StageContext, log: Path | None, freed: int) -> str:
    """The one line for a stage that ran out of disk or memory: where, how much is free, what it needs."""
    section = getattr(ctx.cfg, ctx.stage, None)
    knobs = tuple(f"{ctx.stage}.{key}" for key in ("batch_size", "max_length") if hasattr(section, key))
    stage_dir = ctx.home / "stages" / ctx.stage
    need = disk_need(stage_dir, ctx.base_model, SAVE_TOTAL_LIMIT) if ctx.base_model is not None else None
    return exhaustion_line(kind, ctx.stage, stage_dir if stage_dir.exists() else ctx.home, need=need, knobs=knobs,
                           log=log, freed=freed)


def flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run
        return flow_run.id
    except Exception:
        return None


# --- Prefect artifacts: every stage's latest summary, samples and plots, keyed per stage ----------
def publish_artifacts(ctx: StageContext, title: str, summary: dict[str, Any], samples: list[dict] | None = None,
                      plots: dict[str, Path] | None = None, notes: str = "") -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from instructflow.tasks.plots import png_data_uri

    lines = [f"# {title}", "", f"profile `{ctx.cfg.profile}` · run `{ctx.run_id}` · stage run `{ctx.stage_run_id}`", "",
             "| metric | value |", "|---|---|"]
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, (dict, list)) else value
        lines.append(f"| {key} | {shown} |")
    if notes:
        lines += ["", notes]
    lines = [redact(line) for line in lines]  # the text: plots are images
    for name, path in (plots or {}).items():
        if path and Path(path).exists():
            lines += ["", f"## {name}", "", f"![{name}]({png_data_uri(Path(path))})"]
    key = ctx.stage.replace("_", "-")
    markdown = "\n".join(lines)
    (ctx.out_dir / "summary.md").write_text(markdown)
    if not _in_prefect_run():
        return
    create_markdown_artifact(markdown=markdown, key=f"{key}-summary", description=f"{ctx.stage}: latest summary")
    if samples:
        clean = [{k: (redact(v) if isinstance(v, str) else v if isinstance(v, (int, float, bool)) or v is None
                      else redact(str(v))) for k, v in row.items()} for row in samples[:200]]
        create_table_artifact(table=clean, key=f"{key}-samples", description=f"{ctx.stage}: samples")


def _in_prefect_run() -> bool:
    try:
        from prefect.context import FlowRunContext
        return FlowRunContext.get() is not None
    except Exception:
        return False


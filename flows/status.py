"""`instructflow status`: what each stage last produced and whether it is stale, and why; and the
snapshot of it a running command publishes while it holds the warehouse."""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from instructflow.flows.common import STATUS_SNAPSHOT, data_home, freshness, input_hash, warehouse_for
from instructflow.flows.report import last_attempt, write_report
from instructflow.flows.stages import stages
from instructflow.tasks.config import Config, ConfigError, list_profiles, load_config
from instructflow.tasks.exhaustion import tree_bytes
from instructflow.tasks.secrets import redact
from instructflow.warehouse.store import WAREHOUSE_FILE, MigrationsPending, Warehouse, WarehouseError, open_warehouse


def _why(recorded: dict, current: dict) -> list[str]:
    names = {"config": "config changed"}
    reasons = []
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            if key.startswith("upstream:"):
                reasons.append(f"{key.split(':', 1)[1]} produced new output")
            else:
                reasons.append(names.get(key, f"{key} changed"))
    return reasons or ["inputs changed"]


def stage_status(cfg: Config, home: Path, wh: Warehouse | None, writer_alive: bool = False) -> dict:
    """Each stage's state: never | fresh | stale | failed | interrupted | off, and its folder's bytes on disk
    (`disk_bytes`, beside the whole home's at the top). `writer_alive`: called by
    the process that holds the warehouse (its running stage is live, not interrupted); any other
    reader could open the warehouse, so no process holds it, and a stage run still 'running' was
    interrupted: its process is gone (SIGKILL, a crash, a power cut)."""
    report: dict = {"home": str(home), "profile": cfg.profile, "stages": {}, "disk_bytes": tree_bytes(home)}
    dead = None if writer_alive else dead_run_snapshot(home)
    for spec in stages():
        entry = {"state": "never", "last_run": None, "input_hash": None, "metrics": {}, "why": [],
                 "disk_bytes": tree_bytes(home / "stages" / spec.name)}
        if wh is not None:
            last_ok = wh.last_stage_run(spec.name, status="success")
            if last_ok is not None:
                fresh, _, current = freshness(spec, cfg, wh)
                same_inputs = last_ok.input_hash == input_hash(current)
                entry.update(state="fresh" if fresh else "stale",
                             last_run=last_ok.finished_at.isoformat() + "Z" if last_ok.finished_at else None,
                             input_hash=last_ok.input_hash, metrics=last_ok.metrics,
                             why=[] if fresh else (_why(last_ok.inputs, current) if not same_inputs
                                                   else ["outputs missing"]))
            attempt = last_attempt(wh, spec.name, writer_alive)
            if attempt is not None:
                state, run = attempt
                why = [run.error or "failed"]
                if state == "interrupted":
                    why = [_interrupted_why(spec.name, run, dead)]
                entry.update(state=state, last_run=run.started_at.isoformat() + "Z", why=why)
                if last_ok is None:
                    entry["input_hash"] = run.input_hash
        # a stage after a stale, failed or never-run stage will rerun too: say so
        behind = [(u, report["stages"][u]["state"]) for u in spec.upstream if u in report["stages"]]
        behind = [(u, state) for u, state in behind if state not in ("fresh", "off")]
        if entry["state"] == "fresh" and behind:
            entry.update(state="stale", why=[f"upstream {u} is {state}" for u, state in behind])
        if spec.enabled is not None and not spec.enabled(cfg):
            entry.update(state="off", why=[f"not in this profile's methods ({', '.join(cfg.methods) or 'none'})"])
        report["stages"][spec.name] = entry
    return report


def _interrupted_why(stage: str, run, dead: dict | None) -> str:
    if run.status != "running":  # recorded by the run itself (Ctrl-C, SIGTERM) or by the next writer (SIGKILL)
        return f"{run.error}: rerun the same command to resume"
    who = "the process running it"
    if dead is not None and dead.get("stage") == stage:
        who = f"process {dead['pid']} (running it as of {dead.get('as_of')})"
    return f"interrupted: {who} is gone (killed?) before the stage ended; rerun the same command to resume"


def dead_run_snapshot(home: Path) -> dict | None:
    """The status snapshot a run left behind when it died without closing the warehouse (its pid is gone)."""
    try:
        snapshot = json.loads((home / STATUS_SNAPSHOT).read_text())
        pid = int(snapshot["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return snapshot
    except OSError:
        pass  # alive, under another user
    return None


def publish_status(cfg: Config, home: Path, live_stage: str | None) -> None:
    """While this process holds the warehouse lock nobody else can open it, so it publishes what
    `status` would say (atomically, at each stage start and end) and, after a stage, the report."""
    wh = warehouse_for(home)
    try:
        snapshot = {"running": True, "stage": live_stage, "pid": os.getpid(),
                    "as_of": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **stage_status(cfg, home, wh, writer_alive=True)}
        partial = home / f"{STATUS_SNAPSHOT}.{os.getpid()}"
        try:
            partial.write_text(redact(json.dumps(snapshot, default=str)))
        except OSError:
            partial.unlink(missing_ok=True)  # a full disk: no half-written file left behind
            raise
        os.replace(partial, home / STATUS_SNAPSHOT)
        if live_stage is None:
            write_report(wh, home, home / "report.html")
    except Exception:  # a side channel for readers: it never fails the run
        logging.getLogger(__name__).warning("could not publish the status snapshot", exc_info=True)


def running_snapshot(home: Path) -> dict | None:
    """What the run holding this home's warehouse published (`publish_status`), if it is still alive."""
    try:
        snapshot = json.loads((home / STATUS_SNAPSHOT).read_text())
        os.kill(int(snapshot["pid"]), 0)  # a SIGKILLed run leaves its snapshot behind
    except PermissionError:
        return snapshot  # alive, under another user
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return snapshot


def warehouse_exists(home: Path) -> bool:
    return (home / WAREHOUSE_FILE).exists()


def config_for_reading(profile: str | None, config: str | None, wh: Warehouse | None) -> tuple[Config, str]:
    """(config, where its profile came from) for commands that read a home: --profile, then
    $INSTRUCTFLOW_PROFILE, then the profile of the home's last run (what its stages were built
    with), then the config file's default (also when the last run's profile is no longer defined)."""
    if profile:
        return load_config(profile, config), "option"
    if os.environ.get("INSTRUCTFLOW_PROFILE"):
        return load_config(None, config), "env"
    last = wh.last_run() if wh is not None else None
    if last is not None and last["profile"] in list_profiles(config):
        return load_config(last["profile"], config), "last_run"
    return load_config(None, config), "default"


def read_status(home: str | Path | None, profile: str | None, config: str | None) -> dict:
    """What `instructflow status` says, whatever state the home and the config are in: the stages
    (from a live run's snapshot, or read from the warehouse, read-only), or one line under "error"
    (a bad config or seed file, a corrupt warehouse, one an older instructflow wrote that needs
    migrations, a warehouse another process holds without having published a snapshot)."""
    try:
        home_path = data_home(home)
    except WarehouseError as exc:
        return {"running": False, "home": str(home or os.environ.get("INSTRUCTFLOW_HOME") or ".instructflow"),
                "error": str(exc)}
    live = running_snapshot(home_path)  # a run holds the warehouse's lock: what it published
    if live:
        return {**live, "profile_source": "running"}
    wh = None
    try:
        wh = open_warehouse(home_path, read_only=True) if warehouse_exists(home_path) else None
        cfg, profile_source = config_for_reading(profile, config, wh)
        report = {"running": False, **stage_status(cfg, home_path, wh)}
        if wh is not None:
            from instructflow.warehouse.queries import open_batches

            report["open_batches"] = [b["batch_id"] or b["input_file_id"] for b in open_batches(wh)]
        report["profile_source"] = profile_source
        return report
    except MigrationsPending as exc:
        return {"running": False, "home": str(home_path), "error": str(exc), "schema_version": exc.version,
                "pending_migrations": exc.pending}
    except WarehouseError as exc:
        if "DuckDB lock" in str(exc):  # held, nothing published yet
            return {"running": True, "stage": None, "home": str(home_path), "error": str(exc)}
        return {"running": False, "home": str(home_path), "error": str(exc)}
    except (ConfigError, ValueError, OSError) as exc:  # the config, a seed or preference file it names
        return {"running": False, "home": str(home_path), "error": _one_line(exc)}
    except Exception as exc:  # e.g. a warehouse file that opens but whose tables do not read
        return {"running": False, "home": str(home_path),
                "error": f"cannot read the state of {home_path}: {type(exc).__name__}: {_one_line(exc)}"}
    finally:
        if wh is not None:
            wh.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__)

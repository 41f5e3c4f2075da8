"""`instructflow status`: what each stage last produced and whether it is stale, and why; and the
snapshot of it a running command publishes while it holds the warehouse."""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from instructflow.flows.common import STATUS_SNAPSHOT, freshness, input_hash, warehouse_for
from instructflow.flows.report import write_report
from instructflow.flows.stages import stages
from instructflow.tasks.config import Config
from instructflow.warehouse.store import WAREHOUSE_FILE, Warehouse


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


def stage_status(cfg: Config, home: Path, wh: Warehouse | None) -> dict:
    report: dict = {"home": str(home), "profile": cfg.profile, "stages": {}}
    for spec in stages():
        entry = {"state": "never", "last_run": None, "input_hash": None, "metrics": {}, "why": []}
        if wh is not None:
            last_any = wh.last_stage_run(spec.name)
            last_ok = wh.last_stage_run(spec.name, status="success")
            if last_ok is not None:
                fresh, _, current = freshness(spec, cfg, wh)
                same_inputs = last_ok.input_hash == input_hash(current)
                entry.update(state="fresh" if fresh else "stale",
                             last_run=last_ok.finished_at.isoformat() + "Z" if last_ok.finished_at else None,
                             input_hash=last_ok.input_hash, metrics=last_ok.metrics,
                             why=[] if fresh else (_why(last_ok.inputs, current) if not same_inputs
                                                   else ["outputs missing"]))
            if last_any is not None and last_any.status == "failed" and (
                    last_ok is None or last_any.started_at > last_ok.started_at):
                entry.update(state="failed", last_run=last_any.started_at.isoformat() + "Z",
                             why=[last_any.error or "failed"])
                if last_ok is None:
                    entry["input_hash"] = last_any.input_hash
        # a stage after a stale, failed or never-run stage will rerun too: say so
        behind = [(u, report["stages"][u]["state"]) for u in spec.upstream if u in report["stages"]]
        behind = [(u, state) for u, state in behind if state not in ("fresh", "off")]
        if entry["state"] == "fresh" and behind:
            entry.update(state="stale", why=[f"upstream {u} is {state}" for u, state in behind])
        if spec.enabled is not None and not spec.enabled(cfg):
            entry.update(state="off", why=[f"not in this profile's methods ({', '.join(cfg.methods) or 'none'})"])
        report["stages"][spec.name] = entry
    return report


def publish_status(cfg: Config, home: Path, live_stage: str | None) -> None:
    """While this process holds the warehouse lock nobody else can open it, so it publishes what
    `status` would say (atomically, at each stage start and end) and, after a stage, the report."""
    wh = warehouse_for(home)
    try:
        snapshot = {"running": True, "stage": live_stage, "pid": os.getpid(),
                    "as_of": datetime.now(timezone.utc).isoformat(timespec="seconds"), **stage_status(cfg, home, wh)}
        partial = home / f"{STATUS_SNAPSHOT}.{os.getpid()}"
        partial.write_text(json.dumps(snapshot, default=str))
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

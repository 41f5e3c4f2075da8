"""`instructflow report`: one self-contained HTML file (plots inlined) of every stage's latest result."""
from __future__ import annotations

import html
import json
from pathlib import Path

from instructflow.flows.common import INTERRUPTED
from instructflow.flows.stages import stages
from instructflow.tasks.plots import png_data_uri
from instructflow.tasks.secrets import redact
from instructflow.warehouse import queries
from instructflow.warehouse.store import StageRun, Warehouse


def last_attempt(wh: Warehouse, stage: str, writer_alive: bool = False) -> tuple[str, StageRun] | None:
    """("failed" | "interrupted", the run) when the stage's newest run, newer than its last success,
    did not succeed. Interrupted: stopped by Ctrl-C or SIGTERM (recorded so by the run), or killed
    (left 'running': a reader can open the warehouse only when no process holds it, so unless
    `writer_alive`, the process running it is gone; the next writer records it failed, "interrupted
    (process killed)")."""
    last_any = wh.last_stage_run(stage)
    if last_any is None or last_any.status not in ("failed", "running"):
        return None
    last_ok = wh.last_stage_run(stage, status="success")
    if last_ok is not None and last_any.started_at <= last_ok.started_at:
        return None
    if last_any.status == "running":
        return None if writer_alive else (INTERRUPTED, last_any)
    return (INTERRUPTED if (last_any.error or "").startswith(INTERRUPTED) else "failed"), last_any

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}
h2{border-bottom:2px solid #4c72b0;padding-bottom:4px}img{max-width:100%;border:1px solid #eee}
.muted{color:#777}.failed{color:#b00}.interrupted{color:#a0a}"""


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return html.escape(redact(json.dumps(value)))
    return html.escape(redact(str(value)))


def write_report(wh: Warehouse, home: Path, out: Path) -> Path:
    runs = {r["stage"]: r for r in queries.last_successful_stage_runs(wh)}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>instructflow report</title>"
             f"<style>{CSS}</style></head><body><h1>instructflow report</h1>"
             f"<p class='muted'>data home {_value(str(home))}</p>"]
    for spec in stages():
        stage = spec.name
        parts.append(f"<h2>{stage}</h2><p>{html.escape(spec.summary)}</p>")
        attempt = last_attempt(wh, stage)
        if attempt is not None:
            state, failed = attempt
            said = (failed.error or "failed") if failed.status != "running" else "the process running it is gone (killed?)"
            resume = "; rerun the same command to resume" if state == INTERRUPTED else ""
            parts.append(f"<p class='{state}'><b>{state}</b> · last run started {failed.started_at}: "
                         f"{_value(said)}{resume}</p>")
        run = runs.get(stage)
        if run is None:
            parts.append("<p class='muted'>never run</p>")
            continue
        metrics = json.loads(run["metrics"] or "{}")
        parts.append(f"<p class='muted'>finished {run['finished_at']} · {run['seconds']:.1f} s · "
                     f"input hash {run['input_hash']}</p><table>")
        parts += [f"<tr><th>{_value(k)}</th><td>{_value(v)}</td></tr>" for k, v in metrics.items()]
        parts.append("</table>")
        latest: dict[str, Path] = {}  # one plot per name: the newest run's
        for png in sorted((home / "stages" / stage).glob("**/*.png"), key=lambda p: p.stat().st_mtime):
            latest[png.stem] = png
        for png in latest.values():
            parts.append(f"<h4>{html.escape(png.stem)}</h4><img src='{png_data_uri(png)}'>")
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")  # every value from the warehouse went through redact
    return out

"""`instructflow report`: one self-contained HTML file (plots inlined) of every stage's latest result."""
from __future__ import annotations

import html
import json
from pathlib import Path

from instructflow.flows.stages import stages
from instructflow.tasks.plots import png_data_uri
from instructflow.warehouse import queries
from instructflow.warehouse.store import Warehouse

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}
h2{border-bottom:2px solid #4c72b0;padding-bottom:4px}img{max-width:100%;border:1px solid #eee}
.muted{color:#777}"""


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def write_report(wh: Warehouse, home: Path, out: Path) -> Path:
    runs = {r["stage"]: r for r in queries.last_successful_stage_runs(wh)}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>instructflow report</title>"
             f"<style>{CSS}</style></head><body><h1>instructflow report</h1>"
             f"<p class='muted'>data home {html.escape(str(home))}</p>"]
    for spec in stages():
        stage = spec.name
        parts.append(f"<h2>{stage}</h2><p>{html.escape(spec.summary)}</p>")
        run = runs.get(stage)
        if run is None:
            parts.append("<p class='muted'>never run</p>")
            continue
        metrics = json.loads(run["metrics"] or "{}")
        parts.append(f"<p class='muted'>finished {run['finished_at']} · {run['seconds']:.1f} s · "
                     f"input hash {run['input_hash']}</p><table>")
        parts += [f"<tr><th>{html.escape(k)}</th><td>{_value(v)}</td></tr>" for k, v in metrics.items()]
        parts.append("</table>")
        latest: dict[str, Path] = {}  # one plot per name: the newest run's
        for png in sorted((home / "stages" / stage).glob("**/*.png"), key=lambda p: p.stat().st_mtime):
            latest[png.stem] = png
        for png in latest.values():
            parts.append(f"<h4>{html.escape(png.stem)}</h4><img src='{png_data_uri(png)}'>")
    parts.append("</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out

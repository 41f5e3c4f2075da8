"""`instructflow export`: the SFT set in the formats the field shares (pure formatting; the rows come
from warehouse.queries.export_rows)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from instructflow.tasks.sft_data import alpaca_prompt


def write_alpaca(rows: Sequence[dict], out: Path) -> None:
    """Alpaca JSON: a list of {"instruction", "input", "output"}."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(rows), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_prompt_completion_jsonl(rows: Sequence[dict], out: Path) -> None:
    """One {"prompt", "completion"} line per example, the prompt in the Alpaca format (TRL's prompt-completion form)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"prompt": alpaca_prompt(row["instruction"], row["input"]),
                                     "completion": row["output"]}, ensure_ascii=False) + "\n")

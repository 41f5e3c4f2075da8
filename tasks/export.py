"""`instructflow export`: the SFT set and the preference pairs in the formats the field shares (Alpaca JSON,
prompt/completion JSONL, a Hugging Face dataset folder in parquet with its card), and a trained model as a
standalone Hugging Face folder with its card. Pure formatting and copying: the rows come from
warehouse.queries, the facts a card states from flows/export.py."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
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


# ---------------------------------------------------------------------------------------------------
# `export hf`: a local Hugging Face dataset folder (parquet + dataset card)

SFT_COLUMNS = ("instruction", "input", "output")
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "source")
LICENSE_LINE = ("**License: not set.** The card says `license: other`: set the license your seed files, teacher "
                "model and its terms allow before sharing this.")


class ExportError(ValueError):
    """What an export refuses, in one line (no checkpoint, no rows, an occupied --out)."""


def ready_out_dir(out: Path) -> Path:
    """`out` as a new or empty folder: an export never mixes its files with someone else's."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out} is not empty: give a new folder (or empty this one)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def size_category(n: int) -> str:
    """The Hub's `size_categories` value for n rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < limit:
            return name
    return "100M<n<1B"


def write_parquet(rows: Sequence[dict], columns: Sequence[str], path: Path) -> Path:
    """`rows` (each a dict of string `columns`) as one parquet file, every column a string."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(c, pa.string()) for c in columns])
    pq.write_table(pa.Table.from_pylist([{c: row[c] for c in columns} for row in rows], schema=schema), path)
    return path


def _yaml(value) -> str:
    """A YAML scalar: plain when it is a simple word (`other`, `text-generation`, `n<1K`), else a JSON string,
    which is valid YAML and needs no escaping rules of its own."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.<-]*", value) and \
            value.lower() not in ("true", "false", "null", "yes", "no", "on", "off", "y", "n"):
        return value
    return json.dumps(value, ensure_ascii=False)


def card_front_matter(fields: Sequence[tuple[str, object]]) -> list[str]:
    """The card's `---` YAML block: scalars, and lists of scalars or of one-level mappings."""
    lines = ["---"]
    for key, value in fields:
        if isinstance(value, list):
            lines.append(f"{key}:")
            for item in value:
                if isinstance(item, dict):
                    for i, (k, v) in enumerate(item.items()):
                        lines.append(f"{'- ' if i == 0 else '  '}{k}:{_card_value(v, 2)}")
                else:
                    lines.append(f"- {_yaml(item)}")
        else:
            lines.append(f"{key}: {_yaml(value)}")
    return lines + ["---"]


def _card_value(value, indent: int) -> str:
    """What follows `key:`: a scalar, or a list of one-level mappings on the next lines (configs.data_files)."""
    if isinstance(value, list):
        pad = " " * indent
        return "".join(f"\n{pad}- " + f"\n{pad}  ".join(f"{k}: {_yaml(v)}" for k, v in item.items()) for item in value)
    return f" {_yaml(value)}"


def hf_data_file(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """The parquet file's path in the folder, named by its content: `datasets.load_dataset(DIR)` caches a
    folder by its name and its card's data_files, not by the files' contents, so a folder exported again (or
    another export under the same name) with a fixed file name loaded the OLD rows from the cache (measured:
    3 rows, then 5 rows in a same-named folder elsewhere, loaded as 3). A new name is a new cache entry."""
    digest = hashlib.sha256(json.dumps([[row[c] for c in columns] for row in rows], ensure_ascii=False)
                            .encode("utf-8")).hexdigest()[:16]
    return f"data/train-{digest}.parquet"


def dataset_card(what: str, rows: int, counts: dict[str, int], facts: Sequence[tuple[str, str]], how: str,
                 data_file: str) -> str:
    """README.md of an exported dataset: Hub metadata (configs/data_files: `data_file`, license left to the
    user, task categories, size category), then the counts per source, what made the data and how."""
    tags = ["instructflow", "self-instruct", "synthetic"] + (["preference", "dpo", "rlhf"] if what == "pairs" else ["sft"])
    front = card_front_matter([
        ("configs", [{"config_name": "default", "data_files": [{"split": "train", "path": data_file}]}]),
        ("license", "other"),
        ("task_categories", ["text-generation"]),
        ("language", ["en"]),
        ("size_categories", [size_category(rows)]),
        ("tags", tags),
        ("pretty_name", "instructflow " + ("preference pairs" if what == "pairs" else "instruction-tuning set")),
    ])
    title = "Preference pairs" if what == "pairs" else "Instruction-tuning set"
    body = [f"# {title} (instructflow)", "", LICENSE_LINE, "",
            f"{rows} rows, one split (`train`), columns: "
            + ", ".join(f"`{c}`" for c in (PAIR_COLUMNS if what == "pairs" else SFT_COLUMNS)) + ".", "",
            "| source | rows |", "|---|---|"] + [f"| {name} | {n} |" for name, n in counts.items()]
    body += ["", "## How it was made", "", how, "", "| | |", "|---|---|"]
    body += [f"| {name} | {_cell(value)} |" for name, value in facts]
    body += ["", "## Use", "", "```python", "from datasets import load_dataset", "",
             'data = load_dataset("path/to/this/folder")["train"]', "```", ""]
    return "\n".join(front + [""] + body)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_hf_dataset(rows: Sequence[dict], columns: Sequence[str], out: Path, card: str, data_file: str) -> Path:
    """DIR/`data_file` (hf_data_file) and DIR/README.md (the card) in a new or empty folder."""
    out = ready_out_dir(out)
    write_parquet(rows, columns, out / data_file)
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------
# `export model`: a standalone Hugging Face model folder with a model card

BASE_MODEL_IDS = {"bundled": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # base_model names with a Hub id
NOT_MODEL_FILES = ("metrics.json", "state.json", "optimizer.pt")  # ours, inside a registered checkpoint


def copy_model_dir(src: Path, out: Path) -> list[str]:
    """The checkpoint's files (weights, config, generation config, tokenizer) into a new or empty `out`;
    a checkpoint saved without a generation config gets one from its config's token ids."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ExportError(f"{src} is not a model folder (no config.json): rerun its stage")
    out = ready_out_dir(out)
    copied = []
    for path in sorted(src.iterdir()):
        if path.name in NOT_MODEL_FILES or path.name.startswith("."):
            continue
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, out / path.name)
        copied.append(path.name)
    if not (out / "generation_config.json").is_file():
        config = json.loads((src / "config.json").read_text())
        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
        copied.append("generation_config.json")
    return copied


def model_card(stage: str, base_model: str, base_id: str | None, sections: Sequence[tuple[str, Sequence[tuple[str, object]]]],
               evaluation: Sequence[tuple[str, str]], evaluation_note: str) -> str:
    """README.md of an exported model: Hub metadata, then its lineage (`sections`: a heading and its
    rows each: base model, data, the stage's settings) and the evaluate figures against SFT."""
    fields: list[tuple[str, object]] = [("library_name", "transformers"), ("pipeline_tag", "text-generation"),
                                        ("license", "other")]
    if base_id:
        fields.append(("base_model", base_id))
    fields.append(("tags", ["instructflow", stage] + (["sft"] if stage != "sft" else [])))
    body = [f"# instructflow {stage} model", "", LICENSE_LINE, "",
            f"A plain `transformers` causal LM (LoRA, if used, is merged): `AutoModelForCausalLM.from_pretrained` "
            f"loads it. Base model: {base_model}" + (f" (`{base_id}`)" if base_id else "") + ".", ""]
    for heading, rows in sections:
        body += [f"## {heading}", "", "| | |", "|---|---|"] + [f"| {k} | {_cell(_shown(v))} |" for k, v in rows] + [""]
    body += ["## Evaluation", "", evaluation_note, ""]
    if evaluation:
        body += ["| measure | value |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in evaluation] + [""]
    body += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
             'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""]
    return "\n".join(card_front_matter(fields) + [""] + body)


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)

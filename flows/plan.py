"""The I/O around the memory plan (tasks/memory_plan.py): the base model's config.json read without loading
a weight, the GPUs to plan for, and the check `run` and `stage` make before anything runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instructflow.flows.common import cache_dir
from instructflow.tasks.config import Config
from instructflow.tasks.memory_plan import (GB, Gpu, Hardware, ModelShape, PlanError, StagePlan, plan_config, refusal,
                                            training_stages)

# GGUF metadata (llama.*) -> config.json key
GGUF_KEYS = {"embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
             "block_count": "num_hidden_layers", "attention.head_count": "num_attention_heads",
             "attention.head_count_kv": "num_key_value_heads", "context_length": "max_position_embeddings",
             "vocab_size": "vocab_size"}


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PlanError(f"{path}: not a JSON object")
    return config


def gguf_model_config(path: Path) -> dict[str, Any]:
    """A Llama GGUF's shape from its header (metadata and tensor names; no tensor data is read)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else None
    if arch != "llama":
        raise PlanError(f"{path}: a {arch or 'unknown'} GGUF, not llama")
    config: dict[str, Any] = {}
    for key, name in GGUF_KEYS.items():
        found = reader.fields.get(f"llama.{key}")
        if found is not None:
            config[name] = int(found.contents())
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in reader.fields:
        config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    config["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    return config


def _bundled_config() -> tuple[dict[str, Any], str]:
    from instructflow.models.bundled import BUNDLED_DIR_NAME, bundled_gguf_path

    converted = cache_dir() / BUNDLED_DIR_NAME / "config.json"  # the cache dir appears whole (built atomically)
    if converted.is_file():
        return _read_config_json(converted), str(converted)
    gguf = bundled_gguf_path()
    return gguf_model_config(gguf), f"{gguf} (GGUF header)"


def model_config(name: str) -> tuple[dict[str, Any], str]:
    """(config.json dict, where it came from) of `sft.base_model`, the model every training stage starts from:
    'bundled' (the converted cache dir, else the GGUF header), 'tiny' (its cache dir, else models/tiny.py's
    shape with the bundled vocabulary), or a local HF dir. No weights are loaded."""
    if name == "bundled":
        return _bundled_config()
    if name == "tiny":
        cached = cache_dir() / "tiny-llama" / "config.json"  # flows/teacher.local_model_dir builds it there
        if cached.is_file():
            return _read_config_json(cached), str(cached)
        from instructflow.models.tiny import tiny_llama_config

        bundled, _ = _bundled_config()  # its tokenizer already holds the pad token: same vocabulary
        return tiny_llama_config(bundled["vocab_size"]), "models/tiny.py (not built yet)"
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        raise PlanError(f"sft.base_model {name!r}: no config.json there (use 'bundled', 'tiny' or an HF dir)")
    return _read_config_json(path), str(path)


def model_shape(cfg: Config) -> tuple[ModelShape, str]:
    config, source = model_config(cfg.sft.base_model)
    return ModelShape.from_config(config, source), source


def hardware_for(gpus: int | None, gpu_memory_gb: float | None, visible: list[Gpu]) -> tuple[Hardware, str]:
    """(what to plan for, a line saying where it came from): --gpus and --gpu-memory-gb, and what they leave
    open from the `visible` GPUs; with none visible and no memory given, no fit verdict."""
    seen = Hardware.from_gpus(visible)
    count = gpus or (seen.gpus if visible else 1)
    memory = int(gpu_memory_gb * GB) if gpu_memory_gb is not None else seen.memory_bytes
    hardware = Hardware(gpus=count, memory_bytes=memory, bf16=seen.bf16,
                        name=seen.name if gpu_memory_gb is None else "")
    if memory is None:
        return hardware, f"no CUDA GPU visible: planned for {count} GPU(s), no fit verdict (give --gpu-memory-gb)"
    kind = seen.name if gpu_memory_gb is None else "GPU"
    return hardware, f"{count} x {kind}, {memory / GB:.1f} GB each"


def plan_for(cfg: Config, hardware: Hardware, stages: list[str] | None = None) -> tuple[list[StagePlan], ModelShape, str]:
    """(the plans of the profile's training stages, the model shape, where it was read)."""
    shape, source = model_shape(cfg)
    return plan_config(cfg, shape, hardware, stages), shape, source


def plan_report(cfg: Config, plans: list[StagePlan], shape: ModelShape, source: str, hardware: Hardware,
                where: str) -> dict[str, Any]:
    """`instructflow plan --json`: one object."""
    return {"profile": cfg.profile, "model": {"source": source, "params": shape.params(), "shape": shape.as_dict()},
            "gpus": hardware.gpus, "gpu_memory_gb": None if hardware.memory_bytes is None
            else round(hardware.memory_bytes / GB, 3), "hardware": where,
            "fits": None if hardware.memory_bytes is None else all(p.fits for p in plans),
            "stages": {p.stage: p.as_dict() for p in plans}}


def memory_refusal(cfg: Config, stages: list[str] | None, gpus: list[Gpu]) -> str | None:
    """The one-line refusal for the first of `stages` (None: all; the training ones among them) that cannot
    fit the visible `gpus`; None when each fits, when none is a training stage, or with no GPU (CPU runs)."""
    wanted = [s for s in training_stages(cfg) if stages is None or s in stages]
    if not gpus or not wanted:
        return None
    hardware = Hardware.from_gpus(gpus)
    plans, _, _ = plan_for(cfg, hardware, wanted)
    found = refusal(plans, hardware)
    return f"memory plan: {found}" if found else None

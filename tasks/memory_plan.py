"""Memory plan: the GPU memory each training stage needs per device, from the model's config.json and the
stage's config section, before a weight is loaded (`instructflow plan`, and the check before `run`/`stage`).

Pure arithmetic: no torch, no weights. The only file it reads is the accelerate YAML a section names.

Parameters (a Llama-shaped config.json: hidden h, intermediate i, layers L, heads a, kv heads k, head dim d =
head_dim or h/a, vocab V), counted exactly as transformers builds the model:
    embeddings V*h; per layer q h*(a*d), k and v h*(k*d) each, o (a*d)*h, gate and up h*i each, down i*h,
    two RMSNorms 2*h (+ biases with attention_bias / mlp_bias); final norm h; lm_head V*h unless tied.
    A sequence classifier (reward model, PPO critic) has a score head h*1 instead of the lm_head.
LoRA (models/recipe_io.LORA_TARGETS: q, k, v, o, gate, up, down of every layer, never lm_head) adds
r*(in+out) per targeted linear; a classifier's score head trains in full beside it (peft modules_to_save).

Bytes per device, per component (GB below = 2**30 bytes, as the project's peak_memory_gb):
    weights      the trained model: fp32 master weights, 4 B/param (the recipes load fp32; bf16/fp16 are
                 autocast); + 4 B per LoRA adapter param; with qlora the block linears are NF4 with double
                 quantisation, 0.5 + 1/64 + 4/(64*256) B/param, and the rest (embeddings, norms, lm_head)
                 stays fp32 as `load_causal_lm` loads it
    gradients    4 B per trainable param (all of them, or the LoRA adapters and a classifier's score head)
    optimizer    AdamW: two fp32 moments, 8 B per trainable param
    reference    frozen policy-shaped copy: ppo always; dpo unless precompute_ref_log_probs; grpo when beta > 0;
                 none for dpo/grpo with LoRA (TRL uses the base with the adapters switched off)
    reward_model frozen classifier: ppo, grpo. Frozen models are bf16 (2 B/param) when precision resolves to
                 bf16, else fp32 (as models/ppo.py loads them; assumed for the dpo/grpo recipes too)
    critic       ppo's value model, classifier-shaped and trained: weights + gradients + AdamW as above
    activations  an ESTIMATE (Korthikanti et al. 2022, "Reducing activation recomputation"), for a micro-batch
                 of b rows of s tokens, in bytes with 16-bit activations (x2 in fp32):
                   per layer            b*s*h*(34 + 5*a*s/h)
                   with checkpointing   4*b*s*h per layer (each layer's fp32 input) + one layer recomputed in full
                   causal-LM logits     b*s*V*(2 + 4 + 4): 16-bit logits, fp32 log-probs kept for the backward,
                                        their fp32 gradient (4 + 4 + 4 in fp32); none for a classifier
                 rows and length: sft b = batch_size, s = max_length; reward and dpo 2*batch_size rows (chosen
                 and rejected); ppo actor + critic on batch_size rows of max_prompt_length + response_length;
                 grpo batch_size completions of max_length. s is the length as configured: RoPE scaling
                 (`rope_scaling_type`, `rope_scaling_factor`) changes no tensor's size, so a longer max_length
                 it allows is just a longer s (a later stage with "none" reaches as far as the SFT section's
                 scaling, which its input model carries: `stage_section`). The 5*a*s/h term is the attention
                 matrix (scores, softmax, dropout mask: 5*a*s^2 bytes per row) that eager attention keeps: with
                 sdpa's fused kernels on a GPU this is an upper bound; with attn_implementation =
                 "flash_attention_2" it is dropped (FlashAttention keeps no s x s matrix, only an O(s) softmax
                 statistic per head, not counted), leaving b*s*h*34 per layer.
Not counted: the CUDA context and allocator slack (~0.5-1 GB), ppo's generation KV cache (it is freed before
the backward), evaluation batches (no gradients), and temporary buffers.

Sharding over N processes: launcher "inprocess" (one process; with several GPUs the Trainer replicates the
model on each) and DDP replicate everything; ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients,
ZeRO-3 (and FSDP full-shard) also the weights, the frozen models and the critic. N = num_processes, else the
accelerate YAML's num_processes, else the GPU count. (DeepSpeed with bf16 keeps 16-bit weights plus an fp32
master copy in the optimizer shard: the same 16 B/param under ZeRO-3, and 2 - 2/N B/param fewer than counted
here under ZeRO-2.)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from instructflow.tasks.config import (ALIGNMENT_METHODS, Config, ConfigError, TrainingConfig,
                                       accelerate_config_file, accelerate_settings)

GB = 2**30
FP32, HALF = 4, 2
RESIDUAL_BYTES = FP32                              # the residual stream under autocast with fp32 weights
ADAM_BYTES = 8                                    # exp_avg + exp_avg_sq, fp32
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)         # 4-bit value, 8-bit absmax per 64, fp32 absmax per 256 blocks
COMPONENTS = ("weights", "gradients", "optimizer", "reference", "reward_model", "critic", "activations")
MAX_GPUS = 64                                     # the most GPUs an advice line suggests
ZERO_CONFIGS = {2: "deepspeed_zero2", 3: "deepspeed_zero3"}


class PlanError(ValueError):
    """One-line error: a model config the plan cannot read as a Llama."""


# --- the model ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-shaped model, from its config.json."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 0
    head_dim: int = 0                   # 0: hidden_size / num_attention_heads
    attention_bias: bool = False
    mlp_bias: bool = False

    REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> "ModelShape":
        missing = [key for key in cls.REQUIRED if not isinstance(config.get(key), int) or config[key] < 1]
        if missing:
            raise PlanError(f"{source}: not a Llama-shaped config (no positive integer {', '.join(missing)})")
        heads = config["num_attention_heads"]
        return cls(hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
                   num_hidden_layers=config["num_hidden_layers"], num_attention_heads=heads,
                   num_key_value_heads=config.get("num_key_value_heads") or heads,
                   vocab_size=config["vocab_size"],
                   # LlamaConfig's default: untied
                   tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                   max_position_embeddings=config.get("max_position_embeddings") or 0,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   attention_bias=bool(config.get("attention_bias", False)),
                   mlp_bias=bool(config.get("mlp_bias", False)))

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of one decoder layer's linear layers."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim or self.hidden_size // self.num_attention_heads
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    def block_linear_params(self) -> int:
        """The weights of every layer's linears (what QLoRA quantises), biases excluded."""
        return self.num_hidden_layers * sum(n_in * n_out for _, n_in, n_out in self.linears())

    def params(self, head: str = "lm") -> int:
        """Every parameter: head "lm" (causal LM: lm_head unless tied) or "classifier" (score head, 1 label)."""
        h, v = self.hidden_size, self.vocab_size
        biases = sum(n_out for name, _, n_out in self.linears()
                     if (self.attention_bias and name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
                     or (self.mlp_bias and name.endswith(("gate_proj", "up_proj", "down_proj"))))
        per_layer = sum(n_in * n_out for _, n_in, n_out in self.linears()) + biases + 2 * h
        body = v * h + self.num_hidden_layers * per_layer + h
        if head == "classifier":
            return body + h
        return body + (0 if self.tie_word_embeddings else v * h)

    def lora_params(self, r: int) -> int:
        """LoRA adapter parameters of rank r on every targeted linear: r*(in+out) each."""
        return self.num_hidden_layers * sum(r * (n_in + n_out) for _, n_in, n_out in self.linears())

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the machine ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    """One visible GPU: what the plan needs to know of it."""
    name: str
    memory_bytes: int
    bf16: bool = True


@dataclass(frozen=True)
class Hardware:
    """What the plan is for: `gpus` per machine, each with `memory_bytes` (None: no fit verdict)."""
    gpus: int = 1
    memory_bytes: int | None = None
    bf16: bool = True                   # precision "auto" resolves to bf16 (as on every GPU since Ampere)
    name: str = ""

    @classmethod
    def from_gpus(cls, gpus: list[Gpu]) -> "Hardware":
        """The visible GPUs, planned for the smallest of them."""
        if not gpus:
            return cls()
        smallest = min(gpus, key=lambda g: g.memory_bytes)
        return cls(gpus=len(gpus), memory_bytes=smallest.memory_bytes, bf16=all(g.bf16 for g in gpus),
                   name=smallest.name)


# --- sharding -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sharding:
    zero_stage: int                     # 0 = replicated (inprocess, DDP); 1, 2, 3 as DeepSpeed ZeRO; FSDP full = 3
    processes: int
    label: str

    def share(self, nbytes: float, from_stage: int) -> int:
        """Bytes per device of a component that ZeRO shards from stage `from_stage` on."""
        return math.ceil(nbytes / self.processes) if self.zero_stage >= from_stage else math.ceil(nbytes)


def zero_stage_of(settings: dict) -> int:
    kind = settings["distributed_type"]
    if kind == "DEEPSPEED":
        return settings["zero_stage"] if settings["zero_stage"] is not None else 0
    if kind == "FSDP":
        strategy = settings["fsdp_sharding_strategy"].upper()
        # FULL_SHARD (also "1" in old configs) and HYBRID_SHARD shard the weights too; SHARD_GRAD_OP is ZeRO-2
        return 0 if strategy in ("NO_SHARD", "3") else 2 if strategy in ("SHARD_GRAD_OP", "2") else 3
    return 0


def sharding_of(section: TrainingConfig, hardware: Hardware) -> Sharding:
    """How the stage's launcher spreads it: one process (inprocess) or the accelerate config's processes."""
    if section.launcher != "accelerate":
        return Sharding(0, 1, "inprocess")  # one process; with several GPUs the Trainer replicates the model
    path = accelerate_config_file(section.accelerate_config)
    if path is None:  # the section checked it when it was built; a file deleted since
        raise PlanError(f"{section.SECTION}.accelerate_config {section.accelerate_config!r}: file not found")
    try:
        settings = accelerate_settings(Path(path).read_text(encoding="utf-8"))
    except ConfigError as exc:
        raise PlanError(f"{path}: {exc}") from None
    processes = section.num_processes or settings["num_processes"] or hardware.gpus
    stage = zero_stage_of(settings)
    label = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}[min(max(stage, 0), 3)]
    if settings["distributed_type"] == "FSDP":
        label = "fsdp-" + ("full" if stage == 3 else "grad-op" if stage == 2 else "none")
    return Sharding(min(max(stage, 0), 3), max(processes, 1), f"{label} x{max(processes, 1)}")


# --- one stage ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Advice:
    """Settings (section keys) that make the stage fit, and the total they give."""
    changes: tuple[tuple[str, Any], ...]
    total_bytes: int
    gpus: int = 1                       # the processes (GPUs) it runs on: 1 in process, N with accelerate

    def __str__(self) -> str:
        keys = ", ".join(f"{key} = {_toml(value)}" for key, value in self.changes)
        return f"{keys} ({self.total_bytes / GB:.1f} GB{f' on {self.gpus} GPUs' if self.gpus > 1 else ''})"


def _toml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f'"{value}"' if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class StagePlan:
    """Per-device bytes of one training stage, and whether (and with what) it fits."""
    stage: str
    precision: str                      # as it resolves on the planned GPU
    rows: int                           # micro-batch rows per forward
    seq_len: int
    sharding: str                       # "inprocess", "ddp x2", "zero3 x8", "fsdp-full x4"
    processes: int
    zero_stage: int                     # what is sharded: 1 optimizer, 2 + gradients, 3 + weights and frozen models
    training: str                       # "full", "lora r=16", "qlora r=16"
    checkpointing: bool
    params: int                         # of the trained model
    trainable_params: int
    components: dict[str, int]          # COMPONENTS -> bytes per device
    memory_bytes: int | None            # per GPU; None: no verdict
    advice: tuple[Advice, ...] = ()
    closest: Advice | None = None       # when no advice: the tried settings with the smallest total
    notes: tuple[str, ...] = ()
    attention: str = "sdpa"             # the section's attn_implementation
    rope: str = "none"                  # the RoPE scaling the stage runs with: "none" or "linear x2", ...

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def fits(self) -> bool | None:
        return None if self.memory_bytes is None else self.total_bytes <= self.memory_bytes

    def component_notes(self) -> dict[str, str]:
        """What each component holds, in a few words (the plan table's third column)."""
        def sharded(stage: int) -> str:
            return f", / {self.processes}" if self.zero_stage >= stage and self.processes > 1 else ""

        frozen = "bf16" if self.precision == "bf16" else "fp32"
        trained = "all" if self.training == "full" else f"{self.trainable_params / 1e6:.3g}M"
        weights = ("fp32" if self.training == "full" else "NF4 base, fp32 rest + LoRA" if self.training.startswith("q")
                   else "fp32 + LoRA")
        return {"weights": weights + sharded(3), "gradients": f"fp32, {trained} params" + sharded(2),
                "optimizer": f"fp32 x2, {trained} params" + sharded(1), "reference": frozen + sharded(3),
                "reward_model": frozen + sharded(3), "critic": "weights + gradients + AdamW" + sharded(3),
                "activations": "estimate" + (", checkpointed" if self.checkpointing else "")
                + (", no s x s scores (flash_attention_2)" if self.attention == "flash_attention_2"
                   else f", s x s scores ({self.attention})")}

    def as_dict(self) -> dict:
        return {"stage": self.stage, "precision": self.precision, "rows": self.rows, "seq_len": self.seq_len,
                "sharding": self.sharding, "processes": self.processes, "zero_stage": self.zero_stage,
                "training": self.training, "gradient_checkpointing": self.checkpointing, "params": self.params,
                "trainable_params": self.trainable_params, "bytes": dict(self.components),
                "gb": {k: round(v / GB, 3) for k, v in self.components.items()},
                "total_bytes": self.total_bytes, "total_gb": round(self.total_bytes / GB, 3),
                "gpu_memory_gb": None if self.memory_bytes is None else round(self.memory_bytes / GB, 3),
                "fits": self.fits, "advice": [str(a) for a in self.advice],
                "advice_settings": [{"settings": dict(a.changes), "total_gb": round(a.total_bytes / GB, 3),
                                     "gpus": a.gpus} for a in self.advice],
                "closest": None if self.closest is None else str(self.closest),
                "notes": list(self.notes), "attn_implementation": self.attention, "rope_scaling": self.rope}


def resolve_precision(section: TrainingConfig, hardware: Hardware) -> str:
    """What models/recipe_io.resolve_precision gives on the planned GPU (auto: bf16, else fp16, ppo fp32)."""
    if section.precision != "auto":
        return section.precision
    return "bf16" if hardware.bf16 else "fp32" if section.SECTION == "ppo" else "fp16"


def activation_bytes(shape: ModelShape, rows: int, seq: int, precision: str, checkpointing: bool,
                     causal_lm: bool = True, attention: str = "sdpa") -> int:
    """The activation estimate of the module docstring for one model's forward and backward; `attention` is the
    stage's attn_implementation (flash_attention_2 keeps no s^2 attention matrix)."""
    scale = (FP32 if precision == "fp32" else HALF) / 2
    h, a, layers = shape.hidden_size, shape.num_attention_heads, shape.num_hidden_layers
    scores = 0 if attention == "flash_attention_2" else 5 * a * seq / h
    one_layer = rows * seq * h * (34 + scores) * scale
    # checkpointing keeps each layer's input: the residual stream, fp32 because the weights are (RESIDUAL_BYTES)
    kept = layers * RESIDUAL_BYTES * rows * seq * h + one_layer if checkpointing else layers * one_layer
    logits = rows * seq * shape.vocab_size * ((FP32 if precision == "fp32" else HALF) + 2 * FP32) if causal_lm else 0
    return math.ceil(kept + logits)


def _trained(shape: ModelShape, section: TrainingConfig, head: str) -> tuple[int, float, int]:
    """(params, weight bytes, trainable params) of a trained model with the section's LoRA settings."""
    params = shape.params(head)
    if not (section.lora or section.qlora):
        return params, FP32 * params, params
    trainable = shape.lora_params(section.lora_r) + (shape.hidden_size if head == "classifier" else 0)
    base = (NF4_BYTES * shape.block_linear_params() + FP32 * (params - shape.block_linear_params())
            if section.qlora else FP32 * params)
    return params, base + FP32 * trainable, trainable


def stage_memory(section: TrainingConfig, shape: ModelShape, hardware: Hardware) -> StagePlan:
    """Per-device bytes of the stage `section.SECTION` with `section`'s settings (no advice)."""
    stage = section.SECTION
    precision = resolve_precision(section, hardware)
    shard = sharding_of(section, hardware)
    frozen = HALF if precision == "bf16" else FP32
    head = "classifier" if stage == "reward" else "lm"
    params, weight_bytes, trainable = _trained(shape, section, head)
    lora = section.lora or section.qlora
    parts = dict.fromkeys(COMPONENTS, 0)
    parts["weights"] = shard.share(weight_bytes, 3)
    parts["gradients"] = shard.share(FP32 * trainable, 2)
    parts["optimizer"] = shard.share(ADAM_BYTES * trainable, 1)
    notes = []
    gc, attention = section.gradient_checkpointing, section.attn_implementation
    if stage == "ppo":
        # TRL's micro-batches: per_device_train_batch_size rows, cut to the minibatch when that is smaller
        rows = min(section.batch_size, section.batch_size * section.grad_accum // section.num_mini_batches)
        seq = section.max_prompt_length + section.response_length
        parts["reference"] = shard.share(frozen * shape.params("lm"), 3)
        parts["reward_model"] = shard.share(frozen * shape.params("classifier"), 3)
        _, critic_weights, critic_trainable = _trained(shape, section, "classifier")
        parts["critic"] = (shard.share(critic_weights, 3) + shard.share(FP32 * critic_trainable, 2)
                           + shard.share(ADAM_BYTES * critic_trainable, 1))
        parts["activations"] = (activation_bytes(shape, rows, seq, precision, gc, attention=attention)
                                + activation_bytes(shape, rows, seq, precision, gc, causal_lm=False,
                                                   attention=attention))
    else:
        rows = 2 * section.batch_size if stage in ("reward", "dpo") else section.batch_size
        seq = section.max_length
        if stage == "dpo" and not section.precompute_ref_log_probs and not lora:
            parts["reference"] = shard.share(frozen * shape.params("lm"), 3)
        if stage == "grpo":
            if section.beta > 0 and not lora:
                parts["reference"] = shard.share(frozen * shape.params("lm"), 3)
            parts["reward_model"] = shard.share(frozen * shape.params("classifier"), 3)
        parts["activations"] = activation_bytes(shape, rows, seq, precision, gc, causal_lm=head == "lm",
                                                attention=attention)
    reach = shape.max_position_embeddings * section.rope_scaling_factor  # factor 1 unless RoPE scaling is set
    if shape.max_position_embeddings and seq > reach:
        notes.append(f"sequence length {seq} is over the model's max_position_embeddings "
                     f"{shape.max_position_embeddings}" + (f" x rope_scaling_factor {section.rope_scaling_factor:g}"
                                                            if section.rope_scaling_type != "none" else ""))
    training = "full" if not lora else f"{'qlora' if section.qlora else 'lora'} r={section.lora_r}"
    rope = ("none" if section.rope_scaling_type == "none"
            else f"{section.rope_scaling_type} x{section.rope_scaling_factor:g}")
    return StagePlan(stage=stage, precision=precision, rows=rows, seq_len=seq, sharding=shard.label,
                     processes=shard.processes, zero_stage=shard.zero_stage, training=training, checkpointing=gc,
                     params=params, trainable_params=trainable, components=parts,
                     memory_bytes=hardware.memory_bytes, notes=tuple(notes), attention=attention, rope=rope)


# --- advice ---------------------------------------------------------------------------------------

def _changed(section: TrainingConfig, changes: dict) -> TrainingConfig | None:
    """The section with `changes`, or None when the section refuses them (its own cross-key rules)."""
    if all(getattr(section, key) == value for key, value in changes.items()):
        return None
    try:
        return dataclasses.replace(section, **changes)
    except ConfigError:
        return None


def _zero(stage: int, processes: int) -> dict:
    return {"launcher": "accelerate", "accelerate_config": ZERO_CONFIGS[stage], "num_processes": processes}


# what a lever costs the user, to rank the advice: time (checkpointing ~+30 % compute, smaller micro-batches),
# more GPUs, then the model trained (LoRA adapters only, then on a 4-bit base)
LEVER_COST = {"gradient_checkpointing": 1, "precision": 1, "precompute_ref_log_probs": 1, "batch": 1,
              "zero2": 2, "zero3": 2, "lora": 3, "qlora": 5}
MAX_ADVICE = 4                                    # advice lines per stage in the plan
REFUSAL_ADVICE = 2                                # of which the refusal line names the first


def _levers(section: TrainingConfig, hardware: Hardware) -> dict[str, dict | None]:
    """name -> the change it makes (None for "batch": the largest smaller batch that fits), least intrusive first."""
    levers: dict[str, dict | None] = {"gradient_checkpointing": {"gradient_checkpointing": True}}
    if section.precision == "fp32" and hardware.bf16:
        levers["precision"] = {"precision": "bf16"}
    if section.SECTION == "dpo":
        levers["precompute_ref_log_probs"] = {"precompute_ref_log_probs": True}
    levers["batch"] = None
    if hardware.gpus > 1:
        levers.update(zero2=_zero(2, hardware.gpus), zero3=_zero(3, hardware.gpus))
    levers.update(lora={"lora": True}, qlora={"qlora": True})
    return levers


def _smaller_batch(section: TrainingConfig, shape: ModelShape, hardware: Hardware,
                   base: dict) -> tuple[dict, StagePlan] | None:
    """The largest batch_size below the section's that fits with `base`, grad_accum raised to keep
    batch_size * grad_accum (ppo's rollouts, grpo's groups); when none fits, the smallest one."""
    tried = None
    for size in range(section.batch_size - 1, 0, -1):
        if section.batch_size % size:
            continue
        changes = {**base, "batch_size": size, "grad_accum": section.grad_accum * section.batch_size // size}
        changed = _changed(section, changes)
        if changed is not None:
            tried = changes, stage_memory(changed, shape, hardware)
            if tried[1].fits:
                return tried
    return tried


def _try(section: TrainingConfig, shape: ModelShape, hardware: Hardware, names: tuple[str, ...],
         levers: dict[str, dict | None]) -> tuple[dict, StagePlan] | None:
    """(changes, plan) of these levers together: with "batch", the largest smaller batch that fits."""
    changes = {k: v for name in names if name != "batch" for k, v in levers[name].items()}
    if "batch" in names:
        return _smaller_batch(section, shape, hardware, changes)
    changed = _changed(section, changes)
    return (changes, stage_memory(changed, shape, hardware)) if changed is not None else None


def _more_gpus(section: TrainingConfig, shape: ModelShape, hardware: Hardware, base: dict) -> Advice | None:
    """ZeRO-3 on the fewest GPUs (more than the plan's, up to MAX_GPUS) that make `section` + `base` fit."""
    for gpus in range(max(hardware.gpus + 1, 2), MAX_GPUS + 1):
        changes = {**base, **_zero(3, gpus)}
        changed = _changed(section, changes)
        if changed is None:
            return None  # the stage cannot run under accelerate
        if (plan := stage_memory(changed, shape, dataclasses.replace(hardware, gpus=gpus))).fits:
            return Advice(tuple(changes.items()), plan.total_bytes, gpus)
    return None


def advise(section: TrainingConfig, shape: ModelShape, hardware: Hardware) -> tuple[tuple[Advice, ...], Advice]:
    """(settings that make a stage fit, the tried combination with the smallest total).

    Every combination of up to three levers (gradient checkpointing, bf16, dpo's precomputed reference, a
    smaller micro-batch, ZeRO-2/3 on the plan's GPUs, LoRA, QLoRA) the section accepts is tried; the advice
    is the combinations that fit and hold no smaller one that fits, cheapest first (LEVER_COST, then the
    total), at most MAX_ADVICE; then, for a stage that runs under accelerate and when no sharding on these
    GPUs fits, ZeRO-3 on the fewest more GPUs (alone, and with gradient checkpointing)."""
    import itertools

    levers = _levers(section, hardware)
    fitting: list[tuple[int, int, tuple[str, ...], Advice]] = []
    smallest = Advice((), stage_memory(section, shape, hardware).total_bytes)
    for size in (1, 2, 3):
        for names in itertools.combinations(levers, size):
            if {"zero2", "zero3"} <= set(names) or {"lora", "qlora"} <= set(names):
                continue
            if any(set(kept) <= set(names) for _, _, kept, _ in fitting):
                continue  # a smaller combination already fits
            tried = _try(section, shape, hardware, names, levers)
            if tried is None:
                continue
            changes, plan = tried
            if plan.total_bytes < smallest.total_bytes:
                smallest = Advice(tuple(changes.items()), plan.total_bytes, plan.processes)
            if plan.fits:
                cost = sum(LEVER_COST[n] for n in names)
                fitting.append((cost, plan.total_bytes, names,
                                Advice(tuple(changes.items()), plan.total_bytes, plan.processes)))
    found = [advice for *_, advice in sorted(fitting, key=lambda f: (f[0], f[1]))][:MAX_ADVICE]
    if not any("zero2" in names or "zero3" in names for _, _, names, _ in fitting):
        for base in ({}, {"gradient_checkpointing": True}):
            more = _more_gpus(section, shape, hardware, base)
            if more is not None and all(more.gpus != a.gpus for a in found):
                found.append(more)
    return tuple(found), smallest


def plan_stage(section: TrainingConfig, shape: ModelShape, hardware: Hardware) -> StagePlan:
    """The stage's per-device bytes, fit verdict, and (when it does not fit) the advice."""
    plan = stage_memory(section, shape, hardware)
    if plan.fits is False:
        advice, closest = advise(section, shape, hardware)
        plan = dataclasses.replace(plan, advice=advice, closest=None if advice else closest)
    return plan


def training_stages(cfg: Config) -> list[str]:
    """The profile's training stages, in pipeline order: sft, reward, then its alignment methods."""
    return ["sft", "reward"] + [m for m in ALIGNMENT_METHODS if m in cfg.methods]


def plan_config(cfg: Config, shape: ModelShape, hardware: Hardware,
                stages: list[str] | None = None) -> list[StagePlan]:
    """A plan per training stage of the profile (or those of `stages` among them)."""
    return [plan_stage(stage_section(cfg, name), shape, hardware) for name in training_stages(cfg)
            if stages is None or name in stages]


def stage_section(cfg: Config, name: str) -> TrainingConfig:
    """The stage's section as the stage runs it: a later stage whose `rope_scaling_type` is "none" loads the SFT
    result, whose config.json carries the SFT section's RoPE scaling (models/recipe_io.model_kwargs), so it
    reaches as far as SFT does."""
    section, sft = getattr(cfg, name), cfg.sft
    if name == "sft" or section.rope_scaling_type != "none" or sft.rope_scaling_type == "none":
        return section
    return dataclasses.replace(section, rope_scaling_type=sft.rope_scaling_type,
                               rope_scaling_factor=sft.rope_scaling_factor)


def refusal(plans: list[StagePlan], hardware: Hardware) -> str | None:
    """One line naming the first stage that does not fit, need vs memory, and the settings that would fit."""
    over = [p for p in plans if p.fits is False]
    if not over:
        return None
    first = over[0]
    gpus = f"{hardware.gpus} x {hardware.name or 'GPU'}" if hardware.gpus > 1 else hardware.name or "the GPU"
    fix = ("; fits with: " + " or ".join(str(a) for a in first.advice[:REFUSAL_ADVICE]) if first.advice
           else f"; no setting tried makes it fit (the least: {first.closest})")
    also = f"; also over: {', '.join(f'{p.stage} ({p.total_bytes / GB:.1f} GB)' for p in over[1:])}" if over[1:] else ""
    return (f"{first.stage} needs {first.total_bytes / GB:.1f} GB per GPU but {gpus} has "
            f"{first.memory_bytes / GB:.1f} GB{fix}{also} (`instructflow plan` shows the breakdown)")


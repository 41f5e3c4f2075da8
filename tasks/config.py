"""Configuration: one TOML file with named profiles, validated into frozen, typed sections.

Resolution order for the file: `--config PATH`, `$INSTRUCTFLOW_CONFIG`, `./instructflow.toml`,
then the defaults shipped in the package (`flows/instructflow.toml`). A profile may `inherits`
another; keys are deep-merged. Env overrides for the teacher endpoint: INSTRUCTFLOW_TEACHER_ENDPOINT,
INSTRUCTFLOW_TEACHER_MODEL, INSTRUCTFLOW_TEACHER_API (chat|completions). The API key is never part
of the config: it is read from the env var named by `teacher.api_key_env` (or
INSTRUCTFLOW_TEACHER_API_KEY) only when a client is built, so it cannot reach hashes, DuckDB or logs.
Nor are credentials inside the endpoint URL (`https://user:KEY@host/v1`, `?api-key=KEY`): the loaded
`teacher.endpoint` has them masked, and `teacher_endpoint` gives the URL requests go to (tasks/secrets.py).

A command resolves its config once (`load_config`) and hands the frozen `Config` to the pipeline and
the stages. Every section checks itself when it is constructed (`Section.__post_init__`): by the
loader, from a job file, or by hand in a test or bench, so the recipes trust the section they get.

The training sections share one shape: `TrainingConfig` (optimiser, batch, precision, LoRA, launcher:
every training stage) and `TrainerConfig` (schedule, epochs/steps, length, eval/save cadence: the
stages trained by a transformers Trainer). Each adds only its own keys, and each shared key has one
range (RANGES, under "training." or "trainer.").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, get_origin, get_type_hints

from instructflow.tasks.secrets import real_endpoint, remember, remember_endpoint

from instructflow.tasks.heuristics import DEFAULT_BLACKLIST

PACKAGED_CONFIG = "instructflow.toml"
SHIPPED_ACCELERATE_CONFIGS = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")  # models/accelerate/NAME.yaml
ALIGNMENT_METHODS = ("ppo", "dpo", "grpo")
# `attn_implementation` choices. Each keeps the examples SFT packs into one row apart (models/sft.py): a new one
# joins PACKING_EXACT only once a test shows it (tests/test_long_sequences.py), else packing refuses it
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
PACKING_EXACT = ("sdpa", "eager", "flash_attention_2")


def stable_hash(value: Any) -> str:
    """16 hex digits of the SHA-256 of `value` as sorted JSON: input hashes, run folders, section hashes."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """One-line configuration error that names the file and the bad key."""


class SettingError(ConfigError):
    """A section refused one of its values at construction; the loader re-labels it with the file and profile."""

    def __init__(self, section: str, key: str, requirement: str):
        self.section, self.key, self.requirement = section, key, requirement
        super().__init__(f"settings: {section}.{key} must be {requirement}")


def choice(default: str, *allowed: str):
    return field(default=default, metadata={"choices": allowed})


# Every int/float key has its allowed range in RANGES (after the sections); a new numeric key adds a line there.


@dataclass(frozen=True)
class Section:
    """A config section: frozen, and checked once, when it is built (types, choices, RANGES, cross-key rules)."""
    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            origin = get_origin(hints[f.name]) or hints[f.name]
            if not _type_ok(origin, value):
                raise SettingError(self.SECTION, f.name, f"{origin.__name__}, got {type(value).__name__} {value!r}")
            if origin is float and not isinstance(value, float):
                object.__setattr__(self, f.name, float(value))  # 1 in TOML means 1.0 for a float key
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise SettingError(self.SECTION, f.name, f"one of {', '.join(choices)}, got {value!r}")
            allowed = range_of(type(self), f.name)
            if allowed is not None and value not in allowed:
                raise SettingError(self.SECTION, f.name, f"{allowed}, got {getattr(self, f.name)!r}")
        for key, ok, what in self.cross_key_rules():
            if not ok:
                raise SettingError(self.SECTION, key, what)

    def cross_key_rules(self) -> list[tuple[str, bool, str]]:
        """(key, ok, what it must be) for keys whose allowed values depend on another key."""
        return []


def _type_ok(origin: type, value: Any) -> bool:
    return {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[origin](value)


SAVE_TOTAL_LIMIT = 2  # Trainer checkpoints a training stage keeps (resume needs only the newest)


def result_settings(section: Any) -> dict[str, Any]:
    """A section's keys that shape what its stage produces: all of them but the disk-only ones
    (`keep_checkpoints`), so changing one neither makes a stage stale nor moves its run folder."""
    disk_only = {f.name for f in dataclasses.fields(section) if f.metadata.get("disk_only")}
    return {key: value for key, value in dataclasses.asdict(section).items() if key not in disk_only}


@dataclass(frozen=True)
class TeacherConfig(Section):
    SECTION: ClassVar[str] = "teacher"

    endpoint: str = "embedded"          # "embedded" (transformers serve on the bundled model) or a base URL
    embedded_model: str = "bundled"     # embedded only: "bundled" (SmolLM2-135M-Instruct), "tiny", or a local HF dir
    model: str = ""                     # model id sent to a remote endpoint (ignored for embedded)
    api: str = choice("chat", "chat", "completions")
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 4
    max_retries: int = 5
    timeout_s: float = 120.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    startup_timeout_s: float = 180.0
    continuous_batching: bool = False   # embedded only: `transformers serve --continuous-batching` (see README)
    max_requests_per_minute: float = 0.0  # the endpoint's request budget, paced; 0 = none (429s still slow us down)
    max_tokens_per_minute: float = 0.0    # the endpoint's token budget (prompt + completion), paced; 0 = none
    mode: str = choice("sync", "sync", "batch")  # "batch": generate and the judge send Batch API jobs (half price)
    batch_poll_s: float = 30.0          # batch mode: seconds between polls of an open batch
    # batch mode: USD per 1M tokens, model -> [prompt, completion]; a model missing here costs half of `prices`
    batch_prices: dict = field(default_factory=dict)
    # USD per 1M tokens: model -> [prompt, completion]. Unknown models cost 0 and are flagged.
    prices: dict = field(default_factory=lambda: {"gpt-4o-mini": [0.15, 0.6], "gpt-4o": [2.5, 10.0],
                                                  "gpt-4.1-mini": [0.4, 1.6]})

    def __post_init__(self) -> None:
        super().__post_init__()
        # credentials in the URL (user:key@, ?api-key=) stay out of the config, so out of hashes, Prefect's
        # flow-run parameters, DuckDB and messages: it holds the masked URL; `teacher_endpoint` gives the real one
        object.__setattr__(self, "endpoint", remember_endpoint(self.endpoint))

    def cross_key_rules(self):
        # refused at load, not after preferences sampled for minutes
        return [("mode", self.mode != "batch" or self.endpoint != "embedded",
                 "'sync' with teacher.endpoint = 'embedded' (transformers serve has no Batch API): point "
                 "teacher.endpoint at one that has, e.g. https://api.openai.com/v1")]


@dataclass(frozen=True)
class GenerateConfig(Section):
    SECTION: ClassVar[str] = "generate"

    recipe: str = choice("self-instruct", "self-instruct", "alpaca")
    target_kept: int = 40               # stop once this many generated instructions passed every filter
    max_requests: int = 200             # hard cap on instruction requests, so a weak teacher cannot loop forever
    n_demos: int = 8                    # self-instruct: demonstrations per prompt
    n_machine_demos: int = 2            # self-instruct: of which from the machine pool when available
    alpaca_demos: int = 3
    alpaca_instructions: int = 20
    truncation: str = choice("recipe", "recipe", "drop_response", "drop_last")
    instances: bool = True              # generate instances (classification step + output/input-first)
    # "reference": self-instruct's few-shot instance prompts; "chat": per instance, ask for an input,
    # then send instruction + input as a chat message for the output (small chat teachers follow it)
    instance_prompt: str = choice("reference", "reference", "chat")
    max_instances: int = 5
    max_tokens: int = 0                 # 0 = the recipe's reference value; small models/tests lower it
    instance_max_tokens: int = 0
    max_seed_chars: int = 4000          # a seed task longer than this (instruction + instances) is refused, file:line
    commit_every: int = 256             # group commit: write buffered results once this many are waiting ...
    commit_ms: float = 500.0            # ... or once the oldest has waited this long (a SIGKILL loses at most that)
    key_attempts: int = 3               # a failed request key is retried by later runs until it was tried this often
    max_failed_fraction: float = 0.5    # the stage fails when more of this run's requests failed than this
    batch_size: int = 500               # batch mode: instruction prompts per batch (self-instruct: per round)
    seed: int = 42

    def cross_key_rules(self):
        return [("n_machine_demos", self.n_machine_demos <= self.n_demos, "<= generate.n_demos")]


@dataclass(frozen=True)
class FilterConfig(Section):
    SECTION: ClassVar[str] = "filter"

    # heuristic filters (applied inline by generate and re-derived by the filter stage)
    blacklist: list = field(default_factory=lambda: list(DEFAULT_BLACKLIST))
    min_words: int = 4                  # fewer words are rejected (the reference rejects <= 3)
    max_words: int = 150                # more words are rejected
    # ROUGE-L near-duplicate filter
    threshold: float = 0.7
    top_k: int = 10
    tokenizer: str = choice("rouge", "rouge", "unicode")
    with_mean: bool = False

    def cross_key_rules(self):
        return [("max_words", self.max_words >= self.min_words, ">= filter.min_words")]


# --- training: one shape for every training stage -----------------------------------------------

@dataclass(frozen=True)
class TrainingConfig(Section):
    """What every training stage (sft, reward, ppo, dpo, grpo) sets the same way."""
    SECTION: ClassVar[str] = "training"
    # stages whose recipe runs under `accelerate launch` (the others refuse launcher = "accelerate"), and the
    # accelerate configs' `distributed_type`s it runs under, with why the others are refused
    LAUNCHABLE: ClassVar[bool] = False
    LAUNCH_TYPES: ClassVar[tuple[str, ...]] = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED")
    LAUNCH_TYPES_WHY: ClassVar[str] = ""

    learning_rate: float = 2e-5
    batch_size: int = 4                 # per device (ppo: rollouts per device per update)
    grad_accum: int = 1
    seed: int = 42
    precision: str = choice("auto", "auto", "fp32", "bf16", "fp16")  # auto: bf16 on a GPU that has it, fp32 on CPU
    gradient_checkpointing: bool = False
    lora: bool = False                  # LoRA adapters (models/recipe_io.lora_config), merged into the saved model
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    qlora: bool = False                 # LoRA on a 4-bit base (CUDA + bitsandbytes)
    # "inprocess": the flow calls the recipe; "accelerate": `accelerate launch` runs it (several GPUs)
    launcher: str = choice("inprocess", "inprocess", "accelerate")
    accelerate_config: str = "ddp"      # ddp | fsdp | deepspeed_zero2 | deepspeed_zero3 (shipped) or a YAML path
    num_processes: int = 0              # 0 = what the accelerate config says
    # keep the resume state (Trainer checkpoints/, PPO rounds/) of a finished run; by default a stage that
    # finished keeps only final/ and run.json. Disk only: not part of the stage's hashes (`result_settings`)
    keep_checkpoints: bool = field(default=False, metadata={"disk_only": True})
    # attention kernel of every model the stage loads (models/recipe_io.model_kwargs); flash_attention_2 needs
    # CUDA + flash-attn, which only the recipe's machine can tell (refused there, in one line)
    attn_implementation: str = choice("sdpa", *ATTN_IMPLEMENTATIONS)
    # RoPE scaling applied to every model the stage loads and written into the config.json it saves: "none"
    # keeps the model's own RoPE; linear (position interpolation), dynamic (NTK) or yarn stretch the positions
    # the model was pretrained on by `rope_scaling_factor`; `max_length` is then the longer sequence to train on
    rope_scaling_type: str = choice("none", "none", "linear", "dynamic", "yarn")
    rope_scaling_factor: float = 1.0

    def cross_key_rules(self):
        scaled = self.rope_scaling_type != "none"
        rules = [("rope_scaling_factor", not scaled or self.rope_scaling_factor > 1,
                  f"> 1 with rope_scaling_type = {self.rope_scaling_type!r} (1 stretches nothing), "
                  f"got {self.rope_scaling_factor!r}"),
                 ("rope_scaling_factor", scaled or self.rope_scaling_factor == 1,
                  f"1 with rope_scaling_type = 'none' (set a type, linear, dynamic or yarn, to scale), "
                  f"got {self.rope_scaling_factor!r}"),
                 ("attn_implementation", self.attn_implementation != "flash_attention_2" or self.precision != "fp32",
                  "'sdpa' or 'eager' with precision = 'fp32' (FlashAttention runs in bf16 or fp16 only), "
                  f"got {self.attn_implementation!r}")]
        return rules + self._launch_rules()

    def _launch_rules(self) -> list[tuple[str, bool, str]]:
        path = accelerate_config_file(self.accelerate_config) if self.launcher == "accelerate" else None
        rules = [("launcher", self.launcher == "inprocess" or self.LAUNCHABLE,
                  f"'inprocess' for the {self.SECTION} stage (its recipe does not run under accelerate)"),
                 ("accelerate_config", self.launcher != "accelerate" or path is not None,
                  f"a shipped accelerate config ({', '.join(SHIPPED_ACCELERATE_CONFIGS)}) or a YAML file, "
                  f"got {self.accelerate_config!r}")]
        if path is None:
            return rules
        try:
            kind = accelerate_settings(path.read_text(encoding="utf-8"))["distributed_type"]
        except (ConfigError, OSError) as exc:
            return rules + [("accelerate_config", False, f"a readable accelerate YAML ({path}: {exc})")]
        return rules + [("accelerate_config", kind in self.LAUNCH_TYPES,
                         f"a config whose distributed_type is {' or '.join(self.LAUNCH_TYPES)} for the {self.SECTION} "
                         f"stage ({self.LAUNCH_TYPES_WHY}), got {kind} ({self.accelerate_config})")]


@dataclass(frozen=True)
class TrainerConfig(TrainingConfig):
    """What the stages trained by a transformers Trainer (sft, reward, dpo, grpo) add: schedule, length, cadence.
    Each runs under `accelerate launch` too (DDP, FSDP, DeepSpeed: the Trainer prepares the model for each)."""
    LAUNCHABLE: ClassVar[bool] = True
    epochs: float = 1.0
    max_steps: int = -1                 # -1: train for `epochs`
    warmup_ratio: float = 0.03          # share of the steps the learning rate warms up over
    lr_scheduler: str = choice("cosine", "cosine", "linear", "constant", "constant_with_warmup")
    max_length: int = 512               # tokens of prompt + reply (a pair's longer side for reward/dpo)
    # batches of examples of similar length (HF's LengthGroupedSampler): less padding, so fewer tokens
    # computed per step; the order stays seeded and random across groups
    group_by_length: bool = True        # (grpo: no effect, a prompt's group of completions stays together)
    eval_steps: int = 50
    save_steps: int = 50


@dataclass(frozen=True)
class SFTConfig(TrainerConfig):
    SECTION: ClassVar[str] = "sft"

    base_model: str = "bundled"         # "bundled", "tiny" (random tiny Llama, tests), or a local HF dir
    style: str = choice("alpaca", "alpaca", "chat")
    include_seed_instances: bool = True
    eval_fraction: float = 0.1
    packing: bool = False               # exact (packed examples do not attend to each other): see models/sft.py

    def cross_key_rules(self):
        return super().cross_key_rules() + [
            ("packing", not self.packing or self.attn_implementation in PACKING_EXACT,
             f"false with sft.attn_implementation = {self.attn_implementation!r} (packed examples would attend "
             f"to each other; exact with {', '.join(PACKING_EXACT)})")]


@dataclass(frozen=True)
class PreferencesConfig(Section):
    SECTION: ClassVar[str] = "preferences"

    prompts: int = 24                   # prompts to sample responses for
    k: int = 2                          # responses per prompt (>= 2)
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 96
    prompt_source: str = choice("eval", "eval", "all")  # "eval": held out from SFT training
    import_files: list = field(default_factory=list)   # JSONL preference files to import
    # an imported pair whose prompt, chosen or rejected is longer (characters) is refused and counted
    max_field_chars: int = 20000
    seed: int = 42


@dataclass(frozen=True)
class RewardConfig(TrainerConfig):
    SECTION: ClassVar[str] = "reward"

    learning_rate: float = 1e-5
    eval_fraction: float = 0.2
    center_rewards_coefficient: float = 0.01

    def cross_key_rules(self):
        return super().cross_key_rules() + [("qlora", not self.qlora, "false (a 4-bit reward model is not supported)")]


@dataclass(frozen=True)
class PPOConfig(TrainingConfig):
    SECTION: ClassVar[str] = "ppo"
    LAUNCHABLE: ClassVar[bool] = True
    LAUNCH_TYPES: ClassVar[tuple[str, ...]] = ("NO", "MULTI_CPU", "MULTI_GPU")
    LAUNCH_TYPES_WHY: ClassVar[str] = ("data parallel only: the PPO loop prepares actor and critic again for each "
                                       "chunk of save_every_steps updates and saves rounds from rank 0's whole "
                                       "models, which FSDP and DeepSpeed shard")

    learning_rate: float = 3e-6
    batch_size: int = 8
    prompts: int = 64
    prompt_source: str = choice("eval", "eval", "all")
    total_episodes: int = 64
    num_mini_batches: int = 1
    num_ppo_epochs: int = 4
    response_length: int = 53
    temperature: float = 0.7
    kl_coef: float = 0.05
    cliprange: float = 0.2
    vf_coef: float = 0.1
    # GAE's lambda (TRL's `lam`). Below 1 a token's advantage leans on the critic's values of the next
    # few prefixes; a critic that starts as the reward model never saw a partial reply in training, so
    # 1.0 (returns minus the critic as a baseline only) keeps an untrained critic from steering the policy
    lam: float = 0.95
    missing_eos_penalty: float = 1.0
    # the first N updates train the critic only (actor learning rate 0; OpenRLHF's freezing_actor_steps),
    # for the same reason as lam above
    value_warmup_updates: int = 0
    max_prompt_length: int = 256
    save_every_steps: int = 2           # PPO updates between saved (policy, value) rounds
    keep_rounds: int = 0                # keep only the newest N rounds on disk (0 = all)
    save_optimizer: bool = True         # AdamW state in the newest round: exact resume, ~2x model size on disk

    def cross_key_rules(self):
        # what the PPO loop would otherwise refuse only after SFT and reward have trained
        rollout_batch = self.batch_size * self.grad_accum
        return super().cross_key_rules() + [
            ("precision", self.precision != "fp16", "one of auto, fp32, bf16 (the PPO loop has no fp16 loss scaling), "
                                                   f"got {self.precision!r}"),
            ("qlora", not self.qlora, "false (PPO trains LoRA on full-precision weights: use lora)"),
            ("total_episodes", self.total_episodes % rollout_batch == 0,
             f"a multiple of ppo.batch_size * ppo.grad_accum (= {rollout_batch}), got {self.total_episodes}"),
            ("num_mini_batches", rollout_batch % self.num_mini_batches == 0,
             f"a divisor of ppo.batch_size * ppo.grad_accum (= {rollout_batch}), got {self.num_mini_batches}"),
            ("value_warmup_updates", self.value_warmup_updates < self.total_episodes // rollout_batch,
             f"fewer than the run's {self.total_episodes // rollout_batch} updates (ppo.total_episodes / "
             f"{rollout_batch}) so that the policy trains at all, got {self.value_warmup_updates}")]


@dataclass(frozen=True)
class DPOConfig(TrainerConfig):
    """Direct preference optimisation (TRL DPOTrainer) from the SFT checkpoint on the preference pairs, with
    the reward stage's train/eval split; the reference is the SFT model."""
    SECTION: ClassVar[str] = "dpo"

    learning_rate: float = 5e-6
    beta: float = 0.1                   # strength of the implicit KL to the reference (TRL's default)
    loss_type: str = choice("sigmoid", "sigmoid", "ipo", "hinge", "robust", "apo_zero")
    # weight of a negative log-likelihood term on the chosen replies beside the preference loss (RPO,
    # TRL's "sft" loss): keeps the chosen replies likely instead of only the rejected ones unlikely; 0 = plain DPO
    sft_weight: float = 0.0
    # one reference pass over the pairs before training, then no reference model in memory
    precompute_ref_log_probs: bool = True


@dataclass(frozen=True)
class GRPOConfig(TrainerConfig):
    """Group relative policy optimisation (TRL GRPOTrainer) from the SFT checkpoint on the prompts PPO uses
    (same selection: `prompts`, `prompt_source`, `seed`), rewarded by the trained reward model."""
    SECTION: ClassVar[str] = "grpo"

    learning_rate: float = 1e-6
    prompts: int = 64
    prompt_source: str = choice("eval", "eval", "all")
    num_generations: int = 4            # completions per prompt; the per-device batch must be a multiple of it
    max_completion_length: int = 53     # `max_length` caps prompt + completion: longer prompts are skipped
    temperature: float = 0.7
    beta: float = 0.04                  # KL coefficient to the SFT reference (0 = no reference model loaded)
    epsilon: float = 0.2                # clip range of the policy ratio
    num_iterations: int = 1             # optimisation passes over each generated batch (mu)
    missing_eos_penalty: float = 1.0    # a rule reward: subtracted from a completion that does not end with eos
    scale_rewards: str = choice("group", "group", "batch", "none")
    loss_type: str = choice("dapo", "dapo", "grpo", "dr_grpo", "bnpo")

    def cross_key_rules(self):
        return super().cross_key_rules() + [
            ("max_completion_length", self.max_completion_length < self.max_length,
             f"< grpo.max_length (= {self.max_length}) so that a prompt fits beside it, got {self.max_completion_length}"),
            ("batch_size", (self.batch_size * self.grad_accum) % self.num_generations == 0,
             f"such that grpo.batch_size * grpo.grad_accum is a multiple of grpo.num_generations "
             f"(= {self.num_generations}), got {self.batch_size} * {self.grad_accum}")]


@dataclass(frozen=True)
class EvaluateConfig(Section):
    SECTION: ClassVar[str] = "evaluate"

    prompts: int = 16
    # held-out prompts of your own: a JSONL of self-instruct tasks or Alpaca records (or an Alpaca JSON
    # list); "bundled:eval_prompts.jsonl" is the package's 96 user-style tasks; "" = the SFT held-out split
    prompts_file: str = ""
    max_new_tokens: int = 64
    judge: bool = True
    judge_prompts: int = 0              # the judge sees the first N prompts only (0 = all): each costs 2 requests per method
    # a second reward model, trained (with the `reward` settings) on the reward stage's eval pairs only,
    # which the policies' reward model never trained on: scores every policy too, a check for reward hacking
    holdout_reward: bool = False
    bootstrap_resamples: int = 2000     # paired bootstrap of each method-minus-SFT difference
    confidence: float = 0.95
    seed: int = 7                       # the held-out split's order and the bootstrap's resampling


@dataclass(frozen=True)
class Config:
    """One resolved profile: built once per command (`load_config`), then handed to every stage."""
    profile: str
    source: str                          # the file the profile came from
    seeds: list = field(default_factory=lambda: ["bundled"])   # files/dirs; "bundled" = the package's seeds/
    # the alignment methods this profile trains beside SFT (each a stage; evaluate compares all it finds)
    methods: list = field(default_factory=lambda: ["ppo"])
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preferences: PreferencesConfig = field(default_factory=PreferencesConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALIGNMENT_METHODS]
        if unknown or len(set(self.methods)) != len(self.methods):
            raise SettingError("profile", "methods", f"a list of distinct methods from {', '.join(ALIGNMENT_METHODS)}, "
                                                    f"got {self.methods!r}")

    def section_hash(self, *names: str) -> str:
        """Hash of the named sections or single keys ("reward", "preferences.seed"): what a stage's output
        depends on. Never contains secrets."""
        payload = {}
        for name in names:
            section, _, key = name.partition(".")
            value = getattr(self, section)
            value = result_settings(value) if dataclasses.is_dataclass(value) else value
            payload[name] = value[key] if key else value
        return stable_hash(payload)

    def replace(self, **sections: Any) -> "Config":
        """A copy with some sections' keys changed, checked as a loaded one: replace(ppo={"lr": 1e-5})."""
        changed = {name: dataclasses.replace(getattr(self, name), **keys) for name, keys in sections.items()}
        return dataclasses.replace(self, **changed)


SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name not in ("profile", "source")}
LIST_KEYS = ("seeds", "methods")   # profile keys that are lists of strings, not tables
SECTION_CLASSES: dict[str, type[Section]] = {name: hint for name, hint in get_type_hints(Config).items()
                                             if name in SECTIONS and name not in LIST_KEYS}
TRAINING_SECTIONS = tuple(name for name, cls in SECTION_CLASSES.items() if issubclass(cls, TrainingConfig))


def packaged_text() -> str:
    return resources.files("instructflow.flows").joinpath(PACKAGED_CONFIG).read_text(encoding="utf-8")


def config_path(explicit: str | Path | None = None) -> tuple[str, str]:
    """(label, text) of the config file to use."""
    candidates = [explicit, os.environ.get("INSTRUCTFLOW_CONFIG"), "instructflow.toml"]
    for i, candidate in enumerate(candidates):
        if not candidate:
            continue
        path = Path(candidate)
        if path.is_file():
            try:
                return str(path), path.read_text(encoding="utf-8")
            except PermissionError:
                raise ConfigError(f"{path}: config file is not readable (permission denied)") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{path}: config file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
        if i < 2:  # an explicitly named file that does not exist is an error, the cwd default is not
            raise ConfigError(_not_a_config_file(path))
    return f"<packaged {PACKAGED_CONFIG}>", packaged_text()


def _not_a_config_file(path: Path) -> str:
    """Why an explicitly named config path cannot be read as a file."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"{path}: config file not found"
    except OSError as exc:
        return f"{path}: cannot reach config file ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return f"{path} is a directory, not a config file"
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"{path} is {kind}, not a config file (a TOML file)"


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "prices":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_profile(label: str, profiles: dict, name: str, chain: tuple[str, ...] = ()) -> dict:
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ConfigError(f"{label}: unknown profile {name!r} (profiles: {known})")
    if name in chain:
        raise ConfigError(f"{label}: profiles.{name}.inherits forms a cycle: {' -> '.join(chain + (name,))}")
    body = dict(profiles[name])
    parent = body.pop("inherits", None)
    if parent is None:
        return body
    if not isinstance(parent, str):
        raise ConfigError(f"{label}: profiles.{name}.inherits must be a profile name")
    return _deep_merge(_resolve_profile(label, profiles, parent, chain + (name,)), body)


# Keys that once existed: a user file that still sets one gets a line saying what to do instead.
REMOVED_KEYS = {
    "generate.requests_per_round": "removed (the streaming scheduler has no rounds: it keeps teacher.max_concurrency "
                                   "requests in flight); delete this line",
}


def _build_section(label: str, prefix: str, cls: type[Section], raw: Any) -> Section:
    """A section from a TOML table (or a job file's dict); every refusal names the file and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: {prefix} must be a table")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{cls.SECTION}.{key}" in REMOVED_KEYS:
            raise ConfigError(f"{label}: {prefix}.{key}: {REMOVED_KEYS[f'{cls.SECTION}.{key}']}")
        if key not in fields:
            near = [n for n in fields if n.startswith(key[:3])]
            hint = f" (did you mean {near[0]}?)" if near else f" (known: {', '.join(sorted(fields))})"
            raise ConfigError(f"{label}: {prefix}.{key}: unknown key{hint}")
    try:
        return cls(**raw)
    except SettingError as exc:
        raise ConfigError(f"{label}: {prefix}.{exc.key} must be {exc.requirement}") from None


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric key: lo <= v <= hi (an open end excludes its bound), or exactly `also`."""
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    also: float | None = None

    def __contains__(self, v: float) -> bool:
        if self.also is not None and v == self.also:
            return True
        if self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.open_hi else v <= self.hi)

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else repr(x)
        if self.lo is not None and self.hi is not None:
            if self.open_lo == self.open_hi:
                text = f"between {num(self.lo)} and {num(self.hi)}" + (" (exclusive)" if self.open_lo else "")
            else:
                text = f"{'>' if self.open_lo else '>='} {num(self.lo)} and {'<' if self.open_hi else '<='} {num(self.hi)}"
        elif self.lo is not None:
            text = f"{'>' if self.open_lo else '>='} {num(self.lo)}"
        else:
            text = f"{'<' if self.open_hi else '<='} {num(self.hi)}"
        return text if self.also is None else f"{num(self.also)} or {text}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, open_lo=True)
FRACTION, OPEN_FRACTION = Range(0, 1), Range(0, 1, open_lo=True, open_hi=True)
STEPS = Range(1, also=-1)               # -1 = train for `epochs`; 0, which the Trainer reads the same way, is refused
SEED = Range(0, 2**32 - 1)              # what numpy accepts

# The documented range of every numeric key (README "Configuration" lists the same), checked when a
# section is built. Keys every training section shares are listed once, under "training." / "trainer.".
RANGES: dict[str, Range] = {
    "teacher.max_concurrency": AT_LEAST_1, "teacher.max_retries": AT_LEAST_0, "teacher.timeout_s": POSITIVE,
    "teacher.backoff_base_s": AT_LEAST_0, "teacher.backoff_max_s": AT_LEAST_0, "teacher.startup_timeout_s": POSITIVE,
    "teacher.max_requests_per_minute": AT_LEAST_0, "teacher.max_tokens_per_minute": AT_LEAST_0,
    "teacher.batch_poll_s": POSITIVE, "generate.batch_size": AT_LEAST_1,
    "generate.target_kept": AT_LEAST_0, "generate.max_requests": AT_LEAST_0,
    "generate.n_demos": AT_LEAST_1, "generate.n_machine_demos": AT_LEAST_0, "generate.alpaca_demos": AT_LEAST_1,
    "generate.alpaca_instructions": AT_LEAST_1, "generate.max_instances": AT_LEAST_1,
    "generate.max_tokens": AT_LEAST_0, "generate.instance_max_tokens": AT_LEAST_0,
    "generate.max_seed_chars": AT_LEAST_1, "generate.commit_every": AT_LEAST_1, "generate.commit_ms": AT_LEAST_0,
    "generate.key_attempts": AT_LEAST_1, "generate.max_failed_fraction": FRACTION, "generate.seed": SEED,
    "filter.min_words": AT_LEAST_0, "filter.max_words": AT_LEAST_1, "filter.threshold": FRACTION,
    "filter.top_k": AT_LEAST_0,
    "training.learning_rate": POSITIVE, "training.batch_size": AT_LEAST_1, "training.grad_accum": AT_LEAST_1,
    "training.seed": SEED, "training.lora_r": AT_LEAST_1, "training.lora_alpha": AT_LEAST_1,
    "training.lora_dropout": Range(0, 1, open_hi=True), "training.num_processes": AT_LEAST_0,
    "training.rope_scaling_factor": AT_LEAST_1,
    "trainer.epochs": POSITIVE, "trainer.max_steps": STEPS, "trainer.warmup_ratio": Range(0, 1, open_hi=True),
    "trainer.max_length": Range(8), "trainer.eval_steps": AT_LEAST_1, "trainer.save_steps": AT_LEAST_1,
    "sft.eval_fraction": OPEN_FRACTION,
    "preferences.prompts": AT_LEAST_1, "preferences.k": Range(2), "preferences.temperature": POSITIVE,
    "preferences.top_p": Range(0, 1, open_lo=True), "preferences.max_new_tokens": AT_LEAST_1, "preferences.seed": SEED,
    "preferences.max_field_chars": AT_LEAST_1,
    "reward.eval_fraction": OPEN_FRACTION, "reward.center_rewards_coefficient": AT_LEAST_0,
    "ppo.prompts": AT_LEAST_1, "ppo.total_episodes": AT_LEAST_1, "ppo.num_mini_batches": AT_LEAST_1,
    "ppo.num_ppo_epochs": AT_LEAST_1, "ppo.response_length": AT_LEAST_1, "ppo.temperature": POSITIVE,
    "ppo.kl_coef": AT_LEAST_0, "ppo.cliprange": POSITIVE, "ppo.vf_coef": AT_LEAST_0, "ppo.lam": Range(0, 1),
    "ppo.missing_eos_penalty": AT_LEAST_0, "ppo.value_warmup_updates": AT_LEAST_0, "ppo.max_prompt_length": AT_LEAST_1,
    "ppo.save_every_steps": AT_LEAST_1, "ppo.keep_rounds": AT_LEAST_0,
    "dpo.beta": POSITIVE, "dpo.sft_weight": AT_LEAST_0,
    "grpo.prompts": AT_LEAST_1, "grpo.num_generations": Range(2), "grpo.max_completion_length": AT_LEAST_1,
    "grpo.temperature": POSITIVE, "grpo.beta": AT_LEAST_0, "grpo.epsilon": POSITIVE,
    "grpo.num_iterations": AT_LEAST_1, "grpo.missing_eos_penalty": AT_LEAST_0,
    "evaluate.prompts": AT_LEAST_1, "evaluate.max_new_tokens": AT_LEAST_1, "evaluate.judge_prompts": AT_LEAST_0,
    "evaluate.bootstrap_resamples": Range(100), "evaluate.confidence": OPEN_FRACTION, "evaluate.seed": SEED,
}


def range_key(cls: type, key: str) -> str:
    """Where RANGES lists `key` of section class `cls`: once for a shared training key, else under its section."""
    for shared, prefix in ((TrainingConfig, "training"), (TrainerConfig, "trainer")):
        if issubclass(cls, shared) and key in shared.__dict__.get("__annotations__", {}):
            return f"{prefix}.{key}"
    return f"{cls.SECTION}.{key}"


def range_of(cls: type, key: str) -> Range | None:
    return RANGES.get(range_key(cls, key))


def accelerate_config_file(name: str) -> Path | None:
    """`accelerate_config` as a file: a shipped config (models/accelerate/NAME.yaml) or a path; None if neither."""
    shipped = resources.files("instructflow.models").joinpath("accelerate", f"{name}.yaml")
    path = Path(str(shipped)) if shipped.is_file() else Path(name).expanduser()
    return path if path.is_file() else None


def accelerate_settings(text: str) -> dict:
    """{distributed_type, num_processes, zero_stage, fsdp_sharding_strategy} from an accelerate YAML
    (PyYAML when installed, else a reader of just those keys)."""
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"malformed YAML: {str(exc).splitlines()[0]}") from None
    else:
        doc = _tiny_yaml(text)
    if not isinstance(doc, dict):
        raise ConfigError("an accelerate config must be a YAML mapping")
    deepspeed, fsdp = doc.get("deepspeed_config") or {}, doc.get("fsdp_config") or {}
    return {"distributed_type": str(doc.get("distributed_type") or "NO").upper(),
            "num_processes": _int_or_none(doc.get("num_processes")),
            "zero_stage": _int_or_none(deepspeed.get("zero_stage") if isinstance(deepspeed, dict) else None),
            "fsdp_sharding_strategy": str(fsdp.get("fsdp_sharding_strategy") or "") if isinstance(fsdp, dict) else ""}


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _tiny_yaml(text: str) -> dict:
    """Top-level `key: value` lines and one level of nested mappings: enough for the keys read above."""
    doc: dict = {}
    parent = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip() or ":" not in line:
            continue
        key, _, value = line.strip().partition(":")
        value = value.strip().strip("'\"")
        if raw[0] in " \t" and isinstance(doc.get(parent), dict):
            doc[parent][key] = value
        elif value:
            doc[key], parent = value, None
        else:
            doc[key], parent = {}, key
    return doc


def section_from_dict(label: str, name: str, raw: Any) -> Section:
    """One section from a plain dict (e.g. a launcher's job file), checked as a config file's section is."""
    return _build_section(label, name, SECTION_CLASSES[name], raw)


def load_config(profile: str | None = None, path: str | Path | None = None) -> Config:
    """The profile `profile` (or the default) of the config file `path` (or the usual places), resolved once:
    inheritance merged, teacher env overrides applied, every section built and checked, frozen."""
    label, text = config_path(path)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: malformed TOML: {exc}") from None
    profiles = document.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        raise ConfigError(f"{label}: no [profiles.NAME] tables found")
    unknown_top = set(document) - {"profiles", "default_profile"}
    if unknown_top:
        raise ConfigError(f"{label}: unknown top-level key {sorted(unknown_top)[0]!r} (expected profiles, default_profile)")
    if not label.startswith("<packaged"):
        # a user file is an overlay: packaged profiles stay available (to inherit) and same-named ones merge
        base = tomllib.loads(packaged_text())["profiles"]
        profiles = {name: _deep_merge(base.get(name, {}), body) if isinstance(body, dict) else body
                    for name, body in {**base, **profiles}.items()}
    name = profile or os.environ.get("INSTRUCTFLOW_PROFILE") or document.get("default_profile") or "cpu"
    raw = _with_env_overrides(_resolve_profile(label, profiles, name))
    prefix = f"profiles.{name}"
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            raise ConfigError(f"{label}: {prefix}.{key}: unknown section (known: {', '.join(SECTIONS)}, inherits)")
        if key in LIST_KEYS:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{label}: {prefix}.{key} must be a list of "
                                  f"{'paths' if key == 'seeds' else 'method names'}")
            sections[key] = value
        else:
            sections[key] = _build_section(label, f"{prefix}.{key}", SECTION_CLASSES[key], value)
    try:
        config = Config(profile=name, source=label, **sections)
    except SettingError as exc:
        raise ConfigError(f"{label}: {prefix}.{exc.key} must be {exc.requirement}") from None
    teacher_api_key(config.teacher)  # the key is a secret from now on: whatever this process writes masks it
    return config


def _with_env_overrides(raw: dict) -> dict:
    """The profile's tables with the teacher env overrides applied, before any section is built."""
    teacher = dict(raw.get("teacher") or {})
    for key, env in (("endpoint", "INSTRUCTFLOW_TEACHER_ENDPOINT"), ("model", "INSTRUCTFLOW_TEACHER_MODEL"),
                     ("api", "INSTRUCTFLOW_TEACHER_API")):
        if os.environ.get(env):
            teacher[key] = os.environ[env]
    if teacher.get("api", "chat") not in ("chat", "completions") and os.environ.get("INSTRUCTFLOW_TEACHER_API"):
        raise ConfigError(f"INSTRUCTFLOW_TEACHER_API must be chat or completions, got {teacher['api']!r}")
    return {**raw, "teacher": teacher} if teacher or "teacher" in raw else raw


def teacher_api_key(teacher: TeacherConfig) -> str:
    """The key, from the environment only; 'none' for keyless local endpoints. Remembered as a secret:
    `tasks.secrets.redact` masks it in everything written from now on."""
    key = os.environ.get("INSTRUCTFLOW_TEACHER_API_KEY") or os.environ.get(teacher.api_key_env) or "none"
    remember(key)
    return key


def teacher_endpoint(teacher: TeacherConfig) -> str:
    """The URL requests go to: `teacher.endpoint` holds it with its credentials masked (`tasks/secrets.py`)."""
    return real_endpoint(teacher.endpoint)


def list_profiles(path: str | Path | None = None) -> list[str]:
    label, text = config_path(path)
    names = set(tomllib.loads(text).get("profiles", {}))
    return sorted(names | set(tomllib.loads(packaged_text())["profiles"]))

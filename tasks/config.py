"""Configuration: one TOML file with named profiles, validated into typed sections.

Resolution order for the file: `--config PATH`, `$INSTRUCTFLOW_CONFIG`, `./instructflow.toml`,
then the defaults shipped in the package (`flows/instructflow.toml`). A profile may `inherits`
another; keys are deep-merged. Env overrides for the teacher endpoint: INSTRUCTFLOW_TEACHER_ENDPOINT,
INSTRUCTFLOW_TEACHER_MODEL, INSTRUCTFLOW_TEACHER_API (chat|completions). The API key is never part
of the config: it is read from the env var named by `teacher.api_key_env` (or
INSTRUCTFLOW_TEACHER_API_KEY) only when a client is built, so it cannot reach hashes, DuckDB or logs.
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
from typing import Any, get_origin, get_type_hints

from instructflow.tasks.heuristics import DEFAULT_BLACKLIST

PACKAGED_CONFIG = "instructflow.toml"


class ConfigError(ValueError):
    """One-line configuration error that names the file and the bad key."""


def choice(default: str, *allowed: str):
    return field(default=default, metadata={"choices": allowed})


# Every int/float key has its allowed range in RANGES (after the sections); a new numeric key adds a line there.


@dataclass
class TeacherConfig:
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


@dataclass
class GenerateConfig:
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


@dataclass
class FilterConfig:
    # heuristic filters (applied inline by generate and re-derived by the filter stage)
    blacklist: list = field(default_factory=lambda: list(DEFAULT_BLACKLIST))
    min_words: int = 4                  # fewer words are rejected (the reference rejects <= 3)
    max_words: int = 150                # more words are rejected
    # ROUGE-L near-duplicate filter
    threshold: float = 0.7
    top_k: int = 10
    tokenizer: str = choice("rouge", "rouge", "unicode")
    with_mean: bool = False


@dataclass
class SFTConfig:
    base_model: str = "bundled"         # "bundled", "tiny" (random tiny Llama, tests), or a local HF dir
    style: str = choice("alpaca", "alpaca", "chat")
    include_seed_instances: bool = True
    eval_fraction: float = 0.1
    max_length: int = 512
    packing: bool = False
    # batches of examples of similar length (HF's LengthGroupedSampler): less padding, so fewer tokens
    # computed per step; the order stays seeded and random across groups
    group_by_length: bool = True
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-5
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    lr_scheduler: str = choice("cosine", "cosine", "linear", "constant", "constant_with_warmup")
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    qlora: bool = False
    gradient_checkpointing: bool = False
    precision: str = choice("auto", "auto", "fp32", "bf16", "fp16")
    eval_steps: int = 50
    save_steps: int = 50
    seed: int = 42
    # "inprocess": the flow calls the recipe; "accelerate": `accelerate launch` runs it (several GPUs)
    launcher: str = choice("inprocess", "inprocess", "accelerate")
    accelerate_config: str = "ddp"      # ddp | deepspeed_zero2 | deepspeed_zero3 (shipped) or a YAML path
    num_processes: int = 0              # 0 = what the accelerate config says


@dataclass
class PreferencesConfig:
    prompts: int = 24                   # prompts to sample responses for
    k: int = 2                          # responses per prompt (>= 2)
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 96
    prompt_source: str = choice("eval", "eval", "all")  # "eval": held out from SFT training
    import_files: list = field(default_factory=list)   # JSONL preference files to import
    seed: int = 42


@dataclass
class RewardConfig:
    eval_fraction: float = 0.2
    max_length: int = 512
    group_by_length: bool = True        # as sft.group_by_length; a pair's length is its longer side
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 1e-5
    batch_size: int = 4
    grad_accum: int = 1
    center_rewards_coefficient: float = 0.01
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    gradient_checkpointing: bool = False
    precision: str = choice("auto", "auto", "fp32", "bf16", "fp16")
    eval_steps: int = 50
    save_steps: int = 50
    seed: int = 42


@dataclass
class PPOConfig:
    prompts: int = 64
    prompt_source: str = choice("eval", "eval", "all")
    total_episodes: int = 64
    batch_size: int = 8
    grad_accum: int = 1
    num_mini_batches: int = 1
    num_ppo_epochs: int = 4
    learning_rate: float = 3e-6
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
    lora: bool = False                  # LoRA on actor and critic (rank lora_r, all linear layers)
    lora_r: int = 16
    lora_alpha: int = 32
    gradient_checkpointing: bool = False
    precision: str = choice("auto", "auto", "fp32", "bf16")   # the PPO loop has no fp16 loss scaling
    seed: int = 42


@dataclass
class EvaluateConfig:
    prompts: int = 16
    max_new_tokens: int = 64
    judge: bool = True
    # a second reward model, trained (with the `reward` settings) on the reward stage's eval pairs only,
    # which PPO's reward model never trained on: scores SFT and PPO too, a check for reward hacking
    holdout_reward: bool = False
    seed: int = 7


@dataclass
class Config:
    profile: str
    source: str                          # the file the profile came from
    seeds: list = field(default_factory=lambda: ["bundled"])   # files/dirs; "bundled" = the package's seeds/
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preferences: PreferencesConfig = field(default_factory=PreferencesConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def section_hash(self, *names: str) -> str:
        """Hash of the named sections (what a stage's output depends on). Never contains secrets."""
        payload = {n: dataclasses.asdict(getattr(self, n)) if n != "seeds" else self.seeds for n in names}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name not in ("profile", "source")}
SECTION_OF = {type(f.default_factory()): name for name, f in SECTIONS.items() if name != "seeds"}


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
            return str(path), path.read_text(encoding="utf-8")
        if i < 2:  # an explicitly named file that does not exist is an error, the cwd default is not
            raise ConfigError(f"{path}: config file not found")
    return f"<packaged {PACKAGED_CONFIG}>", packaged_text()


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


def _coerce(label: str, where: str, value: Any, annotation: Any) -> Any:
    origin = get_origin(annotation) or annotation
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[origin](value)
    if not ok:
        raise ConfigError(f"{label}: {where} must be {origin.__name__}, got {type(value).__name__} {value!r}")
    if origin is float:
        value = float(value)
    return value  # choices and ranges: check_section, once the section is built


# Keys that once existed: a user file that still sets one gets a line saying what to do instead.
REMOVED_KEYS = {
    "generate.requests_per_round": "removed (the streaming scheduler has no rounds: it keeps teacher.max_concurrency "
                                   "requests in flight); delete this line",
}


def _build_section(label: str, prefix: str, cls: type, raw: Any):
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: {prefix} must be a table")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    section = prefix.rsplit(".", 1)[-1]
    for key, value in raw.items():
        if f"{section}.{key}" in REMOVED_KEYS:
            raise ConfigError(f"{label}: {prefix}.{key}: {REMOVED_KEYS[f'{section}.{key}']}")
        if key not in fields:
            near = [n for n in fields if n.startswith(key[:3])]
            hint = f" (did you mean {near[0]}?)" if near else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{label}: {prefix}.{key}: unknown key{hint}")
        values[key] = _coerce(label, f"{prefix}.{key}", value, hints[key])
    return cls(**values)


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

# The documented range of every numeric key (README "Configuration" lists the same), checked at load.
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
    "sft.eval_fraction": OPEN_FRACTION, "sft.max_length": Range(8), "sft.epochs": POSITIVE, "sft.max_steps": STEPS,
    "sft.learning_rate": POSITIVE, "sft.batch_size": AT_LEAST_1, "sft.grad_accum": AT_LEAST_1,
    "sft.warmup_ratio": Range(0, 1, open_hi=True), "sft.lora_r": AT_LEAST_1, "sft.lora_alpha": AT_LEAST_1,
    "sft.eval_steps": AT_LEAST_1, "sft.save_steps": AT_LEAST_1, "sft.seed": SEED, "sft.num_processes": AT_LEAST_0,
    "preferences.prompts": AT_LEAST_1, "preferences.k": Range(2), "preferences.temperature": POSITIVE,
    "preferences.top_p": Range(0, 1, open_lo=True), "preferences.max_new_tokens": AT_LEAST_1, "preferences.seed": SEED,
    "reward.eval_fraction": OPEN_FRACTION, "reward.max_length": AT_LEAST_1, "reward.epochs": POSITIVE,
    "reward.max_steps": STEPS, "reward.learning_rate": POSITIVE, "reward.batch_size": AT_LEAST_1,
    "reward.grad_accum": AT_LEAST_1, "reward.center_rewards_coefficient": AT_LEAST_0, "reward.eval_steps": AT_LEAST_1,
    "reward.save_steps": AT_LEAST_1, "reward.seed": SEED, "reward.lora_r": AT_LEAST_1, "reward.lora_alpha": AT_LEAST_1,
    "ppo.prompts": AT_LEAST_1, "ppo.total_episodes": AT_LEAST_1, "ppo.batch_size": AT_LEAST_1,
    "ppo.grad_accum": AT_LEAST_1, "ppo.num_mini_batches": AT_LEAST_1, "ppo.num_ppo_epochs": AT_LEAST_1,
    "ppo.learning_rate": POSITIVE, "ppo.response_length": AT_LEAST_1, "ppo.temperature": POSITIVE,
    "ppo.kl_coef": AT_LEAST_0, "ppo.cliprange": POSITIVE, "ppo.vf_coef": AT_LEAST_0, "ppo.lam": Range(0, 1),
    "ppo.missing_eos_penalty": AT_LEAST_0, "ppo.value_warmup_updates": AT_LEAST_0, "ppo.max_prompt_length": AT_LEAST_1,
    "ppo.save_every_steps": AT_LEAST_1,
    "ppo.keep_rounds": AT_LEAST_0, "ppo.seed": SEED, "ppo.lora_r": AT_LEAST_1, "ppo.lora_alpha": AT_LEAST_1,
    "evaluate.prompts": AT_LEAST_1, "evaluate.max_new_tokens": AT_LEAST_1, "evaluate.seed": SEED,
}


def accelerate_config_file(name: str) -> Path | None:
    """`sft.accelerate_config` as a file: a shipped config (models/accelerate/NAME.yaml) or a path; None if neither."""
    shipped = resources.files("instructflow.models").joinpath("accelerate", f"{name}.yaml")
    path = Path(str(shipped)) if shipped.is_file() else Path(name).expanduser()
    return path if path.is_file() else None


def _cross_key_rules(name: str, section: Any) -> list[tuple[str, bool, str]]:
    """(key, ok, what it must be) for keys whose range depends on another key of the same section."""
    if name == "teacher":  # refused at load, not after preferences sampled for minutes
        return [("mode", section.mode != "batch" or section.endpoint != "embedded",
                 "'sync' with teacher.endpoint = 'embedded' (transformers serve has no Batch API): point "
                 "teacher.endpoint at one that has, e.g. https://api.openai.com/v1")]
    if name == "generate":
        return [("n_machine_demos", section.n_machine_demos <= section.n_demos, "<= generate.n_demos")]
    if name == "filter":
        return [("max_words", section.max_words >= section.min_words, ">= filter.min_words")]
    if name == "sft":
        found = section.launcher != "accelerate" or accelerate_config_file(section.accelerate_config) is not None
        return [("accelerate_config", found,
                 f"a shipped accelerate config (ddp, deepspeed_zero2, deepspeed_zero3) or a YAML file, "
                 f"got {section.accelerate_config!r}")]
    if name == "ppo":  # what the PPO loop would otherwise refuse only after SFT and reward have trained
        rollout_batch = section.batch_size * section.grad_accum
        return [("total_episodes", section.total_episodes % rollout_batch == 0,
                 f"a multiple of ppo.batch_size * ppo.grad_accum (= {rollout_batch}), got {section.total_episodes}"),
                ("num_mini_batches", rollout_batch % section.num_mini_batches == 0,
                 f"a divisor of ppo.batch_size * ppo.grad_accum (= {rollout_batch}), got {section.num_mini_batches}"),
                ("value_warmup_updates", section.value_warmup_updates < section.total_episodes // rollout_batch,
                 f"fewer than the run's {section.total_episodes // rollout_batch} updates (ppo.total_episodes / "
                 f"{rollout_batch}) so that the policy trains at all, got {section.value_warmup_updates}")]
    return []


def check_section(label: str, section: Any, prefix: str | None = None) -> None:
    """Every value of one section a stage would refuse: choices, RANGES, cross-key rules. Runs for every
    section when the config loads (`prefix` = profiles.NAME.SECTION); the recipes in models/ run it again
    on a section built by hand (tests, benches), so the rule lives here only. What depends on the machine
    (fp16 and qlora need CUDA) is checked by the recipe, where the machine is known."""
    name = SECTION_OF[type(section)]
    prefix = prefix or name
    hints = get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, where = getattr(section, f.name), f"{prefix}.{f.name}"
        _coerce(label, where, value, hints[f.name])
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{label}: {where} must be one of {', '.join(choices)}, got {value!r}")
        allowed = RANGES.get(f"{name}.{f.name}")
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{label}: {where} must be {allowed}, got {value!r}")
    for key, ok, what in _cross_key_rules(name, section):
        if not ok:
            raise ConfigError(f"{label}: {prefix}.{key} must be {what}")


def section_from_dict(label: str, name: str, raw: Any):
    """One section from a plain dict (e.g. the SFT job file), checked as a config file's section is."""
    section = _build_section(label, name, type(SECTIONS[name].default_factory()), raw)
    check_section(label, section)
    return section


def load_config(profile: str | None = None, path: str | Path | None = None) -> Config:
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
    raw = _resolve_profile(label, profiles, name)
    prefix = f"profiles.{name}"
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            raise ConfigError(f"{label}: {prefix}.{key}: unknown section (known: {', '.join(SECTIONS)}, inherits)")
        if key == "seeds":
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{label}: {prefix}.seeds must be a list of paths")
            sections[key] = value
        else:
            sections[key] = _build_section(label, f"{prefix}.{key}", SECTIONS[key].default_factory().__class__, value)
    cfg = Config(profile=name, source=label, **sections)
    _apply_env_overrides(cfg)
    for key in SECTION_OF.values():
        check_section(label, getattr(cfg, key), f"{prefix}.{key}")
    return cfg


def _apply_env_overrides(cfg: Config) -> None:
    endpoint = os.environ.get("INSTRUCTFLOW_TEACHER_ENDPOINT")
    if endpoint:
        cfg.teacher.endpoint = endpoint
    model = os.environ.get("INSTRUCTFLOW_TEACHER_MODEL")
    if model:
        cfg.teacher.model = model
    api = os.environ.get("INSTRUCTFLOW_TEACHER_API")
    if api:
        if api not in ("chat", "completions"):
            raise ConfigError(f"INSTRUCTFLOW_TEACHER_API must be chat or completions, got {api!r}")
        cfg.teacher.api = api


def teacher_api_key(teacher: TeacherConfig) -> str:
    """The key, from the environment only; 'none' for keyless local endpoints."""
    return os.environ.get("INSTRUCTFLOW_TEACHER_API_KEY") or os.environ.get(teacher.api_key_env) or "none"


def list_profiles(path: str | Path | None = None) -> list[str]:
    label, text = config_path(path)
    names = set(tomllib.loads(text).get("profiles", {}))
    return sorted(names | set(tomllib.loads(packaged_text())["profiles"]))

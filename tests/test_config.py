"""Profiles, inheritance, validation errors that name the key, env overrides, secrets kept out."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cliutil import cli
from instructflow.tasks.config import (RANGES, SECTION_CLASSES, TRAINING_SECTIONS, ConfigError, PPOConfig, RewardConfig,
                                       SFTConfig, TrainerConfig, TrainingConfig, list_profiles, load_config, range_key,
                                       teacher_api_key)


def write(tmp_path, text):
    path = tmp_path / "instructflow.toml"
    path.write_text(text)
    return path


def test_packaged_profiles_load_and_tiny_inherits_cpu():
    assert {"cpu", "tiny", "gpu"} <= set(list_profiles())
    cpu, tiny = load_config("cpu"), load_config("tiny")
    assert load_config().profile == "cpu"
    assert tiny.sft.base_model == "tiny" and cpu.sft.base_model == "bundled"
    assert tiny.filter.threshold == cpu.filter.threshold == 0.7   # inherited
    assert tiny.section_hash("sft") != cpu.section_hash("sft")
    assert cpu.section_hash("filter") == tiny.section_hash("filter")


@pytest.mark.parametrize("body, message", [
    ("[profiles.a.sft]\nlearning_rat = 1.0\n", "profiles.a.sft.learning_rat: unknown key (did you mean learning_rate?)"),
    ("[profiles.a.filter]\nthreshold = 'high'\n", "profiles.a.filter.threshold must be float"),
    ("[profiles.a.filter]\nthreshold = 1.5\n", "profiles.a.filter.threshold must be between 0 and 1"),
    ("[profiles.a.teacher]\napi = 'grpc'\n", "profiles.a.teacher.api must be one of chat, completions"),
    ("[profiles.a.sft]\nmax_steps = -5\n", "profiles.a.sft.max_steps must be -1 or >= 1, got -5"),
    ("[profiles.a.reward]\nmax_steps = 0\n", "profiles.a.reward.max_steps must be -1 or >= 1, got 0"),
    ("[profiles.a.teacher]\ntimeout_s = 0\n", "profiles.a.teacher.timeout_s must be > 0, got 0.0"),
    ("[profiles.a.preferences]\ntop_p = 0\n", "profiles.a.preferences.top_p must be > 0 and <= 1, got 0.0"),
    ("[profiles.a.generate]\nmax_seed_chars = 0\n", "profiles.a.generate.max_seed_chars must be >= 1, got 0"),
    ("[profiles.a.preferences]\nmax_field_chars = 0\n", "profiles.a.preferences.max_field_chars must be >= 1, got 0"),
    ("[profiles.a.generate]\nrequests_per_round = 4\n",
     "profiles.a.generate.requests_per_round: removed (the streaming scheduler has no rounds"),
    ("[profiles.a.sft]\nseed = -1\n", "profiles.a.sft.seed must be between 0 and 4294967295, got -1"),
    ("[profiles.a.ppo]\nprecision = 'fp16'\n", "profiles.a.ppo.precision must be one of auto, fp32, bf16"),
    ("[profiles.a.sft]\nmax_length = 4\n", "profiles.a.sft.max_length must be >= 8, got 4"),
    ("[profiles.a.sft]\nlauncher = 'accelerate'\naccelerate_config = 'nope'\n",
     "profiles.a.sft.accelerate_config must be a shipped accelerate config (ddp, fsdp, deepspeed_zero2, "
     "deepspeed_zero3) or a YAML file, got 'nope'"),
    ("[profiles.a.ppo]\nlauncher = 'accelerate'\naccelerate_config = 'deepspeed_zero3'\n",
     "profiles.a.ppo.accelerate_config must be a config whose distributed_type is NO or MULTI_CPU or MULTI_GPU for "
     "the ppo stage (data parallel only: "),
    ("[profiles.a.grpo]\nlauncher = 'accelerate'\naccelerate_config = 'fsdp'\nnum_processes = -1\n",
     "profiles.a.grpo.num_processes must be >= 0, got -1"),
    ("[profiles.a.sft]\nlr_scheduler = 'cosin'\n", "profiles.a.sft.lr_scheduler must be one of cosine, linear"),
    ("[profiles.a.ppo]\nbatch_size = 4\nnum_mini_batches = 3\ntotal_episodes = 8\n",
     "profiles.a.ppo.num_mini_batches must be a divisor of ppo.batch_size * ppo.grad_accum"),
    ("[profiles.a.ppo]\nbatch_size = 4\ntotal_episodes = 8\nvalue_warmup_updates = 2\n",
     "profiles.a.ppo.value_warmup_updates must be fewer than the run's 2 updates"),
    ("[profiles.a.filter]\nmin_words = 10\nmax_words = 5\n", "profiles.a.filter.max_words must be >= filter.min_words"),
    ("[profiles.a.sftt]\nx = 1\n", "profiles.a.sftt: unknown section"),
    ("[profiles.a]\ninherits = 'b'\n[profiles.b]\ninherits = 'a'\n", "forms a cycle"),
    ("[profiles.a\n", "malformed TOML"),
])
def test_bad_config_names_file_and_key(tmp_path, body, message):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_config("a", path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_a_section_built_by_hand_meets_the_same_rules_as_a_loaded_one():
    """A section checks itself when it is built, by the loader or by hand (tests, benches, a job file), so the
    recipes in models/ trust the section they get."""
    with pytest.raises(ConfigError, match=r"^settings: ppo\.total_episodes must be a multiple of "
                                          r"ppo\.batch_size \* ppo\.grad_accum \(= 8\), got 10$"):
        PPOConfig(total_episodes=10)
    with pytest.raises(ConfigError, match=r"^settings: ppo\.precision must be one of auto, fp32, bf16 "):
        PPOConfig(precision="fp16")
    with pytest.raises(ConfigError, match=r"^settings: sft\.learning_rate must be float, got str '1e-5'$"):
        SFTConfig(learning_rate="1e-5")
    cfg = load_config("cpu")
    with pytest.raises(ConfigError, match=r"^settings: ppo\.batch_size must be >= 1, got 0$"):
        cfg.replace(ppo={"batch_size": 0})
    assert cfg.replace(ppo={"learning_rate": 1}).ppo.learning_rate == 1.0 and cfg.ppo.learning_rate != 1.0


def test_a_resolved_config_is_frozen():
    import dataclasses

    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sft.learning_rate = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sft = cfg.reward


def test_every_training_section_shares_one_shape_with_one_range_per_shared_key():
    """The drift the shared shape fixed: max_length was >= 8 for sft but >= 1 for reward, and only sft had
    a configurable schedule. Now each shared key is declared once and ranged once."""
    assert set(TRAINING_SECTIONS) >= {"sft", "reward", "ppo"}
    shared = {f.name for f in __import__("dataclasses").fields(TrainingConfig)}
    trainer = {f.name for f in __import__("dataclasses").fields(TrainerConfig)} - shared
    for name in TRAINING_SECTIONS:
        cls = SECTION_CLASSES[name]
        assert shared <= set(cls.__dataclass_fields__), name
        assert all(range_key(cls, key).startswith("training.") for key in shared if range_key(cls, key) in RANGES)
        if issubclass(cls, TrainerConfig):
            assert trainer <= set(cls.__dataclass_fields__)
            assert {range_key(cls, key) for key in trainer} <= set(RANGES) | {"trainer.lr_scheduler",
                                                                             "trainer.group_by_length"}
    for cls in (SFTConfig, RewardConfig):
        with pytest.raises(ConfigError, match=rf"^settings: {cls.SECTION}\.max_length must be >= 8, got 4$"):
            cls(max_length=4)
        assert cls(lr_scheduler="linear", warmup_ratio=0.1).lr_scheduler == "linear"


def test_the_readme_ppo_sweep_file_loads_and_its_default_row_is_the_cpu_profile():
    """bench/ppo_sweep.toml reproduces the sweep tables in bench/ppo_sweep.md (the README points there); its
    bold row must stay the shipped default."""
    path = Path(__file__).resolve().parents[1] / "bench" / "ppo_sweep.toml"
    rows = [name for name in list_profiles(path) if name.startswith("sweep-")]
    sweep = (path.parent / "ppo_sweep.md").read_text()
    assert len(rows) >= 6 and all(f"`{name}`" in sweep for name in rows), rows
    for name in rows:
        assert load_config(name, path).evaluate.judge is False
    cpu, row = vars(load_config("cpu").ppo), vars(load_config("sweep-cpu", path).ppo)
    assert {key for key in cpu if cpu[key] != row[key]} == {"save_every_steps"}


def test_unknown_profile_lists_known(tmp_path):
    path = write(tmp_path, "[profiles.x]\n[profiles.y]\n")
    with pytest.raises(ConfigError, match=r"unknown profile 'z' \(profiles: cpu, gpu, tiny, x, y\)"):
        load_config("z", path)


def test_user_file_overlays_packaged_profiles(tmp_path):
    path = write(tmp_path, "[profiles.mine]\ninherits = 'tiny'\n[profiles.mine.generate]\ntarget_kept = 99\n"
                           "[profiles.cpu.filter]\nthreshold = 0.5\n")
    mine = load_config("mine", path)
    assert mine.generate.target_kept == 99 and mine.sft.base_model == "tiny"
    cpu = load_config("cpu", path)
    assert cpu.filter.threshold == 0.5 and cpu.sft.max_steps == load_config("cpu").sft.max_steps


def test_env_overrides_and_key_never_in_config(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTFLOW_TEACHER_ENDPOINT", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("INSTRUCTFLOW_TEACHER_MODEL", "gpt-4o-mini")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET123")
    cfg = load_config("cpu")
    assert cfg.teacher.endpoint == "http://127.0.0.1:9/v1" and cfg.teacher.model == "gpt-4o-mini"
    assert teacher_api_key(cfg.teacher) == "sk-test-SECRET123"
    assert "SECRET123" not in repr(cfg)
    monkeypatch.setenv("INSTRUCTFLOW_TEACHER_API", "grpc")
    with pytest.raises(ConfigError, match="INSTRUCTFLOW_TEACHER_API"):
        load_config("cpu")


def test_missing_explicit_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("cpu", tmp_path / "nope.toml")


def test_every_numeric_key_has_a_range_and_every_profile_is_inside():
    numeric = {range_key(cls, f.name) for cls in SECTION_CLASSES.values()
               for f in dataclasses.fields(cls) if f.type in ("int", "float", int, float)}
    assert numeric - set(RANGES) == set(), "numeric keys without a range in tasks/config.py RANGES"
    assert set(RANGES) - numeric == set(), "RANGES names keys that do not exist"
    for profile in list_profiles():
        cfg = load_config(profile)
        for name, cls in SECTION_CLASSES.items():
            for f in dataclasses.fields(cls):
                allowed = RANGES.get(range_key(cls, f.name))
                assert allowed is None or getattr(getattr(cfg, name), f.name) in allowed, (profile, name, f.name)


def test_readme_documents_every_range():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = {line.split("`")[1]: line for line in readme.splitlines() if line.startswith("- `") and "`: `" in line}
    missing = [f"{where}: {allowed}" for where, allowed in RANGES.items()
               if f"`{where.split('.')[1]}` {allowed}" not in lines.get(where.split(".")[0], "")]
    assert "training" in lines and "trainer" in lines, "the shared training keys have a line of their own"
    assert not missing, f"README's range list lacks: {missing}"


@pytest.mark.slow
def test_negative_max_steps_refused_by_the_cli_in_one_line(tmp_path):
    path = write(tmp_path, "[profiles.a]\ninherits = 'tiny'\n[profiles.a.sft]\nmax_steps = -5\n")
    home = tmp_path / "home"
    out = cli("run", "--profile", "a", "--config", str(path), home=home, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [f"error: {path}: profiles.a.sft.max_steps must be -1 or >= 1, got -5"]
    assert not (home / "warehouse.duckdb").exists()   # refused before anything was touched


# --- the configuration reference in the README ------------------------------------------------------
REFERENCE_PROFILES = ("cpu", "tiny", "gpu")


def shown(value) -> str:
    """A value as the README's reference table writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    if isinstance(value, (list, dict)):
        return json.dumps(value) if len(json.dumps(value)) <= 40 else f"({len(value)} entries)"
    return repr(value) if isinstance(value, float) else str(value)


def reference_rows() -> dict[tuple[str, str], list[str]]:
    """(section, key) -> [value in cpu, tiny, gpu, range] for every key of every profile: one row per key;
    a key every training section shares is one row of section `training` (or `trainer`), its value per section."""
    profiles = {name: load_config(name) for name in REFERENCE_PROFILES}
    rows: dict[tuple[str, str], list[str]] = {}
    for key in ("seeds", "methods"):
        rows[("profile", key)] = [shown(getattr(profiles[p], key)) for p in REFERENCE_PROFILES] + [""]
    for section, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            where = range_key(cls, f.name)
            group = where.split(".")[0]
            allowed = RANGES.get(where)
            choices = f.metadata.get("choices")
            limit = str(allowed) if allowed else ("one of " + ", ".join(choices) if choices else "")
            if group in ("training", "trainer"):
                base = TrainingConfig if group == "training" else TrainerConfig
                owners = [s for s, c in SECTION_CLASSES.items() if issubclass(c, base)]
                cells = []
                for p in REFERENCE_PROFILES:
                    values = {s: shown(getattr(getattr(profiles[p], s), f.name)) for s in owners}
                    cells.append(next(iter(values.values())) if len(set(values.values())) == 1 else
                                 " · ".join(f"{s} {v}" for s, v in values.items()))
                rows[(group, f.name)] = cells + [limit]
            else:
                rows[(section, f.name)] = [shown(getattr(getattr(profiles[p], section), f.name))
                                           for p in REFERENCE_PROFILES] + [limit]
    return rows


def readme_reference() -> dict[tuple[str, str], list[str]]:
    """The rows of the README's table `| section | key | cpu | tiny | gpu | range | meaning |`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1].startswith("`") and cells[0].strip("`") in SECTION_CLASSES.keys() | {
                "profile", "training", "trainer"}:
            found[(cells[0].strip("`"), cells[1].strip("`"))] = cells[2:6]
    return found


def test_the_readme_configuration_reference_is_the_shipped_profiles():
    """Every key with its value in each shipped profile and its range, as the config loads them: the table
    cannot drift from flows/instructflow.toml and tasks/config.py (the failure shows the rows to paste)."""
    expected, found = reference_rows(), readme_reference()
    wrong = {k: v for k, v in expected.items() if found.get(k) != v}
    extra = set(found) - set(expected)
    table = "\n".join(f"| `{s}` | `{k}` | " + " | ".join(v[:3]) + f" | {v[3]} | |" for (s, k), v in wrong.items())
    assert not wrong and not extra, f"README reference rows to fix:\n{table}\nrows for keys that do not exist: {extra}"

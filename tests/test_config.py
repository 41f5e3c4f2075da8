"""Profiles, inheritance, validation errors that name the key, env overrides, secrets kept out."""
from __future__ import annotations

import pytest

from instructflow.tasks.config import ConfigError, list_profiles, load_config, teacher_api_key


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

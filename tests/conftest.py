"""Test environment: offline, quiet, isolated Prefect home, one real Prefect API for the session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before anything imports prefect or transformers.
_PREFECT_HOME = tempfile.mkdtemp(prefix="instructflow-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)  # a developer's .env must not hijack the tests
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
for key in ("INSTRUCTFLOW_HOME", "INSTRUCTFLOW_CONFIG", "INSTRUCTFLOW_PROFILE", "INSTRUCTFLOW_TEACHER_ENDPOINT",
            "INSTRUCTFLOW_TEACHER_MODEL", "INSTRUCTFLOW_TEACHER_API", "INSTRUCTFLOW_TEACHER_API_KEY"):
    os.environ.pop(key, None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api():
    """A real temporary Prefect API (SQLite) for the whole session; heartbeats off (~1 s per flow otherwise)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


@pytest.fixture
def home(tmp_path: Path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("INSTRUCTFLOW_HOME", str(path))
    yield path
    from instructflow.flows.common import close_warehouses

    close_warehouses()  # release the DuckDB lock held by in-process flow runs


@pytest.fixture
def seeded_home(tmp_path: Path, monkeypatch, prefect_api):
    """(home, config, seeds): a tiny-profile project whose seed file is a copy the test may edit."""
    import shutil

    from instructflow.flows.common import close_warehouses, data_home
    from instructflow.tasks.seeds import bundled_seed_dir

    seeds = tmp_path / "seeds.jsonl"
    shutil.copy(bundled_seed_dir() / "seed_tasks.jsonl", seeds)
    config = tmp_path / "instructflow.toml"
    config.write_text(f"[profiles.t]\ninherits = 'tiny'\nseeds = ['{seeds}']\n")
    home = data_home(tmp_path / "home")
    monkeypatch.setenv("INSTRUCTFLOW_HOME", str(home))
    yield home, config, seeds
    close_warehouses()

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
# Under `make test` each xdist worker (and every server or CLI it starts) would run torch with one thread
# per core, so two workers on two cores oversubscribe them; a core's share each is faster for tiny models
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
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


# The files that take longest go first (measured, README "Development"): `make test` hands whole files to two
# workers in collection order (--no-loadscope-reorder), so a long file started last would run alone.
LONGEST_FILES_FIRST = ("test_generate_stage.py", "test_pipeline.py", "test_reliability.py", "test_batch_mode.py",
                       "test_schedules.py", "test_launch.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest keep their order

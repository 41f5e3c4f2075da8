"""Run the installed `instructflow` entry point the way a user does."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def exe() -> str:
    return shutil.which("instructflow") or str(Path(sys.executable).parent / "instructflow")


def cli_env(home: Path | None = None, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("PREFECT_HOME", None)  # each home gets its own Prefect database, as for a user
    if home is not None:
        env["INSTRUCTFLOW_HOME"] = str(home)
    env.update(extra)
    return env


def cli(*args: str, home: Path | None = None, cwd: Path | None = None, timeout: int = 300,
        **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe(), *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(home, **env), cwd=cwd)


def cli_popen(*args: str, home: Path | None = None, cwd: Path | None = None, **env: str) -> subprocess.Popen:
    return subprocess.Popen([exe(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=cli_env(home, **env), cwd=cwd)


def query(home: Path, sql: str, params=()):
    """Rows from the home's warehouse, read-only (the CLI process may hold it next)."""
    import duckdb

    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def shared_api() -> dict:
    """The session's Prefect API (the `prefect_api` fixture) for commands whose ephemeral start is not
    what is tested (~20 s each)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}

"""Benchmark: the generate stage at scale against a fast loopback endpoint, vs the bare client floor.

    python bench/generate_scale.py [--kept N] [--concurrency C] [--floor-runs K]

1. Starts bench/load_server.py, an OpenAI-compatible server that answers the recipes' prompts at
   once, so the teacher is never the bottleneck.
2. Runs the real stage, `instructflow stage generate`, on a fresh data home with the reference
   self-instruct recipe (instances on), target_kept = N, max_concurrency = C.
3. The floor: the same requests (the stored prompts and params, same mix, same order) at the same
   concurrency through the bare `openai` async client, with no parsing or storage; best of K runs
   (default 2), so a noisy shared machine errs against the stage, not for it.

The last line printed is one JSON object:
  kept, requests                 kept instructions and teacher requests the stage stored
  stage_s                        the stage's own wall time (stage_runs.seconds: after Prefect is up)
  cli_s                          the whole command, Prefect start included
  requests_per_s                 requests / stage_s
  floor_requests_per_s           the bare client's rate on the same requests
  ratio_to_floor                 requests_per_s / floor_requests_per_s
  peak_rss_mb                    peak resident memory of the stage's process (VmHWM)
  stage_cpu_ms_per_request       CPU of the stage's process per request (stage metric cpu_ms_per_request)
  floor_cpu_ms_per_request       CPU of the bare client per request, same requests
  cpu_ratio_to_floor             floor_cpu / stage_cpu: the rate ratio when both are CPU-bound; unlike the
                                 wall-clock ratio it barely moves when other work shares the machine
  load_avg                       1-minute load average before the stage and after the floor (on 2 cores,
                                 above ~1.5 means other processes took CPU from the measured ones)
  mix                            requests by purpose
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent


def start_load_server() -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "load_server.py")], stdout=subprocess.PIPE,
                              text=True)
    line = server.stdout.readline()
    if not line.startswith("port "):
        server.kill()
        raise SystemExit(f"load server did not start: {line!r}")
    return server, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_stage(home: Path, config: Path) -> tuple[float, float]:
    """(command seconds, peak RSS MB) of `instructflow stage generate`; its progress goes to stderr."""
    cli = Path(sys.executable).parent / "instructflow"
    env = dict(os.environ, INSTRUCTFLOW_HOME=str(home))
    started = time.monotonic()
    proc = subprocess.Popen([str(cli), "stage", "generate", "--profile", "bench", "--config", str(config)],
                            env=env, stdout=sys.stderr)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"stage generate failed with exit code {proc.returncode}")
    return time.monotonic() - started, peak


async def floor(base_url: str, requests: list[tuple[str, dict]], concurrency: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) for the bare openai client to send `requests` at `concurrency`, nothing else."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(prompt: str, params: dict) -> None:
        async with semaphore:
            await client.chat.completions.create(model="bench-teacher", messages=[{"role": "user", "content": prompt}],
                                                 **params)

    started, cpu_started = time.monotonic(), time.process_time()
    await asyncio.gather(*(one(p, params) for p, params in requests))
    seconds, cpu_s = time.monotonic() - started, time.process_time() - cpu_started
    await client.close()
    return seconds, cpu_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kept", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--floor-runs", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    server, base_url = start_load_server()
    try:
        with tempfile.TemporaryDirectory(prefix="generate-scale-") as tmp:
            home, config = Path(tmp) / "home", Path(tmp) / "bench.toml"
            config.write_text(f"""[profiles.bench]
inherits = "cpu"
[profiles.bench.teacher]
endpoint = "{base_url}"
model = "bench-teacher"
max_concurrency = {args.concurrency}
max_retries = 2
timeout_s = 60
[profiles.bench.generate]
instance_prompt = "reference"
target_kept = {args.kept}
max_requests = {args.kept}
max_tokens = 0
instance_max_tokens = 0
""")
            cli_s, rss = run_stage(home, config)
            con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
            stage_s, metrics = con.execute("SELECT seconds, metrics FROM stage_runs WHERE stage = 'generate' "
                                           "AND status = 'success' ORDER BY started_at DESC LIMIT 1").fetchone()
            kept = con.execute("SELECT count(*) FROM candidates WHERE verdict = 'kept'").fetchone()[0]
            stored = con.execute("SELECT prompt, params, purpose FROM teacher_requests ORDER BY created_at").fetchall()
            con.close()
        mix: dict[str, int] = {}
        for _, _, purpose in stored:
            mix[purpose] = mix.get(purpose, 0) + 1
        sends = [(p, json.loads(params)) for p, params, _ in stored]
        floor_s, floor_cpu_s = min(asyncio.run(floor(base_url, sends, args.concurrency))
                                   for _ in range(max(1, args.floor_runs)))
    finally:
        server.terminate()
        server.wait(timeout=10)
    rate, floor_rate = len(stored) / stage_s, len(stored) / floor_s
    stage_cpu_ms, floor_cpu_ms = json.loads(metrics)["cpu_ms_per_request"], 1000 * floor_cpu_s / len(stored)
    print(json.dumps({"kept": kept, "requests": len(stored), "stage_s": round(stage_s, 2), "cli_s": round(cli_s, 2),
                      "requests_per_s": round(rate, 1), "floor_requests_per_s": round(floor_rate, 1),
                      "ratio_to_floor": round(rate / floor_rate, 3), "peak_rss_mb": round(rss, 1),
                      "stage_cpu_ms_per_request": round(stage_cpu_ms, 2), "floor_cpu_ms_per_request": round(floor_cpu_ms, 2),
                      "cpu_ratio_to_floor": round(floor_cpu_ms / stage_cpu_ms, 3),
                      "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)], "mix": mix}))


if __name__ == "__main__":
    main()

"""Benchmark: the embedded teacher (`transformers serve`) with and without continuous batching, one run.

    python bench/teacher_throughput.py [--model bundled|tiny|DIR] [--concurrency 8] [--max-tokens 64]
                                       [--rounds 2] [--single] [--sequential-threads N]

The script starts one server per mode the way the embedded teacher does (models/teacher_server.py,
so the CPU `--cb-*` caps and one-thread cap are the ones a pipeline run gets) and sends each an untimed warm-up request.
A burst is `--concurrency` chat requests at once (different prompts, so no shared prefix helps either
mode) of at most `--max-tokens` completion tokens each; its figure is completion tokens (the server's
usage counts) over the wall time from the first request sent to the last reply received. Bursts
alternate between the two servers for `--rounds` rounds (order flipped each round), so a change in
the load of a shared machine falls on both modes; each mode's tokens/s is its tokens over its time.

  sequential           the server generates one request at a time; the others queue;
  continuous_batching  paged attention: every request in flight decodes in the same forward pass.

`--single` also times one request alone in each mode (continuous batching costs a little there);
`--sequential-threads 1` gives the sequential server the same one-thread cap the batching server
gets on a CPU, to see how much of the gain is the thread cap and how much is batching.
The last line printed is one JSON object: model, concurrency, max_tokens, sequential_tokens_per_s,
continuous_batching_tokens_per_s, cb_over_sequential (the ratio; issue 16's target is >= 2.5),
the per-mode request latencies and startup seconds, and with --single the one-stream figures.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Open-ended asks, so a chat model writes until max_tokens rather than stopping after a line.
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "Describe a walk through a busy market in the morning.",
    "Give advice to someone starting to learn the guitar.",
    "Write a letter from a cat to its owner about the new dog.",
    "Explain why the sky is blue to a ten-year-old.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a travel guide paragraph about a small mountain village.",
]
DECODING = {"temperature": 0.7, "top_p": 0.9}  # the same in every request: continuous batching uses the first one's


from instructflow.models.teacher_server import (  # noqa: E402
    CPU_CONTINUOUS_BATCHING_ARGS, CPU_CONTINUOUS_BATCHING_ENV, TeacherServer)


def cache_root() -> Path:
    return Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow")


def pick_model(name: str) -> Path:
    from instructflow.models.bundled import ensure_bundled_hf_dir

    bundled = ensure_bundled_hf_dir(cache_root())
    if name == "bundled":
        return bundled
    if name == "tiny":
        from instructflow.models.tiny import build_tiny_llama

        return build_tiny_llama(cache_root() / "tiny-llama", tokenizer_dir=bundled)
    return Path(name)


async def concurrent_chats(base_url: str, model: str, concurrency: int, max_tokens: int,
                           progress: bool = True) -> dict:
    """`concurrency` chat requests at once; completion tokens/s over the whole burst, and latencies."""
    import openai
    from tqdm import tqdm

    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600) as client:
        bar = tqdm(total=concurrency, desc=f"  {concurrency} requests", unit="req", file=sys.stderr,
                   disable=None if progress else True, leave=False)  # None: only on a terminal

        async def one(i: int) -> tuple[int, float]:
            sent = time.perf_counter()
            reply = await client.chat.completions.create(
                model=model, max_tokens=max_tokens, **DECODING,
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" (variant {i})"}])
            bar.update(1)
            return reply.usage.completion_tokens, time.perf_counter() - sent

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
        bar.close()
    tokens = sum(t for t, _ in results)
    latencies = sorted(s for _, s in results)
    return {"concurrency": concurrency, "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_mean_s": sum(latencies) / len(latencies), "latency_max_s": latencies[-1]}


def alternate_bursts(model_dir: Path, concurrency: int, max_tokens: int, rounds: int, single: bool,
                     sequential_threads: int = 0) -> dict:
    """Both servers up at once (an idle one uses no CPU), bursts alternating between them, order flipped
    every round: a load change on a shared machine then hits both modes alike."""
    modes = ("sequential", "continuous_batching")
    totals = {m: {"startup_s": 0.0, "tokens": 0, "wall_s": 0.0, "latencies": [], "single": None} for m in modes}
    with contextlib.ExitStack() as stack:
        servers = {}
        for mode in modes:
            print(f"{mode}: starting transformers serve on {model_dir.name}", file=sys.stderr)
            # --sequential-threads tells the thread cap's share of the gain from batching's
            threads = {"OMP_NUM_THREADS": str(sequential_threads)} if mode == "sequential" and sequential_threads else {}
            with mock.patch.dict(os.environ, threads):  # the child inherits it; restored right after
                servers[mode] = stack.enter_context(TeacherServer(model_dir, continuous_batching=mode != "sequential",
                                                                  startup_timeout_s=300))
            totals[mode]["startup_s"] = servers[mode].startup_s
            # warm-up: first-call allocations; with continuous batching it also fixes the shared sampling config
            asyncio.run(concurrent_chats(servers[mode].base_url, servers[mode].model_name, 1, 4, progress=False))
            if single:
                one = asyncio.run(concurrent_chats(servers[mode].base_url, servers[mode].model_name, 1, max_tokens))
                totals[mode]["single"] = one["tokens_per_s"]
        for round_ in range(rounds):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                burst = asyncio.run(concurrent_chats(servers[mode].base_url, servers[mode].model_name, concurrency,
                                                     max_tokens))
                print(f"round {round_ + 1}/{rounds} {mode:>19}: {burst['tokens_per_s']:.2f} completion tokens/s "
                      f"({burst['completion_tokens']} tokens in {burst['wall_s']:.1f} s)", file=sys.stderr)
                t = totals[mode]
                t["tokens"] += burst["completion_tokens"]
                t["wall_s"] += burst["wall_s"]
                t["latencies"].append(burst["latency_mean_s"])
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled", help="bundled (default), tiny, or an HF model dir")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="bursts per mode, alternating between the modes")
    parser.add_argument("--single", action="store_true", help="also time one request alone in each mode")
    parser.add_argument("--sequential-threads", type=int, default=0,
                        help="OMP_NUM_THREADS for the sequential server (default: torch's own choice, as before)")
    args = parser.parse_args(argv)
    model_dir = pick_model(args.model)
    totals = alternate_bursts(model_dir, args.concurrency, args.max_tokens, args.rounds, args.single,
                              args.sequential_threads)
    seq, cb = totals["sequential"], totals["continuous_batching"]
    summary = {"model": str(model_dir), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
               "rounds": args.rounds, "sequential_tokens_per_s": seq["tokens"] / seq["wall_s"],
               "continuous_batching_tokens_per_s": cb["tokens"] / cb["wall_s"],
               "cb_over_sequential": (cb["tokens"] / cb["wall_s"]) / (seq["tokens"] / seq["wall_s"]),
               "target_ratio": 2.5, "cpu_batching_args": list(CPU_CONTINUOUS_BATCHING_ARGS),
               "cpu_batching_env": CPU_CONTINUOUS_BATCHING_ENV, "sequential_threads": args.sequential_threads or None,
               "sequential_latency_mean_s": sum(seq["latencies"]) / len(seq["latencies"]),
               "continuous_batching_latency_mean_s": sum(cb["latencies"]) / len(cb["latencies"]),
               "sequential_startup_s": seq["startup_s"], "continuous_batching_startup_s": cb["startup_s"]}
    if args.single:
        summary.update(sequential_single_tokens_per_s=seq["single"], continuous_batching_single_tokens_per_s=cb["single"])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

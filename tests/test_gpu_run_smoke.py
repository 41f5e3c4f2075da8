"""bench/gpu_run.py --smoke: the GPU script's code paths on tiny models on this CPU, so it cannot rot.

The figures themselves are machine-dependent; what is checked is that every section ran the real
recipe (SFT packed and padded on two models, the embedded teacher with continuous batching at two
concurrencies, PPO updates) and reported finite positive numbers, MFU null without a GPU peak, and
QLoRA skipped with its reason.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains

REPO = Path(__file__).resolve().parents[1]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    scratch = tmp_path_factory.mktemp("gpu-run")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_run.py"), "--smoke", "--scratch", str(scratch)],
                          capture_output=True, text=True, timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    last = done.stdout.strip().splitlines()[-1]
    assert not any(scratch.iterdir()), "the run left checkpoints behind"
    return json.loads(last)


def test_smoke_reports_the_device_and_no_peak_on_cpu(report):
    assert report["device"] == "cpu" and report["smoke"] is True and report["peak_bf16_tflops"] is None
    assert positive(report["wall_s"]) and set(report["versions"]) == {"torch", "transformers", "trl", "peft"}


def test_sft_packing_off_and_on_on_both_models(report):
    sft = report["sft"]
    assert sft["status"] == "ok" and sft["mfu_target"] == 0.4 and sft["mfu_over_target"] is None
    assert set(sft["models"]) == {"smollm2", "llama_1b"}
    assert sft["models"]["smollm2"]["params"] != sft["models"]["llama_1b"]["params"]  # two different models
    for model in sft["models"].values():
        assert isinstance(model["params"], int) and model["params"] > 0
        for mode in ("packing_off", "packing_on"):
            run = model[mode]
            assert positive(run["tokens_per_s"]) and positive(run["tokens"]) and positive(run["seconds"])
            assert run["timed_steps"] >= 1 and run["steps"] == 2 and run["precision"] == "fp32"
            assert run["mfu"] is None and run["peak_memory_gb"] is None and positive(run["planned_memory_gb"])
            assert positive(run["recipe_tokens_per_s"])


def test_teacher_continuous_batching_at_two_concurrencies(report):
    teacher = report["teacher"]
    assert teacher["status"] == "ok" and teacher["continuous_batching"] is True
    assert teacher["single"]["concurrency"] == 1 and teacher["concurrent"]["concurrency"] == 4
    for burst in (teacher["single"], teacher["concurrent"]):
        assert 0 < burst["completion_tokens"] <= burst["concurrency"] * teacher["max_tokens"]
        assert positive(burst["tokens_per_s"]) and burst["latency_max_s"] >= burst["latency_mean_s"] > 0
    assert positive(teacher["concurrent_over_single"]) and positive(teacher["startup_s"])


def test_ppo_trains_timed_updates(report):
    ppo = report["ppo"]
    assert ppo["status"] == "ok" and ppo["updates"] >= 1
    assert ppo["episodes"] == ppo["updates"] * ppo["batch_size"] > 0
    assert positive(ppo["episodes_per_s"]) and positive(ppo["warmup_episodes_per_s"]) and positive(ppo["seconds"])
    assert math.isfinite(ppo["reward_last"])
    assert ppo["peak_memory_gb"] is None and positive(ppo["planned_memory_gb"])


def test_dpo_and_grpo_train_and_report_their_rates(report):
    dpo, grpo = report["dpo"], report["grpo"]
    assert dpo["status"] == "ok" and dpo["steps"] == 2 and dpo["pairs"] > 0 and positive(dpo["tokens_per_s"])
    assert dpo["mfu"] is None and dpo["peak_memory_gb"] is None and positive(dpo["planned_memory_gb"])
    assert 0.0 <= dpo["eval_accuracy"] <= 1.0
    assert grpo["status"] == "ok" and grpo["steps"] == 2 and positive(grpo["episodes_per_s"])
    assert positive(grpo["tokens_per_s"]) and grpo["num_generations"] >= 2 and math.isfinite(grpo["reward_last"])
    assert grpo["peak_memory_gb"] is None and positive(grpo["planned_memory_gb"])


def test_qlora_is_skipped_with_its_reason_on_cpu(report):
    assert report["qlora"]["status"] == "skipped" and report["qlora"]["reason"] == "needs CUDA + bitsandbytes"

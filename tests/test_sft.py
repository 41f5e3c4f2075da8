"""The SFT recipe on a tiny random Llama (real TRL SFTTrainer, real checkpoints, CPU, seconds)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from instructflow.models.bundled import ensure_bundled_hf_dir
from instructflow.models.launch import write_job
from instructflow.models.sft import SFTInputError, main, train_sft
from instructflow.models.tiny import build_tiny_llama
from instructflow.tasks.config import SFTConfig
from instructflow.tasks.sft_data import InstructionExample, to_prompt_completion
from recipe_helpers import completion_loss, context_sensitive_llama

pytestmark = pytest.mark.slow  # starts a server, Prefect, or trains

COLORS = ["red", "green", "blue", "yellow", "black", "white", "pink", "gray"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("INSTRUCTFLOW_CACHE") or Path.home() / ".cache" / "instructflow")
    return build_tiny_llama(tmp_path_factory.mktemp("sft") / "tiny", tokenizer_dir=ensure_bundled_hf_dir(cache))


@pytest.fixture(scope="module")
def rows(tiny) -> list[dict]:
    """Learnable: every completion is "The color is <one of 8 words>." (36 train + 4 eval rows)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    return [to_prompt_completion(InstructionExample(f"Name color number {i}.", "", f"The color is {COLORS[i % 8]}.",
                                                    "seed"), "alpaca", tokenizer) for i in range(40)]


def settings(tiny: Path, out: Path, **overrides) -> dict:
    """train_sft's keyword arguments: the sft section, base model and output dir."""
    values = dict(max_length=96, max_steps=8, learning_rate=5e-3, batch_size=4, warmup_ratio=0.0,
                  lr_scheduler="constant", eval_steps=4, save_steps=2, seed=0)
    return {"cfg": SFTConfig(**{**values, **overrides}), "base_model": tiny, "output_dir": out}


class Interrupt(KeyboardInterrupt):
    pass


def test_sft_learns_checkpoints_and_resumes_after_an_interrupt(tiny, rows, tmp_path):
    out = tmp_path / "run"
    first_run: list[tuple[int, dict]] = []

    def stop_at_step_5(step: int, values: dict) -> None:
        first_run.append((step, values))
        if step == 5:  # checkpoint-4 is on disk, step 5 is not saved: like Ctrl-C or a preempted job
            raise Interrupt()

    with pytest.raises(Interrupt):
        train_sft(rows[:36], rows[36:], **settings(tiny, out), on_step=stop_at_step_5)
    assert (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (out / "final").exists()
    # a checkpoint killed mid-save (no trainer_state.json yet) must be ignored and cleaned up
    partial = out / "checkpoints" / "checkpoint-7"
    partial.mkdir()
    (partial / "config.json").write_text("{}")

    second_run: list[tuple[int, dict]] = []
    metrics = train_sft(rows[:36], rows[36:], **settings(tiny, out), on_step=lambda s, v: second_run.append((s, v)))
    assert metrics["resumed_from"] == str(out / "checkpoints" / "checkpoint-4")
    assert not partial.exists()
    assert second_run[0][0] == 5 and "loss" in second_run[0][1]  # the global step continues, no step 0 re-eval
    assert metrics["steps"] == 8 and [s for s, v in second_run if "loss" in v] == [5, 6, 7, 8]

    # eval loss: measured before training once (first run, step 0), after training on the same rows
    before = [v["eval_loss"] for s, v in first_run if s == 0 and "eval_loss" in v]
    assert before and metrics["eval_loss_before"] == pytest.approx(before[0])
    assert metrics["eval_loss_before"] == pytest.approx(completion_loss(tiny, rows[36:]), rel=1e-4)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 1.0
    assert metrics["eval_loss_after"] == pytest.approx(completion_loss(Path(metrics["checkpoint"]), rows[36:]),
                                                       rel=1e-3)
    assert all({"loss", "learning_rate"} <= set(v) for s, v in second_run if "loss" in v)
    assert metrics["train_examples"] == 36 and metrics["eval_examples"] == 4 and not metrics["eval_on_train"]
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_s"] > 0 and metrics["truncated_examples"] == 0
    assert metrics["precision"] == "fp32" and Path(metrics["plot"]).stat().st_size > 1000

    final = Path(metrics["checkpoint"])
    assert final == out / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert isinstance(model, LlamaForCausalLM) and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert json.loads((final / "metrics.json").read_text())["eval_loss_after"] == metrics["eval_loss_after"]
    # finished: the resume state is gone (keep_checkpoints is false), the run record and the result stay
    assert not (out / "checkpoints").exists() and (out / "run.json").is_file()

    # finished: a rerun returns the stored metrics without training; other data in the same dir is refused
    again = train_sft(rows[:36], rows[36:], **settings(tiny, out), on_step=lambda s, v: pytest.fail("trained again"))
    assert again["reused"] is True and again["eval_loss_after"] == metrics["eval_loss_after"]
    with pytest.raises(SFTInputError, match="trained with other settings or data"):
        train_sft(rows[:30], rows[36:], **settings(tiny, out))


def test_packed_lora_run_has_the_exact_unpacked_loss_and_saves_a_merged_llama(tiny, rows, tmp_path):
    base_dir = context_sensitive_llama(tiny, tmp_path / "sharp")
    isolated = completion_loss(base_dir, rows[36:])
    assert abs(completion_loss(base_dir, rows[36:], leak_previous_row=True) - isolated) > 1e-3 * isolated  # 10x the tolerance below

    metrics = train_sft(rows[:36], rows[36:], **settings(base_dir, tmp_path / "packed", packing=True, lora=True,
                                                         max_steps=2, max_length=192, lora_r=4, lora_alpha=8,
                                                         learning_rate=2e-2))
    # bfd packing on sdpa: 4 eval rows share 2 packed rows of 192 tokens but not attention (and a fresh
    # LoRA adapter changes nothing yet), so the loss is the isolated one, not the leaky one
    assert metrics["packing"] == "bfd" and metrics["lora"] == "lora"
    assert metrics["eval_loss_before"] == pytest.approx(isolated, rel=1e-4)

    final = Path(metrics["checkpoint"])
    assert not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert isinstance(merged, LlamaForCausalLM)
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    q_base = base.model.layers[0].self_attn.q_proj.weight
    assert q_merged.shape == q_base.shape and not torch.equal(q_merged, q_base)  # the adapter was merged in
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)  # LoRA left these alone


def test_job_file_entry_point_with_empty_eval_and_truncation(tiny, rows, tmp_path, capsys):
    long_row = {"prompt": rows[0]["prompt"], "completion": "blue " * 80}       # cut at max_length
    huge_prompt = {"prompt": "word " * 200, "completion": "red"}                 # no completion left: dropped
    job = write_job(tmp_path / "job.json", "sft", rows[:6] + [long_row, huge_prompt], [],
                    **settings(tiny, tmp_path / "cli", max_steps=1, eval_steps=10, save_steps=10,
                               keep_checkpoints=True))
    assert main(["--job", str(job)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["eval_on_train"] is True and metrics["eval_examples"] == 0 and metrics["train_examples"] == 8
    assert metrics["truncated_examples"] == 2 and metrics["dropped_examples"] == 1
    assert metrics["steps"] == 1 and (Path(metrics["checkpoint"]) / "model.safetensors").is_file()
    # keep_checkpoints (read from the job file's section): the Trainer's checkpoint stays beside final/
    assert (tmp_path / "cli" / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()


def test_two_process_data_parallel_launch(tiny, rows, tmp_path):
    """What `accelerate launch --config_file models/accelerate/ddp.yaml -m instructflow.models.sft` does on
    GPUs, here with torchrun and gloo on the CPU: two ranks, one shared output dir, rank 0 writes."""
    job = write_job(tmp_path / "job.json", "sft", rows[:16], rows[36:],
                    **settings(tiny, tmp_path / "ddp", max_steps=2, eval_steps=10, save_steps=2, keep_checkpoints=True))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "instructflow.models.sft", "--job", str(job)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # only rank 0 reports
    metrics = json.loads(printed[0])
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["epoch"] == 1.0  # 2 steps x 4 rows x 2 ranks = all 16 rows: both ranks trained
    assert metrics["steps"] == 2 and isinstance(AutoModelForCausalLM.from_pretrained(metrics["checkpoint"]),
                                                LlamaForCausalLM)


@pytest.mark.parametrize("case, message", [
    ("empty train", "train set is empty"),
    ("missing base", "base_model .*/nope does not exist"),
    ("missing field", r"train\[1\]: missing field 'completion'"),
    ("not a string", r"eval\[0\]\.prompt: expected a string, got int"),
    ("qlora on cpu", "qlora=True needs a CUDA GPU"),
    ("fp16 on cpu", "precision='fp16' needs a CUDA GPU"),
    ("bad precision", "sft.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    ("prompts too long", "every train prompt is >= max_length=8 tokens"),
    ("foreign output dir", "holds a run with other settings or data"),
    ("unknown job setting", r"job\.json: sft\.learning_rat: unknown key \(did you mean learning_rate\?\)"),
])
def test_bad_input_is_one_clear_line(case, message, tiny, rows, tmp_path):
    train, held_out, s = rows[:4], rows[36:], settings(tiny, tmp_path / "out")
    if case == "empty train":
        train = []
    elif case == "missing base":
        s["base_model"] = tmp_path / "nope"
    elif case == "missing field":
        train = [rows[0], {"prompt": "x"}]
    elif case == "not a string":
        held_out = [{"prompt": 3, "completion": "x"}]
    elif case == "qlora on cpu":
        s["cfg"] = dataclasses.replace(s["cfg"], qlora=True)
    elif case == "fp16 on cpu":
        s["cfg"] = dataclasses.replace(s["cfg"], precision="fp16")
    elif case == "prompts too long":
        s["cfg"] = dataclasses.replace(s["cfg"], max_length=8)
    elif case == "foreign output dir":
        s["output_dir"].mkdir(parents=True)
        (s["output_dir"] / "run.json").write_text(json.dumps({"fingerprint": "another job"}))
    with pytest.raises(SFTInputError, match=message) as info:
        if case in ("unknown job setting", "bad precision"):  # a job file's section is checked as a config file's
            job = write_job(tmp_path / "job.json", "sft", train, held_out, **s)
            data = json.loads(job.read_text())
            data["sft"].update({"learning_rat": 1.0} if case == "unknown job setting" else {"precision": "fp8"})
            job.write_text(json.dumps(data))
            main(["--job", str(job)])
        else:
            train_sft(train, held_out, **s)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "final").exists()

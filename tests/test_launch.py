"""Every training stage's recipe under `accelerate launch` on two CPU processes (gloo), through the one
launcher the flows call (models/launch.py `run_recipe`), beside a one-process run of the same recipe:

* both ranks trained: each rank's trainer says "rank R of 2" at every step in the launch log (a process
  training alone would say "rank 0 of 1"), and the data went twice as far per step (the Trainer's epoch,
  PPO's episodes, both counted by the trainers themselves);
* rank 0 alone wrote: one `final/`, one metrics line; the metrics have the one-process run's keys
  (`world_size` 2 instead of 1) and the caller's on_step saw the same steps;
* the shipped configs load with accelerate's own parser, and the FSDP one wraps each LlamaDecoderLayer (FSDP
  and DeepSpeed train on CUDA GPUs only: accelerate turns them on for GPU processes, so here they are refused
  in one line rather than run as plain DDP);
* a rank that raises, or is killed, ends the launch with one line naming the rank and the log;
* a killed launch (the stage process by SIGINT/SIGTERM or SIGKILL, or `accelerate launch` itself by SIGKILL)
  leaves no process of it behind: every process of one launch carries a marker in its environment.

Tiny models (tests/recipe_helpers.py), two steps each."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from instructflow.models.launch import LaunchError, run_recipe, write_job
from instructflow.tasks.config import (DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig,
                                       accelerate_config_file)
from instructflow.tasks.sft_data import InstructionExample, alpaca_prompt, to_prompt_completion
from recipe_helpers import favouring_policy, last_token_reward, tiny_llama

pytestmark = pytest.mark.slow  # trains, on two processes

WORDS = [" yes", " no", " red", " blue", " cat", " dog", " one"]
PROMPTS = [f"<|im_start|>user\nQuestion {i}: pick a word.<|im_end|>\n<|im_start|>assistant\n" for i in range(16)]
COLORS = ["red", "green", "blue", "yellow", "black", "white", "pink", "gray"]
LAUNCHED = dict(launcher="accelerate", accelerate_config="ddp", num_processes=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama (sft, reward, dpo start from it); for ppo and grpo a policy that samples a few words and
    eos, and a reward model that scores the last token."""
    root = tmp_path_factory.mktemp("launch-models")
    tiny = tiny_llama(root)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    words = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS] + [tokenizer.eos_token_id]
    return {"tiny": tiny, "policy": favouring_policy(tiny, words, root / "policy"),
            "reward": last_token_reward(tiny, root / "reward", words[0])}


def recipe_args(recipe: str, models: dict[str, Path], out: Path, **launch) -> tuple[list, dict]:
    """(positional, keyword) arguments of train_RECIPE: two steps (ppo: two updates of one chunk each)."""
    trainer = dict(max_steps=2, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant",
                   eval_steps=10, save_steps=2, seed=0, keep_checkpoints=True, **launch)
    if recipe == "sft":
        tokenizer = AutoTokenizer.from_pretrained(models["tiny"])
        rows = [to_prompt_completion(InstructionExample(f"Name color number {i}.", "", f"The color is {COLORS[i % 8]}.",
                                                        "seed"), "alpaca", tokenizer) for i in range(20)]
        return [rows[:16], rows[16:], SFTConfig(max_length=96, **trainer), models["tiny"], out], {}
    if recipe in ("reward", "dpo"):
        pairs = [{"prompt": alpaca_prompt(f"Name color number {i}."), "chosen": f"The color is {COLORS[i % 8]}.",
                  "rejected": f"I like number {i} a lot"} for i in range(20)]
        section = RewardConfig(max_length=64, **trainer) if recipe == "reward" else DPOConfig(max_length=64, **trainer)
        return [pairs[:16], pairs[16:], section, models["tiny"], out], {}
    if recipe == "grpo":
        section = GRPOConfig(num_generations=4, max_completion_length=2, max_length=64, beta=0.04, temperature=1.0,
                             **trainer)
        return [PROMPTS, section, models["policy"], models["reward"], out], {}
    section = PPOConfig(total_episodes=8, batch_size=4, num_ppo_epochs=1, response_length=4, learning_rate=1e-3,
                        save_every_steps=1, seed=7, keep_checkpoints=True, **launch)
    return [PROMPTS, section, models["policy"], models["reward"], out], {}


def trained(recipe: str, models: dict[str, Path], out: Path, **launch) -> tuple[dict, list[tuple[int, dict]]]:
    steps: list[tuple[int, dict]] = []
    args, kwargs = recipe_args(recipe, models, out, **launch)
    metrics = run_recipe(recipe, *args, **kwargs, on_step=lambda step, values: steps.append((step, values)))
    return metrics, steps


def progress(output_dir: Path) -> float:
    """How far the data went: the Trainer's epoch at its last checkpoint, or PPO's episodes (the runs keep
    their checkpoints for this: keep_checkpoints)."""
    rounds = sorted(output_dir.glob("rounds/round-*/state.json"))
    if rounds:
        return json.loads(rounds[-1].read_text())["episodes"]
    states = sorted(output_dir.glob("checkpoints/checkpoint-*/trainer_state.json"))
    return json.loads(states[-1].read_text())["epoch"]


@pytest.mark.parametrize("recipe", ["sft", "reward", "dpo", "grpo", "ppo"])
def test_every_stage_trains_on_two_processes_as_it_does_in_one(recipe, models, tmp_path):
    alone, alone_steps = trained(recipe, models, tmp_path / "alone")
    metrics, steps = trained(recipe, models, tmp_path / "launched", **LAUNCHED)
    out = tmp_path / "launched"
    log = (out / "launch-1.log").read_text()

    # both ranks trained, each in a world of two (DDP: each holds the whole model): every step on each rank,
    # and the data went twice as far per step
    for rank in (0, 1):
        held = re.findall(rf"^instructflow: rank {rank} of 2: step (\d+) \((\d+) of (\d+) parameters held here\)$",
                          log, re.M)
        assert [int(step) for step, _, _ in held] == [1, 2], log[-3000:]
        assert all(mine == total for _, mine, total in held), held
    assert progress(out) == pytest.approx(2 * progress(tmp_path / "alone"))

    # rank 0 alone wrote the results: one final/, one metrics line; the one-process run's keys and steps
    assert sorted(p.relative_to(out) for p in out.rglob("final")) == [Path("final")]
    assert not list(out.glob(".final.tmp*")) and len(re.findall(r"^\{\"", log, re.M)) == 1
    assert metrics == json.loads((out / "final" / "metrics.json").read_text())
    assert set(metrics) == set(alone) and (alone["world_size"], metrics["world_size"]) == (1, 2)
    assert [s for s, _ in steps] == [s for s, _ in alone_steps]
    assert {k for _, v in steps for k in v} == {k for _, v in alone_steps for k in v}


def test_a_rank_that_raises_is_one_line_naming_the_rank_and_the_log(models, tmp_path):
    args, _ = recipe_args("sft", models, tmp_path / "out", **LAUNCHED)
    args[3] = tmp_path / "no-such-model"
    with pytest.raises(LaunchError) as info:
        run_recipe("sft", *args)
    log = tmp_path / "out" / "launch-1.log"
    assert re.fullmatch(rf"sft under accelerate: rank [01] of 2 failed: SFTInputError: base_model \S+/no-such-model "
                        rf"does not exist \(log: {re.escape(str(log))}\)", str(info.value)), str(info.value)
    assert log.read_text().count("Traceback (most recent call last)") >= 1


# --- kills ------------------------------------------------------------------------------------------

STAGE = """
import sys
from pathlib import Path
from instructflow.flows.server import stop_on_term_and_hangup
from instructflow.models.files import read_json
from instructflow.models.launch import accelerate_launch
from instructflow.tasks.config import section_from_dict
stop_on_term_and_hangup()   # as every instructflow command does
job = Path(sys.argv[1])
try:
    accelerate_launch("sft", job, section_from_dict(str(job), "sft", read_json(job)["sft"]), Path(sys.argv[2]))
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(1)
"""


def processes_with(mark: str) -> dict[int, str]:
    """pid -> command line of every process whose environment holds `mark`."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark.encode() in (proc / "environ").read_bytes():
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def wait_for(what, timeout_s: float, why: str):
    deadline = time.monotonic() + timeout_s
    while not (found := what()):
        assert time.monotonic() < deadline, why
        time.sleep(0.2)
    return found


@pytest.mark.parametrize("victim, sig", [("stage", signal.SIGINT), ("stage", signal.SIGKILL),
                                         ("launcher", signal.SIGKILL), ("rank 1", signal.SIGKILL)])
def test_a_killed_launch_leaves_no_process_behind(victim, sig, models, tmp_path):
    """The stage process runs what run_recipe runs for a launched sft (long enough to be killed while both ranks
    run); `victim` is it, `accelerate launch` (torch's elastic agent) or rank 1. SIGINT is Ctrl-C, and SIGTERM
    to an instructflow command (flows/server.py stop_on_term_and_hangup): accelerate_launch then stops the
    launcher with SIGTERM (which the agent passes to the ranks), then SIGKILL. SIGKILL to the stage process
    leaves the kernel to kill the launcher and then the ranks (their death signals)."""
    args, _ = recipe_args("sft", models, tmp_path / "out", **LAUNCHED)
    args[2] = SFTConfig(**{**vars(args[2]), "max_steps": 500, "save_steps": 500})
    job = write_job(tmp_path / "stage-job.json", "sft", *args)
    tag = uuid.uuid4().hex  # in the environment of the stage process, so of every process it starts
    stage = subprocess.Popen([sys.executable, "-c", STAGE, str(job), str(tmp_path / "out")], text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "IFTEST_LAUNCH_MARK": tag})
    mark = f"IFTEST_LAUNCH_MARK={tag}"
    log = tmp_path / "out" / "launch-1.log"
    try:
        started = re.compile(r"^instructflow: rank \d of 2: pid", re.M)
        wait_for(lambda: log.is_file() and len(started.findall(log.read_text())) == 2, 240, "the ranks did not start")
        running = processes_with(mark)
        ranks = [pid for pid, command in running.items() if "instructflow.models.sft" in command
                 and "accelerate" not in command]
        launcher = [pid for pid, command in running.items() if "accelerate.commands.launch" in command]
        assert len(ranks) == 2 and len(launcher) == 1 and stage.pid in running, running
        target = {"stage": stage.pid, "launcher": launcher[0]}.get(victim)
        if victim == "rank 1":
            target = next(pid for pid in ranks if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
        os.kill(target, sig)
        wait_for(lambda: not processes_with(mark), 60, f"still running after {sig.name} to the {victim}: "
                                                      f"{processes_with(mark)}")
    finally:
        for pid in processes_with(mark):
            os.kill(pid, signal.SIGKILL)
        stage.wait(timeout=30)
    errors = stage.stderr.read().strip().splitlines()
    if victim != "stage":  # the stage process ends itself, with one line naming the rank or launcher and the log
        assert stage.returncode == 1 and len(errors) == 1, errors
        how = "rank 1 was killed by SIGKILL" if victim == "rank 1" else "accelerate launch exited with code"
        assert errors[0].startswith(f"LaunchError: sft under accelerate: {how}"), errors
        assert errors[0].endswith(f"(log: {log})"), errors


# --- the shipped accelerate configs -----------------------------------------------------------------

@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                        ("deepspeed_zero3", "DEEPSPEED")])
def test_the_shipped_configs_load_with_accelerates_own_parser(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(accelerate_config_file(name)))
    assert (config.distributed_type.value, config.num_processes, config.mixed_precision) == (kind, 2, "no")
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_the_fsdp_config_shards_each_llama_decoder_layer(models, monkeypatch):
    """What `accelerate launch` hands the ranks for fsdp.yaml (its own env translation), the plugin a rank builds
    from it, and the units that plugin wraps in our Llama. (Training under it needs CUDA: accelerate turns FSDP
    on for GPU processes only, so the two-process test above cannot run it here.)"""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env
    from transformers import AutoModelForCausalLM

    args = launch_command_parser().parse_args(["--config_file", str(accelerate_config_file("fsdp")),
                                               "-m", "instructflow.models.sft", "--job", "job.json"])
    for key, value in prepare_multi_gpu_env(_validate_launch_command(args)[0]).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.reshard_after_forward, plugin.cpu_ram_efficient_loading) == (2, True, False)
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    model = AutoModelForCausalLM.from_pretrained(models["tiny"])
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [name for name, module in model.named_modules() if wraps(module)] == ["model.layers.0", "model.layers.1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("name", ["fsdp", "deepspeed_zero3"])
def test_fsdp_and_deepspeed_are_refused_in_one_line_without_cuda(name, models, tmp_path):
    args, _ = recipe_args("grpo", models, tmp_path / "out", **{**LAUNCHED, "accelerate_config": name})
    with pytest.raises(LaunchError, match=rf"^grpo.accelerate_config '{name}' is (FSDP|DEEPSPEED), which accelerate "
                                          r"runs on CUDA GPUs only \(CPU processes would train as plain DDP\): use "
                                          r"'ddp' on this machine$"):
        run_recipe("grpo", *args)
    assert not (tmp_path / "out").exists()

"""One launcher for every training recipe (sft, reward, ppo, dpo, grpo): the recipe in this process, or the
same recipe under `accelerate launch` on N processes, as its config section's `launcher` says.

    run_recipe("reward", train, eval, cfg.reward, sft_model, output_dir, on_step=ctx.step)

calls `train_reward` with these arguments (recipe NAME is `train_NAME` in models/NAME.py, trained with the
NAME config section) when `cfg.reward.launcher == "inprocess"`. With "accelerate" it writes them to the job
file `output_dir/job.json` (`write_job`: the section, the model paths, the data) and runs

    accelerate launch --config_file CONFIG [--num_processes N] -m instructflow.models.reward --job job.json

Every rank runs the recipe module's `main`, that is `job_main`: the same `train_reward` on the job's
arguments, the section checked as a config file's is. Rank 0 alone writes checkpoints, `final/` and its
`metrics.json`, which `run_recipe` returns, so a caller sees what it sees in process: the same metrics keys
(`world_size` says how many processes trained, 1 in process), the steps rank 0 reported fed to `on_step`
while the launch runs (through `launch-K.steps.jsonl`), and a failure as one line.

Launch K of a run folder keeps all that its processes print in `output_dir/launch-K.log`: each rank's
`instructflow: rank R of W: step S (...)` line after every optimizer step, and the traceback of a rank that
failed. The error line names the first rank that raised, with its exception (from the `rank R of W failed:`
line it prints before its traceback), or the rank that died and how (torch elastic's root-cause summary),
and the log.

Lifetime (every process a command starts stops with it): the launcher is our child, in a session of its
own (a terminal's Ctrl-C reaches only us; we then stop it: SIGTERM, which torch's elastic agent passes to
every rank, and SIGKILL after STOP_GRACE_S), and the kernel kills it when we die (models/processes.py). The
agent starts each rank in a session of its own too, and does not stop them when it is SIGKILLed itself, so
each rank's first act is to ask for the same death signal (`die_with_launcher`), or to end at once when the
launcher is already gone.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from instructflow.models.files import read_json
from instructflow.models.processes import die_with_parent
from instructflow.tasks.config import (ConfigError, TrainingConfig, accelerate_config_file, accelerate_settings,
                                       section_from_dict)

if TYPE_CHECKING:  # recipe_io loads transformers: a rank imports it anyway, the launching process need not
    from instructflow.models.recipe_io import StepCallback

LAUNCH_ENV = "INSTRUCTFLOW_LAUNCH"      # set for the launcher, so every process of one launch carries it
CALLBACKS = ("on_step", "on_progress")  # a recipe's arguments that stay with the caller
POLL_S = 0.5                            # how often the caller feeds new steps and checks the launcher
STOP_GRACE_S = 10.0                     # after SIGTERM, then SIGKILL (the ranks die with the launcher)
GPU_ONLY = ("FSDP", "DEEPSPEED")        # distributed types accelerate turns on only where CUDA is
FAILED = re.compile(r"^(?:\[rank\d+\]:\s*)?instructflow: rank (\d+) of (\d+) failed: (.*)$", re.M)
# torch elastic's summary: "Root Cause (first observed failure): ... rank: 1 (local_rank: 1) exitcode: -9"
ROOT_CAUSE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


class LaunchError(RuntimeError):
    """A launched recipe failed: one line naming the rank, what it raised or how it died, and the log."""


def recipe_function(recipe: str) -> Callable[..., dict]:
    """`train_RECIPE` of models/RECIPE.py."""
    return getattr(importlib.import_module(f"instructflow.models.{recipe}"), f"train_{recipe}")


def recipe_arguments(recipe: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The recipe's arguments by name, bound as its signature binds them (defaults left out)."""
    return dict(inspect.signature(recipe_function(recipe)).bind(*args, **kwargs).arguments)


def run_recipe(recipe: str, *args: Any, **kwargs: Any) -> dict:
    """`train_RECIPE(*args, **kwargs)` in this process, or under `accelerate launch` on the section's processes
    when its `launcher` is "accelerate"; the metrics (in-process: what the recipe returns; launched: rank 0's
    `final/metrics.json`). Launched, `on_step` gets rank 0's steps while the ranks train; `on_progress` is
    not called."""
    arguments = recipe_arguments(recipe, args, kwargs)
    section: TrainingConfig = arguments["cfg"]
    if section.launcher == "inprocess":
        return recipe_function(recipe)(**arguments)
    check_machine(recipe, section)
    output_dir = Path(arguments["output_dir"]).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)  # for the job file
    job = write_job(output_dir / "job.json", recipe, **{**arguments, "output_dir": output_dir})
    accelerate_launch(recipe, job, section, output_dir, arguments.get("on_step"))
    from instructflow.models.recipe_io import METRICS_FILE  # loaded with the recipe already

    metrics = read_json(output_dir / "final" / METRICS_FILE)
    if metrics is None:
        raise LaunchError(f"{recipe} under accelerate: the launch ended without {output_dir}/final/{METRICS_FILE}")
    return metrics


def check_machine(recipe: str, section: TrainingConfig) -> None:
    """What only this machine can tell (the config's keys were checked when it loaded): accelerate turns on FSDP
    and DeepSpeed for GPUs only; on CPU processes an FSDP config trains as plain DDP without a word."""
    import torch

    kind = accelerate_settings(accelerate_config_file(section.accelerate_config).read_text())["distributed_type"]
    if kind in GPU_ONLY and not torch.cuda.is_available():
        raise LaunchError(f"{recipe}.accelerate_config {section.accelerate_config!r} is {kind}, which accelerate runs "
                          "on CUDA GPUs only (CPU processes would train as plain DDP): use 'ddp' on this machine")


# ----------------------------------------------------------------------------------------------
# The job file

def write_job(path: Path, recipe: str, *args: Any, **kwargs: Any) -> Path:
    """The JSON file every rank reads: the recipe's arguments by name (callbacks left out, paths as text), the
    config section under the recipe's name: `{"reward": {section}, "train": [rows], "eval": [rows],
    "sft_model": DIR, "output_dir": DIR}`."""
    arguments = {k: v for k, v in recipe_arguments(recipe, args, kwargs).items() if k not in CALLBACKS}
    section = arguments.pop("cfg")
    job = {recipe: dataclasses.asdict(section), **{k: str(v) if isinstance(v, Path) else v
                                                   for k, v in arguments.items()}}
    Path(path).write_text(json.dumps(job, ensure_ascii=False))
    return Path(path)


def read_job(path: Path, recipe: str, error: type[ValueError]) -> dict[str, Any]:
    """The recipe's arguments from a job file, its section checked as a config file's is; anything missing,
    unknown or invalid is one `error` line."""
    job = read_json(path)
    parameters = inspect.signature(recipe_function(recipe)).parameters
    needed = [recipe] + [name for name, p in parameters.items() if p.default is p.empty and name != "cfg"]
    if not isinstance(job, dict) or any(name not in job for name in needed):
        raise error(f"{path}: expected a JSON object with {', '.join(repr(n) for n in needed)} (see write_job)")
    unknown = sorted(name for name in job
                     if name != recipe and (name not in parameters or name in (*CALLBACKS, "cfg")))
    if unknown:
        raise error(f"{path}: {unknown[0]!r} is not an argument of train_{recipe}")
    try:
        section = section_from_dict(str(path), recipe, job[recipe])
    except ConfigError as exc:
        raise error(str(exc)) from None
    return {**{k: v for k, v in job.items() if k != recipe}, "cfg": section}


# ----------------------------------------------------------------------------------------------
# A rank: `python -m instructflow.models.RECIPE --job FILE`

def job_main(recipe: str, argv: Sequence[str] | None, error: type[ValueError]) -> int:
    """A recipe module's `main`, run on every rank of a launch (or alone): the recipe on the job file's
    arguments; rank 0 prints its metrics as one JSON line and, with --steps, appends each step it reports to
    that file. A rank that raises prints `instructflow: rank R of W failed: ...` before its traceback."""
    die_with_launcher()
    from instructflow.models.recipe_io import rank, world_size

    parser = argparse.ArgumentParser(prog=f"python -m instructflow.models.{recipe}",
                                     description=f"train_{recipe} on a job file: alone, or on every rank of "
                                                 "`accelerate launch` (rank 0 writes the results)")
    parser.add_argument("--job", type=Path, required=True,
                        help=f'JSON {{"{recipe}": {{section}}, ...train_{recipe}\'s other arguments}} (see write_job)')
    parser.add_argument("--steps", type=Path, help="rank 0 appends each reported step here as a JSON line")
    args = parser.parse_args(argv)
    if world_size() > 1:
        print(f"instructflow: rank {rank()} of {world_size()}: pid {os.getpid()} on {os.uname().nodename}", flush=True)
    try:
        arguments = read_job(args.job, recipe, error)
        if args.steps is not None and rank() == 0:
            arguments["on_step"] = StepLog(args.steps)
        metrics = recipe_function(recipe)(**arguments)
    except Exception as exc:
        if world_size() > 1:
            why = (str(exc).strip().splitlines() or [""])[0]
            print(f"instructflow: rank {rank()} of {world_size()} failed: {type(exc).__name__}: {why}",
                  file=sys.stderr, flush=True)
        raise
    if rank() == 0:
        print(json.dumps(metrics, sort_keys=True, default=str), flush=True)
    return 0


def die_with_launcher() -> None:
    """A launched rank's first act: have the kernel kill it when the launcher (torch's elastic agent, its parent)
    dies, and end now if that already happened (then the parent's environment lacks this launch's mark)."""
    mark = os.environ.get(LAUNCH_ENV)
    if not mark or not sys.platform.startswith("linux"):
        return  # started by hand (torchrun or `accelerate launch` in a shell): that launcher's business
    parent = os.getppid()
    die_with_parent(parent)
    try:
        ours = f"{LAUNCH_ENV}={mark}".encode() in Path(f"/proc/{parent}/environ").read_bytes().split(b"\0")
    except OSError:
        ours = False
    if not ours:
        os.kill(os.getpid(), signal.SIGKILL)


class StepLog:
    """Rank 0's on_step in a launch: each step as a JSON line, which the caller feeds to its own on_step."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __call__(self, step: int, values: dict[str, float]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "values": values}) + "\n")


class StepFeed:
    """The caller's side of StepLog: the complete lines written since the last call, to `on_step`."""

    def __init__(self, path: Path, on_step: StepCallback | None):
        self.path, self.on_step, self.offset = Path(path), on_step, 0

    def __call__(self) -> None:
        if self.on_step is None or not self.path.is_file():
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            entry = json.loads(line)
            self.on_step(int(entry["step"]), entry["values"])


# ----------------------------------------------------------------------------------------------
# The launch

def accelerate_launch(recipe: str, job: Path, section: TrainingConfig, output_dir: Path,
                      on_step: StepCallback | None = None) -> Path:
    """Run `accelerate launch ... -m instructflow.models.RECIPE --job JOB` to its end, feeding rank 0's steps
    to `on_step`; its log (returned) is `output_dir/launch-K.log`. LaunchError (one line) if it fails."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(m[1]) for p in output_dir.glob("launch-*.log")
                      if (m := re.fullmatch(r"launch-(\d+)\.log", p.name))), default=0)
    log_path, steps_path = output_dir / f"launch-{number}.log", output_dir / f"launch-{number}.steps.jsonl"
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(accelerate_config_file(section.accelerate_config))]  # checked with the section
    if section.num_processes:
        command += ["--num_processes", str(section.num_processes)]
    command += ["-m", f"instructflow.models.{recipe}", "--job", str(job), "--steps", str(steps_path)]
    env = {**os.environ, LAUNCH_ENV: f"{os.getpid()}-{uuid.uuid4().hex[:12]}", "PYTHONUNBUFFERED": "1"}
    feed, parent = StepFeed(steps_path, on_step), os.getpid()
    with log_path.open("wb") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, preexec_fn=lambda: die_with_parent(parent))
        try:
            while process.poll() is None:
                feed()
                time.sleep(POLL_S)
        finally:
            if process.poll() is None:  # interrupted, or on_step failed
                stop(process)
    feed()
    if process.returncode != 0:
        why = failure_line(log_path.read_text(errors="replace"), process.returncode)
        raise LaunchError(f"{recipe} under accelerate: {why} (log: {log_path})")
    return log_path


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the launcher's group (torch's agent stops every rank), SIGKILL it after STOP_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)  # start_new_session: the group id is the launcher's pid
            process.wait(timeout=STOP_GRACE_S)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def failure_line(log: str, returncode: int) -> str:
    """Which rank failed first and why, from a launch's log: a rank killed from outside (the OOM killer, a
    user) is the cause of its peers' errors; else the first rank that raised; else how torch elastic saw the
    first failure; else the launcher's last line."""
    summary = log.rfind("Root Cause (first observed failure)")
    died = ROOT_CAUSE.search(log, summary) if summary >= 0 else None
    code = int(died[2]) if died else 0
    try:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    except ValueError:
        how = f"was killed by signal {-code}"
    raised = FAILED.search(log)
    if died and code < 0 and -code != signal.SIGTERM:  # SIGTERM is the agent stopping the others
        return f"rank {died[1]} {how}"
    if raised:
        return f"rank {raised[1]} of {raised[2]} failed: {raised[3].strip()}"
    if died:
        return f"rank {died[1]} {how}"
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return f"accelerate launch exited with code {returncode}" + (f": {lines[-1]}" if lines else "")

"""`accelerate launch` of a recipe module on N processes/GPUs: the job file in, the rank's own error out.

A recipe that can run distributed has a `main(argv)` reading `--job FILE` (written by the caller) and
writes `OUTPUT_DIR/final/metrics.json` on rank 0, exactly as in-process. This module only launches it
and turns a failure into one line (the first rank's own exception, not the launcher's banner), with
the whole log kept next to the job."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from instructflow.tasks.config import TrainingConfig, accelerate_config_file


def accelerate_launch(module: str, job: Path, section: TrainingConfig, log_path: Path) -> None:
    """Run `python -m accelerate.commands.launch ... -m MODULE --job JOB`; RuntimeError (one line) if it fails."""
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(accelerate_config_file(section.accelerate_config))]  # checked with the section
    if section.num_processes:
        command += ["--num_processes", str(section.num_processes)]
    command += ["-m", module, "--job", str(job)]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = launcher.communicate()
    except BaseException:  # Ctrl-C, SIGTERM (flows/server.py `Terminated`): stop the launcher and its ranks
        stop_launcher(launcher)
        raise
    if launcher.returncode != 0:
        log_path.write_text(stdout + stderr)
        raised = [line.strip() for line in stderr.splitlines()
                  if re.match(r"^\w+(\.\w+)*(Error|Exception): ", line.strip()) and "ChildFailedError" not in line]
        why = raised[0] if raised else " | ".join(stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"accelerate launch failed ({launcher.returncode}): {why} (full log: {log_path})")


def stop_launcher(launcher: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM, not SIGKILL: torch's elastic agent stops its ranks on SIGTERM (they run in sessions of
    their own, so nothing else would reach them), then exits; SIGKILL only if it does not in `grace_s`."""
    if launcher.poll() is None:
        launcher.terminate()
    try:
        launcher.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.communicate()

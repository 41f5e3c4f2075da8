"""How a child process stops with the process that started it: the one rule every child we start follows
(the embedded teacher server, the `accelerate launch` of a recipe and each of its ranks).

A child in a session of its own (so that a terminal's Ctrl-C reaches only us, and we can stop its whole
group) would outlive a SIGKILLed parent; so the child asks the kernel to SIGKILL it when its parent dies
(PR_SET_PDEATHSIG), and kills itself at once if the parent is already gone."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when `parent_pid`, its parent, dies (Linux); as a Popen preexec_fn it runs in the
    child between fork and exec. Note: the signal fires when the parent *thread* that forked us exits."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

"""The CUDA GPUs this process sees, as the memory plan (tasks/memory_plan.py) describes them."""
from __future__ import annotations

from instructflow.tasks.memory_plan import Gpu


def visible_gpus() -> list[Gpu]:
    """Each visible CUDA device: name, total memory, bf16 support; [] without CUDA (a CPU run)."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(Gpu(props.name, int(props.total_memory), bf16=props.major >= 8))  # bf16 from Ampere (sm_80) on
    return found

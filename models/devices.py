"""The CUDA GPUs this process sees, as the memory plan (tasks/memory_plan.py) describes them."""
from __future__ import annotations

from instructflow.tasks.memory_plan import Gpu


def visible_gpus() -> list[Gpu]:
    """Each visible CUDA device: name, total memory, bf16 support; [] without CUDA (a CPU run)."""
    import torch

    if not torch.cuda.is_available():
        return []
    bf16 = torch.cuda.is_bf16_supported()  # the rule models/recipe_io.resolve_precision applies to "auto"
    return [Gpu(props.name, int(props.total_memory), bf16=bf16)
            for props in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))]

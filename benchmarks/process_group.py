"""Process-group start-up shared by the torchrun benchmark scripts."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["init_benchmark_group"]


def init_benchmark_group(cuda: bool, timeout: datetime.timedelta) -> torch.device:
    """Join the torchrun group: NCCL on ``cuda:LOCAL_RANK``, else gloo on CPU with the cores
    shared among the local ranks. Returns this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        return device
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")

"""Two ranks started by hand (env://: global rank 0's process hosts the c10d store, no torchrun agent). After an
agreed call rank 0 exits; rank 1 calls again and prints, as one JSON line, what it raised and how long it took."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

import usp_attn


def main() -> None:
    dist.init_process_group("gloo")
    usp_attn.init_sequence_parallel(ulysses_degree=2, timeout=30)
    x = usp_attn.shard_sequence(torch.randn(1, 24, 4, 8))
    layer = usp_attn.USPAttention(4, 8)
    layer(x, x, x)
    dist.barrier()
    if dist.get_rank() == 0:
        os._exit(0)  # the store's host goes, as a crashed process
    time.sleep(0.5)
    start = time.monotonic()
    try:
        layer(x, x, x)
        result = {"type": None, "message": ""}
    except Exception as exc:  # noqa: BLE001 - the test asserts the type
        result = {"type": type(exc).__name__, "message": str(exc)}
    result["seconds"] = time.monotonic() - start
    os.write(sys.stdout.fileno(), (json.dumps(result) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()

"""Run under torchrun by test_reinit.py, the way a user script runs.

Phase 1, no process-group setup of the script's own: bad ``timeout`` values fail with a named
error and create nothing; a failed init (strict ``fa`` on a CPU machine) leaves no default group
behind; then several layouts are initialised, used (checked against an fp64 reference) and
destroyed in turn, usp_attn creating and destroying the default group each time.
Phase 2: the script calls ``dist.init_process_group`` itself; the same cycle of layouts leaves
that group alone.

Prints one JSON line per rank: ``{"rank", "errors", "layouts", "seconds"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import usp_attn
from usp_attn.selector import AttentionBackendUnavailableError


def reference(q, k, v):
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) * q.shape[-1] ** -0.5
    return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v.double())


def cycle(layouts: list[str], owns_default: bool) -> list[str]:
    """Init, use and destroy each layout; the default group must exist exactly when the script owns it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 30, 4, 8, generator=gen) for _ in range(3))
    expected = reference(q, k, v)
    done = []
    for text in layouts:
        u, r = map(int, text.split("x"))
        usp_attn.init_sequence_parallel(u, r, timeout=30)
        out = usp_attn.USPAttention(4, 8)(*(usp_attn.shard_sequence(t) for t in (q, k, v)))
        error = (out.double() - usp_attn.shard_sequence(expected)).abs().max().item()
        assert error < 2e-5, (text, error)
        usp_attn.destroy_sequence_parallel()
        assert dist.is_initialized() == owns_default, text
        done.append(f"{'own' if owns_default else 'usp'}:{text}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", default="2x2,4x1,1x4,2x2")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    torch.set_num_threads(1)
    start = time.monotonic()
    errors = []
    for bad in ("abc", math.nan, -5, 0, math.inf):
        try:
            usp_attn.init_sequence_parallel(timeout=bad)
        except ValueError as exc:
            errors.append(str(exc))
        assert not dist.is_initialized(), "a rejected timeout created a process group"
    try:
        usp_attn.init_sequence_parallel(int(os.environ["WORLD_SIZE"]), attention_backend="fa", strict=True, timeout=30)
    except AttentionBackendUnavailableError as exc:
        errors.append(type(exc).__name__)
    assert not dist.is_initialized(), "a failed init left its default group behind"
    assert usp_attn.get_sequence_parallel_state() is None
    done = cycle(layouts, owns_default=False)
    dist.init_process_group("gloo")
    done += cycle(layouts, owns_default=True)
    dist.destroy_process_group()
    line = json.dumps({"rank": int(os.environ["RANK"]), "errors": errors, "layouts": done,
                       "seconds": time.monotonic() - start})
    # One write per line: print() writes the text and the newline separately, and four ranks share the pipe.
    os.write(sys.stdout.fileno(), (line + "\n").encode())


if __name__ == "__main__":
    main()

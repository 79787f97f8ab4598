"""Cases run inside spawned gloo groups by test_disagreement.py: ranks that disagree, bad
arguments, fp64 through the ring, a rank that dies.

Each case returns, per rank, what happened (``outcome``): the exception type and message
and the seconds the failing call took, so the test can assert the named error on every
rank and a time bound far below the group timeout.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

import usp_attn
from tests.helpers.reference import reference_attention

#: Group timeout of the cases that must fail fast: a check that regressed to waiting for
#: the timeout shows up as a case taking >= 20 s, against a bound of a few seconds.
SP_TIMEOUT = 20.0
#: Group timeout of the two cases that can only end at the timeout (a rank changing its
#: arguments alone, detected when the others' collective times out).
SHORT_TIMEOUT = 3.0


def layout(ulysses: int, ring: int, **kwargs) -> usp_attn.SequenceParallelState:
    usp_attn.destroy_sequence_parallel()
    kwargs.setdefault("timeout", SP_TIMEOUT)
    return usp_attn.init_sequence_parallel(ulysses, ring, **kwargs)


def outcome(fn) -> dict:
    """Run ``fn``; return the exception it raised (type, message) and the seconds it took."""
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test asserts the type
        return {"type": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - start}
    return {"type": None, "message": "", "seconds": time.monotonic() - start}


def _full(length=20, heads=4, dim=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, heads, dim, generator=gen).to(dtype)


# ---- rows of the table: arguments that differ between ranks -----------------------------------
def shard_length_off_by_one(validate) -> dict:
    """One rank's shard is one token longer than seq_len says (validate=True or default)."""
    layout(dist.get_world_size(), 1, validate=validate)
    x = usp_attn.shard_sequence(_full(20), record_length=False)
    if dist.get_rank() == 1:
        x = torch.cat([x, x[:, :1]], dim=1)
    return outcome(lambda: usp_attn.USPAttention(4, 8)(x, x, x, seq_len=20))


def mask_on_one_rank(ulysses: int, ring: int) -> dict:
    """Default settings; rank 0 passes a key mask, the others none."""
    layout(ulysses, ring)
    x = usp_attn.shard_sequence(_full(24))
    mask = torch.ones(1, x.shape[1], dtype=torch.bool) if dist.get_rank() == 0 else None
    return outcome(lambda: usp_attn.USPAttention(4, 8)(x, x, x, attn_mask=mask))


def seq_len_differs() -> dict:
    layout(dist.get_world_size(), 1)
    x = usp_attn.shard_sequence(_full(20), record_length=False)
    total = 20 if dist.get_rank() == 0 else 22
    return outcome(lambda: usp_attn.USPAttention(4, 8)(x, x, x, seq_len=total))


def dtype_differs() -> dict:
    layout(1, dist.get_world_size())
    dtype = torch.bfloat16 if dist.get_rank() == 1 else torch.float32
    x = usp_attn.shard_sequence(_full(20, dtype=dtype))
    return outcome(lambda: usp_attn.USPAttention(4, 8)(x, x, x))


def head_count_differs() -> dict:
    """Each rank's tensors fit its own layer, but rank 1 built its layer with 2 heads."""
    layout(dist.get_world_size(), 1)
    heads = 2 if dist.get_rank() == 1 else 4
    x = usp_attn.shard_sequence(_full(20, heads=heads))
    return outcome(lambda: usp_attn.USPAttention(heads, 8)(x, x, x))


def replicated_prefix_differs(ulysses: int, ring: int) -> dict:
    """The last rank counts 2 replicated prefix tokens, the others none."""
    layout(ulysses, ring)
    prefix = 2 if dist.get_rank() == dist.get_world_size() - 1 else 0
    full = _full(24 + prefix)
    x = torch.cat([full[:, :prefix], usp_attn.shard_sequence(full[:, prefix:])], dim=1)
    return outcome(lambda: usp_attn.USPAttention(4, 8)(x, x, x, num_replicated_prefix=prefix))


# ---- rows: bad arguments on every rank ---------------------------------------------------------
def bad_softmax_scale() -> list[dict]:
    layout(dist.get_world_size(), 1)
    return [outcome(lambda s=s: usp_attn.USPAttention(4, 8, softmax_scale=s))
            for s in (math.inf, math.nan, 0.0, -1.0)]


def meta_tensors() -> dict:
    layout(dist.get_world_size(), 1)
    x = torch.empty(1, 10, 4, 8, device="meta")
    return outcome(lambda: usp_attn.USPAttention(4, 8)(x, x, x, seq_len=20))


# ---- fp64 through the ring ---------------------------------------------------------------------
def fp64_ring(ulysses: int, ring: int) -> float:
    """Max abs error of an fp64 run against the fp64 reference (fp32 merging gave ~1e-7)."""
    layout(ulysses, ring)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 37, 4, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 37, generator=gen) > 0.3
    expected = reference_attention(q, k, v, mask=mask)
    layer = usp_attn.USPAttention(4, 16)
    out = layer(*(usp_attn.shard_sequence(t) for t in (q, k, v)), attn_mask=usp_attn.shard_sequence(mask))
    assert out.dtype == torch.float64
    return (out - usp_attn.shard_sequence(expected)).abs().max().item()


# ---- the cost model: nothing in steady state ---------------------------------------------------
class _CountingStore:
    """Wraps the channel's store and counts every operation on it."""

    def __init__(self, store) -> None:
        self.store, self.calls = store, 0

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if callable(attr):
            def counted(*args, **kwargs):
                self.calls += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def check_schedule() -> dict:
    """Checks run on the first call, on a change every rank makes, and never in steady state."""
    counts = {}
    for validate in (None, True, False):
        state = layout(dist.get_world_size(), 1, validate=validate)
        layer = usp_attn.USPAttention(4, 8)
        x = usp_attn.shard_sequence(_full(20))
        layer(x, x, x)
        channel = state.guard._channel
        if channel is not None:
            channel.store = _CountingStore(channel.store)
        first = state.guard.checks
        for _ in range(3):
            layer(x, x, x)
        steady = state.guard.checks - first
        store_ops = channel.store.calls if channel is not None else 0
        y = usp_attn.shard_sequence(_full(26))  # every rank: a new sequence length
        expected = usp_attn.shard_sequence(reference_attention(*(_full(26).double(),) * 3))
        error = (layer(y, y, y).double() - expected).abs().max().item()
        counts[str(validate)] = {"first": first, "steady": steady, "store_ops": store_ops,
                                 "after_change": state.guard.checks - first - steady, "error": error}
    return counts


def compile_steady_state() -> float:
    """After the checked first call, the default path compiles with fullgraph=True (no graph break:
    the steady state is one tuple comparison, no store access)."""
    layout(dist.get_world_size(), 1)
    layer = usp_attn.USPAttention(4, 16)
    x = usp_attn.shard_sequence(_full(32, dim=16))
    eager = layer(x, x, x)
    torch._dynamo.reset()
    try:
        out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, x, x)
    finally:
        torch._dynamo.reset()
    return (out - eager).abs().max().item()


# ---- rows that can only end at the timeout, and a rank that dies (each last in its group) -------
def arguments_change_on_one_rank() -> dict:
    """After an agreed first call, rank 1 alone starts passing a mask."""
    layout(dist.get_world_size(), 1, timeout=SHORT_TIMEOUT)
    x = usp_attn.shard_sequence(_full(24))
    layer = usp_attn.USPAttention(4, 8)
    layer(x, x, x)
    mask = torch.ones(1, x.shape[1], dtype=torch.bool) if dist.get_rank() == 1 else None
    result = outcome(lambda: layer(x, x, x, attn_mask=mask))
    usp_attn.destroy_sequence_parallel()
    return result


def kernel_fails_on_one_rank() -> dict:
    """After an agreed first call at U = 2, rank 1's attention raises a ValueError (not a collective's
    RuntimeError); rank 0 waits for it in the output all-to-all until the timeout."""
    layout(dist.get_world_size(), 1, timeout=SHORT_TIMEOUT)
    x = usp_attn.shard_sequence(_full(24))
    layer = usp_attn.USPAttention(4, 8)
    layer(x, x, x)
    if dist.get_rank() == 1:
        def refuse(*args, **kwargs):
            raise ValueError("the kernel refused the block")

        layer.local.attend = refuse
    result = outcome(lambda: layer(x, x, x))
    usp_attn.destroy_sequence_parallel()
    return result


def rank_dies_before_backward() -> dict:
    """Training at U = 2: the last rank exits after the forward; the others' backward all-to-all fails and names it."""
    layout(dist.get_world_size(), 1)
    x = usp_attn.shard_sequence(_full(24)).requires_grad_()
    out = usp_attn.USPAttention(4, 8)(x, x, x)
    if dist.get_rank() == dist.get_world_size() - 1:
        os._exit(0)  # no report, no cleanup: as a crashed process
    return outcome(lambda: out.sum().backward())


def rank_dies() -> dict:
    """After an agreed first call the last rank exits; the others call the layer again."""
    layout(dist.get_world_size(), 1)
    x = usp_attn.shard_sequence(_full(24))
    layer = usp_attn.USPAttention(4, 8)
    layer(x, x, x)
    if dist.get_rank() == dist.get_world_size() - 1:
        os._exit(0)  # no report, no cleanup: as a crashed process
    return outcome(lambda: layer(x, x, x))

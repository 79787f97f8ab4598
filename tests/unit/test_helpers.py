"""The shared test helpers are themselves tested: the fp64 reference against a literal
per-element loop, and the multi-process runner's success, failure and desync reporting."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist

from tests.helpers.multiproc import GroupError, case_name, run_cases, run_in_group
from tests.helpers.reference import reference_attention


def loop_attention(q, k, v, scale, causal, mask_fn):
    """Attention written as the textbook formula, one output element at a time (tiny sizes only)."""
    b_, s_q, h_, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    out = torch.zeros(b_, s_q, h_, d, dtype=torch.float64)
    lse = torch.full((b_, h_, s_q), -math.inf, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            kv_h = h // (h_ // h_kv)
            for i in range(s_q):
                scores = []
                for j in range(s_k):
                    s = float(q[b, i, h].double() @ k[b, j, kv_h].double()) * scale + mask_fn(b, h, i, j)
                    scores.append(-math.inf if causal and j > i else s)
                top = max(scores)
                if top == -math.inf:
                    continue
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                lse[b, h, i] = top + math.log(total)
                for j, w in enumerate(weights):
                    out[b, i, h] += (w / total) * v[b, j, kv_h].double()
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", ["none", "bool2", "bool3", "bool4h", "float4"])
def test_reference_matches_the_textbook_loop(causal, form):
    g = torch.Generator().manual_seed(0)
    b_, s, h, h_kv, d = 2, 4, 4, 2, 3
    q, k, v = (torch.randn(b_, s, n, d, generator=g) for n in (h, h_kv, h_kv))
    m = {
        "none": None,
        "bool2": torch.tensor([[True, False, True, True], [False, True, True, False]]),
        "bool3": torch.rand(b_, s, s, generator=g) > 0.3,
        "bool4h": torch.rand(b_, h, s, s, generator=g) > 0.3,
        "float4": torch.randn(b_, 1, s, s, generator=g).masked_fill(torch.rand(b_, 1, s, s, generator=g) > 0.7,
                                                                   -math.inf),
    }[form]

    def mask_fn(b, hh, i, j):
        if m is None:
            return 0.0
        if m.dim() == 2:
            val = m[b, j]
        elif m.dim() == 3:
            val = m[b, i, j]
        else:
            val = m[b, hh if m.shape[1] > 1 else 0, i, j]
        return (0.0 if val else -math.inf) if m.dtype == torch.bool else float(val)

    out, lse = reference_attention(q, k, v, scale=0.7, causal=causal, mask=m, return_lse=True)
    exp_out, exp_lse = loop_attention(q, k, v, 0.7, causal, mask_fn)
    assert out.dtype == torch.float64 and out.shape == (b_, s, h, d) and lse.shape == (b_, h, s)
    torch.testing.assert_close(out, exp_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, exp_lse, atol=1e-12, rtol=1e-12)


def test_reference_empty_rows_and_default_scale():
    q, k, v = (torch.randn(1, 3, 2, 4) for _ in range(3))
    mask = torch.zeros(1, 3, dtype=torch.bool)
    out, lse = reference_attention(q, k, v, mask=mask, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    torch.testing.assert_close(reference_attention(q, k, v), reference_attention(q, k, v, scale=0.5))


# ---- multiproc runner ------------------------------------------------------------------------------------
def _sum_of_ranks(offset):
    t = torch.tensor([dist.get_rank() + offset], dtype=torch.float64)
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _fails_on_rank_1():
    if dist.get_rank() == 1:
        raise ZeroDivisionError("planted failure on rank 1")
    dist.barrier()  # rank 0 waits here for a rank that never comes: must time out, not hang


def _never_reached():
    return "ran"


def test_run_cases_reports_values_failures_and_skips():
    ok = functools.partial(_sum_of_ranks, 10)
    run = run_cases(2, [ok, _fails_on_rank_1, _never_reached], collective_timeout=3, timeout=60)
    assert run.check(ok) == [(0, 2, 21.0), (1, 2, 21.0)]

    with pytest.raises(GroupError) as info:
        run.check(_fails_on_rank_1)
    text = str(info.value)
    assert "case '_fails_on_rank_1' failed on rank(s) [0, 1] of 2" in text
    assert "--- rank 1 ---" in text and "ZeroDivisionError: planted failure on rank 1" in text
    assert "--- rank 0 ---" in text and "Traceback" in text  # rank 0's barrier timed out

    with pytest.raises(GroupError, match="not run: case '_fails_on_rank_1' failed first"):
        run.check(_never_reached)
    assert case_name(ok) == "_sum_of_ranks(10)"


def test_run_in_group_returns_per_rank_values():
    assert run_in_group(2, _sum_of_ranks, 0) == [(0, 2, 1.0), (1, 2, 1.0)]

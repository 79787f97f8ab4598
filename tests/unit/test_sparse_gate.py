"""The accuracy gate (usp_attn.sparse.AccuracyGate) on one process: the first call of a shape class compares
sampled rows with dense attention; a pattern over the limit runs dense (exactly the dense result, text rows
too), under it sparse; the verdict is kept per shape class and forgotten when the gate changes."""

from __future__ import annotations

import logging

import pytest
import torch

import usp_attn
from usp_attn import LocalAttention, ReplicatedRows
from usp_attn.sparse import AccuracyGate, SlidingTileSparsity, VideoGrid, masked_reference, sparsity_error
from usp_attn.sparse import gate as gate_module

from tests.helpers.state import reset_usp_attn_state

PATTERN = SlidingTileSparsity(VideoGrid(6, 4, 8), tile=(2, 2, 4), window=(1, 1, 1))  # keeps ~10 %
ROWS = ReplicatedRows(3, 2)


@pytest.fixture(autouse=True)
def _fresh():
    reset_usp_attn_state()
    yield
    reset_usp_attn_state()


def _qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = 3 + PATTERN.grid.num_tokens + 2
    return (torch.randn(1, s, 4, 16, generator=gen) for _ in range(3))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _count_judgements(monkeypatch):
    calls = []
    real = gate_module.judge

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr("usp_attn.layers.local.judge", counting)
    return calls


def test_over_the_limit_runs_dense_and_says_so(monkeypatch, caplog):
    q, k, v = _qkv()
    layer = LocalAttention(4, 16, sparse_gate=AccuracyGate(max_error=1e-3, sample_rows=32))
    calls = _count_judgements(monkeypatch)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="usp_attn"):
        out = layer(q, k, v, sparsity=PATTERN, replicated=ROWS)
        again = layer(q, k, v, sparsity=PATTERN, replicated=ROWS)
        dense = LocalAttention(4, 16)(q, k, v)
    assert len(calls) == 1  # judged once per shape class
    assert torch.equal(out, dense) and torch.equal(again, dense)
    assert "runs dense" in caplog.text and "relative error" in caplog.text


def test_under_the_limit_keeps_the_pattern(monkeypatch):
    q, k, v = _qkv(1)
    _, error = sparsity_error(q[:, 3:-2], k[:, 3:-2], v[:, 3:-2], PATTERN)
    layer = LocalAttention(4, 16, sparse_gate=10 * error + 1.0)  # a float: the max error
    calls = _count_judgements(monkeypatch)
    with torch.no_grad():
        out = layer(q, k, v, sparsity=PATTERN, replicated=ROWS)
        layer(q, k, v, sparsity=PATTERN, replicated=ROWS)
        layer(q[:, :-1], k[:, :-1], v[:, :-1], sparsity=PATTERN, replicated=ReplicatedRows(3, 1))  # a new class
    ref = masked_reference(q.double(), k.double(), v.double(), PATTERN, num_replicated_prefix=3,
                           num_replicated_suffix=2)
    assert _rel(out, ref) <= 1e-5
    assert len(calls) == 2
    layer.sparse_gate = AccuracyGate(1e-9)  # a new gate forgets the verdicts
    with torch.no_grad():
        assert torch.equal(layer(q, k, v, sparsity=PATTERN, replicated=ROWS), LocalAttention(4, 16)(q, k, v))


def test_the_sampled_error_tracks_the_true_error():
    """All rows sampled: the gate's error is the pattern's error on the grid rows (sparsity_error)."""
    q, k, v = _qkv(2)
    grid = slice(3, 3 + PATTERN.grid.num_tokens)
    with torch.no_grad():
        sparse = LocalAttention(4, 16)(q, k, v, sparsity=PATTERN, replicated=ROWS)
        dense = LocalAttention(4, 16)(q, k, v)
    _, true_error = sparsity_error(q[:, 3:-2], k[:, 3:-2], v[:, 3:-2], PATTERN)
    gate = AccuracyGate(0.5, sample_rows=10_000)
    picked = gate_module.sample_rows(3, PATTERN.grid.num_tokens, gate, "cpu")
    assert torch.equal(picked, torch.arange(3, 3 + PATTERN.grid.num_tokens))
    err = _rel(sparse[:, grid], dense[:, grid])  # what judge computes
    assert gate_module.judge(AccuracyGate(err * 1.0001), sparse[:, picked], dense[:, picked], None, "t")
    assert not gate_module.judge(AccuracyGate(err * 0.9999), sparse[:, picked], dense[:, picked], None, "t")
    # text keys are dense in both, so the grid-row error differs from sparsity_error's (grid keys only)
    assert 0 < err and 0 < true_error


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "0.1"])
def test_bad_gates_are_clear_errors(bad):
    with pytest.raises((TypeError, ValueError), match="max_error|sparse_gate"):
        LocalAttention(4, 16, sparse_gate=bad)
    with pytest.raises(ValueError, match="sample_rows"):
        AccuracyGate(0.1, sample_rows=0)


def test_usp_attention_at_world_one_gates_too():
    q, k, v = _qkv(3)
    layer = usp_attn.USPAttention(4, 16, sparse_gate=1e-6)
    with torch.no_grad():
        out = layer(q, k, v, num_replicated_prefix=3, num_replicated_suffix=2, sparsity=PATTERN)
        assert torch.equal(out, LocalAttention(4, 16)(q, k, v))

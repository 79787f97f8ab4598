"""Capturing a model's attention inputs and measuring candidate patterns on them (one process)."""

from __future__ import annotations

import torch
from torch import nn

import usp_attn
from usp_attn.sparse import SlidingTileSparsity, TopMassSparsity, VideoGrid
from usp_attn.sparse.capture import capture_attention_inputs, pattern_report


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = usp_attn.USPAttention(4, 8, 2)
        self.cross_attn = usp_attn.USPAttention(4, 8, 2, skip_sequence_parallel=True)
        self.local = usp_attn.LocalAttention(4, 8, 2)

    def forward(self, q, k, v, text_k, text_v):
        out = self.self_attn(q, k, v, num_replicated_prefix=2)
        out = out + self.cross_attn(q, text_k, text_v)
        return out + self.local(q, k, v)


def test_capture_keeps_self_attention_calls_and_the_report_measures_them():
    torch.manual_seed(0)
    grid = VideoGrid(3, 4, 5)
    q, k, v = (torch.randn(1, 2 + grid.num_tokens, 4 if i == 0 else 2, 8) for i in range(3))
    text_k, text_v = torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
    model = _Toy()
    for scope in (model, None):  # one model's layers by name, or every layer in the process
        with capture_attention_inputs(scope, max_calls=1) as captured, torch.no_grad():
            model(q, k, v, text_k, text_v)
            model(q, k, v, text_k, text_v)  # past max_calls: not recorded
        assert len(captured) == 2  # self_attn and local, not the cross-attention, not the USP layer's own local
        assert torch.equal(captured[0].k, k) and captured[0].q.shape == q.shape
        if scope is model:
            assert [(c.name, c.prefix) for c in captured] == [("self_attn", 2), ("local", 0)]
            usp = captured[:1]
        else:
            assert [c.name for c in captured] == ["USPAttention#0", "LocalAttention#1"]
    captured = usp
    patterns = {"tiles": SlidingTileSparsity(grid, (1, 2, 5), (1, 1, 1)), "dense": TopMassSparsity(1.0),
                "wrong grid": SlidingTileSparsity(VideoGrid(2, 2, 2), (1, 1, 1), (1, 1, 1))}
    rows = pattern_report(captured, patterns, per_head=True)
    assert len(rows) == 3 * 4
    dense = [r for r in rows if r["pattern"] == "dense"]
    assert all(r["density"] == 1.0 and r["rel_err"] == 0.0 for r in dense)
    tiles = [r for r in rows if r["pattern"] == "tiles"]
    assert all(0 < r["density"] < 1 and r["rel_err"] > 0 for r in tiles)
    assert all("skipped" in r["note"] for r in rows if r["pattern"] == "wrong grid")

"""Cases of test_ulysses_pipeline.py: the Ulysses steps pipelined over head groups against the unpipelined
layer, bit for bit (CPU fp32, gloo), for every group count from 1 to the heads per Ulysses rank."""

from __future__ import annotations

import torch

import usp_attn
from tests.helpers.reference import reference_attention

#: name -> (heads, kv heads, text prefix, text suffix, key mask, causal on the zigzag layout)
CONFIGS = {
    "mha": (6, 6, 0, 0, False, False),
    "gqa": (8, 2, 0, 0, False, False),
    "gqa-half": (8, 4, 0, 0, False, False),
    "heads-not-divisible": (5, 5, 0, 0, False, False),
    "text-rows-and-mask": (4, 4, 3, 2, True, False),
    "gqa-text": (6, 3, 2, 0, False, False),
    "causal-zigzag": (4, 4, 0, 0, False, True),
}
SEQ, HEAD = 23, 8  # uneven shards


def _inputs(heads, kv_heads, pre, suf, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = pre + SEQ + suf
    q = torch.randn(2, rows, heads, HEAD, generator=g)
    k, v = (torch.randn(2, rows, kv_heads, HEAD, generator=g) for _ in range(2))
    keep = torch.rand(2, SEQ, generator=g) > 0.3
    return q, k, v, keep


def every_group_count(u: int, r: int, name: str) -> dict:
    """Per group count: whether the pipelined output equals the unpipelined one exactly."""
    heads, kv_heads, pre, suf, masked, zigzag = CONFIGS[name]
    usp_attn.init_sequence_parallel(ulysses_degree=u, ring_degree=r)
    try:
        q, k, v, keep = _inputs(heads, kv_heads, pre, suf)

        def local(t):
            shard = usp_attn.shard_sequence(t[:, pre : pre + SEQ], load_balance=zigzag)
            return torch.cat([t[:, :pre], shard, t[:, pre + SEQ :]], dim=1)

        ql, kl, vl = (local(t) for t in (q, k, v))
        kwargs = dict(num_replicated_prefix=pre, num_replicated_suffix=suf)
        if masked:
            text_keep = torch.ones(2, pre + suf, dtype=torch.bool)
            shard_keep = usp_attn.shard_sequence(keep)
            kwargs["attn_mask"] = torch.cat([text_keep[:, :pre], shard_keep, text_keep[:, pre:]], dim=1)
        baseline = usp_attn.USPAttention(heads, HEAD, kv_heads, causal=zigzag, ulysses_pipeline=1)
        expected = baseline(ql, kl, vl, **kwargs)
        local_heads = -(-heads // u)
        equal, worst = {}, 0.0
        for count in range(1, local_heads + 1):
            layer = usp_attn.USPAttention(heads, HEAD, kv_heads, causal=zigzag, ulysses_pipeline=count)
            outs = [layer(ql, kl, vl, **kwargs) for _ in range(2)]  # the first call checked, the second steady
            equal[count] = all(torch.equal(o, expected) for o in outs)
            worst = max([worst] + [(o - expected).abs().max().item() for o in outs])
        # the unpipelined layer's accuracy is the other tests' business; here a sanity check that it is attention
        error = None
        if not (masked or pre or suf):
            error = (expected.double() - local(reference_attention(q, k, v, causal=zigzag))).abs().max().item()
        return {"equal": equal, "local_heads": local_heads, "error": error, "worst": worst,
                "scale": expected.abs().max().item()}
    finally:
        usp_attn.destroy_sequence_parallel()


def auto_on_cpu(u: int, r: int) -> int:
    """The automatic group count on the CPU: 1, decided without timing."""
    usp_attn.init_sequence_parallel(ulysses_degree=u, ring_degree=r)
    try:
        q, k, v, _ = _inputs(8, 8, 0, 0)
        layer = usp_attn.USPAttention(8, HEAD)
        layer(*(usp_attn.shard_sequence(t) for t in (q, k, v)))
        return layer.__dict__["_pipeline"][1]
    finally:
        usp_attn.destroy_sequence_parallel()


def counts_differ(u: int, r: int) -> str:
    """Rank 0 pipelines over 2 groups, the others not: the first call raises on every rank, naming the setting
    (the ranks would otherwise run different numbers of all-to-alls)."""
    import torch.distributed as dist

    usp_attn.init_sequence_parallel(ulysses_degree=u, ring_degree=r, timeout=30)
    try:
        q, k, v, _ = _inputs(4, 4, 0, 0)
        layer = usp_attn.USPAttention(4, HEAD, ulysses_pipeline=2 if dist.get_rank() == 0 else 1)
        try:
            layer(*(usp_attn.shard_sequence(t) for t in (q, k, v)))
        except ValueError as exc:
            return str(exc)
        return "no error"
    finally:
        usp_attn.destroy_sequence_parallel()

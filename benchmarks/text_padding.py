"""Part "text-padding": joint attention whose text keys are padded, two ways of masking them.

HunyuanVideo-like call (B=1, H=24, D=128, bf16): 32640 video tokens sharded over the ranks, 256
text tokens replicated on every rank (``num_replicated_suffix``), of which the last 56 are
padding. Per layout, ``USPAttention`` with

* ``attn_mask``: a key mask over every key: masked calls run a kernel that takes masks (on
  Hopper: the memory-efficient one) over the whole sequence;
* ``replicated_key_mask``: the mask over the text keys only: the video keys run on the layer's
  fastest kernel, the text keys masked, merged by LSE (usp_attn/layers/replicated_keys.py).

Rows: slowest rank's median ms and the error of the gathered output against one device's
``LocalAttention`` with the full mask; ``speedup`` = attn_mask time / replicated_key_mask time.
"""

from __future__ import annotations

import torch

import usp_attn
from benchmarks.suite import Context, layout_name, layouts_of, rel_err, sequence_parallel, short_error

__all__ = ["text_padding_part"]

GPU = dict(video=32640, text=256, valid=200, heads=24, dim=128, dtype=torch.bfloat16)
CPU = dict(video=96, text=8, valid=5, heads=4, dim=16, dtype=torch.float32)


def text_padding_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    n, t, h, d = cfg["video"], cfg["text"], cfg["heads"], cfg["dim"]
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    qkv = [torch.randn(1, n + t, h, d, generator=gen, device=ctx.device, dtype=cfg["dtype"]) for _ in range(3)]
    text_mask = torch.arange(t, device=ctx.device)[None] < cfg["valid"]  # [1, t]
    full_mask = torch.cat([torch.ones(1, n, dtype=torch.bool, device=ctx.device), text_mask], 1)
    reference = usp_attn.LocalAttention(h, d)(*qkv, full_mask)
    rows = []
    for u, r in layouts_of(ctx.world):
        with sequence_parallel(ctx, u, r):
            local = [torch.cat([usp_attn.shard_sequence(x[:, :n]), x[:, n:]], 1).contiguous() for x in qkv]
            mask = torch.cat([usp_attn.shard_sequence(full_mask[:, :n], dim=1), text_mask], 1)
            layer = usp_attn.USPAttention(h, d)
            calls = {"attn_mask (every key)": lambda: layer(*local, mask, num_replicated_suffix=t, seq_len=n),
                     "replicated_key_mask (text keys only)":
                         lambda: layer(*local, num_replicated_suffix=t, seq_len=n, replicated_key_mask=text_mask)}
            timed = {}
            for what, call in calls.items():
                row = {"what": what, "shape": f"1,{h},{n}+{t},{d}", "layout": layout_name(u, r)}
                try:
                    out = call()
                    got = torch.cat([usp_attn.gather_sequence(out[:, : out.shape[1] - t]), out[:, -t:]], 1)
                    row["rel_err"] = ctx.max_over_ranks(rel_err(got, reference))
                    timed[what] = ctx.max_over_ranks(ctx.measure(lambda _: call(), [(None,)], warmup=2).median)
                    row["ms"] = timed[what] * 1e3
                except Exception as exc:  # a failure is a result
                    row["note"] = f"error: {short_error(exc)}"
                rows.append(row)
            if len(timed) == 2:
                rows[-1]["speedup"] = timed["attn_mask (every key)"] / timed["replicated_key_mask (text keys only)"]
    return rows

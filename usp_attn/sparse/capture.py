"""Choosing a pattern for a real model: capture its attention inputs, then measure candidate patterns on them.

    from usp_attn.sparse.capture import capture_attention_inputs, pattern_report

    with capture_attention_inputs(max_calls=2) as captured:     # every usp_attn attention layer in the process
        pipe(prompt, num_inference_steps=2)                     # or the built-in model's denoising loop
    rows = pattern_report(captured, {"tile 3x5x5": tiles, "top mass .95": TopMassSparsity(0.95)})

Capture in one process (no sequence parallelism: a rank sees only its shard) on a short run at the real
resolution; the first steps are the ones most patterns hurt most, so capture those too. Only self-attention calls
are kept (queries and keys of the same length); the inputs are copied to the CPU as float32.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from usp_attn.sparse.reference import sparsity_error

__all__ = ["CapturedCall", "capture_attention_inputs", "pattern_report"]


@dataclasses.dataclass
class CapturedCall:
    """One self-attention call: ``q [B, S, H, D]``, ``k, v [B, S, H_kv, D]`` (CPU, float32), the module's
    name, its call index, and the text rows around the grid (``num_replicated_prefix/suffix``)."""

    name: str
    call: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix: int = 0
    suffix: int = 0


@contextlib.contextmanager
def capture_attention_inputs(model: nn.Module | None = None, *, max_calls: int = 1, layers=None):
    """Record the inputs of usp_attn's attention layers while the block runs.

    Args:
        model: record only layers inside this module (named by their path in it); ``None``: every
            ``LocalAttention``/``USPAttention`` called in the process (the diffusers route makes its
            layers on the fly), named by class and first call; this mode sees positional arguments
            only (text rows given as keywords are recorded as 0).
        max_calls: calls recorded per layer (the first ones, e.g. the first denoising steps).
        layers: names (or a predicate on the name) to keep; default all.

    Yields:
        a list that fills with :class:`CapturedCall` as the model runs.
    """
    from usp_attn.layers.local import LocalAttention
    from usp_attn.layers.usp import USPAttention

    captured: list[CapturedCall] = []
    names = {} if model is None else {id(m): n for n, m in model.named_modules()}
    counts: dict[str, int] = {}
    inner: set[int] = set()  # a USPAttention's own LocalAttention: its call is the USP call, recorded once

    def keep(name: str) -> bool:
        if layers is None:
            return True
        return layers(name) if callable(layers) else name in layers

    def hook(module, args, kwargs):
        if isinstance(module, USPAttention):
            inner.add(id(module.local))
            if module.skip_sequence_parallel:
                return None
        elif not isinstance(module, LocalAttention) or id(module) in inner:
            return None
        if model is not None and id(module) not in names:
            return None
        if id(module) not in names:  # process-wide: named by class and first call
            names[id(module)] = f"{type(module).__name__}#{len(names)}"
        name = names[id(module)]
        q, k, v = (list(args[:3]) + [kwargs.get(n) for n in ("q", "k", "v")[len(args):]])[:3]
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.shape[1] != k.shape[1] or not keep(name):
            return None
        call = counts.get(name, 0)
        if call >= max_calls:
            return None
        counts[name] = call + 1
        prefix = kwargs.get("num_replicated_prefix", args[4] if len(args) > 4 else 0)
        suffix = kwargs.get("num_replicated_suffix", args[5] if len(args) > 5 else 0)
        captured.append(CapturedCall(str(name), call, *(t.detach().float().cpu() for t in (q, k, v)), int(prefix),
                                     int(suffix)))
        return None

    if model is not None:
        hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
                 if isinstance(m, (LocalAttention, USPAttention))]
    else:
        hooks = [nn.modules.module.register_module_forward_pre_hook(_global(hook))]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def _global(hook):
    # torch's process-wide hook sees positional arguments only: text rows passed as keywords
    # (num_replicated_prefix=...) are recorded as 0 there; pass ``model=`` to record them.
    return lambda module, args: hook(module, args, {})


def pattern_report(captured: list[CapturedCall], patterns: dict, *, per_head: bool = False) -> list[dict]:
    """Density and relative error vs dense of each pattern on each captured call (and each head).

    Returns rows ``{"layer", "call", "pattern", "head" (with per_head), "density", "rel_err"}``. Patterns whose grid
    does not match a call's token count are skipped for it (row with ``"note"``).
    """
    rows = []
    for c in captured:
        heads = range(c.q.shape[2]) if per_head else [None]
        for label, pattern in patterns.items():
            for h in heads:
                row = {"layer": c.name, "call": c.call, "pattern": label}
                if h is not None:
                    row["head"] = h
                    kv = h // (c.q.shape[2] // c.k.shape[2])
                    q, k, v = c.q[:, :, h : h + 1], c.k[:, :, kv : kv + 1], c.v[:, :, kv : kv + 1]
                    pattern_h = _one_head(pattern, h)
                else:
                    q, k, v, pattern_h = c.q, c.k, c.v, pattern
                try:
                    density, err = sparsity_error(q, k, v, pattern_h, num_replicated_prefix=c.prefix,
                                                  num_replicated_suffix=c.suffix)
                    row.update(density=density, rel_err=err)
                except ValueError as exc:
                    row["note"] = f"skipped: {exc}"
                rows.append(row)
    return rows


def _one_head(pattern, head: int):
    """The pattern of one head, as a pattern over a one-head tensor."""
    if getattr(pattern, "per_head", False):
        return dataclasses.replace(pattern, window=pattern.head_window(head))
    return pattern

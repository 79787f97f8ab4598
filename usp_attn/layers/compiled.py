"""The sequence-parallel call as one custom op, so ``torch.compile(fullgraph=True)`` traces it.

Under ``torch.compile`` a ``USPAttention`` call at world > 1 (inference) becomes one node of the
graph, ``usp_attn::sp_attention``: dynamo sees its inputs and a shape rule (the output has q's
shape; the log-sum-exp is ``[B, H, q rows]``), never its Python. At run time the node runs the
layer's eager forward unchanged. Why one opaque op rather than functional collectives:

* the ring passes K/V with ``batch_isend_irecv``, which dynamo cannot trace, and its speed comes
  from starting the next hop's transfer before this hop's kernel and waiting after it. A graph of
  functional collectives would have to rebuild that schedule from separate start/wait nodes; the
  op keeps the eager loop, so the overlap (and the side-stream merge) stay as they are;
* the result is the eager result bit for bit, by construction;
* the argument check and the measured kernel choice stay outside the graph: they run in the op's
  eager body, the first call of a signature checks across the ranks (through the store, host
  only), later calls compare one tuple, exactly as in eager mode.

What it costs: the layer's host work still runs once per call (about as in eager mode) unless
the graph is also captured (``mode="reduce-overhead"`` or ``torch.cuda.graph``), and the compiler
cannot move the all-to-all across neighbouring ops. Gradients are not routed through the op
(training at world > 1 traces the Python and breaks the graph), nor are sparse patterns.

A layer is found by a small integer recorded on it when it is built (and renewed for a copy):
custom ops take tensors and plain values, not modules.
"""

from __future__ import annotations

import itertools
import weakref

import torch

__all__ = ["register", "sp_attention"]

_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)
_OP = None


def register(layer: torch.nn.Module) -> int:
    """Give ``layer`` a fresh id the op can find it by (and register the op, eagerly: dynamo
    cannot trace a registration). Returns the id."""
    _op()
    key = next(_IDS)
    _LAYERS[key] = layer
    return key


def _op():
    global _OP
    if _OP is not None:
        return _OP

    @torch.library.custom_op("usp_attn::sp_attention", mutates_args=())
    def sp_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                        replicated_key_mask: torch.Tensor | None, layer: int, rows: list[int], seq_len: int | None,
                        return_lse: bool, load_balance: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
        module = _LAYERS.get(layer)
        if module is None:
            raise RuntimeError(f"usp_attn: the USPAttention layer {layer} of this compiled graph no longer exists")
        from usp_attn.arguments import ReplicatedRows

        result = module(q, k, v, attn_mask, seq_len=seq_len, return_lse=return_lse, load_balance=load_balance,
                        replicated_key_mask=replicated_key_mask, replicated=ReplicatedRows(*rows))
        out, lse = result if return_lse else (result, None)
        # The graph assumed fresh, contiguous results (the shape rule below); the values are the eager ones.
        out = out.contiguous()
        lse = _no_lse(q) if lse is None else lse.contiguous()
        return out, lse

    @sp_attention_op.register_fake
    def _(q, k, v, attn_mask, replicated_key_mask, layer, rows, seq_len, return_lse, load_balance):
        out = q.new_empty(q.shape)
        if not return_lse:
            return out, _no_lse(q)
        dtype = torch.promote_types(q.dtype, torch.float32)
        return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=dtype)

    _OP = sp_attention_op
    return _OP


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((0,), dtype=torch.float32)


def sp_attention(layer_id: int, q, k, v, attn_mask, replicated_key_mask, rows, seq_len, return_lse, load_balance):
    """The traced call: ``q [B, rows_q, H, D]``, ``k, v [B, rows_k, H_kv, D]`` as for
    ``USPAttention.forward``; ``rows`` the :class:`~usp_attn.ReplicatedRows`. Returns ``out`` (q's
    shape and dtype) or ``(out, lse [B, H, rows_q])`` with ``return_lse``."""
    out, lse = _OP(q, k, v, attn_mask, replicated_key_mask, layer_id,
                   [rows.prefix, rows.suffix, rows.kv_prefix, rows.kv_suffix], seq_len, return_lse, load_balance)
    return (out, lse) if return_lse else out

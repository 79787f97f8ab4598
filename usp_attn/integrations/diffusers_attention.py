"""Attention of a diffusers transformer under sequence parallelism: diffusers' own processors, our kernel.

diffusers' attention processors do the family-specific math (projections, q/k norms, RoPE, joining text and
image tokens) and then call ``dispatch_attention_fn(query, key, value, attn_mask=..., scale=...)`` with
``[B, S, H, D]`` tensors. That call is the one place where a sharded sequence needs communication, so it is
the one place we take over: while an attention module of an enabled model runs inside a sequence-parallel call,
``dispatch_attention_fn`` in its processor's module resolves to :func:`route`, which runs
:class:`~usp_attn.USPAttention`; anywhere else (other models, other threads, calls outside the transformer's
forward) the original function runs unchanged.

Which attention a call is follows from the lengths (``s`` = this rank's token shard, ``N`` = the call's token
count):

============================  ===============================  =========================================
q length / module call        kind                             run as
============================  ===============================  =========================================
``s``, encoder states given   cross-attention (text, image)    local: q shard vs full k/v, no communication
``s``, no encoder states      self-attention over the tokens   USPAttention(seq_len=N)
``s + n``, k the same length  joint text+image attention       USPAttention with n replicated text tokens as
                                                               prefix/suffix (FamilyPlan.joint_text)
============================  ===============================  =========================================

Masks: cross-attention takes any mask diffusers builds (broadcast over queries where needed); self/joint
attention takes key-padding masks (bool, or additive 0 / <= -1e4), e.g. Qwen-Image's and HunyuanVideo's
text padding.

Private diffusers API used: the module-level name ``dispatch_attention_fn`` that processors call (checked when a
model is enabled, and the diffusers version is checked against the tested range).
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import logging

import torch

from usp_attn.layers.usp import USPAttention
from usp_attn.selector import log_once

__all__ = ["ActiveAttention", "attention_module_call", "install_router", "uninstall_router", "DISPATCH_NAME"]

DISPATCH_NAME = "dispatch_attention_fn"
_MASKED_BIAS = -1e4  # additive mask values at or below this count as "masked" (diffusers uses -10000 and -inf)


@dataclasses.dataclass
class ActiveAttention:
    """The attention module running now, inside a sequence-parallel call of ``run``."""

    run: object  # diffusers_apply.SequenceParallelRun
    path: str
    encoder_given: bool
    routed: int = 0


_current: contextvars.ContextVar[ActiveAttention | None] = contextvars.ContextVar("usp_attn_attention", default=None)


def attention_module_call(active: ActiveAttention | None):
    """Set (or with ``None`` clear) the running attention module; returns the token for ``reset``."""
    return _current.set(active)


def reset_attention_module_call(token) -> None:
    _current.reset(token)


# ---- the patched name ----------------------------------------------------------------------------------
# One router per processor module (keyed by the module's globals dict), counted by the enabled models using it.
_installed: dict[int, list] = {}  # id(globals) -> [globals, original, router, users]


def install_router(processor) -> None:
    """Route ``dispatch_attention_fn`` of ``processor``'s module through :func:`route` (counted)."""
    namespace = _namespace(processor)
    entry = _installed.get(id(namespace))
    if entry is None:
        original = namespace[DISPATCH_NAME]
        signature = inspect.signature(original)

        def router(*args, **kwargs):
            active = _current.get()
            if active is None or not active.run.context.sharding:
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return route(active, bound.arguments)

        router.__wrapped__ = original
        entry = _installed[id(namespace)] = [namespace, original, router, 0]
        namespace[DISPATCH_NAME] = router
    entry[3] += 1


def uninstall_router(processor) -> None:
    namespace = _namespace(processor)
    entry = _installed.get(id(namespace))
    if entry is None:
        return
    entry[3] -= 1
    if entry[3] <= 0:
        if namespace.get(DISPATCH_NAME) is entry[2]:
            namespace[DISPATCH_NAME] = entry[1]
        del _installed[id(namespace)]


def routes_through_dispatch(processor) -> bool:
    """Whether ``processor`` computes attention by calling ``dispatch_attention_fn`` from its module."""
    return DISPATCH_NAME in _namespace(processor)


def _namespace(processor) -> dict:
    call = getattr(type(processor), "__call__", None)
    return getattr(call, "__globals__", {})


# ---- one routed call -----------------------------------------------------------------------------------
def route(active: ActiveAttention, arguments: dict) -> torch.Tensor:
    """Run one ``dispatch_attention_fn`` call of a sharded model with usp_attn (see the module doc)."""
    run = active.run
    active.routed += 1
    q, k, v = arguments["query"], arguments["key"], arguments["value"]
    mask = arguments.get("attn_mask")
    where = f"{run.model_name}.{active.path}"
    if arguments.get("dropout_p", 0.0):
        raise ValueError(f"{where}: attention dropout ({arguments['dropout_p']}) is not supported under usp_attn "
                         "sequence parallelism (inference only); call model.eval()")
    if arguments.get("parallel_config") is not None:
        raise ValueError(f"{where}: diffusers' own context parallelism was enabled on a model that runs under usp_attn "
                         "sequence parallelism; use one or the other")
    requested = arguments.get("backend")
    if requested is not None:
        log_once(logging.INFO, f"usp_attn: {where} asks for diffusers attention backend '{requested}'; under sequence "
                 "parallelism the usp_attn backend agreed by the group runs instead")
    state, total = run.state, run.context.seq_len
    s = state.sizes(total)[state.sp_rank]
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{where}: expected query/key [B, S, H, D], got {list(q.shape)} and {list(k.shape)}")
    batch, lq, heads, head_size = q.shape
    lk, kv_heads = k.shape[1], k.shape[2]
    scale, causal = arguments.get("scale"), bool(arguments.get("is_causal", False))

    if lq == s and active.encoder_given:  # cross-attention: this rank's queries against full text/image k/v
        layer = run.layer(heads, kv_heads, head_size, scale, causal, cross=True)
        return layer(q, k, v, _cross_mask(mask, lq))
    if lq == s:
        if lk != s:
            raise ValueError(f"{where}: self-attention over this rank's {s} tokens got {lk} keys; expected {s}")
        layer = run.layer(heads, kv_heads, head_size, scale, causal, cross=False)
        return layer(q, k, v, _key_padding(mask, batch, lk, where), seq_len=total)
    if lq > s and lk == lq:
        text = lq - s
        position = run.family.joint_text
        if position is None:
            raise ValueError(
                f"{where}: joint attention over {s} sharded tokens and {text} other tokens, but the "
                f"{run.family.family} plan does not say where the text tokens are (FamilyPlan.joint_text)"
            )
        layer = run.layer(heads, kv_heads, head_size, scale, causal, cross=False)
        counts = {"num_replicated_prefix": text} if position == "prefix" else {"num_replicated_suffix": text}
        keys = _key_padding(mask, batch, lk, where)
        if keys is not None and run.family.text_only_masks:
            text_keys, image_keys = (keys[:, :text], keys[:, text:]) if position == "prefix" else (
                keys[:, s:], keys[:, :s])
            torch._assert_async(image_keys.all(), f"{where}: the {run.family.family} plan says its joint attention "
                                "masks text keys only (FamilyPlan.text_only_masks), but image keys are masked")
            return layer(q, k, v, seq_len=total, replicated_key_mask=text_keys, **counts)
        return layer(q, k, v, keys, seq_len=total, **counts)
    raise ValueError(
        f"{where}: cannot place an attention call with {lq} queries and {lk} keys in a sequence sharded to {s} "
        f"of {total} tokens on this rank (neither self-, cross- nor joint attention)"
    )


def make_layer(heads, kv_heads, head_size, scale, causal, cross, state) -> USPAttention:
    return USPAttention(heads, head_size, num_kv_heads=kv_heads, softmax_scale=scale, causal=causal,
                        skip_sequence_parallel=cross, state=state)


def _cross_mask(mask, lq: int):
    """diffusers' masks broadcast over queries ([B, 1, S_k], [B, H, 1, S_k]); ours name S_q: expand (a view)."""
    if mask is None:
        return None
    if mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, None]
    if mask.dim() == 4 and mask.shape[2] == 1 and lq != 1:
        mask = mask.expand(mask.shape[0], mask.shape[1], lq, mask.shape[3])
    return mask


def _key_padding(mask, batch: int, lk: int, where: str):
    """A mask that only hides keys, as bool ``[B, S_k]`` (True = attend); anything else is an error."""
    if mask is None:
        return None
    shape = tuple(mask.shape)
    if mask.dim() in (2, 3, 4) and shape[0] == batch and shape[-1] == lk and all(n == 1 for n in shape[1:-1]):
        flat = mask.reshape(batch, lk)
    else:
        raise ValueError(
            f"{where}: under sequence parallelism usp_attn takes key-padding masks ([B, S_k], [B, 1, S_k] or "
            f"[B, 1, 1, S_k] with S_k={lk}), got {mask.dtype} {list(shape)}"
        )
    if flat.dtype == torch.bool:
        return flat
    keep = flat == 0
    if not bool(torch.all(keep | (flat <= _MASKED_BIAS))):
        raise ValueError(f"{where}: an additive attention mask with values other than 0 and <= {_MASKED_BIAS} is "
                         "not a padding mask; usp_attn cannot shard it")
    return keep

"""Attention of a diffusers transformer under sequence parallelism: diffusers' own processors, our kernel.

diffusers' attention processors do the family-specific math (projections, q/k norms, RoPE, joining text and
image tokens) and then call ``dispatch_attention_fn(query, key, value, attn_mask=..., scale=...)`` with
``[B, S, H, D]`` tensors. That call is the one place where a sharded sequence needs communication, so it is
the one place we take over: while an attention module of an enabled model runs inside a sequence-parallel call,
``dispatch_attention_fn`` in its processor's module resolves to the model's :class:`AttentionRouter` (made and
owned by its ``SequenceParallelRun``), which runs :class:`~usp_attn.USPAttention`; anywhere else (other models,
other threads, calls outside the transformer's forward) the original function runs unchanged. This module knows
nothing of the run: the run passes in what routing needs (the plan, the state, each call's token count).

Which attention a module computes, the plan declares (``FamilyPlan.attention``); the lengths only check the
declaration (``s`` = this rank's token shard, ``N`` = the call's token count):

============  ===============================  ================================  ===================================
declared      q length / module call           attention                         run as
============  ===============================  ================================  ===================================
``"cross"``   ``s``, encoder states given      q shard vs text/image k/v         local: no communication
``"self"``    ``s``, k ``s``, no encoder       over every rank's tokens          USPAttention(seq_len=N)
``"joint"``   ``s + n``, k the same length     text and every rank's tokens      USPAttention with n replicated text
                                                                                 tokens as prefix/suffix (joint_text)
============  ===============================  ================================  ===================================

The check runs at a module's first call for each ``N`` (every call with ``validate=True``), on every rank at
once through the state's guard (:class:`~usp_attn.distributed.guard.CallGuard`), before any collective of the
call: a rank whose call does not fit its declaration makes every rank raise the same error, naming the module,
the rank and its lengths, instead of leaving the others waiting in a collective.

Shards are always the contiguous ones the run cuts (``load_balance=False``), whatever layout a
``shard_sequence`` call elsewhere recorded on the state.

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

from usp_attn.distributed.sharding import require_state
from usp_attn.distributed.state import SequenceParallelState
from usp_attn.integrations.diffusers.plan import FamilyPlan
from usp_attn.layers.usp import USPAttention
from usp_attn.logs import log_once

__all__ = ["ActiveAttention", "AttentionRouter", "attention_module_call", "install_router", "uninstall_router",
           "DISPATCH_NAME"]

DISPATCH_NAME = "dispatch_attention_fn"
_MASKED_BIAS = -1e4  # additive mask values at or below this count as "masked" (diffusers uses -10000 and -inf)


@dataclasses.dataclass
class ActiveAttention:
    """The attention module running now, inside a sequence-parallel call whose attention ``router`` runs.

    ``kind``: what the plan declares it computes (``None`` only where a plan processor runs it undeclared);
    ``seq_len``: the call's token count ``N``; ``routed``: its ``dispatch_attention_fn`` calls so far.
    """

    router: AttentionRouter
    path: str
    kind: str | None
    encoder_given: bool
    seq_len: int
    routed: int = 0
    sparsity: object = None  # the call's sparse pattern for self and joint attention (None: dense)


_current: contextvars.ContextVar[ActiveAttention | None] = contextvars.ContextVar("usp_attn_attention", default=None)


def attention_module_call(active: ActiveAttention | None):
    """Set (or with ``None`` clear) the running attention module; returns the token for ``reset``."""
    return _current.set(active)


def reset_attention_module_call(token) -> None:
    _current.reset(token)


# ---- the patched name ----------------------------------------------------------------------------------
# One patched function per processor module (keyed by the module's globals dict), shared by the enabled models
# using it (counted): the running module's ActiveAttention says which model's router takes the call.
_installed: dict[int, list] = {}  # id(globals) -> [globals, original, patched, users]


def install_router(processor) -> None:
    """Route ``dispatch_attention_fn`` of ``processor``'s module through the running model's router (counted)."""
    namespace = _namespace(processor)
    entry = _installed.get(id(namespace))
    if entry is None:
        original = namespace[DISPATCH_NAME]
        signature = inspect.signature(original)

        def dispatch(*args, **kwargs):
            active = _current.get()
            if active is None:  # set only inside a call whose tokens were cut
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return active.router.route(active, bound.arguments)

        dispatch.__wrapped__ = original
        entry = _installed[id(namespace)] = [namespace, original, dispatch, 0]
        namespace[DISPATCH_NAME] = dispatch
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
class AttentionRouter:
    """Runs the routed attention calls of one enabled model (see the module doc).

    Made and owned by the model's ``SequenceParallelRun``, which passes in what routing needs: ``model_name``
    (for messages), ``family`` (the declarations, ``joint_text``, ``text_only_masks``), ``state`` (``None`` = the
    global one at each call) and, per attention module call, an :class:`ActiveAttention`.
    """

    def __init__(self, model_name: str, family: FamilyPlan, state: SequenceParallelState | None) -> None:
        self.model_name, self.family, self._state = model_name, family, state
        self._layers: dict = {}
        self._checked: dict[str, tuple] = {}  # module path -> (guard, N) of its last checked call

    @property
    def state(self) -> SequenceParallelState:
        return require_state(self._state)

    def layer(self, heads, kv_heads, head_size, scale, causal, cross) -> USPAttention:
        """The USPAttention for one attention shape (cached: kernels are selected once per shape)."""
        key = (heads, kv_heads, head_size, scale, causal, cross)
        if key not in self._layers:
            self._layers[key] = USPAttention(heads, head_size, num_kv_heads=kv_heads, softmax_scale=scale,
                                             causal=causal, skip_sequence_parallel=cross, state=self._state)
        return self._layers[key]

    def route(self, active: ActiveAttention, arguments: dict) -> torch.Tensor:
        """Run one ``dispatch_attention_fn`` call of a sharded model with usp_attn (see the module doc)."""
        active.routed += 1
        q, k = arguments["query"], arguments["key"]
        where = f"{self.model_name}.{active.path}"
        # The checks up to the shard size follow from the model's code and configuration, the same on every
        # rank: each rank raises them by itself, and all do.
        if arguments.get("dropout_p", 0.0):
            raise ValueError(f"{where}: attention dropout ({arguments['dropout_p']}) is not supported under usp_attn "
                             "sequence parallelism (inference only); call model.eval()")
        if arguments.get("parallel_config") is not None:
            raise ValueError(f"{where}: diffusers' own context parallelism was enabled on a model that runs under "
                             "usp_attn sequence parallelism; use one or the other")
        requested = arguments.get("backend")
        if requested is not None:
            log_once(logging.INFO, f"usp_attn: {where} asks for diffusers attention backend '{requested}'; under "
                     "sequence parallelism the usp_attn backend agreed by the group runs instead")
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"{where}: expected query/key [B, S, H, D], got {list(q.shape)} and {list(k.shape)}")
        if active.kind is None:
            raise ValueError(f"{where}: the {self.family.family} plan runs this module with its own processor, which "
                             f"called {DISPATCH_NAME}; declare its attention in FamilyPlan.attention to route it")
        state = self.state
        shard = state.sizes(active.seq_len, False)[state.sp_rank]  # the run cuts contiguous shards
        validate, checked = state.validate, (state.guard, active.seq_len)
        if validate is not True and self._checked.get(active.path) == checked:
            try:
                attend = self._place(active, arguments, shard, where, verify=False)
            except (ValueError, TypeError, RuntimeError) as exc:  # this rank's mask values (the CPU assert):
                state.guard.report(exc)  # the peers' collective times out, and their error then names this one
                raise
            return attend()
        # The first call of the module at this token count: every rank decides that from the same values, so
        # all check together, before any collective of the call, and all raise the same error or none.
        attend, error = None, None
        try:
            attend = self._place(active, arguments, shard, where, verify=True)
        except (ValueError, TypeError) as exc:
            if validate is False:
                state.guard.report(exc)
                raise
            error = str(exc)
        if validate is not False:
            reason = "first call" if validate is None else "every call"
            state.guard.check(None, self._agreement(active, arguments, shard), None, reason, error, shard, where)
        self._checked[active.path] = checked
        return attend()

    def _place(self, active: ActiveAttention, arguments: dict, shard: int, where: str, verify: bool):
        """The layer call for this attention call, as a function of no arguments. ``verify``: first check the
        declared kind against the lengths, and text-only masks on the host (at a check point, which waits for
        the peers anyway) instead of on the device."""
        q, k, v, mask = arguments["query"], arguments["key"], arguments["value"], arguments.get("attn_mask")
        batch, lq, heads, head_size = q.shape
        lk, kv_heads = k.shape[1], k.shape[2]
        kind, total, family = active.kind, active.seq_len, self.family
        if verify:
            found = _kind_by_lengths(lq, lk, shard, active.encoder_given)
            if found != kind:
                encoder = "with" if active.encoder_given else "without"
                got = f"that is {found} attention" if found else "that is neither self-, cross- nor joint attention"
                raise ValueError(
                    f"{where}: the {family.family} plan declares {kind} attention here (FamilyPlan.attention), but "
                    f"this call has {lq} queries and {lk} keys, {encoder} encoder_hidden_states, on a rank holding "
                    f"{shard} of the {total} tokens: {got}"
                )
        scale, causal = arguments.get("scale"), bool(arguments.get("is_causal", False))
        layer = self.layer(heads, kv_heads, head_size, scale, causal, cross=kind == "cross")
        # load_balance=False everywhere: the run's shards are contiguous whatever layout a shard_sequence call
        # elsewhere recorded on the state.
        if kind == "cross":  # this rank's queries against full text/image k/v
            cross_mask = _cross_mask(mask, lq)
            return lambda: layer(q, k, v, cross_mask, load_balance=False)
        keys = _key_padding(mask, batch, lk, where)
        sparse = {} if active.sparsity is None else {"sparsity": active.sparsity}
        if kind == "self":
            return lambda: layer(q, k, v, keys, seq_len=total, load_balance=False, **sparse)
        text, prefix = lq - shard, family.joint_text == "prefix"
        counts = {"num_replicated_prefix": text} if prefix else {"num_replicated_suffix": text}
        counts.update(sparse)
        if keys is None or not family.text_only_masks:
            return lambda: layer(q, k, v, keys, seq_len=total, load_balance=False, **counts)
        text_keys, image_keys = (keys[:, :text], keys[:, text:]) if prefix else (keys[:, shard:], keys[:, :shard])
        message = (f"{where}: the {family.family} plan says its joint attention masks text keys only "
                   "(FamilyPlan.text_only_masks), but image keys are masked")
        if verify:
            if not bool(image_keys.all()):
                raise ValueError(message)
        else:
            torch._assert_async(image_keys.all(), message)
        return lambda: layer(q, k, v, seq_len=total, replicated_key_mask=text_keys, load_balance=False, **counts)

    @staticmethod
    def _agreement(active: ActiveAttention, arguments: dict, shard: int) -> "_Agreement":
        """What the ranks' first calls of a module must share (their own lengths aside)."""
        q, k = arguments["query"], arguments["key"]
        lq, lk = q.shape[1], k.shape[1]
        return _Agreement({
            "module": active.path,
            "declared attention": active.kind,
            "tokens": active.seq_len,
            "encoder_hidden_states given": active.encoder_given,
            "batch, heads, kv heads, head size": (q.shape[0], q.shape[2], k.shape[2], q.shape[3]),
            "dtype": str(q.dtype),
            "attn_mask given": arguments.get("attn_mask") is not None,
            "text rows (queries, keys)": (lq - shard, lk if active.kind == "cross" else lk - shard),
        })


@dataclasses.dataclass
class _Agreement:
    """The values :meth:`CallGuard.check <usp_attn.distributed.guard.CallGuard.check>` compares across ranks (it
    reads them through ``summary``, as from a layer's call signature)."""

    values: dict

    def summary(self, layer=None) -> dict:
        return self.values


def _kind_by_lengths(lq: int, lk: int, shard: int, encoder_given: bool) -> str | None:
    """The attention a call's lengths describe (see the module doc), or ``None`` when they fit none."""
    if lq == shard:
        if encoder_given:
            return "cross"
        return "self" if lk == shard else None
    if lq > shard and lk == lq:
        return "joint"
    return None


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

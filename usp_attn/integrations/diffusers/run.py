"""Putting one model instance under a :class:`~usp_attn.integrations.diffusers.plan.FamilyPlan`.

Everything goes through public torch hooks on the model's own modules, removed again by :meth:`disable`:

* the model: a pre-hook starts a call (no token count yet), an always-called hook ends it; hooks below act only
  inside a call, so calling a submodule on its own behaves as the unmodified model;
* every plan entry: pre-hooks cutting named arguments, hooks cutting outputs or gathering them. The first tensor
  cut in a call fixes the call's token count ``N``; every later cut must see ``N`` too (a plan that would cut a
  text tensor or a wrong dimension fails loudly instead of mixing positions);
* every attention module: a pre-hook marks it as running, with its declared kind, for the run's
  :class:`~usp_attn.integrations.diffusers.attention.AttentionRouter`, and the always-called hook checks that, once
  tokens were cut, its attention really went through usp_attn.

Every cut and gather is contiguous (``load_balance=False``), as the router's layer calls are, whatever layout a
``shard_sequence`` call on the user's own tensors recorded on the state.

Sparse attention (:meth:`SequenceParallelRun.set_sparsity`): a sliding-tile pattern needs its tiles as contiguous
128-token blocks, so the call puts the tokens in tile-major order once, where they are cut: every tensor the plan
cuts is permuted along its token dimension before the cut (hidden states, RoPE tables, per-token timesteps alike,
since all carry the same ``N`` tokens in the model's row-major order), every gathered output is permuted back, and
the shards are cut on whole 128-token blocks for that call (when every rank gets at least one). Self and joint attention get the pattern in tile-major
order; the blocks in between never see the difference (they act per token).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from usp_attn.distributed.sharding import gather_sequence, require_state, shard_sequence
from usp_attn.distributed.state import SequenceParallelState
from usp_attn.integrations.diffusers import attention as routing
from usp_attn.integrations.diffusers.plan import FamilyPlan, Gather, Shard
from usp_attn.sparse.grid import KERNEL_BLOCK, tile_major_inverse_permutation, tile_major_permutation
from usp_attn.sparse.patterns import SlidingTileSparsity, SparsityPattern

__all__ = ["CallContext", "PlanProcessor", "SequenceParallelRun", "find_modules", "attention_modules"]


@dataclasses.dataclass
class CallContext:
    """One transformer call. ``seq_len``: its token count ``N`` once the first tensor was cut."""

    in_call: bool = False
    seq_len: int | None = None
    sparsity: SparsityPattern | None = None  # the pattern the attention calls use (tile-major for sliding tile)
    order: tuple | None = None  # (perm, inverse) int64 on the tokens' device: row-major <-> tile-major
    saved_align: int | None = None  # the state's shard alignment before this call set whole blocks

    @property
    def sharding(self) -> bool:
        return self.in_call and self.seq_len is not None


def find_modules(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for a plan path (``""``, ``"blocks.0"``, ``"blocks.*.attn1"``)."""
    found = [("", model)]
    for atom in path.split(".") if path else []:
        nxt = []
        for name, module in found:
            if atom == "*":
                if not isinstance(module, nn.ModuleList):
                    raise ValueError(f"plan path {path!r}: '*' needs a ModuleList, {name or 'the model'} is "
                                     f"{type(module).__name__}")
                nxt += [(f"{name}.{i}".lstrip("."), m) for i, m in enumerate(module)]
            elif isinstance(getattr(module, atom, None), nn.Module):
                nxt.append((f"{name}.{atom}".lstrip("."), getattr(module, atom)))
            else:
                raise ValueError(f"plan path {path!r}: {name or 'the model'} ({type(module).__name__}) has no "
                                 f"submodule {atom!r}")
        found = nxt
    return found


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """diffusers attention modules (anything with ``processor`` and ``set_processor``)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


class SequenceParallelRun:
    """The hooks, processors and routed attention of one enabled model.

    Args:
        model: the transformer. family: its plan. state: ``None`` = the global state at each call.
    """

    def __init__(self, model: nn.Module, family: FamilyPlan, state: SequenceParallelState | None) -> None:
        self.model, self.family, self._state = model, family, state
        self.model_name = type(model).__name__
        self.context = CallContext()
        self._handles: list = []
        self._saved_processors: list = []
        self._routed_processors: list = []
        self._kinds: dict[str, str] = {}  # attention module name -> its declared kind
        self.router = routing.AttentionRouter(self.model_name, family, state)
        self.sparsity: SparsityPattern | None = None

    def set_sparsity(self, pattern: SparsityPattern | None) -> None:
        """The sparse pattern of the model's self and joint attention from the next call on (None: dense).

        A :class:`~usp_attn.sparse.SlidingTileSparsity` describes the video grid in the model's own (row-major)
        token order, or in tile-major order: either way the run reorders the tokens (module doc). Its grid must
        have the call's ``N`` tokens. A dynamic pattern (``TopMassSparsity``) runs on the tokens as they are.
        """
        if pattern is not None and not isinstance(pattern, SparsityPattern):
            raise TypeError(f"sparsity must be a usp_attn.sparse pattern or None, got {type(pattern).__name__}")
        self.sparsity = pattern

    @property
    def state(self) -> SequenceParallelState:
        return require_state(self._state)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def enable(self) -> None:
        try:
            self._install()
        except BaseException:
            self.disable()
            raise

    def disable(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        for module, processor in reversed(self._saved_processors):
            module.set_processor(processor)
        self._saved_processors.clear()
        for processor in self._routed_processors:
            routing.uninstall_router(processor)
        self._routed_processors.clear()
        self._kinds.clear()
        self.context = CallContext()

    def _install(self) -> None:
        model, plan = self.model, self.family.plan
        self._handles.append(model.register_forward_pre_hook(self._begin))
        for path, entry in plan.items():
            for name, module in find_modules(model, path):
                self._install_entry(path, name, module, entry)
        own = {name for path in self.family.processors for name, _ in find_modules(model, path)}
        local = {name for path in self.family.local_attention for name, _ in find_modules(model, path)}
        self._kinds = {name: kind for path, kind in self.family.attention.items()
                       for name, _ in find_modules(model, path)}
        for name, module in attention_modules(model):
            if name in local:
                continue
            if name in own:
                factory = next(f for p, f in self.family.processors.items()
                               if name in {n for n, _ in find_modules(model, p)})
                self._saved_processors.append((module, module.processor))
                module.set_processor(factory(module, self))
            elif module.processor is not None:
                if not routing.routes_through_dispatch(module.processor):
                    raise TypeError(
                        f"{self.model_name}.{name} uses {type(module.processor).__name__}, which computes attention "
                        f"without diffusers' {routing.DISPATCH_NAME}; usp_attn cannot parallelise it. Give the "
                        f"{self.family.family} plan a processor for it (FamilyPlan.processors)"
                    )
                if name not in self._kinds:
                    raise ValueError(
                        f"{self.model_name}.{name}: the {self.family.family} plan does not declare whether it is "
                        "self-, cross- or joint attention (FamilyPlan.attention), nor leave it alone "
                        "(FamilyPlan.local_attention)"
                    )
                routing.install_router(module.processor)
                self._routed_processors.append(module.processor)
            self._handles.append(module.register_forward_pre_hook(self._attention_begin(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._attention_end, always_call=True))
        self._handles.append(model.register_forward_hook(self._end, always_call=True))

    def _install_entry(self, path, name, module, entry) -> None:
        if isinstance(entry, (Gather, tuple)):
            gathers = entry if isinstance(entry, tuple) else (entry,)
            self._handles.append(module.register_forward_hook(self._gather_hook(name, gathers)))
            return
        inputs = {k: v for k, v in entry.items() if isinstance(k, str)}
        outputs = {k: v for k, v in entry.items() if isinstance(k, int)}
        if inputs:
            params = list(inspect.signature(type(module).forward).parameters)[1:]
            missing = [k for k in inputs if k not in params]
            if missing:
                raise ValueError(f"plan[{path!r}] names {missing}, not arguments of "
                                 f"{type(module).__name__}.forward{tuple(params)}")
            hook = self._input_hook(name, inputs, {k: params.index(k) for k in inputs})
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        if outputs:
            self._handles.append(module.register_forward_hook(self._output_hook(name, outputs)))

    # ---- the call ----------------------------------------------------------------------------------------
    def _begin(self, module, args):
        self.context = CallContext(in_call=True)

    def _end(self, module, args, output):
        if self.context.saved_align is not None:
            self.state.set_shard_align(self.context.saved_align)
        self.context = CallContext()

    def _start_sparse(self, x: torch.Tensor, length: int) -> None:
        """At the call's first cut: the pattern for its attention, and the token order that pattern needs."""
        pattern, context = self.sparsity, self.context
        if pattern is None:
            return
        if isinstance(pattern, SlidingTileSparsity):
            if pattern.grid.num_tokens != length:
                raise ValueError(f"{self.model_name}: the sparse pattern's grid {pattern.grid} has "
                                 f"{pattern.grid.num_tokens} tokens, but this call has {length} video tokens")
            pattern = pattern.with_token_order("tile_major")
            context.order = (tile_major_permutation(pattern.grid, pattern.tile, device=x.device),
                             tile_major_inverse_permutation(pattern.grid, pattern.tile, device=x.device))
            state = self.state
            if length >= KERNEL_BLOCK * state.world_size:  # whole blocks per shard (restored when the call ends);
                context.saved_align = state.shard_align  # fewer tokens than that would leave ranks empty
                state.set_shard_align(KERNEL_BLOCK)
        context.sparsity = pattern

    def shard(self, x, spec: Shard, what: str):
        """This rank's token shard of ``x`` per ``spec`` (unchanged if it is not a tensor of ``spec.ndim`` dims)."""
        if not isinstance(x, torch.Tensor) or (spec.ndim is not None and x.dim() != spec.ndim):
            return x
        state, length = self.state, x.shape[spec.dim]
        if self.context.seq_len is None:
            if length < state.world_size:
                raise ValueError(
                    f"{self.model_name}: the input makes {length} tokens ({what}), fewer than the "
                    f"{state.world_size} sequence-parallel ranks; use a larger input or fewer ranks"
                )
            self.context.seq_len = length
            self._start_sparse(x, length)
        elif length != self.context.seq_len:
            raise ValueError(
                f"{self.model_name}: the {self.family.family} plan cuts {what} (shape {list(x.shape)}) along dim "
                f"{spec.dim} of length {length}, but this call's token sequence has {self.context.seq_len} tokens"
            )
        if self.context.order is not None:
            x = x.index_select(spec.dim, self.context.order[0].to(x.device))
        return shard_sequence(x, spec.dim, self._state, record_length=False, load_balance=False)

    def _shard_value(self, value, spec, what):
        """``value`` cut per ``spec``: a :class:`Shard`, or a tuple of them for a tuple of tensors."""
        if not isinstance(spec, tuple):
            return self.shard(value, spec, what)
        if value is None:
            return None
        if not isinstance(value, (tuple, list)) or len(value) != len(spec):
            raise ValueError(f"{self.model_name}: the plan expects {what} to be a tuple of {len(spec)} tensors, got "
                             f"{type(value).__name__}")
        parts = [v if s is None else self.shard(v, s, f"{what}[{i}]") for i, (v, s) in enumerate(zip(value, spec))]
        return type(value)(parts)

    def _input_hook(self, name, inputs, positions):
        def hook(module, args, kwargs):
            if not self.context.in_call:
                return None
            args = list(args)
            for key, spec in inputs.items():
                what = f"{name or 'the model'}'s argument {key!r}"
                if key in kwargs:
                    kwargs[key] = self._shard_value(kwargs[key], spec, what)
                elif positions[key] < len(args):
                    args[positions[key]] = self._shard_value(args[positions[key]], spec, what)
            return tuple(args), kwargs
        return hook

    def _output_hook(self, name, outputs):
        def hook(module, args, output):
            if not self.context.in_call:
                return None
            single = isinstance(output, torch.Tensor)
            items = [output] if single else list(output)
            for index, spec in outputs.items():
                items[index] = self._shard_value(items[index], spec, f"output {index} of {name or 'the model'}")
            return items[0] if single else type(output)(items)
        return hook

    def _gather_hook(self, name, gathers):
        def hook(module, args, output):
            if not self.context.sharding:
                return None
            single = isinstance(output, torch.Tensor)
            items = [output] if single else list(output)
            for index, spec in enumerate(gathers):
                if spec is None:
                    continue
                x = items[index]
                if spec.ndim is not None and x.dim() != spec.ndim:
                    raise ValueError(f"{self.model_name}: output {index} of {name or 'the model'} has shape "
                                     f"{list(x.shape)}; the plan gathers a {spec.ndim}-D tensor")
                items[index] = gather_sequence(x, dim=spec.dim, state=self._state, total_length=self.context.seq_len,
                                               load_balance=False)
                if self.context.order is not None:  # back to the model's token order
                    items[index] = items[index].index_select(spec.dim, self.context.order[1].to(x.device))
            return items[0] if single else type(output)(items)
        return hook

    # ---- attention -----------------------------------------------------------------------------------------
    def _attention_begin(self, name):
        def hook(module, args, kwargs):
            encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            active = None
            if self.context.sharding:
                active = routing.ActiveAttention(self.router, name, self._kinds.get(name), encoder is not None,
                                                 self.context.seq_len, sparsity=self.context.sparsity)
            module._usp_attn_active = (routing.attention_module_call(active), active)
        return hook

    def _attention_end(self, module, args, output):
        token, active = module.__dict__.pop("_usp_attn_active", (None, None))
        if token is not None:
            routing.reset_attention_module_call(token)
        if active is not None and active.routed == 0 and not isinstance(module.processor, PlanProcessor):
            raise RuntimeError(
                f"{self.model_name}.{active.path}: its processor {type(module.processor).__name__} did not call "
                f"{routing.DISPATCH_NAME}, so its attention saw only this rank's tokens; usp_attn cannot parallelise "
                "it without a processor in the family plan"
            )

    def layer(self, heads, kv_heads, head_size, scale, causal, cross):
        """The router's USPAttention for one attention shape, for plan processors (call it with
        ``load_balance=False``: the run's shards are contiguous)."""
        return self.router.layer(heads, kv_heads, head_size, scale, causal, cross)


class PlanProcessor:
    """Base of the processors a plan provides: they run usp_attn themselves (``run.layer(...)``).

    ``run`` is the :class:`SequenceParallelRun` of the model; ``original`` the diffusers processor replaced.
    """

    def __init__(self, module: nn.Module, run: SequenceParallelRun) -> None:
        self.run, self.original = run, module.processor

"""What every model family's sequence-parallel adapter shares (see ``diffusers.py`` for the API).

An adapter puts one transformer instance under sequence parallelism without editing its
code, through two extension points diffusers and torch offer:

* ``torch`` forward hooks on the model's own submodules: one that notes the token count at
  the start of each call, ones that cut tensors to this rank's token shard where the
  sequence is formed (patch embedding, rotary table, per-token conditioning) and one that
  gathers the shards back before the output projection / unpatchify;
* ``set_processor`` on each diffusers attention module: our processor runs the same math
  as the model's own, with :class:`~usp_attn.USPAttention` as the attention kernel.

Hooks only act inside a call of the transformer itself (the begin-hook sets
``context.seq_len``; an always-called end-hook clears it), so calling a submodule on its
own still behaves as the unmodified model.

Subclasses set ``family`` and ``model_classes`` and implement ``check`` and ``install``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from usp_attn.distributed.sharding import gather_sequence, require_state, shard_sequence
from usp_attn.distributed.state import SequenceParallelState

__all__ = ["CallContext", "SequenceParallelAdapter"]


@dataclasses.dataclass
class CallContext:
    """Shared by an adapter's hooks and processors during one transformer call.

    seq_len: global number of tokens of the sharded sequence (``None`` outside a call).
    """

    seq_len: int | None = None


class SequenceParallelAdapter:
    """Installs and removes sequence parallelism on one model instance.

    Args:
        model: the transformer (already checked by :meth:`check`).
        state: the state to use; ``None`` = the global one at call time.
    """

    #: Human-readable name of the model family, e.g. ``"Wan"``.
    family: str = ""
    #: Class names (``type(model).__name__`` or a base class's) this adapter handles.
    model_classes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, state: SequenceParallelState | None) -> None:
        self.model = model
        self._state = state
        self.context = CallContext()
        self._handles: list = []
        self._saved_processors: list[tuple[nn.Module, object]] = []

    # ---- to implement per family ---------------------------------------------------------
    @classmethod
    def check(cls, model: nn.Module) -> None:
        """Raise a clear error if ``model`` lacks the structure :meth:`install` relies on."""
        raise NotImplementedError

    def install(self) -> None:
        """Register hooks and processors (through :meth:`add_hook` / :meth:`set_processor`)."""
        raise NotImplementedError

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def state(self) -> SequenceParallelState:
        """The state in force now (raises if sequence parallelism is not initialised)."""
        return require_state(self._state)

    def enable(self) -> None:
        try:
            self.install()
        except BaseException:
            self.disable()  # leave the model as it was
            raise

    def disable(self) -> None:
        """Remove every hook and put the original attention processors back."""
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        for module, processor in reversed(self._saved_processors):
            module.set_processor(processor)
        self._saved_processors.clear()
        self.context.seq_len = None

    # ---- helpers for install() -----------------------------------------------------------
    def add_hook(self, module: nn.Module, fn: Callable, *, pre: bool = False, with_kwargs: bool = False,
                 always_call: bool = False) -> None:
        """Register a forward (pre-)hook on ``module``, removed again by :meth:`disable`."""
        if pre:
            handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(fn, with_kwargs=with_kwargs, always_call=always_call)
        self._handles.append(handle)

    def set_processor(self, attention_module: nn.Module, processor) -> None:
        """Swap a diffusers attention module's processor, remembering the original."""
        self._saved_processors.append((attention_module, attention_module.processor))
        attention_module.set_processor(processor)

    def begin_call(self, seq_len: int) -> None:
        """Start of a transformer call over ``seq_len`` tokens (checked against the world size)."""
        state = self.state
        if seq_len < state.world_size:
            raise ValueError(
                f"{type(self.model).__name__}: the input makes {seq_len} tokens after patch embedding, fewer than "
                f"the {state.world_size} sequence-parallel ranks; use a larger input or fewer ranks"
            )
        self.context.seq_len = seq_len

    def end_call(self, *_args) -> None:
        self.context.seq_len = None

    def shard(self, x: torch.Tensor, dim: int, what: str, *, record_length: bool = False) -> torch.Tensor:
        """This rank's token shard of the full ``x`` along ``dim`` (length must be the call's token count)."""
        if x.shape[dim] != self.context.seq_len:
            raise ValueError(
                f"{type(self.model).__name__}: {what} has {x.shape[dim]} positions along dim {dim}, expected the "
                f"{self.context.seq_len} tokens of the patch-embedded input (shape {list(x.shape)})"
            )
        return shard_sequence(x, dim=dim, state=self._state, record_length=record_length)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The full tensor along ``dim`` on every rank, from this rank's token shard."""
        return gather_sequence(x, dim=dim, state=self._state, total_length=self.context.seq_len)

    @property
    def active(self) -> bool:
        """True inside a transformer call (hooks act only then)."""
        return self.context.seq_len is not None

"""Sequence parallelism for diffusers transformers: one call turns it on for a model instance.

Usage (every rank runs the same code, e.g. under ``torchrun``)::

    import usp_attn
    from usp_attn.integrations.diffusers import enable_sequence_parallel

    usp_attn.init_sequence_parallel(ulysses_degree=2, ring_degree=2)
    pipe = WanPipeline.from_pretrained(...)
    enable_sequence_parallel(pipe.transformer)      # and pipe.transformer_2 for Wan 2.2 A14B
    video = pipe(prompt, ...)                       # same full inputs/outputs on every rank

After :func:`enable_sequence_parallel`, calling the transformer with the **full** inputs on
every rank returns the **full** output on every rank; inside, the token sequence is split
across the sequence-parallel ranks after patch embedding (rotary table split the same
way), self-attention runs through :class:`~usp_attn.USPAttention`, cross-attention runs
locally against the full text tokens, and the tokens are gathered before the output
projection. Inference only. :func:`disable_sequence_parallel` restores the model.

Supported models: see :func:`supported_models`. A new family is one adapter class
(a :class:`~usp_attn.integrations.diffusers_adapter.SequenceParallelAdapter` subclass)
passed to :func:`register_adapter`.

Importing this module needs ``diffusers >= 0.35`` (``pip install 'usp-attn[diffusers]'``);
``import usp_attn`` never imports diffusers.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re

try:
    import diffusers as _diffusers  # noqa: F401  (fail here, with the fix, rather than deep inside a call)
except ImportError as _exc:
    raise ImportError(
        "usp_attn.integrations.diffusers needs the optional package 'diffusers' (>= 0.35), which is not "
        f"importable ({_exc}). Install it with: pip install 'usp-attn[diffusers]'  (or: pip install 'diffusers>=0.35')"
    ) from _exc

from torch import nn

from usp_attn.distributed.sharding import require_state
from usp_attn.distributed.state import SequenceParallelState
from usp_attn.integrations.diffusers_adapter import SequenceParallelAdapter
from usp_attn.integrations.diffusers_wan import WanAdapter

__all__ = [
    "SequenceParallelAdapter",
    "disable_sequence_parallel",
    "enable_sequence_parallel",
    "is_sequence_parallel_enabled",
    "register_adapter",
    "supported_models",
]

logger = logging.getLogger("usp_attn")

MIN_DIFFUSERS = (0, 35)
_ATTR = "_usp_attn_sequence_parallel"  # where an enabled model keeps its adapter


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:  # e.g. a source checkout on sys.path
        return getattr(_diffusers, "__version__", "0")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


if _release(_diffusers_version()) < MIN_DIFFUSERS:
    raise ImportError(
        f"usp_attn.integrations.diffusers needs diffusers >= {'.'.join(map(str, MIN_DIFFUSERS))}, found "
        f"{_diffusers_version()}. Upgrade with: pip install -U 'diffusers>=0.35'"
    )

# ---- registry ------------------------------------------------------------------------------
_ADAPTERS: dict[str, type[SequenceParallelAdapter]] = {}


def register_adapter(adapter: type[SequenceParallelAdapter]) -> type[SequenceParallelAdapter]:
    """Make ``adapter`` handle the model classes named in its ``model_classes`` (usable as a decorator)."""
    if not (isinstance(adapter, type) and issubclass(adapter, SequenceParallelAdapter)):
        raise TypeError(f"register_adapter expects a SequenceParallelAdapter subclass, got {adapter!r}")
    if not adapter.model_classes:
        raise ValueError(f"{adapter.__name__}.model_classes is empty: name the model classes it handles")
    for name in adapter.model_classes:
        _ADAPTERS[name] = adapter
    return adapter


register_adapter(WanAdapter)


def supported_models() -> tuple[str, ...]:
    """Class names :func:`enable_sequence_parallel` accepts (subclasses of them too)."""
    return tuple(sorted(_ADAPTERS))


def _adapter_class(model) -> type[SequenceParallelAdapter]:
    for cls in type(model).__mro__:  # the class itself first, then its bases
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    hint = ""
    if hasattr(model, "transformer") and not isinstance(model, nn.Module):
        hint = " This looks like a pipeline: pass its transformer (pipe.transformer, and pipe.transformer_2 if set)."
    raise TypeError(
        f"enable_sequence_parallel does not support {type(model).__module__}.{type(model).__qualname__}; "
        f"supported model classes: {', '.join(supported_models())}.{hint} To add a model family, subclass "
        "usp_attn.integrations.diffusers.SequenceParallelAdapter and pass it to register_adapter()."
    )


# ---- API -----------------------------------------------------------------------------------
def enable_sequence_parallel(transformer: nn.Module, state: SequenceParallelState | None = None) -> nn.Module:
    """Run ``transformer`` with its token sequence split across the sequence-parallel ranks.

    Call it on every rank after :func:`usp_attn.init_sequence_parallel`, with the same model
    (same weights) everywhere. Afterwards the model takes and returns the same full tensors
    as before (for Wan: ``hidden_states [B, C, F, H, W]`` -> ``[B, C_out, F, H, W]``, any
    float dtype); every rank must call it with identical inputs.

    Args:
        transformer: a supported diffusers model instance (see :func:`supported_models`).
        state: the sequence-parallel state to use; ``None`` = the global one at each call
            (so a later re-initialisation is picked up).

    Returns:
        ``transformer`` itself, modified in place (hooks and attention processors).

    Raises:
        TypeError: unsupported model class. RuntimeError: sequence parallelism not
        initialised, or already enabled on this model. ValueError: the model's own
        (diffusers) context parallelism is on, or its layout contradicts its config.
    """
    adapter_cls = _adapter_class(transformer)
    current = require_state(state)
    if is_sequence_parallel_enabled(transformer):
        raise RuntimeError(
            f"sequence parallelism is already enabled on this {type(transformer).__name__}; "
            "call disable_sequence_parallel() first"
        )
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError(
            f"{type(transformer).__name__} already runs diffusers' own context parallelism (enable_parallelism); "
            "use one or the other"
        )
    adapter_cls.check(transformer)
    if getattr(transformer, "is_cache_enabled", False):
        logger.warning(
            "usp_attn: %s has a diffusers cache enabled; a cache that decides from the local shard "
            "(e.g. first-block cache) can make ranks take different paths and stall their collectives",
            type(transformer).__name__,
        )
    adapter = adapter_cls(transformer, state)
    adapter.enable()
    setattr(transformer, _ATTR, adapter)
    if current.sp_rank == 0:
        logger.info(
            "usp_attn: sequence parallel enabled on %s (%s adapter, U=%d x R=%d)",
            type(transformer).__name__, adapter.family, current.ulysses_degree, current.ring_degree,
        )
    return transformer


def disable_sequence_parallel(transformer: nn.Module) -> nn.Module:
    """Undo :func:`enable_sequence_parallel`: hooks removed, original processors back.

    A model on which it is not enabled is returned unchanged.
    """
    adapter = getattr(transformer, _ATTR, None)
    if adapter is not None:
        adapter.disable()
        delattr(transformer, _ATTR)
    return transformer


def is_sequence_parallel_enabled(transformer: nn.Module) -> bool:
    return getattr(transformer, _ATTR, None) is not None

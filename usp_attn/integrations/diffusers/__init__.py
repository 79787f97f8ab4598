"""Sequence parallelism for diffusers transformers: one call turns it on for a model instance.

Usage (every rank runs the same code, e.g. under ``torchrun``)::

    import usp_attn
    from usp_attn.integrations.diffusers import enable_sequence_parallel

    usp_attn.init_sequence_parallel(ulysses_degree=2, ring_degree=2)
    pipe = FluxPipeline.from_pretrained(...)
    enable_sequence_parallel(pipe.transformer)      # and pipe.transformer_2 where a pipeline has two
    image = pipe(prompt, ...)                       # same full inputs/outputs on every rank

After :func:`enable_sequence_parallel`, calling the transformer with the **full** inputs on every rank returns
the **full** output on every rank. Inside, the family's plan (:mod:`.plan`, data: which tensors are
cut to this rank's token shard where, which outputs are gathered) is applied with torch hooks, and every
attention call of the model's own processors runs through :class:`~usp_attn.USPAttention`
(:mod:`.attention`). Text tokens stay whole on every rank. Inference only.
:func:`disable_sequence_parallel` restores the model.

Supported models: :func:`supported_models`, plus any model class carrying a diffusers ``_cp_plan``. A new
family is a plan passed to :func:`register_plan`.

Importing this module needs ``diffusers >= 0.35`` (``pip install 'usp-attn[diffusers]'``); enabling a model
needs a diffusers release in :data:`TESTED_DIFFUSERS` (the integration relies on one private name, see
:mod:`.attention`). ``import usp_attn`` never imports diffusers.
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

import os

from torch import nn

from usp_attn.distributed.sharding import require_state
from usp_attn.distributed.state import SequenceParallelState
from usp_attn.integrations.diffusers.run import PlanProcessor, SequenceParallelRun
from usp_attn.integrations.diffusers.cfg import CFGPlan, disable_cfg_parallel, enable_cfg_parallel
from usp_attn.integrations.diffusers.families import BUILTIN_PLANS, plan_for_model
from usp_attn.integrations.diffusers.plan import FamilyPlan, Gather, Shard, from_diffusers_cp_plan

__all__ = [
    "CFGPlan",
    "FamilyPlan",
    "Gather",
    "PlanProcessor",
    "Shard",
    "TESTED_DIFFUSERS",
    "disable_cfg_parallel",
    "disable_sequence_parallel",
    "enable_cfg_parallel",
    "enable_sequence_parallel",
    "from_diffusers_cp_plan",
    "is_sequence_parallel_enabled",
    "register_plan",
    "set_sparsity",
    "supported_models",
]

logger = logging.getLogger("usp_attn")

MIN_DIFFUSERS = (0, 35)
#: diffusers releases (major, minor), inclusive, that the integration is tested with.
TESTED_DIFFUSERS = ((0, 42), (0, 42))
#: Set to 1 to enable models under a diffusers release outside TESTED_DIFFUSERS (a warning is logged).
UNTESTED_ENV = "USP_ATTN_DIFFUSERS_UNTESTED"
_ATTR = "_usp_attn_sequence_parallel"  # where an enabled model keeps its SequenceParallelRun


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


def check_diffusers_version(version: str | None = None) -> None:
    """Raise unless ``version`` (default: the installed one) is in :data:`TESTED_DIFFUSERS`.

    The integration replaces one private diffusers name (``dispatch_attention_fn`` in the processors'
    modules); a release it was not tested with could rename it, or compute attention elsewhere, and the
    model would silently attend only this rank's tokens. ``USP_ATTN_DIFFUSERS_UNTESTED=1`` proceeds with a
    warning (the per-module check that attention really went through usp_attn still applies).
    """
    version = version or _diffusers_version()
    low, high = TESTED_DIFFUSERS
    if low <= _release(version) <= high:
        return
    tested = ".".join(map(str, low)) + ".x" if low == high else f"{low[0]}.{low[1]} to {high[0]}.{high[1]}"
    message = (f"usp_attn's diffusers integration is tested with diffusers {tested}, found {version}. "
               f"Install a tested release (pip install 'diffusers=={low[0]}.{low[1]}.*'), or set {UNTESTED_ENV}=1 "
               "to try this one")
    if os.environ.get(UNTESTED_ENV, "0") not in ("", "0"):
        logger.warning("usp_attn: %s (%s=1: proceeding)", message.split(". Install")[0], UNTESTED_ENV)
        return
    raise RuntimeError(message)


# ---- registry ------------------------------------------------------------------------------
_PLANS: dict = dict(BUILTIN_PLANS)


def register_plan(model_class: str, plan) -> None:
    """Run models of class ``model_class`` (a class name; subclasses too) with ``plan``.

    ``plan``: a :class:`FamilyPlan`, or a function ``model -> FamilyPlan``. Replaces a plan registered for the
    same class (and takes precedence over the model's own diffusers ``_cp_plan``).
    """
    if not isinstance(model_class, str) or not model_class:
        raise TypeError(f"register_plan expects a model class name, got {model_class!r}")
    if not (isinstance(plan, FamilyPlan) or callable(plan)):
        raise TypeError(f"register_plan expects a FamilyPlan or a function model -> FamilyPlan, got {plan!r}")
    _PLANS[model_class] = plan


def supported_models() -> tuple[str, ...]:
    """Class names with a registered plan (subclasses too; models carrying a diffusers ``_cp_plan`` also run)."""
    return tuple(sorted(_PLANS))


def _family_plan(model) -> FamilyPlan:
    plan = plan_for_model(model, _PLANS)
    if plan is not None:
        return plan
    hint = ""
    if hasattr(model, "transformer") and not isinstance(model, nn.Module):
        hint = " This looks like a pipeline: pass its transformer (pipe.transformer, and pipe.transformer_2 if set)."
    raise TypeError(
        f"enable_sequence_parallel does not support {type(model).__module__}.{type(model).__qualname__}: it has "
        f"no diffusers _cp_plan and no usp_attn plan; supported model classes: {', '.join(supported_models())}."
        f"{hint} To add a model family, write a FamilyPlan and pass it to register_plan()."
    )


# ---- API -----------------------------------------------------------------------------------
def enable_sequence_parallel(transformer: nn.Module, state: SequenceParallelState | None = None,
                             plan: FamilyPlan | None = None, cfg_plan: CFGPlan | None = None, *,
                             sparsity=None) -> nn.Module:
    """Run ``transformer`` with its token sequence split across the sequence-parallel ranks.

    Call it on every rank after :func:`usp_attn.init_sequence_parallel`, with the same model (same weights)
    everywhere. Afterwards the model takes and returns the same full tensors as before (any float dtype);
    every rank must call it with identical inputs.

    Args:
        transformer: a diffusers model instance with a plan (see :func:`supported_models`).
        state: the sequence-parallel state to use; ``None`` = the global one at each call.
        plan: use this plan instead of the registered one / the model's own ``_cp_plan``.
        cfg_plan: with ``cfg_degree > 1``, how the model's pipelines run the CFG branches, instead of the
            registered :class:`CFGPlan` (see :mod:`.cfg`: each CFG group computes one branch, one gather per step).
        sparsity: a sparse pattern for the model's self and joint attention (lossy, opt-in; None = dense), e.g.
            ``usp_attn.SlidingTileSparsity(usp_attn.VideoGrid(frames, h, w), tile, window)`` on the latent patch
            grid; change it between calls with :func:`set_sparsity` (e.g. dense for the first steps).

    Returns:
        ``transformer`` itself, modified in place (hooks; processors only where the plan provides them).

    Raises:
        TypeError: no plan for the model class, or an attention processor usp_attn cannot route.
        RuntimeError: sequence parallelism not initialised, already enabled on this model, or an untested
        diffusers release. ValueError: diffusers' own context parallelism is on, the plan's check
        refuses the model's configuration, or the plan does not declare a routed attention module's kind
        (``FamilyPlan.attention``).
    """
    family = plan if plan is not None else _family_plan(transformer)
    if not isinstance(family, FamilyPlan):
        raise TypeError(f"plan must be a FamilyPlan, got {family!r}")
    current = require_state(state)
    check_diffusers_version()
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
    if family.check is not None:
        family.check(transformer)
    if getattr(transformer, "is_cache_enabled", False):
        logger.warning(
            "usp_attn: %s has a diffusers cache enabled; a cache that decides from the local shard "
            "(e.g. first-block cache) can make ranks take different paths and stall their collectives",
            type(transformer).__name__,
        )
    if current.cfg_degree > 1:
        enable_cfg_parallel(transformer, state, cfg_plan)  # first: an unknown model fails before any hook
    run = SequenceParallelRun(transformer, family, state)
    try:
        run.set_sparsity(sparsity)
        run.enable()
    except BaseException:
        disable_cfg_parallel(transformer)
        raise
    setattr(transformer, _ATTR, run)
    if current.sp_rank == 0:
        logger.info(
            "usp_attn: sequence parallel enabled on %s (%s plan from %s, U=%d x R=%d)",
            type(transformer).__name__, family.family, family.source, current.ulysses_degree, current.ring_degree,
        )
    return transformer


def disable_sequence_parallel(transformer: nn.Module) -> nn.Module:
    """Undo :func:`enable_sequence_parallel`: hooks removed, original processors back.

    A model on which it is not enabled is returned unchanged.
    """
    run = getattr(transformer, _ATTR, None)
    if run is not None:
        run.disable()
        delattr(transformer, _ATTR)
    disable_cfg_parallel(transformer)
    return transformer


def set_sparsity(transformer: nn.Module, pattern) -> None:
    """Use ``pattern`` (a :mod:`usp_attn.sparse` pattern, or None for dense) in ``transformer``'s self and joint
    attention from its next call on; every rank must set the same. The tokens are reordered to the pattern's
    tile-major order where the plan cuts them and restored where it gathers them, once per model call.
    Joint attention with a text mask (HunyuanVideo, Qwen-Image with padded prompts) refuses a pattern.

    Raises:
        RuntimeError: sequence parallelism is not enabled on ``transformer``. TypeError: not a pattern.
    """
    run = getattr(transformer, _ATTR, None)
    if run is None:
        raise RuntimeError(f"set_sparsity: sequence parallelism is not enabled on this {type(transformer).__name__}; "
                           "call enable_sequence_parallel() first")
    run.set_sparsity(pattern)


def is_sequence_parallel_enabled(transformer: nn.Module) -> bool:
    return getattr(transformer, _ATTR, None) is not None

"""CFG parallelism for diffusers transformers: each CFG group computes one branch, one gather per step.

Under ``init_sequence_parallel(..., cfg_degree=2)`` the ranks form two SP groups (``state.cfg_rank`` 0 and 1).
:func:`enable_cfg_parallel` (called by ``enable_sequence_parallel`` when ``cfg_degree > 1``) wraps the model's
``forward`` so the pipeline stays untouched and still gets every prediction it asks for, on every rank. How depends
on how the family's pipelines run classifier-free guidance, declared per model class as a :class:`CFGPlan`:

**Batched** (CogVideoX, LTX-Video: one call on ``cat([uncond, cond])``): the arguments named by the plan are split
along the batch (dim 0) with :func:`~usp_attn.distributed.cfg.cfg_split`, each group runs its half, and the output
is all-gathered along the batch. ``cfg_degree`` must divide the batch (a batch of 2 B rows allows 2, or a divisor
of 2 B).

**Two calls** (Wan, Qwen-Image, and Flux / HunyuanVideo with true CFG: the transformer is called once per branch,
with the same latents and timestep, only the text arguments named by the plan differ). The protocol:

1. *Learning*: a call whose text arguments match no recorded branch (the first step of a run, or a new prompt)
   runs unchanged on every group, and so does the call after it, which must differ from it only in the plan's
   text arguments (else a ``ValueError``: the pipeline does not call once per branch, e.g. guidance is off). The
   two calls' text arguments are recorded as branch 0 and branch 1 (references, no copy).
2. *Pairs*: a later call is identified as branch ``b`` by its text arguments. CFG group ``c`` computes branch
   ``c``: the group whose branch was asked runs the call as given, the other substitutes its recorded text
   arguments. One ``all_gather`` of the prediction over ``state.cfg_group`` gives both on every rank; the call
   returns branch ``b`` and keeps the other.
3. The next call must be the other branch with the same other arguments; it returns the kept prediction without
   computing. Anything else raises ``ValueError`` on every rank (every rank sees the same calls).

Comparing arguments: identical objects, or tensors on the same memory with the same shape, strides and dtype,
match for free (Wan and Qwen-Image pass the same text tensors every step). Other tensors are compared by value:
always for the text arguments (which branch a call is decides the result), and for the others during learning,
the first pair, and every pair when the state's ``validate`` is ``True``; otherwise same shape, dtype and device
suffice there, so steady-state steps cost no host sync (Qwen-Image and Flux recompute ``timestep / 1000`` for each
call). Inference only.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging

import torch
from torch import nn

from usp_attn.distributed.cfg import cfg_gather, cfg_split
from usp_attn.distributed.sharding import require_state
from usp_attn.distributed.state import SequenceParallelState

__all__ = ["CFG_PLANS", "CFGPlan", "CFGRun", "cfg_plan_for_model", "disable_cfg_parallel", "enable_cfg_parallel"]

logger = logging.getLogger("usp_attn")

_ATTR = "_usp_attn_cfg_parallel"


@dataclasses.dataclass(frozen=True)
class CFGPlan:
    """How a family's pipelines run classifier-free guidance.

    Attributes:
        kind: ``"batched"`` (one call on the branches concatenated along the batch) or ``"two_calls"`` (one call
            per branch).
        arguments: ``"batched"``: the forward arguments with the batch as dim 0 (split across the CFG groups);
            ``"two_calls"``: the arguments that differ between the branches (the text conditioning).
    """

    kind: str
    arguments: tuple[str, ...]

    def __post_init__(self):
        if self.kind not in ("batched", "two_calls"):
            raise ValueError(f"CFGPlan kind must be 'batched' or 'two_calls', got {self.kind!r}")
        if not self.arguments or not all(isinstance(a, str) for a in self.arguments):
            raise ValueError(f"CFGPlan arguments must be a non-empty tuple of argument names, got {self.arguments!r}")


#: Model class name -> its :class:`CFGPlan` (diffusers 0.42 pipelines).
CFG_PLANS: dict[str, CFGPlan] = {
    "WanTransformer3DModel": CFGPlan("two_calls", ("encoder_hidden_states", "encoder_hidden_states_image")),
    "QwenImageTransformer2DModel": CFGPlan("two_calls", ("encoder_hidden_states", "encoder_hidden_states_mask")),
    "FluxTransformer2DModel": CFGPlan("two_calls", ("encoder_hidden_states", "pooled_projections", "txt_ids")),
    "HunyuanVideoTransformer3DModel": CFGPlan(
        "two_calls", ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections")),
    "CogVideoXTransformer3DModel": CFGPlan(
        "batched", ("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs")),
    "LTXVideoTransformer3DModel": CFGPlan(
        "batched", ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "video_coords")),
}


def cfg_plan_for_model(model: nn.Module) -> CFGPlan | None:
    """The :class:`CFGPlan` registered for ``model``'s class or a base class, else ``None``."""
    for cls in type(model).__mro__:
        if cls.__name__ in CFG_PLANS:
            return CFG_PLANS[cls.__name__]
    return None


# ---- outputs: a tensor, a tuple (return_dict=False) or a diffusers output with .sample ------------------------
def _sample(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def _with_sample(output, sample: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)):
        return type(output)([sample, *output[1:]])
    return dataclasses.replace(output, sample=sample)


# ---- comparing arguments ----------------------------------------------------------------------------------
def _same(a, b, by_value: bool) -> bool:
    """Whether ``a`` and ``b`` are the same argument (see the module doc for when tensors are compared by value)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
            return True
        return torch.equal(a, b) if by_value or a.device.type == "cpu" else True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y, by_value) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], by_value) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a truth value: only the identical object matches
        return False


def _differences(a: dict, b: dict, by_value: bool) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not _same(a[k], b[k], by_value))


class CFGRun:
    """The CFG wrapper of one model's ``forward`` (see the module doc). ``state``: ``None`` = the global one."""

    def __init__(self, model: nn.Module, plan: CFGPlan, state: SequenceParallelState | None) -> None:
        self.model, self.plan, self._state = model, plan, state
        self.model_name = type(model).__name__
        # Another wrapper may already sit on the instance (accelerate's offload hooks, diffusers' hook registry):
        # call through it, and put it back on disable.
        self._saved = model.__dict__.get("forward")
        self.original = model.forward
        params = inspect.signature(type(model).forward).parameters
        self._positional = [n for n, p in list(params.items())[1:]
                            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.reset()

    def reset(self) -> None:
        """Forget the recorded branches and any kept prediction (e.g. after an error)."""
        self.branches: tuple[dict, dict] | None = None  # text arguments of branch 0 and branch 1
        self.learning: tuple[dict, dict] | None = None  # (text, other arguments) of a learning step's first call
        self.pending: tuple[int, dict, object] | None = None  # (branch expected next, its other arguments, output)
        self.pairs = 0

    @property
    def state(self) -> SequenceParallelState:
        return require_state(self._state)

    def enable(self) -> None:
        # An instance attribute: nn.Module.__call__ runs self.forward, so every hook (the sequence-parallel plan's
        # too) still runs around it.
        self.model.forward = self.forward

    def disable(self) -> None:
        if self._saved is not None:
            self.model.forward = self._saved
        else:
            self.model.__dict__.pop("forward", None)
        self.reset()

    def _arguments(self, args, kwargs) -> dict:
        if len(args) > len(self._positional):
            raise TypeError(f"{self.model_name}.forward takes {len(self._positional)} positional arguments, "
                            f"got {len(args)}")
        return {**dict(zip(self._positional, args)), **kwargs}

    def forward(self, *args, **kwargs):
        state = self.state
        if state.cfg_degree == 1:
            return self.original(*args, **kwargs)
        arguments = self._arguments(args, kwargs)
        try:
            if self.plan.kind == "batched":
                return self._batched(state, arguments)
            return self._two_calls(state, arguments)
        except BaseException:
            self.reset()
            raise

    # ---- one call on the branches batched ------------------------------------------------------------------
    def _batched(self, state, arguments: dict):
        # A 0-d tensor (a scalar timestep) is the same for every row: it stays whole.
        batched = {k: v for k, v in arguments.items()
                   if k in self.plan.arguments and isinstance(v, torch.Tensor) and v.dim()}
        sizes = {k: v.shape[0] for k, v in batched.items()}
        batch = sizes.get("hidden_states", next(iter(sizes.values()), None))
        wrong = {k: s for k, s in sizes.items() if s != batch}
        if batch is None or wrong:
            raise ValueError(f"{self.model_name}: CFG parallelism splits {sorted(batched)} along their batch (dim 0), "
                             f"but their sizes differ: {sizes}")
        if batch % state.cfg_degree:
            raise ValueError(
                f"{self.model_name}: cfg_degree={state.cfg_degree} must divide the batch of {batch} rows this call "
                "got; a guided batch has 2 rows per sample (is guidance on?)"
            )
        split = {k: cfg_split(v, 0, state) for k, v in batched.items()}
        output = self.original(**{**arguments, **split})
        return _with_sample(output, cfg_gather(_sample(output), 0, state))

    # ---- one call per branch -----------------------------------------------------------------------------
    def _split_arguments(self, arguments: dict) -> tuple[dict, dict]:
        text = {k: v for k, v in arguments.items() if k in self.plan.arguments}
        return text, {k: v for k, v in arguments.items() if k not in self.plan.arguments}

    def _two_calls(self, state, arguments: dict):
        if state.cfg_degree != 2:
            raise ValueError(
                f"{self.model_name}: its pipelines call the transformer once per CFG branch, which splits over "
                f"cfg_degree=2 CFG groups, not cfg_degree={state.cfg_degree}; use cfg_degree=2"
            )
        text, other = self._split_arguments(arguments)
        if self.pending is not None:
            return self._second_call(text, other, state)
        match = self._branch_of(text)
        if match is None:
            return self._learn(text, other, state)
        return self._first_call(match, arguments, other, state)

    def _branch_of(self, text: dict) -> int | None:
        if self.branches is None:
            return None
        for b, recorded in enumerate(self.branches):
            if not _differences(text, recorded, by_value=True):
                return b
        return None

    def _learn(self, text: dict, other: dict, state):
        if self.learning is None:
            self.learning = (text, other)
            self.branches, self.pairs = None, 0
            return self.original(**text, **other)
        first_text, first_other = self.learning
        self.learning = None
        changed = _differences(other, first_other, by_value=True)
        if changed:
            raise ValueError(
                f"{self.model_name}: CFG parallelism expects the pipeline to call the transformer once per CFG branch "
                f"with the same inputs except {list(self.plan.arguments)}, but two consecutive calls differ in "
                f"{changed}. Is guidance on (guidance_scale > 1, and true_cfg_scale > 1 with a negative prompt where "
                "the pipeline has one)? Otherwise use cfg_degree=1"
            )
        self.branches = (first_text, text)
        return self.original(**text, **other)

    def _first_call(self, branch: int, arguments: dict, other: dict, state):
        mine = state.cfg_rank
        call = arguments if mine == branch else {**other, **self.branches[mine]}
        output = self.original(**call)
        both = cfg_gather(_sample(output)[None], 0, state)  # [2, ...]: branch 0, branch 1
        self.pending = (1 - branch, other, _with_sample(output, both[1 - branch]))
        return _with_sample(output, both[branch])

    def _second_call(self, text: dict, other: dict, state):
        expected, first_other, kept = self.pending
        self.pending = None
        by_value = self.pairs == 0 or state.validate is True
        self.pairs += 1
        wrong_text = _differences(text, self.branches[expected], by_value=True)
        changed = _differences(other, first_other, by_value)
        if wrong_text or changed:
            what = (f"its {wrong_text} are not those of the other branch" if wrong_text else "") + \
                   (" and " if wrong_text and changed else "") + (f"its {changed} differ from the first call's"
                                                                   if changed else "")
            raise ValueError(
                f"{self.model_name}: under CFG parallelism the call after one CFG branch must be the other branch "
                f"with the same inputs, but {what}. The pipeline does not run the two branches in pairs; use "
                "cfg_degree=1"
            )
        return kept


def enable_cfg_parallel(transformer: nn.Module, state: SequenceParallelState | None = None,
                        plan: CFGPlan | None = None) -> nn.Module:
    """Run ``transformer``'s CFG branches on the state's CFG groups (see the module doc).

    ``enable_sequence_parallel`` calls it when the state's ``cfg_degree`` is above 1; call it yourself only for a
    model run without sequence parallelism inside each CFG group. ``plan``: instead of the registered one
    (:data:`CFG_PLANS`). Returns ``transformer``, its ``forward`` wrapped in place.

    Raises:
        ValueError: no plan for the model class; RuntimeError: already enabled.
    """
    plan = plan if plan is not None else cfg_plan_for_model(transformer)
    if plan is None:
        raise ValueError(
            f"CFG parallelism has no plan for {type(transformer).__name__} (known: {', '.join(sorted(CFG_PLANS))}); "
            "pass plan=CFGPlan('batched' or 'two_calls', argument names), or use cfg_degree=1"
        )
    if not isinstance(plan, CFGPlan):
        raise TypeError(f"plan must be a CFGPlan, got {plan!r}")
    if getattr(transformer, _ATTR, None) is not None:
        raise RuntimeError(f"CFG parallelism is already enabled on this {type(transformer).__name__}")
    run = CFGRun(transformer, plan, state)
    run.enable()
    setattr(transformer, _ATTR, run)
    return transformer


def disable_cfg_parallel(transformer: nn.Module) -> nn.Module:
    """Undo :func:`enable_cfg_parallel` (a model without it is returned unchanged)."""
    run = getattr(transformer, _ATTR, None)
    if run is not None:
        run.disable()
        delattr(transformer, _ATTR)
    return transformer

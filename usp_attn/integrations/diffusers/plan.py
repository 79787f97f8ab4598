"""Sequence-parallel plans: where a diffusers transformer's token sequence is cut and gathered, as data.

A plan maps module paths of the model (``""`` = the model itself, ``"blocks.0"``, ``"blocks.*.attn1"``: one
``*`` for every member of a ``ModuleList``) to what happens there:

* ``{input_name: Shard(...)}``: cut that forward argument to this rank's token shard before the module runs
  (a tuple of ``Shard | None`` for an argument that is a tuple of tensors, e.g. a ``(cos, sin)`` rotary table);
* ``{output_index: Shard(...)}``: cut that element of the module's output after it ran (0 for a plain tensor);
* ``Gather(...)``: gather the module's output back to the full sequence on every rank.

This is diffusers' ``_cp_plan`` vocabulary (``ContextParallelInput(split_dim, expected_dims, split_output)``,
``ContextParallelOutput(gather_dim, expected_dims)``), and :func:`from_diffusers_cp_plan` translates one. A
:class:`FamilyPlan` adds what attention needs to know that shapes cannot tell: which attention modules are self-,
cross- or joint attention, where a joint text+image attention puts the text tokens, and processors for attention
modules that compute attention themselves instead of calling diffusers' ``dispatch_attention_fn``.

Text is never sharded: text tokens (``encoder_hidden_states``, their mask, their positions) stay whole on every
rank and take part in joint attention as :class:`~usp_attn.USPAttention`'s replicated prefix/suffix, so they are
attended exactly once under every layout. diffusers' plans that cut text (Flux, Qwen-Image, LTX) are translated
without those entries.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Union

__all__ = ["ATTENTION_KINDS", "Shard", "Gather", "FamilyPlan", "from_diffusers_cp_plan", "TEXT_STREAM_INPUTS"]


@dataclasses.dataclass(frozen=True)
class Shard:
    """Cut a tensor along ``dim`` to this rank's contiguous token shard (``torch.tensor_split`` sizes).

    ``ndim``: apply only to tensors with this many dimensions; others pass unchanged (e.g. Wan's timestep is
    cut when it is per token ``[B, S]`` and left alone when it is per sample ``[B]``).
    """

    dim: int
    ndim: int | None = None


@dataclasses.dataclass(frozen=True)
class Gather:
    """Gather a module output along ``dim`` from every rank's shard (``ndim``: as in :class:`Shard`)."""

    dim: int
    ndim: int | None = None


#: What an attention module of a plan computes, over this rank's token shard ``s`` (and ``T`` whole text tokens):
#: ``"self"``: the shard's queries over every rank's tokens; ``"cross"``: the shard's queries over keys every rank
#: has whole (text, image), no communication; ``"joint"``: ``[text; shard]`` (or ``[shard; text]``) over every
#: rank's tokens and the text.
ATTENTION_KINDS = ("self", "cross", "joint")

#: What a module entry of a plan may hold.
ModuleEntry = Union[Mapping[Union[str, int], Union[Shard, tuple]], Gather, tuple]

#: Forward arguments that carry the text stream in diffusers transformers. They stay whole on every rank.
TEXT_STREAM_INPUTS = frozenset({
    "encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_mask", "txt_ids",
    "encoder_hidden_states_image", "audio_encoder_hidden_states", "audio_encoder_attention_mask",
})


@dataclasses.dataclass(frozen=True)
class FamilyPlan:
    """How one model family runs under usp_attn.

    Attributes:
        family: human-readable name, e.g. ``"Flux"``.
        plan: module path -> entry (see the module doc).
        joint_text: where joint attention puts the text tokens in q/k/v: ``"prefix"`` (text first, e.g. Flux),
            ``"suffix"`` (HunyuanVideo), or ``None`` (the family has no joint attention; text only in
            cross-attention).
        attention: module path -> ``"self"``, ``"cross"`` or ``"joint"`` (:data:`ATTENTION_KINDS`) for every
            attention module whose ``dispatch_attention_fn`` calls are routed (all but ``processors`` and
            ``local_attention``); ``"joint"`` needs ``joint_text``. At each module's first call for a token count
            the query/key lengths are checked against it on every rank.
        processors: module path -> factory ``(attention_module, run) -> processor`` (``run``: the model's
            ``SequenceParallelRun``; e.g. a ``PlanProcessor`` subclass) for attention modules
            whose diffusers processor does not call ``dispatch_attention_fn`` (e.g. CogVideoX's calls torch's
            SDPA directly); their attention is done by our processor instead.
        local_attention: module paths of attention modules that only ever see whole (replicated) tensors,
            e.g. HunyuanVideo's text refiner; they run unchanged, on every rank.
        text_only_masks: joint attention's masks hide text keys only (the model builds them from the text
            padding, every image key attended): the image keys then run unmasked on the fastest kernel and the
            text keys masked (``USPAttention(..., replicated_key_mask=)``). Checked on the device, without a sync.
        check: optional ``check(model) -> None`` raising ``ValueError`` for configurations the plan does not
            cover (e.g. HunyuanVideo's token-replace image conditioning).
        source: where the plan comes from (``"usp_attn"`` or ``"diffusers _cp_plan"``), for messages.
    """

    family: str
    plan: Mapping[str, ModuleEntry]
    joint_text: str | None = None
    attention: Mapping[str, str] = dataclasses.field(default_factory=dict)
    processors: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    local_attention: tuple[str, ...] = ()
    text_only_masks: bool = False
    check: Callable | None = None
    source: str = "usp_attn"

    def __post_init__(self) -> None:
        if self.joint_text not in (None, "prefix", "suffix"):
            raise ValueError(f"FamilyPlan.joint_text must be 'prefix', 'suffix' or None, got {self.joint_text!r}")
        for path, kind in self.attention.items():
            if not isinstance(path, str) or path.count("*") > 1:
                raise ValueError(f"FamilyPlan.attention key {path!r} must be a module path with at most one '*'")
            if kind not in ATTENTION_KINDS:
                raise ValueError(f"FamilyPlan.attention[{path!r}] must be one of {ATTENTION_KINDS}, got {kind!r}")
            if kind == "joint" and self.joint_text is None:
                raise ValueError(f"{self.family}: FamilyPlan.attention[{path!r}] is joint attention, but joint_text "
                                 "does not say where its text tokens are ('prefix' or 'suffix')")
        for path, entry in self.plan.items():
            _check_entry(path, entry)


def _check_entry(path: str, entry) -> None:
    if not isinstance(path, str) or path.count("*") > 1:
        raise ValueError(f"plan key {path!r} must be a module path with at most one '*'")
    if isinstance(entry, Gather):
        return
    if isinstance(entry, tuple) and entry and all(isinstance(g, Gather) or g is None for g in entry):
        return
    if not isinstance(entry, Mapping):
        raise ValueError(f"plan[{path!r}] must be a dict of Shard entries, a Gather or a tuple of Gather, got {entry!r}")
    for key, value in entry.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ValueError(f"plan[{path!r}] key {key!r} must be an argument name or an output index")
        parts = value if isinstance(value, tuple) else (value,)
        if not parts or not all(isinstance(p, Shard) or p is None for p in parts):
            raise ValueError(f"plan[{path!r}][{key!r}] must be a Shard or a tuple of Shard/None, got {value!r}")


def _shard_of(cp_input) -> Shard:
    return Shard(dim=int(cp_input.split_dim), ndim=cp_input.expected_dims)


def from_diffusers_cp_plan(cp_plan: Mapping, family: str, *, joint_text: str | None = None,
                           attention: Mapping[str, str] | None = None) -> FamilyPlan:
    """Our plan from a diffusers ``_cp_plan`` (read by attribute names: no private diffusers import).

    ``ContextParallelInput`` entries become :class:`Shard` (keyed by argument name, or by output index when
    ``split_output=True``), ``ContextParallelOutput`` entries :class:`Gather`. Entries for the text stream
    (:data:`TEXT_STREAM_INPUTS`) are dropped: text stays whole on every rank. A ``_cp_plan`` does not say which
    attention is which, so ``attention`` (see :class:`FamilyPlan`) comes from the caller.
    """
    plan: dict[str, ModuleEntry] = {}
    for path, entry in cp_plan.items():
        if isinstance(entry, Mapping):
            converted = {}
            for key, value in entry.items():
                if isinstance(key, str) and key in TEXT_STREAM_INPUTS:
                    continue
                if isinstance(value, (list, tuple)):
                    converted[key] = tuple(_shard_of(v) for v in value)
                elif isinstance(key, int) and not getattr(value, "split_output", False):
                    raise ValueError(f"{family} _cp_plan[{path!r}][{key}]: an output index needs split_output=True")
                else:
                    converted[key] = _shard_of(value)
            if converted:
                plan[path] = converted
        else:
            outputs = entry if isinstance(entry, (list, tuple)) else (entry,)
            gathers = tuple(None if o is None else Gather(int(o.gather_dim), o.expected_dims) for o in outputs)
            plan[path] = gathers[0] if len(gathers) == 1 else gathers
    return FamilyPlan(family=family, plan=plan, joint_text=joint_text, attention=dict(attention or {}),
                      source="diffusers _cp_plan")

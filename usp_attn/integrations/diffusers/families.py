"""The model families usp_attn runs, each as a plan (data; see :mod:`.plan`).

Facts each plan relies on (diffusers 0.42):

* Wan (``WanTransformer3DModel``): diffusers' own ``_cp_plan``: rotary ``(cos, sin)`` ``[1, N, 1, D]`` cut where
  ``rope`` makes them, tokens cut entering ``blocks.0``, per-token timesteps ``[B, N]`` (Wan 2.2 TI2V) cut at the
  model's input, ``proj_out`` gathered. Text (and I2V image) tokens only in cross-attention.
* Flux (``FluxTransformer2DModel``): diffusers' plan without its text entries: image tokens ``[B, N, C]`` and
  ``img_ids`` ``[N, 3]`` cut at the input, so the rotary table is made for ``[text; image shard]``; joint
  attention puts the text first (double-stream: ``cat([text, image])``; single-stream blocks get that
  concatenation as their input).
* Qwen-Image (``QwenImageTransformer2DModel``): tokens cut entering ``transformer_blocks.0``; ``pos_embed``
  returns ``(image_freqs [N, d], text_freqs [T, d])``: only the first is cut (diffusers' plan cuts both); text
  first in joint attention; the text padding mask becomes a ``[B, 1, 1, T + s]`` key mask.
* LTX-Video (``LTXVideoTransformer3DModel``): diffusers' plan without its text entries, plus per-token
  timesteps ``[B, N]`` cut at the input (diffusers' plan leaves them whole, which breaks conditioned
  generation); the text and its padding mask stay whole for cross-attention.
* HunyuanVideo (``HunyuanVideoTransformer3DModel``, no diffusers plan): rotary ``(cos, sin)`` ``[N, D]`` cut where
  ``rope`` makes them, tokens cut after ``x_embedder`` (so the model builds its ``[B, 1, 1, s + T]`` key mask
  from the shard), text *after* the image tokens in joint attention, the text refiner's attention left alone,
  ``proj_out`` gathered. Token-replace image conditioning (HunyuanVideo I2V) indexes the first frame's tokens
  and is refused.
* CogVideoX (``CogVideoXTransformer3DModel``, no diffusers plan): the pipeline passes the rotary table
  ``(cos, sin)`` ``[N, D]`` as an input (cut there), tokens cut entering ``transformer_blocks.0`` (after the patch
  embedding, which adds positions over the whole sequence), ``proj_out`` gathered; its processor calls torch's
  SDPA itself, so :class:`~usp_attn.integrations.diffusers.cogvideox.CogVideoXProcessor` replaces it.
"""

from __future__ import annotations

from usp_attn.integrations.diffusers.cogvideox import CogVideoXProcessor
from usp_attn.integrations.diffusers.plan import FamilyPlan, Gather, Shard, from_diffusers_cp_plan
from usp_attn.integrations.diffusers.run import attention_modules

__all__ = ["BUILTIN_PLANS", "plan_for_model"]


def _hunyuan_video_check(model) -> None:
    if getattr(model.config, "image_condition_type", None) == "token_replace":
        raise ValueError(
            "HunyuanVideoTransformer3DModel with image_condition_type='token_replace' (HunyuanVideo I2V) treats the "
            "first frame's tokens apart by position; usp_attn does not shard it yet"
        )


def _from_diffusers(cls_name: str, family: str, attention: dict, joint_text=None, extra=None):
    """A plan built from the model class's own ``_cp_plan`` when the model is enabled."""

    def build(model) -> FamilyPlan:
        translated = from_diffusers_cp_plan(type(model)._cp_plan, family, joint_text=joint_text, attention=attention)
        if not extra:
            return translated
        plan = dict(translated.plan)
        for path, entries in extra.items():
            plan[path] = {**plan.get(path, {}), **entries}
        return FamilyPlan(family, plan, joint_text=joint_text, attention=attention,
                          source="diffusers _cp_plan + usp_attn")

    return build


_IMAGE_TOKENS = {"hidden_states": Shard(1, 3)}

#: Class name -> a FamilyPlan, or a function ``model -> FamilyPlan`` (for plans read from the model).
BUILTIN_PLANS: dict = {
    "WanTransformer3DModel": _from_diffusers(
        "WanTransformer3DModel", "Wan", {"blocks.*.attn1": "self", "blocks.*.attn2": "cross"}
    ),
    "FluxTransformer2DModel": _from_diffusers(
        "FluxTransformer2DModel", "Flux",
        {"transformer_blocks.*.attn": "joint", "single_transformer_blocks.*.attn": "joint"}, joint_text="prefix",
    ),
    "QwenImageTransformer2DModel": FamilyPlan(
        "Qwen-Image",
        {
            "pos_embed": {0: Shard(0, 2)},
            "transformer_blocks.0": dict(_IMAGE_TOKENS),
            "transformer_blocks.*": {"modulate_index": Shard(1, 2)},
            "proj_out": Gather(1, 3),
        },
        joint_text="prefix",
        attention={"transformer_blocks.*.attn": "joint"},
        text_only_masks=True,  # [encoder_hidden_states_mask, ones(image)]
    ),
    "LTXVideoTransformer3DModel": _from_diffusers(
        "LTXVideoTransformer3DModel", "LTX-Video",
        {"transformer_blocks.*.attn1": "self", "transformer_blocks.*.attn2": "cross"},
        extra={"": {"timestep": Shard(1, 2)}},
    ),
    "HunyuanVideoTransformer3DModel": FamilyPlan(
        "HunyuanVideo",
        {
            "rope": {0: Shard(0, 2), 1: Shard(0, 2)},
            "x_embedder": {0: Shard(1, 3)},
            "proj_out": Gather(1, 3),
        },
        joint_text="suffix",
        attention={"transformer_blocks.*.attn": "joint", "single_transformer_blocks.*.attn": "joint"},
        text_only_masks=True,  # keys past the image tokens + the prompt's tokens masked
        local_attention=("context_embedder.token_refiner.refiner_blocks.*.attn",),
        check=_hunyuan_video_check,
    ),
    "CogVideoXTransformer3DModel": FamilyPlan(
        "CogVideoX",
        {
            "": {"image_rotary_emb": (Shard(0, 2), Shard(0, 2))},
            "transformer_blocks.0": dict(_IMAGE_TOKENS),
            "proj_out": Gather(1, 3),
        },
        joint_text="prefix",
        attention={"transformer_blocks.*.attn1": "joint"},  # run by CogVideoXProcessor, not routed
        processors={"transformer_blocks.*.attn1": CogVideoXProcessor},
    ),
}


def plan_for_model(model, registry: dict) -> FamilyPlan | None:
    """The plan for ``model``: registered for its class (or a base class), else its own diffusers ``_cp_plan``."""
    for cls in type(model).__mro__:
        entry = registry.get(cls.__name__)
        if entry is not None:
            return entry if isinstance(entry, FamilyPlan) else entry(model)
    cp_plan = getattr(type(model), "_cp_plan", None)
    if cp_plan:
        return from_diffusers_cp_plan(cp_plan, type(model).__name__, attention=declared_by_modules(model))
    return None


def declared_by_modules(model) -> dict[str, str]:
    """Declarations for a model that has only a diffusers ``_cp_plan``: cross-attention where the module says so
    (``is_cross_attention``, set by diffusers' ``Attention`` and the Wan-style modules), self-attention elsewhere.

    Such a plan has no ``joint_text``, so it cannot run joint attention anyway; a module that is not what its
    attribute says fails the first call's length check, naming the module (a registered plan then fixes it).
    """
    return {name: "cross" if getattr(module, "is_cross_attention", False) is True else "self"
            for name, module in attention_modules(model)}

"""Sequence parallelism for diffusers' ``WanTransformer3DModel`` (Wan 2.1 / 2.2: T2V, I2V, TI2V).

Facts about the model this relies on (diffusers >= 0.35):

* ``forward(hidden_states [B, C, F, H, W], timestep, encoder_hidden_states, ...)``: ``rope``
  builds the rotary table ``(cos, sin)``, each ``[1, S, 1, D]`` over the S = F/pt * H/ph * W/pw
  tokens; ``patch_embedding`` + flatten give ``[B, S, dim]``; ``condition_embedder`` returns
  ``(temb, timestep_proj, text, image)``, where temb / timestep_proj are per token
  (``[B, S, ...]``) when the timestep is ``[B, S]`` (Wan 2.2 TI2V) and per sample otherwise;
  every block takes ``(hidden_states, text, timestep_proj, rotary)``; then ``norm_out`` (with
  a shift/scale from temb), ``proj_out`` and the unpatchify reshape.
* Each block's ``attn1`` is self-attention (projections, RMSNorm over all heads on q and k,
  interleaved rotary on q and k); ``attn2`` is cross-attention to the text, and with
  ``add_k_proj`` (I2V) also to image tokens, which diffusers puts *before* the last 512
  (text) tokens of ``encoder_hidden_states``; both cross outputs are summed.

What we change: the rotary table and (TI2V) the per-token conditioning are cut to this
rank's tokens where they are made, the tokens before the first block, and ``proj_out``'s
output is gathered, so blocks and ``norm_out`` run on ``[B, S/W, dim]``. Self-attention
runs through :class:`~usp_attn.USPAttention`; cross-attention through
``USPAttention(skip_sequence_parallel=True)`` (text and image tokens full on every rank:
no communication).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from usp_attn.integrations.diffusers_adapter import CallContext, SequenceParallelAdapter
from usp_attn.layers.usp import USPAttention

__all__ = ["WanAdapter", "WanSelfAttentionProcessor", "WanCrossAttentionProcessor", "apply_interleaved_rotary"]

#: Text tokens at the end of ``encoder_hidden_states`` in Wan I2V (the UMT5 context length);
#: diffusers treats everything before them as image tokens.
WAN_TEXT_TOKENS = 512


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x`` by the angle whose cos/sin the table holds.

    x: ``[B, S, H, D]`` (any float dtype); cos, sin: ``[1, S, 1, D]`` with each value stored at
    both positions of its pair (Wan's layout; we read cos at even and sin at odd positions).
    Computed in the promoted dtype of x and the table, returned in x's dtype.
    """
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack((x_even * c - x_odd * s, x_even * s + x_odd * c), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def _self_projections(attn: nn.Module, x: torch.Tensor):
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def _cross_kv(attn: nn.Module, context: torch.Tensor):
    if getattr(attn, "fused_projections", False):
        return attn.to_kv(context).chunk(2, dim=-1)
    return attn.to_k(context), attn.to_v(context)


def _image_kv(attn: nn.Module, image: torch.Tensor):
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_kv"):
        return attn.to_added_kv(image).chunk(2, dim=-1)
    return attn.add_k_proj(image), attn.add_v_proj(image)


def _output(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, D]`` attention output -> the module's output ``[B, S, dim]``."""
    return attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))


class WanSelfAttentionProcessor:
    """``attn1`` on this rank's token shard ``hidden_states [B, s_r, dim]`` -> ``[B, s_r, dim]``.

    The rotary table passed in is already this rank's shard (``[1, s_r, 1, D]``).
    """

    def __init__(self, num_heads: int, head_size: int, context: CallContext, state=None) -> None:
        self.attention = USPAttention(num_heads, head_size, state=state)
        self.context = context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "WanSelfAttentionProcessor (usp_attn sequence parallel) handles self-attention without a mask; got "
                f"encoder_hidden_states={_describe(encoder_hidden_states)}, attention_mask={_describe(attention_mask)}"
            )
        q, k, v = _self_projections(attn, hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)  # RMSNorm across all heads: per token, so shard-local
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        if rotary_emb is not None:
            q = apply_interleaved_rotary(q, *rotary_emb)
            k = apply_interleaved_rotary(k, *rotary_emb)
        out = self.attention(q, k, v, seq_len=self.context.seq_len)
        return _output(attn, out.type_as(q))


class WanCrossAttentionProcessor:
    """``attn2``: this rank's queries ``[B, s_r, dim]`` against the full text (and image) tokens.

    ``encoder_hidden_states``: ``[B, S_txt, dim]``, or with ``add_k_proj`` (I2V)
    ``[B, S_img + 512, dim]`` with the image tokens first. No communication.
    """

    def __init__(self, num_heads: int, head_size: int) -> None:
        self.attention = USPAttention(num_heads, head_size, skip_sequence_parallel=True)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("WanCrossAttentionProcessor needs encoder_hidden_states (the text tokens), got None")
        text, image = encoder_hidden_states, None
        if getattr(attn, "add_k_proj", None) is not None:
            n_image = text.shape[1] - WAN_TEXT_TOKENS
            if n_image <= 0:
                raise ValueError(
                    f"Wan image-to-video cross-attention expects image tokens followed by {WAN_TEXT_TOKENS} text "
                    f"tokens in encoder_hidden_states, got {text.shape[1]} tokens in total"
                )
            image, text = text[:, :n_image], text[:, n_image:]
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k, v = _cross_kv(attn, text)
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        v = v.unflatten(2, (attn.heads, -1))
        out = self.attention(q, k, v, attention_mask).type_as(q)
        if image is not None:
            k_img, v_img = _image_kv(attn, image)
            k_img = attn.norm_added_k(k_img).unflatten(2, (attn.heads, -1))
            v_img = v_img.unflatten(2, (attn.heads, -1))
            out = out + self.attention(q, k_img, v_img).type_as(q)
        return _output(attn, out)


class WanAdapter(SequenceParallelAdapter):
    family = "Wan"
    model_classes = ("WanTransformer3DModel",)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        missing = [n for n in ("rope", "patch_embedding", "condition_embedder", "blocks", "proj_out", "config")
                   if not hasattr(model, n)]
        if missing:
            raise TypeError(f"{name} lacks {missing}: not the WanTransformer3DModel layout of diffusers >= 0.35")
        if len(model.blocks) == 0:
            raise ValueError(f"{name} has no transformer blocks; nothing to run in parallel")
        heads, head_size = model.config.num_attention_heads, model.config.attention_head_dim
        for i, block in enumerate(model.blocks):
            for part in ("attn1", "attn2"):
                attn = getattr(block, part, None)
                if attn is None or not hasattr(attn, "set_processor") or not hasattr(attn, "processor"):
                    raise TypeError(
                        f"{name}.blocks[{i}].{part} is not a diffusers attention module with set_processor(); "
                        "usp_attn needs diffusers >= 0.35 (WanAttention)"
                    )
                if attn.heads != heads or attn.to_q.out_features != heads * head_size:
                    raise ValueError(
                        f"{name}.blocks[{i}].{part} has {attn.heads} heads and {attn.to_q.out_features} query "
                        f"features; the config says num_attention_heads={heads}, attention_head_dim={head_size}"
                    )

    def install(self) -> None:
        model = self.model
        heads, head_size = model.config.num_attention_heads, model.config.attention_head_dim
        self.add_hook(model, self._begin, pre=True, with_kwargs=True)
        self.add_hook(model, self.end_call, always_call=True)
        self.add_hook(model.rope, self._shard_rotary)
        self.add_hook(model.condition_embedder, self._shard_per_token_conditioning)
        self.add_hook(model.blocks[0], self._shard_tokens, pre=True, with_kwargs=True)
        self.add_hook(model.proj_out, self._gather_tokens)
        for block in model.blocks:
            self.set_processor(block.attn1, WanSelfAttentionProcessor(heads, head_size, self.context, self._state))
            self.set_processor(block.attn2, WanCrossAttentionProcessor(heads, head_size))

    # ---- hooks ---------------------------------------------------------------------------
    def _begin(self, model, args, kwargs):
        latents = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError(
                f"{type(model).__name__} expects hidden_states [B, C, F, H, W], got {_describe(latents)}"
            )
        patch = tuple(model.config.patch_size)
        self.begin_call(math.prod(n // p for n, p in zip(latents.shape[2:], patch)))

    def _shard_rotary(self, module, args, output):
        if not self.active:
            return None
        cos, sin = output
        return type(output)((self.shard(cos, 1, "the rotary cos table"), self.shard(sin, 1, "the rotary sin table")))

    def _shard_per_token_conditioning(self, module, args, output):
        temb, timestep_proj, *rest = output
        if not self.active or temb.dim() != 3:
            return None  # one timestep per sample: nothing per token to cut
        temb = self.shard(temb, 1, "the per-token time embedding (timestep [B, S])")
        timestep_proj = self.shard(timestep_proj, 1, "the per-token timestep projection")
        return type(output)((temb, timestep_proj, *rest))

    def _shard_tokens(self, module, args, kwargs):
        if not self.active:
            return None
        if args:
            return (self.shard(args[0], 1, "hidden_states", record_length=True), *args[1:]), kwargs
        kwargs = dict(kwargs, hidden_states=self.shard(kwargs["hidden_states"], 1, "hidden_states", record_length=True))
        return args, kwargs

    def _gather_tokens(self, module, args, output):
        if not self.active:
            return None
        return self.gather(output, 1)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return repr(x) if x is None else type(x).__name__

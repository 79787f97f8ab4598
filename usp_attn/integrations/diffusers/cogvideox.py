"""CogVideoX's joint attention under usp_attn.

diffusers' ``CogVideoXAttnProcessor2_0`` (and the fused variant) call torch's SDPA directly, so the router of
:mod:`.attention` never sees them; this processor does the same math on this rank's token shard:

    x = [text (T, whole on every rank) ; video tokens (this rank's shard)]     [B, T + s_r, dim]
    q, k, v = to_q/k/v(x) (or to_qkv), split into heads, LayerNorm over head_dim (norm_q / norm_k)
    RoPE on the video part of q (and of k unless cross-attention), with the shard of the rotary table
    attention: USPAttention with the T text tokens as a replicated prefix, scale head_dim ** -0.5
    out = to_out(attention); returns (video part, text part)
"""

from __future__ import annotations

import torch

from usp_attn.integrations.diffusers.run import PlanProcessor

__all__ = ["CogVideoXProcessor"]


class CogVideoXProcessor(PlanProcessor):
    """Replaces ``attn1``'s processor of every ``CogVideoXBlock`` (see the module doc)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        run = self.run
        if not run.context.sharding:  # outside a sequence-parallel call: diffusers' own processor
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError(f"{run.model_name}: CogVideoX attention with an attention_mask is not supported under "
                             "usp_attn sequence parallelism (the model never passes one)")
        from diffusers.models.embeddings import apply_rotary_emb

        text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))  # [B, T + s_r, H, D]
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :text], apply_rotary_emb(q[:, text:], image_rotary_emb, sequence_dim=1)], dim=1)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :text], apply_rotary_emb(k[:, text:], image_rotary_emb, sequence_dim=1)], dim=1)
        layer = run.layer(attn.heads, attn.heads, q.shape[-1], None, False, cross=False)
        out = layer(q, k, v, num_replicated_prefix=text, seq_len=run.context.seq_len, load_balance=False)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(q.dtype)))
        encoder_out, out = out.split([text, out.shape[1] - text], dim=1)
        return out, encoder_out

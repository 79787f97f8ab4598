"""Tiny randomly initialised diffusers transformers of every supported family, with matching inputs.

``build(family, heads, seed)`` makes the model (2 blocks of attention: 1 double + 1 single stream where the
family has both), ``inputs(family, shape, seed)`` the full inputs of one call. Shapes are given as token grids
so the token count N is explicit; head size 16 throughout.

Weights are re-drawn after construction: diffusers zero-initialises some (biases, modulation, output
projections), which would leave paths trivially inactive; norm scales stay near 1 so q.k logits have O(1)
spread (a near-uniform softmax would hide attention mistakes).
"""

from __future__ import annotations

import torch

HEAD = 16
TEXT_DIM = 32
POOLED = 16
FAMILIES = ("wan", "flux", "qwen", "ltx", "hunyuan_video", "cogvideox")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.copy_(noise * 0.5 / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def build(family: str, heads: int, seed: int = 0, *, text_tokens: int = 7):
    import diffusers

    inner = heads * HEAD
    if family == "wan":
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=HEAD, in_channels=4, out_channels=4,
            text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32)
    elif family == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=HEAD,
            num_attention_heads=heads, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED,
            axes_dims_rope=(4, 6, 6))
    elif family == "qwen":
        model = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=HEAD,
            num_attention_heads=heads, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6))
    elif family == "ltx":
        model = diffusers.LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, num_attention_heads=heads, attention_head_dim=HEAD,
            cross_attention_dim=inner, num_layers=2, caption_channels=TEXT_DIM)
    elif family == "hunyuan_video":
        model = diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=HEAD, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
            guidance_embeds=False, text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED, rope_axes_dim=(4, 6, 6))
    elif family == "cogvideox":
        model = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=HEAD, in_channels=4, out_channels=4, time_embed_dim=16,
            text_embed_dim=TEXT_DIM, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
            max_text_seq_length=text_tokens, use_rotary_positional_embeddings=True)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return randomize(model, seed)


def token_count(family: str, grid: tuple[int, int, int]) -> int:
    """Tokens of a (frames, height, width) latent grid after patching (patch 2x2 where the family has it)."""
    f, h, w = grid
    return f * h * w


def inputs(family: str, grid: tuple[int, int, int], *, batch: int = 1, text: int = 7, text_mask: bool = False,
           per_token_timestep: bool = False, seed: int = 1) -> dict:
    """Full inputs of one call for a model from :func:`build`; ``grid`` = (frames, h, w) in tokens."""
    gen = torch.Generator().manual_seed(seed)
    f, h, w = grid
    n = f * h * w
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    timestep = torch.randint(0, 1000, (batch,), generator=gen).float()
    mask = torch.ones(batch, text, dtype=torch.bool)
    if text_mask:  # padded prompts: sample b keeps text - 2 - b tokens
        for b in range(batch):
            mask[b, max(1, text - 2 - b):] = False
    text_states = rand(batch, text, TEXT_DIM)
    if family == "wan":
        kw = dict(hidden_states=rand(batch, 4, f, 2 * h, 2 * w), encoder_hidden_states=text_states,
                  timestep=torch.randint(0, 1000, (batch, n), generator=gen).float() if per_token_timestep else timestep)
    elif family == "flux":
        ids = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
        kw = dict(hidden_states=rand(batch, n, 8), encoder_hidden_states=text_states, pooled_projections=rand(batch, POOLED),
                  timestep=timestep / 1000, img_ids=ids.reshape(n, 3).float(),
                  txt_ids=torch.zeros(text, 3))
    elif family == "qwen":
        kw = dict(hidden_states=rand(batch, n, 16), encoder_hidden_states=text_states,
                  encoder_hidden_states_mask=mask if text_mask else None, timestep=timestep / 1000,
                  img_shapes=[[(f, h, w)]] * batch)
    elif family == "ltx":
        t = torch.randint(0, 1000, (batch, n), generator=gen).float() if per_token_timestep else timestep
        kw = dict(hidden_states=rand(batch, n, 8), encoder_hidden_states=text_states, timestep=t,
                  encoder_attention_mask=mask.long(), num_frames=f, height=h, width=w)
    elif family == "hunyuan_video":
        kw = dict(hidden_states=rand(batch, 4, f, 2 * h, 2 * w), timestep=timestep, encoder_hidden_states=text_states,
                  encoder_attention_mask=mask.long(), pooled_projections=rand(batch, POOLED))
    elif family == "cogvideox":
        kw = dict(hidden_states=rand(batch, f, 4, 2 * h, 2 * w), encoder_hidden_states=text_states, timestep=timestep,
                  image_rotary_emb=(rand(n, HEAD).cos(), rand(n, HEAD).sin()))
    else:
        raise ValueError(f"unknown family {family!r}")
    return dict(kw, return_dict=False)


def first_block(model, family: str):
    """The first transformer block (to check it sees only a shard of the image tokens)."""
    return model.blocks[0] if family == "wan" else model.transformer_blocks[0]


def first_block_tokens(family: str, args, kwargs) -> int:
    """Image-token rows the first block got (its ``hidden_states`` argument)."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    return x.shape[1]

"""Flow-matching Euler sampling (as Wan's scheduler) and the stand-in "decoder" of the built-in model.

The model predicts the velocity ``v = noise - x0``; with shifted sigmas
``sigma' = shift * s / (1 + (shift - 1) * s)`` for ``s`` evenly spaced from 1 to 0, one
Euler step is ``x <- x + (sigma_next - sigma) * v`` and the model sees ``t = 1000 * sigma``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["flow_match_sigmas", "denoise", "latent_grid", "latents_to_video", "VAE_STRIDE"]

#: Wan 2.1 VAE compression (frames, height, width): F pixel frames = 1 + 4 (F' - 1), H = 8 H', W = 8 W'.
VAE_STRIDE = (4, 8, 8)


def latent_grid(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (frames, height, width) of a video of that many pixel frames / pixels (Wan 2.1 VAE)."""
    st, sh, sw = VAE_STRIDE
    return (num_frames - 1) // st + 1, height // sh, width // sw


def flow_match_sigmas(num_steps: int, shift: float = 5.0) -> torch.Tensor:
    """``[num_steps + 1]`` float64 noise levels from 1 down to 0, shifted towards high noise."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def denoise(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    text: torch.Tensor,
    negative_text: torch.Tensor | None,
    sigmas: torch.Tensor,
    guidance_scale: float,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the Euler loop; returns the final latents ``[B, C, F, H, W]`` float32.

    Args:
        model: ``model(latents, timestep [B], text) -> velocity``, full tensors on every rank.
        noise: initial latents ``[B, C, F, H, W]`` (kept in float32 between steps).
        text, negative_text: ``[B, L, text_dim]``. Classifier-free guidance runs when
            ``guidance_scale > 1`` and ``negative_text`` is given: both branches in one
            batch of ``2B``, ``v = v_neg + g * (v_text - v_neg)``.
        on_step: called after each step with ``(step index, guided velocity float32)``.
    """
    cfg = guidance_scale > 1.0 and negative_text is not None
    cond = torch.cat([negative_text, text]) if cfg else text
    x = noise.float()
    for i in range(len(sigmas) - 1):
        t = torch.full((cond.shape[0],), float(sigmas[i]) * 1000.0, device=x.device)
        inp = torch.cat([x, x]) if cfg else x
        v = model(inp, t, cond).float()
        if cfg:
            v_neg, v_text = v.chunk(2)
            v = v_neg + guidance_scale * (v_text - v_neg)
        x = x + float(sigmas[i + 1] - sigmas[i]) * v
        if on_step is not None:
            on_step(i, v)
    return x


def latents_to_video(latents: torch.Tensor, num_frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Stand-in for a VAE decoder: latents ``[C, F', H', W']`` -> uint8 RGB ``[num_frames, height, width, 3]``.

    There is no VAE here: a fixed seeded linear map takes the C latent channels to RGB,
    ``tanh`` squashes it to [-1, 1], and each latent pixel is repeated to the VAE's
    stride (first frame once, then each latent frame 4 times; 8 x 8 pixels). The
    result shows the latents' structure; it is not a picture of anything.
    """
    c = latents.shape[0]
    mix = torch.randn(3, c, generator=torch.Generator().manual_seed(seed)) / math.sqrt(c)
    rgb = torch.tanh(torch.einsum("rc,cfhw->fhwr", mix, latents.float().cpu()))
    st, sh, sw = VAE_STRIDE
    frames = torch.cat([rgb[:1], rgb[1:].repeat_interleave(st, dim=0)])
    frames = frames.repeat_interleave(sh, dim=1).repeat_interleave(sw, dim=2)
    assert frames.shape[:3] == (num_frames, height, width), (frames.shape, num_frames, height, width)
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

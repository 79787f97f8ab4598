"""Flow-matching Euler sampling (as Wan's scheduler) and the built-in model's stand-in VAE.

The model predicts the velocity ``v = noise - x0``; with shifted sigmas
``sigma' = shift * s / (1 + (shift - 1) * s)`` for ``s`` evenly spaced from 1 to 0, one
Euler step is ``x <- x + (sigma_next - sigma) * v`` and the model sees ``t = 1000 * sigma``.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["flow_match_sigmas", "denoise", "latent_grid", "rgb_to_latents", "latents_to_video", "VAE_STRIDE",
           "LATENT_CHANNELS"]

#: Wan 2.1 VAE compression (frames, height, width): F pixel frames = 1 + 4 (F' - 1), H = 8 H', W = 8 W'.
VAE_STRIDE = (4, 8, 8)
LATENT_CHANNELS = 16  # Wan 2.1 VAE
RGB_SHIFT, RGB_SCALE = 0.7, 2.0  # latent = (rgb + 0.7) * 2 for rgb in [-1, 1]


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


def rgb_to_latents(frames: torch.Tensor) -> torch.Tensor:
    """Stand-in VAE encoder: RGB ``[B, F', 3, 2 H', 2 W']`` in [-1, 1] -> latents ``[B, 16, F', H', W']``.

    Each latent pixel holds the RGB of a 2 x 2 block (12 channels, a space-to-depth), shifted and
    scaled so a dark background is about 0 and coloured pixels 2 to 3 (a VAE's latents are scaled to
    about unit variance too: it makes what the model has to learn stand out of the noise); the
    remaining 4 of the 16 channels are zero. The RGB frames are a quarter of the video's
    size: :func:`latents_to_video` scales them up 4x, so a latent pixel covers the VAE
    stride's 8 x 8 pixels, as Wan's does.
    """
    b, f, c, h, w = frames.shape
    frames = (frames + RGB_SHIFT) * RGB_SCALE
    blocks = frames.reshape(b, f, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 6, 1, 3, 5)  # [B, 3, 2, 2, F', H', W']
    latents = blocks.reshape(b, 4 * c, f, h // 2, w // 2)
    return torch.cat([latents, latents.new_zeros(b, LATENT_CHANNELS - 4 * c, f, h // 2, w // 2)], dim=1)


def latents_to_video(latents: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Stand-in VAE decoder: latents ``[16, F', H', W']`` -> uint8 RGB ``[num_frames, height, width, 3]``.

    The inverse of :func:`rgb_to_latents` (channels 12-15 are ignored), clamped to [-1, 1],
    scaled up 4x bilinearly; in time the first latent frame makes the first video frame and
    every later one the next 4 (Wan's VAE groups frames that way).
    """
    c, f, h, w = latents.shape
    rgb = latents[:12].float().cpu().reshape(3, 2, 2, f, h, w).permute(3, 0, 4, 1, 5, 2).reshape(f, 3, 2 * h, 2 * w)
    rgb = (rgb / RGB_SCALE - RGB_SHIFT).clamp(-1, 1)
    rgb = torch.nn.functional.interpolate(rgb, scale_factor=4, mode="bilinear", align_corners=False)
    st = VAE_STRIDE[0]
    frames = torch.cat([rgb[:1], rgb[1:].repeat_interleave(st, dim=0)]).permute(0, 2, 3, 1)
    assert frames.shape[:3] == (num_frames, height, width), (frames.shape, num_frames, height, width)
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

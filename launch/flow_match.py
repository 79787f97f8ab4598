"""Flow-matching Euler sampling (as Wan's scheduler) and the built-in model's stand-in VAE.

The model predicts the velocity ``v = noise - x0``; with shifted sigmas
``sigma' = shift * s / (1 + (shift - 1) * s)`` for ``s`` evenly spaced from 1 to 0, one
Euler step is ``x <- x + (sigma_next - sigma) * v`` and the model sees ``t = 1000 * sigma``.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["flow_match_sigmas", "denoise", "latent_grid", "rgb_to_latents", "latents_to_video", "in_between",
           "VAE_STRIDE", "LATENT_CHANNELS"]

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
    before_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the Euler loop; returns the final latents ``[B, C, F, H, W]`` float32.

    Args:
        model: ``model(latents, timestep [B], text) -> velocity``, full tensors on every rank.
        noise: initial latents ``[B, C, F, H, W]`` (kept in float32 between steps).
        text, negative_text: ``[B, L, text_dim]``. Classifier-free guidance runs when
            ``guidance_scale > 1`` and ``negative_text`` is given: both branches in one
            batch of ``2B``, ``v = v_neg + g * (v_text - v_neg)``.
        on_step: called after each step with ``(step index, guided velocity float32)``.
        before_step: called before each step with its index (e.g. to switch sparse attention on).
    """
    cfg = guidance_scale > 1.0 and negative_text is not None
    cond = torch.cat([negative_text, text]) if cfg else text
    x = noise.float()
    for i in range(len(sigmas) - 1):
        if before_step is not None:
            before_step(i)
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
    scaled up 4x bilinearly. In time, latent frame t is video frame 4t (Wan's VAE stride: F = 1 + 4 (F' - 1);
    the training clips show latent frame t at time t / (F' - 1) of the path) and the 3 frames between
    two latent frames are motion-compensated in-betweens (:func:`in_between`): repeating each latent
    frame 4 times instead would make a moving shape jump every fourth frame.
    """
    c, f, h, w = latents.shape
    rgb = latents[:12].float().cpu().reshape(3, 2, 2, f, h, w).permute(3, 0, 4, 1, 5, 2).reshape(f, 3, 2 * h, 2 * w)
    rgb = (rgb / RGB_SCALE - RGB_SHIFT).clamp(-1, 1)
    st = VAE_STRIDE[0]
    centres = [_foreground_centre(frame) for frame in rgb]
    sequence = [rgb[0]]
    for t in range(1, f):  # at the RGB frames' quarter size: 16x less work than after the upscale
        sequence += [in_between(rgb[t - 1], rgb[t], j / st, centres[t - 1:t + 1]) for j in range(1, st)] + [rgb[t]]
    rgb = torch.nn.functional.interpolate(torch.stack(sequence), scale_factor=4, mode="bilinear", align_corners=False)
    frames = rgb.permute(0, 2, 3, 1)
    assert frames.shape[:3] == (num_frames, height, width), (frames.shape, num_frames, height, width)
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _foreground_centre(frame: torch.Tensor) -> torch.Tensor | None:
    """Centre ``(x, y)`` in pixels of what stands out of ``frame``'s (``[3, H, W]``) background (its per-channel
    median); ``None`` when nothing does. Weighted by how far beyond a threshold a pixel stands out, so the centre
    moves continuously with the pixels (two nearly equal decodes get nearly equal in-betweens)."""
    background = frame.flatten(1).median(dim=1).values.view(3, 1, 1)
    weight = ((frame - background).abs().amax(dim=0) - 0.2).clamp_min(0)
    mass = weight.sum()
    if mass <= 0:
        return None
    ys, xs = (torch.arange(n, dtype=frame.dtype) for n in frame.shape[1:])
    return torch.stack([(weight.sum(0) * xs).sum(), (weight.sum(1) * ys).sum()]) / mass


def _translate(frame: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``frame`` ``[3, H, W]`` moved by ``shift`` = ``(dx, dy)`` pixels (bilinear; edges extended)."""
    h, w = frame.shape[1:]
    theta = torch.tensor([[1.0, 0.0, -2 * float(shift[0]) / w], [0.0, 1.0, -2 * float(shift[1]) / h]],
                         dtype=frame.dtype)[None]
    grid = torch.nn.functional.affine_grid(theta, [1, *frame.shape], align_corners=False)
    return torch.nn.functional.grid_sample(frame[None], grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)[0]


def in_between(a: torch.Tensor, b: torch.Tensor, alpha: float, centres=None) -> torch.Tensor:
    """The frame a fraction ``alpha`` of the way from ``a`` to ``b`` (``[3, H, W]``): each moved along the
    displacement of their foreground centres to where it is at ``alpha``, then blended. For what the built-in
    model draws (one shape moving in a straight line over a plain background) the shape is in one place, whole;
    a plain cross-fade would show two half-transparent shapes. Without a foreground it is that cross-fade.
    ``centres``: the two frames' ``_foreground_centre``, when known."""
    ca, cb = centres if centres is not None else (_foreground_centre(a), _foreground_centre(b))
    if ca is None or cb is None:
        return torch.lerp(a, b, alpha)
    move = cb - ca
    return torch.lerp(_translate(a, alpha * move), _translate(b, (alpha - 1) * move), alpha)

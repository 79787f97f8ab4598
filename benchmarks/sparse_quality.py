"""Part "sparse-quality": what a sparse pattern costs in accuracy, on two kinds of input (CPU or GPU).

* **Synthetic video-like attention.** Tokens of a ``F x H x W`` grid get ``q = k = W phi(f, y, x) + 0.3 e``:
  ``phi`` are low-frequency Fourier features of the token's 3-D position (4 frequencies per axis, random phases)
  and ``W`` a fixed random projection to the head size, so nearby tokens have similar vectors and large dot
  products (3-D positional locality, as video DiT attention maps show), ``e`` is unit noise, ``v`` random.
* **The built-in model's own attention.** The trained built-in DiT (launch/weights) runs its first denoising
  step unconditionally (the empty prompt: CFG's other branch) in one process; ``usp_attn.sparse.capture`` records every self-attention layer's
  q, k, v, on which each pattern is measured.

Rows: density (kept query-key pairs) and relative error vs dense attention, for sliding-tile windows and
``TopMassSparsity`` masses. Errors are computed in fp64 by ``usp_attn.sparse.sparsity_error``.
"""

from __future__ import annotations

import math
import pathlib

import torch

from usp_attn.sparse import SlidingTileSparsity, TopMassSparsity, VideoGrid, sparsity_error
from usp_attn.sparse.capture import capture_attention_inputs, pattern_report

from benchmarks.suite import Context

__all__ = ["sparse_quality_part", "video_like_qkv"]

SYNTHETIC = dict(grid=(8, 12, 16), heads=2, head_size=64, tile=(2, 4, 4),
                 windows=[(1, 1, 1), (1, 3, 3), (3, 3, 3), (3, 3, 4), (4, 3, 4)])
MASSES = (0.5, 0.8, 0.9, 0.95, 0.99)
DRY_RUN = dict(grid=(4, 6, 8), heads=2, head_size=32, tile=(2, 3, 4), windows=[(1, 1, 1), (2, 2, 2)])
BUILTIN = dict(tile=(1, 2, 2), windows=[(1, 2, 2), (3, 2, 2), (3, 4, 4), (5, 2, 2)])


def video_like_qkv(grid: VideoGrid, heads: int, head_size: int, *, seed: int = 0):
    """q, k, v ``[1, N, heads, head_size]`` float32 with 3-D positional locality (see the module doc)."""
    gen = torch.Generator().manual_seed(seed)
    pos = grid.coords(torch.arange(grid.num_tokens)).double()  # [N, 3]
    features = []
    for d, size in enumerate(grid.shape):
        for f in range(1, 5):
            phase = torch.rand((), generator=gen, dtype=torch.float64) * 2 * math.pi
            arg = 2 * math.pi * f * pos[:, d] / (2 * size) + phase
            features += [arg.cos(), arg.sin()]
    phi = torch.stack(features, dim=1)  # [N, 24]
    proj = torch.randn(heads, phi.shape[1], head_size, generator=gen, dtype=torch.float64) * 0.6
    base = torch.einsum("nf,hfd->nhd", phi, proj)
    q = base + 0.3 * torch.randn(base.shape, generator=gen, dtype=torch.float64)
    k = base + 0.3 * torch.randn(base.shape, generator=gen, dtype=torch.float64)
    v = torch.randn(base.shape, generator=gen, dtype=torch.float64)
    return tuple(t.float()[None] for t in (q, k, v))


def sparse_quality_part(ctx: Context) -> list[dict]:
    rows = []
    cfg = DRY_RUN if ctx.dry_run else SYNTHETIC
    grid = VideoGrid(*cfg["grid"])
    q, k, v = video_like_qkv(grid, cfg["heads"], cfg["head_size"])
    label = f"1,{cfg['heads']},{grid.num_tokens},{cfg['head_size']}"
    for window in cfg["windows"]:
        density, err = sparsity_error(q, k, v, SlidingTileSparsity(grid, cfg["tile"], window))
        rows.append({"what": f"synthetic {grid.shape}: sliding tile {cfg['tile']} window {window}",
                     "shape": label, "density": density, "rel_err": err})
    for mass in MASSES[1::2] if ctx.dry_run else MASSES:
        density, err = sparsity_error(q, k, v, TopMassSparsity(mass, block=64))
        rows.append({"what": f"synthetic {grid.shape}: top mass {mass} (block 64)", "shape": label,
                     "density": density, "rel_err": err})
    rows += _builtin_rows(ctx.dry_run)
    return rows


def _builtin_rows(dry_run: bool) -> list[dict]:
    import launch
    from launch.flow_match import flow_match_sigmas, latent_grid
    from launch.tiny_dit import TinyDiTConfig, TinyWanDiT

    cfg = TinyDiTConfig()
    model = TinyWanDiT(cfg, sequence_parallel=False)
    weights = pathlib.Path(launch.__file__).parent / "weights" / "moving_shapes.pt"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["state_dict"])
    model.eval()
    f, h, w = latent_grid(17, 128, 128)
    grid = VideoGrid(f, h // cfg.patch_size[1], w // cfg.patch_size[2])
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, cfg.in_channels, f, h, w, generator=gen)
    text = torch.zeros(1, cfg.text_length, cfg.text_dim)  # the empty prompt: the unconditional branch
    sigma = float(flow_match_sigmas(10, 5.0)[0])
    with capture_attention_inputs(model, max_calls=1, layers=lambda name: "self_attn" in name) as captured, \
            torch.no_grad():
        model(noise, torch.full((1,), sigma * 1000.0), text)
    patterns = {f"sliding tile {BUILTIN['tile']} window {w}": SlidingTileSparsity(grid, BUILTIN["tile"], w)
                for w in (BUILTIN["windows"][:1] if dry_run else BUILTIN["windows"])}
    patterns.update({f"top mass {m} (block 32)": TopMassSparsity(m, block=32) for m in (MASSES[-1:] if dry_run
                                                                                        else MASSES)})
    rows = []
    for r in pattern_report(captured, patterns):
        rows.append({"what": f"built-in model {grid.shape}, first step, {r['layer']}: {r['pattern']}",
                     "shape": f"1,{cfg.num_heads},{grid.num_tokens},{cfg.head_size}",
                     "density": r.get("density"), "rel_err": r.get("rel_err"), "note": r.get("note")})
    return rows

"""A small Wan-style video DiT with seeded random weights: the built-in model of generate.py.

Same structure as Wan 2.x (facts from its public architecture; our own code):

    latents [B, C, F, H, W] --3D patchify (1, 2, 2)--> tokens [B, S, dim], S = F * H/2 * W/2
    + absolute position: fixed sinusoids of each token's (frame, row, column) through a linear layer
    timestep -> sinusoidal embedding -> MLP (+ the pooled text) -> 6 adaLN modulation vectors per block
    N blocks:  x += gate * SelfAttn(norm(x) * (1 + scale) + shift)     (q/k RMSNorm, 3D rotary)
               x += CrossAttn(norm(x), text)                           (text full on every rank)
               x += gate * FFN(norm(x) * (1 + scale) + shift)
    head: norm + modulation + linear -> unpatchify -> clean latents x0 -> velocity (latents - x0) / sigma

Three changes from Wan, all for a model trained for minutes on a CPU (launch/train_builtin.py): an
absolute position embedding (Wan places things from its 3D rotary embedding alone, which only
encodes relative positions, learning absolute ones from the grid's edges over a long training); the
pooled text added to the timestep embedding (as Flux and SD3 do), so every token's modulation
carries the prompt, not only what cross-attention fetches; and the network predicts the clean
latents, turned into the velocity the sampler takes (Wan predicts the velocity directly, which at
high noise means reproducing the input noise exactly: hard for a small network). An Euler step with
this velocity moves the latents straight towards the predicted clean ones, so it stays bounded.

Sequence parallelism (``sequence_parallel=True`` and an initialised usp_attn state):
the token sequence and the rotary tables are split with ``shard_sequence`` after the
patch embedding, self-attention runs through ``USPAttention``, cross-attention through
``USPAttention(skip_sequence_parallel=True)`` (no communication), and the tokens are
gathered with ``gather_sequence`` before the output projection. Each rank applies the
rotary embedding of its tokens' *global* positions. With ``sequence_parallel=False``
every attention is a plain ``LocalAttention`` over the full sequence: the reference.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from usp_attn import LocalAttention, USPAttention, gather_sequence, get_sequence_parallel_state, shard_sequence
from usp_attn.sparse import SlidingTileSparsity, VideoGrid, tile_major_inverse_permutation, tile_major_permutation

__all__ = ["TinyDiTConfig", "TinyWanDiT", "rope_axis_dims", "rope_tables", "position_features"]

POSITION_FREQUENCIES = 8  # per axis; features: (sin, cos) x 8 x (frame, row, column) = 48
SIGMA_MIN = 1e-3  # the sampler never asks at noise level 0; the bound only keeps the division finite


@dataclasses.dataclass(frozen=True)
class TinyDiTConfig:
    """Shape of the built-in model. ``head_size = hidden_size // num_heads``."""

    in_channels: int = 16  # Wan 2.1 VAE latent channels
    hidden_size: int = 128
    num_heads: int = 4
    num_layers: int = 2
    ffn_size: int = 512
    text_dim: int = 32  # moving_shapes.encode_prompts: one token per prompt attribute
    text_length: int = 3
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    def problems(self) -> list[str]:
        """Why this config cannot be built (empty if it can)."""
        out = []
        if self.hidden_size % self.num_heads:
            out.append(f"--hidden-size {self.hidden_size} must be divisible by --num-heads {self.num_heads}")
        elif self.head_size % 2 or self.head_size < 6:
            out.append(
                f"head size --hidden-size/--num-heads = {self.head_size} must be even and >= 6 "
                "(3D rotary rotates pairs of channels along time, height and width)"
            )
        return out


def rope_axis_dims(head_size: int) -> tuple[int, int, int]:
    """Channels per axis (time, height, width) as Wan splits a head: h = w = 2 * (D // 6), t = rest."""
    hw = 2 * (head_size // 6)
    return head_size - 2 * hw, hw, hw


def rope_tables(grid: tuple[int, int, int], head_size: int, theta: float, device=None):
    """cos/sin of the 3D rotary angles of every token of a ``grid = (F, H, W)`` token grid.

    Returns ``(cos, sin)``, each ``[F * H * W, head_size // 2]`` float32, tokens in the
    patchify order (frame-major, then row, then column). Angles are computed in float64.
    """
    angles = []
    for axis, (n, dim) in enumerate(zip(grid, rope_axis_dims(head_size))):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        ang = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv_freq)  # [n, dim/2]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = n
        angles.append(ang.view(shape).expand(*grid, dim // 2))
    table = torch.cat(angles, dim=-1).reshape(-1, head_size // 2)
    return table.cos().float(), table.sin().float()


def position_features(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """Fixed sinusoids of each token's (frame, row, column) index: ``[F * H * W, 48]`` float32, tokens
    in the patchify order. Frequencies 100^(-i/8) rad per token, i = 0..7, per axis."""
    freqs = 100.0 ** (-torch.arange(POSITION_FREQUENCIES, dtype=torch.float64, device=device) / POSITION_FREQUENCIES)
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float64, device=device) for n in grid), indexing="ij")
    angles = torch.cat([torch.outer(a.reshape(-1), freqs) for a in axes], dim=1)  # [S, 3 * 8]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x [B, S, H, D]`` by the angles of ``cos/sin [S, D/2]``."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    """Multi-head attention with Wan's q/k RMSNorm; rotary only for self-attention."""

    def __init__(self, cfg: TinyDiTConfig, attention: nn.Module) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, cfg.eps), RMSNorm(dim, cfg.eps)
        self.attn = attention

    def forward(self, x: torch.Tensor, context: torch.Tensor, rope=None, sparsity=None) -> torch.Tensor:
        """x ``[B, s, dim]`` (queries; a shard under SP), context ``[B, L, dim]`` (keys/values); ``sparsity``:
        a sparse pattern for self-attention (tokens in its order), or None."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.heads, -1))
        k = self.norm_k(self.k(context)).unflatten(-1, (self.heads, -1))
        v = self.v(context).unflatten(-1, (self.heads, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.attn(q, k, v) if sparsity is None else self.attn(q, k, v, sparsity=sparsity)
        return self.o(out.flatten(-2))


class Block(nn.Module):
    def __init__(self, cfg: TinyDiTConfig, sequence_parallel: bool) -> None:
        super().__init__()
        dim, heads, head = cfg.hidden_size, cfg.num_heads, cfg.head_size
        if sequence_parallel:
            self_attn, cross_attn = USPAttention(heads, head), USPAttention(heads, head, skip_sequence_parallel=True)
        else:
            self_attn, cross_attn = LocalAttention(heads, head), LocalAttention(heads, head)
        self.norm1 = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(cfg, self_attn)
        self.norm3 = nn.LayerNorm(dim, cfg.eps)
        self.cross_attn = Attention(cfg, cross_attn)
        self.norm2 = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_size), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_size, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x, mod, context, rope, sparsity=None):
        """x ``[B, s, dim]``, mod ``[B, 6, dim]``, context ``[B, L, dim]``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + mod).unsqueeze(2).unbind(1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.self_attn(h, h, rope, sparsity)
        x = x + self.cross_attn(self.norm3(x), context)
        return x + gate2 * self.ffn(self.norm2(x) * (1 + scale2) + shift2)


class TinyWanDiT(nn.Module):
    """The built-in video DiT. ``forward(latents, timestep, text) -> velocity`` (same shape as latents)."""

    def __init__(self, cfg: TinyDiTConfig, sequence_parallel: bool = True) -> None:
        super().__init__()
        if cfg.problems():
            raise ValueError("; ".join(cfg.problems()))
        self.cfg, self.sequence_parallel = cfg, sequence_parallel
        dim, patch_dim = cfg.hidden_size, cfg.in_channels * math.prod(cfg.patch_size)
        self.patch_embedding = nn.Linear(patch_dim, dim)
        self.position_embedding = nn.Linear(6 * POSITION_FREQUENCIES, dim)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_pooling = nn.Linear(dim, dim)
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(cfg, sequence_parallel) for _ in range(cfg.num_layers))
        # Sparse self-attention (lossy, opt-in): (tile, window) of a sliding-tile pattern, and whether the
        # current step uses it (the first denoising steps usually stay dense).
        self.sparse_tiles: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
        self.use_sparsity = False
        self.head_norm = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, patch_dim)
        self.head_modulation = nn.Parameter(torch.zeros(1, 2, dim))

    @torch.no_grad()
    def init_weights(self, seed: int) -> "TinyWanDiT":
        """Seeded random weights, identical on every rank (drawn on the CPU, in parameter order).

        Nothing is zero-initialised (unlike a trainable DiT's gates and head). Plain random
        weights would give near-uniform attention whose output is tiny, so a token sharded
        to the wrong place would hardly change the result. Larger q/k norm weights (logits
        ~4x sharper) and a 3x stronger self-attention output make self-attention about half
        of the output, as in a trained DiT, so ``--verify`` sees sequence-parallel mistakes.
        """
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "modulation" in name:
                value = noise / math.sqrt(self.cfg.hidden_size)
            elif "self_attn.norm_" in name:
                value = 2 + 0.1 * noise
            elif "norm" in name:
                value = 1 + 0.1 * noise
            elif p.dim() == 2:
                gain = 3.0 if name.endswith("self_attn.o.weight") else 1.0
                value = gain * noise / math.sqrt(p.shape[1])
            else:
                value = 0.02 * noise
            p.copy_(value)
        return self

    # ---- geometry ------------------------------------------------------------------------
    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        """(F, H, W) token grid of latents shaped ``[B, C, F, H, W]``."""
        return tuple(n // p for n, p in zip(latent_shape[2:], self.cfg.patch_size))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` -> ``[B, S, C * pt * ph * pw]`` (tokens frame-major)."""
        b, c = x.shape[:2]
        (gf, gh, gw), (pt, ph, pw) = self.token_grid(x.shape), self.cfg.patch_size
        x = x.reshape(b, c, gf, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, gf * gh * gw, c * pt * ph * pw)

    def unpatchify(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """Inverse of :meth:`patchify`: ``[B, S, C * pt * ph * pw]`` -> ``[B, C, F, H, W]``."""
        (gf, gh, gw), (pt, ph, pw), c = grid, self.cfg.patch_size, self.cfg.in_channels
        x = tokens.reshape(tokens.shape[0], gf, gh, gw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(tokens.shape[0], c, gf * pt, gh * ph, gw * pw)

    def timestep_features(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features ``[B, freq_dim]`` float32 of timesteps ``t [B]`` (0..1000)."""
        half = self.cfg.freq_dim // 2
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
        args = torch.outer(t.double(), freqs)
        return torch.cat([args.cos(), args.sin()], dim=1).float()

    def sparse_pattern(self, grid) -> SlidingTileSparsity | None:
        """The sliding-tile pattern over the token grid ``(F, H, W)``, tokens in tile-major order."""
        if self.sparse_tiles is None:
            return None
        tile, window = self.sparse_tiles
        return SlidingTileSparsity(VideoGrid(*grid), tile=tile, window=window, token_order="tile_major")

    # ---- forward -------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """latents ``[B, C, F, H, W]``, timestep ``[B]``, text ``[B, L, text_dim]``; full on every rank.

        Returns the velocity ``[B, C, F, H, W]`` in the parameters' dtype, full on every rank: the
        network predicts the clean latents x0 and returns ``(latents - x0) / sigma``, sigma = timestep / 1000.
        """
        dtype = self.patch_embedding.weight.dtype
        grid = self.token_grid(latents.shape)
        x = self.patch_embedding(self.patchify(latents.to(dtype)))  # [B, S, dim]
        x = x + self.position_embedding(position_features(grid, device=x.device).to(dtype))
        rope = rope_tables(grid, self.cfg.head_size, self.cfg.rope_theta, device=x.device)
        pattern = self.sparse_pattern(grid) if self.use_sparsity else None
        if pattern is not None:  # once per model call: tiles become contiguous runs of tokens
            perm = tile_major_permutation(grid, pattern.tile, device=x.device)
            x, rope = x[:, perm], tuple(t[perm] for t in rope)
        state = get_sequence_parallel_state() if self.sequence_parallel else None
        if state is not None:
            x = shard_sequence(x, dim=1, state=state)
            rope = tuple(shard_sequence(t, dim=0, state=state, record_length=False) for t in rope)
        context = self.text_embedding(text.to(dtype))  # [B, L, dim]
        emb = self.time_embedding(self.timestep_features(timestep).to(dtype)) + self.text_pooling(context.mean(1))
        mod = self.time_projection(emb).unflatten(1, (6, -1))  # [B, 6, dim]
        for block in self.blocks:
            x = block(x, mod, context, rope, pattern)
        if state is not None:
            x = gather_sequence(x, dim=1, state=state)
        if pattern is not None:  # back to row-major order
            x = x[:, tile_major_inverse_permutation(grid, pattern.tile, device=x.device)]
        shift, scale = (self.head_modulation + emb.unsqueeze(1)).unsqueeze(2).unbind(1)
        clean = self.unpatchify(self.head(self.head_norm(x) * (1 + scale) + shift), grid).float()
        # The network predicts the clean latents; the velocity follows from x_s = (1 - s) x0 + s noise.
        sigma = (timestep.float() / 1000).clamp_min(SIGMA_MIN).view(-1, 1, 1, 1, 1)
        return ((latents.float() - clean) / sigma).to(dtype)

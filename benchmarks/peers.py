"""Other systems' sequence-parallel attention, run at the same shapes and layout.

Each ``make_*`` returns ``fn(q, k, v) -> out`` taking this rank's contiguous
sequence shard ``[B, S/W, H, D]`` (the same shards ``usp_attn.shard_sequence``
gives), or raises :class:`PeerUnavailable` with the reason (not installed, layout or
platform it does not support). Both peers need the sequence to divide evenly.

API facts (REFERENCE §3): yunchang ``set_seq_parallel_pg(ulysses, ring, rank, world)``
then ``LongContextAttention()(q, k, v, softmax_scale=, causal=)``; diffusers ≥ 0.36
``ContextParallelConfig(ring_degree, ulysses_degree)`` set up on a ("ring", "ulysses")
device mesh, then ``dispatch_attention_fn(q, k, v, parallel_config=...)``.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["PeerUnavailable", "PEERS", "make_yunchang", "make_diffusers"]


class PeerUnavailable(RuntimeError):
    """The peer cannot run here; the message is the reason shown in the table."""


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise PeerUnavailable(f"{what} is not installed")


def _check_even(seq_len: int, world: int, heads: int, ulysses: int, who: str) -> None:
    if seq_len % world:
        raise PeerUnavailable(f"{who} needs S divisible by the world size ({seq_len} % {world} != 0)")
    if heads % ulysses:
        raise PeerUnavailable(f"{who} needs H divisible by the Ulysses degree ({heads} % {ulysses} != 0)")


def make_yunchang(ulysses: int, ring: int, *, heads: int, seq_len: int, scale: float) -> Callable:
    """yunchang's ``LongContextAttention`` (Ulysses x ring; its kernels need flash-attn)."""
    _require("yunchang", "yunchang")
    world, rank = dist.get_world_size(), dist.get_rank()
    _check_even(seq_len, world, heads, ulysses, "yunchang")
    try:
        import yunchang
        from yunchang import LongContextAttention, set_seq_parallel_pg
    except Exception as exc:  # e.g. it imports flash_attn at import time
        raise PeerUnavailable(f"yunchang failed to import: {type(exc).__name__}: {exc}") from exc
    set_seq_parallel_pg(ulysses, ring, rank, world)
    layer = LongContextAttention()
    version = getattr(yunchang, "__version__", "?")

    def run(q, k, v):
        return layer(q, k, v, softmax_scale=scale, causal=False)

    run.label = f"yunchang {version} LongContextAttention"
    return run


def make_diffusers(ulysses: int, ring: int, *, heads: int, seq_len: int, scale: float) -> Callable:
    """diffusers' context parallel attention (``dispatch_attention_fn`` with a ParallelConfig)."""
    _require("diffusers", "diffusers")
    world, rank = dist.get_world_size(), dist.get_rank()
    _check_even(seq_len, world, heads, ulysses, "diffusers")
    if ulysses * ring == 1:
        raise PeerUnavailable("diffusers context parallel needs ulysses_degree or ring_degree > 1")
    try:
        import diffusers
        from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
        from diffusers.models.attention_dispatch import dispatch_attention_fn
    except Exception as exc:
        raise PeerUnavailable(f"diffusers context parallel API not found: {type(exc).__name__}: {exc}") from exc
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(device_type, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    config.setup(rank, world, device, mesh=mesh)
    # Ring merging needs the LSE: torch's cuDNN kernel on CUDA; diffusers' native backend
    # (plain SDPA) has none, so its ring fails on CPU and says why.
    backend = "_native_cudnn" if device_type == "cuda" else "native"

    def run(q, k, v):
        return dispatch_attention_fn(q, k, v, scale=scale, backend=backend, parallel_config=config)

    run.label = f"diffusers {diffusers.__version__} CP ({backend})"
    return run


#: name -> factory, in table order
PEERS: dict[str, Callable[..., Callable]] = {"yunchang": make_yunchang, "diffusers": make_diffusers}

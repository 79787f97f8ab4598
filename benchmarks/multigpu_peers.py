"""yunchang as a peer in the multi-GPU benchmark (issue 6, P5) where benchmarks/peers.py does not fit.

yunchang without flash-attn. ``benchmarks/peers.make_yunchang`` builds yunchang's default
``LongContextAttention`` (``AttnType.FA``), which needs flash-attn; the lent GPU image has
none and cannot build it within a call. yunchang 0.6.4 itself imports without flash-attn
(every optional kernel is probed with try/except in ``yunchang/globals.py``), and its
``LongContextAttention(ring_impl_type="basic", attn_type=...)`` runs torch's own kernels
through ``yunchang/kernels/attention.py::pytorch_attn_forward``:

* ``TORCH_CUDNN`` / ``TORCH_MATH`` return an all-zero log-sum-exp. Harmless with one ring
  block (R = 1: yunchang's Ulysses path, same cuDNN kernel as ours on Hopper), silently
  wrong for R > 1 (measured on CPU, 2 ranks, ring 2 with TORCH_MATH: relative error 0.17).
* ``TORCH_FLASH`` / ``TORCH_EFFICIENT`` return the real LSE (torch's FA2 / memory-efficient
  kernels, CUDA only), which yunchang casts to the input dtype (bf16) before merging: right
  rings up to that rounding, and slower kernels than cuDNN on Hopper (REFERENCE §5).

So :func:`make_yunchang_torch` uses flash-attn if importable, else cuDNN for R = 1 and
torch's flash kernel for R > 1 (CUDA); on CPU only R = 1 (math kernel). yunchang's own
``UlyssesAttention`` class is not usable without flash-attn: with a torch ``attn_type`` it
calls ``ring_pytorch_attn_func`` with ``group=None``, i.e. a ring over the *whole world*
after its all-to-all (the torch-flash kernel, whatever attn_type says): wrong results.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.distributed as dist

from benchmarks.peers import PeerUnavailable

__all__ = ["make_yunchang_torch"]


def make_yunchang_torch(ulysses: int, ring: int, *, heads: int, seq_len: int, scale: float) -> Callable:
    """yunchang's ``LongContextAttention`` with a kernel that runs here (see module doc).

    Returns ``fn(q, k, v) -> out`` on this rank's contiguous shard ``[B, S/W, H, D]`` (the
    layout ``usp_attn.shard_sequence`` gives); raises :class:`PeerUnavailable` with the reason.
    """
    if importlib.util.find_spec("yunchang") is None:
        raise PeerUnavailable("yunchang is not installed")
    world, rank = dist.get_world_size(), dist.get_rank()
    if seq_len % world:
        raise PeerUnavailable(f"yunchang needs S divisible by the world size ({seq_len} % {world} != 0)")
    if heads % ulysses:
        raise PeerUnavailable(f"yunchang needs H divisible by the Ulysses degree ({heads} % {ulysses} != 0)")
    try:
        import yunchang
        from yunchang import LongContextAttention, set_seq_parallel_pg
        from yunchang.globals import HAS_FLASH_ATTN
        from yunchang.kernels import AttnType
    except Exception as exc:
        raise PeerUnavailable(f"yunchang failed to import: {type(exc).__name__}: {exc}") from exc
    cuda = torch.cuda.is_available()
    if HAS_FLASH_ATTN and cuda:
        attn_type = AttnType.FA
    elif cuda:
        attn_type = AttnType.TORCH_CUDNN if ring == 1 else AttnType.TORCH_FLASH
    elif ring == 1:
        attn_type = AttnType.TORCH_MATH
    else:
        raise PeerUnavailable(
            "yunchang's ring on CPU: its torch kernels there (math) return an all-zero log-sum-exp, so ring "
            "blocks would be merged wrongly; its ring needs CUDA (torch flash/efficient kernels) or flash-attn")
    set_seq_parallel_pg(ulysses, ring, rank, world)
    layer = LongContextAttention(ring_impl_type="basic", attn_type=attn_type)

    def run(q, k, v):
        return layer(q, k, v, softmax_scale=scale, causal=False)

    run.label = f"yunchang {getattr(yunchang, '__version__', '?')} ({attn_type.value})"
    return run

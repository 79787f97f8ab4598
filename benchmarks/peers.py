"""Part "peers" (P5): other systems' sequence-parallel attention on the same shards, layout and GPUs.

For every layout U x R = world: ``USPAttention``, yunchang's ``LongContextAttention`` and diffusers'
context-parallel attention (``dispatch_attention_fn`` with a ``ParallelConfig``), each on this
rank's contiguous shard ``[B, S/W, H, D]``; ratio = peer time / ours (> 1: ours faster).

Kernels (BENCHMARKS.md says why): yunchang with flash-attn if importable, else torch's cuDNN for
R = 1 and torch's flash for R > 1 (its cuDNN and math kernels return an all-zero LSE: wrong rings);
on CPU only R = 1. diffusers with cuDNN on CUDA; on CPU its ``native`` backend has no LSE, so its
ring says why it cannot run, and its models' ``enable_parallelism`` needs an accelerator.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.distributed as dist

import usp_attn

from benchmarks.scaling import full_inputs, time_shards
from benchmarks.suite import Context, headline, layouts_of, sequence_parallel, short_error, skipped
from benchmarks.timing import attention_flops, tflops

__all__ = ["PeerUnavailable", "make_yunchang", "make_diffusers", "device_mesh", "diffusers_backend", "peers_part"]

GPU = dict(shape=(1, 40, 75600, 128), dtype=torch.bfloat16)  # Wan 2.1 14B, 720p: as the scaling part
CPU = dict(shape=(1, 8, 256, 32), dtype=torch.float32)


class PeerUnavailable(RuntimeError):
    """The peer cannot run here; the message is the reason shown in the table."""


def _check_even(who: str, seq_len: int, heads: int, ulysses: int) -> None:
    if importlib.util.find_spec(who) is None:
        raise PeerUnavailable(f"{who} is not installed")
    if seq_len % dist.get_world_size() or heads % ulysses:
        raise PeerUnavailable(f"{who} needs S divisible by the world size and H by the Ulysses degree "
                              f"(S={seq_len}, H={heads}, W={dist.get_world_size()}, U={ulysses})")


def make_yunchang(ulysses: int, ring: int, *, heads: int, seq_len: int, scale: float) -> Callable:
    """yunchang's ``LongContextAttention`` with a kernel that runs here (see the module doc)."""
    _check_even("yunchang", seq_len, heads, ulysses)
    try:
        import yunchang
        from yunchang import LongContextAttention, set_seq_parallel_pg
        from yunchang.globals import HAS_FLASH_ATTN
        from yunchang.kernels import AttnType
    except Exception as exc:
        raise PeerUnavailable(f"yunchang failed to import: {short_error(exc)}") from exc
    cuda = torch.cuda.is_available()
    if cuda:
        attn_type = AttnType.FA if HAS_FLASH_ATTN else AttnType.TORCH_CUDNN if ring == 1 else AttnType.TORCH_FLASH
    elif ring == 1:
        attn_type = AttnType.TORCH_MATH
    else:
        raise PeerUnavailable("yunchang's ring on CPU: its torch kernels there (math) return an all-zero log-sum-exp,"
                              " so ring blocks would be merged wrongly; it needs CUDA or flash-attn")
    set_seq_parallel_pg(ulysses, ring, dist.get_rank(), dist.get_world_size())
    layer = LongContextAttention(ring_impl_type="basic", attn_type=attn_type)

    def run(q, k, v):
        return layer(q, k, v, softmax_scale=scale, causal=False)

    run.label = f"yunchang {getattr(yunchang, '__version__', '?')} ({attn_type.value})"
    return run


_MESHES: dict[tuple[int, int], object] = {}


def device_mesh(ulysses: int, ring: int):
    """The ("ring", "ulysses") device mesh of a layout for diffusers, made once per process.

    All layouts' meshes are made together, the first time one is needed, and flattened right away
    (as ``ParallelConfig.setup`` does). With NCCL, torch names the groups a mesh creates by a hash of
    their ranks and of the number of groups alive; usp_attn destroys its groups after each layout,
    so that number repeats, and a mesh made later can get the name of a live one: "A process group
    is already registered under the name ..." (the diffusers ring row of the 2-GPU run). Groups made
    all in a row, before any more are destroyed, get distinct names.
    """
    if not _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        kind = "cuda" if torch.cuda.is_available() else "cpu"
        for u, r in layouts_of(dist.get_world_size()):
            if u * r > 1:
                mesh = init_device_mesh(kind, (r, u), mesh_dim_names=("ring", "ulysses"))
                mesh["ring", "ulysses"]._flatten()
                _MESHES[(u, r)] = mesh
    return _MESHES[(ulysses, ring)]


def diffusers_backend(device: torch.device) -> str:
    """diffusers attention backend: cuDNN on CUDA (usp_attn's pick on Hopper; returns the LSE its
    ring needs), plain SDPA on CPU (no LSE: its ring cannot run there and says so)."""
    return "_native_cudnn" if device.type == "cuda" else "native"


def cp_config(ulysses: int, ring: int):
    """diffusers ``ContextParallelConfig`` for a layout, on the process's mesh for it."""
    if ulysses * ring == 1:
        raise PeerUnavailable("diffusers context parallel needs ulysses_degree or ring_degree > 1")
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=device_mesh(ulysses, ring))


def make_diffusers(ulysses: int, ring: int, *, heads: int, seq_len: int, scale: float) -> Callable:
    """diffusers' context parallel attention (``dispatch_attention_fn`` with a ``ParallelConfig``)."""
    _check_even("diffusers", seq_len, heads, ulysses)
    try:
        import diffusers
        from diffusers.models._modeling_parallel import ParallelConfig
        from diffusers.models.attention_dispatch import dispatch_attention_fn
    except Exception as exc:
        raise PeerUnavailable(f"diffusers context parallel API not found: {short_error(exc)}") from exc
    cp = cp_config(ulysses, ring)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=cp.mesh)
    backend = diffusers_backend(device)

    def run(q, k, v):
        return dispatch_attention_fn(q, k, v, scale=scale, backend=backend, parallel_config=config)

    run.label = f"diffusers {diffusers.__version__} CP ({backend})"
    return run


PEERS = {"yunchang": make_yunchang, "diffusers": make_diffusers}


def peers_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    rows = []
    for shape in ctx.shapes or [cfg["shape"]]:
        b, h, s, d = shape
        label, flops = ",".join(map(str, shape)), attention_flops(b, h, s, s, d)
        full, reference = full_inputs(ctx, shape, cfg["dtype"])
        for u, r in layouts_of(ctx.world):
            where = {"shape": label, "layout": f"{u}x{r}"}
            if ctx.out_of_time():
                rows.append(skipped("USPAttention and peers", "time budget spent", **where))
                continue
            if u * r > 1 and importlib.util.find_spec("diffusers") is not None:
                device_mesh(u, r)  # every mesh before usp_attn's groups come and go (see device_mesh)
            with sequence_parallel(ctx, u, r):
                layer = usp_attn.USPAttention(h, d)
                ours, err, note = time_shards(ctx, layer, full, reference)
                rows.append({"what": "USPAttention", **where, "backend": str(layer.backend), "ms": ours * 1e3,
                             "tflops": tflops(flops, ours), "rel_err": err, "note": note})
                for name, make in PEERS.items():
                    try:
                        fn = make(u, r, heads=h, seq_len=s, scale=d**-0.5)
                        seconds, err, note = time_shards(ctx, fn, full, reference)
                    except PeerUnavailable as exc:
                        rows.append(skipped(name, str(exc), **where))
                        continue
                    except Exception as exc:
                        rows.append({"what": name, **where, "note": f"error: {short_error(exc)}"})
                        continue
                    rows += [{"what": fn.label, **where, "ms": seconds * 1e3, "tflops": tflops(flops, seconds),
                              "rel_err": err, "note": note},
                             headline("P5", f"{fn.label} time / USPAttention time", seconds / ours, ">= 1.1", **where)]
        full = reference = None
        ctx.free()
    return rows

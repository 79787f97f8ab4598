"""Training-path timings: the ring's forward + backward per rank, and a 2-GPU DiT training step.

Part ``ring-backward`` (one GPU): for each shape ``(B, H, S, D)`` and
ring degree R, the time of one full forward + backward kernel call (``LocalAttention`` on
inputs that require grad: the selected backend's forward with LSE and its backward kernel)
against ring rank 0's forward + backward over ``S / R`` queries, run by the library's own
autograd code (``ring_attention_with_grad``: R block forwards merged by LSE, then R block
backwards with the global LSE and the dK/dV accumulators passed on). The transfers are
replaced by an in-memory hand-over (the other ranks' blocks are already on this GPU), so the
row measures the per-rank compute of a ring, not its links. ``efficiency`` = (full / R) /
ring: 1.0 means the ring's split costs nothing. Each row also reports the relative error of
rank 0's output and dq rows against the full call (bf16 ~1e-2).

Part ``training-step`` (two GPUs, under torchrun): the
built-in DiT (``launch.tiny_dit``) forward + MSE loss + backward per step, on one GPU
(each rank alone), Ulysses-2 and ring-2; the sequence-parallel steps include the
all-reduce (mean) of the parameter gradients that makes them the one-GPU gradients, and
the rows report the largest relative parameter-gradient difference to the one-GPU step.

    python3 benchmarks/run.py --parts ring-backward --json ring_backward.json
    torchrun --nproc-per-node 2 benchmarks/run.py --parts training-step --json training_step.json

With ``--dry-run`` both run on CPU at tiny shapes (gloo under torchrun).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

import usp_attn
from benchmarks.suite import Context, rel_err, skipped
from benchmarks.timing import time_fn
from launch import tiny_dit
from usp_attn.backends.sdpa import cuda_subkernel
from usp_attn.distributed.state import shard_sizes
from usp_attn.kernels import BlockKernels
from usp_attn.ring.backward import RingPlan, ring_attention_with_grad

WAN_SHAPES = [(1, 12, 32760, 128), (1, 40, 32760, 128), (1, 40, 75600, 128)]
DRY_SHAPES = [(1, 4, 96, 16)]
RING_DEGREES = (2, 4)


def time_call(fn, device, *, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()``."""
    return time_fn(fn, [()], warmup=warmup, reps=reps, device=device).median * 1e3


# ---- kernel rows: the ring on one device ----------------------------------------------------------
class SimulatedRing:
    """``RingPlan.new_exchange`` for ring rank 0 on one device. The ring asks for exchanges in a
    fixed order per forward + backward: the forward's K/V exchange, then the backward's K/V
    exchange and its dK/dV exchange. K/V exchanges hand over the blocks rank 0 would receive;
    the dK/dV exchange hands back accumulators of the right shape (zeros: what they hold does
    not change the work)."""

    def __init__(self, blocks):
        self.blocks, self.calls = blocks, 0

    def __call__(self):
        kind = ("kv", "kv", "grad")[self.calls % 3]
        self.calls += 1
        return _LocalExchange(self.blocks, kind)


class _LocalExchange:
    def __init__(self, blocks, kind):
        self.blocks, self.kind, self.source, self.pending = blocks, kind, 0, None

    def start(self, outgoing, incoming_like):
        if self.kind == "kv":
            self.source = (self.source - 1) % len(self.blocks)
            self.pending = list(self.blocks[self.source])
        else:
            self.pending = [torch.zeros(shape, dtype=dtype, device=outgoing[0].device) for shape, dtype in incoming_like]

    def wait(self):
        pending, self.pending = self.pending, None
        return pending


def kernel_rows(shapes, degrees, dtype, device, *, warmup=2, reps=5) -> list[dict]:
    rows = []
    for batch, heads, seq, dim in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, dout = (torch.randn(batch, seq, heads, dim, generator=gen, device=device, dtype=dtype)
                         for _ in range(4))
        attn = usp_attn.LocalAttention(heads, dim)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def full_step():
            for t in leaves:
                t.grad = None
            attn(*leaves).backward(dout)

        full_ms = time_call(full_step, device, warmup=warmup, reps=reps)
        backend = _kernel_label(attn.kernel_for(*leaves)[1], q)
        with torch.no_grad():
            full_out = attn(*leaves)
        full_dq = leaves[0].grad.detach().clone()
        for ring in degrees:
            lengths = shard_sizes(seq, ring)
            blocks = [(kb.contiguous(), vb.contiguous()) for kb, vb in
                      zip(torch.tensor_split(k, ring, dim=1), torch.tensor_split(v, ring, dim=1))]
            q0 = q[:, : lengths[0]].clone().requires_grad_()
            k0, v0 = (t.clone().requires_grad_() for t in blocks[0])
            kernel = attn.kernel_for(q0, k0, v0, need_lse=True)  # what RingAttention picks for its blocks
            plan = RingPlan(BlockKernels(attn, kernel), SimulatedRing(blocks), 0, lengths, False)

            def ring_step():
                for t in (q0, k0, v0):
                    t.grad = None
                out = ring_attention_with_grad(plan, q0, k0, v0)
                out.backward(dout[:, : lengths[0]])
                return out

            ring_ms = time_call(ring_step, device, warmup=warmup, reps=reps)
            ring_out = ring_step().detach()
            rows.append({
                "shape": [batch, heads, seq, dim], "dtype": str(dtype).replace("torch.", ""), "kernel": backend,
                "ring_kernel": _kernel_label(kernel[1], q), "ring_degree": ring, "full_fwd_bwd_ms": round(full_ms, 3), "ring_rank_fwd_bwd_ms": round(ring_ms, 3),
                "ideal_ms": round(full_ms / ring, 3), "efficiency": round(full_ms / ring / ring_ms, 3),
                "out_rel_err": rel_err(ring_out, full_out[:, : lengths[0]]),
                "dq_rel_err": rel_err(q0.grad, full_dq[:, : lengths[0]]),
            })
            del blocks, q0, k0, v0, plan
        del q, k, v, dout, leaves, full_out, full_dq
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _kernel_label(impl, q) -> str:
    kernel = getattr(impl, "generation", None) or impl.kernel
    if kernel is None and q.device.type == "cuda" and impl.name == usp_attn.AttentionBackendEnum.TORCH_SDPA:
        kernel = cuda_subkernel(impl.platform.capability, q.dtype, q.shape[-1], False)
    return f"{impl.name}" + (f" ({kernel})" if kernel else "")


# ---- step rows: the built-in DiT on two ranks -----------------------------------------------------
def _model_inputs(cfg, latent_shape, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(1)
    latents = torch.randn(latent_shape, generator=gen).to(device, dtype)
    text = torch.randn(latent_shape[0], cfg.text_length, cfg.text_dim, generator=gen).to(device, dtype)
    target = torch.randn(latent_shape, generator=gen).to(device, dtype)
    return latents, torch.full((latent_shape[0],), 500.0, device=device), text, target


def training_step_rows(cfg, latent_shape, device, dtype, *, warmup=2, reps=5, timeout_s=600) -> list[dict]:
    """Every rank of the (already initialised) default group takes part; returns rank 0's rows."""
    world = dist.get_world_size()
    latents, timestep, text, target = _model_inputs(cfg, latent_shape, device, dtype)
    tokens = latent_shape[2] * (latent_shape[3] // cfg.patch_size[1]) * (latent_shape[4] // cfg.patch_size[2])
    rows, reference = [], None
    for label, layout in (("1 GPU", None), (f"Ulysses-{world}", (world, 1)), (f"ring-{world}", (1, world))):
        usp_attn.destroy_sequence_parallel()
        if layout is not None:
            usp_attn.init_sequence_parallel(*layout, timeout=datetime.timedelta(seconds=timeout_s))
        model = tiny_dit.TinyWanDiT(cfg, sequence_parallel=layout is not None).init_weights(7).to(device, dtype)
        params = list(model.parameters())

        def step():
            for p in params:
                p.grad = None
            loss = torch.nn.functional.mse_loss(model(latents, timestep, text).float(), target.float())
            loss.backward()
            if layout is not None:  # every rank computed the full loss: the mean is the 1-GPU gradient
                flat = torch.cat([p.grad.reshape(-1).float() for p in params])
                dist.all_reduce(flat)
                flat /= world
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()

        ms = time_call(step, device, warmup=warmup, reps=reps)
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        if layout is None:
            reference, base_ms = grads, ms
            err = 0.0
        else:
            err = max(rel_err(grads[name], reference[name]) for name in grads)
        backend = str(usp_attn.get_sequence_parallel_state().backend) if layout is not None else "local"
        rows.append({
            "what": label, "tokens": tokens, "hidden": cfg.hidden_size, "heads": cfg.num_heads,
            "layers": cfg.num_layers, "dtype": str(dtype).replace("torch.", ""), "ms": round(ms, 3),
            "speedup_vs_1gpu": round(base_ms / ms, 3), "max_param_grad_rel_err": err, "backend": backend,
        })
        del model, params, grads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    usp_attn.destroy_sequence_parallel()
    return rows


# ---- the suite's parts --------------------------------------------------------------------------
def ring_backward_part(ctx: Context) -> list[dict]:
    size = ctx.sizes(dict(shapes=WAN_SHAPES, dtype=torch.bfloat16, warmup=2, reps=5),
                     dict(shapes=DRY_SHAPES, dtype=torch.float32, warmup=1, reps=2))
    return kernel_rows(ctx.shapes or size["shapes"], RING_DEGREES, size["dtype"], ctx.device,
                       warmup=size["warmup"], reps=ctx.reps or size["reps"])


def training_step_part(ctx: Context) -> list[dict]:
    if ctx.world < 2:
        return [skipped("training step", "needs 2 or more ranks (torchrun)")]
    if ctx.cuda:  # Wan 2.1 1.3B 480p token count (81 frames, 480 x 832), a 4-layer DiT with 128-dim heads
        cfg = tiny_dit.TinyDiTConfig(hidden_size=1536, num_heads=12, num_layers=4, ffn_size=6144)
        return training_step_rows(cfg, (1, 16, 21, 60, 104), ctx.device, ctx.dtype or torch.bfloat16,
                                  warmup=3, reps=ctx.reps or 10)
    cfg = tiny_dit.TinyDiTConfig(hidden_size=48, num_heads=6, num_layers=2, ffn_size=96, text_dim=16,
                                 text_length=5, freq_dim=32)
    return training_step_rows(cfg, (1, 16, 3, 6, 6), ctx.device, torch.float32, warmup=1, reps=2)

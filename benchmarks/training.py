"""Training-path timings: the ring's forward + backward per rank, and a 2-GPU DiT training step.

Kernel rows (one GPU, ``python3 benchmarks/training.py``): for each shape ``(B, H, S, D)`` and
ring degree R, the time of one full forward + backward kernel call (``LocalAttention`` on
inputs that require grad: the selected backend's forward with LSE and its backward kernel)
against ring rank 0's forward + backward over ``S / R`` queries, run by the library's own
autograd code (``ring_attention_with_grad``: R block forwards merged by LSE, then R block
backwards with the global LSE and the dK/dV accumulators passed on). The transfers are
replaced by an in-memory hand-over (the other ranks' blocks are already on this GPU), so the
row measures the per-rank compute of a ring, not its links. ``efficiency`` = (full / R) /
ring: 1.0 means the ring's split costs nothing. Each row also checks rank 0's output and
dq rows against the full call (relative error, bf16 ~1e-2).

Step rows (two GPUs, ``torchrun --nproc-per-node 2 benchmarks/training.py --step``): the
built-in DiT (``launch/tiny_dit.py``) forward + MSE loss + backward per step, on one GPU
(each rank alone), Ulysses-2 and ring-2; the sequence-parallel steps include the
all-reduce (mean) of the parameter gradients that makes them the one-GPU gradients, and
the rows report the largest relative parameter-gradient difference to the one-GPU step.

``--dry-run`` runs both on CPU with tiny shapes (gloo under torchrun) to check the script.
Rows are dicts; ``--json PATH`` writes them, and they are printed as a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "launch"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import usp_attn  # noqa: E402
from usp_attn.backends.sdpa import cuda_subkernel  # noqa: E402
from usp_attn.distributed.state import shard_sizes  # noqa: E402
from usp_attn.layers.attention_grad import BlockKernels  # noqa: E402
from usp_attn.layers.ring_grad import RingPlan, ring_attention_with_grad  # noqa: E402

WAN_SHAPES = [(1, 12, 32760, 128), (1, 40, 32760, 128), (1, 40, 75600, 128)]
DRY_SHAPES = [(1, 4, 96, 16)]
RING_DEGREES = (2, 4)


# ---- timing -----------------------------------------------------------------------------------
def time_call(fn, device, *, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


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
    import tiny_dit

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
            "row": label, "tokens": tokens, "hidden": cfg.hidden_size, "heads": cfg.num_heads,
            "layers": cfg.num_layers, "dtype": str(dtype).replace("torch.", ""), "ms_per_step": round(ms, 3),
            "speedup_vs_1gpu": round(base_ms / ms, 3), "max_param_grad_rel_err": err, "backend": backend,
        })
        del model, params, grads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    usp_attn.destroy_sequence_parallel()
    return rows


# ---- command line -----------------------------------------------------------------------------
def _print_rows(rows):
    if not rows:
        return
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.2e}" if isinstance(row[k], float) and "err" in k else str(row[k]) for k in keys))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", action="store_true", help="the 2-GPU training-step rows (run under torchrun)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the script runs")
    parser.add_argument("--json", type=pathlib.Path, help="write the rows here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if args.step:
        import tiny_dit

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
        if cuda:  # Wan 2.1 1.3B 480p token count (81 frames, 480 x 832), a 4-layer DiT with 128-dim heads
            cfg = tiny_dit.TinyDiTConfig(hidden_size=1536, num_heads=12, num_layers=4, ffn_size=6144)
            rows = training_step_rows(cfg, (1, 16, 21, 60, 104), device, torch.bfloat16, warmup=3, reps=10)
        else:
            cfg = tiny_dit.TinyDiTConfig(hidden_size=48, num_heads=6, num_layers=2, ffn_size=96, text_dim=16,
                                         text_length=5, freq_dim=32)
            rows = training_step_rows(cfg, (1, 16, 3, 6, 6), device, torch.float32, warmup=1, reps=2)
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        device = torch.device("cuda") if cuda else torch.device("cpu")
        if cuda:
            rows = kernel_rows(WAN_SHAPES, RING_DEGREES, torch.bfloat16, device)
        else:
            rows = kernel_rows(DRY_SHAPES, RING_DEGREES, torch.float32, device, warmup=1, reps=2)
    _print_rows(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

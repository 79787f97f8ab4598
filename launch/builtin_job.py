"""The built-in model's job: denoise under sequence parallelism, and ``--verify`` it.

``--verify`` reruns the same steps on rank 0 with a copy of the model that has no
sequence parallelism (every attention a plain ``LocalAttention`` over the full sequence,
no shard/gather), same weights and inputs, and judges the difference (run_report.judge).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from flow_match import denoise, flow_match_sigmas, latent_grid
from run_report import Progress, judge, peak_memory
from tiny_dit import TinyDiTConfig, TinyWanDiT

__all__ = ["WEIGHT_SEED", "builtin_config", "run_builtin"]

WEIGHT_SEED = 0  # the built-in model's weights: fixed, like a checkpoint; --seed varies the sample


def builtin_config(args) -> TinyDiTConfig:
    return TinyDiTConfig(hidden_size=args.hidden_size, num_heads=args.num_heads, num_layers=args.num_layers)


def run_builtin(args, state, device, dtype, rank: int) -> dict:
    """The built-in DiT's denoising loop under sequence parallelism; returns what the summary needs."""
    cfg = builtin_config(args)
    model = TinyWanDiT(cfg, sequence_parallel=True).init_weights(WEIGHT_SEED).to(device=device, dtype=dtype).eval()
    f, h, w = latent_grid(args.num_frames, args.height, args.width)
    gen = torch.Generator().manual_seed(args.seed)  # CPU draws: identical on every rank and device
    noise = torch.randn(1, cfg.in_channels, f, h, w, generator=gen).to(device)
    text = torch.randn(1, cfg.text_length, cfg.text_dim, generator=gen).to(device)
    negative = torch.randn(1, cfg.text_length, cfg.text_dim, generator=gen).to(device)
    sigmas = flow_match_sigmas(args.num_inference_steps, args.shift)
    progress = Progress(args.num_inference_steps, enabled=rank == 0)
    first = {}

    def on_step(i, v):
        if i == 0:
            first["v"] = v.clone()
        progress.step(device)

    latents = denoise(model, noise, text, negative, sigmas, args.guidance_scale, on_step)
    progress.close()
    result = {
        "latents": latents, "step_times": progress.times, "peak": peak_memory(device),
        "tokens": f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2]), "layer_backend": model.blocks[0].self_attn.attn.backend,
        "batch": 2 if args.guidance_scale > 1 else 1,
    }
    if args.verify:
        inputs = (noise, text, negative, sigmas)
        t0 = time.perf_counter()
        result["verify"] = verify(args, model, inputs, latents, first["v"], device, dtype, rank)
        result["verify"]["seconds"] = time.perf_counter() - t0
    return result


def verify(args, model, inputs, latents, first_v, device, dtype, rank: int) -> dict:
    """Rank 0 reruns the loop with non-parallel copies of the model; the verdict is broadcast to all.

    Reruns: one in the run's dtype, plus one in fp32 when that is fp16/bf16 (see run_report.judge).
    """
    verdict = [None]
    if rank == 0:
        threads = torch.get_num_threads()
        if device.type == "cpu":  # the other ranks wait in the broadcast below: use their cores
            torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
        try:
            reruns = {d: rerun(args, model, inputs, device, d) for d in {dtype, torch.float32}}
        finally:
            torch.set_num_threads(threads)
        parallel = {"first-step velocity": first_v, "final latents": latents}
        verdict[0] = judge(parallel, reruns[dtype], None if dtype == torch.float32 else reruns[torch.float32],
                           dtype_name=str(dtype).removeprefix("torch."))
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def rerun(args, model, inputs, device, dtype) -> dict:
    """The same denoising steps, one process, full sequence, plain LocalAttention, weights of ``model``."""
    reference = TinyWanDiT(model.cfg, sequence_parallel=False)
    reference.load_state_dict(model.state_dict())  # (rounded) weights of the run, upcast if dtype is wider
    reference = reference.to(device=device, dtype=dtype).eval()
    noise, text, negative, sigmas = inputs
    first = {}
    latents = denoise(reference, noise, text, negative, sigmas, args.guidance_scale,
                      lambda i, v: first.setdefault("first-step velocity", v.clone()))
    return {**first, "final latents": latents}

"""The built-in model's job: denoise under sequence parallelism, and ``--verify`` it.

The model at its trained shape (the defaults of ``--hidden-size``, ``--num-heads``,
``--num-layers``) gets the weights of launch/weights/moving_shapes.pt and draws the prompted
shape (launch/moving_shapes.py); at any other shape it gets seeded random weights (its video is
then noise: the GPU scaling scripts use such sizes for speed only).

``--verify`` reruns the same steps on rank 0 with a copy of the model that has no
sequence parallelism (every attention a plain ``LocalAttention`` over the full sequence,
no shard/gather), same weights and inputs, and judges the difference (run_report.judge).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import usp_attn
from builtin_weights import has_trained_shape, load_weights
from flow_match import denoise, flow_match_sigmas, latent_grid, latents_to_video
from moving_shapes import encode_prompts, parse_prompt, vocabulary_text
from run_report import Progress, judge, peak_memory
from tiny_dit import TinyDiTConfig, TinyWanDiT

__all__ = ["WEIGHT_SEED", "DEFAULT_PROMPT", "BUILTIN_GUIDANCE", "builtin_config", "builtin_problems", "build_model", "run_builtin"]

WEIGHT_SEED = 0  # random weights (other shapes than the trained one): fixed, like a checkpoint
DEFAULT_PROMPT = "a red circle moving right"
BUILTIN_GUIDANCE = 2.0  # stronger guidance overshoots the small model's colours and shapes


def builtin_config(args) -> TinyDiTConfig:
    return TinyDiTConfig(hidden_size=args.hidden_size, num_heads=args.num_heads, num_layers=args.num_layers)


def builtin_problems(args) -> list[str]:
    """What is wrong with the built-in model's arguments (model shape, prompts)."""
    problems = builtin_config(args).problems()
    for flag, text in (("--prompt", args.prompt or DEFAULT_PROMPT), ("--negative-prompt", args.negative_prompt)):
        try:
            parse_prompt(text)
        except ValueError as exc:
            problems.append(f"{flag} {exc}. The built-in model knows {vocabulary_text()}; "
                            "write the prompt with these (e.g. 'a red circle moving right'), or give free text to "
                            "a diffusers pipeline with --model-path")
    return problems


def build_model(cfg: TinyDiTConfig) -> tuple[TinyWanDiT, str]:
    """The sequence-parallel model with its weights, and where they came from."""
    model = TinyWanDiT(cfg, sequence_parallel=True)
    if has_trained_shape(cfg):
        info = load_weights(model)
        return model, f"trained (launch/weights/moving_shapes.pt, {info['steps']} steps)"
    return model.init_weights(WEIGHT_SEED), "random (no trained weights for this shape: the video shows noise)"


def prompt_states(args, cfg: TinyDiTConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states ``[1, 3, text_dim]`` of the prompt and of the negative prompt (empty: unconditional)."""
    text = encode_prompts([parse_prompt(args.prompt or DEFAULT_PROMPT)], cfg.text_dim)
    return text.to(device), encode_prompts([parse_prompt(args.negative_prompt)], cfg.text_dim).to(device)


def sparse_schedule(args, model: TinyWanDiT):
    """``before_step`` of the denoising loop: sliding-tile self-attention from step ``--dense-steps`` on,
    when ``--sparse-tile`` and ``--sparse-window`` are given; None otherwise (dense throughout)."""
    if getattr(args, "sparse_tile", None) is None:
        return None
    model.sparse_tiles = (args.sparse_tile, args.sparse_window)

    def before_step(i: int) -> None:
        model.use_sparsity = i >= args.dense_steps

    return before_step


def cfg_parallel(model, state):
    """``model`` for ``denoise`` under CFG parallelism: ``denoise`` batches ``[negative, text]``; each CFG group runs
    its half of the batch (its SP group shards the tokens) and one gather per step returns the whole batch's
    velocity to every rank. ``model`` itself when ``state.cfg_degree`` is 1."""
    if state.cfg_degree == 1:
        return model

    def run(latents, timestep, text):
        half = (usp_attn.cfg_split(x, 0, state) for x in (latents, timestep, text))
        return usp_attn.cfg_gather(model(*half), 0, state)

    return run


def run_builtin(args, state, device, dtype, rank: int) -> dict:
    """The built-in DiT's denoising loop under sequence parallelism; returns what the summary needs."""
    cfg = builtin_config(args)
    model, weights = build_model(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    f, h, w = latent_grid(args.num_frames, args.height, args.width)
    gen = torch.Generator().manual_seed(args.seed)  # CPU draws: identical on every rank and device
    noise = torch.randn(1, cfg.in_channels, f, h, w, generator=gen).to(device)
    text, negative = prompt_states(args, cfg, device)
    sigmas = flow_match_sigmas(args.num_inference_steps, args.shift)
    progress = Progress(args.num_inference_steps, enabled=rank == 0)
    first = {}

    def on_step(i, v):
        if i == 0:
            first["v"] = v.clone()
        progress.step(device)

    latents = denoise(cfg_parallel(model, state), noise, text, negative, sigmas, args.guidance_scale, on_step,
                      before_step=sparse_schedule(args, model))
    progress.close()
    result = {
        "latents": latents, "step_times": progress.times, "peak": peak_memory(device),
        "tokens": f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2]), "layer_backend": model.blocks[0].self_attn.attn.backend,
        "batch": 2 if args.guidance_scale > 1 else 1, "weights": weights,
    }
    pattern = model.sparse_pattern((f, h // cfg.patch_size[1], w // cfg.patch_size[2]))
    if pattern is not None:
        result["sparse"] = (f"sliding tile {pattern.tile}, window {pattern.window}: {pattern.density():.1%} of the "
                            f"pairs kept from step {args.dense_steps} on")
        result["first_sparse_step"] = args.dense_steps
    if args.verify:
        inputs = (noise, text, negative, sigmas)
        t0 = time.perf_counter()
        result["verify"], one_process = verify(args, model, inputs, latents, first["v"], device, dtype, rank)
        result["verify"]["seconds"] = time.perf_counter() - t0
        if one_process is not None:
            result["one_process_latents"] = one_process
            result["one_process_video"] = latents_to_video(one_process[0], args.num_frames, args.height, args.width)
    if rank == 0:
        result["video"] = latents_to_video(latents[0], args.num_frames, args.height, args.width)
    return result


def verify(args, model, inputs, latents, first_v, device, dtype, rank: int) -> tuple[dict, torch.Tensor | None]:
    """Rank 0 reruns the loop with non-parallel copies of the model; the verdict is broadcast to all.

    Reruns: one in the run's dtype, plus one in fp32 when that is fp16/bf16 (see run_report.judge).
    Returns the verdict and, on rank 0, the final latents of the rerun in the run's dtype.
    """
    verdict, one_process = [None], None
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
        one_process = reruns[dtype]["final latents"]
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0], one_process


def rerun(args, model, inputs, device, dtype) -> dict:
    """The same denoising steps, one process, full sequence, plain LocalAttention, weights of ``model``."""
    reference = TinyWanDiT(model.cfg, sequence_parallel=False)
    reference.load_state_dict(model.state_dict())  # (rounded) weights of the run, upcast if dtype is wider
    reference = reference.to(device=device, dtype=dtype).eval()
    noise, text, negative, sigmas = inputs
    first = {}
    latents = denoise(reference, noise, text, negative, sigmas, args.guidance_scale,
                      lambda i, v: first.setdefault("first-step velocity", v.clone()),
                      before_step=sparse_schedule(args, reference))
    return {**first, "final latents": latents}

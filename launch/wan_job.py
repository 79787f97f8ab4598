"""``--model-path``: a real diffusers Wan 2.x pipeline with sequence parallelism on its transformer(s).

Every rank loads the pipeline and runs it with the same inputs and seed; after
``enable_sequence_parallel`` each transformer call takes the full inputs on every rank,
splits the tokens across the sequence-parallel group inside, and returns the full output,
so the pipeline code (text encoder, scheduler, VAE) runs unchanged. Not tested in CI
(no weights there); diffusers and transformers are imported only when this path is used.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings

import torch

from run_report import Progress, peak_memory

__all__ = ["check_model_path", "run_model_path"]

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model_path(args) -> list[str]:
    problems = []
    if args.verify:
        problems.append("--verify needs the built-in model (it reruns the model without sequence parallelism); "
                        "drop --model-path or --verify")
    path = args.model_path
    if not os.path.isdir(path) and not HUB_ID.fullmatch(path):
        problems.append(f"--model-path {path!r} is neither a directory nor a hub id of the form org/name")
    try:
        from diffusers import WanPipeline
    except ImportError as exc:
        problems.append(f"--model-path needs diffusers with WanPipeline ({exc}); pip install 'usp-attn[diffusers]'")
    else:
        if "dummy" in WanPipeline.__module__:  # diffusers' placeholder when transformers is missing
            problems.append("--model-path needs transformers for WanPipeline's text encoder; "
                            "pip install 'usp-attn[diffusers]'")
    if importlib.util.find_spec("accelerate") is None:  # without it diffusers cannot load Wan's fp32-kept modules
        problems.append("--model-path needs accelerate to load WanPipeline; pip install 'usp-attn[diffusers]'")
    try:
        from usp_attn.integrations.diffusers import enable_sequence_parallel  # noqa: F401
    except ImportError as exc:
        problems.append(f"--model-path needs usp_attn.integrations.diffusers.enable_sequence_parallel ({exc})")
    return problems


def run_model_path(args, state, device, dtype, rank: int) -> dict:
    """A real diffusers Wan pipeline, with sequence parallelism on its transformer(s). Untested here (no weights)."""
    import diffusers
    from diffusers import WanPipeline
    from usp_attn.integrations.diffusers import enable_sequence_parallel

    # `torch_dtype` works in every diffusers >= 0.35; newer ones warn that it is renamed `dtype`.
    warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
    if rank != 0:  # one rank talks: the others load and run silently
        warnings.filterwarnings("ignore")
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    pipe = WanPipeline.from_pretrained(args.model_path, torch_dtype=dtype).to(device)
    for transformer in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if transformer is not None:
            enable_sequence_parallel(transformer)
    pipe.set_progress_bar_config(disable=True)
    progress = Progress(args.num_inference_steps, enabled=rank == 0)

    def on_step_end(_pipe, i, t, kwargs):
        progress.step(device)
        return {}

    out = pipe(
        prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(args.seed),
        output_type="np", callback_on_step_end=on_step_end,
    )
    progress.close()
    video = torch.from_numpy(out.frames[0]).mul(255).round().clamp(0, 255).to(torch.uint8)  # [F, H, W, 3]
    p = pipe.transformer.config.patch_size
    f = (args.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    h, w = args.height // pipe.vae_scale_factor_spatial, args.width // pipe.vae_scale_factor_spatial
    return {"video": video, "step_times": progress.times, "peak": peak_memory(device),
            "tokens": (f // p[0]) * (h // p[1]) * (w // p[2]), "layer_backend": None,
            "batch": 2 if args.guidance_scale > 1 else 1}  # WanPipeline: two passes of batch 1 with CFG

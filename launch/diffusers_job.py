"""``--model-path``: any supported diffusers pipeline, with sequence parallelism on its transformer(s).

The pipeline class comes from the directory's ``model_index.json`` (``DiffusionPipeline.from_pretrained``); its
transformer class must have a usp_attn plan (``usp_attn.integrations.diffusers.supported_models()``) or a
diffusers ``_cp_plan``. Every rank loads the pipeline and runs it with the same inputs and seed; after
``enable_sequence_parallel`` each transformer call takes the full inputs on every rank, splits the tokens
across the sequence-parallel group inside and returns the full output, so the pipeline code (text encoders,
scheduler, VAE) runs unchanged. Video pipelines give frames (``.mp4``/``.gif``/``.npz``), image pipelines one
picture (``.png``, or a one-frame video). diffusers and transformers are imported only when this path is used.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import warnings

import torch

from run_report import Progress, peak_memory

__all__ = ["check_model_path", "run_model_path", "read_model_index"]

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TRANSFORMER_KEYS = ("transformer", "transformer_2")
#: Transformers whose latent patch grid this job derives for --sparse-tile: hidden states [B, C, F, H, W] and a
#: (frames, rows, columns) patch size in the config.
SPARSE_GRIDS = frozenset({"WanTransformer3DModel"})


def read_model_index(path: str) -> dict | None:
    """The directory's ``model_index.json`` (``None`` for a hub id or a directory without one).

    Raises ``ValueError`` saying what is wrong when the file is not a JSON object, ``OSError`` when it cannot be read.
    """
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return None
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{index} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{index} is not a JSON object (it holds a JSON {type(data).__name__})")
    return data


def _transformer_classes(index: dict) -> list[str]:
    """Class names of the pipeline's transformers: entries ``"transformer": [library, class name]``."""
    entries = [index.get(k) for k in TRANSFORMER_KEYS]
    return [e[1] for e in entries if isinstance(e, list) and len(e) > 1 and isinstance(e[1], str) and e[1]]


def check_model_path(args) -> list[str]:
    problems = []
    if args.verify:
        problems.append("--verify needs the built-in model (it reruns the model without sequence parallelism); "
                        "drop --model-path or --verify")
    path = args.model_path
    is_dir = os.path.isdir(path)
    if not is_dir and not HUB_ID.fullmatch(path):
        problems.append(f"--model-path {path!r} is neither a directory nor a hub id of the form org/name")
    index = None
    if is_dir:
        try:
            index = read_model_index(path)
        except (OSError, ValueError) as exc:
            return problems + [f"--model-path {path!r}: {exc}; a diffusers pipeline directory has a model_index.json "
                               "holding an object that names the pipeline class and its components"]
    missing = [m for m in ("diffusers", "transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:  # accelerate: diffusers needs it to load the modules some models keep in fp32
        problems.append(f"--model-path needs {', '.join(missing)}; pip install 'usp-attn[diffusers]'")
        return problems
    try:
        from usp_attn.integrations.diffusers import supported_models
    except ImportError as exc:
        return problems + [f"--model-path needs usp_attn.integrations.diffusers ({exc})"]
    if is_dir:
        if index is None:
            return problems + [f"--model-path {path!r} has no model_index.json: not a diffusers pipeline directory"]
        import diffusers

        name = index.get("_class_name")
        if not hasattr(diffusers, str(name)):
            problems.append(f"--model-path {path!r}: model_index.json names pipeline {name!r}, which this diffusers "
                            f"({diffusers.__version__}) does not have")
        classes = _transformer_classes(index)
        if not classes:
            problems.append(f"--model-path {path!r}: pipeline {name} has no transformer to run in parallel")
        for cls in classes:
            model_class = getattr(diffusers, cls, None)
            if cls not in supported_models() and not getattr(model_class, "_cp_plan", None):
                problems.append(f"--model-path {path!r}: its transformer {cls} has no sequence-parallel plan; "
                                f"supported: {', '.join(supported_models())}")
            if getattr(args, "sparse_tile", None) is not None and cls not in SPARSE_GRIDS:
                problems.append(f"--sparse-tile/--sparse-window: the transformer {cls} has no known video grid here; "
                                f"supported: {', '.join(sorted(SPARSE_GRIDS))} (other models: pass a pattern to "
                                "usp_attn.integrations.diffusers.enable_sequence_parallel(..., sparsity=))")
            if getattr(args, "cfg_parallel", False) and not _has_cfg_plan(model_class, cls):
                from usp_attn.integrations.diffusers.cfg import CFG_PLANS

                problems.append(f"--cfg-parallel: the transformer {cls} has no CFG plan (how its pipelines run the "
                                f"guidance branches); known: {', '.join(sorted(CFG_PLANS))}")
    return problems


def model_can_split_guidance(path: str) -> bool:
    """Whether every transformer of the pipeline directory has a CFG plan (so --layout auto may pick CFG 2)."""
    import diffusers

    classes = _transformer_classes(read_model_index(path) or {})
    return bool(classes) and all(_has_cfg_plan(getattr(diffusers, c, None), c) for c in classes)


def _has_cfg_plan(model_class, name: str) -> bool:
    from usp_attn.integrations.diffusers.cfg import CFG_PLANS

    names = [c.__name__ for c in model_class.__mro__] if isinstance(model_class, type) else [name]
    return any(n in CFG_PLANS for n in names)


def _quiet_other_ranks(rank: int) -> None:
    import diffusers

    # `torch_dtype` works in every diffusers >= 0.35; newer ones warn that it is renamed `dtype`.
    warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
    if rank != 0:  # one rank talks: the others load and run silently
        warnings.filterwarnings("ignore")
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def run_model_path(args, state, device, dtype, rank: int) -> dict:
    """Load the pipeline named by the directory, enable sequence parallelism, generate."""
    from diffusers import DiffusionPipeline

    from usp_attn.integrations.diffusers import enable_sequence_parallel

    _quiet_other_ranks(rank)
    pipe = DiffusionPipeline.from_pretrained(args.model_path, torch_dtype=dtype).to(device)
    transformers_ = [getattr(pipe, k, None) for k in TRANSFORMER_KEYS]
    steps_done, patterns = [0], []
    for transformer in transformers_:
        if transformer is not None:
            enable_sequence_parallel(transformer)
            if getattr(args, "sparse_tile", None) is not None:
                transformer.register_forward_pre_hook(_sparse_schedule(args, transformer, steps_done, patterns),
                                                      with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    progress = Progress(args.num_inference_steps, enabled=rank == 0)

    def on_step_end(_pipe, i, t, kwargs):
        progress.step(device)
        steps_done[0] += 1
        return {}

    wanted = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
                  guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(args.seed),
                  output_type="np", callback_on_step_end=on_step_end)
    accepted = inspect.signature(pipe.__call__).parameters
    out = pipe(**{k: v for k, v in wanted.items() if k in accepted})
    progress.close()
    frames = out.frames[0] if hasattr(out, "frames") else out.images  # video [F, H, W, 3] / images [N, H, W, 3]
    video = torch.from_numpy(frames).mul(255).round().clamp(0, 255).to(torch.uint8)
    result = {"video": video, "step_times": progress.times, "peak": peak_memory(device),
              "tokens": _tokens(pipe, args, is_video="num_frames" in accepted), "layer_backend": None,
              "batch": 2 if getattr(pipe, "do_classifier_free_guidance", False) else 1}
    if patterns:
        pattern = patterns[-1]
        result["sparse"] = (f"sliding tile {pattern.tile}, window {pattern.window} on the {pattern.grid} grid: "
                            f"{pattern.density():.1%} of the pairs kept from step {args.dense_steps} on")
        result["first_sparse_step"] = args.dense_steps
    return result


def _sparse_schedule(args, transformer, steps_done: list, patterns: list):
    """A forward pre-hook: the sliding-tile pattern of this call's latent grid from step ``--dense-steps`` on
    (dense before), set before the model cuts its tokens. ``patterns`` collects the patterns used."""
    from usp_attn.integrations.diffusers import set_sparsity
    from usp_attn.sparse import SlidingTileSparsity, VideoGrid

    patch = tuple(transformer.config.patch_size)

    def hook(module, hook_args, kwargs):
        latents = kwargs.get("hidden_states", hook_args[0] if hook_args else None)
        f, h, w = latents.shape[2:]
        pattern = None
        if steps_done[0] >= args.dense_steps:
            grid = VideoGrid(f // patch[0], h // patch[1], w // patch[2])
            pattern = SlidingTileSparsity(grid, args.sparse_tile, args.sparse_window)
            if not patterns or patterns[-1] != pattern:
                patterns.append(pattern)
        set_sparsity(module, pattern)

    return hook


def _tokens(pipe, args, is_video: bool) -> int | None:
    """Image tokens per transformer call (from the VAE and patch sizes; None where the config hides them)."""
    config = pipe.transformer.config
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
    patch = config.get("patch_size", 1)
    ph, pw = (patch[1], patch[2]) if isinstance(patch, (tuple, list)) else (patch, patch)
    if type(pipe).__name__.startswith("Flux") or type(pipe).__name__.startswith("QwenImage"):
        ph = pw = 2  # packed 2x2 latent patches
    tokens = (args.height // spatial // ph) * (args.width // spatial // pw)
    if is_video:
        temporal = getattr(pipe, "vae_scale_factor_temporal", 4)
        pt = patch[0] if isinstance(patch, (tuple, list)) else (config.get("patch_size_t") or 1)
        tokens *= ((args.num_frames - 1) // temporal + 1) // pt
    return tokens

"""``generate.py --layout auto``: the model's attention shape, and the (cfg, U, R) that the cost model picks for it.

The shape comes from the arguments alone (the built-in model) or from the pipeline directory's config files
(``transformer/config.json``, ``vae/config.json``) before anything is loaded, so a problem is reported with the
other argument problems, on every rank. The pick itself is :func:`usp_attn.layout.choose_layout`: on CUDA under
torchrun rank 0 times the kernel and the links and broadcasts its pick; elsewhere every rank computes the same pick
from the assumed terms, with no collective.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os

import torch
import torch.distributed as dist

from usp_attn.layout import LayoutChoice, Workload, choose_layout

from flow_match import latent_grid
from tiny_dit import TinyDiTConfig

PATCH = TinyDiTConfig.patch_size

#: Transformer config keys that count attention layers: dual-stream families have both kinds of block.
LAYER_KEYS = ("num_layers", "num_single_layers")
#: Pipelines whose latents are packed 2 x 2 into tokens (their transformer config says patch size 1).
PACKED = ("Flux", "QwenImage")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _vae_strides(vae: dict) -> tuple[int, int]:
    """(spatial, temporal) compression of a diffusers VAE config, under its several spellings (as the pipelines
    derive them: Wan's scale factors, HunyuanVideo's and CogVideoX's ratios, LTX's from its patch and scaling
    levels, and 2 ** (levels - 1) for the image VAEs)."""
    levels = vae.get("spatio_temporal_scaling")
    spatial = vae.get("scale_factor_spatial") or vae.get("spatial_compression_ratio")
    temporal = vae.get("scale_factor_temporal") or vae.get("temporal_compression_ratio")
    if isinstance(levels, list):
        spatial = spatial or (vae.get("patch_size") or 1) * 2 ** sum(bool(x) for x in levels)
        temporal = temporal or (vae.get("patch_size_t") or 1) * 2 ** sum(bool(x) for x in levels)
    if not spatial and isinstance(vae.get("block_out_channels"), list):
        spatial = 2 ** (len(vae["block_out_channels"]) - 1)
    return int(spatial or 8), int(temporal or 4)


def _is_video(pipeline: str) -> bool:
    """Whether the pipeline class takes a frame count (as generate.py passes one)."""
    try:
        import diffusers
    except ImportError:  # check_model_path names the missing package
        return False

    cls = getattr(diffusers, pipeline, None)
    return cls is not None and "num_frames" in inspect.signature(cls.__call__).parameters


def model_path_workload(args, index: dict) -> Workload:
    """The attention shape of a pipeline directory's transformer at the requested size, from its config files
    (image/video tokens only: the text adds a few hundred beside thousands)."""
    config = _read_json(os.path.join(args.model_path, "transformer", "config.json"))
    heads, head_size = config.get("num_attention_heads"), config.get("attention_head_dim")
    if not isinstance(heads, int) or not isinstance(head_size, int):
        raise ValueError("transformer/config.json has no integer num_attention_heads and attention_head_dim")
    vae_file = os.path.join(args.model_path, "vae", "config.json")
    spatial, temporal = _vae_strides(_read_json(vae_file) if os.path.isfile(vae_file) else {})
    patch = config.get("patch_size") or 1
    pt, ph, pw = tuple(patch) if isinstance(patch, (list, tuple)) else (config.get("patch_size_t") or 1, patch, patch)
    pipeline = str(index.get("_class_name", ""))
    if pipeline.startswith(PACKED):
        ph = pw = 2
    tokens = (args.height // spatial // ph) * (args.width // spatial // pw)
    if _is_video(pipeline):
        tokens *= max(1, ((args.num_frames - 1) // temporal + 1) // pt)
    layers = sum(config.get(k) or 0 for k in LAYER_KEYS) or 1
    return Workload(heads=heads, tokens=tokens, head_size=head_size, kv_heads=config.get("num_key_value_heads"),
                    guidance=args.guidance_scale > 1.0, layers=layers)


def builtin_workload(args) -> Workload:
    f, h, w = latent_grid(args.num_frames, args.height, args.width)
    return Workload(heads=args.num_heads, tokens=f * (h // PATCH[1]) * (w // PATCH[2]),
                    head_size=args.hidden_size // args.num_heads, guidance=args.guidance_scale > 1.0,
                    layers=args.num_layers)


def choose(args, workload: Workload, world: int, *, cfg_allowed: bool, timeout: float) -> LayoutChoice:
    """Every rank calls this with the same arguments and gets group rank 0's pick.

    On CUDA under torchrun it starts torch.distributed (rank 0 measures, everyone takes part in the link probes and
    the broadcast); :func:`usp_attn.init_sequence_parallel` then builds its groups on that default group, which
    :func:`finish` destroys at the end of the job.
    """
    measured = torch.cuda.is_available() and world > 1
    if measured and not dist.is_initialized():
        if "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=timeout))
    cfg_degrees = (1, 2) if workload.guidance and cfg_allowed else (1,)
    return choose_layout(world, heads=workload.heads, tokens=workload.tokens, head_size=workload.head_size,
                         kv_heads=workload.kv_heads, guidance=workload.guidance, layers=workload.layers,
                         cfg_degrees=cfg_degrees, measure=torch.cuda.is_available())


def finish() -> None:
    """Destroy the default group :func:`choose` started (init_sequence_parallel leaves a group it did not create)."""
    if dist.is_initialized():
        dist.destroy_process_group()

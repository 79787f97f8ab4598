"""diffusers transformers under usp_attn vs diffusers' own context parallelism, on 2 GPUs.

    torchrun --nproc-per-node 2 benchmarks/run.py --parts diffusers-families --json diffusers_families.json
    torchrun --nproc-per-node 2 benchmarks/run.py --parts diffusers-families --dry-run   # CPU, gloo, tiny shapes

Models (random weights, bf16, 2 transformer blocks at the real width):

* Flux (``FluxTransformer2DModel``, 24 heads x 128, 1 double- + 1 single-stream block): a 1024x1024 image =
  4096 image tokens + 512 text tokens.
* HunyuanVideo (``HunyuanVideoTransformer3DModel``, 24 heads x 128, 1 double + 1 single block, 1 refiner
  block): 61 frames of 544x960 = 16 x 34 x 60 = 32640 video tokens + 256 text tokens (no padding).

Rows (one per model and implementation/layout): time per transformer forward (median over 5 calls
after 2 warm-up calls, all ranks synchronised, rank 0's clock), speedup vs the same model on one GPU, and the
relative error ``||out - out_1gpu|| / ||out_1gpu||`` (Frobenius, fp32) of the gathered output.

* ``1 GPU``: the unmodified model on each rank alone (diffusers attention backend ``_native_cudnn``).
* ``usp_attn``: ``enable_sequence_parallel`` for U x R in every layout of the world (usp_attn's agreed kernel:
  ``torch_sdpa`` runs cuDNN attention for unmasked bf16 calls; key-padding masked calls run the
  memory-efficient kernel).
* ``diffusers CP``: ``model.enable_parallelism(ContextParallelConfig(...))`` with attention backend
  ``_native_cudnn`` (the same cuDNN kernel; diffusers' ``native`` backend has no LSE for ring). Flux uses its
  own ``_cp_plan`` (text sharded with the image); HunyuanVideo has none, so it gets the plan in
  :data:`HUNYUAN_VIDEO_DIFFUSERS_CP_PLAN`. Where diffusers refuses or fails, the row holds its error.

``rows(...)`` returns the rows as dicts; call it on every rank of an initialised process group.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.distributed as dist

__all__ = ["MODELS", "rows"]

MODELS = ("flux", "hunyuan_video")


def _spec(name: str, dry_run: bool) -> dict:
    """Constructor config, token grid (frames, height, width in tokens) and text length of a model."""
    heads, head = (4, 16) if dry_run else (24, 128)
    axes = (4, 6, 6) if dry_run else (16, 56, 56)
    text_dim, pooled = (32, 16) if dry_run else (4096, 768)
    if name == "flux":
        config = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head,
                      num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=pooled,
                      axes_dims_rope=axes)
        return dict(config=config, grid=(1, 6, 5) if dry_run else (1, 64, 64), text=7 if dry_run else 512)
    config = dict(in_channels=16, out_channels=16, num_attention_heads=heads, attention_head_dim=head, num_layers=1,
                  num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
                  text_embed_dim=text_dim, pooled_projection_dim=pooled, rope_axes_dim=axes)
    return dict(config=config, grid=(2, 3, 5) if dry_run else (16, 34, 60), text=7 if dry_run else 256)


def _build(name: str, spec: dict, device, dtype):
    import diffusers

    cls = diffusers.FluxTransformer2DModel if name == "flux" else diffusers.HunyuanVideoTransformer3DModel
    with torch.device(device):
        model = cls(**spec["config"])
    gen = torch.Generator(device=device).manual_seed(0)  # same weights on every rank
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device)
            if p.dim() > 1:
                p.copy_(noise * 0.5 / p.shape[-1] ** 0.5)
            else:
                p.copy_((1 + 0.2 * noise) if "norm" in pname else 0.1 * noise)
    return model.to(dtype).eval()


def _inputs(name: str, spec: dict, device, dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    f, h, w = spec["grid"]
    n, text, cfg = f * h * w, spec["text"], spec["config"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    if name == "flux":
        ids = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
        return dict(hidden_states=rand(1, n, cfg["in_channels"]), encoder_hidden_states=rand(1, text, cfg["joint_attention_dim"]),
                    pooled_projections=rand(1, cfg["pooled_projection_dim"]), timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                    img_ids=ids.reshape(n, 3).float().to(device), txt_ids=torch.zeros(text, 3, device=device),
                    return_dict=False)
    return dict(hidden_states=rand(1, cfg["in_channels"], f, 2 * h, 2 * w), timestep=torch.full((1,), 500, device=device),
                encoder_hidden_states=rand(1, text, cfg["text_embed_dim"]),
                encoder_attention_mask=torch.ones(1, text, dtype=torch.long, device=device),
                pooled_projections=rand(1, cfg["pooled_projection_dim"]), return_dict=False)


def _diffusers_cp_plan_hunyuan_video():
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    split = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)
    return {
        "rope": {0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
                 1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)},
        "x_embedder": {0: split},
        "context_embedder": {0: split},  # diffusers' joint attention needs the text sharded too
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


#: diffusers-format plan used for diffusers' own context parallelism on HunyuanVideo (it ships none).
HUNYUAN_VIDEO_DIFFUSERS_CP_PLAN = _diffusers_cp_plan_hunyuan_video


def _time(fn, device, warmup: int, iters: int) -> tuple[float, object]:
    out = None
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def _rel_error(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


def _layouts(world: int) -> list[tuple[int, int]]:
    return [(u, world // u) for u in range(world, 0, -1) if world % u == 0]


def rows(*, dry_run: bool = False, models=MODELS, warmup: int = 2, iters: int = 5) -> list[dict]:
    """Benchmark rows (see the module doc); call on every rank of an initialised process group."""
    import diffusers

    import usp_attn
    from usp_attn.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel

    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    world = dist.get_world_size()
    out_rows = []
    for name in models:
        spec = _spec(name, dry_run)
        model = _build(name, spec, device, dtype)
        if device.type == "cuda":
            model.set_attention_backend("_native_cudnn")
        inputs = _inputs(name, spec, device, dtype)
        tokens = spec["grid"][0] * spec["grid"][1] * spec["grid"][2]
        base = dict(model=name, tokens=tokens, text_tokens=spec["text"], dtype=str(dtype).replace("torch.", ""),
                    world=world)
        one_ms, reference = _time(lambda: model(**inputs)[0], device, warmup, iters)
        out_rows.append(dict(base, impl="1 GPU", layout="1x1", ms=one_ms, speedup=1.0, rel_err=0.0, note=""))
        for u, r in _layouts(world):
            usp_attn.init_sequence_parallel(u, r)
            try:
                enable_sequence_parallel(model)
                ms, out = _time(lambda: model(**inputs)[0], device, warmup, iters)
                disable_sequence_parallel(model)
                out_rows.append(dict(base, impl="usp_attn", layout=f"{u}x{r}", ms=ms, speedup=one_ms / ms,
                                     rel_err=_rel_error(out, reference), note=f"backend {usp_attn.get_sequence_parallel_state().backend}"))
            finally:
                usp_attn.destroy_sequence_parallel()
            out_rows.append(_diffusers_cp_row(name, model, inputs, reference, base, one_ms, u, r, device,
                                              warmup, iters, diffusers))
        del model
    return out_rows


def _diffusers_cp_row(name, model, inputs, reference, base, one_ms, u, r, device, warmup, iters, diffusers) -> dict:
    row = dict(base, impl="diffusers CP", layout=f"{u}x{r}", ms=None, speedup=None, rel_err=None, note="")
    try:
        cp_model = copy.deepcopy(model)  # enable_parallelism cannot be undone
        plan = HUNYUAN_VIDEO_DIFFUSERS_CP_PLAN() if name == "hunyuan_video" else None
        cp_model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=u, ring_degree=r),
                                    cp_plan=plan)
        ms, out = _time(lambda: cp_model(**inputs)[0], device, warmup, iters)
        row.update(ms=ms, speedup=one_ms / ms, rel_err=_rel_error(out, reference), note="backend _native_cudnn")
        del cp_model
    except Exception as exc:  # a peer's failure is a result, reported in the row
        row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        dist.barrier()
    return row

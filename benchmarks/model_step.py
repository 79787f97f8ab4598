"""Part "model-step": whole transformer forwards, usp_attn against one GPU and against diffusers.

dit: one denoising step of the built-in video DiT (launch.tiny_dit, random weights) per group
size and layout, groups side by side as in the scaling part (k = 1: the one-GPU time). wan: a
diffusers ``WanTransformer3DModel`` without sequence parallelism, then per layout of the world with
usp_attn's ``enable_sequence_parallel`` and with diffusers' ``enable_parallelism`` on the same weights
(P5: diffusers time / ours). Sizes on a GPU: Wan 14B width, 2 blocks, 81 frames of 720x1280. Times:
the slowest rank's median; rel_err: against the model without sequence parallelism on one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from benchmarks.peers import PeerUnavailable, cp_config, device_mesh, diffusers_backend
from benchmarks.suite import (Context, group_sizes, headline, layout_name, layouts_of, rel_err, sequence_parallel,
                              short_error, skipped)
from benchmarks.timing import time_fn
from launch.flow_match import latent_grid
from launch.tiny_dit import TinyDiTConfig, TinyWanDiT

__all__ = ["model_step_part", "build_wan"]

WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
               eps=1e-6, rope_max_seq_len=1024)
GPU = dict(dtype=torch.bfloat16, warmup=1, reps=3, video=(81, 720, 1280), wan=WAN_14B, wan_layers=2, wan_text=512,
           dit=dict(hidden_size=5120, num_heads=40, num_layers=2, ffn_size=13824, text_dim=4096, text_length=512))
CPU = dict(dtype=torch.float32, warmup=0, reps=1, video=(5, 64, 64), wan_layers=1, wan_text=7,
           wan={**WAN_14B, "num_attention_heads": 4, "attention_head_dim": 16, "text_dim": 32, "freq_dim": 32,
                "ffn_dim": 64, "rope_max_seq_len": 64},
           dit=dict(hidden_size=64, num_heads=8, num_layers=1, ffn_size=128, text_dim=32, text_length=8))


def _time(ctx: Context, cfg: dict, fn) -> float:
    timing = time_fn(fn, [()], warmup=cfg["warmup"], reps=ctx.reps or cfg["reps"], device=ctx.device)
    return ctx.max_over_ranks(timing.median)


def build_wan(shape: dict, num_layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random ``WanTransformer3DModel``, identical on every rank, on ``device``, in ``dtype`` except the
    modules diffusers keeps in fp32 when it loads a checkpoint (as ``from_pretrained(torch_dtype=)``)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(num_layers=num_layers, **shape)
    keep = set(model._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not keep.intersection(name.split(".")):
                param.data = param.data.to(dtype)
    model.eval().set_attention_backend(diffusers_backend(device))
    return model


def dit_rows(ctx: Context, cfg: dict) -> list[dict]:
    dit = TinyDiTConfig(**cfg["dit"])
    torch.manual_seed(0)  # same weights on every rank
    with torch.device(ctx.device):
        model = TinyWanDiT(dit, sequence_parallel=True).to(cfg["dtype"]).eval()
    f, hh, ww = latent_grid(*cfg["video"])
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, dit.in_channels, f, hh, ww, generator=gen).to(ctx.device)
    text = torch.randn(2, dit.text_length, dit.text_dim, generator=gen).to(ctx.device)
    t = torch.full((2,), 500.0, device=ctx.device)
    size = f"{f * hh // 2 * ww // 2} tokens x batch 2, hidden {dit.hidden_size}, {dit.num_layers} blocks"
    step = lambda: model(latents, t, text)  # noqa: E731
    reference = step()  # no sequence-parallel state: the whole step on one device
    rows, base = [], None
    for k in group_sizes(ctx.world):
        for u, r in layouts_of(k):
            row = {"what": "TinyWanDiT step", "model": size, "layout": layout_name(u, r), "gpus": k}
            if ctx.out_of_time():
                rows.append(skipped(**row, why="time budget spent"))
                continue
            with sequence_parallel(ctx, u, r) as state:
                try:
                    err, seconds = ctx.max_over_ranks(rel_err(step(), reference)), _time(ctx, cfg, step)
                except Exception as exc:
                    rows.append({**row, "note": f"error: {short_error(exc)}"})
                    continue
            base = seconds if k == 1 else base
            rows.append({**row, "backend": str(state.backend), "ms": seconds * 1e3, "rel_err": err,
                         "speedup": base and base / seconds, "efficiency": base and base / seconds / k})
    return rows


def wan_rows(ctx: Context, cfg: dict) -> list[dict]:
    from usp_attn.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel

    for u, r in layouts_of(ctx.world) if ctx.world > 1 else []:
        device_mesh(u, r)  # every mesh before usp_attn's groups come and go (see peers.device_mesh)
    shape = cfg["wan"]
    f, hh, ww = latent_grid(*cfg["video"])
    gen = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, shape["in_channels"], f, hh, ww, generator=gen),
              "encoder_hidden_states": torch.randn(1, cfg["wan_text"], shape["text_dim"], generator=gen)}
    inputs = {k: v.to(device=ctx.device, dtype=cfg["dtype"]) for k, v in inputs.items()}
    inputs.update(timestep=torch.full((1,), 500.0, device=ctx.device), return_dict=False)
    size = f"{f * hh // 2 * ww // 2} tokens x batch 1, {shape['num_attention_heads']} heads, {cfg['wan_layers']} blocks"
    build = lambda: build_wan(shape, cfg["wan_layers"], ctx.device, cfg["dtype"])  # noqa: E731
    model = build()
    call = lambda: model(**inputs)[0]  # noqa: E731
    reference = call()
    base = _time(ctx, cfg, call)
    rows = [{"what": "WanTransformer3DModel, no sequence parallelism", "model": size, "gpus": 1,
             "backend": f"diffusers {diffusers_backend(ctx.device)}", "ms": base * 1e3}]
    for u, r in layouts_of(ctx.world) if ctx.world > 1 else []:
        where = {"model": size, "layout": f"{u}x{r}", "gpus": ctx.world}
        if ctx.out_of_time():
            rows.append(skipped("WanTransformer3DModel", "time budget spent", **where))
            continue
        ours = {"what": "usp_attn enable_sequence_parallel", **where}
        with sequence_parallel(ctx, u, r) as state:
            try:
                enable_sequence_parallel(model)
                seconds = _time(ctx, cfg, call)
                ours.update(backend=str(state.backend), rel_err=ctx.max_over_ranks(rel_err(call(), reference)),
                            ms=seconds * 1e3, speedup=base / seconds)
            except Exception as exc:
                ours["note"] = f"error: {short_error(exc)}"
            finally:
                disable_sequence_parallel(model)
        rows.append(ours)
        rows += diffusers_cp_rows(ctx, cfg, build, inputs, reference, u, r, where, ours.get("ms"))
    return rows


def diffusers_cp_rows(ctx: Context, cfg: dict, build, inputs, reference, u, r, where, ours_ms) -> list[dict]:
    """diffusers' own context parallel on a fresh model with the same weights (it cannot be undone)."""
    peer = {"what": "diffusers enable_parallelism", **where}
    try:
        model = build()
        try:
            model.enable_parallelism(config=cp_config(u, r))
        except ZeroDivisionError as exc:  # it picks the device as rank % torch.accelerator.device_count()
            raise PeerUnavailable(f"diffusers' enable_parallelism needs an accelerator (on CPU: {exc})") from exc
        call = lambda: model(**inputs)[0]  # noqa: E731
        peer.update(backend=f"diffusers {diffusers_backend(ctx.device)}", ms=_time(ctx, cfg, call) * 1e3,
                    rel_err=ctx.max_over_ranks(rel_err(call(), reference)))
        rows = [peer]
        if ours_ms:
            rows.append(headline("P5", "diffusers enable_parallelism time / usp_attn time", peer["ms"] / ours_ms,
                                 ">= 1.1", **where))
    except PeerUnavailable as exc:
        rows = [skipped(**peer, why=str(exc))]
    except Exception as exc:
        rows = [{**peer, "note": f"error: {short_error(exc)}"}]
    model = call = None
    ctx.free()
    dist.barrier()
    return rows


def model_step_part(ctx: Context) -> list[dict]:
    cfg = ctx.sizes(GPU, CPU)
    rows = dit_rows(ctx, cfg)
    ctx.free()
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        return rows + [skipped("WanTransformer3DModel", f"diffusers cannot be imported: {short_error(exc)}")]
    return rows + wan_rows(ctx, cfg)

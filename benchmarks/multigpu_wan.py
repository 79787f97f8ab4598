"""The diffusers Wan transformer section of benchmarks/multigpu_scaling.py (issue 6, P5, model level).

A diffusers ``WanTransformer3DModel`` at Wan 14B width with random weights, identical on every
rank; one forward without sequence parallelism (the reference, and at k = 1 the baseline), then
per layout usp_attn's ``enable_sequence_parallel`` and diffusers' own ``enable_parallelism``
(context parallel) on the same weights and inputs. Both use cuDNN attention on CUDA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import usp_attn
from benchmarks.multigpu_sections import Run, layouts, rel_err, row, short_error
from benchmarks.peers import PeerUnavailable

__all__ = ["WAN_14B_SHAPE", "WAN_TOY_SHAPE", "build_wan", "wan_inputs", "enable_diffusers_cp", "diffusers_backend",
           "wan_section"]


#: Wan 2.1 14B transformer dimensions (diffusers config), with ``num_layers`` set by the caller.
WAN_14B_SHAPE = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                     out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, cross_attn_norm=True,
                     qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TOY_SHAPE = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16,
                     out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, cross_attn_norm=True,
                     qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


def diffusers_backend(device: torch.device) -> str:
    """diffusers attention backend for both the 1-GPU baseline and its context parallel:
    cuDNN on CUDA (the kernel usp_attn picks on Hopper; returns the LSE its ring needs),
    plain SDPA on CPU (no LSE, so diffusers' ring fails there and says so)."""
    return "_native_cudnn" if device.type == "cuda" else "native"


def build_wan(shape: dict, num_layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised ``WanTransformer3DModel``, identical on every rank (same seed,
    same device type), built directly on ``device``; eval mode, attention backend set.

    Weights in ``dtype`` except the modules diffusers keeps in fp32 when it loads a
    checkpoint (rope, time embedder, norms), as ``from_pretrained(torch_dtype=...)`` does.
    """
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(num_layers=num_layers, **shape)
    keep = set(model._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not keep.intersection(name.split(".")):
                param.data = param.data.to(dtype)
    model.eval()
    model.set_attention_backend(diffusers_backend(device))
    return model


def wan_inputs(latent_shape, text_tokens: int, text_dim: int, device, dtype, seed: int = 1) -> dict:
    """Keyword inputs of one transformer call: latents ``[B, 16, F, H, W]``, timestep ``[B]``,
    text ``[B, L, text_dim]``; drawn on the CPU so every rank has the same."""
    gen = torch.Generator().manual_seed(seed)
    b = latent_shape[0]
    return {
        "hidden_states": torch.randn(*latent_shape, generator=gen).to(device=device, dtype=dtype),
        "timestep": torch.full((b,), 500.0, device=device),
        "encoder_hidden_states": torch.randn(b, text_tokens, text_dim, generator=gen).to(device=device, dtype=dtype),
        "return_dict": False,
    }


def enable_diffusers_cp(model, ulysses: int, ring: int) -> str:
    """diffusers' own context parallel on ``model`` (irreversible: build a fresh model per layout).
    Returns a label naming the diffusers version and backend."""
    import diffusers
    from diffusers import ContextParallelConfig

    if ulysses * ring == 1:
        raise PeerUnavailable("diffusers context parallel needs ulysses_degree or ring_degree > 1")
    device = next(model.parameters()).device
    try:
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    except ZeroDivisionError as exc:
        if device.type != "cpu":
            raise
        # diffusers picks the device as rank % torch.accelerator.device_count(): 0 without an accelerator.
        raise PeerUnavailable(f"diffusers' enable_parallelism needs an accelerator (on CPU: {exc})") from exc
    return f"diffusers {diffusers.__version__} CP ({diffusers_backend(device)})"


def wan_section(run: Run) -> list[dict]:
    from flow_match import latent_grid  # launch/ (on sys.path via multigpu_scaling.py)
    from usp_attn.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel

    cfg = run.config
    shape = cfg["wan_shape"]
    f, hh, ww = latent_grid(*cfg["video"])
    inputs = wan_inputs((1, shape["in_channels"], f, hh, ww), cfg["wan_text"], shape["text_dim"], run.device,
                        run.dtype)
    p = shape["patch_size"]
    info = dict(tokens=f // p[0] * (hh // p[1]) * (ww // p[2]), batch=1, layers=cfg["wan_layers"],
                heads=shape["num_attention_heads"])
    build = lambda: build_wan(shape, cfg["wan_layers"], run.device, run.dtype)  # noqa: E731
    rows = []
    with torch.inference_mode():
        model = build()
        call = lambda: model(**inputs)[0]  # noqa: E731
        reference = call()
        seconds = run.time_call(call) if run.world == 1 else None
        rows.append(row("wan", "none", "WanTransformer3DModel, no SP", backend=f"diffusers {diffusers_backend(run.device)}",
                        seconds=seconds, **info, note="" if seconds else "reference only (timed in the 1-GPU run)"))
        for u, r in layouts(run.world):
            layout = f"{u}x{r}"
            if run.world == 1:
                continue
            if run.out_of_time():
                rows.append(row("wan", layout, "usp_attn enable_sequence_parallel", note="skipped: time budget spent"))
                continue
            state = usp_attn.init_sequence_parallel(u, r)
            try:
                enable_sequence_parallel(model)
                out = call()
                err = run.max_over_ranks(rel_err(out, reference))
                rows.append(row("wan", layout, "usp_attn enable_sequence_parallel", backend=str(state.backend),
                                seconds=run.time_call(call), rel_err=err, **info))
            except Exception as exc:
                rows.append(row("wan", layout, "usp_attn enable_sequence_parallel", note=f"error: {short_error(exc)}"))
            finally:
                disable_sequence_parallel(model)
                usp_attn.destroy_sequence_parallel()
            dist.barrier()
            rows.append(diffusers_cp_row(run, build, inputs, reference, u, r, info))
            run.free()  # the diffusers model of that layout is gone now
            dist.barrier()
    return rows


def diffusers_cp_row(run: Run, build, inputs, reference, u: int, r: int, info: dict) -> dict:
    impl = "diffusers enable_parallelism"
    try:
        cp_model = build()  # enable_parallelism cannot be undone: a fresh model (same weights) per layout
        impl = enable_diffusers_cp(cp_model, u, r)
        call = lambda: cp_model(**inputs)[0]  # noqa: E731
        out = call()
        err = run.max_over_ranks(rel_err(out, reference))
        return row("wan", f"{u}x{r}", impl, peer="diffusers", seconds=run.time_call(call), rel_err=err, **info)
    except PeerUnavailable as exc:
        return row("wan", f"{u}x{r}", impl, peer="diffusers", note=f"skipped: {exc}")
    except Exception as exc:
        return row("wan", f"{u}x{r}", impl, peer="diffusers", note=f"error: {short_error(exc)}")

"""The attention and DiT sections of benchmarks/multigpu_scaling.py (issue 6, P4 and P5), and what
every section shares: :class:`Run` (device, sizes, a clock all ranks agree on) and the row format.

A row is a dict: ``section``, ``layout`` ("UxR", "local" or "none"), ``impl``, ``backend``,
``seconds`` (slowest rank's median, or None), ``rel_err`` (vs the same computation on one
device), ``note`` (repetitions, or why it did not run), ``peer`` (peers only), extra sizes.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import usp_attn
from benchmarks.bench_rows import BenchSettings, _time_parallel, local_rows
from benchmarks.multigpu_peers import make_yunchang_torch
from benchmarks.peers import PeerUnavailable, make_diffusers
from benchmarks.timing import attention_flops, random_qkv, rotation_count, time_fn

__all__ = ["Run", "layouts", "row", "rel_err", "short_error", "attention_section", "dit_section"]

PEER_FACTORIES = {"yunchang": make_yunchang_torch, "diffusers": make_diffusers}


def layouts(world: int) -> list[tuple[int, int]]:
    """Every U x R = world: Ulysses-world first, ring-world last."""
    return [(world // r, r) for r in range(1, world + 1) if world % r == 0]


def short_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


class Run:
    """What every section needs: device, sizes, the clock shared by all ranks, the rows."""

    def __init__(self, config: dict, device: torch.device, budget_s: float) -> None:
        self.config, self.device, self.budget_s = config, device, budget_s
        self.dtype = getattr(torch, config["dtype"])
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.t0 = time.monotonic()

    def out_of_time(self) -> bool:
        """The same answer on every rank (the slowest rank's clock decides)."""
        t = torch.tensor([time.monotonic() - self.t0], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() > self.budget_s

    def max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def time_call(self, fn) -> float:
        """Slowest rank's median seconds of ``fn()`` (model-sized calls: few repetitions)."""
        timing = time_fn(fn, [()], warmup=self.config["model_warmup"], reps=self.config["model_reps"],
                         device=self.device)
        return self.max_over_ranks(timing.median)

    def free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def row(section: str, layout: str, impl: str, **kw) -> dict:
    return {"section": section, "layout": layout, "impl": impl, "backend": kw.pop("backend", "-"),
            "seconds": kw.pop("seconds", None), "rel_err": kw.pop("rel_err", None), "note": kw.pop("note", ""), **kw}


# ---- attention -------------------------------------------------------------------------------
def attention_section(run: Run) -> list[dict]:
    cfg = run.config
    shape = tuple(cfg["attn_shape"])
    b, h, s, d = shape
    flops = attention_flops(b, h, s, s, d)
    settings = BenchSettings(dtype=run.dtype, device=run.device, warmup=cfg["attn_warmup"], reps=cfg["attn_reps"],
                             target_s=cfg["attn_target_s"], seed=0)
    local, reference = local_rows(shape, settings, ["auto"])
    rows = [row("attention", "local", r.impl, backend=r.backend, seconds=r.seconds, note=r.note, flops=flops)
            for r in local]
    per_set = 3 * b * s * h * d * torch.tensor([], dtype=run.dtype).element_size()
    full_sets = random_qkv(shape, run.dtype, run.device, seed=0,
                           count=rotation_count(per_set // run.world, run.device))
    for u, r in layouts(run.world):
        layout = f"{u}x{r}"
        if run.out_of_time():
            rows.append(row("attention", layout, "USPAttention", note="skipped: time budget spent"))
            continue
        state = usp_attn.init_sequence_parallel(u, r)
        try:
            shards = [tuple(usp_attn.shard_sequence(x).contiguous() for x in qkv) for qkv in full_sets]
            layer = usp_attn.USPAttention(h, d)
            try:
                seconds, err, note = _time_parallel(layer, shards, settings, reference)
                rows.append(row("attention", layout, "USPAttention", backend=str(layer.backend), seconds=seconds,
                                rel_err=err, note=note, flops=flops))
            except Exception as exc:
                rows.append(row("attention", layout, "USPAttention", backend=str(state.backend),
                                note=f"error: {short_error(exc)}"))
            for name, factory in PEER_FACTORIES.items():
                try:
                    fn = factory(u, r, heads=h, seq_len=s, scale=d**-0.5)
                    seconds, err, note = _time_parallel(fn, shards, settings, reference)
                    rows.append(row("attention", layout, getattr(fn, "label", name), peer=name, seconds=seconds,
                                    rel_err=err, note=note, flops=flops))
                except PeerUnavailable as exc:
                    rows.append(row("attention", layout, name, peer=name, note=f"skipped: {exc}"))
                except Exception as exc:
                    rows.append(row("attention", layout, name, peer=name, note=f"error: {short_error(exc)}"))
        finally:
            usp_attn.destroy_sequence_parallel()
        dist.barrier()
    return rows


# ---- built-in DiT ----------------------------------------------------------------------------
def dit_section(run: Run) -> list[dict]:
    from flow_match import latent_grid  # launch/ (on sys.path via multigpu_scaling.py)
    from tiny_dit import TinyDiTConfig, TinyWanDiT

    cfg = run.config
    dit_cfg = TinyDiTConfig(**cfg["dit"])
    torch.manual_seed(0)  # same weights on every rank (same seed, same device type)
    with torch.device(run.device):
        model = TinyWanDiT(dit_cfg, sequence_parallel=True)
    model = model.to(dtype=run.dtype).eval()
    f, hh, ww = latent_grid(*cfg["video"])
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, dit_cfg.in_channels, f, hh, ww, generator=gen).to(run.device)
    t = torch.full((2,), 500.0, device=run.device)
    text = torch.randn(2, dit_cfg.text_length, dit_cfg.text_dim, generator=gen).to(run.device)
    tokens = f * (hh // dit_cfg.patch_size[1]) * (ww // dit_cfg.patch_size[2])
    info = dict(tokens=tokens, batch=2, layers=dit_cfg.num_layers, hidden=dit_cfg.hidden_size, heads=dit_cfg.num_heads)

    def step():
        return model(latents, t, text)

    rows = []
    with torch.inference_mode():
        reference = step()  # no sequence parallelism: every rank does the whole step
        seconds = run.time_call(step) if run.world == 1 else None
        rows.append(row("dit", "none", "TinyWanDiT step, no SP", seconds=seconds, **info,
                        note="" if seconds else "reference only (timed in the 1-GPU run)"))
        for u, r in layouts(run.world):
            layout = f"{u}x{r}"
            if run.world == 1 or run.out_of_time():
                if run.world > 1:
                    rows.append(row("dit", layout, "TinyWanDiT step", note="skipped: time budget spent"))
                continue
            state = usp_attn.init_sequence_parallel(u, r)
            try:
                out = step()
                err = run.max_over_ranks(rel_err(out, reference))
                rows.append(row("dit", layout, "TinyWanDiT step", backend=str(state.backend),
                                seconds=run.time_call(step), rel_err=err, **info))
            except Exception as exc:
                rows.append(row("dit", layout, "TinyWanDiT step", note=f"error: {short_error(exc)}"))
            finally:
                usp_attn.destroy_sequence_parallel()
            dist.barrier()
    return rows

"""``usp-attn`` / ``python -m usp_attn``: command-line tools.

Subcommands:
    info   what this machine can run: platform, versions, every backend with the reason it
           cannot run (for a given dtype and head size), the automatic pick, and what an
           explicit ``--attention-backend`` would resolve to; with ``--shape`` it also times
           the exact kernels at that shape, as the automatic choice does.

This is a CLI module, so it prints; library code logs through the "usp_attn" logger.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import platform as _py_platform
import sys
from typing import Iterator, Sequence

import torch

import usp_attn
from usp_attn import selector
from usp_attn.backends import BACKEND_CLASSES, AttentionBackendEnum
from usp_attn.backends.enum import valid_backend_names
from usp_attn.backends.flash import GENERATION_PACKAGES, flash_generation, flash_generations, generation_head_sizes
from usp_attn.backends.sage import sage_major_version
from usp_attn.backends.sdpa import cuda_subkernel
from usp_attn.config import _backend_arg, positive_int
from usp_attn.platforms import OPTIONAL_PACKAGES, Platform, PlatformKind, current_platform

__all__ = ["main", "build_parser", "collect_info", "DTYPES"]

#: ``--dtype`` spellings -> torch dtypes
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: non-kernel optional packages (extras), distribution names; versions read from metadata, never imported
OTHER_PACKAGES = ("diffusers", "transformers", "imageio", "imageio-ffmpeg", "matplotlib", "yunchang")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usp-attn", description="usp_attn command-line tools")
    parser.add_argument("--version", action="version", version=f"usp_attn {usp_attn.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show usp_attn INFO log messages on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser(
        "info",
        help="platform, versions and which attention backends can run here",
        description="Show the platform, versions, every attention backend with the reason it cannot run, "
        "the automatic pick and what --attention-backend would resolve to.",
    )
    info.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="layer dtype (default: bf16)")
    info.add_argument("--head-size", type=positive_int, default=128, metavar="N", help="head size D (default: 128)")
    info.add_argument(
        "--attention-backend",
        type=_backend_arg,
        default=None,
        metavar="NAME",
        help=f"also show what this request resolves to; one of: {', '.join(valid_backend_names())}",
    )
    info.add_argument("--need-lse", action="store_true", help="the layer needs the log-sum-exp (ring attention)")
    info.add_argument("--need-mask", action="store_true", help="the layer passes an attention mask")
    info.add_argument("--shape", type=_shape_arg, default=None, metavar="B,H,S,D",
                      help="also time every exact kernel at this shape (CUDA), as the automatic choice does; "
                      "D overrides --head-size")
    info.add_argument("--kv-heads", type=positive_int, default=None, metavar="N",
                      help="with --shape or --layouts: kv heads (GQA)")
    info.add_argument("--layouts", type=_layouts_arg, default=None, metavar="N,H,S,D",
                      help="also predict every (cfg, U, R) layout of N GPUs for H heads, S tokens, head size D "
                      "with the cost model (kernel timed here on CUDA, else assumed H200 terms), and the pick")
    info.add_argument("--guidance", action="store_true",
                      help="with --layouts: the model runs two guidance passes per step (CFG parallel a candidate)")
    info.add_argument("--layers", type=positive_int, default=1, metavar="N",
                      help="with --layouts: self-attention layers per pass, for the per-step times (default: 1)")
    info.add_argument("--nodes", type=positive_int, default=1, metavar="K",
                      help="with --layouts: the N GPUs sit on K nodes joined by 400 Gb/s InfiniBand per GPU (assumed)")
    info.add_argument("--assumed", action="store_true", help="with --layouts: assumed H200 terms even on a GPU")
    info.add_argument("--causal", action="store_true", help="with --shape: causal attention")
    info.add_argument("--json", action="store_true", help="print the same information as JSON")
    # -v after the subcommand too (usp-attn info -v); SUPPRESS keeps a -v given before it
    info.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                      help="show usp_attn INFO log messages on stderr")
    info.set_defaults(handler=_run_info)
    return parser


def _shape_arg(text: str) -> tuple[int, int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected B,H,S,D (four positive integers), got {text!r}")
    return shape  # type: ignore[return-value]


def _layouts_arg(text: str) -> tuple[int, int, int, int]:
    try:
        return _shape_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected N,H,S,D (GPUs, heads, tokens, head size), got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``usp-attn`` and ``python -m usp_attn``; returns the exit status.

    Argument errors (e.g. an unknown backend name) exit with status 2 through argparse.
    """
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("usp_attn").setLevel(logging.INFO)
    return args.handler(args)


# ---- info --------------------------------------------------------------------------------
@contextlib.contextmanager
def _only_request(requested: AttentionBackendEnum | None) -> Iterator[None]:
    """Resolve as a fresh process would with ``--attention-backend requested``: no forced
    backend, no group agreement. The previous process settings are restored on exit."""
    saved = (
        selector.get_global_forced_attn_backend(),
        selector.get_cli_attention_backend(),
        selector.get_group_agreement(),
    )
    selector.global_force_attn_backend(None)
    selector.set_group_agreement(None)
    selector.set_cli_attention_backend(requested)
    try:
        yield
    finally:
        selector.global_force_attn_backend(saved[0])
        selector.set_cli_attention_backend(saved[1])
        selector.set_group_agreement(saved[2])


def _resolve(requested, platform, head_size, dtype, need_lse, need_mask) -> dict:
    """``BackendSelection.to_dict()`` for this request (never strict), or ``{"error": ...}``."""
    with _only_request(requested):
        try:
            sel = selector.get_attn_backend(
                head_size, dtype, platform=platform, need_lse=need_lse, need_mask=need_mask, strict=False
            )
        except selector.AttentionBackendUnavailableError as exc:
            return {"requested": str(requested) if requested else None, "error": str(exc)}
    return sel.to_dict()


def _kernel_detail(backend: AttentionBackendEnum, platform: Platform, dtype, head_size, need_mask) -> str:
    """Which concrete kernel an available backend runs here (informational)."""
    if backend == AttentionBackendEnum.FA:
        runs = flash_generation(platform, head_size)
        parts = []
        for gen in flash_generations(platform):
            version = platform.package_version(GENERATION_PACKAGES[gen]) or "?"
            mark = "*" if gen == runs else ""
            parts.append(f"{mark}{gen.upper()} {version} ({generation_head_sizes(gen, platform)})")
        return "; ".join(parts)
    if backend == AttentionBackendEnum.SAGE_ATTN:
        major = sage_major_version(platform)
        return f"SageAttention {major}" if major else ""
    if backend == AttentionBackendEnum.TORCH_SDPA and platform.kind == PlatformKind.CUDA:
        return f"aten {cuda_subkernel(platform.capability, dtype, head_size, need_mask)}"
    return ""


def _torch_build() -> dict:
    cudnn = None
    with contextlib.suppress(Exception):
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cudnn": cudnn,
    }


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info(
    *,
    dtype: torch.dtype = torch.bfloat16,
    head_size: int = 128,
    requested: AttentionBackendEnum | None = None,
    need_lse: bool = False,
    need_mask: bool = False,
    platform: Platform | None = None,
) -> dict:
    """Everything ``usp-attn info`` shows, as a JSON-serialisable dict.

    ``platform`` defaults to :func:`~usp_attn.platforms.current_platform` (honours
    :func:`~usp_attn.platforms.override_platform`).
    """
    platform = platform or current_platform()
    dtype_name = str(dtype).replace("torch.", "")
    backends = []
    for b, cls in BACKEND_CLASSES.items():
        reason = cls.unsupported_reason(platform, head_size, dtype, need_lse=need_lse, need_mask=need_mask)
        runs_here = cls.machine_reason(platform) is None
        backends.append({
            "backend": str(b),
            "available": reason is None,
            "reason": reason,
            "kernel": _kernel_detail(b, platform, dtype, head_size, need_mask) if runs_here else "",
            "supports_lse": bool(cls.supports_lse(platform)) if runs_here else None,
            "supports_mask": cls.supports_mask,
            "supports_gqa": cls.supports_gqa,
        })
    return {
        "usp_attn": usp_attn.__version__,
        "python": _py_platform.python_version(),
        "torch": _torch_build(),
        "platform": {
            "kind": str(platform.kind),
            "device_name": platform.device_name,
            "capability": list(platform.capability) if platform.capability else None,
            "description": platform.describe(),
        },
        "kernel_packages": {
            name: {"distribution": dist, "installed": platform.has_package(name),
                   "version": platform.package_version(name) or None, "unusable": platform.unusable_reason(name)}
            for name, dist in OPTIONAL_PACKAGES.items()
        },
        "other_packages": {name: _dist_version(name) for name in OTHER_PACKAGES},
        "query": {"dtype": dtype_name, "head_size": head_size, "need_lse": need_lse, "need_mask": need_mask},
        "backends": backends,
        # auto_preference: the platform's preference order before per-layer checks (torch_sdpa is always last)
        "auto_order": [str(b) for b in selector.auto_preference(platform, dtype)],
        "auto": _resolve(None, platform, head_size, dtype, need_lse, need_mask),
        "requested": (
            _resolve(requested, platform, head_size, dtype, need_lse, need_mask) if requested is not None else None
        ),
    }


def measure_shape(shape, dtype, *, kv_heads=None, causal=False, need_lse=False, platform=None) -> dict:
    """Time every exact kernel at ``shape`` = (B, H, S, D) as the automatic choice would.

    Returns ``{"shape", "static", "candidates", "timings": [{"kernel", "ms", "tflops"}], "winner"}``,
    or with ``"error"`` where nothing can be measured (no CUDA, fewer than two kernels).
    """
    from usp_attn import measured_choice

    b, h, s, d = shape
    platform = platform or current_platform()
    result = {"shape": list(shape), "kv_heads": kv_heads or h, "causal": causal, "need_lse": need_lse}
    with _only_request(None):
        static = selector.get_attn_backend(d, dtype, platform=platform, need_lse=need_lse, num_keys=s).to_dict()
    result["static"] = static["backend"] + (f" ({static['kernel']})" if static["kernel"] else "")
    cands = measured_choice.exact_candidates([platform], d, dtype, need_lse=need_lse)
    result["candidates"] = [c.kernel for c in cands]
    if platform.kind != PlatformKind.CUDA or not torch.cuda.is_available():
        return {**result, "error": "measuring needs a CUDA GPU"}
    if len(cands) < 2:
        return {**result, "error": f"only {len(cands)} exact kernel(s) can run this shape: nothing to choose"}
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, s, h, d, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(b, s, kv_heads or h, d, device="cuda", generator=gen).to(dtype) for _ in range(2))
    found = measured_choice.measure(cands, platform, q, k, v, causal=causal, softmax_scale=None, need_lse=need_lse)
    flops = 4.0 * b * h * s * s * d / (2 if causal else 1)
    result["timings"] = [{"kernel": n, "ms": ms, "tflops": None if ms is None else flops / ms / 1e9}
                         for n, ms in found.timings]
    result["winner"] = found.winner.kernel
    return result


def _run_info(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("usp_attn").setLevel(logging.INFO)
    dtype = DTYPES[args.dtype]
    head_size = args.shape[3] if args.shape else args.head_size
    info = collect_info(
        dtype=dtype,
        head_size=head_size,
        requested=args.attention_backend,
        need_lse=args.need_lse,
        need_mask=args.need_mask,
    )
    if args.shape:
        info["measurement"] = measure_shape(args.shape, dtype, kv_heads=args.kv_heads, causal=args.causal,
                                            need_lse=args.need_lse)
    if args.layouts:
        from usp_attn.layout import layouts_info

        world, heads, tokens, head_size = args.layouts
        try:
            info["layouts"] = layouts_info(world, heads, tokens, head_size, kv_heads=args.kv_heads,
                                           guidance=args.guidance, layers=args.layers, nodes=args.nodes,
                                           measure=False if args.assumed else None, dtype=dtype)
        except ValueError as exc:
            print(f"usp-attn info: error: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return [line.rstrip() for line in lines]


def _selection_lines(title: str, sel: dict) -> list[str]:
    if "error" in sel:
        return [f"{title}: ERROR {sel['error']}"]
    note = f" (requested {sel['requested']}, fell back)" if sel["fell_back"] else f" (source: {sel['source']})"
    lines = [f"{title}: {sel['backend']}{note}"]
    lines += [f"    passed over {r['backend']}: {r['reason']}" for r in sel["rejected"]]
    return lines


def _cudnn_text(version: int) -> str:
    """cuDNN's integer version as text: 91900 -> 9.19.0 (cuDNN 9), 8902 -> 8.9.2 (cuDNN 8)."""
    if version >= 90000:
        return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"


def format_info(info: dict) -> str:
    """The human-readable form of :func:`collect_info`'s dict."""
    t, p, q = info["torch"], info["platform"], info["query"]
    build = ", ".join(
        f"{k} {_cudnn_text(t[k]) if k == 'cudnn' else t[k]}" for k in ("cuda", "hip", "cudnn") if t[k]
    ) or "CPU only"
    cap = ".".join(map(str, p["capability"])) if p["capability"] else "-"
    lines = [
        f"usp_attn {info['usp_attn']}  python {info['python']}  torch {t['version']} ({build})",
        f"platform: {p['kind']}  device: {p['device_name']}  capability: {cap}",
        "kernel packages: " + ", ".join(
            f"{name}={v['version'] or '?'}" if v["installed"] else f"{name}={'unusable' if v['unusable'] else '-'}"
            for name, v in info["kernel_packages"].items()
        ),
        *(f"  {name} is present but unusable: {v['unusable']}"
          for name, v in info["kernel_packages"].items() if v["unusable"]),
        "other packages:  " + ", ".join(f"{name}={v or '-'}" for name, v in info["other_packages"].items()),
        "",
        f"backends for dtype={q['dtype']} head_size={q['head_size']}"
        + (" need_lse" if q["need_lse"] else "") + (" need_mask" if q["need_mask"] else "") + ":",
    ]
    yes_no = {True: "yes", False: "no", None: "-"}
    rows = [
        (b["backend"], yes_no[b["available"]], yes_no[b["supports_lse"]], yes_no[b["supports_mask"]],
         yes_no[b["supports_gqa"]], b["reason"] or (b["kernel"] or "ok"))
        for b in info["backends"]
    ]
    lines += _table(("backend", "available", "lse", "mask", "gqa", "reason / kernel"), rows)
    lines.append("")
    lines.append("automatic order on this platform: " + " > ".join(info["auto_order"]))
    lines += _selection_lines("automatic pick", info["auto"])
    if info["requested"] is not None:
        lines += _selection_lines(f"--attention-backend {info['requested'].get('requested')}", info["requested"])
    if "measurement" in info:
        lines += [""] + _measurement_lines(info["measurement"])
    if "layouts" in info:
        lines += ["", info["layouts"]["text"]]
    return "\n".join(lines)


def _measurement_lines(m: dict) -> list[str]:
    b, h, s, d = m["shape"]
    title = (f"measured at B={b} H={h} S={s} D={d} H_kv={m['kv_heads']}" + (" causal" if m["causal"] else "")
             + (" need_lse" if m["need_lse"] else "") + f" (static rule: {m['static']})")
    if "error" in m:
        return [f"{title}: not measured ({m['error']}); candidates: {', '.join(m['candidates']) or 'none'}"]
    rows = [(t["kernel"], "failed" if t["ms"] is None else f"{t['ms']:.3f}",
             "-" if t["tflops"] is None else f"{t['tflops']:.0f}") for t in m["timings"]]
    return [title + ":"] + _table(("kernel", "median ms", "TFLOP/s"), rows) + [f"automatic choice: {m['winner']}"]


if __name__ == "__main__":  # pragma: no cover - `python -m usp_attn.cli`
    sys.exit(main())

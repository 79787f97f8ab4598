#!/usr/bin/env python
"""Text-to-video denoising with sequence-parallel attention, under torchrun (or plain python = 1 rank).

    torchrun --nproc-per-node 4 launch/generate.py --ulysses-degree 2 --ring-degree 2 \\
        --prompt "a blue square moving up" --output video.gif --verify

Without --model-path it runs a small built-in Wan-style video DiT (launch/tiny_dit.py)
trained here on videos of a coloured shape moving across a dark background
(launch/train_builtin.py), so the command runs anywhere, on CPU + gloo when there is no
GPU, and the video shows what the prompt asks for: one colour (red, green, blue, yellow,
white, purple), shape (circle, square, triangle) and direction (left, right, up, down).
With --model-path it runs a diffusers pipeline (video or image) with sequence parallelism
enabled on its transformer.

--cfg-parallel splits the ranks into two groups of --ulysses-degree x --ring-degree ranks:
one computes the conditional prediction, the other the unconditional one, and the two
are gathered once per step (one all-gather of the prediction; no communication inside
the model between the groups). It needs classifier-free guidance (--guidance-scale > 1)
and twice as many ranks as the sequence-parallel layout:

    torchrun --nproc-per-node 4 launch/generate.py --cfg-parallel --ulysses-degree 2 --verify

--layout auto chooses the three (CFG, Ulysses, ring) for the number of ranks from the cost
model of usp_attn.layout, with the same pick on every rank.

Exit status: 0 success, 1 failure (including a failed --verify), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

import usp_attn
from usp_attn.config import AttentionConfig, add_attention_args, positive_int
from usp_attn.arguments import DEFAULT_TIMEOUT, check_timeout
from usp_attn.selector import AttentionBackendUnavailableError

from builtin_job import BUILTIN_GUIDANCE, DEFAULT_PROMPT, builtin_problems, run_builtin
from builtin_weights import TRAINED_VIDEO
from flow_match import VAE_STRIDE, latent_grid
from job_output import check_output, write_outputs
from run_report import print_summary
from tiny_dit import TinyDiTConfig
from diffusers_job import check_model_path, model_can_split_guidance, read_model_index, run_model_path
import auto_layout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATCH = TinyDiTConfig.patch_size  # Wan's (1, 2, 2), for the built-in model and Wan 2.1 alike


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def seconds(text: str) -> float:
    """argparse ``type=``: a positive finite number of seconds."""
    try:
        value = float(text)
        check_timeout(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive finite number of seconds, got {text!r}") from None
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None / False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


#: how long a rank other than 0 waits before exiting on a bad argument under torchrun, which stops all ranks
#: as soon as one exits: rank 0 may still be importing torch then, and would be killed before it explains
QUIET_RANK_WAIT = 30.0


def _rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


class _RankZeroParser(argparse.ArgumentParser):
    """Every rank parses the same command line and finds the same mistake, so rank 0 alone prints the usage
    and the error (or --help); the others exit with the same status, quietly."""

    def print_help(self, file=None):
        if _rank_zero():
            super().print_help(file)

    def error(self, message):
        if _rank_zero():
            super().error(message)  # usage + message, exit 2
        if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun: it ends this wait once rank 0 has exited
            time.sleep(QUIET_RANK_WAIT)
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _RankZeroParser(
        prog="generate.py",
        description="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model-path", default=None, metavar="PATH",
                   help="local diffusers pipeline directory (or hub id, with network): the pipeline named by its "
                   "model_index.json (Wan, Flux, Qwen-Image, LTX-Video, HunyuanVideo, CogVideoX, ...), sequence "
                   "parallel on its transformer; video -> .mp4/.gif/.npz, image -> .png. Needs 'usp-attn[diffusers]'. "
                   "Default: the built-in DiT, trained on moving shapes")
    add_attention_args(p)
    p.add_argument("--cfg-parallel", action="store_true",
                   help="classifier-free-guidance parallelism: the cond and uncond predictions on two groups of "
                   "--ulysses-degree x --ring-degree ranks each (so 2 x U x R ranks), gathered once per step. Needs "
                   "--guidance-scale > 1. With --model-path, for pipelines that batch the two branches (CogVideoX, "
                   "LTX-Video) or call the transformer once per branch (Wan, Qwen-Image, Flux and HunyuanVideo "
                   "with true CFG)")
    p.add_argument("--layout", choices=("auto",), default=None,
                   help="auto: choose --cfg-parallel, --ulysses-degree and --ring-degree for the number of ranks "
                   "from the cost model of usp_attn.layout (kernel and links timed on CUDA, else assumed H200 "
                   "figures); rank 0 decides, every rank runs its pick. With --model-path, the heads and sizes "
                   "come from the pipeline directory's config files")
    p.add_argument("--sp-timeout", type=seconds, default=DEFAULT_TIMEOUT.total_seconds(), metavar="SECONDS",
                   help="bound on every sequence-parallel collective: when a rank dies or hangs, the others stop "
                   "after this long with an error naming it (needs more than the slowest rank's model loading and "
                   "first-step compilation take beyond the fastest's)")
    p.add_argument("--num-frames", type=positive_int, default=TRAINED_VIDEO[0],
                   help="video frames: 4k+1 (Wan VAE time stride 4); the default is what the built-in model was "
                   "trained on")
    p.add_argument("--height", type=positive_int, default=TRAINED_VIDEO[1], help="pixels, multiple of 16 (VAE 8 x patch 2)")
    p.add_argument("--width", type=positive_int, default=TRAINED_VIDEO[2], help="pixels, multiple of 16 (VAE 8 x patch 2)")
    p.add_argument("--num-inference-steps", type=positive_int, default=10, help="denoising (Euler) steps")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="the initial noise")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help=f"classifier-free guidance; 1 turns it off (default: {BUILTIN_GUIDANCE:g} for the built-in "
                   "model, 5 with --model-path)")
    p.add_argument("--shift", type=float, default=5.0, help="flow-matching sigma shift (built-in model)")
    p.add_argument("--output", default="video.gif", metavar="FILE",
                   help="the video, written by rank 0 after the summary: .gif (needs Pillow), .mp4 (needs the video "
                   "extra: pip install 'usp-attn[video]'), .png (an image pipeline's picture; of a video, the first "
                   "frame), .npz (video uint8 [F, H, W, 3], the built-in model's latents and the run's settings), "
                   "or none. Checked before any work")
    p.add_argument("--fps", type=positive_int, default=16, help="frame rate of .mp4/.gif output")
    p.add_argument("--verify", action="store_true",
                   help="built-in model only: rank 0 reruns the same steps on the full sequence without sequence "
                   "parallelism and the run fails (exit 1) unless the results agree: fp32 within 1e-4 relative; "
                   "fp16/bf16 no further from an fp32 rerun than 2x the one-process low-precision rerun is. The "
                   "rerun's video is written beside --output (video.gif -> video_one_process.gif)")
    p.add_argument("--prompt", default=None,
                   help=f"what to draw. Built-in model (default {DEFAULT_PROMPT!r}): a colour, a shape and a direction "
                   "from its vocabulary (other words are refused). --model-path: any text (default 'a red panda "
                   "drinking tea in a garden')")
    p.add_argument("--negative-prompt", default="",
                   help="classifier-free guidance steers away from it; empty: unconditional")
    model = p.add_argument_group("built-in model (ignored with --model-path)")
    model.add_argument("--hidden-size", type=positive_int, default=TinyDiTConfig.hidden_size,
                       help="model width; other values than the default (and other --num-heads, --num-layers) get "
                       "random weights instead of the trained ones: for speed tests, the video is noise")
    model.add_argument("--num-heads", type=positive_int, default=TinyDiTConfig.num_heads,
                       help="attention heads; need not be divisible by --ulysses-degree (USPAttention pads heads)")
    model.add_argument("--num-layers", type=positive_int, default=TinyDiTConfig.num_layers,
                       help="transformer blocks")
    sparse = p.add_argument_group("sparse self-attention (lossy, opt-in; the built-in model and Wan pipelines)")
    sparse.add_argument("--sparse-tile", type=triple, default=None, metavar="F,H,W",
                        help="sliding-tile attention: tokens per tile in frames, rows, columns (e.g. 1,4,4)")
    sparse.add_argument("--sparse-window", type=triple, default=None, metavar="F,H,W",
                        help="tiles each query tile sees per dimension (needs --sparse-tile)")
    sparse.add_argument("--dense-steps", type=nonnegative_int, default=0, metavar="N",
                        help="the first N denoising steps stay dense (default 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="show usp_attn's INFO log messages (rank 0)")
    return p


def triple(text: str) -> tuple[int, int, int]:
    """argparse ``type=``: three positive integers ``F,H,W``."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers F,H,W, got {text!r}")
    return values


def check_args(args, world_size: int) -> list[str]:
    """Every problem with the arguments, found without touching a GPU, a process group or a model."""
    problems = []
    u, r = args.ulysses_degree, args.ring_degree
    cfg = 2 if args.cfg_parallel else 1
    if args.layout == "auto":
        if (cfg, u, r) != (1, 1, 1):
            problems.append("--layout auto chooses --cfg-parallel, --ulysses-degree and --ring-degree itself; "
                            "drop them, or drop --layout auto")
        try:
            layout_workload(args)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"--layout auto: {exc}")
        u = r = 1  # the pick is made for the world size, so the degrees cannot disagree with it
    elif cfg * u * r != world_size:
        product = f"--ulysses-degree {u} x --ring-degree {r} = {u * r}"
        if cfg > 1:
            product = f"--cfg-parallel (2) x --ulysses-degree {u} x --ring-degree {r} = {cfg * u * r}"
        problems.append(
            f"{product} must equal the number of ranks, {world_size} "
            "(torchrun --nproc-per-node N; 1 when run without torchrun)"
        )
    if args.cfg_parallel and args.guidance_scale <= 1.0:
        problems.append(f"--cfg-parallel needs classifier-free guidance, but --guidance-scale is {args.guidance_scale:g} "
                        "(1 = off: one prediction per step, nothing to split); raise it or drop --cfg-parallel")
    st, (sh, sw) = VAE_STRIDE[0], (VAE_STRIDE[1] * PATCH[1], VAE_STRIDE[2] * PATCH[2])
    if (args.num_frames - 1) % st:
        problems.append(f"--num-frames {args.num_frames} must be 4k+1 (1, 5, 9, ..., 81): the VAE stride in time is 4")
    for name, value, mult in (("--height", args.height, sh), ("--width", args.width, sw)):
        if value % mult:
            problems.append(f"{name} {value} must be a multiple of {mult} (VAE stride 8 x patch 2)")
    if not problems:
        f, h, w = latent_grid(args.num_frames, args.height, args.width)
        tokens = f * (h // PATCH[1]) * (w // PATCH[2])
        if tokens < u * r:
            problems.append(f"the video has {tokens} tokens, fewer than the {u * r} sequence-parallel ranks; "
                            "make it larger")
    if args.guidance_scale < 1.0:
        problems.append(f"--guidance-scale must be >= 1 (1 = no guidance), got {args.guidance_scale}")
    rank_zero = int(os.environ.get("RANK", "0")) == 0  # the rank that writes the output
    problems += check_output(args.output, writes=rank_zero, verify=args.verify and args.model_path is None)
    if (args.sparse_tile is None) != (args.sparse_window is None):
        problems.append("--sparse-tile and --sparse-window go together (the tile size and the window in tiles)")
    if args.model_path is None:
        problems += builtin_problems(args)
    else:
        problems += check_model_path(args)
    return problems


def layout_workload(args):
    """The attention shape that --layout auto lays out (raises naming what is missing)."""
    if args.model_path is None:
        return auto_layout.builtin_workload(args)
    index = read_model_index(args.model_path) if os.path.isdir(args.model_path) else None
    if index is None:
        raise ValueError(f"--model-path {args.model_path!r} is not a local pipeline directory; the layout is chosen "
                         "from its config files (transformer/config.json), so download it first or give the degrees")
    return auto_layout.model_path_workload(args, index)


def choose_layout(args, world: int, rank: int) -> None:
    """--layout auto: set the degrees to the cost model's pick (the same on every rank)."""
    can_split = args.model_path is None or model_can_split_guidance(args.model_path)
    choice = auto_layout.choose(args, layout_workload(args), world, cfg_allowed=can_split, timeout=args.sp_timeout)
    args.cfg_parallel, args.ulysses_degree, args.ring_degree = choice.cfg == 2, choice.ulysses, choice.ring
    if rank == 0:
        if args.verbose:
            print(choice.table, flush=True)
        print(f"layout auto: CFG {choice.cfg} x Ulysses {choice.ulysses} x ring {choice.ring} for {world} rank(s), "
              f"predicted {choice.step_ms:.1f} ms of attention per step", flush=True)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_path is not None and args.prompt is None:
        args.prompt = "a red panda drinking tea in a garden"
    if args.guidance_scale is None:
        args.guidance_scale = 5.0 if args.model_path is not None else BUILTIN_GUIDANCE
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    problems = check_args(args, world)
    if problems:  # every rank finds the same problems from the same arguments: all exit, none hangs
        # The ranks of one machine check the same files and packages: its first rank speaks for them (rank 0
        # also checks the output it writes); the others exit quietly, as after an argparse error.
        if rank == 0 or os.environ.get("LOCAL_RANK", "0") == "0":
            lines = problems if len(problems) == 1 else [f"{len(problems)} problems:"] + [f"  - {p}" for p in problems]
            print(f"{parser.prog}: error (rank {rank}): " + "\n".join(lines), file=sys.stderr)
        elif "TORCHELASTIC_RUN_ID" in os.environ:
            time.sleep(QUIET_RANK_WAIT)
        return 2
    logging.basicConfig(format="%(levelname)s %(message)s",
                        level=(logging.INFO if args.verbose else logging.WARNING) if rank == 0 else logging.ERROR)
    dtype = DTYPES[args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")]
    t_start = time.perf_counter()
    AttentionConfig.from_args(args).apply()
    try:
        if args.layout == "auto":
            choose_layout(args, world, rank)
        state = usp_attn.init_sequence_parallel(args.ulysses_degree, args.ring_degree, strict=args.attention_strict,
                                                timeout=args.sp_timeout, cfg_degree=2 if args.cfg_parallel else 1)
    except (ValueError, RuntimeError, AttentionBackendUnavailableError) as exc:
        print(f"{parser.prog}: error (rank {rank}): {exc}", file=sys.stderr)
        if args.layout == "auto":
            auto_layout.finish()
        return 1
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if rank == 0:
            print(describe_backend(state.agreement), flush=True)
        run = run_builtin if args.model_path is None else run_model_path
        result = run(args, state, device, dtype, rank)
        result["wall"] = time.perf_counter() - t_start
        verdict = result.get("verify")
        status = 0 if verdict is None or verdict["passed"] else 1
        if rank == 0:
            print_summary(args, state, dtype, result)  # first: a failing write loses neither summary nor verdict
            try:
                write_outputs(args, result, str(state.backend))
            except OSError as exc:
                print(f"{parser.prog}: error: could not write --output {args.output!r}: {exc}", file=sys.stderr)
                status = 1
        return status
    finally:
        usp_attn.destroy_sequence_parallel()
        if args.layout == "auto":
            auto_layout.finish()  # the default group it started on CUDA, if any


def describe_backend(agreement) -> str:
    line = f"attention backend: {agreement.backend}"
    if agreement.requested is None:
        return line + f" (automatic choice, agreed by {agreement.world_size} rank(s))"
    if agreement.requested != agreement.backend:
        return line + f" (requested '{agreement.requested}' {agreement.reason_unavailable(agreement.requested)})"
    return line + f" (requested via --attention-backend, agreed by {agreement.world_size} rank(s))"


if __name__ == "__main__":
    sys.exit(main())

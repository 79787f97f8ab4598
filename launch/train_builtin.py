#!/usr/bin/env python
"""Train the built-in video DiT on moving coloured shapes (a few minutes on a GPU; the CPU works, slower).

    python launch/train_builtin.py                       # writes ./moving_shapes.pt
    python launch/train_builtin.py --steps 7000 --batch 32 --device cuda   # how the shipped weights were made
    python launch/train_builtin.py --steps 20 --out /tmp/w.pt   # a quick try
    python launch/train_builtin.py --out launch/weights/moving_shapes.pt --overwrite   # replace the shipped weights

It never replaces an existing file (the shipped weights included) without --overwrite, nor writes through a
symbolic link; --out is checked before training.

Data: launch/moving_shapes.py draws a clip per sample (a shape of a prompted colour moving in a
prompted direction across a dark background), at the default video size of generate.py,
straight into latents. Objective: rectified flow as launch/flow_match.py samples it: with
``x_s = (1 - s) x0 + s noise``, the model at timestep 1000 s returns the velocity ``noise - x0``
through its prediction of the clean latents x0 (tiny_dit.py), and the loss is the mean squared error
of that prediction; s is drawn shifted towards noise (s = 3u / (1 + 2u), u uniform), as the
sampler's shifted steps are: the first steps, at high noise, decide where the shape is. Each attribute of a training prompt is dropped with
probability 0.15, so the model also knows unconditional and partial prompts, which
classifier-free guidance needs. AdamW with a warm-up and cosine decay; the saved weights are an
exponential moving average of the trained ones, in fp16 (~1.5 MB).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
import tempfile
import time

import torch

LAUNCH = pathlib.Path(__file__).resolve().parent
if str(LAUNCH) not in sys.path:
    sys.path.insert(0, str(LAUNCH))

from builtin_weights import TRAINED_VIDEO, WEIGHTS_PATH, save_weights  # noqa: E402
from flow_match import latent_grid  # noqa: E402
from moving_shapes import COLOURS, DIRECTIONS, SHAPES, Prompt, encode_prompts, random_prompts, render_clips  # noqa: E402
from tiny_dit import TinyDiTConfig, TinyWanDiT  # noqa: E402

from usp_attn.config import positive_int  # noqa: E402

VOCABULARY = (tuple(COLOURS), SHAPES, tuple(DIRECTIONS))  # in Prompt's field order
SHIFT = 3.0  # training noise levels: u uniform, s = 3u / (1 + 2u), so a quarter of them above 0.9


def train(steps: int, batch: int, lr: float, seed: int, log_every: int = 50, cfg: TinyDiTConfig | None = None,
          device: str = "cpu") -> tuple[TinyWanDiT, dict]:
    """Train a fresh model; returns the EMA model (on the CPU) and what the weights file records about the run.
    The clips are drawn on the CPU from the seeded generator, so a run's data does not depend on ``device``."""
    torch.manual_seed(seed)
    cfg = cfg or TinyDiTConfig()
    model = TinyWanDiT(cfg, sequence_parallel=False).to(device).train()
    ema = TinyWanDiT(cfg, sequence_parallel=False).to(device).eval()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    gen = torch.Generator().manual_seed(seed + 1)
    frames, _, _ = latent_grid(*TRAINED_VIDEO)
    rendered: dict[Prompt, torch.Tensor] = {}

    def clip(prompt: Prompt) -> torch.Tensor:
        """The clip of a prompt, its unnamed attributes drawn at random. The path is fixed by the direction, so
        there are only 72 clips: each is rendered once."""
        full = Prompt(*(value or choices[int(torch.randint(len(choices), (1,), generator=gen))]
                        for value, choices in zip(dataclasses.astuple(prompt), VOCABULARY)))
        if full not in rendered:
            rendered[full] = render_clips([full], frames, TRAINED_VIDEO[1], TRAINED_VIDEO[2], gen)[0]
        return rendered[full]

    t0, recent = time.perf_counter(), []
    for step in range(steps):
        prompts = random_prompts(batch, gen, drop=0.15)
        x0 = torch.stack([clip(p) for p in prompts])
        text = encode_prompts(prompts, cfg.text_dim)
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.rand(batch, generator=gen)
        x0, text, noise, u = (t.to(device) for t in (x0, text, noise, u))
        s = SHIFT * u / (1 + (SHIFT - 1) * u)  # noise levels as the sampler's shifted steps visit them
        xs = x0 + s.view(-1, 1, 1, 1, 1) * (noise - x0)
        clean = xs - s.view(-1, 1, 1, 1, 1) * model(xs, 1000 * s, text)  # the network's own prediction
        loss = torch.nn.functional.mse_loss(clean, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.995, (1 + step) / (10 + step))  # short memory early, ~200 steps at the end
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        recent = (recent + [loss.item()])[-log_every:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.0f} s", flush=True)
    info = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "final_loss": sum(recent) / len(recent),
            "train_seconds": round(time.perf_counter() - t0), "config": dataclasses.asdict(cfg),
            "video": list(TRAINED_VIDEO), "device": str(device)}
    return ema.cpu(), info


DEFAULT_OUT = "moving_shapes.pt"  # in the current directory: a run never lands on the shipped weights by default


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def out_problem(out: str, overwrite: bool) -> str | None:
    """What would stop the weights being written to ``out``: found before training, not minutes after."""
    path = pathlib.Path(out)
    if path.is_symlink():
        return (f"--out {out!r} is a symbolic link (to {os.readlink(path)!r}); give the path of a new or regular "
                "file (weights are never written through a link)")
    if path.is_dir():
        return f"--out {out!r} is a directory; give a file name such as {str(path / DEFAULT_OUT)!r}"
    parent = path.absolute().parent
    if not parent.is_dir():
        return f"--out {out!r}: directory {parent} does not exist; create it first"
    if path.exists() and not overwrite:
        shipped = " (the shipped weights, which generate.py loads)" if path.resolve() == WEIGHTS_PATH.resolve() else ""
        return f"--out {out!r} already exists{shipped}; pass --overwrite to replace it, or choose another --out"
    try:  # the one sure test: root passes os.access() checks on folders it still cannot write
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".train_builtin_write_test_"):
            pass
    except OSError as exc:
        return f"--out {out!r}: cannot write to directory {parent}: {exc.strerror or exc}"
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive_int, default=1000, help="optimiser steps")
    p.add_argument("--batch", type=positive_int, default=16, help="clips per step")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None,
                   help="where the model trains: cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    p.add_argument("--num-layers", type=positive_int, default=TinyDiTConfig.num_layers,
                   help="transformer blocks (generate.py uses trained weights only for its own model shape)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"weights file to write (default: {DEFAULT_OUT} in the current directory); generate.py "
                   f"loads {WEIGHTS_PATH}")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = out_problem(args.out, args.overwrite)
    if problem:
        parser.error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as exc:  # a CPU-only torch asserts on "cuda"
        parser.error(f"--device {device!r} cannot be used here: {exc}")
    cfg = dataclasses.replace(TinyDiTConfig(), num_layers=args.num_layers)
    model, info = train(args.steps, args.batch, args.lr, args.seed, cfg=cfg, device=device)
    out, status = args.out, 0
    for attempt in range(1, 100):
        try:
            size = save_weights(model, info, out, overwrite=args.overwrite)
            break
        except FileExistsError:  # it appeared while training: keep it, and keep the minutes of training too
            root, ext = os.path.splitext(args.out)
            out, status = f"{root}.{attempt}{ext}", 1
    else:
        print(f"error: --out {args.out!r} and the names beside it exist; nothing written", file=sys.stderr)
        return 1
    if status:
        print(f"error: --out {args.out!r} appeared while training and was not replaced; wrote {out} instead",
              file=sys.stderr)
    print(f"wrote {out} ({size / 2**20:.2f} MiB) after {info['train_seconds']} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

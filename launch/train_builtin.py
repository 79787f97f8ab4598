#!/usr/bin/env python
"""Train the built-in video DiT on moving coloured shapes (CPU, a few minutes).

    python launch/train_builtin.py                       # writes launch/weights/moving_shapes.pt
    python launch/train_builtin.py --steps 20 --out /tmp/w.pt   # a quick try

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
import pathlib
import sys
import time

import torch

LAUNCH = pathlib.Path(__file__).resolve().parent
if str(LAUNCH) not in sys.path:
    sys.path.insert(0, str(LAUNCH))

from builtin_weights import TRAINED_VIDEO, WEIGHTS_PATH, save_weights  # noqa: E402
from flow_match import latent_grid  # noqa: E402
from moving_shapes import encode_prompts, random_prompts, render_clips  # noqa: E402
from tiny_dit import TinyDiTConfig, TinyWanDiT  # noqa: E402

SHIFT = 3.0  # training noise levels: u uniform, s = 3u / (1 + 2u), so a quarter of them above 0.9


def train(steps: int, batch: int, lr: float, seed: int, log_every: int = 50) -> tuple[TinyWanDiT, dict]:
    """Train a fresh model; returns the EMA model and what the weights file records about the run."""
    torch.manual_seed(seed)
    cfg = TinyDiTConfig()
    model = TinyWanDiT(cfg, sequence_parallel=False).train()
    ema = TinyWanDiT(cfg, sequence_parallel=False).eval()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    gen = torch.Generator().manual_seed(seed + 1)
    frames, _, _ = latent_grid(*TRAINED_VIDEO)
    t0, recent = time.perf_counter(), []
    for step in range(steps):
        prompts = random_prompts(batch, gen, drop=0.15)
        x0 = render_clips(prompts, frames, TRAINED_VIDEO[1], TRAINED_VIDEO[2], gen)
        text = encode_prompts(prompts, cfg.text_dim)
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.rand(batch, generator=gen)
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
            "video": list(TRAINED_VIDEO)}
    return ema, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    p.add_argument("--batch", type=int, default=16, help="clips per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(WEIGHTS_PATH), help="weights file to write")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, info = train(args.steps, args.batch, args.lr, args.seed)
    size = save_weights(model, info, args.out)
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB) after {info['train_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

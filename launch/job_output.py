"""generate.py's output files: checked before any work, written after the summary.

``--output`` takes ``.gif`` (Pillow: any viewer opens it), ``.png`` (Pillow: an image pipeline's
picture; of a video, the first frame), ``.mp4`` (imageio + imageio-ffmpeg: the
``video`` extra), ``.npz`` (numpy: ``video`` uint8 ``[F, H, W, 3]``, the built-in model's ``latents``
and the run's settings) or ``none``. With ``--verify`` the one-process rerun's video is written
beside it (``video.gif`` -> ``video_one_process.gif``), so the two can be compared by eye.

An existing regular file at the path is replaced; a symbolic link there is refused before any work
and, should one appear later, replaced rather than followed (safe_files.new_file).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import torch

from safe_files import new_file

__all__ = ["WRITERS", "check_output", "one_process_path", "write_video", "write_outputs"]

#: extension -> (modules the writer needs, how to get them)
WRITERS = {
    ".gif": (("PIL",), "pip install pillow (or the video extra: pip install 'usp-attn[video]')"),
    ".png": (("PIL",), "pip install pillow (or the video extra: pip install 'usp-attn[video]')"),
    ".mp4": (("imageio", "imageio_ffmpeg"), "pip install 'usp-attn[video]' (imageio, imageio-ffmpeg)"),
    ".npz": (("numpy",), "pip install numpy"),
}


def one_process_path(path: str) -> str:
    """Where ``--verify`` writes the one-process video: ``dir/video.gif`` -> ``dir/video_one_process.gif``."""
    stem, ext = os.path.splitext(path)
    return f"{stem}_one_process{ext}"


def check_output(path: str, *, writes: bool, verify: bool = False) -> list[str]:
    """Problems with ``--output``, found before any work: the format and its writer on every rank; the
    directory and the file only where ``writes`` (rank 0, which writes them: other ranks may be on
    machines without that directory)."""
    if path.lower() == "none":
        return []
    ext = os.path.splitext(path)[1].lower()
    if ext not in WRITERS:
        return [f"--output {path!r}: unknown extension {ext!r}; use one of {', '.join(WRITERS)} (or none)"]
    modules, hint = WRITERS[ext]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return [f"--output {path!r} needs the {missing[0]} package, which is not installed: {hint}; "
                "or write .npz, or pass --output none"]
    if not writes:
        return []
    parent = os.path.dirname(os.path.abspath(path))
    targets = [path] + ([one_process_path(path)] if verify else [])
    if not os.path.isdir(parent):
        return [f"--output {path!r}: directory {parent} does not exist"]
    # A link would make the job write wherever it points (a dangling one: fail after the whole run).
    problems = [f"--output {t!r} is a symbolic link (to {os.readlink(t)!r}); give the path of a new or regular "
                "file (outputs are never written through a link)" for t in targets if os.path.islink(t)]
    problems += [f"--output {t!r} is a directory; give a file name such as {os.path.join(t, 'video' + ext)!r}"
                 for t in targets if os.path.isdir(t) and not os.path.islink(t)]
    try:  # the one sure test: root passes os.access() checks on folders it still cannot write
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".usp_attn_write_test_"):
            pass
    except OSError as exc:
        problems.append(f"--output {path!r}: cannot write to directory {parent}: {exc.strerror or exc}")
    return problems


def write_video(path: str, video: torch.Tensor, *, fps: int, extra: dict | None = None) -> None:
    """Write ``video`` (uint8 ``[F, H, W, 3]``); ``extra`` arrays and settings go into an .npz too."""
    frames = video.cpu().numpy()
    ext = os.path.splitext(path)[1].lower()
    with new_file(path, replace=True) as (file, name):
        if ext == ".gif":
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            images[0].save(file, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                           loop=0)
        elif ext == ".png":
            from PIL import Image

            Image.fromarray(frames[0]).save(file, format="PNG")
        elif ext == ".mp4":
            import imageio.v2 as imageio

            # ffmpeg needs a file name: the new file's, which only this process has created
            imageio.mimwrite(name, list(frames), fps=fps, format="FFMPEG", macro_block_size=1)
        else:
            import numpy as np

            np.savez_compressed(file, video=frames, **(extra or {}))
    print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]})", flush=True)


def write_outputs(args, result: dict, backend: str) -> None:
    """Rank 0, after the summary: ``result["video"]`` to ``--output`` and, after ``--verify`` of the
    built-in model, ``result["one_process_video"]`` beside it."""
    if args.output.lower() == "none":
        return
    extra = dict(seed=args.seed, ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
                 cfg_degree=2 if getattr(args, "cfg_parallel", False) else 1,
                 num_inference_steps=args.num_inference_steps, attention_backend=backend, prompt=args.prompt or "")
    if result.get("latents") is not None:
        extra["latents"] = result["latents"][0].float().cpu().numpy()
    write_video(args.output, result["video"], fps=args.fps, extra=extra)
    if result.get("one_process_video") is not None:
        write_video(one_process_path(args.output), result["one_process_video"], fps=args.fps,
                    extra={**extra, "latents": result["one_process_latents"][0].float().cpu().numpy(),
                           "ulysses_degree": 1, "ring_degree": 1, "cfg_degree": 1})

"""The built-in model's trained weights: where they live, how they are saved and loaded.

``launch/weights/moving_shapes.pt`` is written by launch/train_builtin.py (``torch.save`` of
``{"state_dict": fp16 tensors, "info": {...}}``; ``info`` records the model config, the video
size it was trained at and the training run). generate.py loads it when the built-in model has
the trained shape (the defaults of ``--hidden-size``, ``--num-heads``, ``--num-layers``); other
shapes (the GPU scaling scripts' Wan-sized models) get seeded random weights instead.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import torch

from safe_files import new_file

__all__ = ["WEIGHTS_PATH", "TRAINED_VIDEO", "save_weights", "load_weights", "has_trained_shape"]

WEIGHTS_PATH = pathlib.Path(__file__).resolve().parent / "weights" / "moving_shapes.pt"
#: (frames, height, width) of the training clips: generate.py's default video
TRAINED_VIDEO = (17, 128, 128)


def save_weights(model: torch.nn.Module, info: dict, path: str | os.PathLike, *, overwrite: bool = False) -> int:
    """Write ``model``'s parameters in fp16 with ``info`` to a new file at ``path`` in an existing directory;
    returns the file size in bytes. Raises ``FileExistsError`` if ``path`` exists (a file or a link), unless
    ``overwrite``; a link is never followed (safe_files.new_file)."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with new_file(path, replace=overwrite) as (file, _):
        torch.save({"state_dict": state, "info": info}, file)
    return os.stat(path).st_size


def has_trained_shape(cfg) -> bool:
    """Whether a ``TinyDiTConfig`` is the shape the weights file holds (read from the file)."""
    if not WEIGHTS_PATH.exists():
        return False
    saved = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)["info"]["config"]
    mine = dataclasses.asdict(cfg)
    return all(mine.get(k) == (tuple(v) if isinstance(v, list) else v) for k, v in saved.items())


def load_weights(model: torch.nn.Module, path: str | os.PathLike = WEIGHTS_PATH) -> dict:
    """Load the trained weights into ``model`` (any dtype/device: values are cast); returns the run's info."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(blob["state_dict"])
    return blob["info"]

"""Synthetic videos of one coloured shape moving across a plain background, and their prompts.

What the built-in model (launch/tiny_dit.py) is trained on (launch/train_builtin.py), so that
generate.py makes a video a person recognises: ``--prompt "a red circle moving right"``.

Prompt vocabulary: one colour, one shape and one direction word, and the filler words of
:data:`FILLER` ("a", "the", "moving", ...); any other word is refused, since the model would silently
draw something the prompt did not ask for. A missing attribute is left to the model, the empty
prompt leaves all three to it:

    colours     red green blue yellow white purple
    shapes      circle square triangle
    directions  left right up down

Text encoding: a stand-in for a text encoder. Each attribute fills one of three text tokens
with a fixed seeded random vector of its word (or of "unspecified"), so the model sees
``[B, 3, text_dim]`` text like any DiT sees encoder states.

Clips are rendered straight at the latent resolution through the stand-in VAE's encoder
(flow_match.rgb_to_latents): latent frame t shows the shape at time t / (F' - 1) of its path.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from flow_match import rgb_to_latents

__all__ = ["BACKGROUND", "COLOURS", "SHAPES", "DIRECTIONS", "FILLER", "Prompt", "parse_prompt", "encode_prompts",
           "render_clips", "random_prompts", "vocabulary_text"]

COLOURS = {  # RGB in [0, 1]
    "red": (0.92, 0.16, 0.12), "green": (0.16, 0.78, 0.22), "blue": (0.18, 0.36, 0.98),
    "yellow": (0.96, 0.86, 0.12), "white": (0.96, 0.96, 0.96), "purple": (0.62, 0.22, 0.88),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y down
#: words a prompt may hold besides the vocabulary: they carry no attribute the model could draw
FILLER = ("a", "an", "the", "one", "single", "shape", "moving", "moves", "move", "going", "goes", "heading",
          "travelling", "traveling", "to", "towards", "toward", "and", "is", "that", "which")
PLURALS = {"squares": "square", "circles": "circle", "triangles": "triangle"}
#: the line each direction moves along (y for left/right, x for up/down): opposite directions on different
#: lines, so they differ in where the shape is, not only in the order of the frames
LANES = {"left": 0.65, "right": 0.35, "up": 0.65, "down": 0.35}

BACKGROUND = (0.10, 0.12, 0.18)  # dark slate, RGB in [0, 1]
TEXT_SEED = 1234  # the word vectors: fixed, part of the model like a text encoder's weights
START, PATH_LENGTH = 0.2, 0.6  # of the frame, along the motion
RADIUS = 0.15  # of the frame


@dataclasses.dataclass(frozen=True)
class Prompt:
    """The attributes a prompt names; None = not named (the model chooses)."""

    colour: str | None = None
    shape: str | None = None
    direction: str | None = None


def vocabulary_text() -> str:
    return (f"colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; directions {', '.join(DIRECTIONS)}; "
            f"and the words {', '.join(FILLER)}")


def parse_prompt(text: str) -> Prompt:
    """``"a red circle moving right"`` -> ``Prompt("red", "circle", "right")``; ``""`` -> ``Prompt()``.

    Raises ``ValueError`` naming the prompt and what is wrong: words outside the vocabulary and
    :data:`FILLER`, a non-empty prompt with no colour, shape or direction, or two values of one attribute.
    """
    found: dict[str, list[str]] = {"colour": [], "shape": [], "direction": []}
    unknown = []
    for word in re.findall(r"[^\W_]+(?:'[^\W_]+)*", text.lower()):  # words: punctuation never hides one
        word = PLURALS.get(word, word)
        attr = next((a for a, vocab in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS))
                     if word in vocab), None)
        if attr is not None and word not in found[attr]:
            found[attr].append(word)
        elif attr is None and word not in FILLER and word not in unknown:
            unknown.append(word)
    wrong = [f"more than one {attr}: {', '.join(words)}" for attr, words in found.items() if len(words) > 1]
    if unknown:
        wrong.append(f"words outside the vocabulary: {', '.join(unknown)}")
    elif text.strip() and not any(found.values()):
        wrong.append("no colour, shape or direction")
    if wrong:
        raise ValueError(f"{text!r} names {'; '.join(wrong)}")
    return Prompt(**{attr: words[0] if words else None for attr, words in found.items()})


def _word_vectors(text_dim: int) -> dict[str, torch.Tensor]:
    words = [*COLOURS, *SHAPES, *DIRECTIONS, "<colour?>", "<shape?>", "<direction?>"]
    table = torch.randn(len(words), text_dim, generator=torch.Generator().manual_seed(TEXT_SEED))
    return dict(zip(words, table))


def encode_prompts(prompts: list[Prompt], text_dim: int) -> torch.Tensor:
    """Text states ``[B, 3, text_dim]`` float32: one token per attribute (colour, shape, direction)."""
    vec = _word_vectors(text_dim)
    return torch.stack([torch.stack([vec[p.colour or "<colour?>"], vec[p.shape or "<shape?>"],
                                     vec[p.direction or "<direction?>"]]) for p in prompts])


def random_prompts(n: int, gen: torch.Generator, drop: float = 0.0) -> list[Prompt]:
    """``n`` prompts with every attribute drawn; each one left unnamed with probability ``drop``
    (so the model also learns unconditional and partial prompts: guidance needs them)."""
    picks = torch.rand(n, 6, generator=gen)
    out = []
    for row in picks.tolist():
        colour = list(COLOURS)[int(row[0] * len(COLOURS))]
        shape = SHAPES[int(row[1] * len(SHAPES))]
        direction = list(DIRECTIONS)[int(row[2] * len(DIRECTIONS))]
        out.append(Prompt(colour if row[3] >= drop else None, shape if row[4] >= drop else None,
                          direction if row[5] >= drop else None))
    return out


def _inside(shape: str, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Coverage (0/1) of a shape of size ``r`` centred at the origin, at offsets ``x, y``."""
    if shape == "circle":
        return (x * x + y * y <= r * r).float()
    if shape == "square":  # half-side 0.9 r: about the circle's area
        return ((x.abs() <= 0.9 * r) & (y.abs() <= 0.9 * r)).float()
    # triangle, apex up: from y = -r to y = 0.75 r, half-width growing to 1.15 r at the base
    t = (y + r) / (1.75 * r)
    return ((t >= 0) & (t <= 1) & (x.abs() <= 1.15 * r * t)).float()


def render_clips(prompts: list[Prompt], latent_frames: int, height: int, width: int, gen: torch.Generator,
                 supersample: int = 4) -> torch.Tensor:
    """Latents ``[B, 16, latent_frames, height // 8, width // 8]`` of one clip per prompt.

    Every attribute a prompt leaves unnamed is drawn from ``gen``. The path is fixed by the direction:
    along its lane (:data:`LANES`), from 0.2 to 0.8 of the frame (a small model learns a fixed path in
    minutes; a drawn start would need it to agree, over all tokens, on where the shape is). Pixels are rendered at
    the stand-in VAE's RGB resolution (a quarter of the video's), anti-aliased by ``supersample`` x
    ``supersample`` sampling.
    """
    h, w = height // 4, width // 4
    ys = (torch.arange(h * supersample) + 0.5) / supersample
    xs = (torch.arange(w * supersample) + 0.5) / supersample
    frames = torch.empty(len(prompts), latent_frames, 3, h, w)
    background = torch.tensor(BACKGROUND).view(3, 1, 1)
    for i, p in enumerate(prompts):
        colour = p.colour or list(COLOURS)[int(torch.randint(len(COLOURS), (1,), generator=gen))]
        shape = p.shape or SHAPES[int(torch.randint(len(SHAPES), (1,), generator=gen))]
        direction = p.direction or list(DIRECTIONS)[int(torch.randint(len(DIRECTIONS), (1,), generator=gen))]
        (dx, dy), lane = DIRECTIONS[direction], LANES[direction]
        fill = torch.tensor(COLOURS[colour]).view(3, 1, 1)
        for t in range(latent_frames):
            along = START + PATH_LENGTH * t / max(latent_frames - 1, 1)
            cx = (0.5 + dx * (along - 0.5) if dx else lane) * w
            cy = (0.5 + dy * (along - 0.5) if dy else lane) * h
            cover = _inside(shape, xs[None, :] - cx, ys[:, None] - cy, torch.tensor(RADIUS * min(h, w)))
            frames[i, t] = background + (fill - background) * torch.nn.functional.avg_pool2d(cover[None, None],
                                                                                             supersample)[0]
    return rgb_to_latents(frames * 2 - 1)

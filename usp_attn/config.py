"""Command-line arguments and the small config object they become."""

from __future__ import annotations

import argparse
import dataclasses

from usp_attn.arguments import check_positive_int
from usp_attn.backends.enum import AttentionBackendEnum, parse_attention_backend
from usp_attn.measured_choice import set_kernel_choice
from usp_attn.selector import set_cli_attention_backend, set_strict_backend

__all__ = ["AttentionConfig", "add_attention_args", "positive_int"]


def positive_int(text: str) -> int:
    """argparse ``type=``: an int >= 1."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _backend_arg(text: str) -> AttentionBackendEnum | None:
    try:
        return parse_attention_backend(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_attention_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--attention-backend``, ``--attention-strict``, ``--kernel-choice``, ``--kernel-cache``,
    ``--ulysses-degree`` and ``--ring-degree``.

    The backend name is validated while parsing, so a typo fails before any model code runs.
    """
    group = parser.add_argument_group("attention")
    group.add_argument(
        "--attention-backend",
        type=_backend_arg,
        default=None,
        metavar="NAME",
        help="local attention kernel: fa (fa3/fa4 are aliases), torch_sdpa, sage_attn, sage_attn_3, aiter, "
        "or auto (default)",
    )
    group.add_argument(
        "--attention-strict",
        action="store_true",
        help="fail instead of falling back when the requested backend cannot run",
    )
    group.add_argument(
        "--kernel-choice",
        choices=("measure", "static"),
        default=None,
        help="automatic selection on CUDA: time the exact kernels once per shape class and keep the fastest "
        "(measure, the default; env USP_ATTN_KERNEL_CHOICE), or use the static rule",
    )
    group.add_argument(
        "--kernel-cache",
        default=None,
        metavar="FILE",
        help="JSON file that keeps kernel measurements across runs (env USP_ATTN_KERNEL_CACHE)",
    )
    group.add_argument("--ulysses-degree", type=positive_int, default=1, help="Ulysses (all-to-all) degree")
    group.add_argument("--ring-degree", type=positive_int, default=1, help="ring (K/V passing) degree")
    return parser


@dataclasses.dataclass
class AttentionConfig:
    """Attention settings of one run.

    ``attention_backend`` may be given as an enum, a name or an alias; ``__post_init__``
    normalises it (``"FA3 "`` -> ``AttentionBackendEnum.FA``, ``"auto"`` -> ``None``) and
    checks the degrees, so an invalid config cannot be constructed.
    """

    attention_backend: AttentionBackendEnum | str | None = None
    ulysses_degree: int = 1
    ring_degree: int = 1
    strict: bool = False
    #: "measure" / "static" (None: the environment's USP_ATTN_KERNEL_CHOICE, default measure)
    kernel_choice: str | None = None
    kernel_cache: str | None = None

    def __post_init__(self) -> None:
        self.attention_backend = parse_attention_backend(self.attention_backend)
        if self.kernel_choice not in (None, "measure", "static"):
            raise ValueError(f"kernel_choice must be 'measure', 'static' or None, got {self.kernel_choice!r}")
        for name in ("ulysses_degree", "ring_degree"):
            check_positive_int(name, getattr(self, name))

    @property
    def sequence_parallel_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AttentionConfig":
        return cls(
            attention_backend=getattr(args, "attention_backend", None),
            ulysses_degree=getattr(args, "ulysses_degree", 1),
            ring_degree=getattr(args, "ring_degree", 1),
            strict=getattr(args, "attention_strict", False),
            kernel_choice=getattr(args, "kernel_choice", None),
            kernel_cache=getattr(args, "kernel_cache", None),
        )

    def apply(self) -> "AttentionConfig":
        """Make this the process's CLI-level backend request, strictness and kernel-choice mode."""
        set_cli_attention_backend(self.attention_backend)
        set_strict_backend(self.strict)
        set_kernel_choice(self.kernel_choice, self.kernel_cache)
        return self

"""The accuracy gate: a sparse pattern checked against dense attention before it is trusted.

A pattern tuned on one video can lose too much on another (a fast pan, a scene cut). With a gate,
the first call of each shape class (the layer's agreed call signature: shapes, dtypes, pattern,
text rows) also computes *dense* attention for a few sampled query rows, and compares the sparse
output of those rows with it::

    error = ||out_sparse[rows] - out_dense[rows]|| / ||out_dense[rows]||     (fp64 sums)

Under sequence parallelism every rank samples its own grid rows (its heads under Ulysses, its
segment under ring), and the two sums are added over the SP group by one all-reduce, so the error
is the group's and every rank reaches the same verdict. Above ``max_error`` the shape class runs
dense from then on (logged as a warning, with the error); at or below, sparse (logged at info).
Later calls of a judged class cost nothing more.

The sampled rows are evenly spaced over the rank's grid rows; text rows are dense anyway. Dense
attention of ``sample_rows`` rows costs about ``sample_rows / S`` of a dense call (under ring, one
more pass of the K/V around the ring), once per shape class and layer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers

import torch
import torch.distributed as dist

from usp_attn.logs import log_once

__all__ = ["AccuracyGate", "check_gate", "judge", "sample_rows"]

logger = logging.getLogger("usp_attn")


@dataclasses.dataclass(frozen=True)
class AccuracyGate:
    """Compare a sparse pattern with dense attention on the first call of each shape class.

    Args:
        max_error: the largest relative L2 error (sampled rows, whole group) at which the pattern is
            kept, a float in (0, inf); above it the shape class runs dense.
        sample_rows: query rows per rank compared (positive int; fewer if the rank has fewer).
    """

    max_error: float = 0.05
    sample_rows: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.max_error, bool) or not isinstance(self.max_error, numbers.Real) \
                or not 0 < float(self.max_error) < math.inf:
            raise ValueError(f"AccuracyGate: max_error must be a positive finite number, got {self.max_error!r}")
        if isinstance(self.sample_rows, bool) or not isinstance(self.sample_rows, numbers.Integral) \
                or self.sample_rows <= 0:
            raise ValueError(f"AccuracyGate: sample_rows must be a positive int, got {self.sample_rows!r}")
        object.__setattr__(self, "max_error", float(self.max_error))
        object.__setattr__(self, "sample_rows", int(self.sample_rows))


def check_gate(gate) -> AccuracyGate | None:
    """``sparse_gate=`` of a layer: an :class:`AccuracyGate`, a float (its ``max_error``) or None (no gate)."""
    if gate is None or isinstance(gate, AccuracyGate):
        return gate
    if isinstance(gate, numbers.Real) and not isinstance(gate, bool):
        return AccuracyGate(max_error=float(gate))
    raise TypeError(f"sparse_gate must be a usp_attn.sparse.AccuracyGate, a max error (float) or None, "
                    f"got {type(gate).__name__}")


def sample_rows(first: int, count: int, gate: AccuracyGate, device) -> torch.Tensor:
    """int64 indices of up to ``gate.sample_rows`` rows evenly spaced over ``[first, first + count)``."""
    n = min(count, gate.sample_rows)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return first + (torch.arange(n, device=device, dtype=torch.int64) * count) // n


def judge(gate: AccuracyGate, sparse_rows: torch.Tensor, dense_rows: torch.Tensor, group, what: str) -> bool:
    """The gate's verdict (True = keep the pattern) for sampled rows ``[B, n, h, D]`` of both outputs; the
    error is summed over ``group`` (None: this process alone), so every rank of it returns the same."""
    sparse_rows, dense_rows = sparse_rows.detach().double(), dense_rows.detach().double()  # a verdict, no gradient
    sums = torch.stack([(sparse_rows - dense_rows).pow(2).sum(), dense_rows.pow(2).sum()])
    if group is not None:
        dist.all_reduce(sums, group=group)
    num, den = sums.tolist()  # one host read, once per shape class
    error = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    keep = error <= gate.max_error
    if keep:
        log_once(logging.INFO, f"usp_attn: accuracy gate: {what}: relative error {error:.3g} <= {gate.max_error:g} "
                               "on sampled rows; the pattern is kept for this shape class")
    else:
        log_once(logging.WARNING, f"usp_attn: accuracy gate: {what}: relative error {error:.3g} > "
                                  f"{gate.max_error:g} on sampled rows; this shape class runs dense")
    return keep

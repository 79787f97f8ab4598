"""Cross-rank argument checks, so ranks that disagree get an error instead of a hang.

A sequence-parallel forward runs different collectives depending on its arguments
(mask present or not, replicated-token counts, shapes). If ranks disagree, they
enter different collectives and block until the timeout. With validation on, every
rank first shares a small summary of its arguments (and any local argument error)
through one ``all_gather_object``; if anything differs, every rank raises the same
``ValueError`` naming the ranks and values.
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["check_consistent"]


def check_consistent(group, what: str, summary: dict, local_error: str | None = None) -> None:
    """Raise ``ValueError`` on every rank of ``group`` if any rank had an error or the summaries differ.

    Args:
        group: the process group whose ranks must agree.
        what: name of the operation, for the message.
        summary: this rank's values that must be equal on every rank (picklable).
        local_error: this rank's argument error, if any (raised on every rank).
    """
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (summary, local_error), group=group)
    errors = [(rank, err) for rank, (_, err) in enumerate(gathered) if err]
    if errors:
        listed = "; ".join(f"rank {rank}: {err}" for rank, err in errors)
        raise ValueError(f"{what}: invalid arguments on {len(errors)} rank(s): {listed}")
    first = gathered[0][0]
    for key in first:
        values = [s.get(key) for s, _ in gathered]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise ValueError(f"{what}: ranks disagree on {key} ({per_rank}); every rank must pass the same value")

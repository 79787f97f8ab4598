"""Markdown tables and the PNG plot of benchmark results."""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["markdown_table", "fmt", "write_plot", "MATPLOTLIB_MISSING"]

MATPLOTLIB_MISSING = (
    "matplotlib is not installed, so no plot was written; install it with "
    "`pip install matplotlib` (or the `bench` extra: pip install -e '.[bench]')"
)


def fmt(value, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` significant digits, NaN/None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells go through :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [fmt(c) for c in row]
        cells += [""] * (len(headers) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(path: str, groups: dict[str, list[tuple[str, float]]], *, title: str, xlabel: str = "TFLOP/s") -> None:
    """Horizontal bar chart, one panel per group (e.g. per shape): ``{group: [(label, value), ...]}``.

    Rows without a value (NaN) are left out. Raises ``ImportError`` (message
    :data:`MATPLOTLIB_MISSING`) when matplotlib is missing.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(MATPLOTLIB_MISSING) from exc
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels = {g: [(lbl, v) for lbl, v in rows if v is not None and not math.isnan(v)] for g, rows in groups.items()}
    panels = {g: rows for g, rows in panels.items() if rows} or {"no results": []}
    heights = [max(1.2, 0.35 * len(rows) + 0.8) for rows in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (group, rows) in zip(axes[:, 0], panels.items()):
        labels = [lbl for lbl, _ in rows]
        values = [v for _, v in rows]
        bars = ax.barh(range(len(rows)), values, color="tab:blue")
        ax.set_yticks(range(len(rows)), labels)
        ax.invert_yaxis()
        ax.set_title(group, fontsize=10)
        ax.set_xlabel(xlabel)
        for bar, value in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.3g}", va="center", fontsize=8)
        if values:
            ax.set_xlim(0, max(values) * 1.15)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

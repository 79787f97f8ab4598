"""The suite's one reporter: markdown tables, JSON, and a PNG of the timed rows.

A result (what benchmarks/run.py writes) is ``{"title", "command", "env", "world", "dry_run",
"parts": {name: {"rows": [...], "seconds", "error"?}}}``. Several results (the steps of
launch/multigpu_check.sh) merge into one report:

    python benchmarks/report.py WORK_DIR/*.json --steps WORK_DIR/steps.tsv --logs 'WORK_DIR/generate_*.log' \\
        --markdown summary.md --json results.json --plot summary.png

No torch needed here.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import pathlib
import re
import sys

__all__ = ["markdown_table", "rows_table", "part_section", "headline_table", "render", "write", "failures", "merge"]

MATPLOTLIB_MISSING = "matplotlib is not installed, so no plot was written (pip install -e '.[bench]')"
#: column labels of the common row keys (benchmarks/suite.py); other keys are shown as they are
LABELS = {"what": "what", "shape": "shape (B,H,S,D)", "ms": "median ms", "tflops": "TFLOP/s", "rel_err": "rel err",
          "lse_err": "LSE max abs err", "host_us": "host µs/call", "MiB_sent": "MiB sent per rank"}
HEADLINE = ["metric", "what", "shape", "layout", "gpus", "value", "target", "status", "note"]


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
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers, rows) -> str:
    """A GitHub markdown table; cells go through :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [fmt(c) for c in row] + [""] * (len(headers) - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_table(rows: list[dict], keys: list[str] | None = None) -> str:
    """Rows as a table: the keys in order of first appearance, ``note`` last."""
    if keys is None:
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "note"))
        keys += ["note"] if any("note" in r for r in rows) else []
    return markdown_table([LABELS.get(k, k) for k in keys], [[r.get(k) for k in keys] for r in rows])


def part_section(name: str, entry: dict) -> str:
    rows = [r for r in entry["rows"] if "metric" not in r]
    text = f"## {name}\n\n" + (rows_table(rows) if rows else "no rows")
    if entry.get("error"):
        text += f"\n\nERROR: {entry['error']}"
    return text + f"\n\n({entry.get('seconds', 0):.1f} s)"


def headline_table(result: dict) -> str:
    rows = [r for e in result["parts"].values() for r in e["rows"] if "metric" in r]
    return "## headline\n\n" + (rows_table(rows, [k for k in HEADLINE if any(k in r for r in rows)]) if rows
                                else "no headline rows")


def render(result: dict) -> str:
    env = ", ".join(f"{k} {v}" for k, v in result.get("env", {}).items() if v is not None)
    parts = [part_section(name, entry) for name, entry in result["parts"].items()]
    return "\n\n".join([f"# {result['title']}", env, f"`{result.get('command', '')}`", headline_table(result),
                        *parts]) + "\n"


def failures(result: dict) -> list[str]:
    """Parts that failed (raised); a skipped part or one not in this checkout is no failure."""
    return [f"{n}: {e['error']}" for n, e in result["parts"].items() if e.get("error") and not
            str(e["error"]).startswith(("skipped", "not in this checkout"))]


def write_plot(path: str, result: dict) -> None:
    """Bars of TFLOP/s (or ms where a row has none), one panel per part and shape. Raises ImportError
    (:data:`MATPLOTLIB_MISSING`) without matplotlib."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(MATPLOTLIB_MISSING) from exc
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels: dict[str, list] = {}
    for name, entry in result["parts"].items():
        for r in entry["rows"]:
            key = "tflops" if r.get("tflops") else "ms" if r.get("ms") else None
            if key and "metric" not in r:
                label = r["what"] + (f" {r['layout']}" if r.get("layout") else "")
                where = r.get("shape") or r.get("model") or ""
                panels.setdefault(f"{name} {where} ({LABELS[key]})", []).append((label[:60], r[key]))
    panels = panels or {"no timed rows": []}
    heights = [max(1.2, 0.3 * len(rows) + 0.8) for rows in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (panel, rows) in zip(axes[:, 0], panels.items()):
        bars = ax.barh(range(len(rows)), [v for _, v in rows], color="tab:blue")
        ax.set_yticks(range(len(rows)), [lbl for lbl, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(panel, fontsize=9)
        for bar, (_, v) in zip(bars, rows):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.3g}", va="center", fontsize=7)
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, *, out_dir=None, json_path=None, markdown_path=None, plot_path=None, plot=True) -> None:
    """Write what was asked: ``out_dir`` gets report.md, results.json and (``plot``) report.png."""
    if out_dir:
        pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
        json_path = json_path or f"{out_dir}/results.json"
        markdown_path = markdown_path or f"{out_dir}/report.md"
        plot_path = plot_path or f"{out_dir}/report.png"
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(result, indent=1, default=str))
    if markdown_path:
        pathlib.Path(markdown_path).write_text(render(result))
    if plot and plot_path:
        try:
            write_plot(plot_path, result)
        except ImportError:
            print(f"report: {plot_path}: {MATPLOTLIB_MISSING}", file=sys.stderr)


# ---- several results: the pieces of launch/multigpu_check.sh ---------------------------------------
def steps_rows(path: str) -> list[dict]:
    """``name<TAB>exit<TAB>seconds<TAB>limit`` lines -> rows (exit -1: skipped for lack of time)."""
    rows = []
    for name, rc, secs, limit in (line.split("\t") for line in pathlib.Path(path).read_text().splitlines()):
        rc = int(rc)
        result = {0: "ok", -1: "skipped: no time left", 124: "TIMED OUT", 137: "TIMED OUT"}.get(rc, f"FAILED (exit {rc})")
        rows.append({"what": name, "exit": rc, "seconds": float(secs), "limit_s": int(limit), "result": result})
    return rows


def generate_rows(paths: list[str]) -> list[dict]:
    """The summary table of each ``generate_UxR_DTYPE.log`` of launch/generate.py --verify."""
    rows = []
    for path in sorted(paths):
        m = re.match(r"generate_(\d+x\d+)_(\w+)\.log", pathlib.Path(path).name)
        text = pathlib.Path(path).read_text(errors="replace") if m else ""
        cell = {k: v for k, v in re.findall(r"^\| (.+?)\s+\| (.*?)\s*\|\s*$", text, re.M)}
        if m:
            verdict = cell.get("verify", "-")
            rows.append({"what": "generate.py --verify", "layout": m.group(1), "dtype": m.group(2),
                         "backend": cell.get("attention backend"), "time per step": cell.get("time per step"),
                         "final latents": cell.get("verify: final latents"),
                         "result": "PASS" if verdict.startswith("PASS") else f"FAIL ({verdict})"})
    return rows


def merge(paths: list[str]) -> dict:
    """Several results as one: parts in file order; a part name seen twice gets the world size added."""
    merged = {"title": "usp_attn benchmarks", "command": "", "env": {}, "world": 0, "dry_run": False, "parts": {}}
    for path in paths:
        try:
            res = json.loads(pathlib.Path(path).read_text())
        except (OSError, ValueError) as exc:
            merged["parts"][pathlib.Path(path).stem] = {"rows": [], "error": f"unreadable result {path}: {exc}"}
            continue
        if res.get("world", 0) >= merged["world"]:
            merged.update(title=res["title"], env=res["env"], world=res["world"], command=res["command"])
        merged["dry_run"] |= res.get("dry_run", False)
        for name, entry in res["parts"].items():
            merged["parts"][name if name not in merged["parts"] else f"{name} ({res['world']} ranks)"] = entry
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Merge benchmarks/run.py results into one report.")
    p.add_argument("results", nargs="*", help="JSON files written by benchmarks/run.py --json")
    p.add_argument("--steps", help="steps.tsv of launch/multigpu_check.sh")
    p.add_argument("--logs", help="glob of launch/generate.py logs named generate_UxR_DTYPE.log")
    p.add_argument("--markdown")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    result = merge(args.results)
    extra = {}
    if args.steps and pathlib.Path(args.steps).exists():
        extra["steps"] = {"rows": steps_rows(args.steps)}
    if args.logs:
        extra["main job"] = {"rows": generate_rows(glob.glob(args.logs))}
    result["parts"] = {**extra, **result["parts"]}
    write(result, json_path=args.json, markdown_path=args.markdown, plot_path=args.plot, plot=bool(args.plot))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

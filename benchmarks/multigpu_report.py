"""Issue 6's report: the pieces launch/multigpu_check.sh collected, as markdown tables (no torch needed).

    python benchmarks/multigpu_report.py WORK_DIR --markdown summary.md --json results.json

Reads from WORK_DIR whatever exists: ``steps.tsv`` (name, exit status, seconds, limit per
step), ``nccl_layouts.json``, ``generate_*.log``, ``scaling_k*.json`` and ``comm.json``.
A missing piece is reported as missing, never invented.

P4: speedup = time on 1 GPU / time on k GPUs, efficiency = speedup / k. The 1-GPU time is
the k = 1 run's (attention: ``USPAttention`` 1x1, else ``LocalAttention``; DiT: the step
without sequence parallelism). "best UxR" is the fastest layout with U > 1 and R > 1.
P5: ratio = peer time / usp_attn time on the same GPUs, layout and inputs (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.report import markdown_table  # noqa: E402

P4_TARGET = 0.90  # Ulysses-8 attention efficiency
P5_TARGET = 1.1  # peer time / ours


def load_json(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def layout_kind(layout: str, k: int) -> str:
    u, r = (int(x) for x in layout.split("x"))
    if k == 1:
        return "1 GPU"
    if r == 1:
        return f"Ulysses-{k}"
    if u == 1:
        return f"ring-{k}"
    return "U x R"


def ms(seconds):
    return None if seconds is None else seconds * 1e3


# ---- pieces ------------------------------------------------------------------------------------
def steps_section(work: str) -> tuple[str, list[dict]]:
    steps = []
    path = os.path.join(work, "steps.tsv")
    if os.path.exists(path):
        for line in open(path):
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 4:
                name, rc, secs, limit = parts
                rc = int(rc)
                status = "ok" if rc == 0 else ("TIMED OUT" if rc in (124, 137) else f"FAILED (exit {rc})")
                if rc == -1:
                    status = "skipped: no time left"
                steps.append({"step": name, "exit": rc, "seconds": float(secs), "limit_s": int(limit),
                              "status": status})
    table = markdown_table(["step", "exit", "seconds", "limit s", "status"],
                           [[s["step"], s["exit"], s["seconds"], s["limit_s"], s["status"]] for s in steps])
    return table, steps


def nccl_section(work: str) -> tuple[str, dict | None]:
    data = load_json(os.path.join(work, "nccl_layouts.json"))
    if data is None:
        return "no result (nccl_layouts.json missing: see the step table and the log)", None
    rows = {}
    for res in data["results"]:
        key = (res["world"], res["layout"])
        row = rows.setdefault(key, {"passed": 0, "total": 0, "worst": 0.0, "case": "-", "fail": []})
        row["total"] += 1
        row["passed"] += bool(res["passed"])
        ratio = res["error"] / res["tol"] if res["tol"] else 0.0
        if ratio >= row["worst"]:
            row["worst"], row["case"] = ratio, res["case"]
        if not res["passed"]:
            row["fail"].append(f"{res['case']} ({'; '.join(res['problems'][:2])})")
    table = markdown_table(["SP group size", "layout UxR", "passed", "worst error / tol", "worst case", "status"],
                           [[w, lay, f"{r['passed']}/{r['total']}", r["worst"], r["case"],
                             "PASS" if not r["fail"] else "FAIL: " + "; ".join(r["fail"])]
                            for (w, lay), r in rows.items()])
    head = f"{data['ranks']} ranks, {data['backend']}: {data['passed']}/{data['total']} cases passed"
    return f"{head}\n\n{table}", {"ranks": data["ranks"], "passed": data["passed"], "total": data["total"]}


def generate_section(work: str, steps: list[dict]) -> tuple[str, list[dict]]:
    rows = []
    for path in sorted(glob.glob(os.path.join(work, "generate_*.log"))):
        m = re.match(r"generate_(\d+)x(\d+)_(\w+)\.log", os.path.basename(path))
        if not m:
            continue
        text = open(path, errors="replace").read()
        name = f"generate {m.group(1)}x{m.group(2)} {m.group(3)}"
        step = next((s for s in steps if s["step"] == name), None)

        def cell(label):
            hit = re.search(rf"^\| {re.escape(label)}\s+\| (.*?)\s*\|\s*$", text, re.M)
            return hit.group(1) if hit else "-"

        rows.append({"layout": f"{m.group(1)}x{m.group(2)}", "dtype": m.group(3),
                     "exit": step["exit"] if step else None, "backend": cell("attention backend"),
                     "time per step": cell("time per step"), "verify": cell("verify"),
                     "final latents": cell("verify: final latents")})
    table = markdown_table(["layout UxR", "dtype", "exit", "backend", "time per step", "verify", "final latents"],
                           [[r["layout"], r["dtype"], r["exit"], r["backend"], r["time per step"], r["verify"],
                             r["final latents"]] for r in rows])
    return table, rows


def scaling_runs(work: str) -> dict[int, dict]:
    runs = {}
    for path in glob.glob(os.path.join(work, "scaling_k*.json")):
        data = load_json(path)
        if data is not None:
            runs[int(data["k"])] = data
    return dict(sorted(runs.items()))


def section_rows(run: dict, name: str) -> list[dict]:
    return run.get("sections", {}).get(name, {}).get("rows", [])


def one_gpu_time(runs: dict, section: str) -> tuple[float | None, str]:
    base = runs.get(1)
    if base is None:
        return None, "no 1-GPU run"
    rows = section_rows(base, section)
    wanted = {"attention": ["USPAttention", "LocalAttention[auto]"], "dit": ["TinyWanDiT step, no SP"],
              "wan": ["WanTransformer3DModel, no SP"]}[section]
    for impl in wanted:
        for r in rows:
            if r["impl"] == impl and r["seconds"]:
                return r["seconds"], f"{impl} on 1 GPU"
    return None, "the 1-GPU run has no time for it"


def p4_section(runs: dict, section: str, impl_prefix: str) -> tuple[str, list[dict], str]:
    t1, basis = one_gpu_time(runs, section)
    out = []
    for k, run in runs.items():
        if k == 1:
            continue
        ours = [r for r in section_rows(run, section) if r["impl"].startswith(impl_prefix) and r["layout"] != "none"
                and "x" in r["layout"] and not r.get("peer")]
        timed = [r for r in ours if r["seconds"]]
        mixed = [r for r in timed if layout_kind(r["layout"], k) == "U x R"]
        best_mixed = min(mixed, key=lambda r: r["seconds"])["layout"] if mixed else None
        for r in ours:
            speedup = t1 / r["seconds"] if (t1 and r["seconds"]) else None
            kind = layout_kind(r["layout"], k)
            out.append({"k": k, "layout": r["layout"], "kind": kind + (" (best)" if r["layout"] == best_mixed else ""),
                        "ms": ms(r["seconds"]), "speedup": speedup, "efficiency": speedup / k if speedup else None,
                        "rel_err": r["rel_err"], "note": r["note"]})
    if t1:
        out.insert(0, {"k": 1, "layout": "1x1", "kind": "1 GPU", "ms": ms(t1), "speedup": 1.0, "efficiency": 1.0,
                       "rel_err": None, "note": basis})
    table = markdown_table(["GPUs", "layout UxR", "kind", "median ms", "speedup", "efficiency", "rel err", "note"],
                           [[r["k"], r["layout"], r["kind"], r["ms"], r["speedup"], r["efficiency"], r["rel_err"],
                             r["note"]] for r in out])
    return table, out, basis


def p4_target(rows: list[dict]) -> str:
    hit = next((r for r in rows if r["k"] == 8 and r["kind"].startswith("Ulysses-8")), None)
    if hit is None or hit["efficiency"] is None:
        return f"Target (Ulysses-8 attention efficiency >= {P4_TARGET}): not measured in this run."
    verdict = "met" if hit["efficiency"] >= P4_TARGET else "NOT met"
    return f"Target (Ulysses-8 attention efficiency >= {P4_TARGET}): {hit['efficiency']:.3f}, {verdict}."


def p5_section(runs: dict, section: str, ours_prefix: str) -> tuple[str, list[dict]]:
    out = []
    for k, run in runs.items():
        rows = section_rows(run, section)
        for ours in (r for r in rows if r["impl"].startswith(ours_prefix) and not r.get("peer")):
            for peer in (r for r in rows if r.get("peer") and r["layout"] == ours["layout"]):
                ratio = peer["seconds"] / ours["seconds"] if (peer["seconds"] and ours["seconds"]) else None
                status = ("-" if ratio is None else ("met" if ratio >= P5_TARGET else "NOT met"))
                out.append({"k": k, "layout": ours["layout"], "peer": peer["impl"], "ours_ms": ms(ours["seconds"]),
                            "peer_ms": ms(peer["seconds"]), "ratio": ratio, "ours_rel_err": ours["rel_err"],
                            "peer_rel_err": peer["rel_err"], "status": status,
                            "note": peer["note"] if not peer["seconds"] else ""})
    table = markdown_table(["GPUs", "layout UxR", "peer", "usp_attn ms", "peer ms", "peer / ours", "rel err ours",
                            "rel err peer", f"target >= {P5_TARGET}", "why not run"],
                           [[r["k"], r["layout"], r["peer"], r["ours_ms"], r["peer_ms"], r["ratio"], r["ours_rel_err"],
                             r["peer_rel_err"], r["status"], r["note"]] for r in out])
    return table, out


def comm_section(work: str) -> tuple[str, dict | None]:
    data = load_json(os.path.join(work, "comm.json"))
    if data is None:
        return "no result (comm.json missing: see the step table and the log)", None
    table = markdown_table(
        ["pattern", "group size d", "MiB sent per rank", "median ms", "GB/s per rank", "of probe", "of link", "note"],
        [[r["pattern"], r["d"], r["bytes"] / 2**20, ms(r["seconds"]), r.get("gbps"), r.get("of_probe"),
          r.get("of_link"), r["note"]] for r in data["rows"]])
    return f"{data['title']}\n\n{table}", data


def titles(runs: dict) -> dict:
    """Section titles from the sizes the runs used (the GPU sizes unless it was a dry run)."""
    cfg = next((r["config"] for r in runs.values() if r.get("config")), None)
    if cfg is None:
        return {"attention": "attention layer", "dit": "built-in video DiT step", "wan": "diffusers Wan transformer"}
    b, h, s, d = cfg["attn_shape"]
    frames, height, width = cfg["video"]
    dit, wan = cfg["dit"], cfg["wan_shape"]
    video = f"{frames} frames of {height}x{width}"
    return {
        "attention": f"attention layer (B={b}, H={h}, S={s}, D={d}, {cfg['dtype']})",
        "dit": f"built-in video DiT step ({dit['num_layers']} blocks, hidden {dit['hidden_size']} = {dit['num_heads']} "
               f"heads, FFN {dit['ffn_size']}, {video}, batch 2, {cfg['dtype']})",
        "wan": f"diffusers WanTransformer3DModel ({cfg['wan_layers']} blocks, {wan['num_attention_heads']} heads of "
               f"{wan['attention_head_dim']}, FFN {wan['ffn_dim']}, {video}, batch 1, {cfg['dtype']})",
    }


def env_lines(runs: dict) -> list[str]:
    env = next((r["env"] for r in reversed(list(runs.values())) if r.get("env")), None)
    if not env:
        return ["environment: no scaling run finished (see env.txt)"]
    return [", ".join(f"{k} {v}" for k, v in env.items() if v is not None)]


# ---- assemble ----------------------------------------------------------------------------------
def build(work: str) -> tuple[str, dict]:
    steps_table, steps = steps_section(work)
    runs = scaling_runs(work)
    nccl_text, nccl = nccl_section(work)
    gen_table, gen = generate_section(work, steps)
    attn_table, attn_rows, attn_basis = p4_section(runs, "attention", "USPAttention")
    dit_table, dit_rows, _ = p4_section(runs, "dit", "TinyWanDiT step")
    p5_attn_table, p5_attn = p5_section(runs, "attention", "USPAttention")
    p5_wan_table, p5_wan = p5_section(runs, "wan", "usp_attn enable_sequence_parallel")
    wan_table, wan_rows, _ = p4_section(runs, "wan", "usp_attn")
    comm_text, comm = comm_section(work)
    dry = any(r.get("dry_run") for r in runs.values())
    title = titles(runs)
    parts = [
        "# Issue 6: multi-GPU check" + (" (CPU DRY RUN: toy sizes, gloo; the numbers mean nothing)" if dry else ""),
        *env_lines(runs),
        "## Steps", steps_table,
        "## NCCL layout tests (tests/distributed/sp_cases.py scenarios on the devices)", nccl_text,
        "## launch/generate.py --verify", gen_table or "no runs",
        f"## P4: {title['attention']}", attn_table, p4_target(attn_rows),
        f"## P4: {title['dit']}", dit_table,
        f"## P5: {title['attention']} vs peers (same shards, layout and GPUs)", p5_attn_table,
        f"## P5: {title['wan']}: usp_attn vs diffusers context parallel", p5_wan_table,
        "Scaling of usp_attn on the same Wan transformer:", wan_table,
        "## Communication", comm_text,
    ]
    data = {"steps": steps, "nccl": nccl, "generate": gen, "p4_attention": attn_rows, "p4_attention_basis": attn_basis,
            "p4_dit": dit_rows, "p5_attention": p5_attn, "p5_wan": p5_wan, "wan_scaling": wan_rows, "comm": comm,
            "scaling_runs": runs}
    return "\n\n".join(parts) + "\n", data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", help="folder the check script wrote its pieces to")
    parser.add_argument("--markdown", help="write the summary here")
    parser.add_argument("--json", help="write everything (all rows of every piece) here")
    args = parser.parse_args(argv)
    text, data = build(args.work)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(text)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

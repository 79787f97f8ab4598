"""The benchmark harness on CPU: launch/bench.py writes its table, JSON and plot (single process
and under torchrun), rejects bad arguments clearly, and gpu_issue5.py's CPU dry run passes.

These tests check what the scripts produce, never how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import struct
import subprocess
import sys

import pytest

from benchmarks.report import MATPLOTLIB_MISSING, markdown_table
from benchmarks.timing import attention_flops

REPO = pathlib.Path(__file__).resolve().parents[2]
BENCH = REPO / "launch" / "bench.py"
HEADER = "| shape (B,H,S,D) | implementation | layout UxR | backend | median ms |"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args, *, timeout=240):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def table_rows(text: str) -> list[list[str]]:
    """Data rows of the markdown table in ``text``, split into cells."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith(HEADER)]
    return [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in lines]


def test_flops_count():
    assert attention_flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    assert attention_flops(1, 1, 8, 8, 4, causal=True) == attention_flops(1, 1, 8, 8, 4) / 2


def test_markdown_table_formats_cells():
    text = markdown_table(["a", "b", "c"], [[1.23456, None, "x|y"], [float("nan"), 1e-6, True]])
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1.23 | - | x\\|y |", "| - | 1.00e-06 | yes |"]


def test_single_process_writes_table_json_and_plot(tmp_path):
    md, png, js = tmp_path / "t.md", tmp_path / "t.png", tmp_path / "t.json"
    res = run([str(BENCH), "--shape", "1,2,64,16", "--shape", "1,1,40,8", "--reps", "2", "--warmup", "1",
               "--markdown", str(md), "--plot", str(png), "--json", str(js)])
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(HEADER) == 1
    rows = table_rows(res.stdout)
    assert len(rows) == 2 * 6  # two shapes x (auto + five backends)
    by_key = {(r[0], r[1]): r for r in rows}
    for shape in ("1,2,64,16", "1,1,40,8"):
        sdpa = by_key[(shape, "LocalAttention[torch_sdpa]")]
        assert sdpa[3] == "torch_sdpa" and float(sdpa[4]) > 0 and float(sdpa[5]) > 0
        assert by_key[(shape, "LocalAttention[auto]")][3] == "torch_sdpa"
        assert by_key[(shape, "LocalAttention[fa]")][9].startswith("skipped: fa needs")
        ratios = [float(r[7]) for r in rows if r[0] == shape and r[7] != "-"]
        assert max(ratios) == 1.0 and len(ratios) == 2  # the fastest local row is the 1.0 reference
    assert md.read_text().strip().endswith(res.stdout.strip().splitlines()[-1])
    assert HEADER in md.read_text()
    data = json.loads(js.read_text())
    assert len(data["rows"]) == 12 and all("tflops" in r for r in data["rows"])
    if importlib.util.find_spec("matplotlib") is None:
        assert MATPLOTLIB_MISSING in res.stderr and not png.exists()
    else:
        blob = png.read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR"
        width, height = struct.unpack(">II", blob[16:24])
        assert width > 300 and height > 200


def test_torchrun_layouts_time_usp_attention(tmp_path):
    md = tmp_path / "t.md"
    res = run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(BENCH),
               "--shape", "1,2,64,16", "--layouts", "2x1,1x2", "--backends", "auto,torch_sdpa", "--peers", "none",
               "--reps", "2", "--warmup", "1", "--markdown", str(md)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(HEADER) == 1  # rank 0 prints, once
    rows = {(r[1], r[2]): r for r in table_rows(md.read_text())}
    for layout in ("2x1", "1x2"):
        row = rows[("USPAttention", layout)]
        assert row[3] == "torch_sdpa" and float(row[4]) > 0
        assert float(row[8]) < 1e-5  # fp32: gathered output vs the local result
    assert "2 rank(s)" in res.stdout


@pytest.mark.parametrize("argv, message", [
    (["--shape", "1,2,3"], "--shape must be four positive integers"),
    (["--shape", "1,2,0,4"], "--shape must be four positive integers"),
    (["--layouts", "2x1"], "U*R = 2 must equal the world size 1; run under torchrun"),
    (["--layouts", "2by1"], "--layouts takes UxR items"),
    (["--backends", "auto,flash"], "--backends: unknown ['flash']"),
    (["--reps", "0"], "--reps must be >= 1"),
])
def test_bad_arguments_fail_clearly(capsys, argv, message):
    bench = load_bench()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_issue5_cpu_dry_run(tmp_path):
    """The single-GPU script's code paths at toy sizes on CPU: every section runs, all checks pass."""
    res = run([str(REPO / "benchmarks" / "gpu_issue5.py"), "--cpu-smoke", "--out", str(tmp_path)], timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ERROR in" not in res.stdout, res.stdout[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"env", "ceilings", "correctness", "syncs", "p2", "p1", "p3", "compile"}
    assert not [name for name, r in results.items() if "error" in r]
    summary = results["correctness"]["summary"][0]
    assert summary["failed"] == [] and summary["passed"] >= 10
    assert all("FAIL" not in row and "ERROR" not in row for row in re.findall(r"^\|.*\|$", res.stdout, re.M)
               if "meta tensors" in row)
    assert [r["status"] for r in results["compile"]["data"]] == ["ok", "ok"]

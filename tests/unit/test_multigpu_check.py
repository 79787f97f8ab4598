"""launch/multigpu_check.sh (issue 6) before any multi-GPU machine: its CPU dry run runs every step
with gloo at toy sizes and passes, so the first GPU call cannot fail on a typo; plus the pieces
of logic the dry run cannot judge (the NCCL test verdicts, the P4/P5 arithmetic of the report).

These tests check what the scripts produce, never how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks import multigpu_report
from benchmarks.nccl_layouts import judge

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "multigpu_check.sh"
HAVE_TORCHRUN = importlib.util.find_spec("torch.distributed.run") is not None


def _script(*args, out, timeout):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def _table(text: str, heading: str) -> list[list[str]]:
    """Data rows of the first markdown table after the line starting with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            if not line.startswith("|---"):
                rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif seen:
            break
    return rows[1:]  # without the header row


def _ran_or_said_why(p5_row: list[str]) -> bool:
    """A P5 row: the peer was timed and matches the one-device result, or the last cell says why not."""
    if p5_row[4] != "-":
        return float(p5_row[4]) > 0 and float(p5_row[7]) < 1e-5
    return p5_row[9].startswith(("skipped: ", "error: ")) and len(p5_row[9]) > 20


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TORCHRUN, reason="torch.distributed.run (torchrun) is not available")
def test_cpu_dry_run_runs_every_step(tmp_path):
    proc = _script("--cpu-dry-run", "4", out=tmp_path, timeout=280)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert {p.name for p in tmp_path.iterdir()} == {"multigpu.log", "env.txt", "summary.md", "results.json"}
    env = (tmp_path / "env.txt").read_text()
    assert "NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1" in env
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# Issue 6: multi-GPU check (CPU DRY RUN")

    steps = {row[0]: row for row in _table(summary, "## Steps")}
    assert list(steps) == ["environment", "nccl layouts", "scaling k=1", "scaling k=4", "communication",
                           "generate 4x1 bf16", "generate 1x4 fp32"]
    assert all(row[1] == "0" and row[4] == "ok" for row in steps.values()), steps

    nccl = _table(summary, "## NCCL layout tests")
    assert [(r[0], r[1]) for r in nccl] == [("1", "1x1"), ("2", "1x2"), ("2", "2x1"), ("4", "1x4"), ("4", "2x2"),
                                            ("4", "4x1")]
    assert all(r[2] == "16/16" and r[5] == "PASS" for r in nccl), nccl

    gen = _table(summary, "## launch/generate.py --verify")
    assert [(r[0], r[1], r[2]) for r in gen] == [("1x4", "fp32", "0"), ("4x1", "bf16", "0")]
    assert all(r[5].startswith("PASS") for r in gen), gen

    # P4: the 1-GPU run is the baseline; every layout of 4 ranks ran and matches the one-device result.
    attn = _table(summary, "## P4: attention layer")
    assert [(r[0], r[1], r[2]) for r in attn] == [("1", "1x1", "1 GPU"), ("4", "4x1", "Ulysses-4"),
                                                  ("4", "2x2", "U x R (best)"), ("4", "1x4", "ring-4")]
    for r in attn[1:]:
        assert float(r[3]) > 0 and float(r[4]) > 0 and abs(float(r[5]) - float(r[4]) / 4) < 0.01
        assert float(r[6]) < 1e-5  # fp32 rel err vs LocalAttention over the whole sequence
    dit = _table(summary, "## P4: built-in video DiT step")
    assert [r[1] for r in dit] == ["1x1", "4x1", "2x2", "1x4"] and all(float(r[6]) < 1e-5 for r in dit[1:])

    # P5: every peer row either ran and matches, or says why it did not run. On CPU diffusers'
    # Ulysses attention runs; its ring (no LSE from its CPU backend) and yunchang's ring cannot.
    p5 = _table(summary, "## P5: attention layer")
    by = {(r[1], r[2].split()[0]): r for r in p5}
    assert len(by) == 2 + 2 * 3, p5  # 2 peers x (1x1 on one rank; 4x1, 2x2, 1x4 on four)
    assert all(_ran_or_said_why(r) for r in p5), p5
    assert float(by[("4x1", "diffusers")][4]) > 0 and float(by[("4x1", "diffusers")][7]) < 1e-5
    if importlib.util.find_spec("yunchang") is not None or list(REPO.glob(".whl/yunchang-*.whl")):
        assert "all-zero log-sum-exp" in by[("1x4", "yunchang")][9]
    else:
        assert "yunchang is not installed" in by[("1x4", "yunchang")][9]
    wan = _table(summary, "## P5: diffusers WanTransformer3DModel")
    assert [r[1] for r in wan] == ["4x1", "2x2", "1x4"]
    assert all(float(r[3]) > 0 and float(r[6]) < 1e-5 and _ran_or_said_why(r) for r in wan), wan

    comm = _table(summary, "## Communication")
    patterns = {(r[0], r[1]) for r in comm}
    for d in ("2", "4"):
        for pattern in ("probe all_to_all", "probe p2p ring", "ulysses q,k,v all-to-all", "ulysses output all-to-all",
                        "ring hop (K and V)"):
            assert (pattern, d) in patterns
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in comm)

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["nccl"] == {"ranks": 4, "passed": 96, "total": 96}
    assert sorted(int(k) for k in data["scaling_runs"]) == [1, 4]


def test_bad_arguments_fail_before_any_work(tmp_path):
    for args, needle in ((["--cpu-dry-run", "0"], "N must be a positive number"),
                         (["--cpu-dry-run", "two"], "N must be a positive number"),
                         (["4", "2"], "usage:")):
        proc = _script(*args, out=tmp_path, timeout=60)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
    assert not any(tmp_path.iterdir())  # nothing was run or written


def _res(error=0.0, tol=1e-3, replicated="", backend="torch_sdpa", exception="", finite=True):
    return {"error": error, "tol": tol, "replicated": replicated, "backend": backend, "exception": exception,
            "finite": finite}


def test_nccl_layout_verdicts_catch_every_kind_of_failure():
    groups = [[0, 1], [2, 3]]
    assert judge(2, groups, [_res(), _res(5e-4), _res(), _res()])["passed"]
    cases = {
        "error above tol": [_res(), _res(2e-3), _res(), _res()],
        "exception": [_res(), _res(), _res(exception="RuntimeError: boom"), _res()],
        "non-finite": [_res(), _res(), _res(), _res(finite=False)],
        "replicated differ": [_res(replicated="a"), _res(replicated="b"), _res(), _res()],
        "backends differ": [_res(), _res(), _res(backend="fa"), _res()],
    }
    for name, per_rank in cases.items():
        verdict = judge(2, groups, per_rank)
        assert not verdict["passed"] and verdict["problems"], name
    # replicated outputs only need to agree inside a group, not across groups
    assert judge(2, groups, [_res(replicated="a"), _res(replicated="a"), _res(replicated="b"),
                             _res(replicated="b")])["passed"]


def _scaling(k, attention, dit=(), wan=()):
    def rows(section, items):
        return [{"section": section, "layout": lay, "impl": impl, "seconds": s, "rel_err": 0.0, "note": "",
                 **({"peer": peer} if peer else {})} for lay, impl, s, peer in items]
    return {"k": k, "dry_run": False, "env": {"gpu": "test"}, "config": None,
            "sections": {"attention": {"rows": rows("attention", attention)}, "dit": {"rows": rows("dit", dit)},
                         "wan": {"rows": rows("wan", wan)}}}


def test_report_speedup_efficiency_and_peer_ratios(tmp_path):
    runs = {
        1: _scaling(1, [("local", "LocalAttention[auto]", 0.210, None), ("1x1", "USPAttention", 0.200, None)],
                    dit=[("none", "TinyWanDiT step, no SP", 1.0, None)]),
        8: _scaling(8, [("local", "LocalAttention[auto]", 0.210, None),
                        ("8x1", "USPAttention", 0.0270, None),
                        ("8x1", "yunchang 0.6.4 (torch_cudnn)", 0.0324, "yunchang"),
                        ("8x1", "diffusers", None, "diffusers"),
                        ("4x2", "USPAttention", 0.0280, None), ("2x4", "USPAttention", 0.0290, None),
                        ("1x8", "USPAttention", 0.0300, None)],
                    dit=[("none", "TinyWanDiT step, no SP", None, None), ("8x1", "TinyWanDiT step", 0.25, None)]),
    }
    runs[8]["sections"]["attention"]["rows"][3]["note"] = "error: ValueError: example"
    for k, run in runs.items():
        (tmp_path / f"scaling_k{k}.json").write_text(json.dumps(run))
    (tmp_path / "steps.tsv").write_text("scaling k=1\t0\t30\t170\nscaling k=8\t124\t170\t170\n")
    text, data = multigpu_report.build(str(tmp_path))
    attn = {(r["k"], r["layout"]): r for r in data["p4_attention"]}
    assert attn[(1, "1x1")]["ms"] == pytest.approx(200.0)  # USPAttention 1x1 is the 1-GPU time
    assert attn[(8, "8x1")]["speedup"] == pytest.approx(0.200 / 0.0270)
    assert attn[(8, "8x1")]["efficiency"] == pytest.approx(0.200 / 0.0270 / 8)
    assert attn[(8, "4x2")]["kind"] == "U x R (best)" and attn[(8, "2x4")]["kind"] == "U x R"
    assert attn[(8, "1x8")]["kind"] == "ring-8"
    assert "0.926, met" in text  # 0.2 / 0.027 / 8
    dit = {(r["k"], r["layout"]): r for r in data["p4_dit"]}
    assert dit[(8, "8x1")]["efficiency"] == pytest.approx(1.0 / 0.25 / 8)
    peers = {r["peer"]: r for r in data["p5_attention"]}
    assert peers["yunchang 0.6.4 (torch_cudnn)"]["ratio"] == pytest.approx(0.0324 / 0.0270)
    assert peers["yunchang 0.6.4 (torch_cudnn)"]["status"] == "met"
    assert peers["diffusers"]["ratio"] is None and peers["diffusers"]["note"] == "error: ValueError: example"
    steps = {s["step"]: s for s in data["steps"]}
    assert steps["scaling k=8"]["status"] == "TIMED OUT" and steps["scaling k=1"]["status"] == "ok"
    assert re.search(r"no result \(nccl_layouts.json missing", text)  # a missing piece is said, not invented

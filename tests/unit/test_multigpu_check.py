"""launch/multigpu_check.sh before any multi-GPU machine: its CPU dry run runs every step with gloo at
toy sizes and passes, so the first GPU call cannot fail on a typo; the multi-GPU tests
(tests/gpu/test_multigpu.py) pass on CPU processes with gloo; plus the layout verdicts, which a
passing run cannot make fail.

These tests check what the script produces, never how fast anything is.
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

from tests.gpu.multigpu_cases import SCENARIOS, judge

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "multigpu_check.sh"
HAVE_TORCHRUN = importlib.util.find_spec("torch.distributed.run") is not None


def _script(*args, out, timeout):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def _rows(results: dict, part: str) -> list[dict]:
    return results["parts"][part]["rows"]


@pytest.mark.slow
@pytest.mark.timeout(480)  # ~140 s alone on 2 cores; 4 processes per step share them with the other test worker
@pytest.mark.skipif(not HAVE_TORCHRUN, reason="torch.distributed.run (torchrun) is not available")
def test_cpu_dry_run_runs_every_step(tmp_path):
    proc = _script("--cpu-dry-run", "4", out=tmp_path, timeout=450)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"multigpu.log", "env.txt", "summary.md", "results.json"}
    env = (tmp_path / "env.txt").read_text()
    assert "NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1" in env
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# usp_attn benchmarks: 4 x CPU (CPU DRY RUN")
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["parts"]) == ["steps", "main job", "scaling", "peers", "model-step", "communication"]
    assert not [n for n, e in results["parts"].items() if e.get("error")]

    steps = _rows(results, "steps")
    assert [s["what"] for s in steps] == ["environment", "multigpu tests", "scaling", "peers", "model-step",
                                          "communication", "generate 4x1 bf16", "generate 1x4 fp32"]
    assert all(s["exit"] == 0 and s["result"] == "ok" for s in steps), steps

    # the multi-GPU tests on 4 CPU ranks: every scenario in the 6 layouts of groups of 1, 2 and 4, the safe
    # defaults (5 tests; the one about CPU tensors under NCCL skipped), and the CUDA-graph cases' eager steps
    # (4 cases x Ulysses-2 and ring-2; capture needs CUDA)
    assert _pytest_counts((tmp_path / "multigpu.log").read_text()) == {"passed": 6 * len(SCENARIOS) + 4 + 8,
                                                                       "skipped": 1}

    gen = _rows(results, "main job")
    assert [(r["layout"], r["dtype"]) for r in gen] == [("1x4", "fp32"), ("4x1", "bf16")]
    assert all(r["result"] == "PASS" for r in gen), gen

    # scaling (P4): groups of 1, 2 and 4 side by side; every layout ran and matches the one-device result
    scaling = [r for r in _rows(results, "scaling") if "metric" not in r]
    assert [r["layout"].split()[0] for r in scaling] == ["1x1", "2x1", "1x2", "4x1", "2x2", "1x4"]
    for r in scaling:
        assert r["ms"] > 0 and r["rel_err"] < 1e-5 and r["efficiency"] == pytest.approx(r["speedup"] / r["gpus"])
    assert [r["metric"] for r in _rows(results, "scaling") if "metric" in r] == ["P4"]

    # peers (P5): every row either ran and matches, or says why it did not. On CPU diffusers' Ulysses
    # attention runs; its ring (no LSE from its CPU backend) and yunchang's ring cannot.
    peers = [r for r in _rows(results, "peers") if "metric" not in r]
    assert len(peers) == 3 * 3  # (ours, yunchang, diffusers) x (4x1, 2x2, 1x4)
    for r in peers:
        assert (r.get("ms", 0) > 0 and r["rel_err"] < 1e-5) or r["note"].startswith(("skipped: ", "error: ")), r
    by = {(r["layout"], r["what"].split()[0]): r for r in peers}
    assert by[("4x1", "diffusers")]["ms"] > 0
    assert "Native attention does not support return_lse" in by[("1x4", "diffusers")]["note"]
    if importlib.util.find_spec("yunchang") is not None or list(REPO.glob(".whl/yunchang-*.whl")):
        assert "all-zero log-sum-exp" in by[("1x4", "yunchang")]["note"]
    else:
        assert "yunchang is not installed" in by[("1x4", "yunchang")]["note"]

    model = _rows(results, "model-step")
    dit = [r for r in model if r["what"] == "TinyWanDiT step"]
    assert [r["layout"].split()[0] for r in dit] == ["1x1", "2x1", "1x2", "4x1", "2x2", "1x4"]
    assert all(r["ms"] > 0 and r["rel_err"] < 1e-5 for r in dit)
    wan = [r for r in model if r["what"].startswith(("usp_attn", "diffusers"))]
    if importlib.util.find_spec("diffusers") is not None:
        ours = [r for r in wan if r["what"].startswith("usp_attn")]
        assert [r["layout"] for r in ours] == ["4x1", "2x2", "1x4"]
        assert all(r["ms"] > 0 and r["rel_err"] < 1e-5 for r in ours)
        assert all("needs an accelerator" in r["note"] for r in wan if r["what"].startswith("diffusers"))

    comm = _rows(results, "communication")
    patterns = {(r["what"], r["gpus"]) for r in comm}
    for d in (2, 4):
        for pattern in ("probe all_to_all", "probe p2p ring", "ulysses q,k,v all-to-all", "ulysses output all-to-all",
                        "ring hop (K and V)"):
            assert (pattern, d) in patterns
    assert all(r["ms"] > 0 and r["GB/s"] > 0 for r in comm)
    assert "\n## headline\n" in summary and "| P4 |" in summary


def _pytest_counts(log: str) -> dict[str, int]:
    """Passed, failed, skipped, errors of pytest's last summary line in ``log`` (deselected left out)."""
    summary = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)][-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)
            if word in ("passed", "failed", "skipped", "error", "errors")}


def test_multigpu_tests_pass_on_two_cpu_ranks():
    """tests/gpu/test_multigpu.py with gloo on 2 CPU processes (what --cpu-dry-run N does with N): every
    scenario in layouts 1x1, 2x1 and 1x2; no host sync is checked there, the rest of the safe defaults is."""
    env = dict(os.environ, USP_ATTN_MULTIGPU_CPU_RANKS="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "multigpu", "tests/gpu/test_multigpu.py", "-q",
                           "-p", "no:cacheprovider", "-p", "no:xdist"], capture_output=True, text=True,
                          timeout=280, env=env, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert _pytest_counts(proc.stdout) == {"passed": 3 * len(SCENARIOS) + 4, "skipped": 1}, proc.stdout[-2000:]


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


def test_layout_test_verdicts_catch_every_kind_of_failure():
    groups = [[0, 1], [2, 3]]
    assert judge(groups, [_res(), _res(5e-4), _res(), _res()])["passed"]
    cases = {
        "error above tol": [_res(), _res(2e-3), _res(), _res()],
        "exception": [_res(), _res(), _res(exception="RuntimeError: boom"), _res()],
        "non-finite": [_res(), _res(), _res(), _res(finite=False)],
        "replicated differ": [_res(replicated="a"), _res(replicated="b"), _res(), _res()],
        "backends differ": [_res(), _res(), _res(backend="fa"), _res()],
    }
    for name, per_rank in cases.items():
        verdict = judge(groups, per_rank)
        assert not verdict["passed"] and verdict["problems"], name
    # replicated outputs only need to agree inside a group, not across groups
    assert judge(groups, [_res(replicated="a"), _res(replicated="a"), _res(replicated="b"),
                          _res(replicated="b")])["passed"]

"""The benchmark suite on CPU: benchmarks/run.py's one-GPU set runs every code path at toy sizes and
writes its report (markdown, JSON, PNG); arguments are checked; the reporter merges several runs;
parts kept in other modules plug in; diffusers' device meshes are made once; the CUDA calls of the
kernel candidates and of the torch_sdpa backend are right on meta tensors.

These tests check what the suite produces, never how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import struct
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from benchmarks import report, run
from benchmarks.kernels import CANDIDATES
from benchmarks.suite import Context, headline
from benchmarks.timing import attention_flops
from tests.helpers.multiproc import run_in_group

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN = REPO / "benchmarks" / "run.py"


def suite(*args, timeout=280) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN), "--dry-run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_flops_count():
    assert attention_flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11
    assert attention_flops(1, 1, 8, 8, 4, causal=True) == attention_flops(1, 1, 8, 8, 4) / 2


def test_markdown_cells_and_columns():
    text = report.markdown_table(["a", "b", "c"], [[1.23456, None, "x|y"], [float("nan"), 1e-6, True]])
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1.23 | - | x\\|y |", "| - | 1.00e-06 | yes |"]
    # one row format: columns in order of first appearance, the note last, common keys labelled
    table = report.rows_table([{"what": "a", "note": "n", "ms": 1.0}, {"what": "b", "GB/s": 2.0}])
    assert table.splitlines()[0] == "| what | median ms | GB/s | note |"


def test_headline_status():
    assert headline("P1", "x", 0.98, ">= 0.97")["status"] == "met"
    assert headline("P2", "x", 1.05, "<= 1.03")["status"] == "NOT met"
    assert headline("P5", "x", None, ">= 1.1")["status"] == "-"


def test_one_gpu_set_dry_run(tmp_path):
    """Every part of the one-GPU set runs its code paths on CPU and the report has every part."""
    proc = suite("--parts", "one-gpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert list(result["parts"]) == run.ONE_GPU and result["dry_run"] and result["world"] == 1
    assert not [name for name, e in result["parts"].items() if e.get("error")]
    rows = {name: e["rows"] for name, e in result["parts"].items()}
    assert not [r for part in rows.values() for r in part if "result" in r]  # checks are tests, not parts
    compiled = rows["compile"]
    assert [r["what"] for r in compiled] == ["LocalAttention, torch_sdpa", "USPAttention (world 1), torch_sdpa"]
    assert all(r["first_call_s"] > 0 and r["eager_us"] > 0 and r["compiled_us"] > 0 for r in compiled), compiled
    metrics = {r["metric"] for part in rows.values() for r in part if "metric" in r}
    assert {m for m in metrics if m.startswith("P")} == {"P1", "P2", "P3"}  # the sparse parts add S1, S2
    timed = [r for r in rows["kernels"] if r.get("ms")]
    assert {r["what"] for r in timed} == {"cpu flash (aten)", "LocalAttention (auto)", "LocalAttention[torch_sdpa]"}
    assert next(r for r in rows["kernels"] if r["what"] == "LocalAttention[fa]")["note"].startswith("skipped: fa needs")
    assert all(r["tflops"] > 0 for r in timed)
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# usp_attn benchmarks: 1 x CPU (CPU DRY RUN")
    assert all(f"\n## {name}\n" in text for name in run.ONE_GPU) and "\n## headline\n" in text
    if importlib.util.find_spec("matplotlib") is not None:
        blob = (tmp_path / "report.png").read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", blob[16:24])[1] > 200


@pytest.mark.slow
def test_single_gpu_check_dry_run(tmp_path):
    """launch/single_gpu_check.sh --dry-run: the GPU tests are collected without an error (and skipped on
    CPU), then the suite runs as a module (extra arguments replace the parts) and writes its report."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "launch" / "single_gpu_check.sh"), "--dry-run", "--parts", "env"],
                          capture_output=True, text=True, timeout=280, env=env, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = (tmp_path / "gpu_tests.log").read_text().strip().splitlines()[-1]
    assert re.search(r"\d+ (skipped|passed)", summary) and not re.search(r"failed|error", summary), summary
    assert list(json.loads((tmp_path / "results.json").read_text())["parts"]) == ["env"]


def test_shape_and_reps_replace_the_part_sizes(tmp_path):
    proc = suite("--parts", "kernels", "--shape", "1,2,64,16", "--reps", "2", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["parts"]["kernels"]["rows"]
    assert {r["shape"] for r in rows} == {"1,2,64,16"}
    assert [r["note"] for r in rows if r.get("ms")] == ["2 reps"] * 3
    assert "| P1 | LocalAttention (auto) / fastest exact kernel (cpu flash (aten))" in proc.stdout


def test_cuda_calls_on_meta_tensors():
    """The CUDA attention calls a CPU can check before a GPU is paid for: the suite's aten candidates and
    the torch_sdpa backend's CUDA paths on meta tensors (aten's meta kernels check the arguments' order
    and types and give the shapes the real calls would)."""
    from usp_attn.backends.sdpa import TorchSDPABackend
    from usp_attn.platforms import Platform

    b, h, s, d = 1, 2, 128, 64
    q, k, v = (torch.empty(b, s, h, d, dtype=torch.bfloat16, device="meta") for _ in range(3))
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool, device="meta")
    calls = [(c.name, c.returns_lse, lambda c=c: c.bind(h, d, scale=d**-0.5, causal=False)(q, k, v))
             for c in CANDIDATES if c.meta_checkable]
    for label, cap, m, x in (("cudnn", (9, 0), None, q), ("flash", (8, 0), None, q), ("efficient", (9, 0), mask, q),
                             ("efficient fp32", (9, 0), None, q.float())):
        impl = TorchSDPABackend(Platform.make("cuda", capability=cap))
        for lse in (False, True):
            calls.append((f"torch_sdpa CUDA path ({label}, return_lse={lse})", lse,
                          lambda impl=impl, x=x, m=m, lse=lse: impl._cuda(x, k.to(x.dtype), v.to(x.dtype), False,
                                                                          d**-0.5, m, lse)))
    assert len(calls) == 13
    for what, want_lse, call in calls:
        res = call()
        out, lse = res if isinstance(res, tuple) else (res, None)
        assert tuple(out.shape) == (b, s, h, d), what
        if want_lse:
            assert tuple(lse.shape) == (b, h, s), what


@pytest.mark.parametrize("argv, message", [
    (["--parts", "kernels,nope"], "unknown part(s) ['nope']"),
    (["--shape", "1,2,3"], "--shape must be four positive integers"),
    (["--reps", "0"], "--reps must be >= 1"),
])
def test_bad_arguments_fail_clearly(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_single_process_parts_refused_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        run.main(["--parts", "scaling,kernels"])
    assert "--parts kernels: single-process parts; run them without torchrun" in capsys.readouterr().err


def test_a_part_in_a_missing_module_says_so(monkeypatch):
    """The hook for parts kept in modules of their own: a module not in this checkout is reported."""
    monkeypatch.setitem(run.PARTS, "elsewhere", run.Part("benchmarks.not_written_yet:suite_rows", "any", "x"))
    ctx = Context(device=__import__("torch").device("cpu"), dry_run=True, budget_s=10, target_s=0.1)
    entry = run.run_part("elsewhere", ctx)
    assert entry["rows"] == [] and entry["error"] == "not in this checkout: benchmarks.not_written_yet is missing"
    assert report.failures({"parts": {"elsewhere": entry}}) == []  # not a failure of the run
    # a module written to run on its own too: function(dry_run=...) -> rows
    monkeypatch.setitem(run.PARTS, "standalone", run.Part("tests.unit.test_benchmark_suite:_standalone_rows", "any", ""))
    assert run.run_part("standalone", ctx)["rows"] == [{"what": "x", "dry_run": True}]


def _standalone_rows(*, dry_run: bool = False) -> list[dict]:
    return [{"what": "x", "dry_run": dry_run}]


def test_report_merges_runs_steps_and_logs(tmp_path):
    def result(world, rows):
        return {"title": f"t{world}", "command": "c", "env": {"gpu": "x"}, "world": world, "dry_run": False,
                "parts": {"scaling": {"rows": rows, "seconds": 1.0}}}
    (tmp_path / "a.json").write_text(json.dumps(result(1, [{"what": "USPAttention", "ms": 2.0}])))
    (tmp_path / "b.json").write_text(json.dumps(result(2, [headline("P4", "eff", 0.95, ">= 0.90")])))
    (tmp_path / "steps.tsv").write_text("scaling\t0\t30\t110\npeers\t124\t110\t110\nlate\t-1\t0\t0\n")
    (tmp_path / "generate_2x1_bf16.log").write_text(
        "| attention backend   | torch_sdpa |\n| time per step | 0.1 s |\n| verify: final latents | rel 1e-3 |\n"
        "| verify              | PASS vs one-process fp32 rerun |\n")
    out = tmp_path / "summary.md"
    assert report.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--steps", str(tmp_path / "steps.tsv"),
                        "--logs", str(tmp_path / "generate_*.log"), "--markdown", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# t2") and "## scaling (2 ranks)" in text and "## steps" in text
    merged = report.merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert list(merged["parts"]) == ["scaling", "scaling (2 ranks)"]
    steps = report.steps_rows(str(tmp_path / "steps.tsv"))
    assert [s["result"] for s in steps] == ["ok", "TIMED OUT", "skipped: no time left"]
    gen = report.generate_rows([str(tmp_path / "generate_2x1_bf16.log")])
    assert gen[0]["layout"] == "2x1" and gen[0]["result"] == "PASS" and gen[0]["backend"] == "torch_sdpa"
    assert "| P4 | eff |" in text and "| met |" in text


# ---- diffusers' device meshes ------------------------------------------------------------------------
def _hashed_group_name_repeats() -> str:
    """What broke diffusers' ring row: a group name derived from the live-group count repeats once a
    group is destroyed (NCCL's split_group names mesh groups this way; gloo's local-synchronisation
    groups too, so the collision shows on CPU)."""
    usp_group = dist.new_group([0, 1])
    dist.new_group([0, 1], use_local_synchronization=True)
    dist.destroy_process_group(usp_group)
    try:
        dist.new_group([0, 1], use_local_synchronization=True)
    except ValueError as exc:
        return str(exc)
    return "no collision"


def test_group_names_repeat_after_a_destroy():
    assert run_in_group(2, _hashed_group_name_repeats) == ["The specified group name has already been created, "
                                                           "please use a different group name"] * 2


def _meshes_made_once() -> tuple[int, int, bool]:
    import usp_attn
    from benchmarks import peers

    first = peers.device_mesh(1, 2)
    made = len(peers._MESHES)
    groups = len(dist.distributed_c10d._world.pg_names)
    usp_attn.init_sequence_parallel(2, 1)
    usp_attn.destroy_sequence_parallel()
    again = peers.device_mesh(2, 1), peers.device_mesh(1, 2)
    return made, len(dist.distributed_c10d._world.pg_names) - groups, again[1] is first


def test_every_layouts_mesh_is_made_at_first_use_and_reused():
    """All meshes are made in a row, before usp_attn's groups come and go; later uses create none."""
    assert run_in_group(2, _meshes_made_once) == [(2, 0, True)] * 2


# ---- the safe-defaults part on two gloo ranks ---------------------------------------------------------
def _safe_defaults_rows() -> list[dict]:
    import torch

    from benchmarks.safe_defaults import safe_defaults_part

    return safe_defaults_part(Context(device=torch.device("cpu"), dry_run=True, budget_s=60, target_s=0.1))


def test_safe_defaults_part_times_every_validate_mode():
    """Rows per layout and validate mode, with the checks each made: validate=None checks the first call
    only, True every call, False none. (fp64 through the ring and the first-call errors on every rank:
    tests/gpu/test_multigpu.py, run on gloo by tests/unit/test_multigpu_check.py.)"""
    for rows in run_in_group(2, _safe_defaults_rows, timeout=120):
        calls = {(r["layout"], r["what"]): r["checks"] for r in rows}
        assert all(r["ms"] > 0 and r["first_ms"] > 0 for r in rows), rows
        for layout in ("ulysses2", "ring2"):
            assert calls[(layout, "USPAttention validate=None")] == 1
            assert calls[(layout, "USPAttention validate=True")] >= 2
            assert calls[(layout, "USPAttention validate=False")] == 0


def _text_padding_rows() -> list[dict]:
    import torch

    from benchmarks.text_padding import text_padding_part

    return text_padding_part(Context(device=torch.device("cpu"), dry_run=True, budget_s=60, target_s=0.1))


def test_text_padding_part_both_masks_match_one_device():
    """Padded text keys masked over every key or over the replicated keys only: the same attention
    (fp32: ~3e-7 measured, 1e-5 allowed) in every layout of two ranks."""
    for rows in run_in_group(2, _text_padding_rows, timeout=120):
        assert len(rows) == 4 and all(r["rel_err"] < 1e-5 and r["ms"] > 0 for r in rows), rows


def _sparse_sp_rows() -> list[dict]:
    import torch

    from benchmarks.sparse_attention import sparse_sp_part

    return sparse_sp_part(Context(device=torch.device("cpu"), dry_run=True, budget_s=60, target_s=0.1))


def test_sparse_sp_part_times_every_layout_against_the_whole_sequence():
    """USPAttention sparse vs dense at Ulysses-2 and ring-2: each layout's gathered output equals the one-device
    sparse result (fp32), its times and the measured S2 ratio are reported, the same on both ranks."""
    results = run_in_group(2, _sparse_sp_rows, timeout=120)
    assert results[0] == results[1]  # every number is the slowest rank's, so both ranks report alike
    rows = [r for r in results[0] if "metric" not in r]
    assert [r["layout"].split()[0] for r in rows] == ["2x1", "1x2"], rows
    assert all(r["rel_err"] < 1e-5 and r["ms"] > 0 and r["dense_ms"] > 0 and 0 < r["density"] < 1 for r in rows), rows
    assert [r["metric"] for r in results[0] if "metric" in r] == ["S2", "S2"]


def test_git_commit_says_when_the_files_are_not_the_commit(tmp_path):
    import subprocess

    from benchmarks.environment import git_commit

    assert git_commit(str(tmp_path)) == "unknown"

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    sha = git_commit(str(tmp_path))
    assert sha and "," not in sha and sha != "unknown"
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(str(tmp_path)) == f"{sha}, with local changes"
    git("commit", "-qam", "b")
    (tmp_path / "b.py").write_text("y = 1\n")
    assert git_commit(str(tmp_path)).endswith(", with local changes")

"""launch/generate.py end to end: the real command under torchrun on 4 CPU ranks (gloo), one plain
``python`` run, bad arguments, the output files, and a check that --verify can fail.

Most runs use a tiny random-weight model (70 tokens: 2 latent frames x 5 x 7 patches, split
18/18/17/17 over 4 ranks; 6 heads, which U=4 does not divide, so Ulysses pads heads) so each
torchrun stays within a few seconds on 2 cores. fp32 throughout: the sequence-parallel run and the
one-process run do the same math in a different summation order, so they agree to ~1e-6 relative;
1e-4 is the bound generate.py itself applies (run_report.FP32_TOLERANCE). The main job itself (the
trained model at its defaults) is checked to draw what its prompt asks for.
"""

from __future__ import annotations

import functools
import json
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
GENERATE = LAUNCH / "generate.py"
sys.path.insert(0, str(LAUNCH))  # generate.py imports its siblings (tiny_dit, flow_match, run_report)

import generate  # noqa: E402
import job_output  # noqa: E402
from flow_match import latents_to_video  # noqa: E402
from moving_shapes import BACKGROUND, COLOURS  # noqa: E402
from run_report import FP32_TOLERANCE, low_precision_bound  # noqa: E402

from tests.helpers.multiproc import run_in_group  # noqa: E402

TINY = [
    "--num-frames", "5", "--height", "80", "--width", "112", "--hidden-size", "96", "--num-heads", "6",
    "--num-layers", "2", "--num-inference-steps", "3", "--seed", "7",
]
LATENT_SHAPE = (16, 2, 10, 14)
VIDEO_SHAPE = (5, 80, 112, 3)
FP32_TOL = FP32_TOLERANCE


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    # --standalone: the agent's rendezvous store binds a port the OS picks (a port chosen here and handed over
    # could be taken meanwhile by another test's gloo connection: EADDRINUSE)
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                 "--standalone", str(GENERATE), *args])


def python(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(GENERATE), *args])


def verify_rows(stdout: str) -> dict:
    """{name: (max_abs, rel)} from the summary table's verify rows."""
    rows = re.findall(r"\| verify: ([\w -]+?)\s+\| rel (\S+) \(bound ([^ )]+).*?, max abs (\S+?)\s+\|", stdout)
    return {name: (float(a), float(r), float(b)) for name, r, b, a in rows}


def check_success(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    # Rank 0 alone prints: one backend line, one summary table.
    assert proc.stdout.count("attention backend: ") == 1, proc.stdout
    assert proc.stdout.count("| quantity") == 1, proc.stdout
    assert "attention backend: torch_sdpa" in proc.stdout  # the only backend a CPU machine has
    assert "| verify  " in proc.stdout and "PASS" in proc.stdout, proc.stdout
    errors = verify_rows(proc.stdout)
    assert set(errors) == {"first-step velocity", "final latents"}, proc.stdout
    for name, (max_abs, rel, bound) in errors.items():
        assert bound == FP32_TOL and rel <= FP32_TOL and max_abs < 1e-3, (name, max_abs, rel, bound)


def load_npz(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict:
    """``python launch/generate.py`` without torchrun: 1 rank, the reference for the layouts."""
    out = tmp_path_factory.mktemp("single") / "video.npz"
    proc = python(*TINY, "--output", str(out), "--verify")
    check_success(proc)
    assert "Ulysses 1 x ring 1" in proc.stdout and re.search(r"\| world size\s+\| 1 ", proc.stdout)
    return load_npz(out)


def test_single_process_npz_content(single_process):
    data = single_process
    assert data["video"].shape == VIDEO_SHAPE and data["video"].dtype == np.uint8
    assert data["latents"].shape == LATENT_SHAPE and data["latents"].dtype == np.float32
    assert np.isfinite(data["latents"]).all() and data["latents"].std() > 0.1
    assert int(data["seed"]) == 7 and int(data["num_inference_steps"]) == 3
    assert str(data["attention_backend"]) == "torch_sdpa"
    # The video is the documented stand-in decode of the stored latents, and is not blank.
    expected = latents_to_video(torch.from_numpy(data["latents"]), *VIDEO_SHAPE[:3])
    np.testing.assert_array_equal(data["video"], expected.numpy())
    assert len(np.unique(data["video"])) > 50


# U2xR2 (Ulysses and ring at once) stays in the fast lane; the pure layouts run in the full lane
@pytest.mark.parametrize("u,r", [pytest.param(4, 1, marks=pytest.mark.slow), (2, 2),
                                 pytest.param(1, 4, marks=pytest.mark.slow)], ids=["U4xR1", "U2xR2", "U1xR4"])
def test_torchrun_layout_verifies(u, r, tmp_path, single_process):
    out = tmp_path / "video.npz"
    proc = torchrun(4, *TINY, "--ulysses-degree", str(u), "--ring-degree", str(r), "--output", str(out), "--verify")
    check_success(proc)
    assert f"Ulysses {u} x ring {r}" in proc.stdout and re.search(r"\| world size\s+\| 4 ", proc.stdout)
    data = load_npz(out)
    assert (int(data["ulysses_degree"]), int(data["ring_degree"])) == (u, r)
    # Independent of --verify: the 4-rank result equals the separate 1-process run's.
    got, want = data["latents"].astype(np.float64), single_process["latents"].astype(np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= FP32_TOL


@pytest.mark.slow  # torchrun; test_sequence_parallel_degrees_checked_against_world checks the same in process
def test_degrees_must_match_world_size():
    proc = torchrun(2, *TINY, "--ulysses-degree", "2", "--ring-degree", "2")
    assert proc.returncode != 0
    assert "--ulysses-degree 2 x --ring-degree 2 = 4 must equal the number of ranks, 2" in proc.stderr, proc.stderr
    assert "attention backend" not in proc.stdout  # failed before any work


@pytest.mark.slow  # a process of its own for one parser error
def test_unknown_backend_fails_while_parsing():
    proc = python(*TINY, "--attention-backend", "flashy")
    assert proc.returncode == 2
    assert "unknown attention backend 'flashy'" in proc.stderr and "torch_sdpa" in proc.stderr, proc.stderr


@pytest.mark.slow  # torchrun
def test_bad_argument_usage_printed_once_under_torchrun():
    proc = torchrun(2, "--num-frames", "abc")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0  # torchrun's own status is 1 whatever its ranks' were
    assert output.count("usage: generate.py") == 1, output
    assert output.count("argument --num-frames: expected a positive integer, got 'abc'") == 1, output
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr  # in torchrun's report: argparse's status


@pytest.mark.parametrize(
    "args,message",
    [
        (["--num-frames", "6"], "--num-frames 6 must be 4k+1"),
        (["--height", "100"], "--height 100 must be a multiple of 16"),
        (["--width", "8"], "--width 8 must be a multiple of 16"),
        (["--num-heads", "7"], "--hidden-size 128 must be divisible by --num-heads 7"),
        (["--hidden-size", "36", "--num-heads", "9"], "head size --hidden-size/--num-heads = 4 must be even and >= 6"),
        (["--output", "video.avi"], "unknown extension '.avi'"),
        (["--output", "/no/such/dir/video.npz"], "directory /no/such/dir does not exist"),
        (["--output", "/proc/video.gif"], "cannot write to directory /proc"),
        (["--output", "/tmp"], "unknown extension ''"),
        (["--prompt", "a red blue circle"], "--prompt 'a red blue circle' names more than one colour: red, blue"),
        (["--guidance-scale", "0.5"], "--guidance-scale must be >= 1"),
        (["--cfg-parallel", "--guidance-scale", "1"], "--cfg-parallel needs classifier-free guidance, but "
                                                      "--guidance-scale is 1"),
        (["--model-path", "/no/such/model", "--verify"], "--verify needs the built-in model"),
        (["--model-path", "./not/a hub id"], "neither a directory nor a hub id"),
        (["--sparse-tile", "1,2,2"], "--sparse-tile and --sparse-window go together"),
    ],
)
def test_bad_arguments_fail_before_any_work(args, message, capsys):
    from usp_attn import get_sequence_parallel_state

    assert generate.main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert get_sequence_parallel_state() is None and not torch.distributed.is_initialized()


def test_sparse_attention_run_verifies(tmp_path):
    """Sliding-tile attention after one dense step, ring of 2 (grid 2 x 5 x 7 with partial tiles): the same
    pattern in one process gives the same latents."""
    out = tmp_path / "sparse.npz"
    proc = torchrun(2, *TINY, "--ulysses-degree", "1", "--ring-degree", "2", "--sparse-tile", "1,2,2",
                    "--sparse-window", "1,2,2", "--dense-steps", "1", "--output", str(out), "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sparse attention" in proc.stdout and re.search(r"\| verify\s+\| PASS", proc.stdout), proc.stdout


def test_several_problems_are_all_reported(capsys):
    assert generate.main(["--num-frames", "6", "--height", "100", "--output", "x.avi"]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err and "--num-frames" in err and "--height" in err and ".avi" in err, err


def test_sequence_parallel_degrees_checked_against_world(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "3")
    assert generate.main(["--ulysses-degree", "2", "--ring-degree", "2"]) == 2
    err = capsys.readouterr().err
    assert "error (rank 3)" in err and "= 4 must equal the number of ranks, 8" in err, err


@pytest.mark.parametrize("world, degrees, product", [
    ("4", ["--ulysses-degree", "4"], "--cfg-parallel (2) x --ulysses-degree 4 x --ring-degree 1 = 8"),
    ("3", [], "--cfg-parallel (2) x --ulysses-degree 1 x --ring-degree 1 = 2"),
])
def test_cfg_parallel_degrees_checked_against_world(world, degrees, product, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "1")
    assert generate.main(["--cfg-parallel", *degrees]) == 2
    err = capsys.readouterr().err
    assert "error (rank 1)" in err and f"{product} must equal the number of ranks, {world}" in err, err


# CFG 2 x ring 2 (both at once) in the fast lane; CFG 2 x Ulysses 2 in the full lane
@pytest.mark.parametrize("u,r", [(1, 2), pytest.param(2, 1, marks=pytest.mark.slow)], ids=["U1xR2", "U2xR1"])
def test_cfg_parallel_verifies(u, r, tmp_path, single_process):
    """--cfg-parallel: two groups of U x R ranks, one per CFG branch; the same latents as one process."""
    out = tmp_path / "video.npz"
    proc = torchrun(4, *TINY, "--cfg-parallel", "--ulysses-degree", str(u), "--ring-degree", str(r),
                    "--output", str(out), "--verify")
    check_success(proc)
    assert f"CFG 2 x Ulysses {u} x ring {r}" in proc.stdout and re.search(r"\| world size\s+\| 4 ", proc.stdout)
    assert "agreed by 4 rank(s)" in proc.stdout  # one backend for both CFG groups
    data = load_npz(out)
    assert int(data["cfg_degree"]) == 2
    got, want = data["latents"].astype(np.float64), single_process["latents"].astype(np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= FP32_TOL


# ---- --layout auto -------------------------------------------------------------------------------
def test_layout_auto_runs_the_cost_models_pick_and_verifies(tmp_path, single_process):
    """4 CPU ranks: every rank runs the pick of choose_layout (assumed terms, no GPU) for the tiny model's shape,
    and the result equals the one-process run."""
    from usp_attn.layout import choose_layout

    want = choose_layout(4, heads=6, tokens=70, head_size=16, guidance=True, layers=2, measure=False)
    cfg, u, r = want.layout
    out = tmp_path / "video.npz"
    proc = torchrun(4, *TINY, "--layout", "auto", "--output", str(out), "--verify")
    check_success(proc)
    assert proc.stdout.count("layout auto: ") == 1  # rank 0 alone says it
    assert f"layout auto: CFG {cfg} x Ulysses {u} x ring {r} for 4 rank(s)" in proc.stdout, proc.stdout
    data = load_npz(out)
    assert (int(data["cfg_degree"]), int(data["ulysses_degree"]), int(data["ring_degree"])) == (cfg, u, r)
    got, want_latents = data["latents"].astype(np.float64), single_process["latents"].astype(np.float64)
    assert np.linalg.norm(got - want_latents) / np.linalg.norm(want_latents) <= FP32_TOL


@pytest.mark.parametrize("args, message", [
    (["--layout", "auto", "--ulysses-degree", "2"], "--layout auto chooses --cfg-parallel, --ulysses-degree and "
                                                    "--ring-degree itself"),
    (["--layout", "auto", "--model-path", "org/model"], "--layout auto: --model-path 'org/model' is not a local "
                                                        "pipeline directory"),
])
def test_layout_auto_refuses_what_it_cannot_choose_for(args, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert generate.main(args) == 2
    err = capsys.readouterr().err
    assert "error (rank 2)" in err and message in err, err


def _pipeline_dir(root: Path, pipeline: str, transformer: dict, vae: dict) -> Path:
    for name, data in (("model_index.json", {"_class_name": pipeline}), ("transformer/config.json", transformer),
                       ("vae/config.json", vae)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("pipeline, transformer, vae, size, want", [
    # Wan 2.1 14B at 720p, 81 frames: 21 x 45 x 80 patches
    ("WanPipeline", {"num_attention_heads": 40, "attention_head_dim": 128, "num_layers": 40, "patch_size": [1, 2, 2]},
     {"scale_factor_spatial": 8, "scale_factor_temporal": 4}, (81, 720, 1280), (40, 75600, 128, 40)),
    # HunyuanVideo at 720p, 129 frames: 33 x 45 x 80 patches; double- and single-stream blocks both attend
    ("HunyuanVideoPipeline", {"num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 20,
                              "num_single_layers": 40, "patch_size": 2, "patch_size_t": 1},
     {"spatial_compression_ratio": 8, "temporal_compression_ratio": 4}, (129, 720, 1280), (24, 118800, 128, 60)),
    # Flux at 1024 x 1024: 2 x 2 latent patches packed into tokens, the VAE's stride from its four levels
    ("FluxPipeline", {"num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 19, "num_single_layers": 38,
                      "patch_size": 1}, {"block_out_channels": [128, 256, 512, 512]}, (1, 1024, 1024),
     (24, 4096, 128, 57)),
    # LTX-Video at 704 x 480, 161 frames: its VAE config leaves the ratios to the patch and scaling levels (32, 8)
    ("LTXPipeline", {"num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 28, "patch_size": 1,
                     "patch_size_t": 1}, {"patch_size": 4, "patch_size_t": 1,
                                          "spatio_temporal_scaling": [True, True, True, False]},
     (161, 480, 704), (32, 21 * 15 * 22, 64, 28)),
])
def test_layout_auto_reads_the_model_shape_from_the_pipeline_directory(pipeline, transformer, vae, size, want,
                                                                      tmp_path):
    pytest.importorskip("diffusers")  # whether the pipeline takes frames comes from its signature
    import auto_layout

    root = _pipeline_dir(tmp_path, pipeline, transformer, vae)
    args = generate.build_parser().parse_args(["--model-path", str(root), "--num-frames", str(size[0]), "--height",
                                               str(size[1]), "--width", str(size[2]), "--guidance-scale", "5"])
    w = auto_layout.model_path_workload(args, json.loads((root / "model_index.json").read_text()))
    assert (w.heads, w.tokens, w.head_size, w.layers) == want and w.guidance


# ---- --verify has teeth -----------------------------------------------------------------------
def _sabotaged_rope_error(u: int, r: int, trained: bool) -> dict:
    """Relative error of the final latents vs the one-process fp32 model: correct, with the classic bug
    (each rank rotates its shard with positions starting at 0 instead of its global positions), and
    the bf16 rounding floor that sets --verify's bound for bf16 runs. ``trained``: the main job's model
    (trained weights, its video size, a prompt); else the tiny random-weight model of the other tests."""
    sys.path.insert(0, str(LAUNCH))
    import builtin_job
    import tiny_dit
    from flow_match import denoise, flow_match_sigmas
    from moving_shapes import Prompt, encode_prompts, parse_prompt

    import usp_attn

    usp_attn.init_sequence_parallel(u, r)
    try:
        cfg = tiny_dit.TinyDiTConfig() if trained else tiny_dit.TinyDiTConfig(hidden_size=96, num_heads=6)
        par = builtin_job.build_model(cfg)[0]
        ref = tiny_dit.TinyWanDiT(cfg, sequence_parallel=False)
        ref.load_state_dict(par.state_dict())
        gen = torch.Generator().manual_seed(7)
        noise = torch.randn(1, *((16, 5, 16, 16) if trained else LATENT_SHAPE), generator=gen)
        text, negative = encode_prompts([parse_prompt("a white triangle moving left"), Prompt()], cfg.text_dim)[:, None]
        run = functools.partial(denoise, noise=noise, text=text, negative_text=negative,
                                sigmas=flow_match_sigmas(3), guidance_scale=5.0)
        want = run(ref)

        def rel(model):
            got = run(model)
            return ((got.double() - want.double()).norm() / want.double().norm()).item()

        correct_shard = tiny_dit.shard_sequence

        def local_positions(x, dim=1, state=None, record_length=True):
            mine = correct_shard(x, dim, state, record_length)
            return x[: mine.shape[0]] if dim == 0 else mine  # dim 0 = the rotary tables

        result = {"correct": rel(par)}
        tiny_dit.shard_sequence = local_positions
        try:
            result["local rotary positions"] = rel(par)
        finally:
            tiny_dit.shard_sequence = correct_shard
        result["bf16 rounding"] = rel(ref.to(torch.bfloat16))
        return result
    finally:
        usp_attn.destroy_sequence_parallel()


@pytest.mark.parametrize("trained", [pytest.param(True, marks=pytest.mark.slow), False], ids=["trained", "random"])
def test_verify_detects_wrong_rotary_positions(trained):
    results = run_in_group(2, _sabotaged_rope_error, 1, 2, trained, timeout=120)
    for res in results:
        assert res["correct"] <= FP32_TOL, res
        # The bug fails the fp32 check, and the bf16 one, each by a wide margin.
        bug = res["local rotary positions"]
        assert bug > 100 * FP32_TOL and bug > 2 * low_precision_bound(res["bf16 rounding"]), res


def test_bf16_run_is_judged_against_fp32_rerun():
    proc = torchrun(4, *TINY, "--ulysses-degree", "2", "--ring-degree", "2", "--dtype", "bf16", "--verify",
                    "--output", "none")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "| verify  " in proc.stdout and "PASS" in proc.stdout, proc.stdout
    errors = verify_rows(proc.stdout)
    assert set(errors) == {"first-step velocity", "final latents"}, proc.stdout
    for name, (_, rel, bound) in errors.items():
        # bf16 rounding alone is ~1e-2 here: the bound comes from the bf16 rerun, not the fp32 constant.
        assert 1e-3 < rel <= bound < 0.1, (name, rel, bound)
    assert "x bfloat16 rerun's" in proc.stdout


# ---- --model-path (diffusers pipelines) ---------------------------------------------------------
PIPELINE_ARGS = ["--num-frames", "5", "--height", "32", "--width", "48", "--num-inference-steps", "2", "--dtype", "fp32"]
# family -> (layout of the 2-rank run, image pipeline?)
PIPELINES = {"wan": ((2, 1), False), "flux": ((1, 2), True), "cogvideox": ((2, 1), False)}


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    """Tiny random pipelines of every family in PIPELINES, written once (one process builds all)."""
    root = tmp_path_factory.mktemp("pipelines")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import make_tiny_pipelines as m\n"
            "for f in sys.argv[3:]: m.build(f).save_pretrained(f'{sys.argv[2]}/{f}')")
    built = _run([sys.executable, "-c", code, str(LAUNCH), str(root), *PIPELINES], timeout=240)
    assert built.returncode == 0, built.stderr
    return root


def _missing_for_model_path() -> list[str]:
    return [m for m in ("diffusers", "transformers", "accelerate") if importlib.util.find_spec(m) is None]


def test_model_path_without_the_extra_says_what_is_missing(tmp_path, capsys, monkeypatch):
    if not _missing_for_model_path():  # pretend transformers is missing: the path must refuse before any work
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert generate.main(["--model-path", str(tmp_path), *PIPELINE_ARGS]) == 2
    err = capsys.readouterr().err
    assert "--model-path needs" in err and "pip install 'usp-attn[diffusers]'" in err, err


@pytest.mark.slow  # builds every family's pipeline, then torchrun; the argument checks of --model-path stay fast
@pytest.mark.skipif(bool(_missing_for_model_path()), reason="needs the diffusers, transformers and accelerate packages")
@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_model_path_runs_each_pipeline_family(family, tiny_pipelines, tmp_path):
    # A tiny random pipeline (no download), 2 ranks vs 1 process: the same picture / video.
    (u, r), image = PIPELINES[family]
    model = tiny_pipelines / family
    parallel = torchrun(2, "--model-path", str(model), "--ulysses-degree", str(u), "--ring-degree", str(r),
                        *PIPELINE_ARGS, "--output", str(tmp_path / "par.npz"))
    single = python("--model-path", str(model), *PIPELINE_ARGS, "--output", str(tmp_path / "one.npz"))
    for proc in (parallel, single):
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert proc.stdout.count("attention backend: ") == 1
    assert f"Ulysses {u} x ring {r}" in parallel.stdout
    got, want = (load_npz(tmp_path / n)["video"].astype(int) for n in ("par.npz", "one.npz"))
    assert got.shape == want.shape and got.shape[1:] == (32, 48, 3) and want.std() > 5
    assert (got.shape[0] == 1) if image else (got.shape[0] >= 5), got.shape  # a picture / the video's frames
    assert np.abs(got - want).max() <= 1  # uint8 frames: equal up to rounding


@pytest.mark.slow  # torchrun of 4 ranks loading a pipeline, plus one process
@pytest.mark.skipif(bool(_missing_for_model_path()), reason="needs the diffusers, transformers and accelerate packages")
@pytest.mark.parametrize("family", ["wan", "cogvideox"])  # one call per branch / the branches batched
def test_model_path_cfg_parallel(family, tiny_pipelines, tmp_path):
    model = tiny_pipelines / family
    parallel = torchrun(4, "--model-path", str(model), "--cfg-parallel", "--ulysses-degree", "2", *PIPELINE_ARGS,
                        "--num-inference-steps", "3", "--output", str(tmp_path / "par.npz"))
    single = python("--model-path", str(model), *PIPELINE_ARGS, "--num-inference-steps", "3",
                    "--output", str(tmp_path / "one.npz"))
    for proc in (parallel, single):
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "CFG 2 x Ulysses 2 x ring 1" in parallel.stdout
    got, want = (load_npz(tmp_path / n)["video"].astype(int) for n in ("par.npz", "one.npz"))
    assert got.shape == want.shape and want.std() > 5
    assert np.abs(got - want).max() <= 1  # uint8 frames: equal up to rounding


@pytest.mark.skipif(bool(_missing_for_model_path()), reason="needs the diffusers, transformers and accelerate packages")
def test_model_path_sparse_wan(tiny_pipelines, tmp_path):
    """--sparse-tile on a Wan pipeline: ring 2 equals one process with the same pattern, which both report (the
    pattern's effect on a model's output is tested in test_diffusers.py; this tiny pipeline's decoded frames hardly
    move with its self-attention)."""
    model = tiny_pipelines / "wan"
    sparse = ["--sparse-tile", "1,2,2", "--sparse-window", "1,1,1", "--dense-steps", "1"]
    parallel = torchrun(2, "--model-path", str(model), "--ring-degree", "2", *PIPELINE_ARGS, *sparse,
                        "--output", str(tmp_path / "par.npz"))
    single = python("--model-path", str(model), *PIPELINE_ARGS, *sparse, "--output", str(tmp_path / "one.npz"))
    for proc in (parallel, single):
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert "sliding tile (1, 2, 2), window (1, 1, 1) on the 2x2x3 grid: 27.8% of the pairs kept from step 1" \
            in proc.stdout, proc.stdout
    got, want = (load_npz(tmp_path / n)["video"].astype(int) for n in ("par.npz", "one.npz"))
    assert np.abs(got - want).max() <= 1  # uint8 frames: equal up to rounding


@pytest.mark.skipif(bool(_missing_for_model_path()), reason="needs the diffusers, transformers and accelerate packages")
def test_model_path_sparse_refuses_a_transformer_without_a_known_grid(tiny_pipelines, tmp_path):
    proc = python("--model-path", str(tiny_pipelines / "flux"), *PIPELINE_ARGS, "--sparse-tile", "1,2,2",
                  "--sparse-window", "1,1,1", "--output", str(tmp_path / "x.npz"))
    assert proc.returncode == 2 and "FluxTransformer2DModel has no known video grid" in proc.stdout + proc.stderr


def test_model_path_refuses_a_directory_without_a_supported_transformer(tmp_path, capsys):
    if _missing_for_model_path():
        pytest.skip("needs the diffusers, transformers and accelerate packages")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    assert generate.main(["--model-path", str(tmp_path), *PIPELINE_ARGS]) == 2
    err = capsys.readouterr().err
    assert "has no transformer to run in parallel" in err, err
    assert generate.main(["--model-path", str(tmp_path / "nothing"), *PIPELINE_ARGS]) == 2
    assert "neither a directory nor a hub id" in capsys.readouterr().err


def test_cfg_parallel_refuses_a_transformer_without_a_cfg_plan(tmp_path, capsys, monkeypatch):
    if _missing_for_model_path():
        pytest.skip("needs the diffusers, transformers and accelerate packages")
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline", "transformer": ["diffusers", '
                                               '"SD3Transformer2DModel"]}')
    assert generate.main(["--model-path", str(tmp_path), "--cfg-parallel", *PIPELINE_ARGS]) == 2
    err = capsys.readouterr().err
    assert "--cfg-parallel: the transformer SD3Transformer2DModel has no CFG plan" in err, err


@pytest.mark.parametrize("ext", [".gif", ".mp4"])
def test_video_output_written_or_missing_package_named(ext, tmp_path, capsys):
    out = tmp_path / f"video{ext}"
    needed = job_output.WRITERS[ext][0]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        assert generate.main([*TINY, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"needs the {missing[0]} package" in err and "or write .npz" in err, err
        assert not out.exists()
        return
    proc = python(*TINY, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    frames = read_video(out)
    assert frames.shape[1:] == VIDEO_SHAPE[1:] and frames.std() > 5


def read_video(path: Path, fps: int = 16) -> np.ndarray:
    """uint8 ``[F, H, W, 3]`` of a .gif (Pillow) or .mp4 (imageio). Pillow stores a run of identical
    frames as one frame shown for the run's time (a video that holds a picture for several frames), so a
    GIF frame counts as ``duration * fps`` frames."""
    if path.suffix == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            frames = [(np.asarray(f.convert("RGB")), round(f.info["duration"] * fps / 1000))
                      for f in ImageSequence.Iterator(im)]
        return np.stack([frame for frame, count in frames for _ in range(count)])
    import imageio.v3 as iio

    return iio.imread(path, index=None)


# ---- --output is checked before any work, and written after the summary -----------------------------
def test_output_that_is_a_directory_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "video.gif").mkdir()
    (tmp_path / "clip_one_process.gif").mkdir()  # where --verify would write the one-process video
    for output in ("video.gif", "clip.gif"):
        assert generate.main([*TINY, "--output", str(tmp_path / output), "--verify"]) == 2
        err = capsys.readouterr().err
        assert "is a directory; give a file name" in err, err


def test_missing_writer_is_named_before_any_work(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(job_output.importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name, *a))
    assert generate.main([*TINY, "--output", str(tmp_path / "v.gif")]) == 2
    err = capsys.readouterr().err
    assert "needs the PIL package, which is not installed: pip install pillow" in err, err
    assert generate.main([*TINY, "--output", "none", "--num-inference-steps", "1"]) == 0  # none: nothing to write


def test_only_the_writing_rank_checks_the_directory(monkeypatch):
    assert job_output.check_output("/no/such/dir/v.gif", writes=False) == []
    assert job_output.check_output("/no/such/dir/v.avi", writes=False)  # the format: on every rank


def test_summary_and_verdict_come_before_the_file(monkeypatch, tmp_path, capsys):
    """A write that fails after all checks (disk full, say) loses neither the summary nor the verdict."""
    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job_output, "write_video", disk_full)
    assert generate.main([*TINY, "--output", str(tmp_path / "v.npz"), "--verify"]) == 1
    out, err = capsys.readouterr()
    assert "| verify  " in out and "PASS" in out and "| time per step" in out, out
    assert "could not write --output" in err and "No space left on device" in err, err


# ---- the main job: the trained model draws what the prompt asks for ---------------------------------
def shape_track(video: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: fraction of background pixels, the shape's centroid (x, y) in [0, 1], its mean colour."""
    rgb = video.astype(np.float64) / 255
    away = np.abs(rgb - np.array(BACKGROUND)).max(axis=-1)
    shape = away > 0.25
    h, w = shape.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w]
    area = shape.sum(axis=(1, 2))
    centre = np.stack([(shape * xs).sum(axis=(1, 2)) / (area * w), (shape * ys).sum(axis=(1, 2)) / (area * h)], 1)
    core = away > 0.5  # the colour of the shape's inside: its edges blend into the background (every
    colour = (rgb * core[..., None]).sum(axis=(0, 1, 2)) / core.sum()  # colour is >= 0.66 from it somewhere)
    return 1 - area / (h * w), centre, colour


def check_drawn(video: np.ndarray, colour: str, direction: tuple[float, float]) -> None:
    background, centre, mean = shape_track(video)
    assert background.min() > 0.8, background  # a plain background, not noise
    assert np.abs(mean - np.array(COLOURS[colour])).max() < 0.2, (mean, colour)
    travel = centre[-1] - centre[0]
    along = travel @ np.array(direction)
    assert along > 0.3, (centre[0], centre[-1], direction)  # the path is half the frame
    assert abs(travel @ np.array(direction[::-1])) < 0.1, (centre[0], centre[-1])  # and straight


def test_decoded_video_moves_smoothly():
    """Each video frame shows the shape a quarter of a latent frame's step further on, whole: no picture is
    held for 4 frames (the stand-in VAE decodes motion-compensated in-betweens)."""
    from moving_shapes import parse_prompt, render_clips

    prompt = parse_prompt("a red circle moving right")
    latents = render_clips([prompt], 5, 128, 128, torch.Generator().manual_seed(0))[0]
    video = latents_to_video(latents, 17, 128, 128).numpy()
    background, centre, _ = shape_track(video)
    steps = np.diff(centre[:, 0])
    assert steps.min() > 0 and steps.max() < 1.3 * steps.min(), steps
    assert np.ptp(centre[:, 1]) < 0.01, centre
    area = 1 - background
    assert np.abs(area / area[::4].mean() - 1).max() < 0.15, area  # one shape in between, not two half ones


@pytest.mark.slow  # 4 ranks under torchrun; one prompt runs in one process in the fast lane
def test_main_job_draws_the_prompt_on_four_ranks(tmp_path):
    """The Quickstart's command (U=2 x R=2, --verify) with a prompt: the video and its one-process
    rerun both show the prompted shape moving the prompted way, and they agree."""
    out = tmp_path / "video.gif"
    proc = torchrun(4, "--ulysses-degree", "2", "--ring-degree", "2", "--prompt", "a blue square moving up",
                    "--output", str(out), "--verify")
    check_success(proc)
    assert "| weights " in proc.stdout and "trained" in proc.stdout
    assert proc.stdout.index("| verify  ") < proc.stdout.index(f"wrote {out}")  # summary first, then files
    parallel, single = read_video(out), read_video(tmp_path / "video_one_process.gif")
    assert parallel.shape == single.shape == (17, 128, 128, 3)
    check_drawn(parallel, "blue", (0.0, -1.0))
    check_drawn(single, "blue", (0.0, -1.0))
    assert np.abs(parallel.astype(int) - single.astype(int)).mean() < 1  # GIF palettes round a little


@pytest.mark.parametrize("prompt, colour, direction", [
    ("a red circle moving right", "red", (1.0, 0.0)),
    pytest.param("a yellow triangle moving left", "yellow", (-1.0, 0.0), marks=pytest.mark.slow),
    pytest.param("a green square moving down", "green", (0.0, 1.0), marks=pytest.mark.slow),
])
def test_prompts_give_their_colour_and_direction(prompt, colour, direction, tmp_path):
    out = tmp_path / "video.npz"
    proc = python("--prompt", prompt, "--seed", "3", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    check_drawn(load_npz(out)["video"], colour, direction)


def box_fill(video: np.ndarray) -> float:
    """How much of its bounding box the shape fills, averaged over the middle frames (the ends may touch
    the frame's edge): 0.77 for the training circles, 0.97 for squares, 0.61 for triangles."""
    away = np.abs(video.astype(np.float64) / 255 - np.array(BACKGROUND)).max(axis=-1) > 0.25
    fills = []
    for frame in away[4:-4]:
        ys, xs = np.nonzero(frame)
        fills.append(frame.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
    return float(np.mean(fills))


# what the training clips fill of their boxes (the same measure on moving_shapes.render_clips' clips)
TRAINING_FILL = {"circle": 0.77, "square": 0.97, "triangle": 0.61}


@pytest.mark.parametrize("shape", ["circle", "square", pytest.param("triangle", marks=pytest.mark.slow)])
def test_prompts_give_their_shape(shape, tmp_path):
    """The shapes tell apart: the drawn shape fills its box as the training clips of its kind do, nearer to
    them than to any other kind's (circles were once drawn as rounded squares, filling 0.84-0.88)."""
    from moving_shapes import parse_prompt, render_clips

    for kind, fill in TRAINING_FILL.items():  # the reference values are the training data's
        clip = render_clips([parse_prompt(f"a white {kind} moving up")], 5, 128, 128, torch.Generator())[0]
        assert box_fill(latents_to_video(clip, 17, 128, 128).numpy()) == pytest.approx(fill, abs=0.015)
    out = tmp_path / "video.npz"
    proc = python("--prompt", f"a white {shape} moving right", "--seed", "5", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    got = box_fill(load_npz(out)["video"])
    nearest = min(TRAINING_FILL, key=lambda kind: abs(TRAINING_FILL[kind] - got))
    assert nearest == shape and abs(got - TRAINING_FILL[shape]) < 0.05, (shape, got)

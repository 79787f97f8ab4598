"""launch/'s command lines refuse bad input before any work, with a usage error (exit 2), and never write
through a symbolic link or over a file they were not told to replace: generate.py's --output, --model-path and
--prompt, its argparse errors under torchrun, and train_builtin.py's arguments and weights file.

Fast: the parsers and checks are called directly; nothing is trained, no model runs, no process group starts
(the one torchrun case is in tests/distributed/test_generate.py).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
sys.path.insert(0, str(LAUNCH))  # the launch scripts import their siblings by name

import builtin_weights  # noqa: E402
import generate  # noqa: E402
import job_output  # noqa: E402
import moving_shapes  # noqa: E402
import train_builtin  # noqa: E402

SHIPPED = builtin_weights.WEIGHTS_PATH


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shipped_digest() -> str:
    return _digest(SHIPPED)


@pytest.fixture
def fake_training(monkeypatch, tmp_path):
    """train() returns a tiny model at once; ``calls`` counts how often it ran. The module's idea of the
    shipped weights points at a copy, so even a wrong default cannot touch the real file."""
    calls = []

    def fake_train(steps, batch, lr, seed, log_every=50, cfg=None, device="cpu"):
        calls.append(steps)
        fake_train.last = (cfg, device)
        return torch.nn.Linear(2, 2), {"steps": steps, "train_seconds": 0}

    copy = tmp_path / "shipped" / "moving_shapes.pt"
    copy.parent.mkdir()
    copy.write_bytes(b"shipped weights")
    monkeypatch.setattr(train_builtin, "train", fake_train)
    monkeypatch.setattr(train_builtin, "WEIGHTS_PATH", copy)
    return calls


def _usage_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---- item 6: train_builtin.py writes a new file, never the shipped weights ---------------------------------
def test_train_default_writes_a_new_file_in_the_current_directory(fake_training, tmp_path, monkeypatch,
                                                                   shipped_digest, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_builtin.main(["--steps", "2"]) == 0
    written = tmp_path / "moving_shapes.pt"
    assert torch.load(written, weights_only=True)["info"]["steps"] == 2
    assert (tmp_path / "shipped" / "moving_shapes.pt").read_bytes() == b"shipped weights"
    assert _digest(SHIPPED) == shipped_digest
    # Run again in the same place: the first result is kept.
    before = written.read_bytes()
    err = _usage_error(capsys, train_builtin.main, ["--steps", "2"])
    assert "already exists" in err and written.read_bytes() == before, err
    assert fake_training == [2]


def test_train_device_and_depth_reach_the_training(fake_training, tmp_path, capsys):
    assert train_builtin.main(["--steps", "2", "--device", "cpu", "--num-layers", "3", "--out",
                               str(tmp_path / "w.pt")]) == 0
    cfg, device = train_builtin.train.last
    assert (cfg.num_layers, cfg.hidden_size, device) == (3, 128, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_unusable_device_is_a_usage_error(fake_training, tmp_path, capsys):
    err = _usage_error(capsys, train_builtin.main, ["--device", "cuda", "--out", str(tmp_path / "w.pt")])
    assert "--device 'cuda' cannot be used here" in err, err
    assert fake_training == [] and not (tmp_path / "w.pt").exists()


def test_train_refuses_an_existing_file_before_training(fake_training, tmp_path, capsys):
    existing = tmp_path / "w.pt"
    existing.write_bytes(b"keep")
    err = _usage_error(capsys, train_builtin.main, ["--out", str(existing)])
    assert "already exists" in err and "--overwrite" in err, err
    assert fake_training == [] and existing.read_bytes() == b"keep"
    # The shipped weights are named as such.
    err = _usage_error(capsys, train_builtin.main, ["--out", str(train_builtin.WEIGHTS_PATH)])
    assert "shipped weights" in err and "--overwrite" in err, err
    assert fake_training == []


def test_train_overwrites_only_when_asked(fake_training, tmp_path):
    existing = tmp_path / "w.pt"
    existing.write_bytes(b"old")
    assert train_builtin.main(["--out", str(existing), "--overwrite", "--steps", "3"]) == 0
    assert torch.load(existing, weights_only=True)["info"]["steps"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name != "shipped"] == ["w.pt"]  # no temporary file left


def test_train_refuses_a_symlink_out(fake_training, tmp_path, capsys):
    target = tmp_path / "target.pt"
    target.write_bytes(b"keep")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(tmp_path / "nowhere.pt")
    for out in (link, dangling):
        for extra in ([], ["--overwrite"]):
            err = _usage_error(capsys, train_builtin.main, ["--out", str(out), *extra])
            assert "symbolic link" in err, err
    assert fake_training == [] and target.read_bytes() == b"keep" and not (tmp_path / "nowhere.pt").exists()


def test_save_weights_never_follows_a_link(tmp_path):
    """A link that appears at --out after the checks (during training) is neither followed nor, unless
    overwriting was asked, replaced."""
    target = tmp_path / "target.pt"
    target.write_bytes(b"keep")
    link = tmp_path / "w.pt"
    link.symlink_to(target)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(FileExistsError):
        builtin_weights.save_weights(model, {"steps": 1}, link)
    assert link.is_symlink() and target.read_bytes() == b"keep"
    builtin_weights.save_weights(model, {"steps": 1}, link, overwrite=True)
    assert not link.is_symlink() and target.read_bytes() == b"keep"
    assert torch.load(link, weights_only=True)["info"] == {"steps": 1}


# ---- item 11: train_builtin.py's bad arguments are usage errors before any work -----------------------------
@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--steps", "-3"], "argument --steps: expected a positive integer, got -3"),
    (["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
    (["--threads", "-1"], "argument --threads: expected a positive integer, got -1"),
    (["--lr", "0"], "argument --lr: expected a positive finite number, got 0"),
    (["--lr", "nan"], "argument --lr: expected a positive finite number, got nan"),
])
def test_train_bad_numbers_are_usage_errors(argv, message, fake_training, tmp_path, capsys):
    err = _usage_error(capsys, train_builtin.main, [*argv, "--out", str(tmp_path / "w.pt")])
    assert message in err and "usage:" in err, err
    assert fake_training == []


def test_train_out_directory_or_missing_directory_is_a_usage_error(fake_training, tmp_path, capsys):
    err = _usage_error(capsys, train_builtin.main, ["--out", str(tmp_path)])
    assert "is a directory" in err and "give a file name" in err, err
    err = _usage_error(capsys, train_builtin.main, ["--out", str(tmp_path / "no" / "w.pt")])
    assert "does not exist" in err, err
    assert fake_training == []


# ---- item 7: generate.py --output: no symbolic links, written link-safe -----------------------------------
def test_output_symlink_is_refused_before_any_work(tmp_path, capsys):
    target = tmp_path / "target.npz"
    target.write_bytes(b"keep")
    (tmp_path / "link.npz").symlink_to(target)
    (tmp_path / "dangling.npz").symlink_to(tmp_path / "nowhere.npz")
    (tmp_path / "clip_one_process.npz").symlink_to(target)  # where --verify would write the rerun's video
    for name, extra in (("link.npz", []), ("dangling.npz", []), ("clip.npz", ["--verify"])):
        assert generate.main(["--output", str(tmp_path / name), *extra]) == 2
        err = capsys.readouterr().err
        assert "is a symbolic link" in err and "give the path of a new or regular file" in err, err
    assert target.read_bytes() == b"keep" and not (tmp_path / "nowhere.npz").exists()


@pytest.mark.parametrize("ext", [".npz", ".gif"])
def test_write_video_replaces_a_link_instead_of_writing_its_target(ext, tmp_path):
    """A link made at --output after the check (while the job ran) is replaced, its target untouched."""
    pytest.importorskip("PIL" if ext == ".gif" else "numpy")
    video = torch.full((2, 16, 16, 3), 200, dtype=torch.uint8)
    target = tmp_path / f"target{ext}"
    target.write_bytes(b"keep")
    for name, points_to in (("link", target), ("dangling", tmp_path / f"nowhere{ext}")):
        path = tmp_path / f"{name}{ext}"
        path.symlink_to(points_to)
        job_output.write_video(str(path), video, fps=16)
        assert not path.is_symlink() and path.stat().st_size > 0
    assert target.read_bytes() == b"keep" and not (tmp_path / f"nowhere{ext}").exists()
    # A regular file is still replaced (generate.py has always overwritten its output), with no leftovers.
    job_output.write_video(str(tmp_path / f"link{ext}"), video, fps=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"target{ext}", f"link{ext}", f"dangling{ext}"])


def test_write_video_output_mode_follows_umask(tmp_path):
    job_output.write_video(str(tmp_path / "v.npz"), torch.zeros(1, 16, 16, 3, dtype=torch.uint8), fps=16)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "v.npz").stat().st_mode & 0o777 == 0o666 & ~umask
    with np.load(tmp_path / "v.npz") as data:
        assert data["video"].shape == (1, 16, 16, 3)


# ---- item 11: --model-path with a broken model_index.json ---------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"{not json", "model_index.json is not valid JSON"),
    (b"\xff\xfe\x00binary", "model_index.json is not valid JSON"),
    (b"[1, 2]", "model_index.json is not a JSON object"),
])
def test_model_path_with_a_broken_model_index_is_a_usage_error(content, message, tmp_path, capsys):
    (tmp_path / "model_index.json").write_bytes(content)
    assert generate.main(["--model-path", str(tmp_path), "--output", "none"]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_malformed_transformer_entries_name_no_transformer():
    import diffusers_job

    index = {"transformer": ["diffusers"], "transformer_2": [None, 3], "unet": ["diffusers", "UNet2DConditionModel"]}
    assert diffusers_job._transformer_classes(index) == []
    assert diffusers_job._transformer_classes({"transformer": ["diffusers", "WanTransformer3DModel"]}) == [
        "WanTransformer3DModel"]


# ---- item 12: argparse errors: rank 0 prints the usage, the other ranks exit 2 quietly --------------------
def test_bad_argument_usage_on_rank_zero_only(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)  # not under torchrun: no wait for rank 0
    monkeypatch.setenv("RANK", "0")
    err = _usage_error(capsys, generate.main, ["--num-frames", "abc"])
    assert err.count("usage: generate.py") == 1 and "argument --num-frames: expected a positive integer" in err, err
    monkeypatch.setenv("RANK", "3")
    assert _usage_error(capsys, generate.main, ["--num-frames", "abc"]) == ""
    assert _usage_error(capsys, generate.main, ["--no-such-flag"]) == ""
    with pytest.raises(SystemExit) as exc:
        generate.main(["--help"])
    assert exc.value.code == 0 and capsys.readouterr().out == ""


def test_argument_problems_said_once_per_machine(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)  # not under torchrun: no wait for rank 0
    monkeypatch.setenv("WORLD_SIZE", "16")
    for rank, local_rank, says in [("0", "0", True), ("3", "3", False), ("8", "0", True)]:  # two machines of 8
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert generate.main(["--ulysses-degree", "4", "--output", "none"]) == 2
        err = capsys.readouterr().err
        assert (f"error (rank {rank}): --ulysses-degree 4 x --ring-degree 1 = 4 must equal the number of ranks, 16"
                in err) if says else err == "", (rank, err)


# ---- item 13: prompts outside the built-in model's vocabulary ---------------------------------------------
def test_prompt_with_unknown_words_is_refused_with_the_vocabulary(capsys):
    assert generate.main(["--prompt", "a cat playing piano", "--output", "none"]) == 2
    err = capsys.readouterr().err
    assert "--prompt 'a cat playing piano'" in err and "cat, playing, piano" in err, err
    for word in ("red", "purple", "circle", "triangle", "left", "down"):
        assert word in err, err
    assert "--model-path" in err, err  # where free text goes


@pytest.mark.parametrize("flag, text, message", [
    ("--prompt", "a red circle moving sideways", "sideways"),
    ("--prompt", "a moving", "names no colour, shape or direction"),
    ("--negative-prompt", "blurry", "blurry"),
    ("--prompt", "a red blue circle", "names more than one colour: red, blue"),
])
def test_prompt_problems(flag, text, message, capsys):
    assert generate.main([flag, text, "--output", "none"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {text!r}" in err and message in err, err


def test_prompts_the_model_knows_still_parse():
    parse = moving_shapes.parse_prompt
    assert parse("a red circle moving right") == moving_shapes.Prompt("red", "circle", "right")
    assert parse("A blue square, moving up.") == moving_shapes.Prompt("blue", "square", "up")
    assert parse("White triangles, going left!") == moving_shapes.Prompt("white", "triangle", "left")
    assert parse("purple") == moving_shapes.Prompt("purple")
    assert parse("") == parse("  ") == moving_shapes.Prompt()  # empty: unconditional (the default negative prompt)
    with pytest.raises(ValueError, match="piano"):
        parse("a red circle playing piano")

"""``usp-attn info`` / ``python -m usp_attn info``: parsing, the backend table, the picks it reports.

Platforms are injected with ``override_platform`` so the CUDA/ROCm/MPS rows are checked on a
CPU machine; one test runs the real module in a subprocess on the real platform.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from usp_attn import selector
from usp_attn.backends.enum import valid_backend_names
from usp_attn.cli import collect_info, format_info, main
from usp_attn.platforms import Platform, current_platform, override_platform

REPO = pathlib.Path(__file__).resolve().parents[2]

HOPPER_FA3 = Platform.make("cuda", capability=(9, 0), packages={"flash_attn_interface": "3.0.0"}, device_name="H100")
HOPPER_FA2 = Platform.make("cuda", capability=(9, 0), packages={"flash_attn": "2.7.4"}, device_name="H100")
AMPERE_SAGE1 = Platform.make(
    "cuda", capability=(8, 0), packages={"flash_attn": "2.7.4", "sageattention": "1.0.6"}, device_name="A100"
)
ROCM = Platform.make("rocm", packages={"flash_attn": "2.6.3", "aiter": "0.1"}, device_name="MI300X")
MPS = Platform.make("mps", device_name="Apple MPS")
CPU = Platform.make("cpu")


def run_json(capsys, platform: Platform, *args: str) -> dict:
    with override_platform(platform):
        rc = main(["info", "--json", *args])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def rows(info: dict) -> dict[str, dict]:
    return {b["backend"]: b for b in info["backends"]}


def rejected(sel: dict) -> dict[str, str]:
    return {r["backend"]: r["reason"] for r in sel["rejected"]}


# ---- the table and the picks, per platform ----------------------------------------------
def test_text_output_on_cpu_lists_every_backend_and_the_pick(capsys):
    with override_platform(CPU):
        assert main(["info"]) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
             {"fa", "torch_sdpa", "sage_attn", "sage_attn_3", "aiter"}}
    assert set(table) == {"fa", "torch_sdpa", "sage_attn", "sage_attn_3", "aiter"}
    assert table["torch_sdpa"].split()[1] == "yes"
    for name in ("fa", "sage_attn", "sage_attn_3", "aiter"):
        assert table[name].split()[1] == "no"
    assert "fa needs CUDA/ROCM, this machine is CPU" in table["fa"]
    assert "backends for dtype=bfloat16 head_size=128:" in out
    assert "automatic pick: torch_sdpa (source: auto)" in out


def test_json_hopper_with_fa3_picks_fa(capsys):
    info = run_json(capsys, HOPPER_FA3)
    assert info["platform"] == {"kind": "cuda", "device_name": "H100", "capability": [9, 0],
                                "description": "cuda sm90 (H100)"}
    assert info["kernel_packages"]["flash_attn_interface"]["installed"] is True
    assert info["kernel_packages"]["flash_attn"]["installed"] is False
    r = rows(info)
    assert r["fa"]["available"] and r["fa"]["kernel"] == "*FA3 3.0.0 (D 8..256, multiples of 8)"
    assert r["torch_sdpa"]["kernel"] == "aten cudnn"
    assert "'sageattention' package" in r["sage_attn"]["reason"]
    assert info["auto_order"] == ["fa", "torch_sdpa"]
    assert info["auto"]["backend"] == "fa" and info["auto"]["rejected"] == []
    assert info["requested"] is None


def test_hopper_with_only_fa2_auto_prefers_cudnn_sdpa_but_honours_a_request(capsys):
    info = run_json(capsys, HOPPER_FA2, "--attention-backend", "fa")
    assert rows(info)["fa"]["available"] and rows(info)["fa"]["kernel"] == "*FA2 2.7.4 (D 8..256, multiples of 8)"
    assert info["auto_order"] == ["torch_sdpa"]
    assert info["auto"]["backend"] == "torch_sdpa"
    req = info["requested"]
    assert (req["backend"], req["requested"], req["source"], req["fell_back"]) == ("fa", "fa", "cli", False)


def test_fp32_rejects_fa_and_the_request_falls_back(capsys):
    info = run_json(capsys, HOPPER_FA3, "--dtype", "fp32", "--attention-backend", "FA3")
    assert info["query"]["dtype"] == "float32"
    assert rows(info)["fa"]["available"] is False
    assert "does not support dtype float32" in rows(info)["fa"]["reason"]
    assert info["auto"]["backend"] == "torch_sdpa"
    req = info["requested"]
    assert req["requested"] == "fa" and req["backend"] == "torch_sdpa" and req["fell_back"] is True
    assert "float32" in rejected(req)["fa"]


def test_unsupported_head_size_is_a_reason_and_auto_passes_over_fa(capsys):
    info = run_json(capsys, AMPERE_SAGE1, "--head-size", "100")
    assert info["query"]["head_size"] == 100
    assert "not 100" in rows(info)["fa"]["reason"]
    assert "not 100" in rows(info)["sage_attn"]["reason"]
    assert info["auto"]["backend"] == "torch_sdpa"
    assert "not 100" in rejected(info["auto"])["fa"]


def test_need_lse_rejects_sage1_and_request_follows_the_fallback_chain(capsys):
    info = run_json(capsys, AMPERE_SAGE1, "--need-lse", "--attention-backend", "sage_attn")
    r = rows(info)["sage_attn"]
    assert r["available"] is False and r["supports_lse"] is False and r["kernel"] == "SageAttention 1"
    assert "log-sum-exp" in r["reason"]
    req = info["requested"]
    # FALLBACK_CHAIN[sage_attn] = (fa, torch_sdpa); fa can run on this A100
    assert req["backend"] == "fa" and req["fell_back"] is True
    assert list(rejected(req)) == ["sage_attn"]


def test_need_mask_routes_auto_to_sdpa(capsys):
    info = run_json(capsys, HOPPER_FA3, "--need-mask")
    assert "does not support attention masks" in rows(info)["fa"]["reason"]
    assert info["auto"]["backend"] == "torch_sdpa"
    assert "masks" in rejected(info["auto"])["fa"]


def test_mps_request_for_fa_falls_back_to_sdpa(capsys):
    info = run_json(capsys, MPS, "--attention-backend", "fa")
    assert info["platform"]["capability"] is None
    assert info["auto"]["backend"] == "torch_sdpa"
    assert info["requested"]["backend"] == "torch_sdpa" and info["requested"]["fell_back"] is True
    assert "this machine is MPS" in rejected(info["requested"])["fa"]


def test_rocm_auto_fa_and_aiter_on_request(capsys):
    info = run_json(capsys, ROCM, "--dtype", "fp16", "--attention-backend", "aiter")
    assert info["auto"]["backend"] == "fa"
    assert info["requested"]["backend"] == "aiter" and info["requested"]["fell_back"] is False
    assert "needs CUDA" in rows(info)["sage_attn"]["reason"]


def test_info_leaves_process_settings_untouched(capsys):
    with selector.global_force_attn_backend_context_manager("sage_attn"):
        info = run_json(capsys, CPU, "--attention-backend", "fa")
        # the report is what a fresh process would do, not this process's forced value
        assert info["auto"]["source"] == "auto" and info["requested"]["source"] == "cli"
        assert selector.get_global_forced_attn_backend() is selector.AttentionBackendEnum.SAGE_ATTN
        assert selector.get_cli_attention_backend() is None


def test_text_header_shows_the_cuda_build():
    info = collect_info(platform=HOPPER_FA3)
    info["torch"] = {"version": "2.11.0+cu130", "cuda": "13.0", "hip": None, "cudnn": 91900}
    text = format_info(info)
    assert "torch 2.11.0+cu130 (cuda 13.0, cudnn 9.19.0)" in text
    assert "platform: cuda  device: H100  capability: 9.0" in text
    assert "flash_attn_interface=3.0.0" in text and "flash_attn=-" in text
    info["torch"]["cudnn"] = 8902
    assert "cudnn 8.9.2" in format_info(info)


# ---- argument errors fail at parse time --------------------------------------------------
def test_unknown_backend_exits_2_listing_valid_names(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", "--attention-backend", "flash"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown attention backend 'flash'" in err
    for name in valid_backend_names():
        assert name in err


@pytest.mark.parametrize("args", [["info", "--head-size", "0"], ["info", "--dtype", "fp64"], []])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-v", "info"], pytest.param(["info", "-v"], marks=pytest.mark.slow),
                                  pytest.param(["info", "--verbose"], marks=pytest.mark.slow)])
def test_verbose_before_or_after_the_subcommand_shows_the_fallback_warning(argv):
    proc = subprocess.run([sys.executable, "-m", "usp_attn", *argv, "--attention-backend", "sage_attn_3"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING usp_attn: usp_attn: requested attention backend 'sage_attn_3' cannot run" in proc.stderr


# ---- the real module, real platform ------------------------------------------------------
def test_python_m_usp_attn_info_json_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "usp_attn", "info", "--json"], capture_output=True, text=True, timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["torch"]["version"] == torch.__version__
    assert info["platform"]["kind"] == str(current_platform().kind)
    assert rows(info)["torch_sdpa"]["available"] is True  # runs on every platform


def test_readme_documents_the_ci_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    match = re.search(r'^TEST_CMD="([^"]+)"$', ci, flags=re.M)
    assert match, ".ci/run must define TEST_CMD"
    readme_lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines()]
    assert match.group(1) in readme_lines, f"README.md must show the CI test command: {match.group(1)}"


H200_FA4 = Platform.make("cuda", capability=(9, 0), packages={"flash_attn.cute": "4.0.0b36"}, device_name="H200",
                         unusable={"flash_attn": "flash_attn is a namespace package without flash_attn_func"})


def test_info_names_the_fa_generation_version_head_sizes_and_unusable_packages(capsys):
    info = run_json(capsys, H200_FA4, "--head-size", "64")
    assert rows(info)["fa"]["kernel"] == "*FA4 4.0.0b36 (D 8..256, multiples of 8)"
    assert info["kernel_packages"]["flash_attn"]["unusable"].startswith("flash_attn is a namespace package")
    with override_platform(H200_FA4):
        assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "flash_attn=unusable" in text and "flash_attn is present but unusable" in text
    blackwell = Platform.make("cuda", capability=(10, 0), packages={"flash_attn.cute": "4.0.0b36", "flash_attn": "2.8.3"})
    info = run_json(capsys, blackwell, "--head-size", "192")  # FA4 on SM100 cannot take 192; FA2 runs it
    assert rows(info)["fa"]["kernel"] == ("FA4 4.0.0b36 (D 8..128 or 256, multiples of 8); "
                                          "*FA2 2.8.3 (D 8..256, multiples of 8)")


def test_info_shape_without_cuda_says_why_nothing_was_measured(capsys):
    info = run_json(capsys, H200_FA4, "--shape", "1,24,2048,128")
    m = info["measurement"]
    assert m["error"] == "measuring needs a CUDA GPU"
    assert m["candidates"] == ["fa4", "cudnn", "flash", "efficient"]
    assert m["static"] == "torch_sdpa"  # 2048 keys: below the Hopper threshold, cuDNN
    info = run_json(capsys, H200_FA4, "--shape", "1,24,4608,128")
    assert info["measurement"]["static"] == "fa (fa4)"


@pytest.mark.parametrize("bad", ["1,2,3", "1,2,3,0", "a,b,c,d"])
def test_info_shape_is_checked(capsys, bad):
    with pytest.raises(SystemExit) as exc:
        main(["info", "--shape", bad])
    assert exc.value.code == 2 and "expected B,H,S,D" in capsys.readouterr().err

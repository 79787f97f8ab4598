"""Re-initialising under torchrun, as a user script does it: init, use, destroy, init another
layout, ... with usp_attn creating the default process group (the case that used to fail with
"Connection refused" or hang: torch names a re-created default group like the destroyed one, and
torchrun's store still holds the old group's keys) and then with the script owning it. Also bad
``timeout`` values and a failed init, which must leave no process group behind (reinit_job.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("reinit_job.py")
pytestmark = pytest.mark.xdist_group("reinit_torchrun")


def torchrun(nproc: int, *args: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
         "--standalone", str(JOB), *args],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(line["rank"] for line in lines) == list(range(nproc)), proc.stdout
    return lines


def test_reinit_under_torchrun():
    """4 ranks: usp_attn owns the default group (phase 1), then the script does (phase 2)."""
    layouts = ["2x2", "4x1", "1x4", "2x2"]
    for line in torchrun(4, "--layouts", ",".join(layouts)):
        assert line["layouts"] == [f"usp:{x}" for x in layouts] + [f"own:{x}" for x in layouts], line
        timeout_errors, init_error = line["errors"][:5], line["errors"][5:]
        assert len(timeout_errors) == 5 and all(e.startswith("timeout must be") for e in timeout_errors), line
        assert "'abc'" in timeout_errors[0] and "nan" in timeout_errors[1] and "-5" in timeout_errors[2], line
        assert "got 0" in timeout_errors[3] and "inf" in timeout_errors[4], line
        assert init_error == ["AttentionBackendUnavailableError"], line
        assert line["seconds"] < 60, line  # each init/use/destroy takes well under a second

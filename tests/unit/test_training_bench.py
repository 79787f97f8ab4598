"""The suite's ring-backward part on CPU (--dry-run shapes): the simulated ring rank's forward +
backward runs through the library's autograd code and its output and dq rows match the full
kernel call (fp32: ~3e-7 relative measured; 2e-5 allowed). The training-step rows run in
tests/distributed/test_gradients.py (they need a process group)."""

from __future__ import annotations

import json

from benchmarks import run, training


def test_ring_backward_dry_run(tmp_path):
    out = tmp_path / "rows.json"
    assert run.main(["--dry-run", "--parts", "ring-backward", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["parts"]["ring-backward"]["rows"]
    assert [row["ring_degree"] for row in rows] == list(training.RING_DEGREES) * len(training.DRY_SHAPES)
    for row in rows:
        assert row["full_fwd_bwd_ms"] > 0 and row["ring_rank_fwd_bwd_ms"] > 0
        assert row["out_rel_err"] <= 2e-5 and row["dq_rel_err"] <= 2e-5, row

"""The suite's causal-balance part on CPU (--dry-run): every simulated ring rank runs the library's
ring loop in both layouts; the ranks' rows put together equal the full causal call (fp32: ~1e-7
relative measured, 2e-5 allowed), and the counted work is balanced only in the zigzag layout."""

from __future__ import annotations

import json

from benchmarks import causal_balance, run


def test_causal_balance_dry_run(tmp_path):
    out = tmp_path / "rows.json"
    assert run.main(["--dry-run", "--parts", "causal-balance", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["parts"]["causal-balance"]["rows"]
    assert [(row["ring_degree"], row["layout"]) for row in rows] == [
        (r, layout) for r in causal_balance.RING_DEGREES for layout in causal_balance.LAYOUTS]
    for row in rows:
        assert row["out_rel_err"] <= 2e-5, row
        assert len(row["rank_ms"]) == row["ring_degree"] and row["slowest_ms"] == max(row["rank_ms"])
        if row["layout"] == "zigzag":
            assert row["pairs_imbalance"] <= 1.01, row
        else:
            assert row["pairs_imbalance"] >= 1.4, row  # the last rank: (2R - 1) / R of the mean

"""examples/layer_budgets.py runs end to end on a tiny setting and writes a
JSON with every method's row and a plot."""

from __future__ import annotations

import json

from harness import load_example


def test_layer_budgets_quick(tmp_path):
    out, png = tmp_path / "lb.json", tmp_path / "lb.png"
    ex = load_example("layer_budgets")
    returned = ex.main(["--quick", "--budgets", "flops", "--steps", "30", "--ft-steps", "4",
                        "--iterations", "1", "--population", "4", "--updates", "1",
                        "--reps", "1", "--no-progress", "--json", str(out), "--plot", str(png)])
    res = json.loads(out.read_text())
    assert set(res) == set(returned)
    assert [r["method"] for r in res["rows"]] == list(ex.METHODS)
    assert png.stat().st_size > 1000
    dense = res["dense"]
    for r in res["rows"]:
        assert 0.0 <= r["accuracy_mean"] <= 1.0 and 0.0 <= r["pruned_mean"] <= 1.0
        assert r["macs_mean"] <= 0.5 * dense["macs"]  # the budget is met...
        if r["method"] != "uniform":  # ...to within one unit's MACs (uniform: one rate)
            assert r["macs_mean"] > 0.5 * dense["macs"] - 64 * 3 * 20
        assert len(r["kept"]) == len(ex.CHANNELS)

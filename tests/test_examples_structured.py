"""examples/structured.py runs in quick mode on a tiny setting: the compacted
model is smaller, computes what the masked one computes, and the unstructured
model has the same number of nonzero parameters at the dense shapes."""

from __future__ import annotations

import json

from harness import load_example


def test_structured_quick(tmp_path):
    out, png = tmp_path / "structured.json", tmp_path / "structured.png"
    returned = load_example("structured").main(
        ["--quick", "--steps", "40", "--finetune", "20", "--widths", "8,16,16", "--hidden", "16",
         "--reps", "3", "--no-progress", "--json", str(out), "--plot", str(png)])
    res = json.loads(out.read_text())
    assert set(res) == set(returned) == {"config", "device", "jax", "wall_time_s", "rows",
                                         "per_seed", "load_average"}
    assert png.stat().st_size > 1000
    rows = {r["model"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "structured 50%", "unstructured 50%"]
    dense, st, un = rows["dense"], rows["structured 50%"], rows["unstructured 50%"]
    seed = res["per_seed"][0]
    # Half of the units of every prunable group are gone: conv widths 8-16-16 -> 4-8-8,
    # dense 16 -> 8 (the 10 outputs stay).
    assert seed["structured 50%"]["shapes"] == {
        "conv1": [5, 1, 4], "conv2": [5, 4, 8], "conv3": [3, 8, 8], "fc": [80, 8], "head": [8, 10]}
    assert st["params"] < dense["params"] / 2 and st["macs"] < dense["macs"] / 2
    # The compacted model computes what the masked model computes.
    assert st["max_masked_vs_compact_diff"] == 0.0
    # Unstructured: the structured model's parameter count in nonzeros, dense shapes and MACs.
    assert abs(un["params"] - st["params"]) <= 2
    assert un["macs"] == dense["macs"] and un["nonzero_macs"] < dense["macs"]
    for r in rows.values():
        assert 0.0 <= r["acc_mean"] <= 1.0
        assert r["wall_ms"] > 0 and r["cpu_ms"] > 0
    assert dense["acc_mean"] > 0.2  # 40 Adam steps already beat chance (10 classes)
    # The saved JSON alone gives the table and the plot again.
    png2 = tmp_path / "again.png"
    again = load_example("structured").main(["--from-json", str(out), "--plot", str(png2)])
    assert again["rows"] == res["rows"] and png2.stat().st_size > 1000

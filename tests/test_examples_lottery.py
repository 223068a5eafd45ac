"""examples/lottery_mnist1d.py runs in quick mode on a tiny setting and writes
a JSON with the expected keys and sane values."""

from __future__ import annotations

import json

import numpy as np
from harness import load_example


def test_lottery_mnist1d_quick(tmp_path):
    out = tmp_path / "lottery.json"
    png = tmp_path / "lottery.png"
    returned = load_example("lottery_mnist1d").main(
        ["--quick", "--steps", "30", "--rounds", "2", "--seeds", "1", "--hidden", "64",
         "--eval-every", "10", "--no-progress", "--json", str(out), "--plot", str(png)]
    )
    res = json.loads(out.read_text())
    assert set(res) == set(returned)
    assert {"config", "dense", "rows", "per_seed", "targets", "wall_time_s"} <= set(res)
    assert png.stat().st_size > 1000
    rows = res["rows"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # Exact IMP sparsity of the three kernels together: 20% of the rest per round.
    n = 40 * 64 + 64 * 64 + 64 * 10
    for r, row in enumerate(rows):
        assert row["remaining"] == round(n * 0.8**r) / n
        for v in ("ticket", "random_mask", "random_reinit"):
            for kind in ("final", "best"):
                acc = row[f"{v}_{kind}_mean"]
                assert 0.0 <= acc <= 1.0
            assert row[f"{v}_best_mean"] >= row[f"{v}_final_mean"]
    # 30 Adam steps already beat chance (10 classes) clearly.
    assert res["dense"]["final_mean"] > 0.2
    assert np.array(res["per_seed"]["ticket_final"]).shape == (1, 3)
    t = res["targets"]
    assert {"sparsity_90", "sparsity_96", "ticket_ge_dense_at_90",
            "ticket_beats_random_mask_by_10pts_at_96"} <= set(t)

"""examples/width_lm.py in quick mode: heads and MLP neurons compact to the
masked model's perplexity, the hidden size does not until the RMSNorm
scales are rescaled, and the JSON and plot are written."""

from __future__ import annotations

import json

import pytest
from harness import load_example


def test_width_lm_quick(tmp_path):
    out, png = tmp_path / "w.json", tmp_path / "w.png"
    module = load_example("width_lm")
    module.main(["--quick", "--results", str(tmp_path / "ckpt"), "--no-progress",
                 "--json", str(out), "--plot", str(png)])
    res = json.loads(out.read_text())
    assert png.stat().st_size > 1000
    rows = res["results"]
    assert list(rows) == list(module.QUICK_SETTINGS)
    for name in ("heads 50%", "MLP 50%"):
        assert rows[name]["compacted"] == pytest.approx(rows[name]["masked"], rel=1e-5)
    h = rows["hidden 25%"]
    assert h["d"] == 48 and h["params_frac"] < 0.8
    assert abs(h["compacted"] / h["masked"] - 1) > 1e-3  # the norm statistics changed
    assert h["rescaled"] == pytest.approx(h["masked"], rel=1e-4)  # and the rescale undoes it
    assert rows["heads 50%"]["heads"] == 1 and rows["MLP 50%"]["mlp"] == 32

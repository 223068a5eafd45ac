"""examples/compare_methods.py runs end to end in a tiny quick mode."""

from __future__ import annotations

import json

import pytest
from harness import load_example

from jaxprune.core.select import keep_count


def test_compare_methods_tiny(tmp_path):
    out = tmp_path / "study.json"
    png = tmp_path / "study.png"
    res = load_example("compare_methods").main([
        "--quick", "--steps", "4", "--seeds", "2", "--samples", "200", "--channels", "4",
        "--sparsities", "0.9", "--methods", "dense,random",
        "--json", str(out), "--plot", str(png),
    ])
    written = json.loads(out.read_text())
    assert set(written) == set(res)
    assert png.stat().st_size > 1000
    r = written["results"]
    assert set(r) == {"dense", "random"}
    # Kernels conv2 (5*4*4), conv3 (5*4*4), dense (40*10): exact per-kernel counts.
    sizes = [80, 80, 400]
    want = 1 - sum(keep_count(n, 0.9) for n in sizes) / sum(sizes)
    for m in ("random",):
        assert r[m]["0.90"]["mask_sparsity"] == pytest.approx(want, abs=1e-6)
        assert len(r[m]["0.90"]["acc"]) == 2
    assert r["dense"]["0.00"]["mask_sparsity"] == 0.0

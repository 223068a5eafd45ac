"""examples/compress.py runs in quick mode on tiny settings: every stage is
measured, compaction and int8 shrink the written files, quantization keeps
the pruned zeros, and the 2:4 one-shot rows are exactly 2:4."""

from __future__ import annotations

import json

import numpy as np
import pytest
from harness import load_example

pytest.importorskip("qwix")

STAGES = ["dense", "structured 50%", "structured 50% + distill", "+ int8 PTQ", "+ int8 QAT",
          "exported"]


def check_stages(rows, metric):
    assert [r["stage"] for r in rows] == STAGES
    r = {x["stage"]: x for x in rows}
    dense, small = r["dense"], r["structured 50% + distill"]
    assert small["params"] < dense["params"] and small["macs"] < dense["macs"]
    assert r["structured 50%"]["params"] == small["params"]
    for q in ("+ int8 PTQ", "+ int8 QAT"):
        assert r[q]["params"] == small["params"] and r[q]["bytes"] < small["bytes"]
    for x in rows[:-1]:
        assert np.isfinite(x[metric]) and x["xla_ms"] > 0 and x["deflate_bytes"] > 0
    exported = r["exported"]
    assert exported["stablehlo_bytes"] > 0 and exported["litert_bytes"] > 0
    assert exported["litert_ms"] > 0 and np.isfinite(exported["litert_metric"])


def test_compress_quick_cnn(tmp_path):
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    returned = load_example("compress").main(
        ["--quick", "--models", "cnn", "--steps", "20", "--finetune", "10", "--qat", "4",
         "--reps", "2", "--no-progress", "--json", str(out), "--plot", str(png)])
    res = json.loads(out.read_text())
    assert set(res) == set(returned) == {"config", "device", "jax", "cnn", "wall_time_s",
                                         "load_average"}
    check_stages(res["cnn"]["rows"], "acc")
    assert res["cnn"]["zeros_kept"] is True
    assert all(0 <= r["acc"] <= 1 for r in res["cnn"]["rows"][:-1])
    assert png.stat().st_size > 1000


def test_compress_quick_lm(tmp_path):
    out = tmp_path / "l.json"
    load_example("compress").main(
        ["--quick", "--models", "lm", "--lm-steps", "6", "--lm-finetune", "4", "--lm-qat", "2",
         "--reps", "2", "--no-progress", "--results", str(tmp_path / "ckpt"),
         "--json", str(out)])
    res = json.loads(out.read_text())["lm"]
    check_stages(res["rows"], "ppl")
    rows = {r["method"]: r for r in res["oneshot"]}
    assert list(rows) == ["dense", "2:4 SparseGPT", "2:4 SparseGPT, then int8 RTN",
                          "2:4 SparseGPT with int8 (joint)",
                          "2:4 SparseGPT, then int8 GPTQ (re-masked)",
                          "2:4 SparseGPT, then int8 QAT + distill (4 steps, masks held)"]
    for name, r in rows.items():
        assert r["zeros_kept"] is True
        # Exactly 2:4; int8 may round a few kept weights to zero as well.
        assert r["sparsity"] == 0.5 if name == "2:4 SparseGPT" else (
            r["sparsity"] == 0.0 if name == "dense" else 0.5 <= r["sparsity"] < 0.51)
        assert 1 < r["ppl"] < 256
    assert rows["2:4 SparseGPT with int8 (joint)"]["bytes"] < rows["2:4 SparseGPT"]["bytes"]

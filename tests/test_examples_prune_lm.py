"""examples/prune_lm.py runs in quick mode (a tiny byte-level LM trained for 60
steps, then pruned by magnitude, Wanda and SparseGPT) and writes a JSON with
the expected keys, exact sparsities and sane perplexities."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "prune_lm.py"


def load():
    spec = importlib.util.spec_from_file_location("example_prune_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_prune_lm_quick(tmp_path):
    out, png = tmp_path / "lm.json", tmp_path / "lm.png"
    module = load()
    returned = module.main(["--quick", "--results", str(tmp_path / "ckpt"), "--no-progress",
                            "--json", str(out), "--plot", str(png)])
    res = json.loads(out.read_text())
    assert set(res) == set(returned) and png.stat().st_size > 1000
    assert len(list((tmp_path / "ckpt").glob("lm_*.npz"))) == 1
    assert set(res["files"]["train"]) == set(module.TRAIN_FILES[:6])
    assert res["dense_ppl"] < res["unigram_ppl"]
    # SparseGPT's 8 captures (4 points x 2 layers) from cached activations: at most the
    # issue's 3 full-forward equivalents
    assert res["passes"]["magnitude"] == 0 and res["passes"]["wanda"] == 1
    assert 0 < res["passes"]["sparsegpt"] <= 3
    for method, row in res["results"].items():
        assert list(row) == list(module.QUICK_SETTINGS)
        for setting, r in row.items():
            target = 0.7 if setting.startswith("70") else 0.5
            # exact counts per kernel, per output unit (Wanda) or per block (SparseGPT)
            assert abs(r["sparsity"] - target) <= 0.5 / 64, (method, setting, r)
            assert np.isfinite(r["ppl"]) and r["ppl"] > res["dense_ppl"] * 0.99
    results = res["results"]
    assert results["sparsegpt"]["50%"]["ppl"] < results["magnitude"]["50%"]["ppl"]

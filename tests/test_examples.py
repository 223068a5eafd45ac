"""The examples run in quick mode, write their JSON and reach the target sparsity.

Each example's ``main`` is imported from ``examples/`` and called with
``--quick --json PATH``; the test then checks the JSON keys, that every pruned
kernel keeps exactly ``round(size * (1 - target))`` weights, and that the
pruned model is far better than chance (10 classes).
"""

from __future__ import annotations

import json

import pytest
from harness import load_example

CHANCE = 0.1


def run_quick(name, tmp_path):
    out = tmp_path / f"{name}.json"
    returned = load_example(name).main(["--quick", "--json", str(out)])
    written = json.loads(out.read_text())
    assert set(written) == set(returned)
    return written


def check_exact_sparsity(res):
    target = res["target_sparsity"]
    rows = {k: v for k, v in res["summary"].items() if k != "total"}
    assert rows, "no pruned leaf in the summary"
    for path, row in rows.items():
        assert path.endswith("kernel"), path  # default where=: kernels only
        assert row["kept"] == round(row["size"] * (1 - target)), (path, row)
    total = res["summary"]["total"]
    assert total["kept"] == sum(r["kept"] for r in rows.values())
    assert res["sparsity"] == pytest.approx(target, abs=1e-3)
    assert res["mask_sparsity"] == res["sparsity"]


def test_quickstart(tmp_path):
    res = run_quick("quickstart", tmp_path)
    assert {"steps", "target_sparsity", "sparsity", "random_sparsity", "mask_sparsity",
            "dense_acc", "pruned_acc", "random_acc", "summary"} <= set(res)
    assert res["target_sparsity"] == 0.9
    check_exact_sparsity(res)
    assert res["random_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert res["dense_acc"] > 0.8
    assert res["pruned_acc"] > 0.6
    # The random control keeps its kept weights trained (nested masks), so it
    # learns too; a failure here means pruned weights regrew at zero.
    assert res["random_acc"] > 3 * CHANCE


def test_flax_nnx(tmp_path):
    res = run_quick("flax_nnx", tmp_path)
    assert {"steps", "target_sparsity", "sparsity", "mask_sparsity", "dense_acc",
            "pruned_acc", "summary"} <= set(res)
    assert res["target_sparsity"] == 0.9
    check_exact_sparsity(res)
    assert set(res["summary"]) == {"conv1/kernel", "conv2/kernel", "fc1/kernel",
                                   "fc2/kernel", "total"}
    assert res["dense_acc"] > 0.8
    assert res["pruned_acc"] > 0.6

"""jp.oneshot (Wanda, SparseGPT), jp.scores.wanda and jp.allocation.owl against
numpy references; exact counts, N:M patterns, stacked layers, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import oneshot_oracle as ref
import oracle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import jaxprune as jp


def dense(p, x):
    return x @ p["w"]


def data(rows=256, d_in=32, d_out=16, seed=0, outliers=True):
    """Correlated inputs with a few outlier features, and a kernel."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
    x = rng.standard_normal((rows, d_in)) @ mix
    if outliers:
        x[:, [i for i in (3, 11, 20) if i < d_in]] *= 12.0
    w = rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)
    return x.astype(np.float32), w.astype(np.float32)


def split(x, k=4):
    return [jnp.asarray(b) for b in np.array_split(x, k)]


# --------------------------------------------------------------------------
# Wanda


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.7), dict(n=2, m=4),
                                dict(n=4, m=8)])
def test_wanda_equals_numpy(kw):
    x, w = data()
    params = {"w": jnp.asarray(w), "b": jnp.zeros(16)}
    stats = jp.calibrate(lambda p, x: x @ p["w"] + p["b"], params, split(x))
    masks = jp.oneshot.wanda(params, stats, **kw)
    np.testing.assert_array_equal(np.asarray(masks["w"]), ref.wanda(w, x, **kw))
    assert masks["b"].shape == ()
    scores = jp.scores.wanda(params, stats)
    np.testing.assert_allclose(np.asarray(scores["w"]),
                               np.abs(w) * np.sqrt((x.astype(np.float64) ** 2).sum(0))[:, None],
                               rtol=1e-5)


def test_wanda_exact_counts_per_output_unit_and_nm_patterns():
    x, w = data(d_in=40, d_out=7)
    params = {"w": jnp.asarray(w)}
    stats = jp.calibrate(dense, params, split(x))
    for s in (0.1, 0.33, 0.5, 0.9):
        kept = np.asarray(jp.oneshot.wanda(params, stats, s)["w"]).sum(0)
        assert (kept == round(40 * (1 - s))).all(), (s, kept)
    nm = np.asarray(jp.oneshot.wanda(params, stats, n=3, m=8)["w"])
    assert (nm.reshape(5, 8, 7).sum(1) == 3).all()


def test_wanda_ties_go_to_the_lower_index():
    params = {"w": jnp.ones((6, 2))}
    stats = jp.calibrate(dense, params, [jnp.ones((3, 6))])
    assert np.asarray(jp.oneshot.wanda(params, stats, 0.5)["w"])[:, 0].tolist() == \
        [True, True, True, False, False, False]


def test_topk_axis_per_row_and_per_slice_budgets():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((3, 10, 4)).astype(np.float32)
    s[0, :, 0] = 1.0  # ties
    s[1, 2, 1] = np.nan
    m = np.asarray(jp.masks.topk({"w": jnp.asarray(s)}, 0.3, axis=1)["w"])
    for i in range(3):
        for j in range(4):
            col = np.where(np.isnan(s[i, :, j]), -np.inf, s[i, :, j])
            np.testing.assert_array_equal(m[i, :, j], ref.keep_largest(col, 7))
    layers = np.array([0.0, 0.5, 0.9])
    m = np.asarray(jp.masks.topk({"w": jnp.asarray(s)}, {"w": layers})["w"])
    assert m.reshape(3, -1).sum(1).tolist() == [40, 20, 4]
    traced = jax.jit(lambda sp: jp.masks.topk({"w": jnp.asarray(s)}, sp, axis=(1, 2)))(0.25)
    assert np.asarray(traced["w"]).reshape(3, -1).sum(1).tolist() == [30, 30, 30]
    with pytest.raises(ValueError, match="does not broadcast"):
        jp.masks.topk({"w": jnp.asarray(s)}, {"w": np.array([0.1, 0.2])}, axis=1)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from([(5, 7), (3, 4, 6), (2, 3, 2, 4)]), axis=st.integers(0, 3),
       kind=st.sampled_from(oracle.KINDS), s=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_topk_axis_matches_the_oracle(shape, axis, kind, s, seed):
    """Every slice along ``axis`` keeps its exact count: largest first, NaN
    lowest, -0 == +0, ties to the lower index (the library's ranking rule)."""
    axis = axis % len(shape)
    x = oracle.gen_scores(np.random.default_rng(seed), shape, kind)
    got = np.asarray(jp.masks.topk({"w": jnp.asarray(x)}, s, axis=axis)["w"])
    moved, kept = np.moveaxis(x, axis, -1), np.moveaxis(got, axis, -1)
    k = oracle.keep_count(shape[axis], s)
    for idx in np.ndindex(moved.shape[:-1]):
        np.testing.assert_array_equal(kept[idx], oracle.topk_leaf(moved[idx], k))


# --------------------------------------------------------------------------
# SparseGPT


@pytest.mark.parametrize("kw", [dict(sparsity=0.5, blocksize=8), dict(sparsity=0.6, blocksize=10),
                                dict(n=2, m=4, blocksize=8)])
def test_sparsegpt_equals_numpy(kw):
    x, w = data(rows=200, d_in=24, d_out=12, seed=2, outliers=False)
    x[:, 5] = 0.0  # a dead input
    new, masks = jp.oneshot.sparsegpt(dense, {"w": jnp.asarray(w)}, split(x), **kw)
    want_w, want_m = ref.sparsegpt(w, x, **kw)
    np.testing.assert_array_equal(np.asarray(masks["w"]), want_m)
    np.testing.assert_allclose(np.asarray(new["w"]), want_w, rtol=2e-3, atol=2e-4)
    assert (np.asarray(new["w"])[~want_m] == 0).all() and (np.asarray(new["w"])[5] == 0).all()


def test_reconstruction_error_magnitude_wanda_sparsegpt():
    x, w = data(rows=512, d_in=32, d_out=16, seed=3)
    params = {"w": jnp.asarray(w)}
    xs = split(x)

    def err(w2):
        return float(np.sum((x.astype(np.float64) @ (w - np.asarray(w2))) ** 2))

    mag = jp.apply_masks(params, jp.masks.topk(jp.scores.magnitude(params), 0.5))["w"]
    wan = jp.apply_masks(params, jp.oneshot.wanda(params, jp.calibrate(dense, params, xs),
                                                  0.5))["w"]
    sgpt = jp.oneshot.sparsegpt(dense, params, xs, 0.5, blocksize=16)[0]["w"]
    ours = [err(mag), err(wan), err(sgpt)]
    numpy = [err(w * ref.magnitude(w, 0.5)), err(w * ref.wanda(w, x, 0.5)),
             err(ref.sparsegpt(w, x, 0.5, blocksize=16)[0])]
    assert numpy[0] > numpy[1] > numpy[2]
    assert ours[0] > ours[1] > ours[2]
    np.testing.assert_allclose(ours, numpy, rtol=1e-3)


def attention_block(p, x):
    h = jnp.tanh(x)
    a = jax.nn.softmax((h @ p["q"]) @ (h @ p["k"]).T)
    return (a @ (h @ p["v"])) @ p["o"]


def test_sparsegpt_order_and_shared_inputs():
    params = {k: jnp.asarray(np.random.default_rng(i).standard_normal((8, 8)), jnp.float32)
              for i, k in enumerate("qkvo")}
    points = jp.oneshot.input_points(attention_block, params, jnp.ones((5, 8)))
    assert points == [(("k", "q", "v"), None), (("o",), None)]


def scanned(p, x):
    def body(h, w):
        return jnp.tanh(h @ w["a"]) @ w["b"] + h, None

    return lax.scan(body, x, p)[0]


def unrolled(p, x):
    for w in p:
        x = jnp.tanh(x @ w["a"]) @ w["b"] + x
    return x


def stack_params(layers=3, d=8, f=16):
    rng = np.random.default_rng(4)
    return {"a": jnp.asarray(rng.standard_normal((layers, d, f)) / 3, jnp.float32),
            "b": jnp.asarray(rng.standard_normal((layers, f, d)) / 4, jnp.float32)}


def test_sparsegpt_scanned_layers_equal_unrolled():
    stacked = stack_params()
    layers = [{"a": stacked["a"][i], "b": stacked["b"][i]} for i in range(3)]
    xs = [jnp.asarray(np.random.default_rng(5).standard_normal((64, 8)), jnp.float32)]
    points = jp.oneshot.input_points(scanned, stacked, xs[0])
    assert points == [(("a",), 0), (("b",), 0), (("a",), 1), (("b",), 1), (("a",), 2),
                      (("b",), 2)]
    budget = {"a": np.array([0.25, 0.5, 0.75]), "b": 0.5}
    got, masks = jp.oneshot.sparsegpt(scanned, stacked, xs, budget, blocksize=8)
    want, _ = jp.oneshot.sparsegpt(
        unrolled, layers, xs, [{"a": s, "b": 0.5} for s in budget["a"]], blocksize=8)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(got["a"][i]), np.asarray(want[i]["a"]),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got["b"][i]), np.asarray(want[i]["b"]),
                                   rtol=1e-4, atol=1e-5)
    assert np.asarray(masks["a"]).reshape(3, -1).sum(1).tolist() == [96, 64, 32]


def test_stacked_wanda_per_layer_budgets():
    stacked = stack_params()
    xs = [jnp.asarray(np.random.default_rng(6).standard_normal((32, 8)), jnp.float32)]
    stats = jp.calibrate(scanned, stacked, xs)
    assert stats["a"].layers == 3 and stats["a"].sumsq.shape == (3, 8)
    assert stats["b"].sumsq.shape == (3, 16) and stats["b"].count.tolist() == [32, 32, 32]
    masks = jp.oneshot.wanda(stacked, stats, {"a": np.array([0.0, 0.5, 0.75]), "b": 0.5})
    assert (np.asarray(masks["a"]).sum(1) == np.array([8, 4, 2])[:, None]).all()
    assert (np.asarray(masks["b"]).sum(1) == 8).all()
    # layer 1's stats are those of the unrolled model's second layer input
    h = np.asarray(xs[0], np.float64)
    h = np.tanh(h @ np.asarray(stacked["a"][0])) @ np.asarray(stacked["b"][0]) + h
    np.testing.assert_allclose(np.asarray(stats["a"].sumsq[1]), (h ** 2).sum(0), rtol=1e-4)


# --------------------------------------------------------------------------
# OWL


def two_blocks(p, x):
    for blk in p["blocks"]:
        x = jnp.tanh(x @ blk["up"]) @ blk["down"]
    return x


def test_owl_budgets():
    rng = np.random.default_rng(7)
    params = {"blocks": [{"up": jnp.asarray(rng.standard_normal((8, 24)), jnp.float32),
                          "down": jnp.asarray(rng.standard_normal((24, 8)), jnp.float32)}
                         for _ in range(2)]}
    x = rng.standard_normal((64, 8)).astype(np.float32)
    x[:, 2] *= 50.0  # outliers into block 0
    stats = jp.calibrate(two_blocks, params, [jnp.asarray(x)])
    alloc = jp.allocation.owl(stats)
    s = alloc(params, 0.7)
    s0, s1 = float(s["blocks"][0]["up"]), float(s["blocks"][1]["up"])
    assert s0 == float(s["blocks"][0]["down"]) and s0 < 0.7 < s1
    assert abs(s1 - s0 - 0.16) < 1e-5  # the full range 2 * lam
    by_kernel = jp.allocation.owl(stats, blocks="kernel")(params, 0.6)
    sizes = {k: 192 for k in ("up", "down")}
    total = sum(float(by_kernel["blocks"][i][k]) * sizes[k] for i in range(2) for k in sizes)
    assert abs(total / (4 * 192) - 0.6) < 1e-6
    masks = jp.allocation.masks(jp.scores.magnitude(params), 0.7, allocation=alloc)
    assert abs(jp.sparsity_of(masks) - 0.7) < 1e-3
    w = jp.oneshot.wanda(params, stats, 0.7, allocation=alloc)
    assert np.asarray(w["blocks"][0]["up"]).sum() > np.asarray(w["blocks"][1]["up"]).sum()


def test_owl_equal_ratios_and_stacked_layers():
    params = {"blocks": [{"up": jnp.ones((8, 8)), "down": jnp.ones((8, 8))} for _ in range(2)]}
    stats = jp.calibrate(two_blocks, params, [jnp.ones((4, 8))])
    s = jp.allocation.owl(stats)(params, 0.5)
    assert all(float(v) == pytest.approx(0.5) for v in jax.tree.leaves(s))
    stacked = stack_params()
    x = np.random.default_rng(8).standard_normal((32, 8)).astype(np.float32)
    x[:, 0] *= 40.0
    st = jp.calibrate(scanned, stacked, [jnp.asarray(x)])
    got = jax.jit(jp.allocation.owl(st))(stacked, 0.6)  # a traced sparsity works
    assert got["a"].shape == (3,) and np.allclose(got["a"], got["b"])
    assert abs(float(jnp.mean(got["a"])) - 0.6) < 1e-6
    masks = jp.masks.topk(jp.scores.magnitude(stacked), got)
    assert np.asarray(masks["a"]).reshape(3, -1).sum(1).tolist() == [
        round(128 * (1 - float(v))) for v in got["a"]]


# --------------------------------------------------------------------------
# Errors


def test_errors():
    x, w = data(rows=16, d_in=8, d_out=4)
    params = {"w": jnp.asarray(w)}
    stats = jp.calibrate(dense, params, split(x, 2))
    with pytest.raises(ValueError, match="n must be an int in"):
        jp.oneshot.wanda(params, stats, n=5, m=4)
    with pytest.raises(ValueError, match="n must be an int in"):
        jp.oneshot.sparsegpt(dense, params, split(x, 2), n=5, m=4)
    with pytest.raises(ValueError, match="either sparsity= or n="):
        jp.oneshot.wanda(params, stats, 0.5, n=2, m=4)
    with pytest.raises(ValueError, match="pass sparsity="):
        jp.oneshot.sparsegpt(dense, params, split(x, 2))
    with pytest.raises(ValueError, match="capture_passes: batches is empty"):
        jp.oneshot.capture_passes(dense, params, [])
    with pytest.raises(ValueError, match="computed for shape"):
        jp.oneshot.wanda({"w": jnp.ones((4, 4))}, stats, 0.5)
    with pytest.raises(ValueError, match="which params do not have"):
        jp.scores.wanda({"v": jnp.ones((8, 4))}, stats)
    with pytest.raises(ValueError, match="does not divide into groups of m=3"):
        jp.oneshot.wanda(params, stats, n=1, m=3)
    with pytest.raises(ValueError, match="multiple of m=4"):
        jp.oneshot.sparsegpt(dense, params, split(x, 2), n=2, m=4, blocksize=6)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        jp.oneshot.wanda(params, stats, 1.5)
    with pytest.raises(ValueError, match="batches is empty"):
        jp.oneshot.sparsegpt(dense, params, [], 0.5)


# --------------------------------------------------------------------------
# Captures from cached activations equal the general path (one pass from the
# inputs per point), at a fraction of its cost


def blocks(p, x):
    for w in p:
        h = jnp.tanh(x)
        a = jax.nn.softmax((h @ w["q"]) @ (h @ w["k"]).T)
        x = x + (a @ (h @ w["v"])) @ w["o"]
        x = x + jax.nn.gelu(jnp.tanh(x) @ w["up"]) @ w["down"]
    return x


def blocks_params(layers=3, d=8, f=16):
    rng = np.random.default_rng(7)
    shapes = dict(q=(d, d), k=(d, d), v=(d, d), o=(d, d), up=(d, f), down=(f, d))
    return [{k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), jnp.float32)
             for k, s in shapes.items()} for _ in range(layers)]


@pytest.mark.parametrize("case", ["unrolled blocks", "scan, remat, custom_vjp, cond"])
def test_cached_captures_equal_the_general_path(case):
    from test_calibration import mixed, mixed_params

    if case == "unrolled blocks":
        f, p = blocks, blocks_params()
        xs = [jnp.asarray(np.random.default_rng(8 + i).standard_normal((24, 8)), jnp.float32)
              for i in range(2)]
    else:
        f, p = mixed, mixed_params()
        xs = [jnp.asarray(np.random.default_rng(8 + i).standard_normal((24, 6)), jnp.float32)
              for i in range(2)]
    cached = jp.oneshot.capture_passes(f, p, xs)
    general = jp.oneshot.capture_passes(f, p, xs, cached=False)
    assert cached <= 3 and cached < general
    got, got_masks = jp.oneshot.sparsegpt(f, p, xs, 0.5, blocksize=8)
    want, want_masks = jp.oneshot.sparsegpt(f, p, xs, 0.5, blocksize=8, cached=False)
    for a, b in zip(jax.tree.leaves(got_masks), jax.tree.leaves(want_masks)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(got) == jax.tree.structure(want)

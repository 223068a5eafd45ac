"""Exact selection (jaxprune.select, masks.topk, masks.global_topk) against
the numpy oracle, under jax.jit, with concrete and traced sparsities.

Compilation dominates the cost of these tests, so pytree shapes come from a
few fixed templates (each compiled once per jitted function) while the score
values, their kinds (ties, NaN, +-inf, -0.0, subnormals, adjacent ulps) and
the sparsities vary freely.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxprune as jp
from jaxprune.core import select as sel

F32, BF16, F16 = np.float32, jnp.bfloat16, np.float16

SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Params(NamedTuple):
    w: Any
    b: Any
    emb: Any


# One template holds dicts, a NamedTuple, nested lists and tuples, every
# float dtype, a zero-size kernel, a (1, 1) kernel, unselected 1-D leaves and
# a leaf above the 2048-entry sampling quota of select.py (64x80). Leaf
# order (tree_leaves): conv/bias, conv/kernel, dense.w, dense.b, dense.emb,
# seq/0, seq/1/0, seq/1/1/0, seq/2. The tests select ndim >= 2 (ALL_2D).
TEMPLATES = {
    # Shapes for every packing path of select.count_true and the tie phase:
    # rows % 32 == 0 (words across rows), last axis % 32 == 0 (words along a
    # row, also used per row for ties), both, and neither.
    "packed": lambda mk: {
        "rows": mk((64, 5), F32),
        "cols": mk((3, 96), BF16),
        "both": mk((32, 64), F32),
        "deep": mk((2, 3, 32), F16),
        "odd": mk((7, 9), F32),
        # Counting layouts of select._layout: rows with a tail of columns
        # (last axis >= 256, not a multiple of 32), flat 1024-element blocks
        # plus a tail block, flat blocks of a 3-D leaf with a short last axis.
        "rows_tail": mk((5, 300), F32),
        "flat": mk((40, 50), BF16),
        "flat3": mk((33, 40, 3), F32),
    },
    "mixed": lambda mk: {
        "conv": {"kernel": mk((3, 3, 4, 8), F32), "bias": mk((8,), F32)},
        "dense": Params(w=mk((64, 80), BF16), b=mk((80,), BF16), emb=mk((5, 7), F16)),
        "seq": [mk((0, 4), F32), (mk((1, 1), F16), [mk((9, 1), BF16)]), mk((3,), F32)],
    },
}


@st.composite
def score_trees(draw, templates=("mixed",)):
    """(name, pytree of jax arrays) with per-leaf kinds drawn by hypothesis."""
    name = draw(st.sampled_from(templates))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def mk(shape, dtype):
        kind = draw(st.sampled_from(oracle.KINDS))
        return jnp.asarray(oracle.gen_scores(rng, shape, kind, dtype))

    return name, TEMPLATES[name](mk)


SPARSITIES = st.one_of(
    st.sampled_from([0.0, 1.0, 0.5, 0.25, 0.75, 1 / 3, 0.1, 0.9, 0.99, 1e-7, 1 - 1e-7]),
    st.floats(0.0, 1.0),
)


def default_selected(leaf) -> bool:
    return np.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def leaves_with_paths(tree):
    pl = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in pl], [x for _, x in pl]


def assert_unselected(path, m):
    m = np.asarray(m)
    assert m.shape == () and m.dtype == np.bool_ and bool(m), (
        f"unselected leaf {path} must get a scalar True mask, got {m.dtype}{m.shape}: {m}"
    )


def check_topk(tree, masks, s, traced, selected=default_selected):
    assert jax.tree.structure(masks) == jax.tree.structure(tree), "mask tree structure differs"
    paths, leaves = leaves_with_paths(tree)
    m_leaves = jax.tree.leaves(masks)
    for path, x, m in zip(paths, leaves, m_leaves):
        if not selected(x):
            assert_unselected(path, m)
            continue
        m = np.asarray(m)
        assert m.dtype == np.bool_ and m.shape == x.shape, f"{path}: mask {m.dtype}{m.shape}"
        k = oracle.keep_count(x.size, s, traced)
        assert int(m.sum()) == k, (
            f"{path}: kept {int(m.sum())} of {x.size}, expected {k} (sparsity={s!r}, traced={traced})"
        )
        want = oracle.topk_leaf(x, k)
        np.testing.assert_array_equal(
            m, want, err_msg=f"{path}: topk mask differs from oracle (s={s!r}, traced={traced}, "
            f"scores={np.asarray(x).astype(np.float32).ravel()[:32]})"
        )


def check_global(tree, masks, s, traced, selected=default_selected):
    assert jax.tree.structure(masks) == jax.tree.structure(tree), "mask tree structure differs"
    paths, leaves = leaves_with_paths(tree)
    m_leaves = jax.tree.leaves(masks)
    sel_idx = [i for i, x in enumerate(leaves) if selected(x)]
    want = oracle.global_topk([leaves[i] for i in sel_idx], s, traced)
    n = sum(leaves[i].size for i in sel_idx)
    k = oracle.keep_count(n, s, traced)
    kept = sum(int(np.asarray(m_leaves[i]).sum()) for i in sel_idx)
    assert kept == k, f"global_topk kept {kept} of {n}, expected {k} (s={s!r}, traced={traced})"
    for i, (path, x, m) in enumerate(zip(paths, leaves, m_leaves)):
        if i not in sel_idx:
            assert_unselected(path, m)
            continue
        m = np.asarray(m)
        assert m.dtype == np.bool_ and m.shape == x.shape, f"{path}: mask {m.dtype}{m.shape}"
        np.testing.assert_array_equal(
            m, want[sel_idx.index(i)], err_msg=f"{path}: global_topk mask differs (s={s!r})"
        )


# These tests are about exact selection, so they select by the rule they
# check (every float leaf with ndim >= 2), not by the library's default
# where= (kernels by name and shape, tested in test_tree.py).
def ALL_2D(path, leaf):
    return default_selected(leaf)


TOPK = jax.jit(functools.partial(jp.masks.topk, where=ALL_2D))
GLOBAL = jax.jit(functools.partial(jp.masks.global_topk, where=ALL_2D))
TOPK_STATIC = jax.jit(functools.partial(jp.masks.topk, where=ALL_2D), static_argnums=1)
GLOBAL_STATIC = jax.jit(functools.partial(jp.masks.global_topk, where=ALL_2D), static_argnums=1)


# --------------------------------------------------------------------------
# sortable_key and keep_count


@settings(max_examples=60, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(oracle.KINDS),
       dtype=st.sampled_from([F32, BF16, F16]))
def test_sortable_key_order_matches_ranking_rule(seed, kind, dtype):
    x = oracle.gen_scores(np.random.default_rng(seed), (64,), kind, dtype)
    keys = np.asarray(jax.jit(sel.sortable_key)(jnp.asarray(x)))
    assert keys.dtype == np.uint32
    v = oracle.to_f32(x).astype(np.float64)
    nan = np.isnan(v)
    # Key order == value order with NaN lowest and -0.0 == +0.0.
    ni, nj = nan[:, None], nan[None, :]
    vi, vj = v[:, None], v[None, :]
    less = (ni & ~nj) | (~ni & ~nj & (vi < vj))
    equal = (ni & nj) | (~ni & ~nj & (vi == vj))
    np.testing.assert_array_equal(keys[:, None] < keys[None, :], less, err_msg=f"key order, x={v}")
    np.testing.assert_array_equal(keys[:, None] == keys[None, :], equal, err_msg=f"key ties, x={v}")
    # Widening bf16/f16 to float32 is exact, so keys equal those of the f32 values.
    np.testing.assert_array_equal(keys, np.asarray(sel.sortable_key(jnp.asarray(oracle.to_f32(x)))))


def test_sortable_key_specials():
    x = jnp.array([jnp.nan, -jnp.inf, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, jnp.inf], jnp.float32)
    k = np.asarray(jax.jit(sel.sortable_key)(x)).astype(np.int64)
    assert k[0] == 0, "NaN must map to key 0 (ranks lowest)"
    assert k[4] == k[5], "-0.0 and +0.0 must share a key"
    d = np.diff(np.delete(k, 5))
    assert np.all(d > 0), f"keys not strictly increasing: {k}"


@settings(max_examples=60, **SETTINGS)
@given(n=st.integers(0, 10**7), s=SPARSITIES)
def test_keep_count_concrete(n, s):
    k = sel.keep_count(n, s)
    assert isinstance(k, int)
    assert k == int(np.clip(np.round(n * (1 - s)), 0, n))


def test_keep_count_concrete_rounds_half_to_even():
    assert sel.keep_count(10, 0.25) == 8  # 7.5 -> 8
    assert sel.keep_count(3, 0.5) == 2  # 1.5 -> 2
    assert sel.keep_count(5, 0.5) == 2  # 2.5 -> 2
    assert sel.keep_count(7, 0.0) == 7 and sel.keep_count(7, 1.0) == 0
    assert sel.keep_count(0, 0.3) == 0


_KC_TRACED = jax.jit(sel.keep_count)


def test_keep_count_traced_is_exact():
    """A traced sparsity keeps exactly round(n * (1 - s32)) (half to even),
    for small and huge n, including exact half-integer products."""
    rng = np.random.default_rng(0)
    n = np.concatenate(
        [np.arange(0, 3000), rng.integers(0, 2**24, 3000), rng.integers(2**24, 2**31, 3000)]
    ).astype(np.int32)
    s = rng.random(n.size).astype(np.float32)
    s[:50] = [0.0, 1.0, 0.5, 0.25, 0.75] * 10
    # Products that land exactly on a half-integer: s = j / (2 n).
    half = rng.integers(1, 3000, 500)
    s[3000 - 500 : 3000] = (rng.integers(0, 2 * half + 1) / (2 * half)).astype(np.float32)
    n[3000 - 500 : 3000] = half
    s[3000:3100] = (rng.random(100) * 1e-7).astype(np.float32)  # tiny sparsities
    got = np.asarray(_KC_TRACED(jnp.asarray(n), jnp.asarray(s)))
    want = np.array([oracle.keep_count(int(a), b, traced=True) for a, b in zip(n, s)])
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, f"n={n[bad[:5]]}, s={s[bad[:5]]}: got {got[bad[:5]]}, want {want[bad[:5]]}"


def test_keep_count_traced_nan_keeps_all_and_clips():
    got = [int(_KC_TRACED(jnp.int32(10), jnp.float32(v))) for v in (np.nan, -0.5, 1.5)]
    assert got == [10, 10, 0]


# --------------------------------------------------------------------------
# Per-leaf and global top-k: property tests


@settings(max_examples=40, **SETTINGS)
@given(data=score_trees(), ss=st.lists(SPARSITIES, min_size=1, max_size=4))
def test_topk_traced_sparsity(data, ss):
    _, tree = data
    for s in ss:
        check_topk(tree, TOPK(tree, jnp.float32(s)), s, traced=True)


@settings(max_examples=40, **SETTINGS)
@given(data=score_trees(), ss=st.lists(SPARSITIES, min_size=1, max_size=4))
def test_global_topk_traced_sparsity(data, ss):
    _, tree = data
    for s in ss:
        check_global(tree, GLOBAL(tree, jnp.float32(s)), s, traced=True)


# A concrete (Python float) sparsity is a static argument and every value
# compiles anew, so each function gets one value here (0 and 1 are covered
# by the traced tests and test_sparsity_zero_and_one_keep_all_and_none).


@settings(max_examples=20, **SETTINGS)
@given(data=score_trees())
def test_topk_python_float_sparsity(data):
    _, tree = data
    check_topk(tree, TOPK_STATIC(tree, 0.3), 0.3, traced=False)


@settings(max_examples=20, **SETTINGS)
@given(data=score_trees())
def test_global_topk_python_float_sparsity(data):
    _, tree = data
    check_global(tree, GLOBAL_STATIC(tree, 0.5), 0.5, traced=False)


@st.composite
def random_shape_leaf(draw):
    shape = draw(st.one_of(
        st.lists(st.integers(0, 9), min_size=2, max_size=4).map(tuple),
        st.sampled_from([(48, 50), (3, 700), (2, 5, 300)]),  # above the sample quota
    ))
    dtype = draw(st.sampled_from([F32, BF16, F16]))
    kind = draw(st.sampled_from(oracle.KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return jnp.asarray(oracle.gen_scores(rng, shape, kind, dtype))


# Every new shape compiles (~0.7 s of CPU), so few examples.
@settings(max_examples=4, **SETTINGS)
@given(x=random_shape_leaf(), ss=st.lists(SPARSITIES, min_size=3, max_size=3))
def test_random_shapes(x, ss):
    tree = {"w": x}
    for s in ss:
        check_topk(tree, GLOBAL(tree, jnp.float32(s)), s, traced=True)


def test_sparsity_zero_and_one_keep_all_and_none():
    rng = np.random.default_rng(1)
    tree = TEMPLATES["mixed"](lambda sh, dt: jnp.asarray(oracle.gen_scores(rng, sh, "special", dt)))
    for fn, s0, s1 in ((TOPK, jnp.float32(0.0), jnp.float32(1.0)), (GLOBAL, jnp.float32(0.0), jnp.float32(1.0))):
        full, none = fn(tree, s0), fn(tree, s1)
        for x, a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(full), jax.tree.leaves(none)):
            if x.ndim >= 2:
                assert np.asarray(a).shape == x.shape and np.asarray(a).all(), (
                    "sparsity 0 must keep every entry, NaN included")
                assert not np.asarray(b).any(), "sparsity 1 must keep no entry"


def test_traced_sparsity_out_of_range_is_clipped():
    # A traced sparsity cannot be validated at trace time; keep_count clips
    # the count to [0, n] (documented), so < 0 keeps all and > 1 keeps none.
    rng = np.random.default_rng(2)
    tree = TEMPLATES["mixed"](lambda sh, dt: jnp.asarray(oracle.gen_scores(rng, sh, "normal", dt)))
    for s, keep_all in ((-0.5, True), (1.5, False), (-np.inf, True)):
        for fn in (TOPK, GLOBAL):
            for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(fn(tree, jnp.float32(s)))):
                if x.ndim >= 2:
                    assert np.asarray(m).shape == x.shape
                    assert np.all(np.asarray(m) == keep_all), f"sparsity {s}: {fn}"


def test_nan_is_pruned_first_and_ties_go_to_lower_index():
    x = {"w": jnp.array([[jnp.nan, 1.0, -jnp.inf, 1.0], [-0.0, 0.0, jnp.inf, 1.0]], jnp.float32)}
    # Ranking by hand: inf(6), 1.0(1), 1.0(3), 1.0(7), -0.0(4) == 0.0(5), -inf(2), nan(0).
    expect = {
        0: [], 1: [6], 2: [6, 1], 4: [6, 1, 3, 7], 5: [6, 1, 3, 7, 4], 6: [6, 1, 3, 7, 4, 5],
        7: [6, 1, 3, 7, 4, 5, 2], 8: list(range(8)),
    }
    for k, idx in expect.items():
        m = np.asarray(GLOBAL(x, jnp.float32(1 - k / 8))["w"]).reshape(-1)
        want = np.zeros(8, bool)
        want[idx] = True
        np.testing.assert_array_equal(m, want, err_msg=f"keep {k} of {np.asarray(x['w'])}")


def test_global_topk_ties_go_to_earlier_leaf_in_pytree_order():
    # All scores equal: the kept entries are the first k in tree_leaves order
    # (dict keys sorted, NamedTuple fields in order), row-major in each leaf.
    tree = TEMPLATES["mixed"](lambda sh, dt: jnp.full(sh, 2.0, dt))
    leaves = jax.tree.leaves(tree)
    sel_leaves = [x for x in leaves if x.ndim >= 2]
    assert [x.shape for x in sel_leaves] == [(3, 3, 4, 8), (64, 80), (5, 7), (0, 4), (1, 1), (9, 1)]
    n = sum(x.size for x in sel_leaves)
    for k in (0, 5, 288, 289, 5408, 5443, 5444, n):
        masks = jax.tree.leaves(GLOBAL(tree, jnp.float32(1 - k / n)))
        left = k
        for x, m in zip(leaves, masks):
            if x.ndim < 2:
                continue
            want = np.arange(x.size).reshape(x.shape) < left
            np.testing.assert_array_equal(np.asarray(m), want, err_msg=f"k={k}, leaf {x.shape}")
            left = max(0, left - x.size)


def test_many_leaves():
    rng = np.random.default_rng(3)
    shapes = [(4, 5), (3, 3), (2,), (1, 7), (6, 2, 2)]
    dts = [F32, BF16, F16]
    tree = {
        f"layer{i:02d}": jnp.asarray(
            oracle.gen_scores(rng, shapes[i % 5], oracle.KINDS[i % len(oracle.KINDS)], dts[i % 3])
        )
        for i in range(30)
    }
    tree["layer07"] = jnp.full((3, 3), 0.5, BF16)  # ties across leaves
    tree["layer21"] = jnp.full((1, 7), 0.5, F32)
    check_global(tree, GLOBAL_STATIC(tree, 0.37), 0.37, traced=False)


def test_large_leaves_heavy_ties_and_sampling_path():
    # 2**18 entries, far above the sample quota; tied blocks straddle the
    # threshold for most sparsities.
    rng = np.random.default_rng(4)
    tree = {
        "a": jnp.asarray(rng.integers(0, 7, (512, 256)).astype(np.float32)),
        "b": jnp.asarray(oracle.gen_scores(rng, (128, 1024), "special", BF16)),
    }
    for s in (0.0, 0.123, 0.857, 0.999999):
        check_global(tree, GLOBAL(tree, jnp.float32(s)), s, traced=True)


# --------------------------------------------------------------------------
# select_groups directly


_SELECT = jax.jit(sel.select_groups, static_argnums=1)


@settings(max_examples=30, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), kinds=st.lists(st.sampled_from(oracle.KINDS), min_size=4, max_size=4),
       fracs=st.lists(st.floats(0, 1), min_size=3, max_size=3))
def test_select_groups_interleaved(seed, kinds, fracs):
    rng = np.random.default_rng(seed)
    shapes = [(6, 5), (0, 3), (17,), (4, 4, 3)]
    groups = (0, 2, 1, 0)  # group 0 = arrays 0 and 3 (in that order); group 1 = array 2
    arrays = [jnp.asarray(oracle.gen_scores(rng, sh, kd)) for sh, kd in zip(shapes, kinds)]
    n_g = [30 + 48, 17, 0]
    keep = [int(round(f * n)) for f, n in zip(fracs, n_g)]
    masks = _SELECT(arrays, groups, [jnp.int32(k) for k in keep])
    g0 = oracle.topk_leaf(np.concatenate([oracle.to_f32(arrays[0]).ravel(),
                                          oracle.to_f32(arrays[3]).ravel()]), keep[0])
    np.testing.assert_array_equal(np.asarray(masks[0]).ravel(), g0[:30])
    np.testing.assert_array_equal(np.asarray(masks[3]).ravel(), g0[30:])
    np.testing.assert_array_equal(np.asarray(masks[2]), oracle.topk_leaf(arrays[2], keep[1]))
    assert np.asarray(masks[1]).shape == (0, 3)
    assert int(np.asarray(masks[0]).sum() + np.asarray(masks[3]).sum()) == keep[0]


def test_count_true():
    rng = np.random.default_rng(5)
    f = jax.jit(sel.count_true)
    shapes = [(0,), (7,), (8,), (32,), (96,), (3, 12), (5, 3), (2, 2, 16), (), (64, 5),
              (3, 96), (32, 64), (2, 16, 3), (4, 3, 32), (33, 31), (0, 32)]
    for shape in shapes:
        for p in (0.0, 0.4, 1.0):
            x = rng.random(shape) < p
            assert int(f(jnp.asarray(x))) == int(np.sum(x)), (shape, p)


@settings(max_examples=30, **SETTINGS)
@given(data=score_trees(("packed",)), ss=st.lists(SPARSITIES, min_size=1, max_size=3))
def test_packing_paths_topk_and_global(data, ss):
    _, tree = data
    for s in ss:
        check_topk(tree, TOPK(tree, jnp.float32(s)), s, traced=True)
        check_global(tree, GLOBAL(tree, jnp.float32(s)), s, traced=True)


def _lazy_where(x, m):
    return jnp.where(m, x.astype(jnp.float32), -jnp.inf)


_SELECT_LAZY = jax.jit(
    lambda xs, ms, keep: sel.select_groups(
        [sel.LazyScores(_lazy_where, (x, m)) for x, m in zip(xs, ms)], [0, 1, 0], keep))
_SELECT_EAGER = jax.jit(
    lambda xs, ms, keep: sel.select_groups([_lazy_where(x, m) for x, m in zip(xs, ms)],
                                           [0, 1, 0], keep))


@settings(max_examples=30, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), kinds=st.lists(st.sampled_from(oracle.KINDS), min_size=3,
                                                       max_size=3),
       fracs=st.lists(st.floats(0, 1), min_size=2, max_size=2))
def test_lazy_scores_equal_materialised_scores(seed, kinds, fracs):
    # LazyScores recompute the keys inside each pass; the masks must equal the
    # selection on the stored scores and the numpy oracle, ties included.
    rng = np.random.default_rng(seed)
    shapes = [(320, 224), (3, 96), (5, 7)]
    xs = [jnp.asarray(oracle.gen_scores(rng, sh, kd, BF16)) for sh, kd in zip(shapes, kinds)]
    ms = [jnp.asarray(rng.random(sh) < 0.5) for sh in shapes]
    n = [320 * 224 + 35, 3 * 96]
    keep = [jnp.int32(int(f * k)) for f, k in zip(fracs, n)]
    lazy = _SELECT_LAZY(xs, ms, keep)
    eager = _SELECT_EAGER(xs, ms, keep)
    for a, b in zip(lazy, eager):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scores = [np.where(np.asarray(m), oracle.to_f32(x), -np.inf) for x, m in zip(xs, ms)]
    g0 = oracle.topk_leaf(np.concatenate([scores[0].ravel(), scores[2].ravel()]), int(keep[0]))
    np.testing.assert_array_equal(np.asarray(lazy[0]).ravel(), g0[: 320 * 224])
    np.testing.assert_array_equal(np.asarray(lazy[2]).ravel(), g0[320 * 224:])
    np.testing.assert_array_equal(np.asarray(lazy[1]), oracle.topk_leaf(scores[1], int(keep[1])))


def test_lazy_scores_store_no_key_sized_temporary():
    # The point of LazyScores: a selection over scores computed from existing
    # arrays allocates far less than one key per score (here 4 MiB of keys).
    x = jnp.ones((1024, 1024), jnp.float32)
    m = jnp.ones((1024, 1024), jnp.bool_)
    lazy = jax.jit(lambda x, m: sel.select_groups([sel.LazyScores(_lazy_where, (x, m))], [0],
                                                  [jnp.int32(1000)]))
    temp = lazy.lower(x, m).compile().memory_analysis().temp_size_in_bytes
    assert temp < x.size * 4 // 8, f"temp {temp} bytes for {x.size} scores"


@pytest.mark.parametrize("k", [0, 1, 17, 2047, 2048, 4095, 4096])
def test_select_groups_all_equal_large(k):
    # Every score ties: the kept set must be exactly the first k positions.
    x = jnp.zeros((64, 64), jnp.bfloat16)
    (m,) = _SELECT([x], (0,), [jnp.int32(k)])
    want = np.zeros(64 * 64, bool)
    want[:k] = True
    np.testing.assert_array_equal(np.asarray(m).ravel(), want)


def test_key_ranges_match_key_order():
    # The counting passes test `key > g` and `key == g` as ranges of cheaper
    # per-element values (select._bits_of / select._ranges); they must agree
    # with sortable_key for every float bit pattern class and every kind of
    # threshold key: NaNs of both signs, both zeros, subnormals, infinities,
    # and keys of no number.
    rng = np.random.default_rng(0)
    specials = np.array([0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF,
                         0x7F800000, 0xFF800000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF,
                         0x7FC00000, 0xFFC00000, 0x3F800000, 0xBF800000], np.uint32)
    bits = np.concatenate([specials, rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)])
    x = jnp.asarray(bits.view(np.float32))
    keys = np.asarray(sel.sortable_key(x))
    gs = np.concatenate([keys, keys - 1, keys + 1, [0, 1, 0x7FFFFFFF, 0x7FFFFFFE, 0x80000000,
                                                   0x80000001, 0x007FFFFF, 0x007FFFFE,
                                                   0xFF800000, 0xFF800001, 0xFFFFFFFF]]).astype(np.uint32)
    gs = np.unique(gs)[:: max(1, len(gs) // 600)]
    v = np.asarray(sel._bits_of(lambda a: a, [x]))[None, :]
    lo, w, e, we = (np.asarray(r)[:, None] for r in sel._ranges(jnp.asarray(gs), np.zeros(len(gs), bool)))
    g = gs[:, None]
    np.testing.assert_array_equal((v - lo).astype(np.uint32) < w, keys[None, :] > g)
    np.testing.assert_array_equal((v - e).astype(np.uint32) < we, keys[None, :] == g)
    # Raw uint32 keys compare as they are, including 0xFFFFFFFF.
    lo, w, e, we = (np.asarray(r)[:, None] for r in sel._ranges(jnp.asarray(gs), np.ones(len(gs), bool)))
    np.testing.assert_array_equal((bits[None, :] - lo).astype(np.uint32) < w, bits[None, :] > g)
    np.testing.assert_array_equal((bits[None, :] - e).astype(np.uint32) < we, bits[None, :] == g)


_POOL_SHAPES = [(3,), (300, 7), (2, 5, 4), (1,), (700,), (0, 4), (33, 31), (257,), (64, 65)]


@contextlib.contextmanager
def _pooling(leaf: int = 1 << 16, share: int = 0):
    """Pool leaves of at most ``leaf`` scores, with no bound relative to the
    selection (the default, 1/16 of it, pools nothing in small tests)."""
    saved = sel._POOL_LEAF, sel._POOL_SHARE
    sel._POOL_LEAF, sel._POOL_SHARE = leaf, share
    try:
        yield
    finally:
        sel._POOL_LEAF, sel._POOL_SHARE = saved


@settings(max_examples=10, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1),
       kinds=st.lists(st.sampled_from(oracle.KINDS), min_size=len(_POOL_SHAPES), max_size=len(_POOL_SHAPES)),
       groups=st.lists(st.integers(0, 2), min_size=len(_POOL_SHAPES), max_size=len(_POOL_SHAPES)),
       fracs=st.lists(st.floats(0, 1), min_size=3, max_size=3), bf16=st.booleans())
def test_pooled_small_leaves_match_oracle(seed, kinds, groups, fracs, bf16):
    # Small leaves are counted together in one buffer (select._pools), large
    # ones alone; groups interleave across both, ties break by position
    # across pooled and unpooled leaves alike. Leaves of over 400 scores stay
    # alone here, so every case mixes the two paths; with bf16, some leaves
    # form a second pool.
    rng = np.random.default_rng(seed)
    arrays = []
    for i, (sh, kd) in enumerate(zip(_POOL_SHAPES, kinds)):
        dt = jnp.bfloat16 if bf16 and i % 3 == 0 else np.float32
        arrays.append(jnp.asarray(oracle.gen_scores(rng, sh, kd, dt)))
    n_g = [sum(int(np.prod(sh)) for sh, g in zip(_POOL_SHAPES, groups) if g == j) for j in range(3)]
    keep = [int(round(f * n)) for f, n in zip(fracs, n_g)]
    with _pooling(leaf=400):
        live = [sel._Leaf(sel._identity, (a,), a.shape, a.size, g, 0, False)
                for a, g in zip(arrays, groups) if a.size]
        pools, alone = sel._pools(live)
        assert pools and alone, "the case must mix pooled and unpooled leaves"
        masks = jax.jit(lambda a: sel.select_groups(a, groups, keep))(arrays)
    for j in range(3):
        idx = [i for i, g in enumerate(groups) if g == j]
        if not idx:
            continue
        want = oracle.topk_leaf(np.concatenate([oracle.to_f32(arrays[i]).ravel() for i in idx]), keep[j])
        got = np.concatenate([np.asarray(masks[i]).ravel() for i in idx])
        np.testing.assert_array_equal(got, want)
    for m, a in zip(masks, arrays):
        assert m.shape == a.shape and m.dtype == jnp.bool_


def test_pool_raw_keys_and_lazy_scores():
    # uint32 keys (0xFFFFFFFF included) and LazyScores with a per-leaf
    # functools.partial pool alike and select exactly.
    rng = np.random.default_rng(3)
    keys = [jnp.asarray(rng.integers(2**32 - 4, 2**32, sh, dtype=np.uint64).astype(np.uint32))
            for sh in [(5, 7), (40,), (3, 3, 3)]]
    with _pooling():
        ks = jax.jit(lambda a: sel.select_groups(a, [0, 0, 0], [31]))(keys)
    flat = np.concatenate([np.asarray(k).ravel() for k in keys]).astype(np.int64)
    want = np.zeros(flat.size, bool)
    want[np.lexsort((np.arange(flat.size), -flat))[:31]] = True
    np.testing.assert_array_equal(np.concatenate([np.asarray(m).ravel() for m in ks]), want)

    ws = [jnp.asarray(np.round(rng.standard_normal(sh) * 2) / 2, jnp.float32) for sh in [(6, 9), (50,), (2, 30)]]
    ms = [jnp.asarray(rng.random(w.shape) < 0.7) for w in ws]

    def active(fn, w, m):
        return jnp.where(m, fn(w), -jnp.inf)

    lazy = [sel.LazyScores(functools.partial(active, jnp.abs), (w, m)) for w, m in zip(ws, ms)]
    live = [sel._Leaf(x.fn, x.args, x.args[0].shape, x.args[0].size, 0, 0, False) for x in lazy]
    with _pooling():
        assert len(sel._pools(live)[0]) == 1, "equal partials must share a pool"
        got = jax.jit(lambda ws, ms: sel.select_groups(
            [sel.LazyScores(functools.partial(active, jnp.abs), (w, m)) for w, m in zip(ws, ms)], [0] * 3,
            [40]))(ws, ms)
    scores = np.concatenate([np.where(np.asarray(m), np.abs(np.asarray(w)), -np.inf).ravel() for w, m in zip(ws, ms)])
    np.testing.assert_array_equal(np.concatenate([np.asarray(m).ravel() for m in got]),
                                  oracle.topk_leaf(scores, 40))


def test_small_leaves_share_one_counting_kernel():
    # However many small leaves of whatever shapes, a selection counts them
    # with one kernel per pool: the program has one popcount for them all,
    # where leaves counted alone have one each (XLA compiles one kernel per
    # distinct leaf shape).
    shapes = [(20 + i, 64) for i in range(12)]

    def popcounts(pool_leaf):
        with _pooling(leaf=pool_leaf):
            ws = [jax.ShapeDtypeStruct(sh, jnp.float32) for sh in shapes]
            hlo = jax.jit(lambda ws: sel.select_groups(list(ws), [0] * len(ws), [50])).lower(ws).compile().as_text()
        return hlo.count(" popcnt(")

    assert popcounts(1 << 16) == 1
    assert popcounts(0) >= len(shapes)


def test_key_functions_equal_by_value_and_type():
    # Per-leaf partials of one function share kernels (equal by value), but
    # arguments that Python calls equal across types (1, 1.0, True) do not.
    def f(a, x):
        return x * a

    assert sel._Fn(functools.partial(f, 2.0)) == sel._Fn(functools.partial(f, 2.0))
    assert hash(sel._Fn(functools.partial(f, 2.0))) == hash(sel._Fn(functools.partial(f, 2.0)))
    assert sel._Fn(functools.partial(f, 1)) != sel._Fn(functools.partial(f, 1.0))
    assert sel._Fn(functools.partial(f, True)) != sel._Fn(functools.partial(f, 1))
    assert sel._Fn(functools.partial(f, 2.0)) != sel._Fn(functools.partial(f, 3.0))

"""Structured masks (n_of_m, block, channels), per-leaf sparsity trees,
where=, apply_masks, pack/unpack, sparsity and summary, against the numpy
oracle under jax.jit.

Each jitted configuration (tree shapes, block shape, axis, ...) compiles
once; hypothesis varies the values and the sparsities.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from harness import assert_trees_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxprune as jp

F32, BF16, F16 = np.float32, jnp.bfloat16, np.float16

# The structured-mask oracle tests select by rank (ndim >= 2), whatever the
# leaf names, so they test the mask algorithms, not the default where=.
def NDIM2(path, leaf):
    return np.ndim(leaf) >= 2


def by_rank(fn):
    return functools.partial(fn, where=NDIM2)


SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SPARSITIES = st.one_of(
    st.sampled_from([0.0, 1.0, 0.5, 0.25, 1 / 3, 0.9, 1e-7]),
    st.floats(0.0, 1.0),
)

# Kinds whose float32 sums are exact (small integers, one repeated value,
# specials), so the oracle's tile / unit scores equal XLA's whatever the
# summation order.
EXACT_SUM_KINDS = ("ints", "equal", "intspecial")


def gen(rng, shape, kind, dtype):
    if kind == "intspecial":
        x = oracle.gen_scores(rng, shape, "ints", F32)
        pick = rng.random(x.shape) < 0.2
        x[pick] = rng.choice(np.array([np.nan, np.inf, -np.inf, -0.0], F32), int(pick.sum()))
        return x.astype(dtype)
    if kind == "equal":
        # one finite value (a NaN or inf everywhere is in "intspecial")
        return np.full(shape, rng.choice(np.array([0.0, -0.0, 1.5, -2.0], F32)), dtype)
    return oracle.gen_scores(rng, shape, kind, dtype)


class Mod(NamedTuple):
    kernel: Any
    bias: Any


def build(specs, draw, kinds):
    """A pytree {name: leaf} from {name: (shape, dtype)}, values drawn."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = {}
    for name, (shape, dtype) in specs.items():
        out[name] = jnp.asarray(gen(rng, shape, draw(st.sampled_from(kinds)), dtype))
    return out


def assert_scalar_true(m, what):
    m = np.asarray(m)
    assert m.shape == () and m.dtype == np.bool_ and bool(m), f"{what}: expected scalar True, got {m!r}"


# --------------------------------------------------------------------------
# N:M


# (n, m, axis, {name: (shape, dtype)}); the axis of every ndim >= 2 leaf
# divides by m; "bias" is 1-D and so unselected by default.
NM_CASES = [
    (2, 4, -2, {"a": ((12, 5), F32), "b": ((2, 4, 3), BF16), "c": ((8, 1), F16), "bias": ((5,), F32)}),
    (1, 4, -2, {"a": ((4, 6), F16), "bias": ((6,), F32)}),
    (0, 4, -2, {"a": ((8, 3), F32)}),
    (4, 4, -2, {"a": ((8, 3), BF16)}),
    (3, 8, 0, {"a": ((16, 3), F32), "b": ((8, 2, 2), F32)}),
    (1, 2, -1, {"a": ((3, 6), BF16), "b": ((2, 2, 4), F16)}),
    (2, 3, 1, {"a": ((2, 9), F32), "b": ((0, 3), F32)}),
    (1, 1, -2, {"a": ((3, 2), F32)}),
]
_NM = jax.jit(by_rank(jp.masks.n_of_m), static_argnames=("n", "m", "axis"))


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), case=st.integers(0, len(NM_CASES) - 1))
def test_n_of_m_matches_oracle(data, case):
    n, m, axis, specs = NM_CASES[case]
    tree = build(specs, data.draw, oracle.KINDS)
    masks = _NM(tree, n=n, m=m, axis=axis)
    for name, x in tree.items():
        if x.ndim < 2:
            assert_scalar_true(masks[name], name)
            continue
        got = np.asarray(masks[name])
        want = oracle.n_of_m(x, n, m, axis)
        assert got.dtype == np.bool_ and got.shape == x.shape
        np.testing.assert_array_equal(got, want, err_msg=f"{name}: n={n}, m={m}, axis={axis}, "
                                      f"x={oracle.to_f32(x)}")
        # exactly n per group of m, so sparsity exactly 1 - n/m
        groups = np.moveaxis(got, axis % x.ndim, -1).reshape(-1, m)
        assert np.all(groups.sum(-1) == n), f"{name}: not {n} per group of {m}"


def test_n_of_m_2_4_by_hand():
    s = jnp.array([[4.0, 0.0], [1.0, jnp.nan], [3.0, -0.0], [2.0, 0.0],
                   [1.0, 5.0], [1.0, -jnp.inf], [1.0, jnp.nan], [1.0, jnp.nan]], jnp.float32)
    got = np.asarray(_NM({"w": s}, n=2, m=4, axis=-2)["w"])
    want = np.array([[1, 1], [0, 0], [1, 1], [0, 0],   # col 1: 0.0, -0.0 tie (lower index), NaN last
                     [1, 1], [1, 1], [0, 0], [0, 0]], bool)  # col 1: 5, -inf beat NaN, NaN
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------
# Block


BLOCK_CASES = [
    # (block_shape, reduce, specs): leading axes of "b" compete together.
    (2, "mean", {"a": ((4, 6), F32), "b": ((3, 2, 4), BF16), "bias": ((6,), F32)}),
    ((1, 3), "max", {"a": ((5, 6), F16), "b": ((2, 2, 3), F32)}),
    ((2, 1), "l1", {"a": ((4, 3), F32), "b": ((2, 2, 2), BF16)}),
    (2, "l2", {"a": ((2, 4), F32)}),
]
_BLOCK = jax.jit(by_rank(jp.masks.block), static_argnames=("block_shape", "reduce"))
_BLOCK_STATIC = jax.jit(by_rank(jp.masks.block), static_argnames=("sparsity", "block_shape", "reduce"))


def check_block(tree, masks, s, bs, reduce, traced):
    for name, x in tree.items():
        if x.ndim < 2:
            assert_scalar_true(masks[name], name)
            continue
        got = np.asarray(masks[name])
        want = oracle.block(x, s, bs, reduce, traced)
        assert got.dtype == np.bool_ and got.shape == x.shape
        np.testing.assert_array_equal(
            got, want, err_msg=f"{name}: block {bs} {reduce} s={s!r} traced={traced}, "
            f"tiles={oracle.block_tile_scores(x, bs, reduce)}")
        b0, b1 = (bs, bs) if isinstance(bs, int) else bs
        tiles = x.size // (b0 * b1)
        k = oracle.keep_count(tiles, s, traced)
        assert int(got.sum()) == k * b0 * b1, f"{name}: kept {got.sum()} entries, want {k} tiles"


@settings(max_examples=40, **SETTINGS)
@given(data=st.data(), case=st.integers(0, len(BLOCK_CASES) - 1), ss=st.lists(SPARSITIES, min_size=1, max_size=3))
def test_block_matches_oracle(data, case, ss):
    bs, reduce, specs = BLOCK_CASES[case]
    kinds = oracle.KINDS if reduce == "max" else EXACT_SUM_KINDS
    tree = build(specs, data.draw, kinds)
    for s in ss:
        check_block(tree, _BLOCK(tree, jnp.float32(s), block_shape=bs, reduce=reduce), s, bs, reduce, True)


@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_block_python_float_sparsity(data):
    bs, reduce, specs = BLOCK_CASES[0]
    tree = build(specs, data.draw, EXACT_SUM_KINDS)
    masks = _BLOCK_STATIC(tree, sparsity=0.5, block_shape=bs, reduce=reduce)
    check_block(tree, masks, 0.5, bs, reduce, False)


def test_block_by_hand():
    # Tiles (2x2) of a (4, 4) leaf, row-major tile grid: [[t0, t1], [t2, t3]].
    s = jnp.array([[1, 1, 9, 9], [1, 1, 9, 9], [5, 5, 1, 1], [5, 5, 1, 1]], jnp.float32)
    got = np.asarray(_BLOCK({"w": s}, jnp.float32(0.5), block_shape=2, reduce="mean")["w"])
    want = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(got, want)
    # Ties between tiles t0 and t3 (both 1): keep 3 tiles -> t0 (lower index) wins.
    got = np.asarray(_BLOCK({"w": s}, jnp.float32(0.25), block_shape=2, reduce="mean")["w"])
    want = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------
# Channels


CHANNEL_CASES = [
    (-1, "l1", {"a": ((4, 6), F32), "b": ((2, 3, 5), BF16), "bias": ((5,), F32)}),
    (0, "l2", {"a": ((5, 3), F16), "b": ((4, 2, 2), F32)}),
    (1, "mean", {"a": ((3, 4), F32), "b": ((2, 5, 2), F32)}),
    (-1, "max", {"a": ((4, 5), BF16)}),
]
_CH = jax.jit(by_rank(jp.masks.channels), static_argnames=("axis", "reduce"))
_CH_STATIC = jax.jit(by_rank(jp.masks.channels), static_argnames=("sparsity", "axis", "reduce"))


def check_channels(tree, masks, s, axis, reduce, traced):
    for name, x in tree.items():
        if x.ndim < 2:
            assert_scalar_true(masks[name], name)
            continue
        got = np.asarray(masks[name])
        want = oracle.channels(x, s, axis, reduce, traced)
        assert got.dtype == np.bool_ and got.shape == x.shape
        np.testing.assert_array_equal(
            got, want, err_msg=f"{name}: channels axis={axis} {reduce} s={s!r}, "
            f"units={oracle.channel_scores(x, axis, reduce)}")
        units = x.shape[axis]
        k = oracle.keep_count(units, s, traced)
        kept_units = np.moveaxis(got, axis, 0).reshape(units, -1)
        assert np.all(kept_units.all(1) | ~kept_units.any(1)), f"{name}: a unit is partly kept"
        assert int(kept_units.all(1).sum()) == k, f"{name}: kept {kept_units.all(1).sum()} units, want {k}"


@settings(max_examples=40, **SETTINGS)
@given(data=st.data(), case=st.integers(0, len(CHANNEL_CASES) - 1), ss=st.lists(SPARSITIES, min_size=1, max_size=3))
def test_channels_matches_oracle(data, case, ss):
    axis, reduce, specs = CHANNEL_CASES[case]
    tree = build(specs, data.draw, oracle.KINDS if reduce == "max" else EXACT_SUM_KINDS)
    for s in ss:
        check_channels(tree, _CH(tree, jnp.float32(s), axis=axis, reduce=reduce), s, axis, reduce,
                       True)


@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_channels_python_float_sparsity(data):
    axis, reduce, specs = CHANNEL_CASES[0]
    tree = build(specs, data.draw, EXACT_SUM_KINDS)
    check_channels(tree, _CH_STATIC(tree, sparsity=0.4, axis=axis, reduce=reduce), 0.4, axis,
                   reduce, False)


def test_channels_by_hand():
    s = jnp.array([[1.0, -5.0, 0.1, 3.0], [1.0, 5.0, 0.2, -3.0]], jnp.float32)
    # L1 units: 2, 10, 0.3, 6 -> keep 2: units 1 and 3.
    got = np.asarray(_CH({"w": s}, jnp.float32(0.5), axis=-1, reduce="l1")["w"])
    np.testing.assert_array_equal(got, np.array([[0, 1, 0, 1]] * 2, bool))
    # max of the unit scores: 1, 5, 0.2, 3 -> keep units 1 and 3; mean: 1, 0, 0.15, 0 -> 0 and 2.
    got = np.asarray(_CH({"w": s}, jnp.float32(0.5), axis=-1, reduce="max")["w"])
    np.testing.assert_array_equal(got, np.array([[0, 1, 0, 1]] * 2, bool))
    got = np.asarray(_CH({"w": s}, jnp.float32(0.5), axis=-1, reduce="mean")["w"])
    np.testing.assert_array_equal(got, np.array([[1, 0, 1, 0]] * 2, bool))


def test_channels_norm_is_a_deprecated_name_of_reduce():
    s = {"w": jnp.array([[1.0, -5.0, 0.1, 3.0], [1.0, 5.0, 0.2, -3.0]], jnp.float32)}
    with pytest.warns(DeprecationWarning, match=r"channels\(reduce=...\)"):
        old = jp.masks.channels(s, 0.5, norm="l2")
    np.testing.assert_array_equal(np.asarray(old["w"]), np.asarray(jp.masks.channels(s, 0.5, reduce="l2")["w"]))


# --------------------------------------------------------------------------
# Per-leaf sparsity trees and where=


_TOPK = jax.jit(jp.masks.topk)


@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), s_a=SPARSITIES, s_b=SPARSITIES)
def test_topk_per_leaf_sparsity_prefix_tree(data, s_a, s_b):
    tree = build({"x": ((6, 7), F32), "y": ((3, 3), BF16)}, data.draw, oracle.KINDS)
    tree = {"a": {"k1": tree["x"], "k2": tree["y"]}, "c": jnp.asarray(gen(np.random.default_rng(0), (4, 4), "ints", F16))}
    sp = {"a": jnp.float32(s_a), "c": jnp.float32(s_b)}  # a prefix tree: one value for subtree "a"
    masks = _TOPK(tree, sp)
    for m, x, s in ((masks["a"]["k1"], tree["a"]["k1"], s_a), (masks["a"]["k2"], tree["a"]["k2"], s_a),
                    (masks["c"], tree["c"], s_b)):
        k = oracle.keep_count(x.size, s, traced=True)
        np.testing.assert_array_equal(np.asarray(m), oracle.topk_leaf(x, k), err_msg=f"s={s}")


class Layer(NamedTuple):
    kernel: Any
    bias: Any


def _where_tree():
    rng = np.random.default_rng(7)
    return {
        "enc": [Layer(jnp.asarray(gen(rng, (8, 4), "normal", F32)), jnp.asarray(gen(rng, (4,), "normal", F32))),
                Layer(jnp.asarray(gen(rng, (4, 6), "ints", BF16)), jnp.asarray(gen(rng, (8,), "normal", F32)))],
        "head": {"kernel": jnp.asarray(gen(rng, (4, 2), "normal", F16)), "scale": jnp.asarray(gen(rng, (2, 4), "normal", F32))},
        "step": jnp.zeros((2, 2), jnp.int32),  # an integer leaf: never selected by default
    }


# expected selected paths ("/"-joined) for each where=
WHERE_CASES = [
    (None, {"enc/0/kernel", "enc/1/kernel", "head/kernel"}),  # not head/scale: a norm name
    ("kernel$", {"enc/0/kernel", "enc/1/kernel", "head/kernel"}),
    (r"^enc/\d+/bias", {"enc/0/bias", "enc/1/bias"}),
    (lambda path, leaf: path.startswith("head") or leaf.shape == (8,), {"head/kernel", "head/scale", "enc/1/bias"}),
    ({"enc": True, "head": False, "step": False}, {"enc/0/kernel", "enc/0/bias", "enc/1/kernel", "enc/1/bias"}),
    ({"enc": [False, Layer(True, False)], "head": {"kernel": False, "scale": True}, "step": False},
     {"enc/1/kernel", "head/scale"}),
]


def _flat(tree):
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_where_variants_select_the_right_leaves():
    tree = _where_tree()
    assert set(jp.tree.paths(tree)) == set(_flat(tree))
    for where, want in WHERE_CASES:
        assert {p for p, s in zip(jp.tree.paths(tree), jp.tree.flags(tree, where)) if s} == want, where
        # n_of_m (cheap to compile) and topk (the full engine) honour it the same way.
        for masks, check in (
            (jax.jit(lambda t, w=where: jp.masks.n_of_m(t, n=1, m=2, axis=-1, where=w))(tree),
             lambda x: oracle.n_of_m(x, 1, 2, -1)),
            (jax.jit(lambda t, w=where: jp.masks.topk(t, 0.5, where=w))(tree)
             if where == "kernel$" else None,
             lambda x: oracle.topk_leaf(x, oracle.keep_count(x.size, 0.5))),
        ):
            if masks is None:
                continue
            for path, m in _flat(masks).items():
                if path in want:
                    np.testing.assert_array_equal(np.asarray(m), check(_flat(tree)[path]),
                                                  err_msg=f"where={where!r}, leaf {path}")
                else:
                    assert_scalar_true(m, f"where={where!r}, unselected leaf {path}")


# --------------------------------------------------------------------------
# apply_masks


@st.composite
def params_and_masks(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = {
        "w": jnp.asarray(gen(rng, (5, 6), draw(st.sampled_from(oracle.KINDS)), BF16)),
        "v": [jnp.asarray(gen(rng, (3, 4, 2), draw(st.sampled_from(oracle.KINDS)), F16)),
              jnp.asarray(gen(rng, (7,), "special", F32))],
        "e": jnp.zeros((0, 3), F32),
        "i": jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
    }
    frac = draw(st.floats(0, 1))
    m = {
        "w": jnp.asarray(rng.random((5, 6)) < frac),
        "v": [jnp.asarray(rng.random((3, 4, 2)) < frac), jnp.ones((), bool)],  # scalar True: untouched
        "e": jnp.zeros((0, 3), bool),
        "i": jnp.asarray(rng.random((2, 3)) < frac),
    }
    return p, m


_APPLY = jax.jit(jp.apply_masks)


@settings(max_examples=40, **SETTINGS)
@given(pm=params_and_masks())
def test_apply_masks(pm):
    params, masks = pm
    out = _APPLY(params, masks)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    for (path, p), o, m in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(out),
                               jax.tree.leaves(masks)):
        name = jax.tree_util.keystr(path)
        o, p, m = np.asarray(o), np.asarray(p), np.broadcast_to(np.asarray(m), np.shape(p))
        assert o.dtype == p.dtype, f"{name}: dtype {p.dtype} became {o.dtype}"
        assert o.shape == p.shape
        # kept entries bit-identical (NaN, -0.0 included); pruned entries +0.0
        bits = {2: np.uint16, 4: np.uint32}[p.dtype.itemsize]
        np.testing.assert_array_equal(o.view(bits)[m], p.view(bits)[m], err_msg=f"{name}: kept entries changed")
        np.testing.assert_array_equal(o.view(bits)[~m], np.zeros((~m).sum(), bits),
                                      err_msg=f"{name}: pruned entries are not +0")


def test_apply_masks_topk_end_to_end_sparsity():
    rng = np.random.default_rng(11)
    params = {"a": jnp.asarray(rng.standard_normal((10, 10)), BF16), "b": jnp.ones(10, BF16)}
    f = jax.jit(lambda p, s: jp.apply_masks(p, jp.masks.global_topk(jp.scores.magnitude(p), s)))
    out = f(params, jnp.float32(0.73))
    assert out["a"].dtype == BF16 and out["b"].dtype == BF16
    assert int(np.sum(np.asarray(out["a"]) == 0)) == 73
    np.testing.assert_array_equal(np.asarray(out["b"]), np.ones(10, BF16))
    assert jp.sparsity_of(out) == 0.73


# --------------------------------------------------------------------------
# pack / unpack


@st.composite
def mask_trees(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shapes = draw(st.sampled_from([
        [(3, 5), (0, 4), (), (17,), (2, 2, 2)],
        [(8,), (1, 1), (9, 7)],
    ]))
    frac = draw(st.floats(0, 1))
    return [jnp.asarray(rng.random(sh) < frac) for sh in shapes]


@settings(max_examples=40, **SETTINGS)
@given(masks=mask_trees())
def test_pack_unpack_roundtrip(masks):
    packed = jax.jit(jp.pack)(masks)
    for m, p in zip(masks, jax.tree.leaves(packed, is_leaf=lambda x: isinstance(x, jp.masks.PackedMask))):
        assert isinstance(p, jp.masks.PackedMask)
        assert p.shape == m.shape
        assert p.bits.dtype == np.uint8 and p.bits.size == -(-m.size // 8), "not 1 bit per entry"
        np.testing.assert_array_equal(np.asarray(p.bits), np.packbits(np.asarray(m).reshape(-1)))
    back = jax.jit(jp.unpack)(packed)
    assert len(back) == len(masks)
    for m, b in zip(masks, back):
        assert b.dtype == np.bool_ and b.shape == m.shape
        np.testing.assert_array_equal(np.asarray(b), np.asarray(m))


def test_pack_scalar_true_and_eager():
    masks = {"w": jnp.array([[True, False, True]]), "b": jnp.ones((), bool)}
    back = jp.unpack(jp.pack(masks))
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(masks["w"]))
    assert back["b"].shape == () and bool(back["b"])


# --------------------------------------------------------------------------
# sparsity and summary


def test_sparsity_and_summary_values():
    params = {
        "k": jnp.array([[0.0, -0.0, 1.0, jnp.nan], [2.0, 0.0, 3.0, 4.0]], F32),  # 3 zeros / 8
        "e": jnp.zeros((0, 5), F32),  # size 0: not a kernel by default (one axis > 1)
        "h": jnp.array([[0.0, 1.0], [1.0, 1.0]], BF16),  # 1 / 4
        "b": jnp.zeros(3, F32),  # unselected by default
    }
    assert jp.sparsity_of(params) == 4 / 12
    assert jp.sparsity_of(params, where="^k$") == 3 / 8
    assert jp.sparsity_of(params, where=lambda p, x: True) == 7 / 15
    assert isinstance(jp.sparsity_of(params), float)
    traced = jax.jit(jp.sparsity_of)(params)
    assert np.asarray(traced) == np.float32(4) / np.float32(12)
    masks = {"k": jnp.array([[True, False, False]]), "e": jnp.zeros((0, 2), bool),
             "h": jnp.ones((), bool), "b": jnp.ones((), bool)}
    assert jp.sparsity_of(masks, where="k") == 2 / 3
    # default where=None on a mask tree: bool kernels count
    assert jp.sparsity_of({"m": jnp.array([[True, False], [False, False]]), "b": jnp.ones((), bool)}) == 0.75
    assert jp.sparsity_of(masks, where=lambda p, x: p != "e") == 2 / 5  # scalar True counts as 1 kept

    s = jp.summary(params)
    d = s.to_dict()
    assert set(d) == {"k", "h", "total"}
    assert d["k"] == dict(path="k", shape=(2, 4), size=8, kept=5, sparsity=3 / 8)
    assert d["h"]["kept"] == 3 and d["h"]["sparsity"] == 0.25
    assert d["total"] == dict(path="total", size=12, kept=8, sparsity=4 / 12)
    d = jp.summary(params, where=lambda p, x: p != "b").to_dict()
    assert d["e"] == dict(path="e", shape=(0, 5), size=0, kept=0, sparsity=0.0)
    text = str(s)
    for name in ("k", "h", "total"):
        assert re.search(rf"^{name}\s", text, re.M), f"row {name} missing in:\n{text}"
    assert "33.33%" in text
    sm = jp.summary(masks, where=lambda p, x: p != "e").to_dict()
    assert sm["k"]["kept"] == 1 and sm["k"]["sparsity"] == 2 / 3 and sm["total"]["kept"] == 3


def test_summary_natural_order_and_total_without_shape():
    params = {f"Block_{i}": {"kernel": jnp.ones((2, 2))} for i in (10, 2, 1, 33, 3)}
    s = jp.summary(params)
    assert [r["path"] for r in s.rows] == [f"Block_{i}/kernel" for i in (1, 2, 3, 10, 33)]
    assert "shape" not in s.total
    total_line = str(s).splitlines()[-1]
    assert total_line.startswith("total") and "()" not in total_line, total_line


def test_summary_layers_gives_per_layer_rows():
    w = jnp.stack([jnp.zeros((3, 4)), jnp.ones((3, 4)), jnp.eye(3, 4)])  # layers 0, 1, 2
    params = {"layers": {"kernel": w}, "head": {"kernel": jnp.ones((4, 2))}}
    s = jp.summary(params, layers="^layers/")
    rows = {r["path"]: r for r in s.rows}
    assert list(rows) == ["head/kernel", "layers/kernel[0]", "layers/kernel[1]", "layers/kernel[2]"]
    assert rows["layers/kernel[0]"] == dict(path="layers/kernel[0]", shape=(3, 4), size=12, kept=0,
                                            sparsity=1.0)
    assert rows["layers/kernel[1]"]["kept"] == 12 and rows["layers/kernel[2]"]["kept"] == 3
    assert s.total == dict(path="total", size=44, kept=23, sparsity=21 / 44)
    # The same without layers= is one row per leaf, with the same total.
    assert jp.summary(params).total == s.total


# --------------------------------------------------------------------------
# LazyScores leaves: the same masks as the computed scores, none stored


def _lazy_magnitude(params):
    return jax.tree.map(lambda w: jp.select.LazyScores(jnp.abs, (w,)), params)


@pytest.mark.parametrize("call", [
    lambda s: jp.masks.global_topk(s, 0.7),
    lambda s: jp.masks.global_topk(s, keep=11),
    lambda s: jp.masks.topk(s, 0.7),
    lambda s: jp.masks.topk(s, {"a": 0.5, "b": {"kernel": 0.25}, "bias": 0.0}),
    lambda s: jp.masks.topk(s, keep=5),
    lambda s: jp.masks.topk(s, 0.5, axis=0),
], ids=["global", "global-keep", "topk", "topk-tree", "topk-keep", "topk-axis"])
def test_lazy_score_leaves_give_the_same_masks(call):
    k0, k1 = jax.random.split(jax.random.key(0))
    params = {"a": jax.random.normal(k0, (8, 16)),
              "b": {"kernel": jnp.round(jax.random.normal(k1, (3, 3, 4, 8)))},  # ties
              "bias": jnp.ones(8)}
    want = jax.jit(lambda p: call(jp.scores.magnitude(p)))(params)
    got = jax.jit(lambda p: call(_lazy_magnitude(p)))(params)
    assert_trees_equal(got, want)
    assert np.ndim(got["bias"]) == 0  # where= decided on the lazy leaves' shapes


def test_lazy_score_leaves_store_no_score_sized_temporary():
    params = {f"l{i}": {"kernel": jax.ShapeDtypeStruct((512, 512), jnp.float32)} for i in range(3)}
    n_bytes = 3 * 512 * 512 * 4

    def temp(fn):
        return jax.jit(fn).lower(params).compile().memory_analysis().temp_size_in_bytes

    stored = temp(lambda p: jp.masks.global_topk(  # |w| the masks cannot recompute
        jax.tree.map(lambda w: jax.lax.optimization_barrier(jnp.abs(w)), p), 0.9))
    lazy = temp(lambda p: jp.masks.global_topk(_lazy_magnitude(p), 0.9))
    assert stored >= n_bytes  # the score arrays: what the lazy leaves avoid
    assert lazy < 0.1 * n_bytes


@pytest.mark.parametrize("fn", [jp.masks.global_topk, jp.masks.topk], ids=["global", "topk"])
def test_magnitude_under_jit_is_lazy(fn):
    """The obvious path, ``fn(scores.magnitude(p), s)`` under ``jit``, stores
    no ``|w|``: the masks recompute it (same masks as stored scores)."""
    k = jax.random.split(jax.random.key(1), 3)
    params = {"a": jax.random.normal(k[0], (300, 301)), "b": jax.random.normal(k[1], (4096, 33)),
              "c": jnp.round(jax.random.normal(k[2], (3, 3, 20, 40))).astype(jnp.bfloat16)}
    n_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
    obvious = jax.jit(lambda p: fn(jp.scores.magnitude(p), 0.8))
    temp = obvious.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.1 * n_bytes, temp
    host = {key: np.abs(np.asarray(w, np.float32)) for key, w in params.items()}
    want = fn(host, 0.8)  # plain arrays, outside jit
    got = obvious(params)
    for key in params:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)

"""select.select_along (exact top-k within slices along axes) against a
numpy oracle: every index of the other axes is its own group, ties by
position within the slice, NaN lowest, bf16/f16 widened exactly.

Compilation dominates, so shapes come from a few templates (each compiled
once per axis choice) while values, kinds and budgets vary freely.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxprune.core import select as sel

SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Shapes: a Flax (in, out) kernel with a last axis divisible by 32 (packed
# counts), an odd one, a layer stack (L, in, out), many small groups, a tiny
# one and empty ones.
SHAPES = [(40, 64), (7, 9), (3, 5, 32), (200, 3), (1, 1), (0, 4), (3, 0, 2)]


def along_oracle(x: np.ndarray, axes: tuple, keep: np.ndarray) -> np.ndarray:
    """For every index of the other axes, oracle.topk_leaf on the slice
    (flattened row-major over ``axes``, in their order)."""
    x = oracle.to_f32(x) if x.dtype != np.uint32 else x
    nd = x.ndim
    others = [a for a in range(nd) if a not in axes]
    moved = np.transpose(x, (*others, *axes))
    other_shape = moved.shape[: len(others)]
    s = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    flat = moved.reshape(int(np.prod(other_shape, dtype=np.int64)), s)
    keep = np.broadcast_to(keep, other_shape).reshape(-1)
    out = np.zeros(flat.shape, bool)
    for g in range(flat.shape[0]):
        k = int(np.clip(keep[g], 0, flat.shape[1]))
        if flat.shape[1]:
            out[g] = uint_topk(flat[g], k) if x.dtype == np.uint32 else oracle.topk_leaf(flat[g], k)
    back = out.reshape(moved.shape)
    return np.transpose(back, np.argsort((*others, *axes)))


def uint_topk(keys: np.ndarray, k: int) -> np.ndarray:
    """Top ``k`` of uint32 keys (unsigned order), ties by position."""
    order = np.lexsort((np.arange(keys.size), -keys.astype(np.int64)))
    m = np.zeros(keys.size, bool)
    m[order[:k]] = True
    return m


def all_axes(nd: int) -> list[tuple]:
    return [c for r in range(nd + 1) for c in itertools.combinations(range(nd), r)]


_JIT = {}


def run(x, axes, keep):
    """select_along under jit (keep traced), one compile per (shape, dtype, axes)."""
    key = (x.shape, str(x.dtype), axes, np.shape(keep))
    if key not in _JIT:
        _JIT[key] = jax.jit(lambda x, k: sel.select_along(x, axes, k))
    return np.asarray(_JIT[key](x, jnp.asarray(keep, jnp.int32)))


def check(x, axes, keep):
    got = run(jnp.asarray(x), axes, keep)
    want = along_oracle(np.asarray(x), axes, np.asarray(keep))
    assert got.dtype == np.bool_ and got.shape == np.shape(x)
    np.testing.assert_array_equal(got, want, err_msg=f"shape {np.shape(x)}, axes {axes}, keep {keep}")
    others = tuple(a for a in range(np.ndim(x)) if a not in axes)
    s = int(np.prod([np.shape(x)[a] for a in axes], dtype=np.int64))
    counts = got.sum(axis=axes) if axes else got.astype(int)
    np.testing.assert_array_equal(counts, np.clip(np.broadcast_to(keep, counts.shape), 0, s),
                                  err_msg=f"counts, axes {axes}, others {others}")


@st.composite
def cases(draw):
    shape = draw(st.sampled_from(SHAPES))
    axes = draw(st.sampled_from(all_axes(len(shape))))
    dtype = draw(st.sampled_from([np.float32, jnp.bfloat16, np.float16]))
    kind = draw(st.sampled_from(oracle.KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = oracle.gen_scores(rng, shape, kind, dtype)
    other_shape = tuple(d for a, d in enumerate(shape) if a not in axes)
    s = int(np.prod([shape[a] for a in axes], dtype=np.int64))
    if draw(st.booleans()):
        keep = np.int32(draw(st.integers(-1, s + 1)))
    else:
        keep = rng.integers(-1, s + 2, other_shape).astype(np.int32)
    return x, axes, keep


@settings(max_examples=60, **SETTINGS)
@given(case=cases())
def test_select_along_matches_oracle(case):
    check(*case)


@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(oracle.KINDS))
def test_wanda_columns_and_layer_stacks(seed, kind):
    rng = np.random.default_rng(seed)
    # Wanda: compare within each output column of a Flax (in, out) kernel.
    w = oracle.gen_scores(rng, (40, 64), kind)
    check(w, (0,), np.int32(rng.integers(0, 41)))
    # A stack of 3 layers, each with its own budget.
    stack = oracle.gen_scores(rng, (3, 5, 32), kind)
    check(stack, (1, 2), rng.integers(0, 161, (3,)).astype(np.int32))


def test_all_ties_keep_the_first_positions_of_every_slice():
    x = np.zeros((3, 5, 32), np.float32)
    keep = np.array([0, 7, 160], np.int32)
    got = run(jnp.asarray(x), (1, 2), keep)
    for layer, k in enumerate(keep):
        np.testing.assert_array_equal(got[layer].reshape(-1), np.arange(160) < k)
    got = run(jnp.asarray(x), (0, 2), np.int32(33))  # slice axes 0 and 2, row-major
    want = (np.arange(96).reshape(3, 32) < 33)[:, None, :].repeat(5, axis=1)
    np.testing.assert_array_equal(got, want)


def test_nan_ranks_lowest_within_each_slice():
    x = np.array([[np.nan, 1.0], [-np.inf, np.nan], [0.0, -1.0]], np.float32)
    np.testing.assert_array_equal(run(jnp.asarray(x), (0,), np.int32(2)),
                                  [[False, True], [True, False], [True, True]])


def test_uint32_keys_and_lazy_scores():
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 2**32, (40, 64), dtype=np.uint64).astype(np.uint32)
    keys[:3, :5] = 0xFFFFFFFF  # the largest key, tied
    check(keys, (0,), np.int32(2))
    check(keys, (1,), rng.integers(0, 65, (40,)).astype(np.int32))
    w = oracle.gen_scores(rng, (40, 64), "special")
    m = rng.random((40, 64)) < 0.5
    lazy = jax.jit(lambda w, m: sel.select_along(
        sel.LazyScores(lambda w, m: jnp.where(m, jnp.abs(w), -jnp.inf), (w, m)), 0, 5))
    want = along_oracle(np.where(m, np.abs(w), -np.inf).astype(np.float32), (0,), np.int32(5))
    np.testing.assert_array_equal(np.asarray(lazy(jnp.asarray(w), jnp.asarray(m))), want)


def test_many_groups_compile_like_few():
    # The search is vectorised over groups: the program does not grow with
    # them (only the sample's slicing may differ by an op or two).
    def n_ops(groups):
        f = jax.jit(lambda x: sel.select_along(x, 1, 3))
        return len(f.lower(jax.ShapeDtypeStruct((groups, 64), jnp.float32)).as_text().splitlines())

    few, many = n_ops(4), n_ops(16384)
    assert abs(many - few) <= 4, (few, many)


def test_errors():
    x = jnp.zeros((4, 6))
    with pytest.raises(ValueError, match="out of range"):
        sel.select_along(x, 2, 1)
    with pytest.raises(ValueError, match="repeats"):
        sel.select_along(x, (0, -2), 1)
    with pytest.raises(ValueError, match=r"shape of the axes not in axis= \(6,\)"):
        sel.select_along(x, 0, jnp.ones((4,), jnp.int32))
    with pytest.raises(TypeError, match="keep_count"):
        sel.select_along(x, 0, 0.5)

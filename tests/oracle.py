"""Plain numpy reference implementations of jaxprune's selections.

Written independently of :mod:`jaxprune.select` (no bit tricks, no search):
every oracle ranks with :func:`numpy.lexsort` and keeps the first ``k``.

The ranking rule (the public contract):

* descending by score value;
* NaN ranks lowest, below ``-inf``;
* ``-0.0`` equals ``+0.0``;
* ties broken by position: lower flat (row-major) index first; for a global
  selection, leaves in pytree order (``jax.tree_util.tree_leaves`` order).

Scores are compared as float32: ``bfloat16`` / ``float16`` are widened to
float32 exactly, float64 rounded to float32.

Keep counts: ``n`` candidates at sparsity ``s`` keep
``int(np.clip(np.round(n * (1 - s)), 0, n))`` (half to even) when ``s`` is a
concrete Python number. When ``s`` is a traced ``jnp.float32`` the library
computes ``round(n * (1 - s))`` *exactly* for the float32 value of ``s``
(:func:`jaxprune.select.keep_count`); :func:`keep_count` with
``traced=True`` computes that with :class:`fractions.Fraction`.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np

__all__ = [
    "KINDS",
    "block",
    "block_tile_scores",
    "channel_scores",
    "channels",
    "gen_scores",
    "global_topk",
    "keep_count",
    "n_of_m",
    "rank_order",
    "to_f32",
    "topk",
    "topk_leaf",
]


def to_f32(x) -> np.ndarray:
    """The scores as a float32 numpy array (bf16/f16 widen exactly)."""
    return np.asarray(x).astype(np.float32)


def keep_count(n: int, s, traced: bool = False) -> int:
    """How many of ``n`` entries sparsity ``s`` keeps.

    ``traced=False``: ``round(n * (1 - s))`` in float64 (a Python float ``s``).
    ``traced=True``: ``round(n * (1 - s32))`` in exact rational arithmetic,
    ``s32`` the float32 value of ``s`` (what the library computes for a
    traced sparsity).
    """
    n = int(n)
    if traced:
        s32 = np.float32(s)
        if np.isnan(s32):
            return n
        x = n * (1 - Fraction(float(min(max(s32, np.float32(0)), np.float32(1)))))
        fl = x.numerator // x.denominator
        r = x - fl
        k = fl + 1 if r > Fraction(1, 2) else fl if r < Fraction(1, 2) else fl + (fl % 2)
        return int(min(max(k, 0), n))
    return int(np.clip(np.round(n * (1.0 - float(s))), 0, n))


def rank_order(scores) -> np.ndarray:
    """Flat indices of ``scores``, best first, under the ranking rule."""
    v = to_f32(scores).reshape(-1).astype(np.float64)
    nan = np.isnan(v)
    neg = -np.where(nan, 0.0, v)
    neg = np.where(neg == 0.0, 0.0, neg)  # -0.0 and +0.0 become one value
    pos = np.arange(v.size)
    # lexsort: the last key is the primary one.
    return np.lexsort((pos, neg, nan))


def topk_leaf(scores, k: int) -> np.ndarray:
    """Boolean mask keeping the ``k`` best entries of one array."""
    x = np.asarray(scores)
    keep = np.zeros(x.size, bool)
    keep[rank_order(x)[:k]] = True
    return keep.reshape(x.shape)


def topk(leaves: Sequence, sparsity, traced: bool = False) -> list[np.ndarray]:
    """Per-leaf top-k: each array keeps ``keep_count(size, s)`` entries.

    ``sparsity`` is one number or a sequence with one number per leaf.
    """
    sp = list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity] * len(leaves)
    return [topk_leaf(x, keep_count(np.size(x), s, traced)) for x, s in zip(leaves, sp)]


def global_topk(leaves: Sequence, sparsity, traced: bool = False) -> list[np.ndarray]:
    """One selection over all leaves; ties go to earlier leaves, then lower index."""
    arrays = [to_f32(x) for x in leaves]
    sizes = [a.size for a in arrays]
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)
    keep = topk_leaf(flat, keep_count(flat.size, sparsity, traced))
    out, off = [], 0
    for a, sz in zip(arrays, sizes):
        out.append(keep[off : off + sz].reshape(a.shape))
        off += sz
    return out


def n_of_m(scores, n: int, m: int, axis: int = -2) -> np.ndarray:
    """N:M: in each run of ``m`` consecutive entries along ``axis`` keep the ``n`` best."""
    x = to_f32(scores)
    ax = axis % x.ndim
    moved = np.moveaxis(x, ax, -1)
    assert moved.shape[-1] % m == 0
    groups = moved.reshape(-1, m)
    keep = np.stack([topk_leaf(g, n) for g in groups]) if groups.shape[0] else np.zeros((0, m), bool)
    return np.moveaxis(keep.reshape(moved.shape), -1, ax)


def _reduce(t: np.ndarray, axes, reduce: str) -> np.ndarray:
    """One float32 score per group: ``l1`` sum |x|, ``l2`` sqrt(sum x^2),
    ``mean`` (sum / count), ``max``; sums accumulated in float64 and rounded
    to float32 (XLA may sum in another order, so this equals the library's
    value whenever the float32 sum is exact, e.g. small integer scores)."""
    count = np.prod([t.shape[a] for a in axes])
    with np.errstate(invalid="ignore", over="ignore"):
        if reduce == "max":
            return np.max(t, axis=axes).astype(np.float32)
        x = t.astype(np.float64)
        if reduce == "l1":
            return np.sum(np.abs(x), axis=axes).astype(np.float32)
        if reduce == "l2":
            return np.sqrt(np.sum(x * x, axis=axes).astype(np.float32)).astype(np.float32)
        total = np.sum(x, axis=axes).astype(np.float32)
        return (total / np.float32(count)).astype(np.float32)


def block_tile_scores(scores, block_shape, reduce: str = "mean") -> np.ndarray:
    """Tile scores ``(..., r // b0, c // b1)`` of the float32 scores (see
    :func:`_reduce`; ``max`` is exact, NaN propagates)."""
    b0, b1 = (block_shape, block_shape) if isinstance(block_shape, int) else block_shape
    x = to_f32(scores)
    r, c = x.shape[-2:]
    t = x.reshape(*x.shape[:-2], r // b0, b0, c // b1, b1)
    return _reduce(t, (x.ndim - 1, x.ndim + 1), reduce)


def block(scores, sparsity, block_shape, reduce: str = "mean", traced: bool = False) -> np.ndarray:
    """Block mask: keep ``round(t * (1 - s))`` of the ``t`` tiles of one leaf.

    Tiles of all leading indices compete together; ties between tiles go to
    the lower tile index in row-major order of the tile grid ``(..., R, C)``.
    """
    b0, b1 = (block_shape, block_shape) if isinstance(block_shape, int) else block_shape
    ts = block_tile_scores(scores, (b0, b1), reduce)
    tmask = topk_leaf(ts, keep_count(ts.size, sparsity, traced))
    full = np.repeat(np.repeat(tmask, b0, axis=-2), b1, axis=-1)
    return full.reshape(np.shape(scores))


def channel_scores(scores, axis: int = -1, reduce: str = "l1") -> np.ndarray:
    """Unit scores along ``axis``: ``reduce`` (:func:`_reduce`) over the other
    axes of the float32 scores."""
    x = to_f32(scores)
    ax = axis % x.ndim
    return _reduce(x, tuple(a for a in range(x.ndim) if a != ax), reduce)


def channels(scores, sparsity, axis: int = -1, reduce: str = "l1", traced: bool = False) -> np.ndarray:
    """Channel mask: keep ``round(u * (1 - s))`` whole units along ``axis``."""
    x = np.asarray(scores)
    ax = axis % x.ndim
    us = channel_scores(x, ax, reduce)
    umask = topk_leaf(us, keep_count(us.size, sparsity, traced))
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    return np.broadcast_to(umask.reshape(shape), x.shape).copy()


# --------------------------------------------------------------------------
# Test data (numpy only): score arrays of many kinds, for the property tests.

KINDS = ("normal", "ints", "equal", "special", "wide", "dup", "ulps")

_SPECIALS = np.array(
    [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0],
    np.float32,
)


def gen_scores(rng: np.random.Generator, shape, kind: str, dtype=np.float32) -> np.ndarray:
    """A score array of ``shape`` and ``dtype`` (numpy, ml_dtypes for bf16).

    kinds: ``normal`` (continuous), ``ints`` (small integers with signed
    zeros: heavy ties), ``equal`` (one value everywhere, possibly NaN/inf/-0),
    ``special`` (normal with ~25% NaN/inf/-0/subnormal/huge), ``wide``
    (magnitudes 2**-149 .. 2**127), ``dup`` (three distinct values),
    ``ulps`` (1.0 + a few ulps: adjacent float32 keys).
    """
    n = int(np.prod(shape, dtype=np.int64))
    if kind == "normal":
        x = rng.standard_normal(n).astype(np.float32)
    elif kind == "ints":
        x = rng.integers(-3, 4, n).astype(np.float32)
        x = np.where((x == 0) & (rng.random(n) < 0.5), np.float32(-0.0), x)
    elif kind == "equal":
        x = np.full(n, rng.choice(np.array([0.0, -0.0, 1.5, -2.0, np.nan, np.inf], np.float32)), np.float32)
    elif kind == "special":
        x = rng.standard_normal(n).astype(np.float32)
        pick = rng.random(n) < 0.25
        x[pick] = rng.choice(_SPECIALS, int(pick.sum()))
    elif kind == "wide":
        e = rng.uniform(-149, 127, n)
        x = (np.sign(rng.standard_normal(n)) * np.exp2(e)).astype(np.float32)
    elif kind == "dup":
        vals = rng.standard_normal(3).astype(np.float32)
        x = rng.choice(vals, n)
    elif kind == "ulps":
        ulp = np.finfo(np.float32).eps
        x = (np.float32(1.0) + rng.integers(0, 5, n).astype(np.float32) * ulp).astype(np.float32)
    else:
        raise ValueError(kind)
    x = x.reshape(shape)
    with np.errstate(over="ignore"):
        return x.astype(dtype)

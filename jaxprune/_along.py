"""Exact top-k within comparison groups along axes (per row, per slice).

A stand-in for ``select.select_along`` (same signature), written with a
stable sort per group: fine for kernel-sized arrays. :func:`jaxprune.masks.topk`
and :mod:`jaxprune.oneshot` import :func:`select_along` from here only, so
moving to the selection engine is a one-line change of that import.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import select as _select

__all__ = ["group_shape", "keep_counts", "normalize_axes", "select_along"]


def normalize_axes(axis: int | Sequence[int], ndim: int, what: str = "axis") -> tuple[int, ...]:
    """Sorted non-negative axes; raises ``ValueError`` when out of range or repeated."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if not axes or any(not -ndim <= int(a) < ndim for a in axes):
        raise ValueError(f"{what}={axis!r} is out of range for an array of rank {ndim}.")
    out = tuple(sorted(int(a) % ndim for a in axes))
    if len(set(out)) != len(out):
        raise ValueError(f"{what}={axis!r} repeats an axis.")
    return out


def group_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """The shape of the comparison groups: ``shape`` without ``axes``."""
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def keep_counts(n: int, sparsity: Any, gshape: Sequence[int]) -> Any:
    """``round(n * (1 - s))`` per group, ``s`` broadcast to ``gshape``.

    Concrete sparsities are rounded on the host in float64 (half to even);
    traced ones exactly for their float32 value (:func:`select.keep_count`).
    """
    if isinstance(sparsity, jax.core.Tracer):
        s = jnp.broadcast_to(jnp.asarray(sparsity, jnp.float32), tuple(gshape))
        return _select._keep_count_exact(n, s)
    s = np.broadcast_to(np.asarray(sparsity, np.float64), tuple(gshape))
    return np.clip(np.round(n * (1.0 - s)), 0, n).astype(np.int32)


@functools.partial(jax.jit, static_argnums=1)
def select_along(scores: jax.Array, axis: int | Sequence[int], keep: Any) -> jax.Array:
    """Keeps the ``keep`` largest scores of every group along ``axis``.

    Every index of the other axes is its own group; ``keep`` is an int or an
    integer array broadcastable to the groups' shape (the shape without
    ``axis``). Ties go to the lower (row-major) index along ``axis``; NaN
    ranks lowest. Two stable sorts per group, vectorised over all groups.

    Args:
      scores: a float array (``uint32`` is taken as ready-made keys).
      axis: an axis or a tuple of axes forming one comparison group.
      keep: entries kept per group.

    Returns:
      A boolean mask of ``scores.shape``.

    Example:
      >>> import jax.numpy as jnp
      >>> select_along(jnp.array([[1.0, 3.0], [2.0, 0.0]]), 0, 1).tolist()
      [[False, True], [True, False]]
    """
    scores = jnp.asarray(scores)
    axes = normalize_axes(axis, scores.ndim)
    rest = tuple(i for i in range(scores.ndim) if i not in axes)
    key = scores if scores.dtype == jnp.uint32 else _select.sortable_key(scores)
    moved = jnp.transpose(key, rest + axes)
    gshape = moved.shape[: len(rest)]
    n = int(np.prod(moved.shape[len(rest):], dtype=np.int64))
    flat = moved.reshape(gshape + (n,))
    iota = lax.broadcasted_iota(jnp.int32, flat.shape, flat.ndim - 1)
    _, order = lax.sort((~flat, iota), dimension=flat.ndim - 1, is_stable=True, num_keys=1)
    _, rank = lax.sort((order, iota), dimension=flat.ndim - 1, is_stable=True, num_keys=1)
    k = jnp.broadcast_to(jnp.asarray(keep, jnp.int32), gshape)
    kept = (rank < k[..., None]).reshape(moved.shape)
    return jnp.transpose(kept, np.argsort(rest + axes))


def leaf_topk(path: str, scores: Any, sparsity: Any, axis: Any) -> jax.Array:
    """Per-slice top-k mask of one leaf; ``axis=None`` with a sparsity of rank
    ``r`` compares within each index of the leading ``r`` axes."""
    scores = jnp.asarray(scores)
    r = np.ndim(sparsity)
    if axis is None:
        if not 0 < r < scores.ndim:
            raise ValueError(
                f"topk: leaf {path!r} of shape {scores.shape} got a sparsity of shape "
                f"{np.shape(sparsity)}; a per-slice sparsity needs axis= or must have fewer "
                "axes than the leaf (one value per index of its leading axes).")
        axis = tuple(range(r, scores.ndim))
    try:
        axes = normalize_axes(axis, scores.ndim)
    except ValueError as e:
        raise ValueError(f"topk: leaf {path!r} of shape {scores.shape}: {e}") from None
    gshape = group_shape(scores.shape, axes)
    try:
        np.broadcast_shapes(np.shape(sparsity), gshape)
    except ValueError:
        raise ValueError(
            f"topk: the sparsity of leaf {path!r} has shape {np.shape(sparsity)}, which does "
            f"not broadcast to its groups' shape {gshape} (shape {scores.shape} without "
            f"axis {axis!r}).") from None
    n = int(np.prod([scores.shape[a] for a in axes], dtype=np.int64))
    return select_along(scores, axes, keep_counts(n, sparsity, gshape))

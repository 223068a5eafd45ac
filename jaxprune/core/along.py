"""Exact top-k within comparison groups along axes (per row, per slice).

The helpers that :func:`jaxprune.masks.topk` (``axis=``) and
:mod:`jaxprune.oneshot` share around :func:`jaxprune.select.select_along`:
axis normalisation, group shapes, per-group keep counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import select as _select

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
        return _select.keep_count(n, s)  # exact for the float32 value, elementwise
    s = np.broadcast_to(np.asarray(sparsity, np.float64), tuple(gshape))
    return np.clip(np.round(n * (1.0 - s)), 0, n).astype(np.int32)


def select_along(scores: jax.Array, axis: int | Sequence[int], keep: Any) -> jax.Array:
    """:func:`jaxprune.select.select_along` with ``keep`` broadcast to the
    groups' shape (the shape without ``axis``).

    Example:
      >>> import jax.numpy as jnp
      >>> select_along(jnp.array([[1.0, 3.0], [2.0, 0.0]]), 0, 1).tolist()
      [[False, True], [True, False]]
    """
    scores = jnp.asarray(scores)
    axes = normalize_axes(axis, scores.ndim)
    gshape = group_shape(scores.shape, axes)
    keep = keep if np.ndim(keep) == 0 else jnp.broadcast_to(jnp.asarray(keep, jnp.int32), gshape)
    return _compiled_select_along(scores, axes, keep)


# One compiled program: called eagerly (a transform's init, a one-shot mask),
# select_along's many small operations would otherwise each dispatch on their
# own (several times slower); under an outer jit it is inlined.
_compiled_select_along = jax.jit(_select.select_along, static_argnums=1)


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

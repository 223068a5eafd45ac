"""Masks from scores: per leaf, global, N:M, blocks and whole channels.

A mask tree has the structure of its parameters. Selected leaves hold a
``bool`` array of the leaf's shape (``True`` = keep); leaves that are not
selected (and leaves that are not arrays) hold a scalar ``True``, which
broadcasts, so :func:`apply_masks` leaves them untouched.

All selections are exact: a sparsity ``s`` over ``n`` candidates keeps
``round(n * (1 - s))`` of them (half to even), ties broken by position (lower
flat index first, leaves in pytree order) and NaN ranked lowest. They run
under :func:`jax.jit`, with a traced sparsity too. :func:`topk` and
:func:`global_topk` also take exact keep counts (``keep=``) instead.

Example:
  >>> import jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"w": jnp.array([[0.1, -2.0], [0.5, 3.0]]), "b": jnp.ones(2)}
  >>> masks = jp.masks.topk(jp.scores.magnitude(params), 0.5)
  >>> masks["w"].tolist(), masks["b"].tolist()
  ([[False, True], [False, True]], True)
  >>> jp.apply_masks(params, masks)["w"].tolist()
  [[0.0, -2.0], [0.0, 3.0]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import _deprecation
from jaxprune.core import select as _select
from jaxprune.core import tree as _tree
from jaxprune.core.along import leaf_topk as _leaf_topk
from jaxprune.core.along import select_along as _slices
from jaxprune.core.tree import PyTree

__all__ = [
    "REDUCTIONS",
    "PackedMask",
    "Summary",
    "apply_masks",
    "apply_masks_ste",
    "block",
    "channels",
    "global_topk",
    "n_of_m",
    "pack",
    "random_like",
    "sparsity_of",
    "summary",
    "topk",
    "unpack",
]

REDUCTIONS = ("l1", "l2", "mean", "max")
"""How :func:`block` and :func:`channels` reduce a group of scores to one."""


# --------------------------------------------------------------------------
# Validation helpers (shared by the package)


def _is_concrete(x: Any) -> bool:
    try:
        np.asarray(x)
        return not isinstance(x, jax.core.Tracer)
    except Exception:  # noqa: BLE001
        return False


def check_sparsity(value: Any, what: str = "sparsity", path: str | None = None) -> None:
    """Raises ``ValueError`` if a concrete sparsity is NaN or outside [0, 1]."""
    if isinstance(value, jax.core.Tracer) or not _is_concrete(value):
        return
    arr = np.asarray(value)
    where = f" for leaf {path!r}" if path else ""
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{what}{where} must be a number in [0, 1], got {value!r}.")
    if np.any(np.isnan(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(
            f"{what}{where} must be in [0, 1] (the fraction of weights set to zero), "
            f"got {value!r}. For example 0.9 prunes 90% and keeps 10% of the weights."
        )


def _check_float(path: str, leaf: Any, what: str = "scores") -> None:
    if not _tree.is_float(leaf):
        raise TypeError(
            f"{what} leaf {path!r} has dtype {jnp.result_type(leaf)}, but only floating "
            "leaves can be scored and pruned. Integer and bool leaves are usually state "
            "(step counters, nnx.Rngs counts, raw uint32 PRNG key data, flags), not "
            "weights: exclude it with where= (e.g. a regex or a callable); if it is a "
            "weight, cast it to a float dtype."
        )


def selection(tree: PyTree, where: Any = None, what: str = "scores"):
    """``(paths, leaves, treedef, flags)`` of ``tree`` under ``where=``.

    Raises ``ValueError`` if nothing is selected and ``TypeError`` if a
    selected leaf is not floating.
    """
    paths, leaves, treedef = _tree.flatten(tree)
    sel = _tree.flags(tree, where)
    if leaves and not any(sel):
        raise ValueError(
            f"where={where!r} selects no leaf of {what} (paths: {paths[:20]}). With "
            "where=None only kernels are selected (jp.tree.is_kernel: floating leaves "
            "with two axes longer than 1, not named like a bias, norm or embedding); "
            "pass a regex or a callable to choose others."
        )
    for p, leaf, s in zip(paths, leaves, sel):
        if s:
            _check_float(p, leaf, what)
    return paths, leaves, treedef, sel


def per_leaf_sparsity(sparsity: Any, tree: PyTree, paths: Sequence[str], sel) -> list[Any]:
    """A sparsity per leaf: a number (broadcast) or a tree/prefix of numbers,
    checked on the selected leaves."""
    if _is_scalar(sparsity):
        check_sparsity(sparsity)
        return [sparsity] * len(paths)
    values = _tree.broadcast_values(sparsity, tree, "sparsity")
    for p, v, s in zip(paths, values, sel):
        if s:
            if v is None:
                raise ValueError(f"sparsity for selected leaf {p!r} is None.")
            check_sparsity(v, "sparsity", p)
    return values


def _unselected_mask() -> jax.Array:
    return jnp.ones((), jnp.bool_)


def _is_scalar(x: Any) -> bool:
    # A tree (or list) is not a scalar: np.ndim({...}) == 0, so test the type.
    return isinstance(x, (int, float, np.number)) or (hasattr(x, "shape") and np.ndim(x) == 0)


def _keep_value(k: Any, n: int, path: str) -> Any:
    """A checked keep count for a leaf (or group) of ``n`` entries."""
    if isinstance(k, jax.core.Tracer) or (isinstance(k, jax.Array) and not _is_concrete(k)):
        if not jnp.issubdtype(k.dtype, jnp.integer) or k.ndim:
            raise TypeError(f"keep for {path} must be an integer scalar, got {k.dtype}{k.shape}.")
        return jnp.clip(k, 0, n).astype(jnp.int32)
    if isinstance(k, (np.ndarray, jax.Array)) and k.ndim == 0 and k.dtype.kind in "iu":
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(
            f"keep for {path} must be an int (a count of entries to keep), got {k!r} "
            f"({type(k).__name__}). Pass sparsity= for a fraction."
        )
    if not 0 <= k <= n:
        raise ValueError(f"keep={k} for {path} must be in [0, {n}] (its number of entries).")
    return int(k)


def _one_of(sparsity: Any, keep: Any, fn: str) -> None:
    if (sparsity is None) == (keep is None):
        raise TypeError(
            f"{fn} takes either sparsity (a fraction of zeros) or keep= (counts of kept "
            f"entries), exactly one; got sparsity={sparsity!r}, keep={keep!r}."
        )


# --------------------------------------------------------------------------
# Top-k masks


@_deprecation.keyword_only("where")
def topk(scores: PyTree, sparsity: Any = None, *, where: Any = None, keep: Any = None,
         axis: Any = None, layers: Any = None, layer_axis: int = 0) -> PyTree:
    """Per-leaf top-k masks: each selected leaf keeps its largest scores.

    Each selected leaf with ``n`` entries keeps ``round(n * (1 - s))`` of
    them, where ``s`` is ``sparsity`` or, if ``sparsity`` is a tree, that
    leaf's entry; or exactly ``keep`` of them. This is allocation
    ``"uniform"`` of :mod:`jaxprune.allocation`. With ``axis`` (an int or a
    tuple of axes), every index of the other axes is its own comparison group
    with its own exact count (``axis=-2``: per output unit of a Dense kernel,
    per layer and unit of a stacked one); a leaf's sparsity may then be an
    array broadcast to the groups' shape. Without ``axis``, a sparsity array
    of rank ``r`` compares within each index of the leaf's leading ``r`` axes
    (per-layer budgets). With ``layers`` (stacked leaves, as from ``nnx.scan``
    or MaxText), every layer of a stacked leaf is its own comparison group:
    it keeps ``round(n * (1 - s))`` of its ``n`` entries (or ``keep`` of
    them), exactly as if the layers were separate leaves; its sparsity may
    be one value per layer.

    Args:
      scores: a pytree of float scores (e.g. :func:`jaxprune.scores.magnitude`);
        a leaf may be a :class:`jaxprune.select.LazyScores` (e.g.
        ``LazyScores(jnp.abs, (w,))``), whose scores are recomputed inside every
        selection pass and never stored: no score-sized temporary.
      sparsity: fraction of zeros in ``[0, 1]``: a number (traced is fine) or a
        (prefix) tree of numbers with one value per leaf.
      where: which leaves to prune (see :mod:`jaxprune.tree`).
      keep: instead of ``sparsity``, the number of entries each selected leaf
        keeps: an int, a traced integer, or a (prefix) tree of them (for a
        stacked leaf, per layer: one value or one per layer).
      axis: ``None`` (the whole leaf) or the axes of one comparison group
        (with ``sparsity``).
      layers: which selected leaves are stacks of layers: ``None`` (none), a
        ``where=``-style selection, or a model graph (:func:`jaxprune.graph.trace`;
        its ``scan``-read leaves). See :func:`jaxprune.tree.stacked_axes`.
      layer_axis: the layer axis of the stacked leaves (``0`` for
        ``nnx.scan`` / ``nn.scan``; ``1`` for MaxText's ``param_scan_axis=1``).

    Returns:
      A mask tree: bool arrays for selected leaves, scalar ``True`` elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> s = {"w": jnp.array([[1.0, 3.0], [2.0, 0.0]])}
      >>> topk(s, 0.5)["w"].tolist(), topk(s, keep=1)["w"].tolist()
      ([[False, True], [True, False]], [[False, True], [False, False]])
      >>> topk({"w": jnp.array([[1.0, 0.0], [3.0, 2.0]])}, 0.5, axis=0)["w"].tolist()
      [[False, False], [True, True]]
      >>> topk({"w": jnp.array([[1.0, 0.0], [3.0, 2.0]])}, 0.5, layers="w")["w"].tolist()
      [[True, False], [True, False]]

    References:
      Han et al., "Learning both weights and connections for efficient neural
      networks", NeurIPS 2015.
    """
    _one_of(sparsity, keep, "topk")
    scores, lazy = stand_ins(scores)
    paths, leaves, treedef, sel = selection(scores, where)
    idx = [i for i, s in enumerate(sel) if s]
    stack = _tree.stacked_axes(scores, layers, layer_axis, sel, "topk")
    if axis is not None and layers is not None:
        raise ValueError("topk: axis= already makes every index of the other axes (every "
                         "layer of a stack among them) its own group; pass axis= or layers=, "
                         "not both.")
    if keep is None:
        sp = per_leaf_sparsity(sparsity, scores, paths, sel)
        if axis is not None:
            masks = [_leaf_topk(paths[i], _materialized(lazy, leaves, i), sp[i], axis) for i in idx]
            return _assemble(treedef, len(leaves), idx, masks)
    elif axis is not None:
        raise ValueError("topk: axis= takes a sparsity (one exact count per comparison "
                         "group); pass sparsity= instead of keep=.")
    else:
        ks = _tree.broadcast_values(keep, scores, "keep")
    out, whole = {}, []  # per-slice masks; leaves selected whole, in one batch
    for i in idx:
        if stack[i] is not None:
            out[i] = _layer_topk(paths[i], _materialized(lazy, leaves, i), stack[i],
                                 None if keep is None else ks[i],
                                 None if keep is not None else sp[i])
        elif keep is None and np.ndim(sp[i]):
            out[i] = _leaf_topk(paths[i], _materialized(lazy, leaves, i), sp[i], None)
        else:
            whole.append(i)
    arrays = _selected(lazy, leaves, whole)
    sizes = [_size(leaves[i]) for i in whole]
    if keep is None:
        sps = [sp[i] for i in whole]
        if any(isinstance(x, jax.core.Tracer) for x in sps) and all(np.ndim(x) == 0 for x in sps):
            # One vectorised count for every leaf: one kernel, where a count
            # per leaf compiles one per distinct leaf size.
            counts = _select.keep_count(np.asarray(sizes, np.int64),
                                        jnp.stack([jnp.asarray(x, jnp.float32) for x in sps]))
        else:
            counts = [_select.keep_count(n, s) for s, n in zip(sps, sizes)]
    else:
        counts = [_keep_value(ks[i], n, f"leaf {paths[i]!r}") for i, n in zip(whole, sizes)]
    if whole:
        out.update(zip(whole, _select.select_groups(arrays, list(range(len(whole))), counts)))
    return _assemble(treedef, len(leaves), idx, [out[i] for i in idx])


def _layer_topk(path: str, scores: Any, layer_axis: int, keep: Any, sparsity: Any) -> jax.Array:
    """Top-k within every layer of a stacked leaf (``keep`` or ``sparsity``
    per layer: one value, or one per layer)."""
    scores = jnp.asarray(scores)
    others = tuple(a for a in range(scores.ndim) if a != layer_axis)
    if keep is None:
        return _leaf_topk(path, scores, sparsity, others)
    n, n_layers = int(scores.size // max(scores.shape[layer_axis], 1)), scores.shape[layer_axis]
    where = f"each layer of leaf {path!r}"
    if np.ndim(keep) == 0:
        k = _keep_value(keep, n, where)
    elif np.shape(keep) == (n_layers,):
        k = jnp.clip(jnp.asarray(keep), 0, n).astype(jnp.int32)
    else:
        raise ValueError(f"topk: keep for the stacked leaf {path!r} of shape {scores.shape} has "
                         f"shape {np.shape(keep)}; give one int (every layer) or one per layer "
                         f"(shape ({n_layers},)).")
    return _slices(scores, others, k)


@_deprecation.keyword_only("where")
def global_topk(scores: PyTree, sparsity: Any = None, *, where: Any = None,
                keep: Any = None) -> PyTree:
    """Global top-k masks: one threshold over all selected leaves.

    Keeps the ``round(n * (1 - sparsity))`` (or exactly ``keep``) largest
    scores among the ``n`` entries of all selected leaves together; ties go
    to the leaf earlier in pytree order, then to the lower flat index.
    Sharded leaves are never gathered: only per-shard counts cross devices.
    This is allocation ``"global"`` of :mod:`jaxprune.allocation`.

    Args:
      scores: a pytree of float scores; a leaf may be a
        :class:`jaxprune.select.LazyScores`, computed inside every pass and
        never stored (a billion weights need no score-sized temporary).
      sparsity: fraction of zeros in ``[0, 1]`` (a number; traced is fine).
      where: which leaves take part (see :mod:`jaxprune.tree`).
      keep: instead of ``sparsity``, how many entries to keep in all (an int
        or a traced integer).

    Returns:
      A mask tree: bool arrays for selected leaves, scalar ``True`` elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> m = global_topk({"w1": jnp.array([[1.0, 4.0], [0.0, 0.0]]),
      ...                  "w2": jnp.array([[3.0, 2.0], [0.0, 0.0]])}, keep=3)
      >>> m["w1"].tolist(), m["w2"].tolist()
      ([[False, True], [False, False]], [[True, True], [False, False]])

    References:
      Frankle & Carbin, "The lottery ticket hypothesis", ICLR 2019 (global
      magnitude pruning); Blalock et al., "What is the state of neural network
      pruning?", MLSys 2020.
    """
    _one_of(sparsity, keep, "global_topk")
    value = sparsity if keep is None else keep
    if not _is_scalar(value):
        raise ValueError(
            f"global_topk takes one {'sparsity' if keep is None else 'keep'} for all "
            f"selected leaves, got {value!r}. Use topk for per-leaf values."
        )
    if keep is None:
        check_sparsity(sparsity)
    scores, lazy = stand_ins(scores)
    paths, leaves, treedef, sel = selection(scores, where)
    idx = [i for i, s in enumerate(sel) if s]
    arrays = _selected(lazy, leaves, idx)
    n = sum(_size(leaves[i]) for i in idx)
    count = (_select.keep_count(n, sparsity) if keep is None
             else _keep_value(keep, n, "the selected leaves together"))
    masks = _select.select_groups(arrays, [0] * len(idx), [count])
    return _assemble(treedef, len(leaves), idx, masks)


def _is_lazy(x: Any) -> bool:
    return isinstance(x, _select.LazyScores)


def stand_ins(scores: PyTree) -> tuple[PyTree, list | None]:
    """``scores`` with every :class:`~jaxprune.select.LazyScores` leaf replaced
    by a ``jax.ShapeDtypeStruct`` of its result (for ``where=``, paths and
    checks), and the flat list of the lazy leaves (``None`` where a leaf is
    not lazy; ``None`` for the whole list when none is). Package API (used by
    :mod:`jaxprune.allocation`), not in ``__all__``."""
    flat, treedef = jax.tree_util.tree_flatten(scores, is_leaf=_is_lazy)
    if not any(_is_lazy(x) for x in flat):
        return scores, None
    stand = [jax.eval_shape(lambda x=x: x.fn(*x.args)) if _is_lazy(x) else x for x in flat]
    return treedef.unflatten(stand), [x if _is_lazy(x) else None for x in flat]




def _selected(lazy: list | None, leaves: Sequence[Any], idx: Sequence[int]) -> list:
    """The selected leaves as :func:`jaxprune.select.select_groups` takes them:
    arrays, or the lazy scores themselves (never computed in full); a traced
    ``|w|`` becomes lazy too (see :func:`_lazy_abs`)."""
    return [lazy[i] if lazy and lazy[i] is not None else _lazy_abs(leaves[i]) for i in idx]


def _lazy_abs(x: Any) -> Any:
    """``LazyScores(jnp.abs, (w,))`` when ``x`` is ``jnp.abs(w)`` computed in
    the trace being built (as :func:`jaxprune.scores.magnitude` does under
    ``jit``), else ``x`` as an array.

    Under ``jit``, ``global_topk(scores.magnitude(p), s)`` then recomputes
    ``|w|`` inside every counting pass, and the stored ``|w|`` is dead code:
    no parameter-sized temporary. The test reads the tracer's defining
    equation, which JAX does not document; where it is missing (another JAX
    version, an eager call), the array path is taken, with the same result.
    """
    eqn = getattr(x, "parent", None) if isinstance(x, jax.core.Tracer) else None
    ins = getattr(eqn, "in_tracers", None)
    if (getattr(eqn, "primitive", None) is lax.abs_p and ins is not None and len(ins) == 1
            and getattr(ins[0], "shape", None) == x.shape and getattr(ins[0], "dtype", None) == x.dtype):
        return _select.LazyScores(jnp.abs, (ins[0],))
    return jnp.asarray(x)


def _materialized(lazy: list | None, leaves: Sequence[Any], i: int) -> jax.Array:
    x = lazy[i] if lazy else None
    return jnp.asarray(leaves[i]) if x is None else x.fn(*x.args)


def _size(x: Any) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64))


def _assemble(treedef, n_leaves: int, idx: Sequence[int], masks: Sequence[jax.Array]) -> PyTree:
    out = [_unselected_mask() for _ in range(n_leaves)]
    for i, m in zip(idx, masks):
        out[i] = m
    return _tree.unflatten(treedef, out)


def random_like(key: jax.Array, masks: PyTree, *, layers: Any = None,
                layer_axis: int = 0) -> PyTree:
    """A random mask with the same number of kept entries in every leaf.

    Each array leaf of ``masks`` keeps exactly as many entries as it does in
    ``masks``, at positions chosen uniformly at random: the library's exact
    selection on random ``uint32`` keys (no sort). Scalar leaves (not
    pruned) are returned as they are. This is the "random pruning" control
    of the lottery-ticket experiments: same per-layer sparsity, no
    information from training.

    Args:
      key: a PRNG key.
      masks: a mask tree (e.g. a ticket's, :func:`jaxprune.get_masks`).
      layers: stacked leaves (a ``where=``-style selection or a model
        graph): each of their layers keeps its own count.
      layer_axis: the layer axis of the stacked leaves (default 0).

    Returns:
      A mask tree with the same per-leaf kept counts. Works under ``jit``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = {"w": jnp.arange(12).reshape(3, 4) < 5}
      >>> int(random_like(jax.random.key(0), m)["w"].sum())
      5

    References:
      Frankle & Carbin, "The lottery ticket hypothesis", ICLR 2019 (random
      pruning control).
    """
    leaves, treedef = jax.tree_util.tree_flatten(masks)
    arr = [_tree.is_array(m) and bool(np.ndim(m)) and bool(np.size(m)) for m in leaves]
    stack = _tree.stacked_axes(masks, layers, layer_axis, arr, "random_like")
    idx = [i for i, a in enumerate(arr) if a and stack[i] is None]
    bits = [jax.random.bits(jax.random.fold_in(key, i), np.shape(leaves[i]), jnp.uint32)
            for i in idx]
    counts = [_select.count_true(jnp.asarray(leaves[i], jnp.bool_)) for i in idx]
    chosen = _select.select_groups(bits, list(range(len(idx))), counts) if idx else []
    out = [jnp.asarray(m, jnp.bool_) if _tree.is_array(m) else m for m in leaves]
    for i, m in zip(idx, chosen):
        out[i] = m
    for i, a in enumerate(stack):
        if a is not None:
            m = jnp.asarray(leaves[i], jnp.bool_)
            others = tuple(x for x in range(m.ndim) if x != a)
            bits = jax.random.bits(jax.random.fold_in(key, i), m.shape, jnp.uint32)
            out[i] = _slices(bits, others, jnp.sum(m, axis=others, dtype=jnp.int32))
    return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------
# N:M masks


def nm_leaf(s: jax.Array, n: int, m: int, axis: int, path: str) -> jax.Array:
    nd = s.ndim
    ax = axis % nd if nd else 0
    if nd == 0 or not (-nd <= axis < nd):
        raise ValueError(
            f"n_of_m: axis={axis} is out of range for leaf {path!r} of shape {s.shape}. "
            "Pick an axis of the leaf (Dense kernels reduce along -2)."
        )
    size = s.shape[ax]
    if size % m:
        raise ValueError(
            f"n_of_m: leaf {path!r} has shape {s.shape}; its axis {axis} has length "
            f"{size}, which does not divide by m={m}. Use an m that divides it, another "
            "axis=, or exclude the leaf with where=."
        )
    key = _select.sortable_key(s)
    key = jnp.moveaxis(key, ax, -1)
    shp = key.shape
    g = key.reshape(*shp[:-1], size // m, m)
    a = g[..., :, None]  # element i
    b = g[..., None, :]  # element j
    j_lt_i = np.arange(m)[None, :] < np.arange(m)[:, None]  # [i, j]: j before i
    beats = (b > a) | ((b == a) & j_lt_i)
    rank = jnp.sum(beats, axis=-1)
    keep = (rank < n).reshape(shp)
    return jnp.moveaxis(keep, -1, ax)


@_deprecation.keyword_only("n", "m", "axis", "where")
def n_of_m(scores: PyTree, *, n: int = 2, m: int = 4, axis: int = -2,
           where: Any = None) -> PyTree:
    """N:M structured sparsity: in every group of ``m`` consecutive entries along
    ``axis``, keep the ``n`` with the largest scores.

    ``axis`` is the axis along which entries compete, as in
    :func:`channels`: here the ``m`` entries of a group. The default
    ``axis=-2`` is the reduction (input) axis of a Dense kernel ``(in, out)``
    and of a conv kernel ``(h, w, in, out)``, the layout sparse tensor cores
    (2:4) accelerate; :func:`channels` defaults to ``-1`` because its units
    are output features. Ties go to the lower index; NaN ranks lowest.

    Args:
      scores: a pytree of float scores.
      n: entries kept per group, ``0 <= n <= m``.
      m: group size; must divide the length of ``axis`` in every selected leaf.
      axis: the axis along which entries compete (groups of ``m``).
      where: which leaves to prune.

    Returns:
      A mask tree with sparsity exactly ``1 - n / m`` on every selected leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> s = {"w": jnp.array([[4.0, 0.0], [1.0, 1.0], [3.0, 3.0], [2.0, 2.0]])}
      >>> n_of_m(s, n=2, m=4)["w"][:, 0].tolist()
      [True, False, True, False]

    References:
      Mishra et al., "Accelerating sparse deep neural networks", arXiv 2021
      (2:4 sparsity on NVIDIA Ampere); Zhou et al., "Learning N:M fine-grained
      structured sparse neural networks from scratch", ICLR 2021.
    """
    if not (isinstance(m, (int, np.integer)) and m >= 1):
        raise ValueError(f"n_of_m: m must be a positive int, got m={m!r}.")
    if not (isinstance(n, (int, np.integer)) and 0 <= n <= m):
        raise ValueError(f"n_of_m: n must be an int in [0, m={m}], got n={n!r}.")
    paths, leaves, treedef, sel = selection(scores, where)
    out = []
    for p, leaf, s in zip(paths, leaves, sel):
        out.append(nm_leaf(jnp.asarray(leaf), int(n), int(m), axis, p) if s else _unselected_mask())
    return _tree.unflatten(treedef, out)


# --------------------------------------------------------------------------
# Block masks


def _reduce(x: jax.Array, axes: tuple[int, ...], reduce: str) -> jax.Array:
    """One score per group: ``l1`` sum |x|, ``l2`` sqrt(sum x^2), ``mean``,
    ``max`` over ``axes`` (float32)."""
    x = x.astype(jnp.float32)
    if reduce == "l1":
        return jnp.sum(jnp.abs(x), axis=axes)
    if reduce == "l2":
        return jnp.sqrt(jnp.sum(x * x, axis=axes))
    if reduce == "mean":
        return jnp.mean(x, axis=axes)
    return jnp.max(x, axis=axes)


def _check_reduce(reduce: Any, fn: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(
            f"{fn}: reduce must be one of {list(REDUCTIONS)} (how a group of scores "
            f"becomes one score), got {reduce!r}."
        )


def _block_tiles(x: jax.Array, b0: int, b1: int, reduce: str, p: str) -> jax.Array:
    if x.ndim < 2:
        raise ValueError(
            f"block: leaf {p!r} has shape {x.shape}; block masks need ndim >= 2. "
            "Exclude it with where=."
        )
    r, c = x.shape[-2:]
    if b0 > r or b1 > c:
        raise ValueError(
            f"block: block_shape {(b0, b1)} is larger than the last two axes {(r, c)} "
            f"of leaf {p!r}. Use a smaller block or exclude the leaf with where=."
        )
    if r % b0 or c % b1:
        raise ValueError(
            f"block: the last two axes {(r, c)} of leaf {p!r} do not divide into "
            f"{(b0, b1)} tiles. Use a block shape that divides them."
        )
    t = x.reshape(*x.shape[:-2], r // b0, b0, c // b1, b1)
    return _reduce(t, (-3, -1), reduce)


@_deprecation.keyword_only("block_shape", "reduce", "where")
def block(
    scores: PyTree,
    sparsity: Any,
    *,
    block_shape: int | tuple[int, int] = 4,
    reduce: str = "mean",
    where: Any = None,
) -> PyTree:
    """Block sparsity: prune whole ``b0 x b1`` tiles of the last two axes.

    Each tile is scored by ``reduce`` over its scores (see :data:`REDUCTIONS`:
    ``"l1"`` sum of magnitudes, ``"l2"`` root of the sum of squares,
    ``"mean"``, ``"max"``); every selected leaf keeps ``round(t * (1 -
    sparsity))`` of its ``t`` tiles (tiles of all leading indices, e.g. conv
    spatial positions, compete together), with the usual tie and NaN rules
    on the tile scores.

    Args:
      scores: a pytree of float scores.
      sparsity: fraction of tiles (and so of weights) set to zero; a number
        or a per-leaf tree.
      block_shape: ``b`` for ``b x b`` tiles, or ``(b0, b1)``.
      reduce: ``"l1"``, ``"l2"``, ``"mean"`` (default) or ``"max"``.
      where: which leaves to prune (they need ``ndim >= 2``).

    Returns:
      A mask tree.

    Example:
      >>> import jax.numpy as jnp
      >>> s = {"w": jnp.array([[1.0, 1.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0]])}
      >>> block(s, 0.5, block_shape=(2, 2))["w"].astype(int).tolist()
      [[0, 0, 1, 1], [0, 0, 1, 1]]

    References:
      Gray et al., "GPU kernels for block-sparse weights", OpenAI 2017;
      Narang et al., "Block-sparse recurrent neural networks", 2017.
    """
    b0, b1 = (block_shape, block_shape) if isinstance(block_shape, int) else tuple(block_shape)
    _check_reduce(reduce, "block")
    if b0 < 1 or b1 < 1:
        raise ValueError(f"block: block_shape must be positive, got {block_shape!r}.")
    paths, leaves, treedef, sel = selection(scores, where)
    sp = per_leaf_sparsity(sparsity, scores, paths, sel)
    idx = [i for i, s in enumerate(sel) if s]
    tiles = [_block_tiles(jnp.asarray(leaves[i]), b0, b1, reduce, paths[i]) for i in idx]
    keep = [_select.keep_count(int(t.size), sp[i]) for i, t in zip(idx, tiles)]
    tmasks = _select.select_groups(tiles, list(range(len(idx))), keep)
    masks = [
        jnp.repeat(jnp.repeat(tm, b0, axis=-2), b1, axis=-1).reshape(np.shape(leaves[i]))
        for tm, i in zip(tmasks, idx)
    ]
    return _assemble(treedef, len(leaves), idx, masks)


# --------------------------------------------------------------------------
# Channel (structured) masks


def _unit_scores(x: jax.Array, axis: int, reduce: str, p: str) -> jax.Array:
    if x.ndim == 0 or not (-x.ndim <= axis < x.ndim):
        raise ValueError(f"channels: axis={axis} is out of range for leaf {p!r} of shape {x.shape}.")
    ax = axis % x.ndim
    return _reduce(x, tuple(a for a in range(x.ndim) if a != ax), reduce)


@_deprecation.keyword_only("axis", "reduce", "where")
def channels(
    scores: PyTree,
    sparsity: Any,
    *,
    axis: int = -1,
    reduce: str = "l1",
    where: Any = None,
    norm: str | None = None,
) -> PyTree:
    """Structured masks that keep or remove whole units along ``axis``.

    ``axis`` is the axis along which entries compete: here the units (a
    Dense output neuron, a conv filter with the default ``axis=-1``), each
    scored by ``reduce`` of its scores over all other axes (``"l1"``, the
    default, ``"l2"``, ``"mean"`` or ``"max"``; see :data:`REDUCTIONS`).
    Each selected leaf keeps ``round(u * (1 - sparsity))`` of its ``u``
    units, ties to the lower index. (In :func:`n_of_m` the competing entries
    are groups of ``m`` along the reduction axis, hence its default ``-2``.)

    Args:
      scores: a pytree of float scores.
      sparsity: fraction of units removed; a number or a per-leaf tree.
      axis: the unit axis (``-1``: output features / filters).
      reduce: how a unit's scores become one score.
      where: which leaves to prune.
      norm: deprecated name of ``reduce``.

    Returns:
      A mask tree; masks are constant along every axis but ``axis``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = {"w": jnp.array([[1.0, 5.0, 0.1], [1.0, 5.0, 0.2]])}
      >>> channels(s, 1 / 3)["w"][0].tolist()
      [True, True, False]

    References:
      Li et al., "Pruning filters for efficient ConvNets", ICLR 2017;
      Molchanov et al., "Importance estimation for neural network pruning",
      CVPR 2019.
    """
    if norm is not None:
        _deprecation.warn("channels(norm=...)", "channels(reduce=...)")
        reduce = norm
    _check_reduce(reduce, "channels")
    paths, leaves, treedef, sel = selection(scores, where)
    sp = per_leaf_sparsity(sparsity, scores, paths, sel)
    idx = [i for i, s in enumerate(sel) if s]
    units = [_unit_scores(jnp.asarray(leaves[i]), axis, reduce, paths[i]) for i in idx]
    keep = [_select.keep_count(int(u.size), sp[i]) for i, u in zip(idx, units)]
    umasks = _select.select_groups(units, list(range(len(idx))), keep)
    masks = []
    for um, i in zip(umasks, idx):
        shape = np.shape(leaves[i])
        bshape = [1] * len(shape)
        bshape[axis % len(shape)] = shape[axis % len(shape)]
        masks.append(jnp.broadcast_to(um.reshape(bshape), shape))
    return _assemble(treedef, len(leaves), idx, masks)


# --------------------------------------------------------------------------
# Applying and measuring masks


def apply_mask(x: Any, m: Any) -> Any:
    """One leaf: ``where(m, x, 0)`` with ``x``'s dtype; ``x`` itself where the
    mask is a scalar ``True`` or ``x`` is not an array. The one place the
    package zeroes pruned entries (parameters, gradients, optimizer state,
    rewound snapshots)."""
    if not _tree.is_array(x) or not _tree.is_array(m):
        return x
    m = jnp.asarray(m)
    if m.ndim == 0 and m.dtype == jnp.bool_ and _is_concrete(m) and bool(m):
        return x
    return jnp.where(m, x, jnp.zeros((), jnp.result_type(x)))


def _check_mask_shapes(params: PyTree, masks: PyTree, fn: str) -> tuple[list, list, Any]:
    _tree.check_same_structure(params, masks, "params", "masks")
    paths, p_leaves, treedef = _tree.flatten(params)
    m_leaves = _tree.leaves_like(params, masks)
    for path, p, m in zip(paths, p_leaves, m_leaves):
        if _tree.is_array(p) and _tree.is_array(m) and np.ndim(m) and np.shape(m) != np.shape(p):
            raise ValueError(
                f"{fn}: the mask for leaf {path!r} has shape {np.shape(m)} but the parameter "
                f"has shape {np.shape(p)}. Pass the masks of these parameters "
                "(e.g. jp.get_masks(opt_state))."
            )
    return p_leaves, m_leaves, treedef


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zeroes the pruned entries: ``where(mask, param, 0)``, dtypes kept.

    Args:
      params: a parameter pytree (leaves that are not arrays pass through).
      masks: a mask tree of the same structure (scalar ``True`` leaves pass
        the parameter through).

    Returns:
      The masked parameters.

    Example:
      >>> import jax.numpy as jnp
      >>> apply_masks({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([True, False])})["w"].tolist()
      [1.0, 0.0]
    """
    p_leaves, m_leaves, treedef = _check_mask_shapes(params, masks, "apply_masks")
    return _tree.unflatten(treedef, [apply_mask(p, m) for p, m in zip(p_leaves, m_leaves)])


def apply_masks_ste(params: PyTree, masks: PyTree) -> PyTree:
    """Masked weights in the forward pass, dense gradients in the backward pass.

    Returns ``p + stop_gradient(where(m, p, 0) - p)`` per leaf: the value is
    exactly ``where(m, p, 0)``, the gradient with respect to ``p`` is the
    gradient with respect to the masked weight, for *every* entry, so pruned
    weights keep learning and can re-enter the mask (the straight-through
    estimator). Leaves with a scalar mask are returned unchanged. Call it
    inside the loss, with the masks of :func:`jaxprune.ste_training`.

    Args:
      params: the dense parameters.
      masks: a mask tree, e.g. ``jp.get_masks(opt_state)``.

    Returns:
      Parameters to run the model with.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"w": jnp.array([[1.0, 2.0]])}
      >>> m = {"w": jnp.array([[True, False]])}
      >>> loss = lambda p: jnp.sum(apply_masks_ste(p, m)["w"] * jnp.array([[3.0, 4.0]]))
      >>> float(loss(p)), jax.grad(loss)(p)["w"].tolist()
      (3.0, [[3.0, 4.0]])

    References:
      Bengio et al., "Estimating or propagating gradients through stochastic
      neurons for conditional computation", 2013; Zhou et al., "Learning N:M
      fine-grained structured sparse neural networks from scratch", ICLR 2021.
    """
    p_leaves, m_leaves, treedef = _check_mask_shapes(params, masks, "apply_masks_ste")

    def one(p, m):
        masked = apply_mask(p, m)
        return p if masked is p else p + lax.stop_gradient(masked - p)

    return _tree.unflatten(treedef, [one(p, m) for p, m in zip(p_leaves, m_leaves)])


def _zero_count(x: jax.Array, axis: Any = None) -> jax.Array:
    x = jnp.asarray(x)
    zero = ~x if x.dtype == jnp.bool_ else x == 0
    if axis is None:
        return _select.count_true(zero)
    return jnp.sum(zero, axis=axis, dtype=jnp.int32)


@_deprecation.keyword_only("where")
def sparsity_of(tree: PyTree, *, where: Any = None) -> Any:
    """Fraction of zeros (or ``False``) among the selected entries.

    Works on parameters (counts exact zeros) and on masks (counts ``False``).
    Returns a Python float when called eagerly, a traced scalar under ``jit``.
    Leaves that are not arrays are never counted.

    Args:
      tree: parameters or masks.
      where: which leaves count (default: :func:`jaxprune.tree.is_kernel`).

    Returns:
      ``zeros / selected entries`` (0.0 if nothing is selected).

    Example:
      >>> import jax.numpy as jnp
      >>> sparsity_of({"w": jnp.array([[0.0, 1.0], [0.0, 2.0]])})
      0.5
    """
    _, leaves, _ = _tree.flatten(tree)
    sel = _tree.flags(tree, where)
    zeros, total = jnp.zeros((), jnp.int32), 0
    for leaf, s in zip(leaves, sel):
        if s and np.size(leaf):
            zeros = zeros + _zero_count(leaf)
            total += int(np.size(leaf))
    if total == 0:
        return 0.0
    if isinstance(zeros, jax.core.Tracer):
        return zeros.astype(jnp.float32) / jnp.float32(total)
    return int(zeros) / total


sparsity = _deprecation.alias(sparsity_of, "jaxprune.sparsity", "jaxprune.sparsity_of")


@dataclass(frozen=True)
class Summary:
    """Per-leaf pruning summary. ``str(summary)`` is a printable table.

    Attributes:
      rows: one dict per selected leaf (or per layer of a stacked leaf, see
        ``layers=`` of :func:`summary`) with ``path``, ``shape``, ``size``,
        ``kept`` and ``sparsity``, in natural order of the paths.
      total: ``path``, ``size``, ``kept`` and ``sparsity`` of all selected
        leaves together.
    """

    rows: tuple[dict, ...]
    total: dict

    def to_dict(self) -> dict:
        """``{path: row}`` plus ``"total"``."""
        out = {r["path"]: r for r in self.rows}
        out["total"] = self.total
        return out

    def __str__(self) -> str:
        w = max([len(r["path"]) for r in self.rows] + [5])
        lines = [f"{'leaf':<{w}}  {'shape':>18}  {'kept':>12}  {'size':>12}  {'sparsity':>8}"]
        for r in (*self.rows, self.total):
            shape = str(r["shape"]) if "shape" in r else ""
            lines.append(
                f"{r['path']:<{w}}  {shape:>18}  {r['kept']:>12,}  {r['size']:>12,}  "
                f"{r['sparsity']:>8.2%}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def _row(path: str, shape: tuple, size: int, zeros: int) -> dict:
    return dict(path=path, shape=shape, size=size, kept=size - zeros,
                sparsity=zeros / size if size else 0.0)


def _leaf_rows(path: str, leaf: Any, axis: int | None) -> list[dict]:
    shape, size = tuple(np.shape(leaf)), int(np.size(leaf))
    if axis is None:
        return [_row(path, shape, size, int(_zero_count(leaf)) if size else 0)]
    others = tuple(a for a in range(len(shape)) if a != axis)
    zeros = np.asarray(_zero_count(leaf, others)) if size else [0] * shape[axis]
    per = size // shape[axis] if shape[axis] else 0
    rest = tuple(shape[a] for a in others)
    return [_row(f"{path}[{i}]", rest, per, int(z)) for i, z in enumerate(zeros)]


@_deprecation.keyword_only("where")
def summary(tree: PyTree, *, where: Any = None, layers: Any = None,
            layer_axis: int = 0) -> Summary:
    """Per-leaf table of kept entries and sparsity (of params or masks).

    On unpruned parameters it lists exactly the leaves ``where=`` selects:
    what a transform with the same ``where=`` will prune.

    Args:
      tree: parameters or masks.
      where: which leaves to list (default: :func:`jaxprune.tree.is_kernel`).
      layers: a ``where=``-style selection of stacked leaves (scan over
        layers), or a model graph (its ``scan``-read leaves): each gets one
        row per layer, ``path[0]``, ``path[1]``, ... (the same ``layers=``
        as the mask functions and transforms).
      layer_axis: the layer axis of the stacked leaves (default 0).

    Returns:
      A :class:`Summary`; rows in natural order of the paths (``Block_2``
      before ``Block_10``).

    Example:
      >>> import jax.numpy as jnp
      >>> s = summary({"w": jnp.array([[0.0, 1.0], [0.0, 2.0]])})
      >>> s.to_dict()["w"]["kept"], s.total["sparsity"]
      (2, 0.5)
      >>> [r["path"] for r in summary({"w": jnp.eye(2)}, layers="w").rows]
      ['w[0]', 'w[1]']
    """
    paths, leaves, _ = _tree.flatten(tree)
    sel = _tree.flags(tree, where)
    stacked = _tree.stacked_axes(tree, layers, layer_axis, sel, "summary")
    rows = []
    for p, leaf, s, st in zip(paths, leaves, sel, stacked):
        if s:
            rows += _leaf_rows(p, leaf, st)
    rows.sort(key=lambda r: _tree.natural_key(r["path"]))
    size, kept = sum(r["size"] for r in rows), sum(r["kept"] for r in rows)
    total = dict(path="total", size=size, kept=kept,
                 sparsity=(size - kept) / size if size else 0.0)
    return Summary(tuple(rows), total)


# --------------------------------------------------------------------------
# Bit packing


class PackedMask(NamedTuple):
    """A mask packed to one bit per entry (``jnp.packbits``, big-endian bits).

    Attributes:
      bits: ``uint8`` array of ``ceil(size / 8)`` bytes.
      shape: the mask's shape (static).
    """

    bits: jax.Array
    shape: tuple[int, ...]


jax.tree_util.register_pytree_node(
    PackedMask,
    lambda p: ((p.bits,), p.shape),
    lambda shape, children: PackedMask(children[0], shape),
)


def pack(masks: PyTree) -> PyTree:
    """Packs every mask leaf to 1 bit per entry (8x smaller than ``bool``).

    Example:
      >>> import jax.numpy as jnp
      >>> p = pack({"w": jnp.array([[True, False, True]])})
      >>> p["w"].bits.tolist(), p["w"].shape
      ([160], (1, 3))
    """
    def one(m):
        m = jnp.asarray(m, jnp.bool_)
        return PackedMask(jnp.packbits(m.reshape(-1)), tuple(m.shape))

    return jax.tree.map(one, masks)


def unpack(packed: PyTree) -> PyTree:
    """Inverse of :func:`pack`."""
    def one(p: PackedMask):
        size = math.prod(p.shape)
        return jnp.unpackbits(p.bits, count=size).astype(jnp.bool_).reshape(p.shape)

    return jax.tree.map(one, packed, is_leaf=lambda x: isinstance(x, PackedMask))

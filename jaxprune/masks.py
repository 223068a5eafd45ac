"""Masks from scores: per leaf, global, N:M, blocks and whole channels.

A mask tree has the structure of its parameters. Selected leaves hold a
``bool`` array of the leaf's shape (``True`` = keep); leaves that are not
selected hold a scalar ``True``, which broadcasts, so
:func:`apply_masks` leaves them untouched.

All selections are exact: a sparsity ``s`` over ``n`` candidates keeps
``round(n * (1 - s))`` of them (half to even), ties broken by position (lower
flat index first, leaves in pytree order) and NaN ranked lowest. They run
under :func:`jax.jit`, with a traced sparsity too.

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

from jaxprune import select as _select
from jaxprune import tree as _tree
from jaxprune._along import leaf_topk as _leaf_topk

PyTree = Any

__all__ = [
    "PackedMask",
    "Summary",
    "apply_masks",
    "block",
    "channels",
    "global_topk",
    "n_of_m",
    "pack",
    "sparsity",
    "summary",
    "topk",
    "unpack",
]


# --------------------------------------------------------------------------
# Validation helpers


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
            "leaves can be scored and pruned. Exclude it with where= (e.g. a regex "
            "or a callable), or cast it to a float dtype."
        )


def _selected(scores: PyTree, where: Any, what: str = "scores"):
    paths, leaves, treedef = _tree.flatten(scores)
    sel = _tree.select(scores, where)
    if leaves and not any(sel):
        raise ValueError(
            f"where={where!r} selects no leaf of {what} (paths: {paths[:20]}). With "
            "where=None only floating leaves with ndim >= 2 are selected; pass a regex "
            "or a callable to choose others."
        )
    for p, leaf, s in zip(paths, leaves, sel):
        if s:
            _check_float(p, leaf, what)
    return paths, leaves, treedef, sel


def _per_leaf_sparsity(sparsity: Any, scores: PyTree, paths: Sequence[str], sel) -> list[Any]:
    """A sparsity per leaf: a number (broadcast) or a tree/prefix of numbers."""
    if isinstance(sparsity, (int, float, np.number)) or (
        hasattr(sparsity, "shape") and np.ndim(sparsity) == 0
    ):
        check_sparsity(sparsity)
        return [sparsity] * len(paths)
    try:
        prefix_leaves, prefix_def = jax.tree_util.tree_flatten(sparsity)
        subtrees = prefix_def.flatten_up_to(scores)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "sparsity must be a number or a tree (or prefix tree) of numbers matching "
            f"the scores; it does not match: {e}"
        ) from e
    out: list[Any] = []
    for val, sub in zip(prefix_leaves, subtrees):
        out.extend([val] * len(jax.tree_util.tree_leaves(sub)))
    for p, v, s in zip(paths, out, sel):
        if s:
            if v is None:
                raise ValueError(f"sparsity for selected leaf {p!r} is None.")
            check_sparsity(v, "sparsity", p)
    return out


def _unselected_mask() -> jax.Array:
    return jnp.ones((), jnp.bool_)


# --------------------------------------------------------------------------
# Top-k masks


def topk(scores: PyTree, sparsity: Any, where: Any = None, axis: Any = None) -> PyTree:
    """Per-leaf top-k masks: each selected leaf keeps its largest scores.

    Each selected leaf with ``n`` entries keeps ``round(n * (1 - s))`` of
    them, where ``s`` is ``sparsity`` or, if ``sparsity`` is a tree, that
    leaf's entry. With ``axis`` (an int or a tuple of axes), every index of
    the other axes is its own comparison group with its own exact count
    (``axis=-2``: per output unit of a Dense kernel, per layer and unit of a
    stacked one); a leaf's sparsity may then be an array broadcast to the
    groups' shape. Without ``axis``, a sparsity array of rank ``r`` compares
    within each index of the leaf's leading ``r`` axes (per-layer budgets).

    Args:
      scores: a pytree of float scores (e.g. :func:`jaxprune.scores.magnitude`).
      sparsity: fraction of zeros in ``[0, 1]``: a number (traced is fine) or a
        (prefix) tree of numbers with one value per leaf.
      where: which leaves to prune (see :mod:`jaxprune.tree`).
      axis: ``None`` (the whole leaf) or the axes of one comparison group.

    Returns:
      A mask tree: bool arrays for selected leaves, scalar ``True`` elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> topk({"w": jnp.array([[1.0, 3.0, 2.0, 0.0]])}, 0.5)["w"].tolist()
      [[False, True, True, False]]
      >>> topk({"w": jnp.array([[1.0, 0.0], [3.0, 2.0]])}, 0.5, axis=0)["w"].tolist()
      [[False, False], [True, True]]

    References:
      Han et al., "Learning both weights and connections for efficient neural
      networks", NeurIPS 2015.
    """
    paths, leaves, treedef, sel = _selected(scores, where)
    sp = _per_leaf_sparsity(sparsity, scores, paths, sel)
    idx = [i for i, s in enumerate(sel) if s]
    if axis is not None or any(np.ndim(sp[i]) for i in idx):
        masks = [_leaf_topk(paths[i], leaves[i], sp[i], axis) for i in idx]
        return _assemble(treedef, len(leaves), idx, masks)
    arrays = [jnp.asarray(leaves[i]) for i in idx]
    keep = [_select.keep_count(int(a.size), sp[i]) for i, a in zip(idx, arrays)]
    masks = _select.select_groups(arrays, list(range(len(idx))), keep)
    return _assemble(treedef, len(leaves), idx, masks)


def global_topk(scores: PyTree, sparsity: Any, where: Any = None) -> PyTree:
    """Global top-k masks: one threshold over all selected leaves.

    Keeps the ``round(n * (1 - sparsity))`` largest scores among the ``n``
    entries of all selected leaves together; ties go to the leaf earlier in
    pytree order, then to the lower flat index. Sharded leaves are never
    gathered: only per-shard counts cross devices.

    Args:
      scores: a pytree of float scores.
      sparsity: fraction of zeros in ``[0, 1]`` (a number; traced is fine).
      where: which leaves take part (see :mod:`jaxprune.tree`).

    Returns:
      A mask tree: bool arrays for selected leaves, scalar ``True`` elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> m = global_topk({"a": jnp.array([[1.0, 4.0]]), "b": jnp.array([[3.0, 2.0]])}, 0.5)
      >>> m["a"].tolist(), m["b"].tolist()
      ([[False, True]], [[True, False]])

    References:
      Frankle & Carbin, "The lottery ticket hypothesis", ICLR 2019 (global
      magnitude pruning); Blalock et al., "What is the state of neural network
      pruning?", MLSys 2020.
    """
    # A tree (or list) is not a scalar: np.ndim({...}) == 0, so test the type.
    if not (
        isinstance(sparsity, (int, float, np.number))
        or (hasattr(sparsity, "shape") and np.ndim(sparsity) == 0)
    ):
        raise ValueError(
            f"global_topk takes one sparsity for all selected leaves, got {sparsity!r}. "
            "Use topk for per-leaf sparsities."
        )
    check_sparsity(sparsity)
    paths, leaves, treedef, sel = _selected(scores, where)
    idx = [i for i, s in enumerate(sel) if s]
    arrays = [jnp.asarray(leaves[i]) for i in idx]
    n = int(sum(a.size for a in arrays))
    masks = _select.select_groups(arrays, [0] * len(idx), [_select.keep_count(n, sparsity)])
    return _assemble(treedef, len(leaves), idx, masks)


def _assemble(treedef, n_leaves: int, idx: Sequence[int], masks: Sequence[jax.Array]) -> PyTree:
    out = [_unselected_mask() for _ in range(n_leaves)]
    for i, m in zip(idx, masks):
        out[i] = m
    return _tree.unflatten(treedef, out)


# --------------------------------------------------------------------------
# N:M masks


def _nm_leaf(s: jax.Array, n: int, m: int, axis: int, path: str) -> jax.Array:
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


def n_of_m(scores: PyTree, n: int = 2, m: int = 4, axis: int = -2, where: Any = None) -> PyTree:
    """N:M structured sparsity: in every group of ``m`` consecutive entries along
    ``axis``, keep the ``n`` with the largest scores.

    The default ``axis=-2`` is the reduction (input) axis of a Dense kernel
    ``(in, out)`` and of a conv kernel ``(h, w, in, out)``, which is the
    layout sparse tensor cores (2:4) accelerate. Ties go to the lower index;
    NaN ranks lowest.

    Args:
      scores: a pytree of float scores.
      n: entries kept per group, ``0 <= n <= m``.
      m: group size; must divide the length of ``axis`` in every selected leaf.
      axis: the axis along which groups are formed.
      where: which leaves to prune.

    Returns:
      A mask tree with sparsity exactly ``1 - n / m`` on every selected leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> s = {"w": jnp.array([[4.0], [1.0], [3.0], [2.0]])}
      >>> n_of_m(s, 2, 4)["w"][:, 0].tolist()
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
    paths, leaves, treedef, sel = _selected(scores, where)
    out = []
    for p, leaf, s in zip(paths, leaves, sel):
        out.append(_nm_leaf(jnp.asarray(leaf), int(n), int(m), axis, p) if s else _unselected_mask())
    return _tree.unflatten(treedef, out)


# --------------------------------------------------------------------------
# Block masks


def block(
    scores: PyTree,
    sparsity: Any,
    block_shape: int | tuple[int, int] = 4,
    reduce: str = "mean",
    where: Any = None,
) -> PyTree:
    """Block sparsity: prune whole ``b0 x b1`` tiles of the last two axes.

    Each tile is scored by the ``mean`` or ``max`` of its scores; every
    selected leaf keeps ``round(t * (1 - sparsity))`` of its ``t`` tiles
    (tiles of all leading indices, e.g. conv spatial positions, compete
    together), with the usual tie and NaN rules on the tile scores.

    Args:
      scores: a pytree of float scores.
      sparsity: fraction of tiles (and so of weights) set to zero; a number
        or a per-leaf tree.
      block_shape: ``b`` for ``b x b`` tiles, or ``(b0, b1)``.
      reduce: ``"mean"`` or ``"max"``.
      where: which leaves to prune (they need ``ndim >= 2``).

    Returns:
      A mask tree.

    Example:
      >>> import jax.numpy as jnp
      >>> s = {"w": jnp.array([[1.0, 1.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0]])}
      >>> block(s, 0.5, (2, 2))["w"].astype(int).tolist()
      [[0, 0, 1, 1], [0, 0, 1, 1]]

    References:
      Gray et al., "GPU kernels for block-sparse weights", OpenAI 2017;
      Narang et al., "Block-sparse recurrent neural networks", 2017.
    """
    b0, b1 = (block_shape, block_shape) if isinstance(block_shape, int) else tuple(block_shape)
    if reduce not in ("mean", "max"):
        raise ValueError(f"block: reduce must be 'mean' or 'max', got {reduce!r}.")
    if b0 < 1 or b1 < 1:
        raise ValueError(f"block: block_shape must be positive, got {block_shape!r}.")
    paths, leaves, treedef, sel = _selected(scores, where)
    sp = _per_leaf_sparsity(sparsity, scores, paths, sel)
    tile_scores, idx, shapes = [], [], []
    for i, (p, leaf, s) in enumerate(zip(paths, leaves, sel)):
        if not s:
            continue
        x = jnp.asarray(leaf)
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
        t = x.astype(jnp.float32).reshape(*x.shape[:-2], r // b0, b0, c // b1, b1)
        t = jnp.mean(t, axis=(-3, -1)) if reduce == "mean" else jnp.max(t, axis=(-3, -1))
        tile_scores.append(t)
        idx.append(i)
        shapes.append(x.shape)
    keep = [_select.keep_count(int(t.size), sp[i]) for i, t in zip(idx, tile_scores)]
    tmasks = _select.select_groups(tile_scores, list(range(len(idx))), keep)
    masks = [
        jnp.repeat(jnp.repeat(tm, b0, axis=-2), b1, axis=-1).reshape(shape)
        for tm, shape in zip(tmasks, shapes)
    ]
    return _assemble(treedef, len(leaves), idx, masks)


# --------------------------------------------------------------------------
# Channel (structured) masks


def channels(
    scores: PyTree,
    sparsity: Any,
    axis: int = -1,
    norm: str = "l1",
    where: Any = None,
) -> PyTree:
    """Structured masks that keep or remove whole units along ``axis``.

    A unit (a Dense output neuron, a conv filter with the default
    ``axis=-1``) is scored by the L1 or L2 norm of its scores over all other
    axes; each selected leaf keeps ``round(u * (1 - sparsity))`` of its ``u``
    units, ties to the lower index.

    Args:
      scores: a pytree of float scores.
      sparsity: fraction of units removed; a number or a per-leaf tree.
      axis: the unit axis (``-1``: output features / filters).
      norm: ``"l1"`` or ``"l2"``.
      where: which leaves to prune.

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
    if norm not in ("l1", "l2"):
        raise ValueError(f"channels: norm must be 'l1' or 'l2', got {norm!r}.")
    paths, leaves, treedef, sel = _selected(scores, where)
    sp = _per_leaf_sparsity(sparsity, scores, paths, sel)
    unit_scores, idx, info = [], [], []
    for i, (p, leaf, s) in enumerate(zip(paths, leaves, sel)):
        if not s:
            continue
        x = jnp.asarray(leaf).astype(jnp.float32)
        if x.ndim == 0 or not (-x.ndim <= axis < x.ndim):
            raise ValueError(
                f"channels: axis={axis} is out of range for leaf {p!r} of shape {x.shape}."
            )
        ax = axis % x.ndim
        others = tuple(a for a in range(x.ndim) if a != ax)
        u = jnp.sum(jnp.abs(x), axis=others) if norm == "l1" else jnp.sqrt(jnp.sum(x * x, axis=others))
        unit_scores.append(u)
        idx.append(i)
        info.append((x.shape, ax))
    keep = [_select.keep_count(int(u.size), sp[i]) for i, u in zip(idx, unit_scores)]
    umasks = _select.select_groups(unit_scores, list(range(len(idx))), keep)
    masks = []
    for um, (shape, ax) in zip(umasks, info):
        bshape = [1] * len(shape)
        bshape[ax] = shape[ax]
        masks.append(jnp.broadcast_to(um.reshape(bshape), shape))
    return _assemble(treedef, len(leaves), idx, masks)


# --------------------------------------------------------------------------
# Applying and measuring masks


def _check_same_structure(a: PyTree, b: PyTree, a_name: str, b_name: str) -> None:
    sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    # Trees match if their leaf paths match, whatever containers hold them (an
    # NNX State of Param vs. one of OptVariable, a pure dict vs. a State).
    if sa != sb and _tree.paths(a) != _tree.paths(b):
        pa, pb = set(_tree.paths(a)), set(_tree.paths(b))
        only_a, only_b = sorted(pa - pb)[:5], sorted(pb - pa)[:5]
        raise ValueError(
            f"{a_name} and {b_name} have different tree structures. Leaves only in "
            f"{a_name}: {only_a}; only in {b_name}: {only_b}. Build {b_name} from the "
            f"same pytree as {a_name} (e.g. scores = jp.scores.magnitude(params))."
            + ("" if (only_a or only_b) else f" Structures: {sa} vs {sb}.")
        )


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zeroes the pruned entries: ``where(mask, param, 0)``, dtypes kept.

    Args:
      params: a parameter pytree.
      masks: a mask tree of the same structure (scalar ``True`` leaves pass
        the parameter through).

    Returns:
      The masked parameters.
    """
    _check_same_structure(params, masks, "params", "masks")
    paths, p_leaves, treedef = _tree.flatten(params)
    m_leaves = jax.tree_util.tree_leaves(masks)
    out = []
    for path, p, m in zip(paths, p_leaves, m_leaves):
        m = jnp.asarray(m)
        if m.ndim and m.shape != np.shape(p):
            raise ValueError(
                f"mask for leaf {path!r} has shape {m.shape} but the parameter has shape "
                f"{np.shape(p)}."
            )
        out.append(jnp.where(m, p, jnp.zeros((), jnp.result_type(p))))
    return _tree.unflatten(treedef, out)


def _zero_count(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return _select.count_true(~x)
    return _select.count_true(x == 0)


def sparsity(tree: PyTree, where: Any = None) -> Any:
    """Fraction of zeros (or ``False``) among the selected entries.

    Works on parameters (counts exact zeros) and on masks (counts ``False``).
    Returns a Python float when called eagerly, a traced scalar under ``jit``.

    Example:
      >>> import jax.numpy as jnp
      >>> sparsity({"w": jnp.array([[0.0, 1.0], [0.0, 2.0]])})
      0.5
    """
    paths, leaves, _ = _tree.flatten(tree)
    sel = _tree.select(tree, where)
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


@dataclass(frozen=True)
class Summary:
    """Per-leaf pruning summary. ``str(summary)`` is a printable table.

    Attributes:
      rows: one dict per selected leaf with ``path``, ``shape``, ``size``,
        ``kept`` and ``sparsity``.
      total: the same for all selected leaves together.
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
            lines.append(
                f"{r['path']:<{w}}  {str(r['shape']):>18}  {r['kept']:>12,}  {r['size']:>12,}  "
                f"{r['sparsity']:>8.2%}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def summary(tree: PyTree, where: Any = None) -> Summary:
    """Per-leaf table of kept entries and sparsity (of params or masks).

    Example:
      >>> import jax.numpy as jnp
      >>> s = summary({"w": jnp.array([[0.0, 1.0], [0.0, 2.0]])})
      >>> s.to_dict()["w"]["kept"], s.total["sparsity"]
      (2, 0.5)
    """
    paths, leaves, _ = _tree.flatten(tree)
    sel = _tree.select(tree, where)
    rows = []
    tk, ts = 0, 0
    for p, leaf, s in zip(paths, leaves, sel):
        if not s:
            continue
        size = int(np.size(leaf))
        zeros = int(_zero_count(leaf)) if size else 0
        rows.append(
            dict(path=p, shape=tuple(np.shape(leaf)), size=size, kept=size - zeros,
                 sparsity=zeros / size if size else 0.0)
        )
        tk += size - zeros
        ts += size
    total = dict(path="total", shape=(), size=ts, kept=tk, sparsity=(ts - tk) / ts if ts else 0.0)
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

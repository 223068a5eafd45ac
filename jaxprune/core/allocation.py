"""Per-leaf sparsity budgets: uniform, global, ERK, regex maps, callables.

An *allocation* turns one overall sparsity into per-leaf sparsities
(:func:`sparsities`) and masks (:func:`masks`):

* ``"uniform"``: every selected leaf at the same sparsity, per-leaf top-k
  (:func:`jaxprune.masks.topk`).
* ``"global"``: one threshold over all selected leaves
  (:func:`jaxprune.masks.global_topk`); layers end up at whatever sparsity
  their scores dictate, so it has masks but no per-leaf sparsities.
* ``"erk"``: Erdos-Renyi-Kernel (Evci et al. 2020): the density of a layer is
  proportional to ``sum(shape) / prod(shape)``, scaled so the total kept
  count matches the overall sparsity; layers that would exceed density 1 are
  kept dense and the budget is shared among the rest.
* ``{regex: sparsity}``: leaves whose path matches a key get that sparsity
  (a number or an optax schedule of the step); all other selected leaves get
  the overall sparsity. The first matching key wins.
* a per-leaf tree: a prefix tree of the parameters (the same keys from the
  root down to any depth) of numbers, schedules or ``None``; a value covers
  the leaves under it and overrides the overall sparsity there (``None``:
  not covered). :func:`from_sensitivity` returns one. A dict is read as a
  tree when its key paths name subtrees covering every leaf of the
  parameters, else as ``{regex: sparsity}``.
* a callable ``(params, sparsity) -> tree of per-leaf sparsities``.

The names are a registry (:data:`REGISTRY`, :func:`register`): an
:class:`Allocation` says how a name gives per-leaf sparsities, masks and,
for :func:`jaxprune.structured.masks`, unit counts; adding one is one
:func:`register` call.

Every function here takes ``(tree, sparsity, allocation, *, where=None,
...)`` in that order.

Stacked layers (``layers=``, ``layer_axis=``): parameters stacked along a
layer axis (``nnx.scan``, ``nn.scan``, MaxText) get per-layer budgets, as
if every layer were its own leaf: ``"uniform"`` and the per-leaf
allocations keep ``round(n * (1 - s))`` in *every layer*, ERK computes a
layer's density from the shape of one layer, and ``"global"`` is one
threshold over all weights, stacked or not (only the total count matters).

Example:
  >>> import jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"a": jnp.ones((100, 100)), "c": jnp.ones((10, 100))}
  >>> s = jp.allocation.sparsities(params, 0.9, allocation="erk")
  >>> round(float(s["a"]), 3), round(float(s["c"]), 3)
  (0.929, 0.61)
  >>> m = jp.allocation.masks(jp.scores.magnitude(params), 0.9, allocation="erk")
  >>> int(m["c"].sum()) == round(1000 * (1 - float(s["c"])))
  True

References:
  Evci et al., "Rigging the lottery: making all tickets winners", ICML 2020;
  Mocanu et al., "Scalable training of artificial neural networks with
  adaptive sparse connectivity", Nature Communications 2018 (Erdos-Renyi).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _deprecation
from jaxprune.budgets import cost as _budget
from jaxprune.core import masks as _masks
from jaxprune.core import scores as _scores
from jaxprune.core import select as _select
from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree

__all__ = [
    "NAMES",
    "REGISTRY",
    "Allocation",
    "check",
    "erk",
    "from_sensitivity",
    "global_budget",
    "masks",
    "owl",
    "random_masks",
    "register",
    "sparsities",
    "uniform_budget",
]

class Allocation(NamedTuple):
    """A named allocation: what ``allocation="name"`` means everywhere.

    Attributes:
      name: the name users pass.
      sparsities: ``(params, sparsity, where, layers, layer_axis) -> list``,
        each leaf's sparsity in leaf order; ``None`` for an allocation whose
        per-leaf counts come from the scores (then ``masks`` is given).
      masks: ``(scores, sparsity, chosen) -> masks`` (``chosen``: the bool
        tree of the selected leaves), or ``None``:
        :func:`jaxprune.masks.topk` at ``sparsities``.
      units: for :func:`jaxprune.structured.masks`: ``(scores, sparsities)
        -> counts``, with ``scores`` a list of ``(layers, n)`` unit scores
        (one per group) and ``sparsities`` one per group; one int32 count
        per group (units kept in each layer), before ``round_to``. ``None``:
        not available for structured pruning.
    """

    name: str
    sparsities: Callable | None = None
    masks: Callable | None = None
    units: Callable | None = None


REGISTRY: dict[str, Allocation] = {}
NAMES: tuple = ()  # the registered names, in registration order


def register(allocation: Allocation) -> Allocation:
    """Adds (or replaces) a named allocation; returns it.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> half = jp.allocation.register(jp.allocation.Allocation(
      ...     "half", sparsities=lambda params, s, where, layers, axis:
      ...         [s / 2] * len(jax.tree_util.tree_leaves(params))))
      >>> jp.allocation.sparsities({"w": jnp.ones((4, 4))}, 0.5, "half")
      {'w': 0.25}
      >>> _ = jp.allocation.REGISTRY.pop("half")
    """
    global NAMES
    if not isinstance(allocation, Allocation) or not isinstance(allocation.name, str):
        raise TypeError(f"register takes an Allocation with a str name, got {allocation!r}.")
    if allocation.sparsities is None and allocation.masks is None:
        raise ValueError(f"allocation {allocation.name!r} needs sparsities= or masks=.")
    REGISTRY[allocation.name] = allocation
    NAMES = tuple(REGISTRY)
    return allocation


def get(name: str, what: str = "allocation") -> Allocation:
    """The registered allocation ``name``; ``ValueError`` naming the others."""
    if name not in REGISTRY:
        raise ValueError(
            f"{what}: unknown allocation {name!r}; use one of {list(REGISTRY)}, a dict "
            "{path regex: sparsity}, a per-leaf tree of sparsities or a callable "
            "(params, sparsity) -> tree.")
    return REGISTRY[name]


def check(allocation: Any, params: PyTree | None = None, where: Any = None, *,
          layers: Any = None, layer_axis: int = 0, what: str = "allocation") -> None:
    """Validates an allocation (names, values, regex keys, tree structure)
    early, with a clear error; with ``params``, also ``layers=`` /
    ``layer_axis=`` on them and which form a dict is."""
    if params is not None and layers is not None:
        _tree.stacked_axes(params, layers, layer_axis, _tree.flags(params, where), what)
    form = _form(allocation, params)
    if form == "name":
        get(allocation)
    elif form in ("tree", "regex", "values"):
        _check_values(allocation)
    if form == "regex" and params is not None:
        _check_regex(allocation, params, where)


def _is_function(x: Any) -> bool:
    return callable(x) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x))


def _form(allocation: Any, params: PyTree | None) -> str:
    """``"name"``, ``"function"``, ``"tree"`` (a per-leaf prefix tree of the
    params), ``"regex"`` (``{regex: sparsity}``) or, without params,
    ``"values"`` (a tree or a regex map: the params decide)."""
    if isinstance(allocation, str):
        return "name"
    if _is_function(allocation):
        return "function"
    if isinstance(allocation, (bool, int, float, np.number)) or (
            hasattr(allocation, "shape") and not isinstance(allocation, Mapping)) \
            or jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(allocation)):
        raise TypeError(
            f"allocation must be one of {list(REGISTRY)}, a dict {{path regex: sparsity}}, a "
            f"per-leaf tree of sparsities or a callable; got {type(allocation).__name__}. "
            "For one sparsity everywhere pass sparsity= and allocation='uniform'.")
    if params is None:
        return "values"
    if _covering(allocation, params) is not None:
        return "tree"
    if _flat_str_dict(allocation):
        return "regex"
    apaths = [_tree.path_str(p) for p, _ in _flat_with_none(allocation)]
    raise ValueError(
        f"allocation is a tree but not a prefix tree of the parameters: its leaves "
        f"{apaths[:6]} do not cover the parameter leaves {_tree.paths(params)[:6]} (every "
        "parameter leaf must sit under exactly one allocation leaf; use None for leaves it "
        "leaves to sparsity=). Pass the tree for these parameters (e.g. "
        "jp.allocation.from_sensitivity of curves scanned on them), or a flat "
        "{path regex: sparsity} dict.")


def _flat_with_none(tree: PyTree) -> list:
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]


def _flat_str_dict(allocation: Any) -> bool:
    return isinstance(allocation, Mapping) and all(
        isinstance(k, str) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(v))
        for k, v in allocation.items())


def _covering(allocation: PyTree, params: PyTree) -> list | None:
    """Per parameter leaf, the allocation value whose path is a prefix of
    its path (a path-component prefix), or ``None`` if ``allocation`` is
    not a prefix tree of ``params`` (a leaf uncovered, or a value covering
    nothing). Paths, not tree types, decide: a dict serves an NNX State."""
    flat = _flat_with_none(allocation)
    values = {_tree.path_str(p): v for p, v in flat}
    used: set = set()
    out = []
    for path in _tree.paths(params):
        parts = path.split("/") if path else [""]
        hit = next((q for q in ("/".join(parts[:i]) for i in range(len(parts), -1, -1))
                    if q in values), None)
        if hit is None:
            return None
        used.add(hit)
        out.append(values[hit])
    return out if len(used) == len(values) else None


def _check_values(allocation: PyTree) -> None:
    for p, v in _flat_with_none(allocation):
        if v is None or callable(v):
            continue
        _masks.check_sparsity(v, f"allocation[{_tree.path_str(p)!r}]")


def _check_regex(allocation: Mapping, params: PyTree, where: Any) -> None:
    for k in allocation:
        try:
            re.compile(k)
        except re.error as e:
            raise ValueError(f"allocation key {k!r} is not a valid regex: {e}") from e
    paths = _tree.paths(params)
    sel = _tree.flags(params, where)
    chosen = [p for p, s in zip(paths, sel) if s]
    for k in allocation:
        if not any(re.search(k, p) for p in chosen):
            raise ValueError(
                f"allocation key {k!r} matches no selected leaf. Selected leaves: "
                f"{chosen[:20]}. Fix the regex or the where= selection."
            )


@_deprecation.keyword_only("where", "power")
def erk(params: PyTree, sparsity: Any, *, where: Any = None, power: float = 1.0,
        layers: Any = None, layer_axis: int = 0) -> PyTree:
    """Erdos-Renyi-Kernel per-leaf sparsities for an overall ``sparsity``.

    Works with a traced ``sparsity``. Unselected leaves get ``0.0``. The same
    as ``sparsities(params, sparsity, "erk", where=where)`` (with ``power=1``).

    Args:
      params: parameter pytree (only shapes are used).
      sparsity: overall fraction of zeros among the selected weights.
      where: which leaves are pruned.
      power: exponent on the ERK scale (1.0 is the standard).
      layers: stacked leaves (see :func:`jaxprune.tree.stacked_axes`): each
        layer is its own layer, its scale from the shape of one layer (all
        layers of a stack get the same sparsity).
      layer_axis: their layer axis.

    Returns:
      A tree of float32 scalars: the sparsity of each leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> s = erk({"a": jnp.ones((10, 10)), "c": jnp.ones((10, 2))}, 0.5)
      >>> round(float(s["a"]), 3), float(s["c"])
      (0.6, 0.0)
    """
    paths, leaves, treedef = _tree.flatten(params)
    sel = _tree.flags(params, where)
    stack = _tree.stacked_axes(params, layers, layer_axis, sel, "erk")
    idx = [i for i, s in enumerate(sel) if s]
    sizes = np.array([np.size(leaves[i]) for i in idx], np.float64)
    shapes = [_layer_shape(np.shape(leaves[i]), stack[i]) for i in idx]
    scales = np.array(
        [
            (np.sum(shp) / max(np.prod(shp), 1)) ** power if np.size(leaves[i]) else 0.0
            for i, shp in zip(idx, shapes)
        ],
        np.float64,
    )
    s = jnp.asarray(sparsity, jnp.float32)
    total = float(sizes.sum())
    budget = (1.0 - s) * total
    n = jnp.asarray(sizes, jnp.float32)
    sc = jnp.asarray(scales, jnp.float32)
    dense = jnp.zeros(len(idx), bool)
    eps = jnp.float32(0.0)
    for _ in range(max(len(idx), 1)):
        rest = budget - jnp.sum(jnp.where(dense, n, 0.0))
        denom = jnp.sum(jnp.where(dense, 0.0, sc * n))
        eps = rest / jnp.maximum(denom, 1e-30)
        dense = dense | (eps * sc > 1.0)
    density = jnp.where(dense, 1.0, jnp.clip(eps * sc, 0.0, 1.0))
    out: list[Any] = [jnp.float32(0.0)] * len(leaves)
    for j, i in enumerate(idx):
        out[i] = 1.0 - density[j]
    return _tree.unflatten(treedef, out)


def _layer_shape(shape: tuple, axis: int | None) -> tuple:
    """The shape of one layer of a stacked leaf (the leaf's shape if not stacked)."""
    return tuple(shape) if axis is None else tuple(d for a, d in enumerate(shape) if a != axis)


# --------------------------------------------------------------------------
# The registered allocations


def top_units(scores: jax.Array, k: Any) -> jax.Array:
    """Keeps exactly the ``k`` largest of a small vector (ties to the lower
    index, NaN lowest): a stable sort of the sortable keys. Unit counts are
    small, so a sort compiles and runs faster than the selection engine."""
    key = _select.sortable_key(scores)
    order = jnp.argsort(~key, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return rank < k


def _uniform_units(scores: list, sparsities: list) -> list:
    return [jnp.asarray(_select.keep_count(sc.shape[-1], s), jnp.int32)
            for sc, s in zip(scores, sparsities)]


def _global_units(scores: list, sparsities: list) -> list:
    """One threshold over scores divided by their group's mean keeps
    ``round(N (1 - s))`` of all ``N`` units; each group keeps its share,
    averaged over its layers."""
    if not scores:
        return []
    flat = [sc / jnp.maximum(jnp.mean(sc), 1e-30) for sc in scores]
    sizes = [int(np.prod(f.shape)) for f in flat]
    both = top_units(jnp.concatenate([f.reshape(-1) for f in flat]),
                     _select.keep_count(sum(sizes), sparsities[0]))
    parts = jnp.split(both, np.cumsum(sizes)[:-1])
    return [jnp.round(jnp.sum(m).astype(jnp.float32) / sc.shape[0]).astype(jnp.int32)
            for m, sc in zip(parts, scores)]


register(Allocation(
    "uniform",
    sparsities=lambda params, s, where, layers, axis: [s] * len(_tree.paths(params)),
    units=_uniform_units))
register(Allocation(
    "global",
    masks=lambda scores, s, chosen: _masks.global_topk(scores, s, where=chosen),
    units=_global_units))
register(Allocation(
    "erk",
    sparsities=lambda params, s, where, layers, axis: jax.tree_util.tree_leaves(
        erk(params, s, where=where, layers=layers, layer_axis=axis))))


def _per_leaf(params: PyTree, sparsity: Any, allocation: Any, where: Any, step: Any,
              layers: Any = None, layer_axis: int = 0) -> list[Any]:
    """Per-leaf sparsities in leaf order (``0.0`` for unselected leaves)."""
    paths, leaves, _ = _tree.flatten(params)
    sel = _tree.flags(params, where)
    check(allocation)
    form = _form(allocation, params)
    if form == "name":
        entry = get(allocation)
        if entry.sparsities is None:
            raise ValueError(
                f"allocation {allocation!r} has no per-leaf sparsities: it decides them from "
                f"the scores. Use jp.allocation.masks(scores, sparsity, {allocation!r}), or "
                f"one of {[n for n, a in REGISTRY.items() if a.sparsities]} for sparsities "
                "known in advance.")
        out = entry.sparsities(params, sparsity, where, layers, layer_axis)
    elif form == "regex":
        out = [_regex_value(allocation, p, sparsity, step) if s else sparsity
               for p, s in zip(paths, sel)]
    elif form == "tree":
        out = [_value(v, p, sparsity, step) if s else sparsity
               for p, v, s in zip(paths, _covering(allocation, params), sel)]
    else:
        out = _masks.per_leaf_sparsity(allocation(params, sparsity), params, paths, sel)
    return [v if s else 0.0 for v, s in zip(out, sel)]


def _value(v: Any, path: str, sparsity: Any, step: Any) -> Any:
    """A tree or regex-map value: ``None`` -> ``sparsity``; a schedule at ``step``."""
    if v is None:
        return sparsity
    if callable(v):
        if step is None:
            raise ValueError(f"the allocation gives leaf {path!r} a schedule, which needs the "
                             "step: pass step= (the transforms pass their count).")
        return v(step)
    return v


def _regex_value(allocation: dict, path: str, sparsity: Any, step: Any) -> Any:
    for k, v in allocation.items():
        if re.search(k, path):
            return _value(v, path, sparsity, step)
    return sparsity


@_deprecation.keyword_only("allocation")
def sparsities(params: PyTree, sparsity: Any, *, allocation: Any = "uniform",
               where: Any = None, step: Any = None, layers: Any = None,
               layer_axis: int = 0) -> PyTree:
    """Per-leaf sparsities of an allocation, for an overall ``sparsity``.

    Args:
      params: the parameters (shapes, paths and structure are used).
      sparsity: overall fraction of zeros among the selected weights (a
        number or a traced scalar).
      allocation: ``"uniform"``, ``"erk"``, a dict ``{path regex: sparsity}``,
        a per-leaf tree or a callable (see the module docstring); not
        ``"global"``, whose per-leaf sparsities depend on the scores.
      where: which leaves are pruned (others get ``0.0``).
      step: the step, for schedules inside a dict allocation.
      layers: stacked leaves, each layer its own layer for ERK (see the
        module docstring); ``layer_axis`` their layer axis.

    Returns:
      A tree with the structure of ``params``: each leaf's sparsity (of
      every layer, for a stacked leaf).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"a": {"kernel": jnp.ones((4, 4))}, "c": {"kernel": jnp.ones((4, 4))}}
      >>> sparsities(p, 0.5, allocation={"^c": 0.9})
      {'a': {'kernel': 0.5}, 'c': {'kernel': 0.9}}
      >>> sparsities(p, 0.5, allocation={"a": None, "c": {"kernel": 0.8}})  # a per-leaf tree
      {'a': {'kernel': 0.5}, 'c': {'kernel': 0.8}}
    """
    values = _per_leaf(params, sparsity, allocation, where, step, layers, layer_axis)
    return _tree.unflatten(jax.tree_util.tree_structure(params), values)


@_deprecation.keyword_only("allocation")
def masks(scores: PyTree, sparsity: Any, *, allocation: Any = "uniform", where: Any = None,
          params: PyTree | None = None, step: Any = None, layers: Any = None,
          layer_axis: int = 0) -> PyTree:
    """Masks for ``scores`` at an overall ``sparsity`` under an allocation.

    ``"uniform"`` and the per-leaf allocations run :func:`jaxprune.masks.topk`
    at each leaf's sparsity; ``"global"`` runs
    :func:`jaxprune.masks.global_topk`.

    Args:
      scores: score tree (structure of the parameters).
      sparsity: overall sparsity (number or traced scalar).
      allocation: see the module docstring.
      where: which leaves are pruned, decided on ``params``.
      params: the parameters (for shape-based allocations and for
        ``where=``; defaults to ``scores``).
      step: the step, for schedules inside a dict allocation.
      layers: which selected leaves are stacks of layers (a ``where=``-style
        selection, or a model graph): every layer gets its own budget, as if
        it were a leaf (``"global"``: one threshold over everything anyway).
      layer_axis: the layer axis of the stacked leaves (default 0).

    Returns:
      A mask tree.

    Example:
      >>> import jax.numpy as jnp
      >>> s = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "c": jnp.array([[5.0, 6.0], [7.0, 8.0]])}
      >>> m = masks(s, 0.5, allocation="global")
      >>> int(m["a"].sum()), int(m["c"].sum())
      (0, 4)
      >>> m = masks(s, 0.5, allocation="uniform", layers="a")  # a stack of 2 layers
      >>> m["a"].tolist()
      [[False, True], [False, True]]
    """
    shapes = _masks.stand_ins(scores)[0]  # select.LazyScores leaves as their shapes
    params = shapes if params is None else params
    _tree.check_same_structure(params, shapes, "params", "scores")
    sel = _masks.selection(params, where, "params")[3]
    treedef = jax.tree_util.tree_structure(shapes)
    chosen = _tree.unflatten(treedef, sel)
    if isinstance(allocation, str) and get(allocation).masks is not None:
        _tree.stacked_axes(params, layers, layer_axis, sel, "masks")  # the checks only
        return get(allocation).masks(scores, sparsity, chosen)
    sp = _per_leaf(params, sparsity, allocation, where, step, layers, layer_axis)
    stack = None if layers is None else _tree.unflatten(
        treedef, [a is not None for a in _tree.stacked_axes(params, layers, layer_axis, sel,
                                                            "masks")])
    return _masks.topk(scores, _tree.unflatten(treedef, sp), where=chosen, layers=stack,
                       layer_axis=layer_axis)


@_deprecation.keyword_only("allocation")
def random_masks(key: jax.Array, params: PyTree, sparsity: Any, *,
                 allocation: Any = "uniform", where: Any = None, layers: Any = None,
                 layer_axis: int = 0) -> PyTree:
    """Random masks at the per-leaf sparsities of an allocation.

    Each selected leaf keeps exactly the count its allocation gives it
    (``round(n_l * (1 - s_l))``), chosen uniformly at random (random scores,
    exact selection).

    Args:
      key: a PRNG key.
      params: the parameters (shapes and structure are used).
      sparsity: overall fraction of zeros among the selected weights.
      allocation: ``"uniform"`` (default), ``"erk"``, ``"global"``, a dict or
        a callable.
      where: which leaves to prune.
      layers: stacked leaves (every layer keeps its own count); ``layer_axis``
        their layer axis (see :func:`masks`).

    Returns:
      A mask tree.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = random_masks(jax.random.key(0), {"w": jnp.ones((4, 5))}, 0.5)
      >>> int(m["w"].sum())
      10
    """
    return masks(_scores.random(params, key=key), sparsity, allocation=allocation, where=where,
                 params=params, layers=layers, layer_axis=layer_axis)


def per_leaf(allocation: Any, params: PyTree, sparsity: Any, where: Any = None,
             count: Any = None) -> list[Any] | None:
    """Deprecated: use :func:`sparsities`. Per-leaf sparsities as a list in
    leaf order, or ``None`` for ``"global"``."""
    _deprecation.warn("jaxprune.allocation.per_leaf", "jaxprune.allocation.sparsities")
    if allocation == "global":
        return None
    return _per_leaf(params, sparsity, allocation, where, count)


def compute_masks(scores: PyTree, sparsity: Any, allocation: Any = "uniform", where: Any = None,
                  params: PyTree | None = None, count: Any = None) -> PyTree:
    """Deprecated: use :func:`masks` (same arguments, ``count`` is ``step``)."""
    _deprecation.warn("jaxprune.allocation.compute_masks", "jaxprune.allocation.masks")
    return masks(scores, sparsity, allocation=allocation, where=where, params=params, step=count)


# --------------------------------------------------------------------------
# OWL: outlier-weighted layerwise sparsity


@_deprecation.keyword_only("m", "lam", "blocks")
def owl(stats: dict, *, m: float = 5.0, lam: float = 0.08, blocks: Any = None):
    """OWL budgets: layers with more activation outliers keep more weights.

    The outlier ratio ``D_b`` of a block is the fraction of its Wanda scores
    ``|W_ij| * ||X_j||_2`` above ``m`` times their mean over the block. With
    ``r_b = 2 lam (D_b - min D) / (max D - min D)`` (``0`` for all when the
    ratios are equal), block ``b`` gets sparsity ``s - (r_b - rbar)``, where
    ``rbar`` is the parameter-weighted mean of ``r``: the parameter-weighted
    mean sparsity is exactly ``s``, and sparsities stay within ``s +- lam``
    (clipped to ``[0, 1]``, the excess moved to the other blocks).

    Blocks: each layer of a stacked (scanned) kernel stack is a block;
    other kernels are grouped by ``blocks``: ``None`` (the path up to its
    first numbered component, e.g. ``"blocks/3"`` or ``"Block_3"``; a kernel
    without one is its own block), ``"kernel"`` (every kernel alone) or a
    callable ``path -> block name``.

    Args:
      stats: ``{path: InputStats}`` from :func:`jaxprune.calibrate` (on the
        dense model); the kernels it holds are the ones budgeted.
      m: the outlier threshold, in multiples of the block's mean score (the
        reference LLaMA-7B script's ``Hyper_m = 5``).
      lam: the largest deviation from the target sparsity (``Lamda = 0.08``).
      blocks: how kernels group into blocks (see above).

    Returns:
      An allocation ``(params, sparsity) -> tree`` of per-leaf sparsities
      (one value per layer for a stacked kernel; ``0.0`` for other leaves),
      usable as ``allocation=`` of :func:`jaxprune.oneshot.wanda`,
      :func:`jaxprune.oneshot.sparsegpt` and the mask functions. ``sparsity``
      may be traced.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"l0": {"w": jnp.ones((4, 4))}, "l1": {"w": jnp.ones((4, 4))}}
      >>> x = jnp.array([[1.0, 1.0, 1.0, 30.0]])
      >>> f = lambda p, x: (x @ p["l0"]["w"]) @ p["l1"]["w"]
      >>> alloc = jp.allocation.owl(jp.calibrate(f, p, [x]), m=2)
      >>> s = alloc(p, 0.5)
      >>> round(float(s["l0"]["w"]), 2), round(float(s["l1"]["w"]), 2)
      (0.42, 0.58)

    References:
      Yin et al., "Outlier weighed layerwise sparsity (OWL): a missing secret
      sauce for pruning LLMs to high sparsity", ICML 2024.
    """
    if not stats:
        raise ValueError("owl: stats is empty; calibrate the kernels first (jp.calibrate).")
    if not m > 0 or not lam >= 0:
        raise ValueError(f"owl: need m > 0 and lam >= 0, got m={m!r}, lam={lam!r}.")

    names, parts = _owl_blocks(stats, blocks)

    @jax.jit
    def per_kernel(kernels: dict, sumsq: dict, sparsity: Any) -> dict:
        scores = {p: jnp.abs(kernels[p].astype(jnp.float32))
                  * stats[p].expanded(jnp.sqrt(sumsq[p].astype(jnp.float32))) for p in stats}
        ratio, size = _outlier_ratios(scores, parts, len(names), m)
        s_block = _owl_sparsities(ratio, size, jnp.asarray(sparsity, jnp.float32), lam)
        return {p: s_block[np.array([b for q, _, b in parts if q == p])] if stats[p].layers
                else s_block[next(b for q, _, b in parts if q == p)] for p in stats}

    def allocate(params: PyTree, sparsity: Any) -> PyTree:
        from jaxprune.core.scores import check_stats

        _masks.check_sparsity(sparsity)
        paths, leaves, treedef = _tree.flatten(params)
        check_stats(paths, leaves, stats)
        kernels = {p: x for p, x in zip(paths, leaves) if p in stats}
        got = per_kernel(kernels, {p: st.sumsq for p, st in stats.items()}, sparsity)
        return _tree.unflatten(treedef, [got[p] if p in stats else jnp.float32(0.0)
                                         for p in paths])

    return allocate


def _owl_blocks(stats: dict, blocks: Any) -> tuple[list, list]:
    """Block names and ``[(path, layer or None, block index)]``."""
    names: dict = {}
    parts = []
    for p, st in stats.items():
        if st.layers:
            for layer in range(st.layers):
                key = ("stack", st.stack, layer)
                parts.append((p, layer, names.setdefault(key, len(names))))
            continue
        if blocks == "kernel":
            key = p
        elif callable(blocks):
            key = blocks(p)
        elif blocks is None:
            key = _numbered_prefix(p)
        else:
            raise ValueError(f"owl: blocks must be None, 'kernel' or a callable path -> "
                             f"name, got {blocks!r}.")
        parts.append((p, None, names.setdefault(("path", key), len(names))))
    return list(names), parts


def _numbered_prefix(path: str) -> str:
    comps = path.split("/")
    for i, c in enumerate(comps[:-1]):
        if re.fullmatch(r"\d+|.*_\d+", c):
            return "/".join(comps[: i + 1])
    return path


def _outlier_ratios(scores: dict, parts: list, n_blocks: int, m: float):
    """Per block: fraction of scores above ``m`` times the block mean, and size."""
    def piece(p, layer):
        x = scores[p]
        return x if layer is None else x[layer]

    total = [jnp.float32(0.0)] * n_blocks
    size = np.zeros(n_blocks, np.float64)
    for p, layer, b in parts:
        x = piece(p, layer)
        total[b] = total[b] + jnp.sum(x)
        size[b] += x.size
    mean = jnp.stack(total) / jnp.asarray(size, jnp.float32)
    count = [jnp.float32(0.0)] * n_blocks
    for p, layer, b in parts:
        count[b] = count[b] + jnp.sum(piece(p, layer) > m * mean[b], dtype=jnp.float32)
    return jnp.stack(count) / jnp.asarray(size, jnp.float32), size


def _owl_sparsities(ratio: jax.Array, size: np.ndarray, s: jax.Array, lam: float) -> jax.Array:
    lo, hi = jnp.min(ratio), jnp.max(ratio)
    span = hi - lo
    r = jnp.where(span > 0, (ratio - lo) / jnp.where(span > 0, span, 1.0), 0.0) * (2 * lam)
    w = jnp.asarray(size / size.sum(), jnp.float32)
    out = s - (r - jnp.sum(w * r))
    for _ in range(len(size)):  # clip to [0, 1], moving the excess to the free blocks
        clipped = jnp.clip(out, 0.0, 1.0)
        free = (clipped > 0) & (clipped < 1)
        excess = s - jnp.sum(w * clipped)
        denom = jnp.sum(jnp.where(free, w, 0.0))
        out = clipped + jnp.where(free, excess / jnp.where(denom > 0, denom, 1.0), 0.0)
    return jnp.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------
# Layer-aware budgets (sensitivity curves, cost budgets)


@_deprecation.keyword_only("cost")
def from_sensitivity(curves: Any, sparsity: Any = None, *, cost: str = "params") -> Any:
    """Per-layer sparsities that meet a budget with the least predicted damage.

    Each layer's damage curve (metric loss against sparsity, from
    :func:`jaxprune.sensitivity.scan` or
    :func:`jaxprune.sensitivity.from_scores`) is replaced by its convex
    minorant and interpolated linearly; weights or units are then removed
    where the predicted damage per unit of cost saved is smallest, until the
    cost kept is ``(1 - sparsity)`` of the dense cost:
    ``min sum_l d_l(s_l)  subject to  cost(s) <= (1 - sparsity) cost(0)``.

    * Leaf curves (unstructured): a fractional knapsack over the curve
      segments, solved exactly: with ``cost="params"`` exactly
      ``round(N (1 - sparsity))`` of the ``N`` scanned weights are kept
      (as :func:`jaxprune.masks.topk` rounds each leaf's rate, for leaves of
      up to ~8M weights under ``jit``). ``cost="flops"`` weighs each weight
      by its kernel's MACs per weight.
    * Group curves (structured): one unit at a time from the group with the
      least damage per cost saved, costs recomputed from the graph (removing
      a channel shrinks its producer and its consumers); the cost kept is at
      most the target and within one unit's cost of it. ``"params"`` counts
      every variable but running statistics; ``"flops"`` the graph's MACs.

    No layer goes past its last scanned level (scan up to 0.95 or 1.0 to
    allow more).

    Args:
      curves: :class:`jaxprune.sensitivity.Curves`.
      sparsity: the fraction of the dense cost removed. ``None`` (leaf
        curves only) returns a callable allocation for
        :func:`jaxprune.prune`, which solves for each (scheduled, traced)
        sparsity inside the jitted update.
      cost: ``"params"`` or ``"flops"``.

    Returns:
      Leaf curves: a tree of per-leaf sparsities with the scanned
      parameters' structure (``0.0`` for leaves not scanned), usable as the
      sparsity of :func:`jaxprune.masks.topk`; with ``sparsity=None`` a
      callable ``(params, sparsity) -> tree`` for ``allocation=``. Group
      curves: ``{group name: sparsity}`` for :func:`jaxprune.structured.masks`.

    Raises:
      ValueError: an unknown cost, or a budget the curves cannot meet.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> params = {"fragile": jnp.arange(1.0, 101.0).reshape(10, 10),
      ...           "robust": jnp.arange(1.0, 101.0).reshape(10, 10)}
      >>> metric = lambda p: 10 * jnp.sum(p["fragile"] == 0) + jnp.sum(p["robust"] == 0)
      >>> curves = jp.sensitivity.scan(metric, params, levels=(0.5, 0.9))
      >>> s = jp.allocation.from_sensitivity(curves, 0.45)
      >>> s["fragile"], s["robust"]
      (0.0, 0.9)

    References:
      Han et al., NeurIPS 2015 (sensitivity-driven per-layer thresholds);
      He et al., "AMC: AutoML for model compression", ECCV 2018 (FLOPs
      budgets per layer).
    """
    _budget.check_kind(cost)
    model = curves.model(cost)
    if curves.granularity == "group":
        if sparsity is None:
            raise ValueError("from_sensitivity: group curves need a sparsity (the fraction of "
                             f"the dense {cost} removed); the structured budget is solved "
                             "on the host.")
        return _group_budget(curves, model, _concrete(sparsity), cost)
    if sparsity is None:
        return lambda params, s: _leaf_budget(curves, model, s, cost, jax.tree_util.tree_structure(params))
    return _leaf_budget(curves, model, _concrete(sparsity), cost, None)


def _concrete(sparsity: Any) -> float:
    _masks.check_sparsity(sparsity)
    if isinstance(sparsity, jax.core.Tracer):
        raise ValueError("from_sensitivity: a traced sparsity needs sparsity=None (a callable "
                         "allocation solved inside jit).")
    return float(sparsity)


def _leaf_budget(curves: Any, model: Any, sparsity: Any, cost: str, treedef: Any) -> Any:
    removed, damage = curves.removed(), curves.damage()
    exact = cost == "params"
    total = int(curves.sizes.sum())
    if exact:
        target = total - _select.keep_count(total, sparsity)
    else:
        target = jnp.asarray(sparsity, jnp.float32) * model.dense
    if not isinstance(sparsity, jax.core.Tracer):
        most = float(model(curves.sizes) - model(curves.sizes - removed[:, -1]))
        if float(target) > most + 1e-6 * max(model.dense, 1.0):
            raise ValueError(
                f"from_sensitivity: sparsity {sparsity} of the {cost} cannot be met: with every "
                f"layer at its last scanned level ({curves.levels[-1]:g}) at most "
                f"{most / model.dense:.4f} of it is removed. Scan higher levels (up to 1.0).")
    per_weight = model.leaf_cost / np.maximum(curves.sizes, 1)
    r = _budget.linear_solve(removed, damage, per_weight, target, exact)
    if treedef is not None and treedef != curves.treedef:
        raise ValueError("from_sensitivity: the parameters do not have the structure of the "
                         f"scanned ones ({treedef} vs {curves.treedef}).")
    concrete = not isinstance(r, jax.core.Tracer)
    out: list = [0.0 if concrete else jnp.float32(0.0)] * curves.treedef.num_leaves
    for li, i in enumerate(curves.index):
        n = int(curves.sizes[li])
        out[i] = int(r[li]) / n if concrete else r[li].astype(jnp.float32) / np.float32(n)
    return jax.tree_util.tree_unflatten(curves.treedef, out)


def _group_budget(curves: Any, model: Any, sparsity: float, cost: str) -> dict:
    target = (1.0 - sparsity) * model.dense
    kmin = curves.kept[:, -1]
    _check_reachable(model, kmin, target, sparsity, cost,
                     f"every group at its last scanned level ({curves.levels[-1]:g})")
    k = _budget.unit_greedy(model, curves.removed(), curves.damage(), curves.sizes, kmin, target)
    return _rates(curves.names, curves.sizes, k)


def _check_reachable(model: Any, kmin: np.ndarray, target: float, sparsity: float, cost: str,
                     how: str) -> None:
    least = float(model(kmin))
    if least > target * (1 + 1e-9):
        raise ValueError(
            f"the budget cannot be met: removing {sparsity} of the {cost} leaves "
            f"{target:,.0f}, but {how} still keeps {least:,.0f} ({least / model.dense:.1%} of "
            f"the dense {model.dense:,.0f}). Lower the sparsity, or allow more pruning.")


def _rates(names: Sequence[str], sizes: np.ndarray, kept: np.ndarray) -> dict:
    return {n: float(int(s) - int(k)) / int(s) for n, s, k in zip(names, sizes, kept)}


@_deprecation.keyword_only("cost", "groups")
def uniform_budget(graph: Any, sparsity: float, *, cost: str = "params",
                   groups: Any = None) -> dict:
    """One structured rate for every group, the smallest meeting a cost budget.

    The keep fraction ``q`` is the largest for which counts
    ``max(1, round(n_g q))`` keep at most ``(1 - sparsity)`` of the dense
    cost (bisection; removing units shrinks producers and consumers, so the
    cost falls faster than ``q``).

    Args:
      graph: the model graph.
      sparsity: the fraction of the dense cost removed.
      cost: ``"params"`` or ``"flops"``.
      groups: which groups (default every prunable one; names, indices or a
        callable ``group -> bool``).

    Returns:
      ``{group name: sparsity}`` for :func:`jaxprune.structured.masks`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 8)), "c": jnp.ones((8, 2))}
      >>> g = jp.graph.trace(lambda p, x: jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]) @ p["c"],
      ...                    p, jnp.ones((1, 4)))
      >>> jp.allocation.uniform_budget(g, 0.75, cost="flops")
      {'a:1': 0.625, 'b:1': 0.625}
    """
    chosen, model = _graph_model(graph, groups, cost)
    target = (1.0 - _concrete(sparsity)) * model.dense
    sizes = np.array([g.size for g in chosen])
    ones = np.ones(len(chosen), np.int64)
    _check_reachable(model, ones, target, sparsity, cost, "one unit per group")
    return _rates([g.name for g in chosen], sizes, _budget.uniform_counts(model, sizes, ones, target))


@_deprecation.keyword_only("cost", "groups", "normalize")
def global_budget(graph: Any, scores: Sequence, sparsity: float, *, cost: str = "params",
                  groups: Any = None, normalize: bool = True) -> dict:
    """Structured rates from one threshold on unit scores, under a cost budget.

    Units are removed in ascending score order (scores divided by their
    group's mean when ``normalize``) until at most ``(1 - sparsity)`` of the
    dense cost is kept; each group keeps at least one unit. With
    ``score="bn_scale"`` this is network slimming's single threshold on
    ``|gamma|`` (Liu et al. 2017, without normalisation).

    Args:
      graph: the model graph.
      scores: from :func:`jaxprune.structured.scores` (aligned with the groups).
      sparsity: the fraction of the dense cost removed.
      cost: ``"params"`` or ``"flops"``.
      groups: which groups (default every prunable one).
      normalize: divide each group's scores by their mean first.

    Returns:
      ``{group name: sparsity}`` for :func:`jaxprune.structured.masks`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 2))}
      >>> g = jp.graph.trace(lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"], p, jnp.ones((1, 4)))
      >>> jp.allocation.global_budget(g, (jnp.array([4.0, 3.0, 2.0, 1.0]), None), 0.5,
      ...                             normalize=False)
      {'a:1': 0.5}

    References:
      Liu et al., "Learning efficient convolutional networks through network
      slimming", ICCV 2017.
    """
    chosen, model = _graph_model(graph, groups, cost)
    target = (1.0 - _concrete(sparsity)) * model.dense
    ones = np.ones(len(chosen), np.int64)
    _check_reachable(model, ones, target, sparsity, cost, "one unit per group")
    vecs = []
    for g in chosen:
        if g.layers:
            raise ValueError(f"global_budget: group {g.name!r} belongs to a scanned stack; "
                             "use uniform_budget or from_sensitivity.")
        v = np.asarray(scores[g.index], np.float64).reshape(-1)
        vecs.append(v / max(float(np.mean(v)), 1e-30) if normalize else v)
    k = _budget.order_counts(model, vecs, ones, target)
    return _rates([g.name for g in chosen], np.array([g.size for g in chosen]), k)


def _graph_model(graph: Any, groups: Any, cost: str) -> tuple:
    _budget.check_kind(cost)
    from jaxprune.graph import choose_groups

    chosen = choose_groups(graph, groups, what="allocation budget")
    return chosen, _budget.graph_model(graph, chosen, cost)

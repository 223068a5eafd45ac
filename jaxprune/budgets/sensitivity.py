"""Layer sensitivity: what a metric does when only one layer is pruned.

:func:`scan` prunes one *layer* at a time (a selected leaf, or a channel
group of the model graph) to every level in ``levels`` and evaluates
``metric_fn(params)``: ``values[l, j] = metric(params with layer l pruned to
levels[j])``. All ``layers x levels`` evaluations run in one jitted call,
batched with ``jax.vmap`` (``jax.lax.map`` over chunks when memory asks).
The :class:`Curves` it returns print as a table, convert to a pytree, plot,
and feed :func:`jaxprune.allocation.from_sensitivity`, which turns them into
per-layer sparsities under a parameter or FLOP budget.

Contribution budgets build the same curves from unit scores instead of
measurements (:func:`from_scores`): the predicted damage of removing a
fraction ``s`` of a layer is the sum of its lowest scores, e.g. the activity
``1 - APoZ`` of the units or their gradient-times-activation
(:func:`unit_stats`). :func:`adaptive` re-measures the curves inside every
mask update of :func:`jaxprune.prune` and re-solves the budget.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxprune as jp
  >>> k1, k2 = jax.random.split(jax.random.key(0))
  >>> params = {"a": jax.random.normal(k1, (4, 16)), "c": jax.random.normal(k2, (16, 3))}
  >>> x = jnp.ones((8, 4))
  >>> metric = lambda p: jnp.mean((jnp.tanh(x @ p["a"]) @ p["c"]) ** 2)
  >>> curves = jp.sensitivity.scan(metric, params, levels=(0.5, 0.9))
  >>> curves.names, curves.values.shape
  (('a', 'c'), (2, 2))

References:
  Han et al., "Learning both weights and connections for efficient neural
  networks", NeurIPS 2015 (per-layer sensitivity); Hu et al., "Network
  trimming", 2016 (APoZ); Molchanov et al., "Pruning convolutional neural
  networks for resource efficient inference", ICLR 2017 (Taylor).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _deprecation
from jaxprune.budgets import cost as _budget
from jaxprune.core import select as _select
from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree
from jaxprune.graph import ModelGraph, choose_groups
from jaxprune.graph import sites as _sites

# jp.tree.select is jp.tree.flags on the vocabulary branch.
_flags = getattr(_tree, "flags", None) or _tree.select

__all__ = ["LEVELS", "Curves", "adaptive", "from_scores", "plot", "scan", "unit_stats"]

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
GRANULARITIES = ("leaf", "group")


# --------------------------------------------------------------------------
# Curves


@dataclass(frozen=True, eq=False)
class Curves:
    """Per-layer sensitivity curves.

    Attributes:
      granularity: ``"leaf"`` (unstructured) or ``"group"`` (units).
      names: layer names (leaf paths, or group names).
      levels: ``(S,)`` sparsities (fraction of weights or units removed).
      values: ``(L, S)`` metric with only layer ``l`` pruned to ``levels[s]``.
      base: the metric of the unpruned parameters.
      sizes: ``(L,)`` weights (leaf) or units per layer (group).
      kept: ``(L, S)`` weights or units each evaluation kept.
      higher_is_better: whether a larger metric is better (accuracy).
      models: cost models by kind (``"params"``, ``"flops"`` where known).
      index: leaf or group index of each layer.
      treedef: structure of the scanned parameters (for :meth:`tree`).
      seconds: wall time of the scan; evaluations: ``metric_fn`` calls.
    """

    granularity: str
    names: tuple
    levels: np.ndarray
    values: np.ndarray
    base: float
    sizes: np.ndarray
    kept: np.ndarray
    higher_is_better: bool = False
    models: dict = field(default_factory=dict, repr=False)
    index: tuple = ()
    treedef: Any = None
    seconds: float = 0.0
    evaluations: int = 0

    def damage(self) -> np.ndarray:
        """``(L, S + 1)`` metric loss against ``base`` (worse is larger), with
        a first column of zeros for nothing removed."""
        d = self.base - self.values if self.higher_is_better else self.values - self.base
        return np.concatenate([np.zeros((len(self.names), 1)), d], axis=1)

    def removed(self) -> np.ndarray:
        """``(L, S + 1)`` weights or units removed at each point (first column 0)."""
        return np.concatenate([np.zeros((len(self.names), 1), np.int64),
                               self.sizes[:, None] - self.kept], axis=1)

    def model(self, cost: str) -> _budget.CostModel:
        """The cost model of ``cost`` (``"params"`` or ``"flops"``)."""
        _budget.check_kind(cost)
        if cost not in self.models:
            raise ValueError(f"these curves have no {cost!r} cost model: leaf curves count "
                             "FLOPs only when scanned with graph= (the model graph gives each "
                             "kernel's MACs). Pass graph=jp.graph.trace(apply_fn, params, x).")
        return self.models[cost]

    def cost(self, budget: Any, cost: str = "params") -> float:
        """The fraction of the dense cost that a budget keeps.

        Args:
          budget: per-layer sparsities: ``{name: sparsity}`` (missing layers
            dense) or a tree from :func:`jaxprune.allocation.from_sensitivity`.
          cost: ``"params"`` or ``"flops"``.
        """
        rates = _rates_by_name(self, budget)
        kept = np.array([_keep(self, n, rates.get(name, 0.0))
                         for n, name in zip(self.sizes, self.names)])
        model = self.model(cost)
        return float(model(kept) / model.dense)

    def tree(self) -> PyTree:
        """The curves as a pytree: for leaf curves, the scanned parameters'
        structure with a ``(S,)`` array at every scanned leaf (``None``
        elsewhere); for group curves, ``{group name: (S,) array}``."""
        if self.granularity == "group":
            return dict(zip(self.names, self.values))
        out: list = [None] * self.treedef.num_leaves
        for i, v in zip(self.index, self.values):
            out[i] = v
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def table(self) -> str:
        """A table: one row per layer, the metric at every level."""
        w = max([len(n) for n in self.names] + [5])
        head = f"{'layer':<{w}}  {'size':>8}  " + "  ".join(f"{s:>7.0%}" for s in self.levels)
        lines = [f"base metric {self.base:.4g} ({self.granularity} curves)", head]
        for n, size, row in zip(self.names, self.sizes, self.values):
            lines.append(f"{n:<{w}}  {int(size):>8}  " + "  ".join(f"{v:>7.4g}" for v in row))
        return "\n".join(lines)

    __str__ = table

    def plot(self, ax: Any = None, path: str | None = None) -> Any:
        """Plots the curves (see :func:`plot`)."""
        return plot(self, ax=ax, path=path)


def _keep(curves: Curves, n: int, s: float) -> int:
    k = _select.keep_count(int(n), float(s))
    return max(k, 1) if curves.granularity == "group" else k


def _rates_by_name(curves: Curves, budget: Any) -> dict:
    if isinstance(budget, dict) and set(budget) <= set(curves.names):
        return {k: float(v) for k, v in budget.items()}
    leaves = jax.tree_util.tree_leaves(budget)
    if curves.granularity == "leaf" and len(leaves) == curves.treedef.num_leaves:
        return {name: float(leaves[i]) for name, i in zip(curves.names, curves.index)}
    raise ValueError(f"budget matches neither the layer names {list(curves.names)[:8]} nor "
                     "the scanned parameters' structure.")


@_deprecation.keyword_only("ax", "path")
def plot(curves: Curves, *, ax: Any = None, path: str | None = None) -> Any:
    """Plots metric against sparsity, one line per layer.

    Args:
      curves: from :func:`scan` or :func:`from_scores`.
      ax: a matplotlib axes (a new figure if ``None``).
      path: if given, the figure is saved there.

    Returns:
      The axes.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6, 4))
    x = np.concatenate([[0.0], curves.levels])
    for name, row in zip(curves.names, curves.values):
        ax.plot(x, np.concatenate([[curves.base], row]), marker="o", ms=3, label=name)
    ax.set_xlabel("sparsity of the layer (others dense)")
    ax.set_ylabel("metric")
    ax.legend(fontsize=6)
    if path:
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    return ax


# --------------------------------------------------------------------------
# Layers: which leaves or groups are scanned, and their masked parameters


@dataclass(frozen=True, eq=False)
class _Layers:
    granularity: str
    names: tuple
    sizes: np.ndarray
    index: tuple  # leaf indices (leaf) or group indices (group)
    ranks: tuple  # per layer: int32 rank of every weight / unit (0 = best)
    treedef: Any
    graph: Any = None


def _rank(scores: Any) -> Any:
    """Rank of every entry (0 = largest; ties to the lower index; NaN last).
    NumPy on the host for concrete scores (no compile per shape), else JAX."""
    if isinstance(scores, jax.core.Tracer):
        order = jnp.argsort(~_select.sortable_key(scores), stable=True)
        return jnp.zeros(order.shape, jnp.int32).at[order].set(
            jnp.arange(order.shape[0], dtype=jnp.int32))
    order = np.argsort(~_np_key(np.asarray(scores, np.float32)), kind="stable")
    rank = np.empty(order.shape, np.int32)
    rank[order] = np.arange(order.shape[0], dtype=np.int32)
    return rank


def _np_key(x: np.ndarray) -> np.ndarray:
    """:func:`jaxprune.select.sortable_key` in NumPy."""
    bits = x.view(np.uint32)
    key = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
    key = np.where(key == np.uint32(0x7FFFFFFF), np.uint32(0x80000000), key)
    return np.where(np.isnan(x), np.uint32(0), key).astype(np.uint32)


def _leaf_layers(params: PyTree, where: Any, scores: PyTree | None) -> _Layers:
    paths, leaves, treedef = _tree.flatten(params)
    sel = _flags(params, where)
    idx = tuple(i for i, s in enumerate(sel) if s and np.size(leaves[i]))
    if not idx:
        raise ValueError("sensitivity: where= selects no non-empty leaf to scan.")
    sc = leaves if scores is None else jax.tree_util.tree_leaves(scores)
    if len(sc) != len(leaves):
        raise ValueError(f"sensitivity: scores have {len(sc)} leaves, params {len(leaves)}; "
                         "pass scores with the structure of params.")
    ranks = tuple(_rank(_flat(sc[i], abs_=scores is None)) for i in idx)
    return _Layers("leaf", tuple(paths[i] for i in idx),
                   np.array([np.size(leaves[i]) for i in idx], np.int64), idx, ranks, treedef)


def _flat(x: Any, abs_: bool) -> Any:
    xp = jnp if isinstance(x, jax.core.Tracer) else np
    x = xp.ravel(xp.asarray(x, xp.float32))
    return xp.abs(x) if abs_ else x


def _rows_of(scores: Any, g: Any) -> list:
    xp = jnp if isinstance(scores, jax.core.Tracer) else np
    x = xp.asarray(scores, xp.float32).reshape(g.layers or 1, g.size)
    return [x[i] for i in range(x.shape[0])]


def _stack(rows: list) -> Any:
    return jnp.stack(rows) if isinstance(rows[0], jax.core.Tracer) else np.stack(rows)


def _group_layers(graph: ModelGraph, params: PyTree, where: Any, scores: Any) -> _Layers:
    from jaxprune.structured import units as structured

    groups = choose_groups(graph, where, what="sensitivity")
    sc = structured.scores(graph, params, "l2") if scores is None else scores
    ranks = tuple(_stack([_rank(row) for row in _rows_of(sc[g.index], g)]) for g in groups)
    return _Layers("group", tuple(g.name for g in groups),
                   np.array([g.size for g in groups], np.int64),
                   tuple(g.index for g in groups), ranks, graph.treedef, graph)


def _masked(layers: _Layers, ranks: tuple, params: PyTree, kept: jax.Array) -> PyTree:
    """``params`` with layer ``l`` pruned to its ``kept[l]`` best entries."""
    if layers.granularity == "leaf":
        leaves = list(jax.tree_util.tree_leaves(params))
        for li, i in enumerate(layers.index):
            x = leaves[i]
            keep = (ranks[li] < kept[li]).reshape(np.shape(x))
            leaves[i] = jnp.where(keep, x, jnp.zeros((), jnp.result_type(x)))
        return jax.tree_util.tree_unflatten(layers.treedef, leaves)
    from jaxprune.structured.units import leaf_masks

    units = {i: ranks[li] < kept[li] if layers.graph.groups[i].layers
             else ranks[li][0] < kept[li] for li, i in enumerate(layers.index)}
    masks = _arrays_of(layers.graph, leaf_masks(layers.graph, units))
    _, leaves, treedef = _tree.flatten(params)
    static = dict(layers.graph.static)
    arrays = iter(masks)
    out = [x if i in static else _mask_leaf(x, next(arrays)) for i, x in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _mask_leaf(x: Any, m: Any) -> Any:
    """A scalar mask leaves ``x`` as it is (keys, counters, unpruned leaves)."""
    return x if np.ndim(m) == 0 else jnp.where(m, x, jnp.zeros((), jnp.result_type(x)))


def _arrays_of(graph: ModelGraph, tree: PyTree) -> list:
    static = dict(graph.static)
    return [x for i, x in enumerate(jax.tree_util.tree_leaves(tree)) if i not in static]


# --------------------------------------------------------------------------
# Batched evaluation


def check_metric(metric_fn: Callable, params: PyTree) -> None:
    """Raises a clear error unless ``metric_fn(params)`` is a real scalar."""
    if not callable(metric_fn):
        raise TypeError(f"metric_fn must be a callable params -> scalar, got "
                        f"{type(metric_fn).__name__}.")
    arrays, rest = _tree.split_arrays(params)  # non-array leaves (Equinox) pass through
    out = jax.eval_shape(lambda a: metric_fn(_tree.merge_arrays(rest, a)), arrays)
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.number) \
            or jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(f"metric_fn must return a real scalar (e.g. the loss or accuracy on "
                         f"a held-out batch); it returned {out}. Reduce it, e.g. with "
                         ".mean().")


def _row_bytes(metric_fn: Callable, params: PyTree) -> int:
    """Rough bytes of one evaluation: the parameters plus every intermediate."""
    arrays, rest = _tree.split_arrays(params)
    pbytes = sum(np.size(x) * x.dtype.itemsize for x in arrays)  # typed keys have one too
    jaxpr = jax.make_jaxpr(lambda a: metric_fn(_tree.merge_arrays(rest, a)))(arrays).jaxpr
    return int(pbytes + _jaxpr_bytes(jaxpr))


def _jaxpr_bytes(jaxpr: Any) -> int:
    return sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize
               for _, eqn in _sites.equations(jaxpr) for v in eqn.outvars
               if hasattr(v.aval, "shape"))


def batch_size_for(metric_fn: Callable, params: PyTree, rows: int,
                   max_bytes: int = 1 << 30) -> int:
    """How many evaluations to batch at once under ``max_bytes`` of memory."""
    return int(np.clip(max_bytes // max(_row_bytes(metric_fn, params), 1), 1, rows))


_EVALUATORS: OrderedDict = OrderedDict()


def evaluator(metric_fn: Callable, layers: _Layers, batch_size: int) -> Callable:
    """``(params, kept (R, L)) -> (R,)`` metrics, jitted, ``batch_size`` rows
    vmapped at a time. The compiled function is cached per metric, layers and
    batch size (the ranks are an argument), so repeated scans of the same
    model (adaptive budgets) compile once."""
    key = (metric_fn, layers.granularity, layers.index, layers.treedef,
           id(layers.graph), int(batch_size))
    if key not in _EVALUATORS:
        def run(arrays, ranks, kept, rest):
            params = _tree.merge_arrays(rest, arrays)

            def one(k):
                return jnp.asarray(metric_fn(_masked(layers, ranks, params, k)), jnp.float32)

            return jax.lax.map(one, kept, batch_size=min(batch_size, kept.shape[0]))

        # the graph kept alive with its id; non-array leaves are static arguments
        _EVALUATORS[key] = (jax.jit(run, static_argnums=3), layers.graph)
        while len(_EVALUATORS) > 8:
            _EVALUATORS.popitem(last=False)
    fn = _EVALUATORS[key][0]

    def evaluate(params, kept):
        arrays, rest = _tree.split_arrays(params)
        return fn(arrays, layers.ranks, kept, rest)

    return evaluate


# --------------------------------------------------------------------------
# scan


def check_levels(levels: Any) -> np.ndarray:
    """Validated levels: a 1-D, strictly increasing array in [0, 1]."""
    try:
        arr = np.asarray(levels, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"levels must be a sequence of numbers in [0, 1], got {levels!r}.") \
            from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"levels must be a non-empty 1-D sequence of sparsities, got {levels!r}"
                         " (e.g. levels=(0.25, 0.5, 0.75)).")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"levels must lie in [0, 1] (fractions removed), got {levels!r}.")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"levels must be strictly increasing, got {levels!r}; sort them "
                         "and drop repeats.")
    return arr


@_deprecation.keyword_only("levels", "where", "granularity", "graph")
def scan(metric_fn: Callable[[PyTree], Any], params: PyTree, *,
         levels: Sequence[float] = LEVELS, where: Any = None, groups: Any = None,
         granularity: str = "leaf", graph: ModelGraph | None = None, scores: Any = None,
         higher_is_better: bool = False, batch_size: int | None = None,
         max_bytes: int = 1 << 30) -> Curves:
    """Sensitivity curves: the metric with one layer at a time pruned to each level.

    ``values[l, j] = metric_fn(params with only layer l pruned to levels[j])``.
    A leaf keeps its ``round(n (1 - s))`` largest-magnitude weights (exactly
    :func:`jaxprune.masks.topk`); a group keeps its ``max(1, round(n (1 -
    s)))`` best units by L2 group norm, every member zeroed as
    :func:`jaxprune.structured.masks` does. The ``layers x levels``
    evaluations (and the unpruned one) run in one jitted call:
    ``jax.lax.map`` over chunks of ``batch_size`` rows, each chunk vmapped.

    Args:
      metric_fn: ``params -> scalar`` (e.g. loss or accuracy on a held-out
        batch); pure JAX, as it is vmapped.
      params: the parameters (for ``"group"``, the variables the graph traced).
      levels: sparsities to test, strictly increasing in ``[0, 1]``.
      where: leaf granularity: which leaves (as everywhere; default
        :func:`jaxprune.tree.is_kernel`).
      groups: group granularity: which groups (as everywhere, see
        :func:`jaxprune.graph.choose_groups`; default every prunable one
        but head dims).
      granularity: ``"leaf"`` (unstructured) or ``"group"`` (units).
      graph: the model graph (required for ``"group"``; for ``"leaf"`` it
        adds the ``"flops"`` cost model).
      scores: what ranks the weights or units (default magnitude, or group
        L2 norms): a tree like ``params``, or a tuple from
        :func:`jaxprune.structured.scores`.
      higher_is_better: ``True`` for accuracy-like metrics.
      batch_size: evaluations vmapped at once (default: as many as fit in
        ``max_bytes``, estimated from the parameters and the metric's
        intermediates).
      max_bytes: memory budget of one batch.

    Returns:
      :class:`Curves`.

    Raises:
      ValueError: bad levels, an unknown granularity, a missing graph, or a
        metric that is not a scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxprune as jp
      >>> params = {"a": jnp.arange(1.0, 9.0).reshape(2, 4), "c": jnp.ones((4, 2))}
      >>> metric = lambda p: jnp.sum(jnp.ones((1, 2)) @ p["a"] @ p["c"])
      >>> c = jp.sensitivity.scan(metric, params, levels=(0.5, 1.0))
      >>> c.base, c.values.tolist()
      (72.0, [[52.0, 0.0], [28.0, 0.0]])

    References:
      Han et al., "Learning both weights and connections for efficient
      neural networks", NeurIPS 2015.
    """
    t0 = time.perf_counter()
    lv = check_levels(levels)
    layers = layers_of(params, granularity=granularity, graph=graph, scores=scores,
                       where=where, groups=groups, what="sensitivity.scan")
    check_metric(metric_fn, params)
    kept = np.array([[_select.keep_count(int(n), float(s)) for s in lv] for n in layers.sizes],
                    np.int64)
    if granularity == "group":
        kept = np.maximum(kept, 1)
    rows = _rows(layers.sizes, kept)
    b = batch_size or batch_size_for(metric_fn, params, len(rows), max_bytes)
    vals = np.asarray(evaluator(metric_fn, layers, int(b))(params, jnp.asarray(rows, jnp.int32)))
    return Curves(granularity, layers.names, lv, vals[1:].reshape(kept.shape).astype(np.float64),
                  float(vals[0]), layers.sizes, kept, bool(higher_is_better),
                  cost_models(layers, params, graph), layers.index, layers.treedef,
                  time.perf_counter() - t0, len(rows))


def layers_of(params: PyTree, *, granularity: str, graph: ModelGraph | None, scores: Any,
              where: Any, groups: Any, what: str) -> _Layers:
    """The layers that ``scan`` and ``jp.search`` budget: leaves chosen by
    ``where=`` or graph groups chosen by ``groups=``, with their ranks."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if granularity == "group":
        if graph is None:
            raise ValueError("granularity='group' needs graph=jp.graph.trace(apply_fn, "
                             "params, x): the groups are the graph's channel groups.")
        return _group_layers(graph, params, group_selection(where, groups, what), scores)
    if groups is not None:
        raise ValueError(f"{what}: groups= chooses graph groups (granularity='group'); with "
                         "granularity='leaf' choose leaves with where=.")
    return _leaf_layers(params, where, scores)


def group_selection(where: Any, groups: Any, what: str) -> Any:
    """``groups=``, or a ``where=`` that selected groups before 0.2 (warns)."""
    if where is None:
        return groups
    if groups is not None:
        raise ValueError(f"{what}: where= selects leaves and groups= selects groups; pass "
                         "only groups= for group curves.")
    _deprecation.warn(f"jp.{what}(where=...) choosing groups", f"jp.{what}(groups=...)",
                      stacklevel=4)
    return where


def _rows(sizes: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The unpruned row, then one row per (layer, level)."""
    n_layers, n_levels = kept.shape
    rows = np.tile(sizes, (1 + n_layers * n_levels, 1))
    for li in range(n_layers):
        rows[1 + li * n_levels:1 + (li + 1) * n_levels, li] = kept[li]
    return rows


def cost_models(layers: _Layers, params: PyTree, graph: ModelGraph | None) -> dict:
    """Cost models (``"params"``, ``"flops"`` where known) of ``layers``."""
    if layers.granularity == "group":
        groups = [graph.groups[i] for i in layers.index]
        return {k: _budget.graph_model(graph, groups, k) for k in _budget.COSTS}
    out = {"params": _budget.linear_model(layers.sizes, np.ones(len(layers.sizes)), "params")}
    if graph is not None:
        paths = _tree.paths(params)
        macs = []
        for i in layers.index:
            try:
                macs.append(graph.leaf(paths[i]).macs)
            except KeyError:
                raise ValueError(f"sensitivity: leaf {paths[i]!r} is not in the graph; trace "
                                 "the graph on these params.") from None
        out["flops"] = _budget.linear_model(layers.sizes, np.array(macs) / layers.sizes, "flops")
    return out


# --------------------------------------------------------------------------
# Curves from scores (contribution and activation budgets)


@_deprecation.keyword_only("levels", "where", "graph")
def from_scores(scores: Any, params: PyTree | None = None, *, levels: Sequence[float] = LEVELS,
                where: Any = None, groups: Any = None,
                graph: ModelGraph | None = None) -> Curves:
    """Predicted-damage curves from importance scores (larger = more important).

    The damage of removing a fraction ``s`` of a layer is the sum of its
    ``n - round(n (1 - s))`` lowest scores: for gradient-times-activation
    (Taylor) scores, the first-order loss increase (Molchanov et al. 2017);
    for the activity ``1 - APoZ``, the expected number of active outputs
    lost (Hu et al. 2016). The result plugs into
    :func:`jaxprune.allocation.from_sensitivity` like measured curves.

    Args:
      scores: unit scores aligned with ``graph.groups`` (a tuple, as from
        :func:`jaxprune.structured.scores` or :func:`unit_stats`; group
        curves), or a tree like ``params`` (leaf curves, e.g.
        ``jp.scores.saliency(params, grads)``).
      params: the parameters (leaf curves only).
      levels: sparsities at which the curves are tabulated.
      where: which leaves (leaf curves; as in :func:`scan`).
      groups: which groups (group curves; as in :func:`scan`).
      graph: the model graph (required for group curves).

    Returns:
      :class:`Curves` with ``base = 0`` and ``values`` the predicted damage.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
      >>> jp.sensitivity.from_scores(params, params, levels=(0.5,)).values.tolist()
      [[3.0]]
    """
    lv = check_levels(levels)
    group = isinstance(scores, (tuple, list)) and graph is not None
    if group:
        chosen = choose_groups(graph, group_selection(where, groups, "sensitivity.from_scores"),
                               what="sensitivity.from_scores")
        vecs = []
        for g in chosen:
            if scores[g.index] is None:
                raise ValueError(f"from_scores: group {g.name!r} has no scores.")
            vecs.append(np.asarray(scores[g.index], np.float64).reshape(g.layers or 1, g.size))
        layers = _Layers("group", tuple(g.name for g in chosen),
                         np.array([g.size for g in chosen], np.int64),
                         tuple(g.index for g in chosen), (), graph.treedef, graph)
    else:
        if params is None:
            raise ValueError("from_scores: leaf curves need params= (for their structure); "
                             "group curves need graph= and a tuple of unit scores.")
        layers = _leaf_layers(params, where, scores)
        leaves = jax.tree_util.tree_leaves(scores)
        vecs = [np.asarray(leaves[i], np.float64).reshape(1, -1) for i in layers.index]
    kept = np.array([[_select.keep_count(int(n), float(s)) for s in lv] for n in layers.sizes])
    if group:
        kept = np.maximum(kept, 1)
    values = np.array([[np.sort(v, axis=1)[:, :n - k].sum() for k in row]
                       for v, n, row in zip(vecs, layers.sizes, kept)])
    return Curves(layers.granularity, layers.names, lv, values, 0.0, layers.sizes, kept, False,
                  cost_models(layers, params, graph), layers.index, layers.treedef)


def unit_stats(graph: ModelGraph, apply_fn: Callable, variables: PyTree, *args: Any,
               loss_fn: Callable | None = None) -> dict:
    """Activation statistics of every unit, read at the inputs of its consumers.

    For each prunable group, the inputs of the kernels that read its units
    (dense and convolution inputs) give per unit:

    * ``"apoz"``: the average percentage of zeros (Hu et al. 2016), the mean
      of ``x == 0`` over the batch and positions;
    * ``"activity"``: ``1 - apoz``;
    * ``"taylor"`` (with ``loss_fn``): ``mean_b |sum_p x * dL/dx|``, the
      first-order loss change of removing the unit on example ``b``
      (Molchanov et al. 2017), summed over the unit's positions ``p`` and its
      consumers before the absolute value.

    Axis 0 of every activation is taken as the batch axis.

    Args:
      graph: the model graph of ``apply_fn`` on ``variables``.
      apply_fn: ``(variables, *args) -> outputs``.
      variables: the variables the graph traced.
      *args: a batch of inputs.
      loss_fn: ``outputs -> scalar`` loss (for ``"taylor"``).

    Returns:
      ``{"apoz": tuple, "activity": tuple[, "taylor": tuple]}``, each tuple
      aligned with ``graph.groups`` (a ``(size,)`` array per prunable group
      whose consumers were found, ``None`` otherwise).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"a": jnp.array([[1.0, -1.0, 2.0]]), "b": jnp.ones((3, 1))}
      >>> f = lambda p, x: jax.nn.relu(x @ p["a"]) @ p["b"]
      >>> x = jnp.array([[1.0], [-1.0]])
      >>> g = jp.graph.trace(f, p, x)
      >>> jp.sensitivity.unit_stats(g, f, p, x)["apoz"][0].tolist()
      [0.5, 0.5, 0.5]

    References:
      Hu et al., "Network trimming: a data-driven neuron pruning approach
      towards efficient deep architectures", 2016; Molchanov et al., ICLR
      2017.
    """
    from jaxprune.budgets import _activations

    return _activations.unit_stats(graph, apply_fn, variables, args, loss_fn)


# --------------------------------------------------------------------------
# Adaptive budgets


@_deprecation.keyword_only("levels", "where")
def adaptive(metric_fn: Callable[[PyTree], Any], *, levels: Sequence[float] = LEVELS,
             where: Any = None, higher_is_better: bool = False,
             batch_size: int | None = None) -> Callable:
    """An allocation for :func:`jaxprune.prune` that re-measures and re-solves.

    At every mask update the returned ``(params, sparsity) -> tree`` scans
    the current parameters (as :func:`scan` with ``granularity="leaf"``,
    inside the jitted update) and solves the budget on the fresh curves (as
    :func:`jaxprune.allocation.from_sensitivity` with ``cost="params"``):
    layers that training made robust take more of the sparsity, fragile ones
    less. This differs from ``allocation="global"``, whose one magnitude
    threshold ignores how the metric reacts.

    Args:
      metric_fn: ``params -> scalar`` on a held-out batch (closed over).
      levels: sparsities scanned at each update.
      where: which leaves are measured (use the ``where=`` of ``prune``).
      higher_is_better: ``True`` for accuracy-like metrics.
      batch_size: evaluations vmapped at once (default: all).

    Returns:
      A callable ``(params, sparsity) -> tree of per-leaf sparsities``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"a": jax.random.normal(jax.random.key(0), (4, 16)), "c": jnp.ones((16, 2))}
      >>> x = jnp.ones((8, 4))
      >>> metric = lambda p: jnp.mean((x @ p["a"] @ p["c"]) ** 2)
      >>> alloc = jp.sensitivity.adaptive(metric, levels=(0.25, 0.5, 0.75))
      >>> tx = jp.prune(optax.sgd(0.0), sparsity=0.5, allocation=alloc, update_every=1)
      >>> u, s = jax.jit(tx.update)(params, tx.init(params), params)
      >>> m = jp.get_masks(s)
      >>> int(m["a"].sum() + m["c"].sum())
      48
    """
    lv = check_levels(levels)

    def alloc(params, sparsity):
        check_metric(metric_fn, params)
        layers = _leaf_layers(params, where, None)
        kept = np.array([[_select.keep_count(int(n), float(s)) for s in lv]
                         for n in layers.sizes])
        rows = _rows(layers.sizes, kept)
        ev = evaluator(metric_fn, layers, batch_size or len(rows))
        vals = ev(params, jnp.asarray(rows, jnp.int32))
        base, v = vals[0], vals[1:].reshape(kept.shape)
        dmg = (base - v) if higher_is_better else (v - base)
        dmg = jnp.concatenate([jnp.zeros((len(kept), 1)), dmg], axis=1)
        removed = np.concatenate([np.zeros((len(kept), 1), np.int64),
                                  layers.sizes[:, None] - kept], axis=1)
        total = int(layers.sizes.sum())
        target = total - _select.keep_count(total, sparsity)
        r = _budget.linear_solve(removed, dmg, np.ones(len(kept)), target, exact=True)
        out: list = [jnp.float32(0.0)] * layers.treedef.num_leaves
        for li, i in enumerate(layers.index):
            out[i] = r[li].astype(jnp.float32) / np.float32(layers.sizes[li])
        return jax.tree_util.tree_unflatten(layers.treedef, out)

    return alloc

"""Calibration: statistics of the inputs of every kernel, read from the jaxpr.

:func:`calibrate` runs a model over calibration batches and accumulates, for
every selected kernel, statistics of the activations it multiplies: the
sum of squares of every input feature, the number of rows, and optionally
the Gram matrix ``X^T X``. Activation-aware pruning (Wanda, SparseGPT, OWL
in :mod:`jaxprune.oneshot` and :func:`jaxprune.allocation.owl`) starts from
them.

How: ``apply_fn(params, batch)`` is traced to a jaxpr once per batch shape.
The graph's reader (:mod:`jaxprune.graph.sites`) follows every kernel leaf
(through casts, reshapes, transposes, calls such as ``jit``, ``remat``,
``custom_jvp``/``custom_vjp``, and the slices of a ``scan`` over stacked
layers) to the ``dot_general`` and ``conv_general_dilated`` equations
that read it: these are the *sites*. The jaxpr is then re-evaluated
(:func:`jaxprune.graph.sites.run`, with this module's :class:`StatsHook`)
returning also the statistics of the other operand at every site (inside
a layer ``scan``, per layer, as extra stacked outputs), under one
:func:`jax.jit` per batch shape; the accumulated statistics are the only
state, so memory does not grow with the number of batches and no
activation is kept.

Stats format: a ``dict`` from the kernel's ``"/"``-joined key path (as
:func:`jaxprune.tree.paths` spells it) to an :class:`InputStats`:

* ``sumsq``: ``sum over rows of x_j ** 2`` for every input feature ``j``,
  shaped like the kernel's input axes (``(in,)`` for a Dense ``(in, out)``
  kernel; ``(h, d)`` for an attention output kernel ``(h, d, out)``;
  ``(kh, kw, in)`` for a conv kernel ``(kh, kw, in, out)``); a stacked kernel
  ``(L, in, out)`` has ``(L, in)``.
* ``count``: the number of rows (tokens, pixels) accumulated: an int32
  scalar, ``(L,)`` for a stacked kernel.
* ``gram``: ``sum over rows of x x^T`` over the flattened input features
  (row-major over the input axes), ``(d, d)`` or ``(L, d, d)``; ``None``
  unless ``gram=True``.
* static fields: ``shape`` (the kernel's), ``in_axes`` and ``out_axes``
  (axes of the kernel, the layer axis excluded), ``layers`` (``L`` or
  ``None``), ``point`` (kernels with the same ``point`` read the same input,
  e.g. q, k and v, or gate and up) and ``stack`` (which layer ``scan``
  slices it, or ``None``).

A kernel read by several dots (shared weights) accumulates every use.

Example:
  >>> import jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"w": jnp.ones((3, 2))}
  >>> batches = [jnp.array([[1.0, 2.0, 0.0]]), jnp.array([[3.0, 0.0, 0.0]])]
  >>> stats = jp.calibrate(lambda p, x: x @ p["w"], params, batches)
  >>> stats["w"].sumsq.tolist(), int(stats["w"].count)
  ([10.0, 4.0, 0.0], 2)

References:
  Sun et al., "A simple and effective pruning approach for large language
  models" (Wanda), ICLR 2024; Frantar & Alistarh, "SparseGPT: massive
  language models can be accurately pruned in one-shot", ICML 2023.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree
from jaxprune.graph import sites as _sites

__all__ = ["InputStats", "calibrate"]


# --------------------------------------------------------------------------
# The stats


@dataclasses.dataclass(frozen=True)
class InputStats:
    """Statistics of the inputs of one kernel (see the module docstring).

    Attributes:
      sumsq: per input feature, the sum of squares over all rows.
      count: rows accumulated (int32; per layer for a stacked kernel).
      gram: ``X^T X`` over the flattened input features, or ``None``.
      shape: the kernel's shape.
      in_axes: the kernel's input (contracted) axes.
      out_axes: its output axes.
      layers: the length of its layer axis (axis 0) if stacked, else ``None``.
      point: kernels sharing a ``point`` read the same input.
      stack: the layer ``scan`` that slices it (an index), else ``None``.
    """

    sumsq: jax.Array
    count: jax.Array
    gram: jax.Array | None
    shape: tuple = ()
    in_axes: tuple = ()
    out_axes: tuple = ()
    layers: int | None = None
    point: int = 0
    stack: int | None = None

    def norm(self) -> jax.Array:
        """``||X_j||_2`` per input feature (Wanda's activation norm)."""
        return jnp.sqrt(self.sumsq)

    @property
    def feature_shape(self) -> tuple:
        """The kernel's shape with its output axes set to 1 (``sumsq`` reshaped
        to it broadcasts against the kernel)."""
        lead = 1 if self.layers else 0
        shape = [1] * len(self.shape)
        if lead:
            shape[0] = self.shape[0]
        for a in self.in_axes:
            shape[a + lead] = self.shape[a + lead]
        return tuple(shape)

    def expanded(self, x: jax.Array) -> jax.Array:
        """A per-input-feature array broadcast against the kernel (size-1 out axes)."""
        return jnp.reshape(x, self.feature_shape)


jax.tree_util.register_dataclass(
    InputStats, data_fields=["sumsq", "count", "gram"],
    meta_fields=["shape", "in_axes", "out_axes", "layers", "point", "stack"])


# --------------------------------------------------------------------------
# The hook: statistics of a site's input


class StatsHook:
    """The :class:`jaxprune.graph.sites.Hook` of calibration: at every site,
    ``sumsq``, ``count`` (and ``gram``) of the kernel's input rows, keyed by
    the kernel (a kernel read twice sums both reads). Kernels reading one
    activation the same way share its statistics."""

    def __init__(self, found: _sites.Sites, gram: bool):
        self.found, self.gram = found, gram
        self.memo: dict = {}

    def key(self, s: _sites.Site) -> int:
        return s.leaf

    def tap(self, s: _sites.Site, x: jax.Array) -> tuple[jax.Array, dict]:
        memo = (id(x), s.kind, s.kernel_pos, id(s.perm) if s.perm is None else s.perm.tobytes(),
                self._dims(s))
        if memo not in self.memo:  # kernels reading one input share its statistics
            self.memo[memo] = (x, self._stats(s, x))  # x kept alive: its id stays unique
        return x, self.memo[memo][1]

    def zeros(self, s: _sites.Site, lead: tuple) -> dict:
        d = int(np.prod(s.in_shape))
        out = {"sumsq": jnp.zeros(lead + s.in_shape, jnp.float32),
               "count": jnp.zeros(lead, jnp.int32)}
        if self.gram:
            out["gram"] = jnp.zeros(lead + (d, d), jnp.float32)
        return out

    def _dims(self, s: _sites.Site) -> tuple:
        if s.kind == "dot":
            (lc, rc), _ = self.found.params[s.key]["dimension_numbers"]
            return tuple((lc, rc)[1 - s.kernel_pos])
        return ()

    def _stats(self, s: _sites.Site, x: jax.Array) -> dict:
        prm = self.found.params[s.key]
        if s.kind == "dot":
            lc = self._dims(s)
            free = [a for a in range(x.ndim) if a not in lc]
            rows = jnp.transpose(x, free + list(lc)).reshape(-1, int(np.prod(s.in_shape)))
        else:
            dn = prm["dimension_numbers"]
            kshape = self.found.shapes[s.leaf][len(s.scans):]
            patches = lax.conv_general_dilated_patches(
                x, tuple(kshape[a] for a in dn.rhs_spec[2:]), prm["window_strides"],
                prm["padding"], prm["lhs_dilation"], prm["rhs_dilation"], dn,
                precision=lax.Precision.HIGHEST)
            rows = jnp.moveaxis(patches, dn.out_spec[1], -1).reshape(-1, patches.shape[
                dn.out_spec[1]])
        rows = rows.astype(jnp.float32)
        if s.perm is not None:
            rows = rows[:, s.perm]
        out = {"sumsq": jnp.sum(rows * rows, 0).reshape(s.in_shape),
               "count": jnp.asarray(rows.shape[0], jnp.int32)}
        if self.gram:
            out["gram"] = jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST)
        return out


# --------------------------------------------------------------------------
# The plan: one traced jaxpr (per batch shape) and its sites


@dataclasses.dataclass
class Plan:
    """One traced jaxpr (per batch shape), its sites and its compiled steps."""

    closed: Any
    found: _sites.Sites
    paths: list  # of the array leaves
    steps: dict = dataclasses.field(default_factory=dict)

    @property
    def sites(self) -> list:
        return self.found.sites

    @property
    def shapes(self) -> list:
        return self.found.shapes

    @property
    def scan_lengths(self) -> dict:
        return self.found.scan_lengths

    def leaf_site(self, leaf: int) -> _sites.Site:
        return self.found.of(leaf)

    def leaves(self) -> list[int]:
        return self.found.leaves()

    def step(self, leaves, gram: bool, target=None) -> Callable:
        """Jitted ``step(acc, arrays, batch_leaves, layer) -> acc + taps`` (cached)."""
        key = (tuple(leaves), gram, target)
        if key not in self.steps:
            f = self.tapped(leaves, gram, target)

            def step(acc, arrays, batch, layer):
                return _sites.add_taps(acc, f(arrays, batch, layer))

            self.steps[key] = jax.jit(step, donate_argnums=0)
        return self.steps[key]

    @functools.cached_property
    def pieces(self) -> _sites.Pieces:
        """The top-level equations, for runs from cached activations."""
        return _sites.Pieces(self.closed, len(self.shapes))

    def piece_step(self, leaves, c: int, e: int, keep: tuple) -> Callable:
        """Jitted ``(arrays, batch_leaves, cached) -> (taps, kept)``: the
        equations ``c`` to ``e`` from the activations cached at ``c``, with
        the Gram statistics of ``leaves`` and the values ``keep`` (cached)."""
        key = ("piece", tuple(leaves), c, e, keep)
        if key not in self.steps:
            chosen = [s for s in self.sites if s.leaf in set(leaves)]
            pieces = self.pieces
            piece = pieces.piece(c, e, pieces.live(c), list(keep))

            def step(arrays, batch, cached):
                outs, taps = _sites.run_piece(self.found, pieces, piece,
                                              list(arrays) + list(batch) + list(cached), chosen,
                                              StatsHook(self.found, True))
                return taps, outs

            self.steps[key] = jax.jit(step)
        return self.steps[key]

    def layer_step(self, leaves, c: int, first: bool) -> Callable:
        """Jitted ``(arrays, batch_leaves, cached, carry, layer) -> (outs,
        taps)``: one layer of the layer scan at equation ``c`` (see
        :func:`jaxprune.graph.sites.run_layer`), its input the scan's own
        (``first``) or ``carry``."""
        key = ("layer", tuple(leaves), c, first)
        if key not in self.steps:
            chosen = [s for s in self.sites if s.leaf in set(leaves)]

            def step(arrays, batch, cached, carry, layer):
                return _sites.run_layer(self.found, self.pieces, c,
                                        list(arrays) + list(batch) + list(cached), chosen,
                                        StatsHook(self.found, True), None if first else carry,
                                        layer)

            self.steps[key] = jax.jit(step)
        return self.steps[key]

    def tapped(self, leaves, gram: bool, target=None) -> Callable:
        """``f(arrays, batch_leaves, layer) -> taps`` for ``leaves`` (only
        iteration ``layer`` of the ``target`` scan, if given)."""
        chosen = [s for s in self.sites if s.leaf in set(leaves)]

        def f(arrays, batch, layer=None):
            hook = StatsHook(self.found, gram)
            tgt = None if target is None else (target, layer)
            return _sites.run(self.found, self.closed, list(arrays) + list(batch), chosen, hook,
                              tgt)[1]

        return f


class Model:
    """A model function, the layout of its parameters, and its plans (one
    traced jaxpr per batch shape, each with its compiled steps)."""

    def __init__(self, apply_fn: Callable, params: PyTree, example: Any, where: Any):
        self.apply_fn = apply_fn
        self.paths, leaves, self.treedef = _tree.flatten(params)
        self.array_idx = [i for i, x in enumerate(leaves) if _tree.is_array(x)]
        self.leaves = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) if _tree.is_array(x)
                       else x for x in leaves]  # arrays come with every call
        self.selected = self._select(params, leaves, example, where)
        self.plans: dict = {}
        self.plan(example)

    def arrays_of(self, params: PyTree) -> list:
        """The array leaves of ``params`` (laid out as when the model was built)."""
        leaves = jax.tree_util.tree_leaves(params)
        return [leaves[i] for i in self.array_idx]

    def _select(self, params, leaves, example, where) -> list[int]:
        """Indices (into the array leaves) of the kernels to calibrate."""
        if where is None:
            from jaxprune import graph as _graph

            where = _graph.trace(self.apply_fn, params, example).kernels
        sel = _tree.flags(params, where)
        out = []
        for j, i in enumerate(self.array_idx):
            if sel[i]:
                if not _tree.is_float(leaves[i]):
                    raise TypeError(
                        f"calibrate: leaf {self.paths[i]!r} has dtype "
                        f"{jnp.result_type(leaves[i])}; only floating kernels can be "
                        "calibrated. Exclude it with where=.")
                out.append(j)
        if not out:
            raise ValueError(f"calibrate: where={where!r} selects no array leaf of params "
                             f"(paths: {self.paths[:20]}).")
        return out

    def rebuild(self, arrays: list) -> PyTree:
        full = list(self.leaves)
        for i, x in zip(self.array_idx, arrays):
            full[i] = x
        return _tree.unflatten(self.treedef, full)

    def plan(self, batch: Any) -> Plan:
        leaves, bdef = jax.tree_util.tree_flatten(batch)
        sig = (bdef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        if sig not in self.plans:
            self.plans[sig] = self._make_plan(batch)
        return self.plans[sig]

    def _make_plan(self, batch: Any) -> Plan:
        bleaves, bdef = jax.tree_util.tree_flatten(batch)

        def fn(arrays, bl):
            return self.apply_fn(self.rebuild(arrays), jax.tree_util.tree_unflatten(bdef, bl))

        specs = [self.leaves[i] for i in self.array_idx]
        closed = jax.make_jaxpr(fn)(specs, bleaves)
        shapes = [tuple(x.shape) for x in specs]
        paths = [self.paths[i] for i in self.array_idx]
        found = _sites.find(closed, shapes, self.selected)
        _check_sites(found, paths, self.selected)
        return Plan(closed, found, paths)


_MODELS: dict = {}  # recent models, so that repeated calls reuse their compiled steps
_MODELS_KEPT = 4


def model(apply_fn: Callable, params: PyTree, example: Any, where: Any) -> Model:
    """A :class:`Model`, reused when ``apply_fn``, the parameters' layout and
    ``where`` are the same as in a recent call (as :func:`jax.jit` reuses a
    function's compilations)."""
    paths, leaves, treedef = _tree.flatten(params)
    layout = tuple((np.shape(x), str(jnp.result_type(x))) if _tree.is_array(x) else ("static", x)
                   for x in leaves)
    key = (apply_fn, treedef, layout, where)
    try:
        hash(key)
    except TypeError:  # unhashable where= (a bool tree) or static leaves
        return Model(apply_fn, params, example, where)
    if key not in _MODELS:
        _MODELS[key] = Model(apply_fn, params, example, where)
        while len(_MODELS) > _MODELS_KEPT:
            del _MODELS[next(iter(_MODELS))]
    m = _MODELS.pop(key)
    _MODELS[key] = m  # most recent last
    m.plan(example)
    return m


def _check_sites(w: _sites.Sites, paths: list, selected: list) -> None:
    for s in w.sites:
        if not jnp.issubdtype(s.dtype, jnp.floating):
            raise TypeError(
                f"calibrate: kernel {paths[s.leaf]!r} multiplies an input of dtype "
                f"{s.dtype}; input statistics need floating inputs. Cast the input to "
                "a float dtype in apply_fn, or exclude the kernel with where=.")
    seen = {}
    for s in w.sites:
        first = seen.setdefault(s.leaf, s)
        if (first.in_axes, first.scans) != (s.in_axes, s.scans):
            raise ValueError(
                f"calibrate: kernel {paths[s.leaf]!r} is read with different input axes "
                f"({first.in_axes} and {s.in_axes}) or layer scans; its statistics would "
                "not line up. Exclude it with where=.")
        if len(s.scans) > 1:
            raise ValueError(
                f"calibrate: kernel {paths[s.leaf]!r} is sliced by nested scans; only one "
                "layer axis is supported. Exclude it with where=.")
    missing = [j for j in selected if j not in seen]
    if missing:
        why = "; ".join(f"{paths[j]!r}" + (f" (reaches {', '.join(sorted(set(w.notes[j])))})"
                                           if j in w.notes else "") for j in missing)
        raise ValueError(
            f"calibrate: no dot_general or conv_general_dilated reads these selected kernels "
            f"as a weight, so they have no input statistics: {why}. Select kernels the "
            "graph sees (where=None uses jp.graph.trace(...).kernels), or exclude these "
            "with where=.")


# --------------------------------------------------------------------------
# calibrate


def _batches(batches: Iterable) -> Iterable:
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("calibrate: batches is empty; pass at least one batch.") from None
    return first, itertools.chain([first], it)


def _zeros(model: Model, plan: Plan, gram: bool) -> dict:
    out = {}
    for j in plan.leaves():
        s = plan.leaf_site(j)
        lead = tuple(plan.shapes[j][: len(s.scans)])
        d = int(np.prod(s.in_shape))
        out[j] = {"sumsq": jnp.zeros(lead + s.in_shape, jnp.float32),
                  "count": jnp.zeros(lead, jnp.int32)}
        if gram:
            out[j]["gram"] = jnp.zeros(lead + (d, d), jnp.float32)
    return out


def points(plan: Plan) -> dict:
    """``{leaf: point}``: kernels reading the same set of inputs share a point
    (numbered in the order of their first read)."""
    roots: dict = {}
    for s in plan.sites:
        roots.setdefault(s.leaf, []).append(s.root)
    ids: dict = {}
    out = {}
    for s in plan.sites:
        if s.leaf not in out:
            key = tuple(dict.fromkeys(roots[s.leaf]))
            out[s.leaf] = ids.setdefault(key, len(ids))
    return out


def stacks(plan: Plan) -> dict:
    """``{scan key: index}`` of the scans that slice kernels (layer stacks)."""
    keys = dict.fromkeys(s.scans[0] for s in plan.sites if s.scans)
    return {k: i for i, k in enumerate(keys)}


def to_stats(model: Model, plan: Plan, acc: dict) -> dict:
    """The accumulated taps as ``{path: InputStats}``."""
    pts, stk = points(plan), stacks(plan)
    out = {}
    for j in plan.leaves():
        s = plan.leaf_site(j)
        lead = len(s.scans)
        shape = plan.shapes[j]
        in_axes = s.in_axes
        out_axes = tuple(a for a in range(len(shape) - lead) if a not in in_axes)
        a = acc[j]
        out[plan.paths[j]] = InputStats(
            a["sumsq"], a["count"], a.get("gram"), tuple(shape), in_axes, out_axes,
            shape[0] if lead else None, pts[j], stk[s.scans[0]] if lead else None)
    return out


def calibrate(apply_fn: Callable, params: PyTree, batches: Iterable, *, gram: bool = False,
              where: Any = None) -> dict[str, InputStats]:
    """Input statistics of every kernel over calibration batches.

    For every selected kernel ``W`` and every ``dot_general`` or convolution
    that multiplies it with an activation ``X`` (rows = tokens or pixels,
    columns = the kernel's input features): ``sumsq_j = sum_rows X_j^2``,
    ``count = #rows`` and, with ``gram=True``, ``X^T X``; summed over all
    batches and over every use of the kernel. One jitted step per batch
    shape; its state is the statistics only.

    Args:
      apply_fn: ``(params, batch) -> outputs``: a plain function,
        ``lambda v, x: model.apply(v, x)`` (Linen) or
        ``lambda s, x: nnx.merge(graphdef, s)(x)`` (NNX).
      params: the parameter pytree.
      batches: an iterable of batches (each passed as ``apply_fn(params,
        batch)``; any pytree of arrays).
      gram: also accumulate the Gram matrix of each kernel's inputs.
      where: the kernels to calibrate (see :mod:`jaxprune.tree`); ``None``:
        the kernels of :func:`jaxprune.graph.trace`.

    Returns:
      ``{path: InputStats}`` (see the module docstring).

    Raises:
      ValueError: if ``batches`` is empty, or a selected kernel is read by no
        dot or convolution the walk can follow (with what it reaches instead).
      TypeError: if a selected kernel or its input is not floating.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 1))}
      >>> f = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
      >>> s = jp.calibrate(f, p, [jnp.ones((4, 2))], gram=True)
      >>> s["a"].sumsq.tolist(), s["b"].gram.shape, s["a"].point != s["b"].point
      ([4.0, 4.0], (3, 3), True)

    References:
      Sun et al., "A simple and effective pruning approach for large language
      models", ICLR 2024; Frantar & Alistarh, "SparseGPT", ICML 2023.
    """
    first, all_batches = _batches(batches)
    mdl = model(apply_fn, params, first, where)
    plan = mdl.plan(first)
    acc = _zeros(mdl, plan, gram)
    arrays = mdl.arrays_of(params)
    for batch in all_batches:
        step = mdl.plan(batch).step(mdl.selected, gram)
        acc = step(acc, arrays, jax.tree_util.tree_leaves(batch), jnp.int32(0))
    return to_stats(mdl, plan, acc)

"""Sparsity-inducing regularizers as optax transformations.

* :func:`l1`: ``strength * sum |w|`` over the selected leaves;
* :func:`group_lasso`: ``strength * sum_u ||w_u||_2`` over the units of the
  graph's channel groups (every member of a unit: the producer's slice, its
  bias and norm parameters, the consumers' input slices), which drives
  whole units to zero (Wen et al. 2016);
* :func:`slimming`: ``strength * sum |gamma|`` over the normalisation scales
  of the groups (network slimming, Liu et al. 2017).

Each has two forms:

* **subgradient** (``learning_rate=None``): adds the penalty's (sub)gradient
  to the incoming gradients. It goes *before* the optimizer, like a loss
  term: ``optax.chain(jp.regularizers.l1(1e-4), optax.adam(1e-3))``.
  Weights hover around zero but rarely reach it.
* **proximal** (``learning_rate=`` the optimizer's step size, a number or an
  optax schedule): applies the proximal operator of ``step * penalty`` to
  the parameters the update would produce, giving *exact* zeros. It goes
  *after* the optimizer, last in the chain (its input must be the final
  update): ``optax.chain(optax.sgd(lr), jp.regularizers.l1(1e-4,
  learning_rate=lr))`` is proximal gradient descent (ISTA). With adaptive
  optimizers it is the usual heuristic (the step is the base rate).

Both compose with pruning: put them inside the wrapped optimizer,
``jp.structured.prune(optax.chain(optax.sgd(lr), jp.regularizers.group_lasso(g,
1e-3, learning_rate=lr)), graph=g, ...)``; the pruning wrapper masks
gradients before and updates after them, so pruned weights stay zero. After
training, :func:`threshold` turns the units whose norm reached (about) zero
into structured masks for :func:`jaxprune.structured.compact`.

Example:
  >>> import jax.numpy as jnp, optax
  >>> import jaxprune as jp
  >>> params = {"w": jnp.array([[0.05, -2.0], [0.5, 0.01]])}
  >>> tx = optax.chain(optax.sgd(1.0), jp.regularizers.l1(0.1, learning_rate=1.0))
  >>> zero = {"w": jnp.zeros((2, 2))}
  >>> u, _ = tx.update(zero, tx.init(params), params)
  >>> optax.apply_updates(params, u)["w"].tolist()
  [[0.0, -1.899999976158142], [0.4000000059604645, 0.0]]

References:
  Tibshirani, "Regression shrinkage and selection via the lasso", 1996;
  Wen et al., "Learning structured sparsity in deep neural networks",
  NeurIPS 2016; Liu et al., "Learning efficient convolutional networks
  through network slimming", ICCV 2017; Parikh & Boyd, "Proximal
  algorithms", 2014.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree
from jaxprune.graph import WEIGHT_ROLES, ModelGraph, choose_groups

# jp.tree.select is jp.tree.flags on the vocabulary branch.
_flags = getattr(_tree, "flags", None) or _tree.select

__all__ = ["RegularizerState", "group_lasso", "l1", "slimming", "threshold"]


class RegularizerState(NamedTuple):
    """State of the regularizers: the step count (for schedules)."""

    count: jax.Array


def _value(h: Any, count: jax.Array) -> jax.Array:
    return jnp.asarray(h(count) if callable(h) else h, jnp.float32)


def _check(strength: Any, learning_rate: Any, what: str) -> None:
    for name, v in (("strength", strength), ("learning_rate", learning_rate)):
        if v is None or callable(v) or isinstance(v, jax.core.Tracer):
            continue
        if np.ndim(v) or not float(v) >= 0:
            raise ValueError(f"regularizers.{what}: {name} must be a number >= 0 or an optax "
                             f"schedule, got {v!r}.")


def _transform(what: str, strength: Any, learning_rate: Any,
               grad_fn: Callable, prox_fn: Callable) -> optax.GradientTransformationExtraArgs:
    """The two forms: subgradient added to the updates, or proximal step."""
    _check(strength, learning_rate, what)

    def init_fn(params):
        del params
        return RegularizerState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(f"regularizers.{what} needs params: call tx.update(grads, state, "
                             "params).")
        lam = _value(strength, state.count)
        if learning_rate is None:
            out = grad_fn(updates, params, lam)
        else:
            z = jax.tree.map(lambda p, u: (p + u).astype(p.dtype) if _tree.is_float(p) else p,
                             params, updates)  # keys, counters, flags: not stepped
            new = prox_fn(z, lam * _value(learning_rate, state.count))
            out = jax.tree.map(lambda n, p, u: _delta(n, p, u) if _tree.is_float(p) else u,
                               new, params, updates)
        return out, RegularizerState(optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _delta(new: jax.Array, p: jax.Array, u: jax.Array) -> jax.Array:
    """``new - p``, exactly ``-p`` where ``new`` is zero (so ``p + u == 0``)."""
    return jnp.where(new == 0, -p, new - p).astype(u.dtype)


# --------------------------------------------------------------------------
# L1


def _soft(x: jax.Array, t: jax.Array) -> jax.Array:
    """Soft threshold: ``sign(x) max(|x| - t, 0)``."""
    return (jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0)).astype(x.dtype)


def l1(strength: Any, *, learning_rate: Any = None,
       where: Any = None) -> optax.GradientTransformationExtraArgs:
    """L1 penalty ``strength * sum |w|`` on the selected leaves.

    Subgradient form: ``g + strength * sign(w)``. Proximal form:
    ``w <- sign(z) max(|z| - lr * strength, 0)`` with ``z = w + u``.

    Args:
      strength: the penalty weight (a number or an optax schedule).
      learning_rate: the step size for the proximal form (a number or an
        optax schedule); ``None`` for the subgradient form.
      where: which leaves (default :func:`jaxprune.tree.is_kernel`: dense and conv kernels).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a
      :class:`RegularizerState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> p = {"w": jnp.array([[1.0, -1.0], [2.0, 0.0]]), "b": jnp.ones(2)}
      >>> tx = jp.regularizers.l1(0.5)
      >>> g = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
      >>> u, _ = tx.update(g, tx.init(p), p)
      >>> u["w"].tolist(), u["b"].tolist()  # the bias is not selected
      ([[0.5, -0.5], [0.5, 0.0]], [0.0, 0.0])

    References:
      Tibshirani 1996; Han et al., NeurIPS 2015 (L1 before pruning).
    """

    def grad_fn(updates, params, lam):
        sel = _flags(params, where)
        return _map_selected(lambda u, p: (u + lam * jnp.sign(p)).astype(u.dtype),
                             sel, updates, params)

    def prox_fn(z, t):
        return _map_selected(lambda x: _soft(x, t), _flags(z, where), z)

    return _transform("l1", strength, learning_rate, grad_fn, prox_fn)


def _map_selected(fn: Callable, sel: list, tree: PyTree, *rest: PyTree) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    others = [jax.tree_util.tree_leaves(r) for r in rest]
    out = [fn(x, *(o[i] for o in others)) if s else x for i, (x, s) in enumerate(zip(leaves, sel))]
    return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------
# Group lasso and slimming (over the graph's groups)


def _groups(graph: ModelGraph, groups: Any, what: str) -> list:
    return choose_groups(graph, groups, what=f"regularizers.{what}")


def _members(graph: ModelGraph, g: Any, leaves: list) -> list:
    """The weight members of ``g`` present in ``leaves``."""
    return [m for m in g.members
            if graph.leaves[m.leaf].role in WEIGHT_ROLES and leaves[m.leaf] is not None]


def _unit_sq(graph: ModelGraph, g: Any, leaves: list) -> jax.Array:
    """``sum w^2`` per unit (``(size,)`` or ``(layers, size)``) over ``g``'s
    weight members."""
    total = jnp.zeros((g.layers or 1) * g.size, jnp.float32)
    for m in _members(graph, g, leaves):
        info = graph.leaves[m.leaf]
        x = leaves[m.leaf].astype(jnp.float32)
        keep = (0, m.axis) if info.layers else (m.axis,)
        per_pos = jnp.sum(x * x, axis=tuple(a for a in range(x.ndim) if a not in keep))
        units = np.atleast_2d(m.units)
        seg = (np.arange(units.shape[0])[:, None] * g.size + units).reshape(-1)
        valid = units.reshape(-1) >= 0
        total = total + jax.ops.segment_sum(per_pos.reshape(-1)[valid], seg[valid],
                                            num_segments=total.shape[0])
    return total.reshape(g.layers, g.size) if g.layers else total


def _on_leaf(values: jax.Array, m: Any, g: Any, info: Any, default: float) -> jax.Array:
    """Per-unit ``values`` spread over the positions of member ``m`` (``default``
    where a position has no unit), broadcast to the leaf's shape."""
    safe = np.maximum(m.units, 0)
    pos = values[np.arange(m.units.shape[0])[:, None], safe] if g.layers else values[safe]
    pos = jnp.where(jnp.asarray(m.units >= 0), pos, default)
    shape = [1] * len(info.shape)
    if g.layers:
        shape[0] = info.shape[0]
    shape[m.axis] = info.shape[m.axis]
    return pos.reshape(shape)


def _spread(graph: ModelGraph, groups: list, values: list, leaves: list, default: float,
            combine: Callable) -> list:
    """Per leaf: the members' unit values combined over groups (``None`` for
    leaves no group touches)."""
    out: list = [None] * len(leaves)
    for g, v in zip(groups, values):
        for m in _members(graph, g, leaves):
            d = _on_leaf(v, m, g, graph.leaves[m.leaf], default)
            out[m.leaf] = d if out[m.leaf] is None else combine(out[m.leaf], d)
    return out


def _graph_leaves(graph: ModelGraph, tree: PyTree, what: str) -> tuple:
    """The tree's leaves placed at the graph's leaf positions (``None`` where
    the tree has no such leaf), and how to put them back."""
    paths, leaves, treedef = _tree.flatten(tree)
    gpaths = [info.path for info in graph.leaves]
    from jaxprune.structured.units import common_prefix

    try:
        prefix = common_prefix(paths, gpaths)
    except ValueError:
        raise ValueError(f"regularizers.{what}: the parameters do not match the traced "
                         f"variables by path (parameters {paths[:4]}..., traced "
                         f"{gpaths[:4]}...). Trace the graph on these variables.") from None
    index = [gpaths.index(prefix + p) for p in paths]
    placed: list = [None] * len(gpaths)
    for x, j in zip(leaves, index):
        placed[j] = x

    def back(new: list) -> PyTree:
        return jax.tree_util.tree_unflatten(treedef, [new[j] for j in index])

    return placed, back


def group_lasso(graph: ModelGraph, strength: Any, *, learning_rate: Any = None,
                groups: Any = None) -> optax.GradientTransformationExtraArgs:
    """Group lasso ``strength * sum_u ||w_u||_2`` over the units of the groups.

    A unit's weights are every weight member of it (kernels' slices, bias,
    norm scale and shift; not running statistics), so a unit driven to zero
    can be removed exactly. Subgradient form: ``g + strength * w / ||w_u||``
    for each unit holding ``w`` (0 at ``w_u = 0``). Proximal form: every
    unit is scaled by ``max(0, 1 - lr * strength / ||z_u||)``; a weight in
    units of two groups (a consumer's input slice is also part of that
    layer's own output units) gets the product of both factors, which is the
    exact proximal step when groups do not overlap.

    Args:
      graph: the model graph (:func:`jaxprune.graph.trace`).
      strength: the penalty weight (a number or an optax schedule).
      learning_rate: the step size of the proximal form (a number or an
        optax schedule); ``None`` for the subgradient form.
      groups: which groups (default every prunable one; names, indices or a
        callable ``group -> bool``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a
      :class:`RegularizerState`. The parameters may be the traced variables
      or a subtree of them (matched by path).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> p = {"a": jnp.array([[3.0, 0.1]]), "c": jnp.array([[4.0], [0.1]])}
      >>> g = jp.graph.trace(lambda p, x: jnp.tanh(x @ p["a"]) @ p["c"], p, jnp.ones((1, 1)))
      >>> tx = optax.chain(optax.sgd(1.0), jp.regularizers.group_lasso(g, 1.0, learning_rate=1.0))
      >>> u, _ = tx.update({"a": jnp.zeros((1, 2)), "c": jnp.zeros((2, 1))}, tx.init(p), p)
      >>> new = optax.apply_updates(p, u)
      >>> new["a"].tolist(), new["c"].tolist()
      ([[2.4000000953674316, 0.0]], [[3.200000047683716], [0.0]])

    References:
      Yuan & Lin, "Model selection and estimation in regression with grouped
      variables", 2006; Wen et al., "Learning structured sparsity in deep
      neural networks", NeurIPS 2016.
    """
    chosen = _groups(graph, groups, "group_lasso")

    def grad_fn(updates, params, lam):
        pl, back = _graph_leaves(graph, params, "group_lasso")
        ul, _ = _graph_leaves(graph, updates, "group_lasso")
        coefs = [lam * jnp.where(n > 0, jax.lax.rsqrt(jnp.maximum(n, 1e-30)), 0.0)
                 for n in (_unit_sq(graph, g, pl) for g in chosen)]
        c = _spread(graph, chosen, coefs, pl, 0.0, jnp.add)
        return back([u if ci is None else (u + ci * p).astype(u.dtype)
                     for u, p, ci in zip(ul, pl, c)])

    def prox_fn(z, t):
        zl, back = _graph_leaves(graph, z, "group_lasso")
        factors = [jnp.maximum(0.0, 1.0 - t * jnp.where(n > 0, jax.lax.rsqrt(
            jnp.maximum(n, 1e-30)), jnp.inf)) for n in (_unit_sq(graph, g, zl) for g in chosen)]
        f = _spread(graph, chosen, factors, zl, 1.0, jnp.multiply)
        return back([x if fi is None else (x * fi).astype(x.dtype) for x, fi in zip(zl, f)])

    return _transform("group_lasso", strength, learning_rate, grad_fn, prox_fn)


def slimming(graph: ModelGraph, strength: Any, *, learning_rate: Any = None,
             groups: Any = None) -> optax.GradientTransformationExtraArgs:
    """Network slimming: L1 ``strength * sum |gamma|`` on the groups' norm scales.

    The normalisation scales (BatchNorm/LayerNorm ``gamma``) of the chosen
    groups' units are pushed towards zero; afterwards one threshold on
    ``|gamma|`` (:func:`jaxprune.allocation.global_budget` with
    ``score="bn_scale"`` scores, or :func:`threshold`) picks the channels to
    remove. Subgradient form as in the paper (``g + strength *
    sign(gamma)``); the proximal form soft-thresholds ``gamma``.

    Args:
      graph: the model graph.
      strength: the penalty weight (the paper uses 1e-4 to 1e-5 with SGD).
      learning_rate: the step size of the proximal form; ``None`` for the
        subgradient form.
      groups: which groups (default every prunable one; those without a
        norm scale are left alone).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a
      :class:`RegularizerState`.

    Raises:
      ValueError: if no chosen group has a normalisation scale.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> p = {"a": jnp.ones((2, 3)), "c": jnp.ones((3, 1)),
      ...      "bn": {"gamma": jnp.array([0.05, 1.0, -0.5]), "beta": jnp.zeros(3)}}
      >>> def f(p, x):
      ...     h = x @ p["a"]
      ...     h = (h - h.mean(0)) * jax.lax.rsqrt(h.var(0) + 1e-5)
      ...     return jax.nn.relu(h * p["bn"]["gamma"] + p["bn"]["beta"]) @ p["c"]
      >>> g = jp.graph.trace(f, p, jnp.ones((4, 2)))
      >>> tx = optax.chain(optax.sgd(1.0), jp.regularizers.slimming(g, 0.1, learning_rate=1.0))
      >>> u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
      >>> optax.apply_updates(p, u)["bn"]["gamma"].tolist()
      [0.0, 0.8999999761581421, -0.4000000059604645]

    References:
      Liu et al., "Learning efficient convolutional networks through network
      slimming", ICCV 2017.
    """
    chosen = _groups(graph, groups, "slimming")
    scale_leaves = {m.leaf for g in chosen for m in g.members if _is_scale(graph, m)}
    if not scale_leaves:
        raise ValueError("regularizers.slimming: none of the chosen groups has a "
                         "normalisation scale; use group_lasso, or pick groups with one.")

    def where_of(tree):
        placed, back = _graph_leaves(graph, tree, "slimming")
        return back([j in scale_leaves for j in range(len(placed))])

    def grad_fn(updates, params, lam):
        return _map_selected(lambda u, p: (u + lam * jnp.sign(p)).astype(u.dtype),
                             jax.tree_util.tree_leaves(where_of(params)), updates, params)

    def prox_fn(z, t):
        return _map_selected(lambda x: _soft(x, t), jax.tree_util.tree_leaves(where_of(z)), z)

    return _transform("slimming", strength, learning_rate, grad_fn, prox_fn)


def _is_scale(graph: ModelGraph, m: Any) -> bool:
    info = graph.leaves[m.leaf]
    return info.role == "norm" and info.kind == "scale"


# --------------------------------------------------------------------------
# Threshold


def threshold(graph: ModelGraph, variables: PyTree, tol: float = 0.0, *,
              score: str = "l2", groups: Any = None) -> PyTree:
    """Structured masks removing the units whose score is at most ``tol``.

    After group lasso (``score="l2"``, the unit's norm; exact zeros with the
    proximal form, so ``tol=0`` works) or slimming (``score="bn_scale"``,
    ``|gamma|``). Every group keeps at least one unit.

    Args:
      graph: the model graph.
      variables: the trained variables the graph traced.
      tol: units with a score ``<= tol`` are removed.
      score: ``"l2"``, ``"l1"`` or ``"bn_scale"`` (see
        :func:`jaxprune.structured.scores`).
      groups: which groups (default every prunable one).

    Returns:
      A mask tree for :func:`jaxprune.structured.compact`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"a": jnp.array([[1.0, 0.0, 2.0]]), "c": jnp.array([[1.0], [0.0], [1.0]])}
      >>> f = lambda p, x: jnp.tanh(x @ p["a"]) @ p["c"]
      >>> g = jp.graph.trace(f, p, jnp.ones((1, 1)))
      >>> jp.structured.compact(g, p, jp.regularizers.threshold(g, p))["a"].shape
      (1, 2)
    """
    from jaxprune.structured import units as structured

    chosen = _groups(graph, groups, "threshold")
    sc = structured.scores(graph, variables, score)
    keep = {g.index: max(1, int(np.max(np.sum(np.asarray(sc[g.index]).reshape(
        g.layers or 1, g.size) > tol, axis=1)))) for g in chosen}
    return structured.masks(graph, sc, 0.0, groups=[g.index for g in chosen], keep=keep)

"""Cost models and budget solvers behind the layer-aware allocations.

A *layer* is a selected leaf (unstructured) or a channel group of the model
graph (structured); ``kept[l]`` counts its kept weights or units (per layer
of a scanned stack). A :class:`CostModel` gives the model's cost (parameters
or MACs) as a function of ``kept``; the solvers choose ``kept`` under a cost
budget:

* :func:`linear_solve`: one cost per weight (unstructured), the damage curves
  replaced by their convex minorants, then the cheapest curve segments first
  (an exact fractional knapsack). Pure ``jax.numpy``: runs under ``jit``
  with a traced budget.
* :func:`unit_greedy`: structured; one unit at a time from the layer with
  the least predicted damage per unit of cost saved, costs recomputed after
  every step (removing a channel shrinks its producer *and* its consumers).
* :func:`uniform_counts`, :func:`order_counts`: one rate for every layer, or
  one threshold on unit scores, under the same budget.

Import direction: only NumPy and JAX; a graph is read through its attributes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

COSTS = ("params", "flops")


class CostModel(NamedTuple):
    """``cost(kept) = fixed + sum_j leaf_cost[j] * prod_a phi[j, a]``.

    ``phi`` of a (leaf, axis) pair ``p`` is the fraction of its positions kept:
    ``(base[p] + per_unit[p] @ kept) / total[p]``. Leaves with no pruned axis
    are in ``fixed``.
    """

    kind: str
    dense: float
    fixed: float
    leaf_cost: np.ndarray  # (J,)
    axes: np.ndarray  # (J, A) pair index per axis, -1 for none
    base: np.ndarray  # (P,)
    per_unit: np.ndarray  # (P, L)
    total: np.ndarray  # (P,)

    def __call__(self, kept: Any, xp: Any = np) -> Any:
        """The cost of ``kept`` (``(..., L)``), batched over leading axes."""
        kept = xp.asarray(kept, xp.float32 if xp is jnp else np.float64)
        phi = (self.base + kept @ self.per_unit.T) / self.total
        phi = xp.concatenate([phi, xp.ones(phi.shape[:-1] + (1,), phi.dtype)], axis=-1)
        idx = np.where(self.axes < 0, phi.shape[-1] - 1, self.axes)
        return self.fixed + xp.sum(xp.prod(phi[..., idx], axis=-1) * self.leaf_cost, axis=-1)

    def unit_costs(self, kept: np.ndarray) -> np.ndarray:
        """Cost saved by removing one more unit of each layer at ``kept``."""
        kept = np.asarray(kept, np.float64)
        return self(kept) - self(kept[None, :] - np.eye(len(kept)))


def linear_model(sizes: np.ndarray, per_weight: np.ndarray, kind: str) -> CostModel:
    """Unstructured costs: layer ``l`` costs ``per_weight[l]`` per kept weight."""
    n = len(sizes)
    sizes = np.asarray(sizes, np.float64)
    cost = sizes * np.asarray(per_weight, np.float64)
    return CostModel(kind, float(cost.sum()), 0.0, cost, np.arange(n)[:, None],
                     np.zeros(n), np.eye(n), np.maximum(sizes, 1.0))


def graph_model(graph: Any, groups: list, kind: str) -> CostModel:
    """Structured costs of a graph whose layers are ``groups``.

    ``"params"`` counts every variable that is not a running statistic;
    ``"flops"`` counts the MACs of every dot and convolution (``graph.macs``;
    products of two activations, which no leaf owns, stay fixed).
    """
    check_kind(kind)
    cost = np.array([0.0 if info.role == "stat" else
                     (float(np.prod(info.shape)) if kind == "params" else float(info.macs))
                     for info in graph.leaves])
    dense = float(cost.sum()) if kind == "params" else float(graph.macs)
    pairs: dict = {}
    per_unit: list = []
    for li, g in enumerate(groups):
        for m in g.members:
            if cost[m.leaf] == 0.0:
                continue
            p = pairs.setdefault((m.leaf, m.axis), len(pairs))
            if p == len(per_unit):
                per_unit.append(np.zeros(len(groups)))
            per_unit[p][li] += np.count_nonzero(m.units >= 0) / (g.size * (g.layers or 1))
    touched = sorted({leaf for leaf, _ in pairs})
    width = max([sum(1 for j, _ in pairs if j == leaf) for leaf in touched] + [1])
    axes = np.full((len(touched), width), -1)
    for r, leaf in enumerate(touched):
        mine = [p for (j, _), p in pairs.items() if j == leaf]
        axes[r, :len(mine)] = mine
    total = np.array([graph.leaves[j].shape[a] for (j, a) in pairs], np.float64)
    pu = np.array(per_unit).reshape(len(pairs), len(groups))
    sizes = np.array([g.size for g in groups], np.float64)
    base = total - pu @ sizes if len(pairs) else np.zeros(0)
    return CostModel(kind, dense, dense - float(cost[touched].sum()), cost[touched], axes,
                     np.maximum(base, 0.0), pu, np.maximum(total, 1.0))


def check_kind(kind: Any) -> None:
    if kind not in COSTS:
        raise ValueError(f"cost must be one of {COSTS} (parameters kept, or MACs kept), got "
                         f"{kind!r}.")


# --------------------------------------------------------------------------
# Damage curves


def _xp(*xs: Any) -> Any:
    """``jax.numpy`` if any input is traced, else NumPy (no compiles)."""
    return jnp if any(isinstance(x, jax.core.Tracer) for x in xs) else np


def hull(x: Any, y: Any) -> Any:
    """The greatest convex minorant of the points ``(x[..., j], y[..., j])``
    at every ``x[..., j]`` (``x`` nondecreasing along the last axis)."""
    xp = _xp(x, y)
    x = xp.asarray(x, xp.float32 if xp is jnp else np.float64)
    y = xp.asarray(y, x.dtype)
    xa, xj, xb = x[..., :, None, None], x[..., None, :, None], x[..., None, None, :]
    ya, yb = y[..., :, None, None], y[..., None, None, :]
    ok = (xa <= xj) & (xj <= xb) & (xa < xb)
    line = ya + (yb - ya) * (xj - xa) / xp.where(ok, xb - xa, 1.0)
    best = xp.min(xp.where(ok, line, xp.inf), axis=(-3, -1))
    return xp.minimum(y, best)


def linear_solve(removed: Any, damage: Any, per_weight: Any, target: Any,
                 exact: bool) -> Any:
    """Weights removed per layer: cheapest convex-minorant segments first.

    Pure NumPy for concrete inputs, ``jax.numpy`` when any is traced (inside
    a jitted mask update).

    Args:
      removed: ``(L, S + 1)`` int: weights removed at each measured point
        (column 0 is 0), nondecreasing.
      damage: ``(L, S + 1)``: predicted metric damage at those points.
      per_weight: ``(L,)`` cost of one weight of each layer.
      target: cost to remove (``exact``: an integer count of weights).
      exact: integer arithmetic (every weight costs 1).

    Returns:
      ``(L,)`` int32 weights removed; capped at the last measured point.
    """
    xp = _xp(removed, damage, per_weight, target)
    removed = xp.asarray(removed, xp.int32)
    h = hull(removed, damage)
    seg = xp.diff(removed, axis=1)
    c = xp.asarray(per_weight, h.dtype)
    slope = xp.where(seg > 0, xp.diff(h, axis=1) / xp.maximum(seg * c[:, None], 1e-30), -xp.inf)
    slope = jax.lax.cummax(slope, axis=1) if xp is jnp else np.maximum.accumulate(slope, axis=1)
    order = xp.argsort(slope.reshape(-1), stable=True)
    layer = xp.repeat(xp.arange(seg.shape[0]), seg.shape[1])[order]
    seg = seg.reshape(-1)[order]
    if exact:
        before = xp.cumsum(seg) - seg
        take = xp.clip(xp.asarray(target, xp.int32) - before, 0, seg)
    else:
        cost = seg * c[layer]
        before = xp.cumsum(cost) - cost
        left = xp.clip(xp.asarray(target, h.dtype) - before, 0.0, cost)
        take = xp.minimum(xp.ceil(left / c[layer]).astype(xp.int32), seg)
    if xp is jnp:
        return jnp.zeros(removed.shape[0], jnp.int32).at[layer].add(take)
    out = np.zeros(removed.shape[0], np.int64)
    np.add.at(out, layer, take)
    return out


def unit_greedy(model: CostModel, removed: np.ndarray, damage: np.ndarray,
                sizes: np.ndarray, kmin: np.ndarray, target: float) -> np.ndarray:
    """Kept units per layer: one unit at a time, least damage per cost saved.

    The damage of a layer is its convex minorant interpolated at unit counts;
    removal stops at the first count whose cost is at most ``target`` (so the
    cost is within one unit's cost of it).
    """
    h = np.asarray(hull(removed, damage), np.float64)
    k = np.asarray(sizes, np.int64).copy()
    cur = model(k)
    while cur > target:
        cand = k[None, :] - np.eye(len(k), dtype=np.int64)
        costs = model(cand)
        gain = cur - costs
        r = sizes - k
        inc = np.array([np.interp(r[i] + 1, removed[i], h[i]) - np.interp(r[i], removed[i], h[i])
                        for i in range(len(k))])
        ratio = np.where((k > kmin) & (gain > 0), inc / np.where(gain > 0, gain, 1.0), np.inf)
        if not np.isfinite(ratio).any():
            break
        i = int(np.argmin(ratio))
        k[i] -= 1
        cur = costs[i]
    return k


def uniform_counts(model: CostModel, sizes: np.ndarray, kmin: np.ndarray,
                   target: float) -> np.ndarray:
    """One keep rate for every layer (counts ``round(size * q)``), the largest
    ``q`` whose cost is at most ``target`` (bisection)."""
    sizes = np.asarray(sizes, np.int64)

    def counts(q):
        return np.clip(np.round(sizes * q).astype(np.int64), kmin, sizes)

    lo, hi = 0.0, 1.0
    if model(counts(hi)) <= target:
        return counts(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model(counts(mid)) <= target else (lo, mid)
    return counts(lo)


def order_counts(model: CostModel, scores: list, kmin: np.ndarray,
                 target: float) -> np.ndarray:
    """Units removed in ascending score order (one global threshold) until
    the cost is at most ``target``; a layer stops at ``kmin``."""
    k = np.array([len(s) for s in scores], np.int64)
    flat = np.concatenate([np.asarray(s, np.float64) for s in scores])
    layer = np.concatenate([np.full(len(s), i) for i, s in enumerate(scores)])
    for u in np.argsort(flat, kind="stable"):
        if model(k) <= target:
            break
        if k[layer[u]] > kmin[layer[u]]:
            k[layer[u]] -= 1
    return k

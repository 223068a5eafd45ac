"""Structured pruning: whole units scored, masked as groups, then removed.

A *unit* is a set of coupled channels found by :func:`jaxprune.graph.trace`
(a dense neuron or conv filter with its bias, norm scale and shift, running
statistics and the next layers' input slices; a residual channel across all
the layers it connects; an attention head with its query, key, value and
output slices). Units of one group touch the same leaves.

* :func:`scores` gives every unit of every prunable group a score;
* :func:`masks` keeps the best units, per group (``"uniform"``) or with one
  threshold over scores normalised per group (``"global"``), and returns
  ordinary bool masks with the variables' structure: every member of a
  removed unit is zero, so a constant emitted by a removed channel (a norm
  shift, or ``f(0) != 0``) reaches nothing;
* :func:`compact` slices the removed units out of every leaf: the result
  computes exactly what the masked model computes, with smaller arrays.

*Structured sparsity* is the fraction of units removed.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxprune as jp
  >>> k1, k2 = jax.random.split(jax.random.key(0))
  >>> params = {"a": {"w": jax.random.normal(k1, (4, 8)), "b": jnp.zeros(8)},
  ...           "c": {"w": jax.random.normal(k2, (8, 2))}}
  >>> f = lambda p, x: jax.nn.relu(x @ p["a"]["w"] + p["a"]["b"]) @ p["c"]["w"]
  >>> x = jnp.ones((3, 4))
  >>> g = jp.graph.trace(f, params, x)
  >>> masks = jp.structured.masks(g, jp.structured.scores(g, params), 0.5)
  >>> small = jp.structured.compact(g, params, masks)
  >>> small["a"]["w"].shape, small["c"]["w"].shape
  ((4, 4), (4, 2))
  >>> bool(jnp.allclose(f(small, x), f(jp.apply_masks(params, masks), x)))
  True

References:
  Fang et al., "DepGraph: towards any structural pruning", CVPR 2023
  (group norms); Li et al., "Pruning filters for efficient ConvNets", ICLR
  2017; Liu et al., "Learning efficient convolutional networks through
  network slimming", ICCV 2017 (BN scales); Molchanov et al., "Importance
  estimation for neural network pruning", CVPR 2019 (group Taylor).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core import allocation as _alloc
from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree
from jaxprune.graph import WEIGHT_ROLES, Group, ModelGraph, choose_groups, rebuild
from jaxprune.train import base as _tb

__all__ = [
    "SCORES",
    "StructuredState",
    "UnitScore",
    "compact",
    "kept_units",
    "masks",
    "prune",
    "register_score",
    "score_names",
    "scores",
]

class UnitScore(NamedTuple):
    """A named structured score: ``finish(sum over members of reduce(pointwise(w
    [* g])))`` per unit. ``pointwise`` maps a member's (float32) weights, or
    ``w * g`` when ``needs == "grads"``, to per-entry values; they are summed
    per unit over every member whose role is in ``roles`` (and, with
    ``norm_scales``, that is a normalisation scale); ``finish`` maps the
    sums to the unit scores. ``needs``: ``"grads"``, ``"key"`` or ``""``.
    ``random`` scores ignore the weights (``pointwise=None``)."""

    pointwise: Callable | None
    finish: Callable = lambda total: total
    needs: str = ""
    norm_scales: bool = False


# The registry of structured scores, as jp.scores' is of unstructured ones.
_UNIT_SCORES: dict[str, UnitScore] = {
    "l1": UnitScore(jnp.abs),
    "l2": UnitScore(jnp.square, jnp.sqrt),
    "taylor": UnitScore(lambda wg: wg, jnp.square, needs="grads"),
    "bn_scale": UnitScore(jnp.abs, norm_scales=True),
    "random": UnitScore(None, needs="key"),
}
SCORES = tuple(_UNIT_SCORES)  # the built-in names (score_names() lists registered ones too)


def register_score(name: str, score: UnitScore) -> None:
    """Registers a structured score under ``name`` (``score=name`` in
    :func:`scores`, :func:`prune`, ``regularizers.threshold``).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> jp.structured.register_score("sq", jp.structured.UnitScore(jnp.square))
      >>> p = {"a": {"w": jnp.array([[1.0, 2.0]])}, "c": {"w": jnp.ones((2, 1))}}
      >>> g = jp.graph.trace(lambda p, x: x @ p["a"]["w"] @ p["c"]["w"], p, jnp.ones((1, 1)))
      >>> jp.structured.scores(g, p, "sq")[g.prunable[0].index].tolist()
      [2.0, 5.0]
    """
    if not isinstance(score, UnitScore):
        raise TypeError(f"structured.register_score: {name!r} needs a UnitScore, got "
                        f"{type(score).__name__}.")
    _UNIT_SCORES[name] = score


def score_names() -> list[str]:
    """Names accepted by ``score=`` in :func:`scores` (built-in and registered)."""
    return sorted(_UNIT_SCORES)


# --------------------------------------------------------------------------
# Scores


def scores(graph: ModelGraph, variables: PyTree, score: str | Callable = "l2", *,
           grads: PyTree | None = None, key: jax.Array | None = None) -> tuple:
    """A score per unit of every prunable group (larger = more important).

    * ``"l2"``: ``sqrt(sum w^2)`` over every weight of the unit in every
      member (kernels, embeddings, biases, norm parameters; not running
      statistics): DepGraph's group norm. ``"l1"``: ``sum |w|``.
    * ``"taylor"``: ``(sum w * g)^2`` over the unit (``grads=`` required):
      the first-order change of the loss when the unit is removed.
    * ``"bn_scale"``: ``sum |gamma|`` of the unit's norm scales (network
      slimming); every scored group must have one.
    * ``"random"``: uniform in ``[0, 1)`` (``key=`` required).
    * a callable ``(group, variables, grads) -> scores`` of shape
      ``(group.size,)``, or ``(group.layers, group.size)`` for a group of a
      scanned stack.

    Args:
      graph: from :func:`jaxprune.graph.trace` on these variables.
      variables: the variables (traced values are fine: this runs under jit).
      score: a registered name (:func:`score_names`: the built-in
        :data:`SCORES` and those of :func:`register_score`) or a callable.
      grads: gradients with the structure of ``variables`` (for ``"taylor"``).
      key: a PRNG key (for ``"random"``).

    Returns:
      A tuple aligned with ``graph.groups``: an array per prunable group
      (``(size,)``, or ``(layers, size)`` for per-layer groups), ``None``
      for the others.
    """
    leaves = _arrays(graph, variables, "variables")
    gleaves = _arrays(graph, grads, "grads") if grads is not None else None
    if not callable(score) and score not in _UNIT_SCORES:
        raise ValueError(f"structured.scores: unknown score {score!r}; use one of "
                         f"{score_names()} or a callable (group, variables, grads) -> scores.")
    needs = "" if callable(score) else _UNIT_SCORES[score].needs
    if needs == "grads" and gleaves is None:
        raise ValueError(f"structured.scores: score={score!r} needs grads= (gradients of the "
                         "loss with the structure of the variables).")
    if needs == "key" and key is None:
        raise ValueError(f"structured.scores: score={score!r} needs key= (a PRNG key).")
    if callable(score):
        return tuple(jnp.asarray(score(g, variables, grads), jnp.float32) if g.prunable
                     else None for g in graph.groups)
    fn = _cached(graph, ("scores", score), lambda: jax.jit(
        lambda leaves, gleaves, key: tuple(
            _group_score(graph, g, leaves, gleaves, score, key) if g.prunable else None
            for g in graph.groups)))
    return fn(leaves, gleaves, key)


def _cached(graph: ModelGraph, key: tuple, make: Callable) -> Callable:
    """A jitted function cached on the graph (compiled once per shapes)."""
    cache = graph.extras.setdefault("jit", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _group_score(graph, g: Group, leaves, gleaves, score: str, key) -> jax.Array:
    spec = _UNIT_SCORES[score]
    shape = (g.layers, g.size) if g.layers else (g.size,)
    if spec.pointwise is None:
        return jax.random.uniform(jax.random.fold_in(key, g.index), shape, jnp.float32)
    members = [m for m in g.members if graph.leaves[m.leaf].role in WEIGHT_ROLES]
    if spec.norm_scales:
        members = [m for m in members if graph.leaves[m.leaf].kind == "scale"]
        if not members:
            raise ValueError(
                f"structured.scores: score={score!r} but group {g.name!r} has no "
                "normalisation scale (its members: "
                f"{[m.path for m in g.members][:6]}). Use score='l2', or score only groups "
                "with a BatchNorm/LayerNorm scale.")
    total = jnp.zeros(shape, jnp.float32)
    for m in members:
        x = leaves[m.leaf].astype(jnp.float32)
        if spec.needs == "grads":
            x = x * gleaves[m.leaf].astype(jnp.float32)
        per_pos = _reduce_others(spec.pointwise(x), graph.leaves[m.leaf].layers, m.axis)
        total = total + _to_units(per_pos, m, g)
    return spec.finish(total)


def _reduce_others(x: jax.Array, layers, axis: int) -> jax.Array:
    keep = (0, axis) if layers else (axis,)
    others = tuple(a for a in range(x.ndim) if a not in keep)
    return jnp.sum(x, axis=others)


def _to_units(per_pos: jax.Array, m, g: Group) -> jax.Array:
    """Sums positions into units: ``(size,)`` or ``(layers, size)``."""
    units = m.units
    valid = units >= 0
    if g.layers:
        seg = (np.arange(units.shape[0])[:, None] * g.size + units)[valid]
        out = jax.ops.segment_sum(per_pos[valid], seg, num_segments=g.layers * g.size)
        return out.reshape(g.layers, g.size)
    return jax.ops.segment_sum(per_pos[valid], units[valid], num_segments=g.size)


# --------------------------------------------------------------------------
# Masks


def masks(graph: ModelGraph, scores: Sequence, sparsity: Any, *, allocation: str = "uniform",
          round_to: int | Mapping = 1, groups: Any = None,
          keep: Mapping | None = None) -> PyTree:
    """Structured masks: the best units of each group kept, the rest zeroed.

    Per group of ``n`` units (per layer, for a scanned stack) the kept count
    is ``k = round(n * (1 - s))`` rounded to a multiple of ``round_to`` (at
    least ``round_to``: a group never loses all its units), where ``s`` is
    ``sparsity`` (``"uniform"``, or a mapping ``{group index or name:
    sparsity}``). With ``"global"``, one threshold on scores divided by
    their group's mean keeps ``round(N * (1 - s))`` of all ``N`` units, then
    each group's count is rounded to ``round_to``. Selections are exact, ties
    to the lower unit index.

    Args:
      graph: the model graph.
      scores: from :func:`scores` (aligned with ``graph.groups``).
      sparsity: fraction of units removed: a number (traced is fine) or a
        mapping from group index or name to a number.
      allocation: a registered allocation with a structured form
        (:data:`jaxprune.allocation.REGISTRY`): ``"uniform"`` or
        ``"global"``.
      round_to: keep unit counts at multiples of this (e.g. 8 for tensor
        cores): an int, or a mapping from a group index, name or kind
        (``"heads"``, ``"head_dims"``, ``"channels"``) to an int (1 for the
        rest). For head and head-dim groups it must divide the group size.
      groups: which groups to prune: ``None`` (every scored prunable
        group but ``"head_dims"``: attention code usually scales scores by
        ``1/sqrt(head_dim)`` taken from the shape, and
        ``jax.nn.dot_product_attention`` needs equal query and value head
        sizes; compaction would change or break both), a sequence of indices
        or names, or a callable ``group -> bool``.
      keep: exact counts instead of ``sparsity`` for some groups: a mapping
        from a group index, name or kind to the number of units to keep (per
        layer); for ``"heads"`` groups the number of *query heads*, which
        must be a multiple of the group's ``heads_per_unit`` (GQA).

    Returns:
      A bool mask tree with the structure of the traced variables.
    """
    chosen = _chosen_groups(graph, scores, groups)
    alloc = _structured_allocation(allocation, "structured.masks")
    rmap = _round_to_of(chosen, round_to)
    counts = _counts_of(chosen, keep or {})
    if alloc.sparsities is None and (keep or isinstance(sparsity, Mapping)):
        raise ValueError(f"structured.masks: allocation={allocation!r} takes one sparsity and "
                         "no keep= (one threshold decides every group's count). Use "
                         "allocation='uniform' for per-group sparsities or counts.")
    _check_group_keys(graph, sparsity, "structured.masks")
    if isinstance(sparsity, Mapping):
        sparsity = {k: jnp.asarray(v, jnp.float32) for k, v in sparsity.items()}
    for s in (sparsity.values() if isinstance(sparsity, Mapping) else [sparsity]):
        _check_sparsity(s)
    idx = tuple(g.index for g in chosen)
    fn = _cached(graph, ("masks", alloc, rmap, tuple(sorted(counts.items())), idx),
                 lambda: jax.jit(lambda sc, s: leaf_masks(graph, dict(zip(
                     idx, _keep_units(alloc, chosen, sc, s, rmap, counts))))))
    return fn(tuple(None if i not in idx else scores[i] for i in range(len(scores))),
              sparsity)


def _check_sparsity(s: Any) -> None:
    if isinstance(s, jax.core.Tracer):
        return
    v = np.asarray(s, np.float64)
    if v.ndim or not (0.0 <= float(v) <= 1.0):
        raise ValueError(f"structured.masks: sparsity must be a number in [0, 1] (the fraction "
                         f"of units removed), got {s!r}.")


def _chosen_groups(graph: ModelGraph, scores: Sequence, groups: Any) -> list[Group]:
    if len(scores) != len(graph.groups):
        raise ValueError(f"structured.masks: {len(scores)} scores for {len(graph.groups)} "
                         "groups. Compute them with jp.structured.scores(graph, variables).")
    picked = choose_groups(graph, groups, what="structured.masks", empty_ok=True)
    if groups is None:
        picked = [g for g in picked if scores[g.index] is not None]
    for g in picked:
        if scores[g.index] is None:
            raise ValueError(f"structured.masks: group {g.name!r} has no scores.")
    return picked


def _lookup(g: Group, table: Mapping, default: Any) -> Any:
    for k in (g.index, g.name, g.kind):
        if k in table:
            return table[k]
    return default


def _round_to_of(groups: list[Group], round_to: Any) -> tuple:
    """``round_to`` per chosen group, checked."""
    out = []
    for g in groups:
        r = _lookup(g, round_to, 1) if isinstance(round_to, Mapping) else round_to
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"structured.masks: round_to must be a positive int, got {r!r} "
                             f"for group {g.name!r}.")
        if r > g.size:
            raise ValueError(
                f"structured.masks: round_to={r} is larger than group {g.name!r}, which "
                f"has {g.size} units. Use a smaller round_to, or leave the group out with "
                "groups=.")
        if g.kind in ("heads", "head_dims") and g.size % r:
            raise ValueError(
                f"structured.masks: round_to={r} does not divide the {g.size} {g.kind} units "
                f"of group {g.name!r}. Use a divisor of {g.size}, or a mapping such as "
                "round_to={'channels': 8} that leaves attention groups at 1.")
        out.append(int(r))
    return tuple(out)


def _counts_of(groups: list[Group], keep: Mapping) -> dict:
    """Exact unit counts from ``keep=`` (query heads for head groups)."""
    out = {}
    for g in groups:
        n = _lookup(g, keep, None)
        if n is None:
            continue
        if g.kind == "heads" and g.heads_per_unit > 1:
            if n % g.heads_per_unit:
                raise ValueError(
                    f"structured.masks: keep={n} query heads is impossible for group {g.name!r}: "
                    f"its {g.size} key/value heads each serve {g.heads_per_unit} query heads "
                    f"(GQA), so keep a multiple of {g.heads_per_unit}.")
            n //= g.heads_per_unit
        if not 1 <= n <= g.size:
            raise ValueError(f"structured.masks: keep={n} for group {g.name!r} must be in "
                             f"[1, {g.size}].")
        out[g.index] = int(n)
    return out


def _sparsity_of(g: Group, sparsity: Any) -> Any:
    if isinstance(sparsity, Mapping):
        for k in (g.index, g.name):
            if k in sparsity:
                return sparsity[k]
        return 0.0
    return sparsity


def _round_count(k: jax.Array, n: int, round_to: int) -> jax.Array:
    if round_to == 1:
        return jnp.clip(k, 1, n)
    r = jnp.int32(round_to)
    q = jnp.clip((k + r // 2) // r * r, r, (n // round_to) * round_to)
    return jnp.where(k >= n, n, q)


def _keep_units(alloc: Any, groups: list[Group], scores: Sequence, sparsity: Any,
                rmap: tuple, fixed: dict | None = None) -> list:
    """Kept units per group (``(size,)`` or ``(layers, size)`` bools): counts
    from the registered allocation (``keep=`` counts where given), rounded to
    ``round_to``, then each row's best units."""
    rows = [jnp.asarray(scores[g.index], jnp.float32).reshape(g.layers or 1, g.size)
            for g in groups]
    counts = alloc.units(rows, [_sparsity_of(g, sparsity) for g in groups])
    out = []
    for g, sc, k, r in zip(groups, rows, counts, rmap):
        k = jnp.int32(fixed[g.index]) if fixed and g.index in fixed else \
            _round_count(k, g.size, r)
        picked = jnp.stack([_alloc.top_units(sc[layer], k) for layer in range(sc.shape[0])])
        out.append(picked if g.layers else picked[0])
    return out


def _structured_allocation(allocation: Any, what: str) -> Any:
    """The registered allocation for structured pruning, checked."""
    if not isinstance(allocation, str):
        raise TypeError(f"{what}: allocation must be a name ({_structured_names()}), got "
                        f"{type(allocation).__name__}. Per-group budgets go in sparsity= as "
                        "{group index or name: sparsity}.")
    alloc = _alloc.get(allocation, what)
    if alloc.units is None:
        raise ValueError(f"{what}: allocation {allocation!r} has no structured form; use one "
                         f"of {_structured_names()}.")
    return alloc


def _structured_names() -> list:
    return [n for n, a in _alloc.REGISTRY.items() if a.units is not None]


def leaf_masks(graph: ModelGraph, keep: dict) -> PyTree:
    """Bool masks of every leaf from the kept units of each group."""
    out: list = [jnp.ones((), jnp.bool_) for _ in graph.leaves]
    for g in graph.groups:
        if g.index not in keep:
            continue
        k = keep[g.index]
        for m in g.members:
            info = graph.leaves[m.leaf]
            pos = _position_keep(k, m.units, g)
            out[m.leaf] = out[m.leaf] & _broadcast_axis(pos, info, m.axis)
    return rebuild(graph.treedef, out, graph.static, fill=True)


def _position_keep(k: jax.Array, units: np.ndarray, g: Group) -> jax.Array:
    safe = np.maximum(units, 0)
    if g.layers:
        kept = k[np.arange(units.shape[0])[:, None], safe]
    else:
        kept = k[safe]
    return jnp.where(jnp.asarray(units >= 0), kept, True)


def _broadcast_axis(pos: jax.Array, info, axis: int) -> jax.Array:
    shape = [1] * len(info.shape)
    if info.layers and pos.ndim == 2:
        shape[0] = info.shape[0]
    shape[axis] = info.shape[axis]
    return jnp.broadcast_to(pos.reshape(shape), info.shape)


# --------------------------------------------------------------------------
# Compaction


def kept_units(graph: ModelGraph, masks: PyTree) -> dict:
    """Which units structured masks keep: ``{group index: bool array}``
    (``(size,)``, or ``(layers, size)``), for every group they prune.

    A unit is kept if any of its weights is kept in a member. ``masks`` may
    cover a subtree of the traced variables (Linen ``params`` only): leaves
    are matched by path and the others (running statistics) follow. Raises
    ``ValueError`` if masks remove part of a unit, or a unit of a group that
    cannot be pruned.
    """
    mleaves = _mask_leaves(graph, masks)
    out = {}
    for g in graph.groups:
        decisions = [(m.path, _unit_decision(mleaves[m.leaf], m, g, graph)) for m in g.members
                     if mleaves[m.leaf] is not None]
        if not decisions:
            continue
        first_path, first = decisions[0]
        for path, d in decisions[1:]:
            if not np.array_equal(d, first):
                bad = np.argwhere(d != first)[0]
                raise ValueError(
                    f"structured.compact: the masks do not prune group {g.name!r} as a whole: "
                    f"unit {tuple(int(i) for i in bad)} is "
                    f"{'kept' if first[tuple(bad)] else 'removed'} in {first_path!r} but not "
                    f"in {path!r}. Build the masks with jp.structured.masks(graph, ...).")
        if first.all():
            continue
        if not g.prunable:
            raise ValueError(f"structured.compact: the masks remove units of group {g.name!r}, "
                             f"which cannot be pruned: {'; '.join(g.reasons)}.")
        if g.layers and len(set(first.sum(axis=1).tolist())) > 1:
            raise ValueError(f"structured.compact: group {g.name!r} of a scanned stack keeps "
                             f"{first.sum(axis=1).tolist()} units per layer; a stack needs the "
                             "same count in every layer (jp.structured.masks ensures it).")
        out[g.index] = first
    return out


def _unit_decision(mask: Any, m, g: Group, graph: ModelGraph) -> np.ndarray:
    pos = _positions_kept(mask, graph.leaves[m.leaf], m.axis)
    shape = (g.layers, g.size) if g.layers else (g.size,)
    out = np.zeros(shape, bool)
    valid = m.units >= 0
    if g.layers:
        rows = np.broadcast_to(np.arange(m.units.shape[0])[:, None], m.units.shape)
        np.logical_or.at(out, (rows[valid], m.units[valid]), pos[valid])
    else:
        np.logical_or.at(out, m.units[valid], pos[valid])
    return out


def _positions_kept(mask: Any, info, axis: int) -> np.ndarray:
    """``any`` of a mask over every axis but ``axis`` (and a stack's layer
    axis), on the host. Reduced where the mask lives, so only one bool per
    position crosses devices or processes."""
    if np.ndim(mask) == 0:
        return np.broadcast_to(np.asarray(mask, bool), (info.shape[0], info.shape[axis])
                               if info.layers else (info.shape[axis],))
    keep_axes = (0, axis) if info.layers else (axis,)
    others = tuple(a for a in range(len(info.shape)) if a not in keep_axes)
    if isinstance(mask, jax.Array) and not mask.is_fully_addressable:
        from jax.experimental import multihost_utils

        pos = jax.jit(lambda m: jnp.any(m, axis=others))(mask)
        return np.asarray(multihost_utils.process_allgather(pos, tiled=True))
    mask = np.asarray(mask)
    return mask.any(axis=others) if others else mask


def compact(graph: ModelGraph, variables: PyTree, masks: PyTree) -> PyTree:
    """Removes the masked units: every member of a removed unit is sliced out.

    The result has the structure of ``variables`` with smaller arrays, and
    the traced function computes on it what it computes on
    ``jp.apply_masks(variables, masks)`` (any unstructured zeros of the masks
    are kept). Model code whose sizes are attributes needs them updated
    (see ``docs/DESIGN.md``, "Structured pruning"); plain functions that read
    sizes from array shapes run as they are.

    Args:
      graph: the model graph of ``variables``.
      variables: the variables to compact (concrete arrays).
      masks: structured masks (from :func:`masks`, or the masks of
        :func:`prune`); a subtree of the variables (e.g. Linen ``params``)
        is matched by path.

    Returns:
      The compacted variables. They save and restore with orbax like any
      pytree.

    Raises:
      ValueError: masks that cut a unit in part, prune a group that cannot be
        pruned, or keep unequal counts in the layers of a stack.

    Sharded variables (one process or many) stay on their devices: the unit
    decisions are reduced where the masks live (one bool per position of
    each group member crosses processes) and the slicing is a gather that
    XLA may reshard.
    """
    leaves = _arrays(graph, variables, "variables")
    mleaves = _mask_leaves(graph, masks)
    keep = kept_units(graph, masks)
    index = _kept_positions(graph, keep)
    out = []
    for j, (x, m) in enumerate(zip(leaves, mleaves)):
        axes = index.get(j, {})
        if not axes and (m is None or np.ndim(m) == 0):
            out.append(x)  # untouched: PRNG keys, counters, flags, unpruned leaves
            continue
        _check_sliceable(graph.leaves[j].path, x)
        xp = np if _on_host(x) and (m is None or _on_host(m)) else jnp
        x = xp.asarray(x)
        if m is not None and np.ndim(m):
            x = xp.where(xp.asarray(m), x, xp.zeros((), x.dtype))
        for axis, idx in sorted(axes.items()):
            x = _take(xp, x, idx, axis)
        out.append(jnp.asarray(x))
    return rebuild(graph.treedef, out, graph.static, fill=...)


def _check_sliceable(path: str, x: Any) -> None:
    """Raises ``TypeError`` for a PRNG key that compaction would have to cut."""
    if _tree.is_key(x):
        raise TypeError(
            f"structured.compact: leaf {path!r} is a PRNG key ({x.dtype}) but the masks or "
            "the graph's groups cut it. Keys are state, not weights: build the masks with "
            "jp.structured.masks (keys get a scalar True) and trace the model in inference "
            "mode, so that no removed unit reaches a key.")


def _on_host(x: Any) -> bool:
    """Whether slicing ``x`` with NumPy costs no transfer (a host array, or a
    jax array on the CPU of this process): no compile per leaf shape."""
    if isinstance(x, (np.ndarray, np.generic, bool)):
        return True
    return (isinstance(x, jax.Array) and x.is_fully_addressable
            and all(d.platform == "cpu" for d in x.devices()))


def _kept_positions(graph: ModelGraph, keep: dict) -> dict:
    """``{leaf: {axis: kept indices}}``: ``(n',)`` or ``(layers, n')``."""
    pos: dict = {}
    for g in graph.groups:
        if g.index not in keep:
            continue
        for m in g.members:
            p = np.asarray(_position_keep(keep[g.index], m.units, g))
            cur = pos.setdefault(m.leaf, {})
            cur[m.axis] = p if m.axis not in cur else (cur[m.axis] & p)
    out: dict = {}
    for j, axes in pos.items():
        for axis, p in axes.items():
            if p.ndim == 2:
                counts = p.sum(axis=1)
                if len(set(counts.tolist())) > 1:
                    raise ValueError(f"structured.compact: leaf {graph.leaves[j].path!r} keeps "
                                     f"{counts.tolist()} positions per layer on axis {axis}.")
                idx = np.stack([np.flatnonzero(r) for r in p])
            else:
                idx = np.flatnonzero(p)
            out.setdefault(j, {})[axis] = idx
    return out


def _take(xp, x, idx: np.ndarray, axis: int):
    """Kept positions along ``axis`` (``idx`` per layer for a stack)."""
    if idx.ndim == 1:
        return xp.take(x, idx, axis=axis)
    shape = [1] * x.ndim
    shape[0], shape[axis] = idx.shape
    return xp.take_along_axis(x, idx.reshape(shape), axis=axis)


def _mask_leaves(graph: ModelGraph, masks: PyTree) -> list:
    """Mask leaves aligned with the graph's leaves (``None`` where absent)."""
    paths, leaves, treedef = _tree.flatten(masks)
    if treedef.num_leaves == graph.treedef.num_leaves:
        return _arrays(graph, masks, "masks")
    gpaths = [info.path for info in graph.leaves]
    try:
        prefix = common_prefix(paths, gpaths)
    except ValueError:
        raise ValueError(
            f"structured: the masks match neither the traced variables ({len(gpaths)} leaves) "
            f"nor a subtree of them by path (mask paths {paths[:4]}...).") from None
    out: list = [None] * len(gpaths)
    for p, m in zip(paths, leaves):
        j = gpaths.index(prefix + p)
        if np.ndim(m) and tuple(np.shape(m)) != graph.leaves[j].shape:
            raise ValueError(f"structured: mask for leaf {p!r} has shape {np.shape(m)}, the "
                             f"variable has {graph.leaves[j].shape}.")
        out[j] = m
    return out


def _arrays(graph: ModelGraph, tree: PyTree, what: str) -> list:
    """The array leaves of ``tree``, checked against the graph."""
    _, leaves, treedef = _tree.flatten(tree)
    static = dict(graph.static)
    arrays = [x for i, x in enumerate(leaves) if i not in static]
    if treedef.num_leaves != graph.treedef.num_leaves or len(arrays) != len(graph.leaves):
        raise ValueError(
            f"structured: {what} does not match the traced variables ({len(arrays)} array "
            f"leaves vs {len(graph.leaves)}). Pass the tree that jp.graph.trace saw (or masks "
            "built for it).")
    for x, info in zip(arrays, graph.leaves):
        if what != "masks" and tuple(np.shape(x)) != info.shape:
            raise ValueError(f"structured: {what} leaf {info.path!r} has shape {np.shape(x)}, "
                             f"the graph traced {info.shape}.")
        if what == "masks" and np.ndim(x) and tuple(np.shape(x)) != info.shape:
            raise ValueError(f"structured: mask for leaf {info.path!r} has shape "
                             f"{np.shape(x)}, the variable has {info.shape}.")
    return arrays


# --------------------------------------------------------------------------
# Training: gradual structured pruning as an optax transformation


class StructuredState(NamedTuple):
    """State of :func:`prune`.

    Attributes:
      count: number of updates so far (int32).
      units: per pruned group, the bool array of its kept units.
      masks: bool mask tree with the structure of the parameters.
      key: PRNG key data (random scores).
      inner_state: the wrapped optimizer's state.
    """

    count: jax.Array
    units: tuple
    masks: PyTree
    key: jax.Array
    inner_state: optax.OptState


def prune(inner: optax.GradientTransformation, *, graph: ModelGraph, sparsity: Any,
          score: str | Callable = "l2", allocation: str = "uniform", round_to: int = 1,
          update_every: int = 100, groups: Any = None,
          seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so training removes whole units to a (scheduled) sparsity.

    Like :func:`jaxprune.prune`, with units instead of weights: every
    ``update_every`` steps (step 0 included) the units of the graph's groups
    are scored on the current parameters (and raw gradients, for
    ``"taylor"``) and :func:`masks` keeps the best at the scheduled
    structured sparsity; removed units stay removed (their score is
    ``-inf``). Gradients of masked weights are zeroed before ``inner`` and the
    updates are ``where(mask, u, -p)``, so every member of a removed unit is
    exactly zero after every step. At the end,
    ``jp.structured.compact(graph, variables, jp.get_masks(state))`` gives
    the smaller model.

    The parameters may be the traced variables or a subtree of them (Linen
    ``variables["params"]`` when the graph was traced on params and
    ``batch_stats``): leaves are matched by path.

    Args:
      inner: the optimizer to wrap.
      graph: the model graph (:func:`jaxprune.graph.trace`).
      sparsity: fraction of units removed per group: a number or an optax
        schedule of the step; or per-group budgets, a mapping from group
        index or name to a number or schedule (groups not in it are not
        pruned), e.g. :func:`jaxprune.allocation.from_sensitivity` of group
        curves or :func:`jaxprune.search`'s ``budget``.
      score: as in :func:`scores` (``"l2"``, ``"l1"``, ``"taylor"``,
        ``"bn_scale"``, ``"random"``).
      allocation: ``"uniform"`` or ``"global"`` (see :func:`masks`;
        ``"global"`` takes one sparsity, not a mapping).
      round_to: unit counts at multiples of this.
      update_every: mask-update period in steps.
      groups: which groups to prune (see :func:`masks`).
      seed: seed of the PRNG key used by random scores.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a
      :class:`StructuredState`; :func:`jaxprune.get_masks` finds its masks.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> params = {"a": jax.random.normal(k1, (4, 8)), "c": jax.random.normal(k2, (8, 2))}
      >>> f = lambda p, x: jnp.tanh(x @ p["a"]) @ p["c"]
      >>> g = jp.graph.trace(f, params, jnp.ones((1, 4)))
      >>> tx = jp.structured.prune(optax.adam(1e-2), graph=g, sparsity=0.5, update_every=5)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: tx.update(jax.grad(lambda p: f(p, jnp.ones((1, 4))).sum())(p), s, p))
      >>> for _ in range(6):
      ...     u, state = step(params, state)
      ...     params = optax.apply_updates(params, u)
      >>> jp.structured.compact(g, params, jp.get_masks(state))["a"].shape
      (4, 4)

    References:
      Zhu & Gupta 2017 (gradual schedules); Fang et al., DepGraph, CVPR 2023;
      Molchanov et al., CVPR 2019.
    """
    _check_prune_sparsity(sparsity, allocation)
    _check_group_keys(graph, sparsity, "structured.prune")
    if not callable(score) and score not in _UNIT_SCORES:
        raise ValueError(f"structured.prune: unknown score {score!r}; use one of "
                         f"{score_names()}.")
    with_grads = not callable(score) and _UNIT_SCORES[score].needs == "grads"
    _tb.check_positive_int(update_every, "structured.prune", "update_every")
    inner = optax.with_extra_args_support(inner)
    chosen = _chosen_groups(graph, tuple(() if g.prunable else None for g in graph.groups),
                            groups)
    rmap = _round_to_of(chosen, round_to)
    alloc = _structured_allocation(allocation, "structured.prune")

    def init_fn(params):
        _tb.check_arrays(params, "structured.prune")
        link = _link(graph, params)
        units = tuple(jnp.ones((g.layers, g.size) if g.layers else (g.size,), bool)
                      for g in chosen)
        return StructuredState(jnp.zeros((), jnp.int32), units,
                               _tb.initial_masks(params, link.where), _tb.seed_key(seed),
                               inner.init(params))

    def recompute(state, params, grads):
        link = _link(graph, params)
        key_data, key = _tb.split_key(state.key)
        full = link.to_graph(params)
        g_full = link.to_graph(grads) if with_grads else None
        sc = list(scores(graph, full, score, grads=g_full, key=key))
        for g, kept in zip(chosen, state.units):
            sc[g.index] = jnp.where(kept, sc[g.index], -jnp.inf)  # removed units stay removed
        s_now = ({k: _tb.schedule_value(v, state.count) for k, v in sparsity.items()}
                 if isinstance(sparsity, Mapping) else _tb.schedule_value(sparsity, state.count))
        keep = _keep_units(alloc, chosen, sc, s_now, rmap)
        masks_ = link.from_graph(leaf_masks(graph, dict(zip([g.index for g in chosen], keep))))
        # leaves no chosen group touches get a scalar True: give them the state's shapes
        masks_ = jax.tree.map(lambda m, old: jnp.broadcast_to(m, jnp.shape(old)), masks_,
                              state.masks)
        return {"units": tuple(keep), "masks": masks_, "key": key_data}

    def update_fn(updates, state, params=None, **extra_args):
        return _tb.scheduled_update(
            "structured.prune", inner, updates, state, params, extra_args,
            is_update=lambda s: s.count % update_every == 0,
            recompute=lambda s: recompute(s, params, updates),
            fields=("units", "masks", "key"))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_group_keys(graph: ModelGraph, sparsity: Any, what: str) -> None:
    """Every key of a per-group sparsity mapping names a group (a typo would
    otherwise leave that group unpruned without a word)."""
    if not isinstance(sparsity, Mapping):
        return
    known = {g.index for g in graph.groups} | {g.name for g in graph.groups}
    bad = [k for k in sparsity if k not in known]
    if bad:
        names = [g.name for g in graph.groups if g.prunable]
        raise ValueError(f"{what}: sparsity keys {bad!r} name no group of the graph; use group "
                         f"indices or names (prunable groups: {names}).")


def _check_prune_sparsity(sparsity: Any, allocation: str) -> None:
    alloc = _structured_allocation(allocation, "structured.prune")
    if not isinstance(sparsity, Mapping):
        _tb.check_schedule(sparsity)
        return
    if alloc.sparsities is None:
        raise ValueError(f"structured.prune: allocation={allocation!r} takes one sparsity (a "
                         "number or schedule), not per-group budgets; use "
                         "allocation='uniform' with a mapping.")
    for k, v in sparsity.items():
        _tb.check_schedule(v, f"sparsity[{k!r}]")


class _Link(NamedTuple):
    """How the parameters sit in the traced variables (matched by path)."""

    index: tuple  # per parameter leaf, its graph leaf
    shapes: tuple  # graph leaf shapes
    treedef: Any
    where: Any  # bool prefix tree: parameter leaves that some group touches

    def to_graph(self, tree: PyTree) -> list:
        leaves = jax.tree_util.tree_leaves(tree)
        out = [jnp.zeros(s, jnp.float32) for s in self.shapes]
        for x, j in zip(leaves, self.index):
            out[j] = x
        return out

    def from_graph(self, masks: PyTree) -> PyTree:
        leaves = jax.tree_util.tree_leaves(masks)
        return jax.tree_util.tree_unflatten(self.treedef, [leaves[j] for j in self.index])


def _link(graph: ModelGraph, params: PyTree) -> _Link:
    paths, leaves, treedef = _tree.flatten(params)
    gpaths = [info.path for info in graph.leaves]
    prefix = common_prefix(paths, gpaths)
    index = []
    for p, x in zip(paths, leaves):
        j = gpaths.index(prefix + p)
        if tuple(np.shape(x)) != graph.leaves[j].shape:
            raise ValueError(f"structured.prune: parameter {p!r} has shape {np.shape(x)}, the "
                             f"graph traced {graph.leaves[j].shape}.")
        index.append(j)
    members = {m.leaf for g in graph.groups if g.prunable for m in g.members}
    where = jax.tree_util.tree_unflatten(treedef, [j in members for j in index])
    return _Link(tuple(index), tuple(info.shape for info in graph.leaves), treedef, where)


def common_prefix(paths: list, gpaths: list) -> str:
    """The path prefix that maps a subtree's leaf ``paths`` (Linen ``params``)
    onto the graph's ``gpaths`` (the ``variables`` it traced)."""
    gset = set(gpaths)
    if not paths:
        raise ValueError("structured.prune: the parameters have no leaves.")
    for g in gpaths:
        if g.endswith(paths[0]):
            pre = g[: len(g) - len(paths[0])]
            if (not pre or pre.endswith("/")) and all(pre + p in gset for p in paths):
                return pre
    raise ValueError(
        "structured.prune: the parameters do not match the traced variables by path "
        f"(parameter paths {paths[:4]}..., traced {gpaths[:4]}...). Trace the graph on the "
        "variables these parameters come from (e.g. the Linen variables dict holding them "
        "under 'params').")

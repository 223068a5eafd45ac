"""One way to choose channel groups (``groups=``) and one table of weight roles.

Every function that acts on a graph's groups (``structured.masks``,
``structured.prune``, the regularizers, ``sensitivity.scan``, ``search``,
``allocation.uniform_budget`` / ``global_budget``) chooses them with
:func:`choose_groups`, so ``groups=`` means the same everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from jaxprune.graph._model import Group, ModelGraph

# The roles whose leaves are weights of a unit (pruned, scored, regularized):
# every role but running statistics ("stat") and "other".
WEIGHT_ROLES = ("kernel", "embedding", "bias", "norm")


def choose_groups(graph: ModelGraph, groups: Any = None, *, what: str,
                  empty_ok: bool = False) -> list[Group]:
    """The prunable groups that ``groups=`` chooses, in graph order.

    * ``None``: every prunable group but ``head_dims`` (attention code often
      reads the head size from a shape, which the jaxpr does not show; name
      them to prune them, see :class:`Group`);
    * a string: a regex searched in the group names, among the prunable
      groups (``head_dims`` included when it matches);
    * a callable ``Group -> bool``, asked about every prunable group;
    * a mapping ``{name or index: bool}`` or a sequence of bools aligned
      with ``graph.groups`` (as ``sensitivity.unit_stats`` returns them);
    * an iterable of group names or indices.

    Named groups (names, indices, ``True`` entries) must be prunable.

    Args:
      graph: from :func:`jaxprune.graph.trace`.
      groups: the selection (above).
      what: the public function asking, for error messages.
      empty_ok: return ``[]`` when nothing is chosen instead of raising
        (``structured.masks``: a model with nothing to prune keeps all).

    Returns:
      The chosen groups (a non-empty list; in graph order, or in the order
      names and indices were given).

    Raises:
      ValueError: an unknown name or index, a fixed group named, a bool
        sequence of the wrong length, or nothing chosen.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"a": {"w": jnp.ones((4, 8))}, "b": {"w": jnp.ones((8, 8))},
      ...      "c": {"w": jnp.ones((8, 2))}}
      >>> g = jp.graph.trace(lambda p, x: x @ p["a"]["w"] @ p["b"]["w"] @ p["c"]["w"], p,
      ...                    jnp.ones((1, 4)))
      >>> [x.name for x in jp.graph.choose_groups(g, "^b/", what="example")]
      ['b/w:1']
    """
    prunable = [g for g in graph.groups if g.prunable]
    if groups is None:
        out = [g for g in prunable if g.kind != "head_dims"]
    elif isinstance(groups, str):
        out = [g for g in prunable if re.search(groups, g.name)]
    elif callable(groups):
        out = [g for g in prunable if groups(g)]
    else:
        out = _named(graph, groups, what)
    if not out and not empty_ok:
        raise ValueError(f"{what}: groups={groups!r} chose no prunable group; print(graph) "
                         "lists the groups and why some are fixed.")
    return out


def _named(graph: ModelGraph, groups: Any, what: str) -> list[Group]:
    """Groups given by names, indices, or bools (mapping or aligned sequence)."""
    if isinstance(groups, Mapping):
        keys = [k for k, v in groups.items() if _flag(v, what)]
    else:
        groups = list(groups)
        if groups and all(isinstance(v, bool) for v in groups):
            if len(groups) != len(graph.groups):
                raise ValueError(f"{what}: {len(groups)} bools for {len(graph.groups)} groups; "
                                 "a bool sequence must be aligned with graph.groups.")
            keys = [i for i, v in enumerate(groups) if v]
        else:
            keys = groups
    names = {g.name: g for g in graph.groups}
    out = []
    for k in keys:
        if isinstance(k, str) and k in names:
            g = names[k]
        elif isinstance(k, int) and not isinstance(k, bool) and 0 <= k < len(graph.groups):
            g = graph.groups[k]
        else:
            raise ValueError(f"{what}: no group {k!r}; groups are {list(names)[:12]} "
                             f"(or indices 0..{len(graph.groups) - 1}).")
        if not g.prunable:
            raise ValueError(f"{what}: group {g.name!r} cannot be pruned: "
                             f"{'; '.join(g.reasons)}.")
        if g not in out:
            out.append(g)
    return out


def _flag(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{what}: a mapping groups= maps group names to bools, got {v!r}.")
    return v


def layer_counts(graph: ModelGraph, names: Sequence[str]) -> list[Any]:
    """The graph's layer count of every path (``None`` if not stacked); a
    path may also name a subtree's leaf (Linen ``params`` of traced
    ``variables``: ``layers/kernel`` is the graph's ``params/layers/kernel``)."""
    by_path = {info.path: info.layers for info in graph.leaves}
    out = []
    for p in names:
        if p in by_path:
            out.append(by_path[p])
            continue
        hits = [c for q, c in by_path.items() if q.endswith("/" + p)]
        out.append(hits[0] if len(hits) == 1 else None)
    return out

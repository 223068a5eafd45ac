"""The result of :func:`jaxprune.graph.trace`: leaf roles and channel groups."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

ROLES = ("kernel", "embedding", "bias", "norm", "stat", "other")


@dataclass(frozen=True)
class LeafInfo:
    """One variable leaf as the graph sees it.

    Attributes:
      path: the ``"/"``-joined key path.
      shape: its shape.
      role: ``"kernel"`` (dense, einsum or conv weights), ``"embedding"``
        (a table read by row lookups; ``tied`` if it is also a kernel),
        ``"bias"``, ``"norm"`` (scale or shift of a normalisation),
        ``"stat"`` (a running statistic), or ``"other"``.
      in_axes: axes contracted with the layer's input (kernels).
      out_axes: axes that index the layer's outputs (kernels, embeddings).
      layers: the length of its leading layer axis if it is a stacked
        (scanned) parameter, else ``None``.
      tied: an embedding also used as a kernel (tied input/output
        embeddings).
      macs: multiply-accumulates per call of the dots and convolutions that
        read it (scans counted per iteration).
      kind: for a norm parameter, ``"scale"`` or ``"shift"``.
    """

    path: str
    shape: tuple
    role: str
    in_axes: tuple = ()
    out_axes: tuple = ()
    layers: int | None = None
    tied: bool = False
    macs: int = 0
    kind: str = ""


@dataclass(frozen=True)
class Member:
    """Where a group's units sit in one leaf.

    ``units[..., i]`` is the unit (within the group) that position ``i`` of
    axis ``axis`` belongs to, or -1. For a stacked leaf ``units`` has shape
    ``(layers, n)`` (one row per layer); otherwise ``(n,)``.
    """

    path: str
    leaf: int
    axis: int
    units: np.ndarray

    def positions(self, unit: int) -> np.ndarray:
        """The positions of ``unit`` on the axis (``(layer, index)`` pairs for
        a stacked leaf)."""
        return np.argwhere(self.units == unit) if self.units.ndim > 1 else \
            np.flatnonzero(self.units == unit)


@dataclass(frozen=True)
class Group:
    """A set of coupled channels: every unit must be kept or removed whole.

    Attributes:
      index: position in :attr:`ModelGraph.groups`.
      name: the producing leaf and axis, e.g. ``"Conv_0/kernel:3"``.
      size: units per layer (per group when ``layers`` is None).
      layers: for the units of a scanned stack, one set of ``size`` units per
        layer (unit ``u`` is unit ``u % size`` of layer ``u // size``).
      members: where the units sit in each leaf.
      prunable: whether units may be removed.
      reasons: why not, when not prunable.
      kind: ``"heads"`` (units index attention heads: batch axes of a product
        of two activations, e.g. queries and keys), ``"head_dims"`` (the axis
        contracted between queries and keys, and the value axis carried to
        the output: most attention code scales scores by ``1/sqrt(head_dim)``
        read from the shape, and ``jax.nn.dot_product_attention`` requires
        equal query and value head sizes, checks the jaxpr does not show, so
        :func:`jaxprune.structured.masks` prunes them only when named), or
        ``"channels"`` (neurons, filters, residual channels).
      heads_per_unit: for ``"heads"``, the query heads in one unit (2 for GQA
        with 2 query heads per key/value head); else 0.
      notes: caveats of a prunable group, e.g. that it feeds a normalisation
        (allowed by ``allow_reductions``: removing its units changes the
        normalisation statistics, so the compacted model differs from the
        masked one).
    """

    index: int
    name: str
    size: int
    layers: int | None
    members: tuple[Member, ...]
    prunable: bool
    reasons: tuple[str, ...] = ()
    kind: str = "channels"
    heads_per_unit: int = 0
    notes: tuple[str, ...] = ()

    @property
    def units(self) -> int:
        """The number of units in all layers."""
        return self.size * (self.layers or 1)


@dataclass
class ModelGraph:
    """Leaf roles, coupled channel groups and MACs of a traced model.

    Print it for a table. The role trees (:attr:`kernels`, :attr:`biases`,
    :attr:`norms`, :attr:`stats`, :attr:`embeddings`) are bool trees with the
    structure of the traced variables, usable as ``where=``.
    """

    leaves: tuple[LeafInfo, ...]
    groups: tuple[Group, ...]
    treedef: Any
    macs: int
    static: tuple = ()  # (index, value) of non-array leaves, for rebuilding trees
    trace_seconds: float = 0.0
    extras: dict = field(default_factory=dict)

    # ---- role trees
    def role_tree(self, *roles: str) -> Any:
        """A bool tree: leaves whose role is one of ``roles``."""
        return self._tree([info.role in roles for info in self.leaves])

    @property
    def kernels(self) -> Any:
        """Dense, einsum and conv weights (``where=graph.kernels``)."""
        return self.role_tree("kernel")

    @property
    def embeddings(self) -> Any:
        return self.role_tree("embedding")

    @property
    def biases(self) -> Any:
        return self.role_tree("bias")

    @property
    def norms(self) -> Any:
        return self.role_tree("norm")

    @property
    def stats(self) -> Any:
        return self.role_tree("stat")

    @property
    def stacked(self) -> Any:
        """Leaves read inside a ``scan`` over layers (a stacked kernel's axis 0
        is its layer axis); usable as ``layers=`` of the mask functions and
        transforms (or pass the graph itself, which also checks the counts)."""
        return self._tree([info.layers is not None for info in self.leaves])

    def _tree(self, values: list) -> Any:
        return rebuild(self.treedef, values, self.static, fill=False)

    # ---- lookups
    def leaf(self, path: str) -> LeafInfo:
        for info in self.leaves:
            if info.path == path:
                return info
        raise KeyError(f"no leaf {path!r}; leaves are {[i.path for i in self.leaves][:20]}")

    @property
    def prunable(self) -> tuple[Group, ...]:
        """The groups whose units may be removed."""
        return tuple(g for g in self.groups if g.prunable)

    def groups_of(self, path: str) -> tuple[Group, ...]:
        """The groups with a member in leaf ``path``."""
        return tuple(g for g in self.groups if any(m.path == path for m in g.members))

    # ---- printing
    def __str__(self) -> str:
        return "\n".join([*_leaf_table(self.leaves), "", *_group_table(self.groups),
                          "", f"MACs per call: {self.macs:,}"])

    __repr__ = __str__


def rebuild(treedef, values: list, static: tuple, fill: Any) -> Any:
    """A tree of ``treedef`` from values of the array leaves (non-array leaves
    get ``fill``, or their own value if ``fill`` is ``...``)."""
    total = treedef.num_leaves
    out, it, stat = [], iter(values), dict(static)
    for i in range(total):
        if i in stat:
            out.append(stat[i] if fill is ... else fill)
        else:
            out.append(next(it))
    return jax.tree_util.tree_unflatten(treedef, out)


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _leaf_table(leaves) -> list[str]:
    w = max([len(i.path) for i in leaves] + [4])
    lines = [f"{'leaf':<{w}}  {'shape':>18}  {'role':<9}  {'in':>6}  {'out':>6}  layers"]
    for i in leaves:
        role = i.role + ("*" if i.tied else "")
        lines.append(f"{i.path:<{w}}  {str(i.shape):>18}  {role:<9}  {str(i.in_axes):>6}  "
                     f"{str(i.out_axes):>6}  {i.layers or ''}")
    return lines


def _group_table(groups) -> list[str]:
    lines = [f"{len(groups)} channel groups ({sum(g.prunable for g in groups)} prunable):"]
    for g in groups:
        units = f"{g.size} x {g.layers} layers" if g.layers else f"{g.size}"
        units += "" if g.kind == "channels" else f" {g.kind}"
        units += f" ({g.heads_per_unit} query heads each)" if g.heads_per_unit > 1 else ""
        where = ", ".join(f"{m.path}:{m.axis}" for m in g.members[:6])
        more = f" (+{len(g.members) - 6})" if len(g.members) > 6 else ""
        state = "prunable" if g.prunable else "fixed: " + "; ".join(g.reasons[:2])
        state += "".join(f" (note: {n})" for n in g.notes)
        lines.append(f"  [{g.index}] {g.name}  units {units}  {state}\n      {where}{more}")
    return lines

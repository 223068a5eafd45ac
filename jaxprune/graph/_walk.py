"""The walker: abstract interpretation of a jaxpr over axis descriptors.

A value's descriptor is a :class:`V`: its axes (tuples of factors, see
:mod:`jaxprune.graph._desc`), the axis holding its layer copies (a stacked
parameter or the stacked outputs of a ``scan``; ``None`` otherwise) and a
:class:`Meta` used to tell leaf roles apart (kernels, biases, norm
parameters, running statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from jax.extend import core as jcore

from jaxprune.graph._desc import BCAST, BlockDim, Context, codes, fsize
from jaxprune.graph.sites import interpret

ACT, PARAM, CONST = "act", "param", "const"


class Meta(NamedTuple):
    """What a value is made of: ``kind`` is ``"act"`` (depends on the model
    inputs), ``"param"`` (only on variables and constants) or ``"const"``;
    ``leaf`` is the variable leaf it *is* (up to reshapes and casts), else
    -1; ``leaves`` the leaves it depends on (for ``"param"``); ``tags``
    mark inverse standard deviations (``"inv"``, ``"sqrt"``) and normalised
    activations (``"normed"``)."""

    kind: str = CONST
    leaf: int = -1
    leaves: frozenset = frozenset()
    tags: frozenset = frozenset()


class V(NamedTuple):
    """The descriptor of one traced value."""

    axes: tuple
    layer: int | None = None
    meta: Meta = Meta()

    @property
    def rank(self) -> int:
        return len(self.axes)

    def shape(self) -> tuple[int, ...]:
        return tuple(int(np.prod([fsize(f) for f in ax])) if ax else 1 for ax in self.axes)


Rule = Callable[["Walker", Any, list], list]


@dataclass
class Site:
    """A dot or conv: its MACs per call and the leaves it multiplies."""

    primitive: str
    macs: int
    leaves: tuple[int, ...]


@dataclass
class Walker(Context):
    """Walks jaxprs with per-primitive rules, recording couplings and uses."""

    rules: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)  # leaf -> {role: axes info}
    sites: list = field(default_factory=list)
    scale: int = 1  # trip count of the enclosing loops (for MACs)
    allow_reductions: bool = False
    noted: list = field(default_factory=list)  # ids reduced over, when allowed
    head_axes: list = field(default_factory=list)  # per attention batch axis: ids per head
    head_dim_ids: list = field(default_factory=list)  # ids contracted between activations

    # ---- descriptors of values with no ids
    def blank(self, shape, code: int, meta: Meta | None = None) -> V:
        """A descriptor with one code per position (size-1 axes broadcast)."""
        meta = Meta() if meta is None else meta
        return V(tuple((codes(n, BCAST if n == 1 else code),) for n in shape), None, meta)

    def constant(self, shape) -> V:
        return self.blank(shape, self.reason("a constant array (it cannot be sliced)"))

    def opaque(self, shape, primitive: str, meta: Meta | None = None) -> V:
        meta = Meta(ACT) if meta is None else meta
        return self.blank(shape, self.reason(f"an unknown primitive `{primitive}` "
                                             "(register a rule with jp.graph.register)"), meta)

    # ---- walking
    def walk(self, jaxpr: jcore.Jaxpr, consts: list, ins: list) -> list:
        def step(eqn, args):
            rule = self.rules.get(eqn.primitive)
            return self.unknown(eqn, args) if rule is None else rule(self, eqn, args)

        return interpret(jaxpr, consts, ins, step, lambda val: self.constant(np.shape(val)))

    def walk_closed(self, closed: Any, ins: list) -> list:
        if isinstance(closed, jcore.ClosedJaxpr):
            consts = [self.constant(np.shape(c)) for c in closed.consts]
            return self.walk(closed.jaxpr, consts, ins)
        return self.walk(closed, [], ins)

    def unknown(self, eqn: Any, args: list) -> list:
        """No rule: pin every id of the inputs; outputs are opaque."""
        name = eqn.primitive.name
        text = (f"an unknown primitive `{name}` (register a rule with "
                "jp.graph.register)")
        for a in args:
            self.pin_desc(a.axes, text)
        meta = combine_meta(args)
        return [self.opaque(v.aval.shape, name, meta) for v in eqn.outvars]

    # ---- copies (stacked layers)
    def strip(self, d: V) -> V:
        """Collapses the layer copies of ``d`` (couples every layer's ids)."""
        if not any(isinstance(f, np.ndarray) and f.ndim > 1 for ax in d.axes for f in ax) and \
                not any(isinstance(f, BlockDim) and f.block.ids.ndim > f.block.ndims
                        for ax in d.axes for f in ax):
            return d._replace(layer=None)
        axes = tuple(tuple(self.collapse(f) for f in self.as_arrays(ax)) for ax in d.axes)
        return V(axes, None, d.meta)

    def same_layers(self, ds: list) -> list:
        """Operands whose copies line up keep them; otherwise all collapse."""
        layers = {d.layer for d in ds if has_copies(d)}
        if len(layers) <= 1:
            return ds
        return [self.strip(d) for d in ds]

    # ---- coupling whole values
    def unify_vars(self, a: V, b: V, pairs: list) -> list:
        """Couples axis ``i`` of ``a`` with axis ``j`` of ``b`` for each pair
        ``(i, j)``; returns the merged factors of each pair."""
        matched = self._match_blocks(a, b, pairs)
        return [self._unify_axis(a.axes[i], b.axes[j], matched) for i, j in pairs]

    def _unify_axis(self, fa: tuple, fb: tuple, matched: set) -> tuple:
        """Couples two axes of the same length, factor by factor where their
        factors line up, else position by position."""
        if [fsize(f) for f in fa] != [fsize(f) for f in fb]:
            return (self.unify_factor(self.flatten(fa), self.flatten(fb)),)
        out = []
        for x, y in zip(fa, fb):
            kx, ky = _kept(x, matched), _kept(y, matched)
            if kx and ky and id(x.block) in matched and id(y.block) in matched:
                out.append(x)
            elif kx and _is_bcast(y) or ky and _is_bcast(x):
                out.append(x if kx else y)
            else:
                out.append(self.unify_factor(self._array(x), self._array(y)))
        return tuple(out)

    def current(self, ax: tuple) -> tuple:
        """The factors of an axis with resolved blocks read as arrays."""
        return tuple(self._array(f) if isinstance(f, BlockDim) and f.block.resolved is not None
                     else f for f in ax)

    def _array(self, f):
        return self.resolve(f.block)[f.dim] if isinstance(f, BlockDim) else f

    def _match_blocks(self, a: V, b: V, pairs: list) -> None:
        """Blocks laid out the same way on both sides are coupled id by id;
        a block facing only broadcasts stays; any other block is resolved."""
        sa, sb = _block_sites(a, [i for i, _ in pairs]), _block_sites(b, [j for _, j in pairs])
        matched = set()
        for blk, sites in sa.items():
            facing = [_factor_at(b, pairs[k][1], j) for k, j, _ in sites]
            twin = _mirror(blk, sites, facing, sb)
            if twin is not None:
                self.edge(blk.ids, twin.ids)
                matched.update((id(blk), id(twin)))
            elif not all(_is_bcast(f) for f in facing):
                self.resolve(blk)
        for blk, sites in sb.items():
            if id(blk) in matched or blk.resolved is not None:
                continue
            facing = [_factor_at(a, pairs[k][0], j) for k, j, _ in sites]
            if not all(_is_bcast(f) for f in facing):
                self.resolve(blk)
        return matched

    # ---- uses, for roles and MACs
    def use(self, leaf: int, role: str, **info) -> None:
        if leaf >= 0:
            self.roles.setdefault(leaf, {}).setdefault(role, []).append(info)

    def site(self, primitive: str, macs: int, leaves: tuple) -> None:
        self.sites.append(Site(primitive, int(macs) * self.scale, leaves))


def has_copies(d: V) -> bool:
    for ax in d.axes:
        for f in ax:
            arr = f.block.ids if isinstance(f, BlockDim) else f
            nd = f.block.ndims if isinstance(f, BlockDim) else 1
            if arr.ndim > nd:
                return True
    return False


def combine_meta(args: list, tags: frozenset = frozenset()) -> Meta:
    kinds = {a.meta.kind for a in args}
    if ACT in kinds:
        return Meta(ACT, -1, frozenset(), tags)
    leaves = frozenset().union(*[a.meta.leaves | ({a.meta.leaf} if a.meta.leaf >= 0 else set())
                                 for a in args]) if args else frozenset()
    return Meta(PARAM if leaves else CONST, -1, leaves, tags)


def _block_sites(d: V, axes: list) -> dict:
    """Blocks of ``d`` all of whose dimensions sit on ``axes``:
    ``{block: [(pair index, factor index, dim)]}``."""
    sites: dict = {}
    outside = set()
    for i, ax in enumerate(d.axes):
        for j, f in enumerate(ax):
            if isinstance(f, BlockDim) and f.block.resolved is None:
                if i in axes:
                    sites.setdefault(f.block, []).append((axes.index(i), j, f.dim))
                else:
                    outside.add(f.block)
    return {b: s for b, s in sites.items() if b not in outside and len(s) == b.ndims}


def _factor_at(d: V, axis: int, j: int):
    ax = d.axes[axis]
    return ax[j] if j < len(ax) else None


def _kept(f, matched: set) -> bool:
    """A block factor that stays a block (matched, or facing broadcasts)."""
    del matched
    return isinstance(f, BlockDim) and f.block.resolved is None


def _is_bcast(f) -> bool:
    return isinstance(f, np.ndarray) and bool((f == BCAST).all())


def _mirror(blk, sites: list, facing: list, sites_b: dict):
    """The block of the other side laid out exactly like ``blk``, if any."""
    if not facing or not all(isinstance(f, BlockDim) for f in facing):
        return None
    twin = facing[0].block
    if any(f.block is not twin for f in facing) or twin.resolved is not None:
        return None
    if twin.dims != blk.dims or twin not in sites_b:
        return None
    if any(f.dim != d for f, (_, _, d) in zip(facing, sites)):
        return None
    return twin if sorted(sites) == sorted(sites_b[twin]) else None

"""Axis descriptors: what every position of every axis of a traced value is.

The graph is built by abstract interpretation of a jaxpr. Each intermediate
value gets a *descriptor*: for each of its axes, a tuple of *factors*
(outer to inner; their sizes multiply to the axis length). A factor is

* an ``int64`` array of shape ``(size, *copies)`` whose entries are
  *element ids* (``>= 0``: one position of one axis of one variable leaf)
  or codes: ``BCAST`` (a broadcast constant: no constraint) or a *blocking*
  code ``<= -2`` (the position comes from something that cannot be pruned:
  the model input, a constant array, an unknown primitive...). The trailing
  ``copies`` axes hold one id per layer of a scanned stack (see ``Layers``);
* or a :class:`BlockDim`: one dimension of a :class:`Block`, an id array
  shared by several factors, made when a reshape splits an axis that holds
  ids (``(B, T, H * hd) -> (B, T, H, hd)``). A block keeps the exact ids until
  an operation treats its dimensions differently; then it is *resolved*:
  every index of its first dimension becomes one unit (heads), the other
  dimensions become opaque.

Elements that must be pruned together are *coupled*: the context records
edges between element ids (an undirected graph, solved at the end) and
*pins* (elements that cannot be pruned, with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BCAST = -1  # a broadcast value: couples nothing


@dataclass(eq=False)
class Block:
    """Ids of a split axis, ``ids.shape == (*dims, *copies)``."""

    ids: np.ndarray
    ndims: int
    resolved: tuple | None = None  # per dim: the factor array after resolution

    @property
    def dims(self) -> tuple[int, ...]:
        return self.ids.shape[: self.ndims]


@dataclass(frozen=True, eq=False)
class BlockDim:
    block: Block
    dim: int

    @property
    def size(self) -> int:
        return self.block.dims[self.dim]


def fsize(f) -> int:
    return f.size if isinstance(f, BlockDim) else f.shape[0]


def codes(n: int, code: int) -> np.ndarray:
    return np.full((n,), code, np.int64)


def _pad(a: np.ndarray, nd: int) -> np.ndarray:
    return a.reshape(a.shape + (1,) * (nd - a.ndim))


@dataclass
class Context:
    """Edges, pins and reasons collected while walking a jaxpr."""

    reasons: list[str] = field(default_factory=list)
    edges_a: list[np.ndarray] = field(default_factory=list)
    edges_b: list[np.ndarray] = field(default_factory=list)
    pins: list[tuple[np.ndarray, int]] = field(default_factory=list)

    # ---- reasons and codes
    def reason(self, text: str) -> int:
        """A blocking code for ``text`` (``<= -2``)."""
        if text not in self.reasons:
            self.reasons.append(text)
        return -2 - self.reasons.index(text)

    def text(self, code: int) -> str:
        return self.reasons[-2 - int(code)]

    # ---- edges and pins
    def edge(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(*align(a, b))
        ok = (a >= 0) & (b >= 0) & (a != b)
        if ok.any():
            self.edges_a.append(a[ok].ravel())
            self.edges_b.append(b[ok].ravel())

    def pin(self, ids: np.ndarray, code: int) -> None:
        """Pins the ids (``>= 0`` entries) of ``ids`` for the blocking ``code``."""
        ids = np.asarray(ids).ravel()
        ids = ids[ids >= 0]
        if ids.size:
            self.pins.append((ids, -2 - int(code)))

    def pin_text(self, ids: np.ndarray, text: str) -> None:
        self.pin(ids, self.reason(text))

    def pin_desc(self, desc, text: str) -> None:
        """Pins every id of a descriptor (all its factors, blocks included)."""
        code = self.reason(text)
        for ax in desc:
            for f in ax:
                self.pin(f.block.ids if isinstance(f, BlockDim) else f, code)

    # ---- factor algebra
    def unify_factor(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Positions of ``a`` and ``b`` are the same positions: couple ids,
        pin ids that meet a blocking code; returns the merged factor."""
        a, b = np.broadcast_arrays(*align(a, b))
        la, lb = a >= 0, b >= 0
        self.edge(a, b)
        self._pin_meeting(a, la & (b <= -2), b)
        self._pin_meeting(b, lb & (a <= -2), a)
        return np.where(la, a, np.where(lb, b, np.where(a <= -2, a, b)))

    def _pin_meeting(self, ids, where, other) -> None:
        if where.any():
            for code in np.unique(other[where]):
                self.pin(ids[where & (other == code)], int(code))

    def collapse(self, f: np.ndarray) -> np.ndarray:
        """Drops the copies axes of a factor, coupling each position's copies."""
        if f.ndim == 1:
            return f
        flat = f.reshape(f.shape[0], -1)
        first = _first_labeled(flat, axis=1)
        self.edge(first[:, None], flat)
        return first

    def split(self, f: np.ndarray, a: int, b: int) -> Block:
        """A factor of ``a * b`` positions as an ``(a, b)`` block."""
        return Block(f.reshape((a, b) + f.shape[1:]), 2)

    def resolve(self, blk: Block) -> tuple:
        """Resolves a block: index ``i`` of its first dimension becomes one
        unit (every id with that index is coupled); the other dimensions
        become opaque (they split units, so they cannot be pruned alone)."""
        if blk.resolved is None:
            d0 = blk.dims[0]
            rows = blk.ids.reshape((d0, -1) + blk.ids.shape[blk.ndims:])
            first = _first_labeled(np.moveaxis(rows, 1, -1), axis=-1)
            self.edge(first[:, None], rows)
            inner = self.reason("a channel axis split by a reshape (e.g. into heads x head "
                                "dims): only whole units of the outer axis can be pruned")
            has = bool((blk.ids >= 0).any())
            rest = [codes(n, inner) if has else np.moveaxis(blk.ids, i, 0).reshape(
                n, -1)[:, 0].copy() for i, n in enumerate(blk.dims) if i > 0]
            blk.resolved = (first, *rest)
        return blk.resolved

    def as_arrays(self, ax: tuple) -> tuple:
        """The factors of an axis with every block resolved."""
        return tuple(self.resolve(f.block)[f.dim] if isinstance(f, BlockDim) else f for f in ax)

    def flatten(self, ax: tuple) -> np.ndarray:
        """One factor for an axis: per position, the ids of its first
        labelled coordinate (a whole block counts as one coordinate when all
        its dimensions are on this axis); other labelled coordinates are
        pinned (an axis position cannot belong to two units)."""
        if len(ax) == 1 and not isinstance(ax[0], BlockDim):
            return ax[0]
        ax = self._whole_blocks_or_resolve(ax)
        coords = _coordinates(ax)
        return self._first_coordinate(coords)

    def _whole_blocks_or_resolve(self, ax: tuple) -> tuple:
        present: dict[int, list[int]] = {}
        for f in ax:
            if isinstance(f, BlockDim):
                present.setdefault(id(f.block), []).append(f.dim)
        out = []
        for f in ax:
            if isinstance(f, BlockDim) and sorted(present[id(f.block)]) != list(
                    range(f.block.ndims)):
                f = self.resolve(f.block)[f.dim]
            out.append(f)
        return tuple(out)

    def _first_coordinate(self, coords: list[np.ndarray]) -> np.ndarray:
        stack = np.stack(np.broadcast_arrays(*align(*coords)))  # (k, N, *C)
        lab = stack >= 0
        if lab.any():
            pick = np.argmax(lab, axis=0)
            chosen = np.take_along_axis(stack, pick[None], 0)[0]
            others = lab & (np.arange(len(coords)).reshape((-1,) + (1,) * (stack.ndim - 1)) != pick)
            if others.any():
                self.pin_text(stack[others], "an axis position that belongs to two channel "
                              "axes at once (two labelled axes merged into one)")
        else:
            chosen = stack[0]
        blocking = stack <= -2
        first_block = np.take_along_axis(stack, np.argmax(blocking, axis=0)[None], 0)[0]
        fallback = np.where(blocking.any(0), first_block, BCAST)
        return np.where(chosen >= 0, chosen, fallback)


def align(*arrays: np.ndarray) -> list[np.ndarray]:
    """Pads copies axes so that arrays of shape ``(n, *copies)`` broadcast."""
    nd = max(a.ndim for a in arrays)
    return [_pad(np.asarray(a), nd) for a in arrays]


def _first_labeled(x: np.ndarray, axis: int) -> np.ndarray:
    lab = x >= 0
    pick = np.argmax(lab, axis=axis)
    first = np.take_along_axis(x, np.expand_dims(pick, axis), axis).squeeze(axis)
    return np.where(lab.any(axis=axis), first, np.take(x, 0, axis=axis))


def _coordinates(ax: tuple) -> list[np.ndarray]:
    """Per position of an axis (row-major over its factors), one array per
    coordinate: array factors, and whole blocks (ids at that position)."""
    sizes = [fsize(f) for f in ax]
    n = int(np.prod(sizes)) if sizes else 1
    idx = np.unravel_index(np.arange(n), sizes) if sizes else ()
    coords, seen = [], set()
    for i, f in enumerate(ax):
        if isinstance(f, BlockDim):
            if id(f.block) in seen:
                continue
            seen.add(id(f.block))
            where = [j for j, g in enumerate(ax) if isinstance(g, BlockDim) and g.block is f.block]
            order = [ax[j].dim for j in where]
            sub = tuple(idx[where[order.index(d)]] for d in range(f.block.ndims))
            coords.append(f.block.ids[sub])
        else:
            coords.append(f[idx[i]])
    return coords

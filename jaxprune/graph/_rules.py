"""Per-primitive rules: how each primitive couples the axes of its operands.

A rule is ``rule(walker, eqn, args) -> outs``: ``args`` are the operands'
descriptors (:class:`~jaxprune.graph._walk.V`), ``outs`` one descriptor per
output. Rules are keyed on the primitive objects of the installed JAX;
:func:`jaxprune.graph.register` adds or replaces one.
"""

from __future__ import annotations

import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from jaxprune.graph._desc import BCAST, Block, BlockDim, align, codes, fsize
from jaxprune.graph._walk import ACT, PARAM, Meta, V, Walker, combine_meta

RULES: dict = {}


def rule(*prims):
    def deco(fn):
        for p in prims:
            if p is not None:
                RULES[p] = fn
        return fn

    return deco


def primitive(name: str):
    """A primitive of the installed JAX by attribute name (``"scan_p"``), or
    None where this JAX has none (rules for it are then not registered)."""
    return getattr(P, name, None) or getattr(lax, name, None)


# --------------------------------------------------------------------------
# Pass-through and elementwise


PASS = [primitive(n) for n in ("convert_element_type_p", "copy_p", "reduce_precision_p",
                        "stop_gradient_p", "sharding_constraint_p", "optimization_barrier_p")]
UNARY = [primitive(n + "_p") for n in (
    "neg exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh "
    "acosh atanh sqrt rsqrt cbrt abs sign floor ceil round is_finite not integer_pow square "
    "erf erfc erf_inv lgamma digamma real imag conj population_count clz bessel_i0e "
    "bessel_i1e").split()]
BINARY = [primitive(n + "_p") for n in (
    "add sub mul div max min pow atan2 rem and or xor eq ne lt le gt ge nextafter shift_left "
    "shift_right_logical shift_right_arithmetic add_jaxvals complex igamma igammac "
    "polygamma zeta select_n clamp").split()]


@rule(*PASS)
def passthrough(w: Walker, eqn, args):
    """One output per operand, unchanged (casts, copies, sharding); the
    rule ``jaxprune.graph.rules.passthrough``."""
    return list(args[: len(eqn.outvars)])


@rule(primitive("device_put_p"))
def _device_put(w, eqn, args):
    return list(args)


@rule(*UNARY, *BINARY)
def elementwise(w: Walker, eqn, args):
    """Same-shape operands (scalars broadcast): position i of every operand
    is position i of the output; the rule ``jaxprune.graph.rules.elementwise``."""
    shape = eqn.outvars[0].aval.shape
    full = w.same_layers([a for a in args if a.rank == len(shape) and a.rank])
    meta = _elementwise_meta(w, eqn, args)
    if not full:
        return [w.blank(shape, BCAST, meta)]
    out = full[0]
    for other in full[1:]:
        axes = w.unify_vars(out, other, [(i, i) for i in range(len(shape))])
        out = V(tuple(axes), out.layer if out.layer is not None else other.layer, meta)
    return [out._replace(meta=meta)]


def _elementwise_meta(w: Walker, eqn, args) -> Meta:
    """Kinds and tags for roles: norm scales and shifts, running statistics."""
    prim = eqn.primitive
    tags = _tags(prim, args)
    meta = combine_meta(args, tags)
    acts = [a for a in args if a.meta.kind == ACT]
    leaves = [(k, a) for k, a in enumerate(args) if a.meta.leaf >= 0]
    if prim in (P.rsqrt_p, P.sqrt_p) or (prim is P.div_p and len(args) == 2):
        den = args[-1] if prim is P.div_p else args[0]
        if den.meta.kind == PARAM or den.meta.leaf >= 0:
            for leaf in den.meta.leaves | {den.meta.leaf}:
                w.use(leaf, "stat")
    if leaves and len(args) == 2:
        for k, a in leaves:
            other = args[1 - k]
            if other.meta.kind == ACT or (prim is P.mul_p and other.meta.tags & {"inv"}):
                _leaf_role(w, prim, k, a, other)
    if not acts and leaves and all(a.rank == leaves[0][1].rank for a in args if a.rank):
        meta = meta._replace(leaf=leaves[0][1].meta.leaf)  # a kernel times a mask
    return meta


def _leaf_role(w: Walker, prim, k: int, leaf: V, other: V) -> None:
    if prim is P.mul_p:
        if other.meta.tags & {"inv", "normed"}:
            w.use(leaf.meta.leaf, "norm", kind="scale")
        else:
            w.use(leaf.meta.leaf, "scale")
    elif prim in (P.add_p, P.sub_p):
        if "normed" in other.meta.tags:
            w.use(leaf.meta.leaf, "norm", kind="shift")
        elif prim is P.sub_p and k == 1:
            w.use(leaf.meta.leaf, "stat")
        elif _varies_along_free_axis(leaf, other):
            # A learned position table (x + pos[:t]): it varies along an
            # activation axis that carries no channel (the sequence), which
            # a bias never does.
            chans = [a for a in range(min(leaf.rank, other.rank)) if _has_ids(other.axes[a])]
            w.use(leaf.meta.leaf, "embedding", ids_out=_ids(leaf, chans))
        else:
            w.use(leaf.meta.leaf, "bias")


def _has_ids(ax) -> bool:
    return any(np.any((f.block.ids if isinstance(f, BlockDim) else f) >= 0) for f in ax)


def _varies_along_free_axis(leaf: V, other: V) -> bool:
    """Whether ``leaf`` has element ids on an axis (longer than 1) on which
    the activation ``other`` has none."""
    if leaf.rank != other.rank:
        return False
    return any(_has_ids(la) and not _has_ids(oa) and n > 1
               for la, oa, n in zip(leaf.axes, other.axes, leaf.shape()))


def _tags(prim, args) -> frozenset:
    tags = [a.meta.tags for a in args]
    if prim is P.rsqrt_p:
        return frozenset({"inv"})
    if prim is P.sqrt_p:
        return frozenset({"sqrt"})
    if prim is P.div_p and len(args) == 2 and "sqrt" in tags[1]:
        return frozenset({"normed" if args[0].meta.kind == ACT else "inv"})
    if prim is P.mul_p and len(args) == 2:
        kinds = [a.meta.kind for a in args]
        if any("normed" in t for t in tags):
            return frozenset({"normed"})
        if any("inv" in t for t in tags):
            both_act = kinds.count(ACT) == 2
            inv_side = 0 if "inv" in tags[0] else 1
            if both_act or (kinds[1 - inv_side] == ACT and kinds[inv_side] != ACT):
                return frozenset({"normed"})
            return frozenset({"inv"})
    if prim in (P.add_p, P.sub_p) and any("normed" in t for t in tags):
        return frozenset({"normed"})
    return frozenset()


# --------------------------------------------------------------------------
# Shape ops


@rule(P.broadcast_in_dim_p)
def _broadcast(w: Walker, eqn, args):
    x = args[0]
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    axes = []
    for k, n in enumerate(shape):
        if k in dims and x.shape()[dims.index(k)] == n:
            axes.append(x.axes[dims.index(k)])
        else:
            axes.append((codes(n, BCAST),))
    layer = dims[x.layer] if x.layer is not None else None
    return [V(tuple(axes), layer, x.meta)]


@rule(P.transpose_p)
def _transpose(w: Walker, eqn, args):
    x, perm = args[0], eqn.params["permutation"]
    layer = list(perm).index(x.layer) if x.layer is not None else None
    return [V(tuple(x.axes[p] for p in perm), layer, x.meta)]


@rule(P.squeeze_p)
def _squeeze(w: Walker, eqn, args):
    x = args[0]
    dims = [d % x.rank for d in eqn.params["dimensions"]]
    if x.layer in dims:
        x = _pick_copy(w, x, 0)
    x = _drop_unit_blocks(x)
    keep = [i for i in range(x.rank) if i not in dims]
    layer = keep.index(x.layer) if x.layer is not None else None
    return [V(tuple(x.axes[i] for i in keep), layer, x.meta)]


@rule(P.reshape_p)
def _reshape(w: Walker, eqn, args):
    x = args[0]
    if eqn.params.get("dimensions") is not None:
        perm = eqn.params["dimensions"]
        x = V(tuple(x.axes[p] for p in perm), None, x.meta) if x.layer is None else w.strip(x)
    out_shape = tuple(eqn.params["new_sizes"])
    layer = _reshaped_layer(x, out_shape)
    if x.layer is not None and layer is None:
        x = w.strip(x)
    try:
        axes = _reshape_axes(w, _drop_unit_blocks(x), out_shape)
    except _Irregular:
        text = f"a reshape {x.shape()} -> {out_shape} that mixes channel axes irregularly"
        w.pin_desc(x.axes, text)
        return [w.blank(out_shape, w.reason(text), x.meta)]
    return [V(tuple(axes), layer, x.meta)]


class _Irregular(Exception):
    pass


def _reshaped_layer(x: V, out_shape) -> int | None:
    """Where the layer axis goes, if a reshape keeps it a whole axis."""
    if x.layer is None:
        return None
    shape = x.shape()
    before = int(np.prod(shape[: x.layer]))
    acc = 1
    for j, n in enumerate(out_shape):
        if acc == before and n == shape[x.layer]:
            return j
        acc *= n
    return None


def _plan(sizes: list, out_shape) -> list:
    """How the input factors (sizes, size-1 ones dropped) are cut: per factor,
    the list of piece sizes; raises _Irregular if a factor straddles."""
    pieces: list = [[] for _ in sizes]
    i, rem = 0, sizes[0] if sizes else 1
    for n in out_shape:
        if n == 1:
            continue
        p = 1
        while p < n:
            if i >= len(sizes):
                raise _Irregular
            if n % (p * rem) == 0:
                pieces[i].append(rem)
                p *= rem
                i += 1
                rem = sizes[i] if i < len(sizes) else 1
            elif n % p == 0 and rem % (n // p) == 0:
                pieces[i].append(n // p)
                rem //= n // p
                p = n
            else:
                raise _Irregular
    if i != len(sizes):
        raise _Irregular
    return pieces


def _reshape_axes(w: Walker, x: V, out_shape) -> list:
    factors = [f for ax in x.axes for f in ax if fsize(f) != 1]
    pieces = _plan([fsize(f) for f in factors], out_shape)
    new_blocks = _refine_blocks(factors, pieces)
    flat = []
    for f, cut in zip(factors, pieces):
        if len(cut) == 1:
            flat.append(f)
        elif isinstance(f, BlockDim):
            blk, dims = new_blocks[id(f.block)]
            flat.extend(BlockDim(blk, d) for d in dims[f.dim])
        elif (f >= 0).any():
            blk = Block(f.reshape(tuple(cut) + f.shape[1:]), len(cut))
            flat.extend(BlockDim(blk, d) for d in range(len(cut)))
        else:
            grid = f.reshape(tuple(cut) + f.shape[1:])
            for d in range(len(cut)):
                flat.append(np.moveaxis(grid, d, 0).reshape(cut[d], -1, *f.shape[1:])[:, 0])
    out, k = [], 0
    for n in out_shape:
        if n == 1:
            out.append((codes(1, BCAST),))
            continue
        ax, p = [], 1
        while p < n:
            ax.append(flat[k])
            p *= fsize(flat[k])
            k += 1
        out.append(tuple(ax))
    return out


def _refine_blocks(factors: list, pieces: list) -> dict:
    """Splits block dimensions that a reshape cuts: ``{id(old): (new block,
    {old dim: [new dims]})}`` for every block touched."""
    cuts: dict = {}
    for f, cut in zip(factors, pieces):
        if isinstance(f, BlockDim):
            cuts.setdefault(id(f.block), (f.block, {}))[1][f.dim] = cut
    out = {}
    for key, (blk, by_dim) in cuts.items():
        shape, dims, nd = [], {}, 0
        for d, n in enumerate(blk.dims):
            cut = by_dim.get(d, [n])
            dims[d] = list(range(nd, nd + len(cut)))
            shape.extend(cut)
            nd += len(cut)
        ids = blk.ids.reshape(tuple(shape) + blk.ids.shape[blk.ndims:])
        out[key] = (Block(ids, nd), dims)
    return out


def _drop_unit_blocks(x: V) -> V:
    """Removes size-1 dimensions from the blocks of ``x`` (no ids are lost
    meaning: a size-1 dimension holds one index)."""
    unit = {}
    for ax in x.axes:
        for f in ax:
            if isinstance(f, BlockDim) and 1 in f.block.dims and f.block.resolved is None:
                unit[id(f.block)] = f.block
    if not unit:
        return x
    remap = {}
    for key, blk in unit.items():
        keep = [d for d, n in enumerate(blk.dims) if n != 1]
        ids = blk.ids.reshape(tuple(blk.dims[d] for d in keep) + blk.ids.shape[blk.ndims:])
        remap[key] = (Block(ids, len(keep)), {d: i for i, d in enumerate(keep)})
    axes = []
    for ax in x.axes:
        new = []
        for f in ax:
            if isinstance(f, BlockDim) and id(f.block) in remap:
                blk, m = remap[id(f.block)]
                new.append(BlockDim(blk, m[f.dim]) if f.dim in m else codes(1, BCAST))
            else:
                new.append(f)
        axes.append(tuple(new))
    return x._replace(axes=tuple(axes))


def _pick_copy(w: Walker, x: V, index: int) -> V:
    """Keeps layer ``index`` of the copies of ``x`` (static layer slicing)."""
    def pick(f):
        if isinstance(f, BlockDim):
            f = w.resolve(f.block)[f.dim]
        return f[:, index] if f.ndim > 1 else f

    axes = tuple(tuple(pick(f) for f in ax) for ax in x.axes)
    return V(axes, None, x.meta)


def _slice_axis(w: Walker, ax: tuple, start: int, stop: int, step: int) -> tuple:
    if (start, stop, step) == (0, int(np.prod([fsize(f) for f in ax])), 1):
        return ax
    if len(ax) == 1 and isinstance(ax[0], BlockDim) and ax[0].block.resolved is None:
        f = ax[0]
        idx = [slice(None)] * f.block.ids.ndim
        idx[f.dim] = slice(start, stop, step)
        blk = Block(f.block.ids[tuple(idx)], f.block.ndims)
        return (BlockDim(blk, f.dim),)
    return (w.flatten(ax)[start:stop:step],)


@rule(P.slice_p)
def _slice(w: Walker, eqn, args):
    x = args[0]
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * x.rank
    if x.layer is not None:
        s, e, k = starts[x.layer], limits[x.layer], strides[x.layer]
        full = (s, e, k) == (0, x.shape()[x.layer], 1)
        x = x if full else (_pick_copy(w, x, s) if e - s == 1 else w.strip(x))
    x = _blocks_sliced_together(w, x, starts, limits, strides)
    axes = tuple(_slice_axis(w, ax, s, e, k) for ax, s, e, k in zip(x.axes, starts, limits, strides))
    return [V(axes, x.layer, x.meta)]


def _blocks_sliced_together(w: Walker, x: V, starts, limits, strides) -> V:
    """A block sliced on one axis and used on another gets resolved first
    (slicing one dimension of a block is exact only through one factor)."""
    shape = x.shape()
    for i, ax in enumerate(x.axes):
        sliced = (starts[i], limits[i], strides[i]) != (0, shape[i], 1)
        for f in ax:
            if sliced and isinstance(f, BlockDim) and f.block.resolved is None:
                others = [g for j, a2 in enumerate(x.axes) for g in a2
                          if j != i and isinstance(g, BlockDim) and g.block is f.block]
                if len(ax) > 1 or others:
                    return _resolve_all(w, x, f.block)
    return x


def _resolve_all(w: Walker, x: V, blk: Block) -> V:
    w.resolve(blk)
    return x._replace(axes=tuple(w.current(ax) for ax in x.axes))


@rule(P.dynamic_slice_p)
def _dynamic_slice(w: Walker, eqn, args):
    x, starts = args[0], eqn.invars[1:]
    sizes = eqn.params["slice_sizes"]
    axes, shape = list(x.axes), x.shape()
    if x.layer is not None and sizes[x.layer] != shape[x.layer]:
        x = w.strip(x)
        axes = list(x.axes)
    for i, (v, n) in enumerate(zip(starts, sizes)):
        if n == shape[i]:
            continue
        if isinstance(v, jcore.Literal):
            s = int(np.clip(int(v.val), 0, shape[i] - n))
            axes[i] = (w.flatten(w.current(axes[i]))[s:s + n],)
        else:
            text = "a dynamic slice of a channel axis"
            w.pin_desc([axes[i]], text)
            axes[i] = (codes(n, w.reason(text)),)
    return [V(tuple(axes), x.layer, x.meta)]


@rule(P.concatenate_p)
def _concatenate(w: Walker, eqn, args):
    dim = eqn.params["dimension"]
    args = w.same_layers(list(args))
    first = args[0]
    others = [i for i in range(first.rank) if i != dim]
    merged = {i: first.axes[i] for i in others}
    for a in args[1:]:
        axes = w.unify_vars(V(tuple(merged.get(i, first.axes[i]) for i in range(first.rank))),
                            a, [(i, i) for i in others])
        merged.update(dict(zip(others, axes)))
    parts = [w.flatten(w.current(a.axes[dim])) for a in args]
    cat = np.concatenate(_cat_aligned(parts), axis=0)
    axes = tuple(merged[i] if i != dim else (cat,) for i in range(first.rank))
    return [V(axes, first.layer, combine_meta(args))]


def _cat_aligned(parts: list) -> list:
    parts = align(*parts)
    copies = np.broadcast_shapes(*[p.shape[1:] for p in parts])
    return [np.broadcast_to(p, p.shape[:1] + copies) for p in parts]


@rule(primitive("split_p"))
def _split(w: Walker, eqn, args):
    x, axis, sizes = args[0], eqn.params["axis"], eqn.params["sizes"]
    if x.layer == axis:
        x = w.strip(x)
    outs, start = [], 0
    for n in sizes:
        starts = [0] * x.rank
        limits = list(x.shape())
        starts[axis], limits[axis] = start, start + n
        y = _blocks_sliced_together(w, x, starts, limits, [1] * x.rank)
        ax = _slice_axis(w, y.axes[axis], start, start + n, 1)
        outs.append(V(y.axes[:axis] + (ax,) + y.axes[axis + 1:], y.layer, x.meta))
        start += n
    return outs


@rule(P.rev_p)
def _rev(w: Walker, eqn, args):
    x = args[0]
    dims = eqn.params["dimensions"]
    if x.layer in dims:
        x = w.strip(x)
    axes = list(x.axes)
    for d in dims:
        axes[d] = tuple(w._array(g)[::-1] for g in axes[d])
    return [V(tuple(axes), x.layer, x.meta)]


@rule(P.pad_p)
def _pad(w: Walker, eqn, args):
    x = args[0]
    if x.layer is not None:
        x = w.strip(x)
    code = w.reason("padding (a constant that cannot be sliced)")
    axes = []
    for ax, (lo, hi, interior) in zip(x.axes, eqn.params["padding_config"]):
        if (lo, hi, interior) == (0, 0, 0):
            axes.append(ax)
            continue
        f = w.flatten(w.current(ax))
        if interior:
            grid = np.full((f.shape[0], interior + 1) + f.shape[1:], code, np.int64)
            grid[:, 0] = f
            f = grid.reshape((-1,) + f.shape[1:])[: (f.shape[0] - 1) * (interior + 1) + 1]
        f = f[max(-lo, 0): f.shape[0] - max(-hi, 0)]
        pad = [(max(lo, 0), max(hi, 0))] + [(0, 0)] * (f.ndim - 1)
        axes.append((np.pad(f, pad, constant_values=code),))
    return [V(tuple(axes), None, combine_meta(args))]


# --------------------------------------------------------------------------
# Reductions


REDUCE = [primitive(n + "_p") for n in ("reduce_sum reduce_max reduce_min reduce_prod reduce_and "
                                 "reduce_or reduce_xor argmax argmin").split()]
CUMULATIVE = [primitive(n + "_p") for n in "cumsum cumprod cummax cummin cumlogsumexp".split()]


@rule(*REDUCE)
def _reduce(w: Walker, eqn, args):
    x = args[0]
    axes = tuple(eqn.params["axes"])
    if x.layer in axes:
        x = w.strip(x)
    x = _resolve_blocks_on(w, x, axes)
    _pin_reduced(w, [x.axes[a] for a in axes])
    keep = [i for i in range(x.rank) if i not in axes]
    layer = keep.index(x.layer) if x.layer is not None else None
    return [V(tuple(x.axes[i] for i in keep), layer, combine_meta(args))]


_REDUCED = ("a reduction over this channel axis (a mean, normalisation or softmax "
            "would change if channels were removed)")


@rule(*CUMULATIVE)
def _cumulative(w: Walker, eqn, args):
    x = args[0]
    axis = eqn.params["axis"]
    if x.layer == axis:
        x = w.strip(x)
    x = _resolve_blocks_on(w, x, (axis,))
    _pin_reduced(w, [x.axes[axis]])
    return [x._replace(meta=combine_meta(args))]


def _pin_reduced(w: Walker, axes: list) -> None:
    """Channels reduced over are pinned, or only noted with
    ``allow_reductions`` (hidden-size pruning)."""
    if w.allow_reductions:
        for ax in axes:
            for f in ax:
                arr = f.block.ids if isinstance(f, BlockDim) else f
                w.noted.append(arr[arr >= 0].ravel())
    else:
        w.pin_desc(axes, _REDUCED)


def _resolve_blocks_on(w: Walker, x: V, axes) -> V:
    blocks = {id(f.block): f.block for a in axes for f in x.axes[a]
              if isinstance(f, BlockDim) and f.block.resolved is None}
    for blk in blocks.values():
        x = _resolve_all(w, x, blk)
    return x


# --------------------------------------------------------------------------
# Windows (pooling)


WINDOWS = [primitive(n + "_p") for n in "reduce_window_max reduce_window_min reduce_window_sum".split()]


@rule(*WINDOWS, primitive("reduce_window_p"))
def _reduce_window(w: Walker, eqn, args):
    """Pooling: axes with a window of one (channels, batch) pass through; a
    window over a channel axis pins it; pooled axes become spatial axes."""
    n = len(eqn.outvars)
    ops = [w.strip(a) if a.layer is not None else a for a in args[:n]]
    p = eqn.params
    spatial = w.reason("a spatial axis")
    outs = []
    for x, v in zip(ops, eqn.outvars):
        shape = v.aval.shape
        axes = []
        for i, ax in enumerate(x.axes):
            plain = (p["window_dimensions"][i] == 1 and p["window_strides"][i] == 1
                     and tuple(p["padding"][i]) == (0, 0) and p["base_dilation"][i] == 1
                     and p["window_dilation"][i] == 1)
            if plain:
                axes.append(ax)
            else:
                w.pin_desc([ax], "a pooling window over this axis")
                axes.append((codes(shape[i], spatial),))
        outs.append(V(tuple(axes), None, combine_meta(args)))
    return outs


# --------------------------------------------------------------------------
# Contractions


@rule(P.dot_general_p)
def _dot_general(w: Walker, eqn, args):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = args[0], args[1]
    if lhs.layer in lc or rhs.layer in rc:
        lhs, rhs = w.strip(lhs), w.strip(rhs)
    lhs, rhs = w.same_layers([lhs, rhs])
    merged = w.unify_vars(lhs, rhs, list(zip(lb, rb)) + list(zip(lc, rc)))
    free_l = [i for i in range(lhs.rank) if i not in lc and i not in lb]
    free_r = [i for i in range(rhs.rank) if i not in rc and i not in rb]
    lhs, rhs = (_after_pairing(w, v) for v in (lhs, rhs))
    axes = tuple(merged[: len(lb)]) + tuple(lhs.axes[i] for i in free_l) + \
        tuple(rhs.axes[i] for i in free_r)
    layer = _dot_layer(lhs, rhs, lb, free_l, free_r)
    for side, (con, free) in ((lhs, (lc, free_l)), (rhs, (rc, free_r))):
        w.use(side.meta.leaf, "kernel", ids_in=_ids(side, con), ids_out=_ids(side, free))
    if lhs.meta.kind == ACT and rhs.meta.kind == ACT:  # attention-like: heads are batch axes
        for i in lb:
            w.head_axes.append(w.flatten(w.current(lhs.axes[i])))
        # q/k (both sides: a key with one head meets query dims already split), value
        w.head_dim_ids.extend([_ids(lhs, lc), _ids(rhs, rc), _ids(lhs, free_l),
                               _ids(rhs, free_r)])
    shape = eqn.outvars[0].aval.shape
    contracted = int(np.prod([lhs.shape()[i] for i in lc])) if lc else 1
    w.site("dot_general", int(np.prod(shape)) * contracted,
           tuple(s.meta.leaf for s in (lhs, rhs) if s.meta.leaf >= 0))
    return [V(axes, layer, combine_meta(args))]


def _after_pairing(w: Walker, x: V) -> V:
    """Blocks resolved while pairing are read back as arrays."""
    return x._replace(axes=tuple(w.current(ax) for ax in x.axes))


def _dot_layer(lhs: V, rhs: V, lb, free_l, free_r):
    if lhs.layer is not None and lhs.layer in lb:
        return list(lb).index(lhs.layer)
    if lhs.layer in free_l:
        return len(lb) + free_l.index(lhs.layer)
    if rhs.layer in free_r:
        return len(lb) + len(free_l) + free_r.index(rhs.layer)
    return None


def _ids(x: V, axes) -> np.ndarray:
    parts = []
    for a in axes:
        for f in x.axes[a]:
            arr = f.block.ids if isinstance(f, BlockDim) else f
            parts.append(arr[arr >= 0].ravel())
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


@rule(P.conv_general_dilated_p)
def _conv(w: Walker, eqn, args):
    # Iteration copies (a conv inside a layer scan) stay per layer.
    lhs, rhs = (w.strip(a) if a.layer is not None else a for a in args[:2])
    lhs, rhs = (_after_pairing(w, _resolve_blocks_on(w, v, range(v.rank))) for v in (lhs, rhs))
    dn = eqn.params["dimension_numbers"]
    (ln, lcx, *lsp), (ro, ri, *rsp), (on, ocx, *osp) = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    if eqn.params["batch_group_count"] != 1:
        return w.unknown(eqn, args)
    w.pin_desc([rhs.axes[a] for a in rsp], "a kernel's spatial axis")
    w.pin_desc([lhs.axes[a] for a in lsp], "a spatial axis of a convolution input")
    groups = eqn.params["feature_group_count"]
    f_in, f_k, f_out = (w.flatten(v.axes[a]) for v, a in ((lhs, lcx), (rhs, ri), (rhs, ro)))
    f_out = _couple_conv_channels(w, f_in, f_k, f_out, groups)
    shape = eqn.outvars[0].aval.shape
    spatial = w.reason("a spatial axis")
    axes = [None] * len(shape)
    axes[on], axes[ocx] = lhs.axes[ln], (f_out,)
    for a in osp:
        axes[a] = (codes(shape[a], spatial),)
    w.use(rhs.meta.leaf, "kernel", ids_in=_ids(rhs, [ri]), ids_out=_ids(rhs, [ro]),
          groups=groups)
    macs = int(np.prod(shape)) * f_k.shape[0] * int(np.prod([rhs.shape()[a] for a in rsp]))
    w.site("conv_general_dilated", macs, (rhs.meta.leaf,) if rhs.meta.leaf >= 0 else ())
    return [V(tuple(axes), None, combine_meta(args))]


def _couple_conv_channels(w: Walker, f_in, f_k, f_out, groups: int):
    """Input channels to the kernel's input axis; with groups, the channels
    of each group to the group's outputs. Returns the output channels."""
    if groups == 1:
        w.unify_factor(f_in, f_k)
        return f_out
    per_out = f_out.shape[0] // groups
    if f_k.shape[0] == 1:  # depthwise: channel c feeds outputs c*m .. c*m+m-1
        return w.unify_factor(np.repeat(f_in, per_out, axis=0), f_out)
    w.unify_factor(f_in, np.tile(f_k, (groups,) + (1,) * (f_k.ndim - 1)))
    grid = f_out.reshape((groups, per_out) + f_out.shape[1:])
    w.edge(grid[:1], grid)  # the same output index in every group goes together
    return f_out


@rule(P.gather_p)
def _gather(w: Walker, eqn, args):
    """Row lookups ``table[indices]`` (embeddings); other gathers are
    unknown."""
    table, idx = w.strip(args[0]), args[1]
    dn = eqn.params["dimension_numbers"]
    sizes = tuple(eqn.params["slice_sizes"])
    rank = table.rank
    out_rank = len(eqn.outvars[0].aval.shape)
    rows = (tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,)
            and not tuple(getattr(dn, "operand_batching_dims", ()))
            and sizes == (1,) + table.shape()[1:]
            and tuple(dn.offset_dims) == tuple(range(out_rank - rank + 1, out_rank)))
    if not rows:
        return w.unknown(eqn, args)
    table = _after_pairing(w, _resolve_blocks_on(w, table, range(rank)))
    w.pin_desc([table.axes[0]], "rows selected by a gather (an embedding's vocabulary)")
    w.use(table.meta.leaf, "embedding", ids_out=_ids(table, range(1, rank)))
    axes = tuple(idx.axes[:-1]) + tuple(table.axes[1:])
    return [V(axes, None, Meta(ACT))]


# --------------------------------------------------------------------------
# Sources


SOURCES = [primitive("iota_p")]
RANDOM = [primitive(n) for n in ("random_bits_p", "random_seed_p", "random_wrap_p", "rng_uniform_p",
                          "rng_bit_generator_p", "threefry2x32_p", "random_split_p",
                          "random_fold_in_p", "random_unwrap_p")]
RANDOM_REASON = ("random bits drawn with this axis in their shape (dropout or noise in "
                 "training mode: trace the model in inference mode, e.g. model.eval(), "
                 "deterministic=True or eqx.nn.inference_mode)")


@rule(*SOURCES)
def _source(w: Walker, eqn, args):
    return [w.constant(v.aval.shape) for v in eqn.outvars]


@rule(*RANDOM)
def _random(w: Walker, eqn, args):
    """PRNG keys and bits: a slice of the bits drawn for a smaller shape is
    not the bits drawn for the full one, so every axis they meet is pinned."""
    return [w.blank(v.aval.shape, w.reason(RANDOM_REASON)) for v in eqn.outvars]


@rule(primitive("bitcast_convert_type_p"))
def _bitcast(w: Walker, eqn, args):
    """A bitcast between types of one width is elementwise (random bits made
    floats); one that changes the width adds or removes an axis: unknown."""
    if tuple(eqn.outvars[0].aval.shape) == tuple(eqn.invars[0].aval.shape):
        return [args[0]]
    return w.unknown(eqn, args)

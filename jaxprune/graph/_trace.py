"""``trace``: the model graph of any JAX function of a variables pytree."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from jaxprune.core import tree as _tree
from jaxprune.graph import _control, _rules
from jaxprune.graph._desc import BCAST, codes
from jaxprune.graph._model import Group, LeafInfo, Member, ModelGraph
from jaxprune.graph._walk import ACT, PARAM, Meta, V, Walker

_ROLE_ORDER = ("embedding", "kernel", "stat", "norm", "bias", "scale")


class _Ids:
    """Element ids of every (leaf, axis) and where each id comes from."""

    def __init__(self):
        self.next = 0
        self.ranges: list[tuple[int, int, int, int, int]] = []  # base, n, L, leaf, axis

    def take(self, n: int, layers: int, leaf: int, axis: int) -> np.ndarray:
        base = self.next
        self.next += n * max(layers, 1)
        self.ranges.append((base, n, layers, leaf, axis))
        ids = base + np.arange(n * max(layers, 1), dtype=np.int64)
        return ids.reshape(layers, n).T.copy() if layers else ids

    def table(self) -> tuple[np.ndarray, ...]:
        """Per id: leaf, axis, layer (-1 if not stacked), position."""
        total = self.next
        leaf, axis = np.zeros(total, np.int64), np.zeros(total, np.int64)
        layer, pos = np.full(total, -1, np.int64), np.zeros(total, np.int64)
        for base, n, L, li, ax in self.ranges:
            span = slice(base, base + n * max(L, 1))
            leaf[span], axis[span] = li, ax
            r = np.arange(n * max(L, 1))
            pos[span] = r % n
            if L:
                layer[span] = r // n
        return leaf, axis, layer, pos


def trace(apply_fn: Callable[..., Any], variables: Any, *args: Any,
          allow_reductions: bool = False, **kwargs: Any) -> ModelGraph:
    """The model graph: leaf roles and coupled channel groups, from the jaxpr.

    ``apply_fn(variables, *args, **kwargs)`` is traced once with
    :func:`jax.make_jaxpr` (abstractly: nothing runs) and the jaxpr is walked
    with one rule per primitive (:func:`register` adds rules). Every position
    of every axis of every leaf is an *element*; a rule couples the elements
    that must be removed together (a dense kernel's output column ``j``, its
    bias ``j``, the next kernel's input row ``j``; both sides of a residual
    add; a head's query, key, value and output slices) and *pins* elements
    that cannot be removed (they reach the model output, feed a reduction
    such as a normalisation or softmax over their axis, meet the model input
    or an unknown primitive). A set of coupled elements is a *unit*; units
    touching the same leaf axes form a *group*.

    Trace inference mode (Linen: ``model.apply`` with
    ``use_running_average=True``, nothing mutable): every output of
    ``apply_fn`` counts as the model output.

    Args:
      apply_fn: ``(variables, *args, **kwargs) -> outputs``: a plain function
        of a dict, ``lambda v, x: model.apply(v, x)`` (Linen),
        ``lambda s, x: nnx.merge(graphdef, s)(x)`` (NNX), or
        ``lambda m, x: m(x)`` with an Equinox module as ``variables``
        (non-array fields are kept as they are).
      variables: the pytree of parameters (and batch statistics).
      *args: example inputs (arrays or pytrees of arrays; shapes matter, not
        values; non-array arguments are passed through as constants).
      allow_reductions: let channels that feed a reduction over their own
        axis be pruned (hidden-size pruning of a residual stream under
        LayerNorm or RMSNorm). Such groups carry a note: the normalisation
        statistics then change, so the compacted model no longer computes
        exactly what the masked model computes.
      **kwargs: passed to ``apply_fn`` as they are.

    Returns:
      A :class:`ModelGraph`.

    Raises:
      ValueError: if ``apply_fn`` reads none of the variables, or has no
        array variables.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxprune as jp
      >>> params = {"l1": {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)},
      ...           "l2": {"w": jnp.ones((8, 2))}}
      >>> f = lambda p, x: jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"]
      >>> g = jp.graph.trace(f, params, jnp.ones((3, 4)))
      >>> [(grp.size, [m.path for m in grp.members]) for grp in g.prunable]
      [(8, ['l1/b', 'l1/w', 'l2/w'])]
      >>> g.leaf("l1/w").role, g.leaf("l1/b").role
      ('kernel', 'bias')

    References:
      Fang et al., "DepGraph: towards any structural pruning", CVPR 2023
      (dependency groups; here read from the jaxpr instead of module hooks).
    """
    t0 = time.perf_counter()
    paths, leaves, treedef = _tree.flatten(variables)
    arrays = [i for i, x in enumerate(leaves) if _tree.is_array(x)]
    if not arrays:
        raise ValueError(
            "graph.trace: variables has no array leaves (paths: "
            f"{paths[:10]}). Pass the parameter pytree, e.g. model.init(...) for Linen, "
            "nnx.split(model)[1] for NNX or the Equinox module.")
    static = tuple((i, leaves[i]) for i in range(len(leaves)) if i not in set(arrays))
    closed = _make_jaxpr(apply_fn, treedef, leaves, arrays, args, kwargs)
    walker = Walker(rules=_RULES, allow_reductions=allow_reductions)
    stacked = _find_stacked(closed.jaxpr, arrays)
    ids = _Ids()
    leaf_descs = [_leaf_desc(walker, ids, j, np.shape(leaves[i]), stacked.get(j, 0))
                  for j, i in enumerate(arrays)]
    in_descs = [walker.blank(v.aval.shape, walker.reason("the model input"), Meta(ACT))
                for v in closed.jaxpr.invars[len(arrays):]]
    used = _used_invars(closed.jaxpr)
    _check_used(used, closed.jaxpr.invars[: len(arrays)], [paths[i] for i in arrays], apply_fn)
    for j, v in enumerate(closed.jaxpr.invars[: len(arrays)]):
        if v not in used:
            walker.pin_desc(leaf_descs[j].axes, "not read by apply_fn")
    outs = walker.walk_closed(closed, leaf_descs + in_descs)
    for o in outs:
        walker.pin_desc(walker.strip(o).axes, "it reaches the model output")
    sub_paths = [paths[i] for i in arrays]
    infos = _leaf_infos(walker, ids, sub_paths, [leaves[i] for i in arrays], stacked)
    groups = _groups(walker, ids, sub_paths, infos)
    return ModelGraph(tuple(infos), tuple(groups), treedef, sum(s.macs for s in walker.sites),
                      static=static, trace_seconds=time.perf_counter() - t0)


_RULES = _rules.RULES  # with the control-flow rules of _control


def register(primitive: Any, rule: Callable[..., list]) -> None:
    """Adds (or replaces) the rule of a primitive.

    A rule is ``rule(walker, eqn, args) -> outs``, where ``args`` are the
    operands' descriptors and ``outs`` one descriptor per output. Most
    custom primitives are one of three kinds, for which the rules exist:
    ``jp.graph.rules.elementwise``, ``jp.graph.rules.passthrough`` and
    ``jp.graph.rules.call`` (a call of a sub-jaxpr). A primitive without a
    rule is never coupled wrongly: every channel that touches it is marked
    not prunable, with the primitive's name as the reason.
    """
    _RULES[primitive] = rule


def _make_jaxpr(apply_fn, treedef, leaves, arrays, args, kwargs):
    arg_leaves, arg_def = jax.tree_util.tree_flatten(args)
    arg_arrays = [i for i, x in enumerate(arg_leaves) if _tree.is_array(x)]
    def fn(var_arrays, in_arrays):
        full = list(leaves)
        for i, x in zip(arrays, var_arrays):
            full[i] = x
        a = list(arg_leaves)
        for i, x in zip(arg_arrays, in_arrays):
            a[i] = x
        return apply_fn(jax.tree_util.tree_unflatten(treedef, full),
                        *jax.tree_util.tree_unflatten(arg_def, a), **kwargs)

    closed = jax.make_jaxpr(fn)([leaves[i] for i in arrays], [arg_leaves[i] for i in arg_arrays])
    return closed


def _leaf_desc(w: Walker, ids: _Ids, j: int, shape: tuple, layers: int) -> V:
    axes = []
    for k, n in enumerate(shape):
        if layers and k == 0:
            axes.append((codes(n, w.reason("the layer axis of a stack")),))
        elif n == 1:
            axes.append((codes(1, BCAST),))
        else:
            axes.append((ids.take(n, layers, j, k),))
    return V(tuple(axes), 0 if layers else None, Meta(PARAM, j, frozenset({j})))


def _find_stacked(jaxpr, arrays) -> dict:
    """Leaves scanned over their leading axis (directly, or through calls
    and casts): ``{array index: layers}``."""
    var_leaf = {v: j for j, v in enumerate(jaxpr.invars[: len(arrays)])}
    return _stacked_in(jaxpr, var_leaf)


def _stacked_in(jaxpr, var_leaf: dict) -> dict:
    out: dict = {}
    for eqn in jaxpr.eqns:
        ins = [var_leaf.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
        if eqn.primitive in _control.CALLS:
            sub = _control.sub_jaxpr(eqn)
            sub = getattr(sub, "jaxpr", sub)
            inner = {iv: j for iv, j in zip(sub.invars, ins) if j is not None}
            out.update(_stacked_in(sub, inner))
        elif eqn.primitive is P.convert_element_type_p and ins[0] is not None:
            var_leaf[eqn.outvars[0]] = ins[0]
        elif eqn.primitive is P.scan_p:
            first = eqn.params["num_consts"] + eqn.params["num_carry"]
            for j in ins[first:]:
                if j is not None:
                    out[j] = eqn.params["length"]
    return out


def _used_invars(jaxpr) -> set:
    used = {v for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, jcore.Var)}
    return used | {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}


def _check_used(used: set, invars: list, paths: list, apply_fn) -> None:
    if invars and not any(v in used for v in invars):
        name = getattr(apply_fn, "__name__", repr(apply_fn))
        raise ValueError(
            f"graph.trace: apply_fn {name} never reads the variables (leaves "
            f"{paths[:8]}...). It must compute its outputs from its first argument: "
            "e.g. lambda v, x: model.apply(v, x) for Linen, lambda s, x: "
            "nnx.merge(graphdef, s)(x) for NNX, not a closure over the model's own "
            "parameters.")


def _leaf_infos(w: Walker, ids: _Ids, paths, leaves, stacked) -> list[LeafInfo]:
    leaf_of, axis_of, _, _ = ids.table()
    macs = {}
    for s in w.sites:
        for j in s.leaves:
            macs[j] = macs.get(j, 0) + s.macs
    out = []
    for j, (p, x) in enumerate(zip(paths, leaves)):
        uses = w.roles.get(j, {})
        role = next((r for r in _ROLE_ORDER if r in uses), "other")
        role = "other" if role == "scale" else role
        in_axes = _axes_of(uses.get("kernel", []), "ids_in", leaf_of, axis_of, j)
        out_axes = _axes_of(uses.get(role if role in ("kernel", "embedding") else "", []),
                            "ids_out", leaf_of, axis_of, j)
        kind = uses["norm"][0].get("kind", "") if role == "norm" else ""
        out.append(LeafInfo(p, tuple(np.shape(x)), role, in_axes, out_axes,
                            stacked.get(j) or None, role == "embedding" and "kernel" in uses,
                            macs.get(j, 0), kind))
    return out


def _axes_of(uses: list, key: str, leaf_of, axis_of, j: int) -> tuple:
    axes = set()
    for u in uses:
        got = u.get(key)
        if got is not None and got.size:
            mine = got[leaf_of[got] == j]
            axes.update(int(a) for a in np.unique(axis_of[mine]))
    return tuple(sorted(axes))


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components (root = smallest id) of an undirected graph."""
    parent = np.arange(n, dtype=np.int64)
    if not a.size:
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        low = np.minimum(pa, pb)
        np.minimum.at(parent, pa, low)
        np.minimum.at(parent, pb, low)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
        if np.array_equal(parent[a], parent[b]):
            return parent


def _groups(w: Walker, ids: _Ids, paths: list, infos: list) -> list[Group]:
    """Units (components of two or more elements) grouped by the leaf axes
    they touch (and whether each lives in one layer of a stack)."""
    n = ids.next
    a = np.concatenate(w.edges_a) if w.edges_a else np.zeros(0, np.int64)
    b = np.concatenate(w.edges_b) if w.edges_b else np.zeros(0, np.int64)
    root = _components(n, a, b)
    leaf_of, axis_of, layer_of, pos_of = ids.table()
    size = np.bincount(root, minlength=n)
    els = np.flatnonzero((size[root] >= 2) | _fixed_outputs(w, infos, leaf_of, axis_of, n))
    if not els.size:
        return []
    els = els[np.argsort(root[els], kind="stable")]
    r = root[els]
    starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    roots = r[starts]
    sig = _signatures(leaf_of[els] * 64 + axis_of[els], r, roots)
    lay = layer_of[els]
    lo, hi = np.minimum.reduceat(lay, starts), np.maximum.reduceat(lay, starts)
    per_layer = (lo == hi) & (lo >= 0)
    pinned = _pinned_reasons(w, root)
    kinds = _kinds(w, root)
    noted = set(np.unique(root[np.concatenate(w.noted)]).tolist()) if w.noted else set()
    keys = np.stack([sig, per_layer.astype(np.uint64)], 1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    groups = []
    for gi in np.argsort(first):
        chosen = np.flatnonzero(inverse.ravel() == gi)
        groups.append(_make_group(len(groups), roots[chosen], bool(per_layer[chosen[0]]),
                                  els, r, paths, infos, (leaf_of, axis_of, layer_of, pos_of),
                                  pinned, w, kinds, noted))
    return _unique_names(groups)


def _unique_names(groups: list[Group]) -> list[Group]:
    """Names are keys (``groups=``, per-group sparsities): a second group on
    the same leaf axis (the head dims of a single key/value head beside the
    query heads) gets its kind appended, then a counter."""
    seen: set = set()
    out = []
    for g in groups:
        name = g.name
        if name in seen:
            name = f"{g.name} {g.kind}"
        n = 2
        while name in seen:
            name, n = f"{g.name} #{n}", n + 1
        seen.add(name)
        out.append(g if name == g.name else dataclasses.replace(g, name=name))
    return out


def _kinds(w: Walker, root: np.ndarray) -> dict:
    """``{unit root: (kind, query heads per unit)}`` for attention units."""
    out: dict = {}
    for ids in w.head_dim_ids:
        for u in np.unique(root[ids[ids >= 0]]):
            out[int(u)] = ("head_dims", 0)
    for axis in w.head_axes:
        axis = axis.reshape(axis.shape[0], -1)[:, 0]
        lab = axis[axis >= 0]
        if lab.size:
            units, counts = np.unique(root[lab], return_counts=True)
            for u, c in zip(units, counts):
                out[int(u)] = ("heads", max(int(c), out.get(int(u), ("", 0))[1]))
    return out


def _fixed_outputs(w: Walker, infos, leaf_of, axis_of, n: int) -> np.ndarray:
    """Pinned elements of kernel and embedding output axes: shown as fixed
    groups even when nothing else couples to them (so the reason shows)."""
    pinned = np.zeros(n, bool)
    for ids, _ in w.pins:
        pinned[ids] = True
    out_axis = np.zeros(n, bool)
    for j, info in enumerate(infos):
        if info.role in ("kernel", "embedding"):
            for a in info.out_axes:
                out_axis |= (leaf_of == j) & (axis_of == a)
    return pinned & out_axis


def _signatures(codes_: np.ndarray, r: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """A 64-bit hash per unit of the set of (leaf, axis) it touches."""
    rng = np.random.default_rng(0)
    table = rng.integers(1, 2**63, size=int(codes_.max()) + 1, dtype=np.uint64)
    pairs = np.unique(np.stack([r, codes_], 1), axis=0)
    unit = np.searchsorted(roots, pairs[:, 0])
    out = np.zeros(len(roots), np.uint64)
    np.add.at(out, unit, table[pairs[:, 1]])
    return out


def _pinned_reasons(w: Walker, root: np.ndarray) -> dict:
    out: dict = {}
    for pid, reason in w.pins:
        for u in np.unique(root[pid]):
            out.setdefault(int(u), set()).add(reason)
    return out


def _make_group(index, units, per_layer, els, r, paths, infos, table, pinned, w,
                kinds, noted) -> Group:
    leaf_of, axis_of, layer_of, pos_of = table
    mine = np.isin(r, units)
    e = els[mine]
    unit_of = np.searchsorted(units, r[mine])  # units are sorted roots
    if per_layer:
        layers = int(infos[int(leaf_of[e[0]])].layers)
        lay = layer_of[e]
        # number units within each layer, in order of their root
        order = np.lexsort((units, layer_of[els[np.searchsorted(r, units)]]))
        rank = np.empty(len(units), np.int64)
        rank[order] = np.arange(len(units))
        size = len(units) // layers
        unit_of = rank[unit_of] % size
        del lay
    else:
        layers, size = None, len(units)
    mem = []
    codes_ = leaf_of[e] * 64 + axis_of[e]
    for code in np.unique(codes_):
        leaf, axis = int(code // 64), int(code % 64)
        info = infos[leaf]
        on = codes_ == code
        if info.layers:
            arr = np.full((info.layers, info.shape[axis]), -1, np.int64)
            arr[layer_of[e[on]], pos_of[e[on]]] = unit_of[on]
        else:
            arr = np.full((info.shape[axis],), -1, np.int64)
            arr[pos_of[e[on]]] = unit_of[on]
        mem.append(Member(paths[leaf], leaf, axis, arr))
    reasons = sorted({w.reasons[q] for u in units for q in pinned.get(int(u), ())})
    kind, per_unit = kinds.get(int(units[0]), ("channels", 0))
    notes = ("it feeds a reduction over its axis (a normalisation): removing units "
             "changes its statistics",) if noted & set(units.tolist()) else ()
    return Group(index, _group_name(mem, infos), size, layers, tuple(mem), not reasons,
                 tuple(reasons), kind, per_unit, notes)


def _group_name(members: list, infos: list) -> str:
    for m in members:
        info = infos[m.leaf]
        if info.role in ("kernel", "embedding") and m.axis in info.out_axes:
            return f"{m.path}:{m.axis}"
    return f"{members[0].path}:{members[0].axis}"


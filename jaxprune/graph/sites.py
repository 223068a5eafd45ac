"""Sites: where a model reads its kernels, and one hook to tap them.

This module (with the graph's walker, :mod:`jaxprune.graph`) is the only
code in jaxprune that reads jaxpr equations. Calibration
(:func:`jaxprune.calibrate`), SparseGPT's captures, the activation taps of
:func:`jaxprune.sensitivity.unit_stats` and the sensitivity tools ask it:

* :func:`find` walks a traced model and returns its :class:`Sites`: every
  ``dot_general`` or ``conv_general_dilated`` that multiplies a selected
  kernel leaf (followed through casts, reshapes, transposes, calls such as
  ``jit``, ``remat``, ``custom_jvp``/``custom_vjp``, ``cond``/``while``
  bodies and the slices of a layer ``scan``) with an activation: the
  kernel's input axes, the order of its input features in the activation,
  its layer scan, and which activation it reads.
* :func:`run` re-evaluates the jaxpr and calls a :class:`Hook` at every
  chosen site with the activation entering it; the hook may replace the
  activation (a probe, for gradients) and returns a *tap* (any pytree:
  statistics, the activation itself) that :func:`run` returns beside the
  outputs: summed over a tap key's sites, stacked per layer inside a layer
  ``scan`` and carried out of ``cond`` and ``while``.

:func:`interpret` is the one equation loop every reader uses;
:func:`equations` lists a jaxpr's equations, nested ones included;
:func:`macs` counts the multiply-accumulates of dots and convolutions.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxprune.graph import sites
  >>> f = lambda ws, x: jnp.tanh(x @ ws[0]) @ ws[1]
  >>> closed = jax.make_jaxpr(f)([jnp.ones((3, 4)), jnp.ones((4, 2))], jnp.ones((5, 3)))
  >>> found = sites.find(closed, [(3, 4), (4, 2)], [0, 1])
  >>> [(s.leaf, s.in_axes, s.in_shape) for s in found.sites]
  [(0, (0,), (3,)), (1, (0,), (4,))]
  >>> sites.macs(closed.jaxpr)
  100
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

__all__ = ["CALLS", "Hook", "LayerScan", "Pieces", "Site", "Sites", "add_taps", "bind",
           "equations", "find", "interpret", "live_macs", "macs", "open_jaxpr", "run",
           "run_layer", "run_piece", "sub_jaxpr"]

_P = jcore.primitives
CALLS = tuple(p for p in (getattr(_P, n, None) for n in (
    "jit_p", "pjit_p", "closed_call_p", "call_p", "core_call_p", "remat_p", "checkpoint_p",
    "custom_jvp_call_p", "custom_vjp_call_p", "custom_vjp_call_jaxpr_p")) if p is not None)
CASTS = (_P.convert_element_type_p, _P.copy_p)
SHAPE_OPS = (_P.reshape_p, _P.transpose_p, _P.squeeze_p, _P.broadcast_in_dim_p)


# --------------------------------------------------------------------------
# Reading jaxprs


def sub_jaxpr(eqn) -> Any:
    """The jaxpr a call-like primitive (one of :data:`CALLS`) runs on its operands."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    raise KeyError(f"no sub-jaxpr in {eqn.primitive.name} (params {sorted(eqn.params)})")


def open_jaxpr(j) -> tuple[Any, list]:
    """``(jaxpr, consts)`` of a Jaxpr or a ClosedJaxpr."""
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


def sub_jaxprs(eqn) -> list:
    """Every jaxpr among an equation's parameters (bodies, branches, calls)."""
    out = []
    for v in eqn.params.values():
        if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            out.append(v)
        elif isinstance(v, tuple) and v and isinstance(v[0], (jcore.Jaxpr, jcore.ClosedJaxpr)):
            out.extend(v)
    return out


def interpret(jaxpr, consts: list, args: list, step: Callable, literal: Callable) -> list:
    """The equation loop: ``step(eqn, inputs) -> outputs`` for every equation
    in order, over an environment of values (``literal(x)`` reads a literal).

    Returns:
      the values of ``jaxpr.outvars``.
    """
    env: dict = {}

    def read(v):
        return literal(v.val) if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        env.update(zip(eqn.outvars, step(eqn, [read(v) for v in eqn.invars])))
    return [read(v) for v in jaxpr.outvars]


def equations(jaxpr, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """``(key, eqn)`` for every equation, nested ones included; ``key`` is
    the ids of the enclosing equations, then the equation's own (the keys
    :class:`Site` and :func:`run` use)."""
    for eqn in jaxpr.eqns:
        key = path + (id(eqn),)
        yield key, eqn
        for sub in sub_jaxprs(eqn):
            yield from equations(open_jaxpr(sub)[0], key)


def macs(jaxpr) -> int:
    """Multiply-accumulates of the ``dot_general`` and convolution equations
    of a jaxpr (nested ones included; a ``scan`` body counts once per
    iteration, a ``while`` body and ``cond`` branches once)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        inner = sum(macs(open_jaxpr(s)[0]) for s in sub_jaxprs(eqn))
        if eqn.primitive is _P.cond_p:
            inner = max(macs(open_jaxpr(b)[0]) for b in eqn.params["branches"])
        total += inner * (eqn.params["length"] if eqn.primitive is _P.scan_p else 1)
    return total


def _eqn_macs(eqn) -> int:
    if eqn.primitive is _P.dot_general_p:
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[a] for a in lc]))
    if eqn.primitive is _P.conv_general_dilated_p:
        rhs = eqn.invars[1].aval.shape
        dn = eqn.params["dimension_numbers"]
        per = int(np.prod([rhs[a] for a in dn.rhs_spec[1:]]))
        return int(np.prod(eqn.outvars[0].aval.shape)) * per
    return 0


# --------------------------------------------------------------------------
# Sites: where each kernel is read


@dataclasses.dataclass
class _Prov:
    """A value that is (a view of) one slice of a kernel leaf: ``idx`` holds
    the flat position in the slice of every element (``None``: the slice
    itself); ``scans`` the keys of the scans that sliced it; ``direct``:
    the leaf itself up to casts (not out of a call's results)."""

    leaf: int
    idx: np.ndarray | None
    scans: tuple
    direct: bool = True


@dataclasses.dataclass(frozen=True)
class Site:
    """A dot or conv that multiplies a kernel slice with an activation.

    Attributes:
      key: ids of the enclosing equations, then the equation's own.
      leaf: the kernel (an index into the leaves :func:`find` was given).
      kind: ``"dot"``, ``"conv"`` or ``"batched"`` (see :class:`Sites`).
      kernel_pos: operand position of the kernel.
      perm: activation feature order -> kernel input order (``None``: same).
      in_axes: the kernel slice's input axes (its layer axis excluded).
      in_shape: their sizes.
      scans: keys of the layer scans slicing the kernel, outermost first.
      root: identity of the activation (through casts and calls).
      order: position in the walk (evaluation order).
      pairs: ``(kernel axis, activation axis)`` per contracted kernel axis,
        for a kernel read as it is (``direct``).
      direct: the kernel is the leaf itself up to casts, outside layer scans.
      control: the site is inside a ``scan``, ``cond`` or ``while``.
      dtype: the activation's dtype.
    """

    key: tuple
    leaf: int
    kind: str
    kernel_pos: int
    perm: np.ndarray | None
    in_axes: tuple
    in_shape: tuple
    scans: tuple
    root: Any
    order: int
    pairs: tuple = ()
    direct: bool = False
    control: bool = False
    dtype: Any = None


@dataclasses.dataclass
class Sites:
    """What :func:`find` returns.

    Attributes:
      sites: the sites in evaluation order.
      notes: ``{leaf: [why a use of it is not a site]}``.
      scan_lengths: ``{scan key: length}`` of every scan walked.
      params: ``{equation key: params}`` of every equation.
      shapes: the leaves' shapes, as given.
      batched: kernels read with batch axes of ``dot_general`` (vmapped
        layers; kind ``"batched"``): no input axes, only ``pairs``.
    """

    sites: list
    notes: dict
    scan_lengths: dict
    params: dict
    shapes: list
    batched: list = dataclasses.field(default_factory=list)

    def of(self, leaf: int) -> Site:
        """The first site of ``leaf``."""
        return next(s for s in self.sites if s.leaf == leaf)

    def leaves(self) -> list[int]:
        """The leaves with at least one site, sorted."""
        return sorted({s.leaf for s in self.sites})


def find(closed, shapes: list, selected: list) -> Sites:
    """The sites of the ``selected`` leaves in a traced model.

    Args:
      closed: ``jax.make_jaxpr(f)(leaves, *inputs)``: a ClosedJaxpr whose
        first ``len(shapes)`` inputs are the leaves.
      shapes: the leaves' shapes.
      selected: indices of the leaves to follow (the kernels).

    Returns:
      :class:`Sites`.
    """
    w = _Walk(shapes)
    n = len(shapes)
    provs = [_Prov(j, None, ()) if j in set(selected) else None for j in range(n)]
    roots = [("in", k) for k in range(len(closed.jaxpr.invars))]
    w.walk(closed.jaxpr, provs + [None] * (len(closed.jaxpr.invars) - n), roots, (), False)
    params = {k: e.params for k, e in equations(closed.jaxpr)}
    return Sites(w.sites, w.notes, w.scan_lengths, params, list(shapes), w.batched)


class _Walk:
    """Follows the selected kernel leaves through the jaxpr to their sites."""

    def __init__(self, shapes: list):
        self.shapes = shapes
        self.sites: list[Site] = []
        self.batched: list[Site] = []
        self.notes: dict = {}
        self.scan_lengths: dict = {}

    def count(self) -> int:
        return len(self.sites) + len(self.batched)

    def note(self, leaf: int, text: str) -> None:
        self.notes.setdefault(leaf, []).append(text)

    def walk(self, jaxpr, provs: list, roots: list, path: tuple, control: bool):
        consts = [(None, (path, id(v))) for v in jaxpr.constvars]

        def step(eqn, ins):
            key = path + (id(eqn),)
            ins_p = [None if x is None else x[0] for x in ins]
            ins_r = [None if x is None else x[1] for x in ins]
            outs_p, outs_r = self.eqn(eqn, ins_p, ins_r, key, control)
            return list(zip(outs_p, outs_r))

        def literal(_):
            return None

        outs = interpret(jaxpr, consts, list(zip(provs, roots)), step, literal)
        return ([None if o is None else o[0] for o in outs],
                [None if o is None else o[1] for o in outs])

    def eqn(self, eqn, ins_p, ins_r, key, control) -> tuple[list, list]:
        prim = eqn.primitive
        none = [None] * len(eqn.outvars)
        roots = [(key, k) for k in range(len(eqn.outvars))]
        if prim in CASTS:
            return ins_p[:1], ins_r[:1]
        if prim in CALLS:  # activations keep their identity through calls
            sub, _ = open_jaxpr(sub_jaxpr(eqn))
            p, r = self.walk(sub, ins_p, ins_r, key, control)
            p = [None if x is None else dataclasses.replace(x, direct=False) for x in p]
            return p, [x if x is not None else d for x, d in zip(r, roots)]
        if not any(p is not None for p in ins_p):
            return none, roots
        if prim is _P.scan_p:
            self.scan(eqn, ins_p, ins_r, key)
        elif prim is _P.cond_p:
            for br in eqn.params["branches"]:
                self.walk(open_jaxpr(br)[0], ins_p[1:], ins_r[1:], key, True)
        elif prim is _P.while_p:
            self.while_(eqn, ins_p, ins_r, key)
        elif prim is _P.dot_general_p:
            self.dot(eqn, ins_p, ins_r, key, control)
        elif prim is _P.conv_general_dilated_p:
            self.conv(eqn, ins_p, ins_r, key, control)
        elif prim in SHAPE_OPS:
            return [self.view(eqn, ins_p[0])], roots
        else:
            for p in ins_p:
                if p is not None:
                    self.note(p.leaf, f"`{prim.name}`")
        return none, roots

    def scan(self, eqn, ins_p, ins_r, key) -> None:
        prm = eqn.params
        nc, nk = prm["num_consts"], prm["num_carry"]
        self.scan_lengths[key] = prm["length"]
        for p in ins_p[nc:nc + nk]:
            if p is not None:
                self.note(p.leaf, "a loop carry of `scan`")
        xs = [self.slice(p, key) for p in ins_p[nc + nk:]]
        body, _ = open_jaxpr(prm["jaxpr"])
        roots = ins_r[:nc] + [(key, id(v)) for v in body.invars[nc:]]
        self.walk(body, list(ins_p[:nc]) + [None] * nk + xs, roots, key, True)

    def while_(self, eqn, ins_p, ins_r, key) -> None:
        prm = eqn.params
        cn, bn = prm["cond_nconsts"], prm["body_nconsts"]
        for p in ins_p[:cn] + ins_p[cn + bn:]:
            if p is not None:
                self.note(p.leaf, "the condition or carry of `while`")
        body, _ = open_jaxpr(prm["body_jaxpr"])
        roots = ins_r[cn:cn + bn] + [(key, id(v)) for v in body.invars[bn:]]
        self.walk(body, list(ins_p[cn:cn + bn]) + [None] * (len(body.invars) - bn), roots,
                  key, True)

    def slice(self, p: _Prov | None, key) -> _Prov | None:
        """The per-iteration slice of a scanned kernel (its leading axis)."""
        if p is None:
            return None
        if p.idx is None:
            return _Prov(p.leaf, None, p.scans + (key,), p.direct)
        n = p.idx[0].size
        flat = p.idx.reshape(p.idx.shape[0], -1)
        first = flat[0]
        if np.array_equal(np.sort(first), np.arange(n)) and np.array_equal(
                flat - first, np.arange(flat.shape[0])[:, None] * n + 0 * first):
            return _Prov(p.leaf, p.idx[0], p.scans + (key,), False)
        self.note(p.leaf, "a `scan` over one of its non-leading axes")
        return None

    def view(self, eqn, p: _Prov) -> _Prov | None:
        """Positions through a reshape, transpose, squeeze or size-1 broadcast."""
        shape = self.shapes[p.leaf][len(p.scans):]
        idx = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) if p.idx is None \
            else p.idx
        prm, prim = eqn.params, eqn.primitive
        if prim is _P.reshape_p:
            if prm.get("dimensions") is not None:
                idx = np.transpose(idx, prm["dimensions"])
            idx = idx.reshape(prm["new_sizes"])
        elif prim is _P.transpose_p:
            idx = np.transpose(idx, prm["permutation"])
        elif prim is _P.squeeze_p:
            idx = np.squeeze(idx, tuple(prm["dimensions"]))
        elif int(np.prod(prm["shape"])) == idx.size:
            idx = idx.reshape(prm["shape"])
        else:
            self.note(p.leaf, "`broadcast_in_dim`")
            return None
        return _Prov(p.leaf, idx, p.scans, False)

    def dot(self, eqn, ins_p, ins_r, key, control) -> None:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if (ins_p[0] is None) == (ins_p[1] is None):
            return  # a product of two parameters is not an input site
        k = 0 if ins_p[0] is not None else 1
        p, kc, kb = ins_p[k], (lc, rc)[k], (lb, rb)[k]
        pairs = tuple(zip(kc, (lc, rc)[1 - k]))
        if kb:
            self.note(p.leaf, "a batch axis of `dot_general` (vmapped layers: use a scan)")
            self._batched(eqn, p, key, k, pairs, ins_r[1 - k], control)
            return
        shape = tuple(eqn.invars[k].aval.shape)
        idx = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) if p.idx is None \
            else p.idx
        sel = idx[tuple(slice(None) if a in kc else 0 for a in range(len(shape)))]
        order = [sorted(kc).index(a) for a in kc]
        self._site(eqn, p, key, "dot", k, np.transpose(sel, order).ravel(),
                   idx[tuple(0 if a in kc else slice(None) for a in range(len(shape)))],
                   ins_r[1 - k], pairs, control)

    def conv(self, eqn, ins_p, ins_r, key, control) -> None:
        p = ins_p[1]
        if p is None or ins_p[0] is not None:
            return
        prm = eqn.params
        if p.idx is not None or prm["feature_group_count"] != 1 or prm["batch_group_count"] != 1:
            self.note(p.leaf, "a grouped or reshaped convolution kernel")
            return
        dn = prm["dimension_numbers"]
        shape = self.shapes[p.leaf][len(p.scans):]
        _, ci, *sp = dn.rhs_spec
        axes = [ci, *sp]  # patch features are (in, spatial...) in this order
        grid = np.indices([shape[a] for a in axes]).reshape(len(axes), -1)
        pos = np.zeros(grid.shape[1], np.int64)
        strides = np.cumprod((list(shape) + [1])[::-1])[::-1][1:]
        for a, g in zip(axes, grid):
            pos += strides[a] * g
        free = np.arange(shape[dn.rhs_spec[0]]) * strides[dn.rhs_spec[0]]
        self._site(eqn, p, key, "conv", 1, pos, free, ins_r[0],
                   ((dn.rhs_spec[1], dn.lhs_spec[1]),), control)

    def _batched(self, eqn, p, key, k, pairs, root, control) -> None:
        """A kernel read with batch axes: a site for the activation hook only."""
        self.batched.append(Site(key, p.leaf, "batched", k, None, (), (), p.scans, root,
                                 self.count(), pairs, p.direct and not p.scans, control,
                               eqn.invars[1 - k].aval.dtype))

    def _site(self, eqn, p: _Prov, key, kind, k, pos: np.ndarray, free_pos, root, pairs,
              control) -> None:
        """Records a site: ``pos`` are the slice positions of the operand's
        input features (in operand order), ``free_pos`` of its outputs."""
        shape = tuple(self.shapes[p.leaf][len(p.scans):])
        out_axes = tuple(a for a, c in enumerate(np.unravel_index(np.ravel(free_pos), shape))
                         if np.unique(c).size > 1)
        in_axes = tuple(a for a in range(len(shape)) if a not in out_axes)
        in_shape = tuple(shape[a] for a in in_axes)
        coords = np.unravel_index(pos, shape)
        target = np.ravel_multi_index([coords[a] for a in in_axes], in_shape) if in_axes \
            else np.zeros_like(pos)
        if target.size != int(np.prod(in_shape)) or np.unique(target).size != target.size:
            self.note(p.leaf, "a dot whose contracted axes mix its input and output axes")
            return
        perm = None if np.array_equal(target, np.arange(target.size)) else np.argsort(target)
        self.sites.append(Site(key, p.leaf, kind, k, perm, in_axes, in_shape, p.scans, root,
                               self.count(), pairs, p.direct and not p.scans, control,
                               eqn.invars[1 - k].aval.dtype))



# --------------------------------------------------------------------------
# Running the model with a hook at chosen sites


class Hook(Protocol):
    """What :func:`run` calls at every chosen site.

    ``key(site)`` names the tap a site adds to (taps of one key are summed,
    so a kernel read twice may sum its two statistics); ``tap(site, x)``
    gets the activation ``x`` entering the site and returns ``(x', tap)``:
    the activation the site then reads (``x`` itself, or ``x`` plus a
    probe) and the tap, any pytree of arrays; ``zeros(site, lead)`` is a
    zero tap with leading axes ``lead`` (the layers of a scan not yet run).
    """

    def key(self, site: Site) -> Any: ...

    def tap(self, site: Site, x: jax.Array) -> tuple[jax.Array, Any]: ...

    def zeros(self, site: Site, lead: tuple) -> Any: ...


def run(found: Sites, closed, args: list, chosen: list, hook: Hook,
        target: tuple | None = None) -> tuple[list, dict]:
    """Evaluates a traced model, tapping the ``chosen`` sites.

    Inside a layer ``scan`` a site's taps are stacked per layer (a leading
    axis of the scan's length), unless ``target = (scan key, layer)`` names
    that scan: then only the iteration ``layer`` (a traced int) taps, and
    the taps have no layer axis. Calls without chosen sites are bound as
    they are, so the jaxpr stays as fast as the model's own.

    Args:
      found: what :func:`find` returned for ``closed``.
      closed: the ClosedJaxpr :func:`find` walked.
      args: its input values.
      chosen: the sites to tap (from :func:`find`).
      hook: a :class:`Hook`.
      target: ``(scan key, layer)`` or ``None``.

    Returns:
      ``(outputs, {tap key: tap})``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxprune.graph import sites
      >>> class Norms:  # the squared norm of every kernel's input
      ...     def key(self, s): return s.leaf
      ...     def tap(self, s, x): return x, jnp.sum(x * x)
      ...     def zeros(self, s, lead): return jnp.zeros(lead)
      >>> ws, x = [jnp.ones((2, 2))], jnp.array([[1.0, 2.0]])
      >>> closed = jax.make_jaxpr(lambda ws, x: x @ ws[0])(ws, x)
      >>> found = sites.find(closed, [(2, 2)], [0])
      >>> outs, taps = sites.run(found, closed, ws + [x], found.sites, Norms())
      >>> outs[0].tolist(), float(taps[0])
      ([[3.0, 3.0]], 5.0)
    """
    jaxpr, consts = open_jaxpr(closed)
    return _Run(found.scan_lengths, chosen, hook, target).run(jaxpr, consts, list(args), ())


def bind(eqn, invals: list) -> list:
    """Evaluates one equation on concrete or traced values."""
    got = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) in older JAX
    subfuns, params = got if isinstance(got, tuple) else ((), got)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def add_taps(a: dict, b: dict) -> dict:
    """Taps summed key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = v if k not in out else jax.tree.map(jnp.add, out[k], v)
    return out


class _Run:
    """Evaluates a jaxpr and returns ``(outputs, taps)``."""

    def __init__(self, lengths: dict, chosen: list, hook: Hook, target: tuple | None):
        self.lengths, self.hook, self.target = lengths, hook, target
        self.sites = {s.key: s for s in chosen}
        self.first: dict = {}
        for s in chosen:
            self.first.setdefault(hook.key(s), s)
        self.active = {s.key[:i] for s in chosen for i in range(1, len(s.key))}
        self.stack: list = []  # keys of the scans we are inside
        self.it = None  # the iteration of the targeted scan

    def run(self, jaxpr, consts: list, args: list, path: tuple) -> tuple[list, dict]:
        taps: dict = {}

        def step(eqn, invals):
            nonlocal taps
            key = path + (id(eqn),)
            if key in self.sites:
                s = self.sites[key]
                x, tap = self.hook.tap(s, invals[1 - s.kernel_pos])
                invals = list(invals)
                invals[1 - s.kernel_pos] = x
                taps = add_taps(taps, {self.hook.key(s): self._masked(s, tap)})
                return bind(eqn, invals)
            if key in self.active:
                outs, more = self.nested(eqn, invals, key)
                taps = add_taps(taps, more)
                return outs
            return bind(eqn, invals)

        outs = interpret(jaxpr, consts, args, step, lambda x: x)
        return outs, taps

    def _masked(self, s: Site, tap):
        if self.target is not None and s.scans and s.scans[0] == self.target[0]:
            on = self.it == self.target[1]
            return jax.tree.map(lambda a: jnp.where(on, a, jnp.zeros_like(a)), tap)
        return tap

    def nested(self, eqn, invals, key) -> tuple[list, dict]:
        prim = eqn.primitive
        if prim in CALLS:
            sub, consts = open_jaxpr(sub_jaxpr(eqn))
            return self.run(sub, consts, invals, key)
        if prim is _P.scan_p:
            return self.scan(eqn, invals, key)
        if prim is _P.cond_p:
            return self.cond(eqn, invals, key)
        return self.while_(eqn, invals, key)

    def zeros(self, k) -> Any:
        """A zero tap of key ``k`` as seen at the current scan level."""
        s = self.first[k]
        level = sum(c in self.stack for c in s.scans)
        lead = tuple(self.lengths[c] for c in s.scans[level:])
        if self.target is not None and s.scans and s.scans[0] == self.target[0]:
            lead = ()
        return self.hook.zeros(s, lead)

    def inside(self, key) -> list:
        return list(dict.fromkeys(self.hook.key(s) for s in self.sites.values()
                                  if s.key[:len(key)] == key))

    def scan(self, eqn, invals, key) -> tuple[list, dict]:
        prm = eqn.params
        nc, nk, length = prm["num_consts"], prm["num_carry"], prm["length"]
        consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
        body, bconsts = open_jaxpr(prm["jaxpr"])
        keys = self.inside(key)
        targeted = self.target is not None and self.target[0] == key
        stacked = [k for k in keys if key in self.first[k].scans and not targeted]
        summed = [k for k in keys if k not in stacked]
        self.stack.append(key)
        zero = {k: self.zeros(k) for k in summed}

        def step(carry, x):
            c, acc = carry
            xs_i, it = x
            saved, self.it = self.it, (it if targeted else self.it)
            try:
                outs, taps = self.run(body, bconsts, list(consts) + list(c) + list(xs_i), key)
            finally:
                self.it = saved
            acc = add_taps(acc, {k: taps[k] for k in summed if k in taps})
            ys = {k: taps[k] if k in taps else self.zeros(k) for k in stacked}
            return (outs[:nk], acc), (outs[nk:], ys)

        try:
            (c, acc), (ys, tys) = lax.scan(
                step, (list(init), zero), (list(xs), jnp.arange(length)), length=length,
                reverse=prm["reverse"], unroll=prm["unroll"])
        finally:
            self.stack.pop()
        return list(c) + list(ys), {**acc, **tys}

    def cond(self, eqn, invals, key) -> tuple[list, dict]:
        zero = {k: self.zeros(k) for k in self.inside(key)}

        def branch(br):
            def f(*ops):
                sub, consts = open_jaxpr(br)
                outs, taps = self.run(sub, consts, list(ops), key)
                return outs, {**zero, **taps}
            return f

        outs, taps = lax.switch(invals[0], [branch(b) for b in eqn.params["branches"]],
                                *invals[1:])
        return list(outs), taps

    def while_(self, eqn, invals, key) -> tuple[list, dict]:
        prm = eqn.params
        cn, bn = prm["cond_nconsts"], prm["body_nconsts"]
        cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
        cond_j, cond_c = open_jaxpr(prm["cond_jaxpr"])
        body_j, body_c = open_jaxpr(prm["body_jaxpr"])
        zero = {k: self.zeros(k) for k in self.inside(key)}

        def cond_fn(carry):
            return jcore.jaxpr_as_fun(jcore.ClosedJaxpr(cond_j, cond_c))(*cconsts, *carry[0])[0]

        def body_fn(carry):
            outs, taps = self.run(body_j, body_c, list(bconsts) + list(carry[0]), key)
            return outs, add_taps(carry[1], taps)

        outs, taps = lax.while_loop(cond_fn, body_fn, (list(init), zero))
        return list(outs), taps


# --------------------------------------------------------------------------
# Pieces: the top level cut for runs that resume from cached activations


class Pieces:
    """The top-level equations of a traced model, cut into pieces that run
    from cached activations.

    A value is an *activation* if it depends on the model's inputs past the
    first ``n_params`` (the batch); other values depend only on parameters
    and constants and are recomputed in every piece (they have no batch
    axis). A cut at equation ``c`` caches the activations defined before
    ``c`` that equations from ``c`` on read; it stays valid while no
    activation before ``c`` reads a parameter that changes
    (:meth:`start`).

    Args:
      closed: the traced model (parameters first, then the batch).
      n_params: how many inputs are parameters.
    """

    def __init__(self, closed, n_params: int):
        self.jaxpr, self.consts = open_jaxpr(closed)
        j = self.jaxpr
        self.eqns = list(j.eqns)
        self.index = {id(e): i for i, e in enumerate(self.eqns)}
        act = set(j.invars[n_params:])
        dep = {v: frozenset([i]) for i, v in enumerate(j.invars[:n_params])}
        self.is_act, self.reads = [], []
        for e in self.eqns:
            ins = [v for v in e.invars if isinstance(v, jcore.Var)]
            a = any(v in act for v in ins)
            leaves = frozenset().union(*[dep.get(v, frozenset()) for v in ins if v not in act])
            self.is_act.append(a)
            self.reads.append(leaves)
            for v in e.outvars:
                if a:
                    act.add(v)
                else:
                    dep[v] = leaves
        self.act = act
        self.defined = {v: i for i, e in enumerate(self.eqns) for v in e.outvars}

    def start(self, leaves) -> int:
        """The first activation equation that reads ``leaves`` (through
        parameter-only values); ``len(eqns)`` if none."""
        leaves = set(leaves)
        return next((i for i, (a, r) in enumerate(zip(self.is_act, self.reads))
                     if a and r & leaves), len(self.eqns))

    def stop(self, chosen: list) -> int:
        """One past the last top-level equation holding a ``chosen`` site."""
        return 1 + max(self.index[s.key[0]] for s in chosen)

    def live(self, c: int) -> list:
        """The activations defined before equation ``c`` that equations from
        ``c`` on (or the outputs) read."""
        later = {v for e in self.eqns[c:] for v in e.invars if isinstance(v, jcore.Var)}
        later |= {v for v in self.jaxpr.outvars if isinstance(v, jcore.Var)}
        return [v for e in self.eqns[:c] for v in e.outvars if v in self.act and v in later]

    def piece(self, c: int, e: int, cached: list, keep: list) -> Any:
        """A jaxpr-like piece: inputs the model's inputs, then ``cached``
        (activations live at ``c``); equations the parameter-only ones
        before ``c``, then ``c`` to ``e``; outputs ``keep``."""
        j = self.jaxpr
        eqns = [x for i, x in enumerate(self.eqns[:c]) if not self.is_act[i]] + self.eqns[c:e]
        return _Piece(j.constvars, list(j.invars) + list(cached), list(keep), eqns)

    def layer_scan(self, i: int) -> LayerScan | None:
        """Equation ``i`` as a layer scan :func:`run_layer` can run, else ``None``."""
        eqn = self.eqns[i]
        if eqn.primitive is not _P.scan_p or eqn.params["reverse"]:
            return None
        return LayerScan(eqn.params["length"], eqn.params["num_carry"], list(eqn.outvars))

    def layer_macs(self, i: int, chosen: list) -> int:
        """Multiply-accumulates of one layer of the scan at equation ``i``:
        what the ``chosen`` sites' inputs need, or (none chosen) the whole
        body."""
        body = open_jaxpr(self.eqns[i].params["jaxpr"])[0]
        return live_macs(body.eqns, chosen, [] if chosen else list(body.outvars), 1)

    def macs(self, c: int, e: int, chosen: list, keep: list) -> int:
        """Multiply-accumulates of :meth:`piece` that the activations entering
        ``chosen`` and ``keep`` need (dead equations left out)."""
        eqns = [x for i, x in enumerate(self.eqns[:c]) if not self.is_act[i]] + self.eqns[c:e]
        return live_macs(eqns, chosen, keep, 0)


def live_macs(eqns: list, chosen: list, keep: list, depth: int) -> int:
    """Multiply-accumulates of the equations (at nesting ``depth`` of the
    sites' keys) that the activations entering ``chosen`` and the values
    ``keep`` depend on: what a run computes after dead-code elimination."""
    need = set(keep)
    by_id = {id(x): x for x in eqns}
    nested = {s.key[depth] for s in chosen if len(s.key) > depth + 1}
    for s in chosen:
        if len(s.key) == depth + 1 and s.key[depth] in by_id:
            v = by_id[s.key[depth]].invars[1 - s.kernel_pos]
            if isinstance(v, jcore.Var):
                need.add(v)
    total = 0
    for x in reversed(eqns):
        if id(x) in nested or any(v in need for v in x.outvars):
            total += macs(_Piece([], [], [], [x]))
            need.update(v for v in x.invars if isinstance(v, jcore.Var))
    return total


class LayerScan(NamedTuple):
    """A top-level ``scan`` run layer by layer: its length, carry count and
    output variables."""

    length: int
    num_carry: int
    outvars: list


@dataclasses.dataclass
class _Piece:
    constvars: list
    invars: list
    outvars: list
    eqns: list


def run_piece(found: Sites, pieces: Pieces, piece: Any, args: list, chosen: list, hook: Hook,
              ) -> tuple[list, dict]:
    """:func:`run` on a piece of :class:`Pieces` (``args``: the model's
    inputs, then the cached activations)."""
    return _Run(found.scan_lengths, chosen, hook, None).run(piece, pieces.consts, list(args), ())


def run_layer(found: Sites, pieces: Pieces, c: int, args: list, chosen: list, hook: Hook,
              carry: list, layer: Any) -> tuple[list, dict]:
    """One layer of the layer ``scan`` at top-level equation ``c``, from the
    cached activations live at ``c`` (``args``: the model's inputs, then
    those) and the layer's input ``carry`` (``None``: the scan's initial
    carry); taps the ``chosen`` sites.

    Returns:
      ``(outputs of the scan body: carry, then the layer's ys; taps)``.
    """
    eqn = pieces.eqns[c]
    r = _Run(found.scan_lengths, chosen, hook, ((id(eqn),), layer))
    prefix = pieces.piece(c, c, pieces.live(c), eqn.invars)
    invals = interpret(prefix, pieces.consts, list(args), lambda x, v: bind(x, v),
                       lambda x: x)
    prm = eqn.params
    nc, nk = prm["num_consts"], prm["num_carry"]
    carry = invals[nc:nc + nk] if carry is None else carry
    xs = [lax.dynamic_index_in_dim(x, layer, 0, keepdims=False) for x in invals[nc + nk:]]
    body, bconsts = open_jaxpr(prm["jaxpr"])
    r.stack.append((id(eqn),))
    r.it = layer
    return r.run(body, bconsts, list(invals[:nc]) + list(carry) + xs, (id(eqn),))

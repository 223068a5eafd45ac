"""Calibration: statistics of the inputs of every kernel, read from the jaxpr.

:func:`calibrate` runs a model over calibration batches and accumulates, for
every selected kernel, statistics of the activations it multiplies: the
sum of squares of every input feature, the number of rows, and optionally
the Gram matrix ``X^T X``. Activation-aware pruning (Wanda, SparseGPT, OWL
in :mod:`jaxprune.oneshot` and :func:`jaxprune.allocation.owl`) starts from
them.

How: ``apply_fn(params, batch)`` is traced to a jaxpr once per batch shape.
A static walk follows every kernel leaf (through casts, reshapes,
transposes, calls such as ``jit``, ``remat``, ``custom_jvp``/``custom_vjp``,
and the slices of a ``scan`` over stacked layers) to the ``dot_general``
and ``conv_general_dilated`` equations that read it: these are the *sites*.
The jaxpr is then re-evaluated by an interpreter that also returns the
statistics of the other operand at every site (inside a layer ``scan``,
per layer, as extra stacked outputs), under one :func:`jax.jit` per batch
shape; the accumulated statistics are the only state, so memory does not
grow with the number of batches and no activation is kept.

Stats format: a ``dict`` from the kernel's ``"/"``-joined key path (as
:func:`jaxprune.tree.paths` spells it) to an :class:`InputStats`:

* ``sumsq``: ``sum over rows of x_j ** 2`` for every input feature ``j``,
  shaped like the kernel's input axes (``(in,)`` for a Dense ``(in, out)``
  kernel; ``(h, d)`` for an attention output kernel ``(h, d, out)``;
  ``(kh, kw, in)`` for a conv kernel ``(kh, kw, in, out)``); a stacked kernel
  ``(L, in, out)`` has ``(L, in)``.
* ``count``: the number of rows (tokens, pixels) accumulated: an int32
  scalar, ``(L,)`` for a stacked kernel.
* ``gram``: ``sum over rows of x x^T`` over the flattened input features
  (row-major over the input axes), ``(d, d)`` or ``(L, d, d)``; ``None``
  unless ``gram=True``.
* static fields: ``shape`` (the kernel's), ``in_axes`` and ``out_axes``
  (axes of the kernel, the layer axis excluded), ``layers`` (``L`` or
  ``None``), ``point`` (kernels with the same ``point`` read the same input,
  e.g. q, k and v, or gate and up) and ``stack`` (which layer ``scan``
  slices it, or ``None``).

A kernel read by several dots (shared weights) accumulates every use.

Example:
  >>> import jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"w": jnp.ones((3, 2))}
  >>> batches = [jnp.array([[1.0, 2.0, 0.0]]), jnp.array([[3.0, 0.0, 0.0]])]
  >>> stats = jp.calibrate(lambda p, x: x @ p["w"], params, batches)
  >>> stats["w"].sumsq.tolist(), int(stats["w"].count)
  ([10.0, 4.0, 0.0], 2)

References:
  Sun et al., "A simple and effective pruning approach for large language
  models" (Wanda), ICLR 2024; Frantar & Alistarh, "SparseGPT: massive
  language models can be accurately pruned in one-shot", ICML 2023.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jaxprune import tree as _tree
from jaxprune.tree import PyTree

__all__ = ["InputStats", "calibrate"]


# --------------------------------------------------------------------------
# The stats


@dataclasses.dataclass(frozen=True)
class InputStats:
    """Statistics of the inputs of one kernel (see the module docstring).

    Attributes:
      sumsq: per input feature, the sum of squares over all rows.
      count: rows accumulated (int32; per layer for a stacked kernel).
      gram: ``X^T X`` over the flattened input features, or ``None``.
      shape: the kernel's shape.
      in_axes: the kernel's input (contracted) axes.
      out_axes: its output axes.
      layers: the length of its layer axis (axis 0) if stacked, else ``None``.
      point: kernels sharing a ``point`` read the same input.
      stack: the layer ``scan`` that slices it (an index), else ``None``.
    """

    sumsq: jax.Array
    count: jax.Array
    gram: jax.Array | None
    shape: tuple = ()
    in_axes: tuple = ()
    out_axes: tuple = ()
    layers: int | None = None
    point: int = 0
    stack: int | None = None

    def norm(self) -> jax.Array:
        """``||X_j||_2`` per input feature (Wanda's activation norm)."""
        return jnp.sqrt(self.sumsq)

    @property
    def feature_shape(self) -> tuple:
        """The kernel's shape with its output axes set to 1 (``sumsq`` reshaped
        to it broadcasts against the kernel)."""
        lead = 1 if self.layers else 0
        shape = [1] * len(self.shape)
        if lead:
            shape[0] = self.shape[0]
        for a in self.in_axes:
            shape[a + lead] = self.shape[a + lead]
        return tuple(shape)

    def expanded(self, x: jax.Array) -> jax.Array:
        """A per-input-feature array broadcast against the kernel (size-1 out axes)."""
        return jnp.reshape(x, self.feature_shape)


jax.tree_util.register_dataclass(
    InputStats, data_fields=["sumsq", "count", "gram"],
    meta_fields=["shape", "in_axes", "out_axes", "layers", "point", "stack"])


# --------------------------------------------------------------------------
# Static walk: where each kernel is read


CALLS = tuple(p for p in (getattr(jcore.primitives, n, None) for n in (
    "jit_p", "pjit_p", "closed_call_p", "call_p", "core_call_p", "remat_p", "checkpoint_p",
    "custom_jvp_call_p", "custom_vjp_call_p", "custom_vjp_call_jaxpr_p")) if p is not None)
_P = jcore.primitives
CASTS = (_P.convert_element_type_p, _P.copy_p)
SHAPE_OPS = (_P.reshape_p, _P.transpose_p, _P.squeeze_p, _P.broadcast_in_dim_p)


def sub_jaxpr(eqn) -> Any:
    """The jaxpr a call-like primitive runs on its operands."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    raise KeyError(f"no sub-jaxpr in {eqn.primitive.name}")


def _open(j) -> tuple[Any, list]:
    """``(jaxpr, consts)`` of a Jaxpr or a ClosedJaxpr."""
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


@dataclasses.dataclass
class _Prov:
    """A value that is (a view of) one slice of a kernel leaf: ``idx`` holds
    the flat position in the slice of every element (``None``: the slice
    itself); ``scans`` the keys of the scans that sliced it."""

    leaf: int
    idx: np.ndarray | None
    scans: tuple


@dataclasses.dataclass(frozen=True)
class Site:
    """A dot or conv that multiplies a kernel slice with an activation."""

    key: tuple  # ids of the enclosing equations, then its own
    leaf: int
    kind: str  # "dot" or "conv"
    kernel_pos: int  # operand position of the kernel
    perm: np.ndarray | None  # operand feature order -> kernel input order
    in_axes: tuple  # of the slice
    in_shape: tuple
    scans: tuple  # keys of the scans slicing the kernel, outermost first
    root: Any  # identity of the activation (through casts and calls)
    order: int


class _Walk:
    """Follows the selected kernel leaves through the jaxpr to their sites."""

    def __init__(self, shapes: list, selected: list, paths: list):
        self.shapes, self.selected, self.paths = shapes, selected, paths
        self.sites: list[Site] = []
        self.notes: dict = {}  # leaf -> why a use was not a site
        self.scan_lengths: dict = {}

    def note(self, leaf: int, text: str) -> None:
        self.notes.setdefault(leaf, []).append(text)

    def walk(self, jaxpr, provs: list, roots: list, path: tuple) -> tuple[list, list]:
        envp, envr = {}, {}
        for v in jaxpr.constvars:
            envr[v] = (path, id(v))
        for v, p, r in zip(jaxpr.invars, provs, roots):
            envp[v], envr[v] = p, r
        for eqn in jaxpr.eqns:
            ins_p = [envp.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
            ins_r = [envr.get(v, (path, id(v))) if isinstance(v, jcore.Var) else None
                     for v in eqn.invars]
            key = path + (id(eqn),)
            outs_p, outs_r = self.eqn(eqn, ins_p, ins_r, key)
            for v, p, r in zip(eqn.outvars, outs_p, outs_r):
                envp[v], envr[v] = p, r
        outs_p = [envp.get(v) if isinstance(v, jcore.Var) else None for v in jaxpr.outvars]
        outs_r = [envr.get(v) if isinstance(v, jcore.Var) else None for v in jaxpr.outvars]
        return outs_p, outs_r

    def eqn(self, eqn, ins_p, ins_r, key) -> tuple[list, list]:
        prim = eqn.primitive
        none = [None] * len(eqn.outvars)
        roots = [(key, k) for k in range(len(eqn.outvars))]
        if prim in CASTS:
            return ins_p[:1], ins_r[:1]
        if not any(p is not None for p in ins_p):
            if prim in CALLS:  # activations keep their identity through calls
                sub, _ = _open(sub_jaxpr(eqn))
                _, r = self.walk(sub, [None] * len(ins_p), ins_r, key)
                return none, [x if x is not None else d for x, d in zip(r, roots)]
            return none, roots
        if prim in CALLS:
            sub, _ = _open(sub_jaxpr(eqn))
            p, r = self.walk(sub, ins_p, ins_r, key)
            return p, [x if x is not None else d for x, d in zip(r, roots)]
        if prim is _P.scan_p:
            self.scan(eqn, ins_p, ins_r, key)
        elif prim is _P.cond_p:
            for br in eqn.params["branches"]:
                self.walk(_open(br)[0], ins_p[1:], ins_r[1:], key)
        elif prim is _P.while_p:
            self.while_(eqn, ins_p, ins_r, key)
        elif prim is _P.dot_general_p:
            self.dot(eqn, ins_p, ins_r, key)
        elif prim is _P.conv_general_dilated_p:
            self.conv(eqn, ins_p, ins_r, key)
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
        body, _ = _open(prm["jaxpr"])
        roots = ins_r[:nc] + [(key, id(v)) for v in body.invars[nc:]]
        self.walk(body, list(ins_p[:nc]) + [None] * nk + xs, roots, key)

    def while_(self, eqn, ins_p, ins_r, key) -> None:
        prm = eqn.params
        cn, bn = prm["cond_nconsts"], prm["body_nconsts"]
        for p in ins_p[:cn] + ins_p[cn + bn:]:
            if p is not None:
                self.note(p.leaf, "the condition or carry of `while`")
        body, _ = _open(prm["body_jaxpr"])
        roots = ins_r[cn:cn + bn] + [(key, id(v)) for v in body.invars[bn:]]
        self.walk(body, list(ins_p[cn:cn + bn]) + [None] * (len(body.invars) - bn), roots, key)

    def slice(self, p: _Prov | None, key) -> _Prov | None:
        """The per-iteration slice of a scanned kernel (its leading axis)."""
        if p is None:
            return None
        if p.idx is None:
            return _Prov(p.leaf, None, p.scans + (key,))
        n = p.idx[0].size
        flat = p.idx.reshape(p.idx.shape[0], -1)
        first = flat[0]
        if np.array_equal(np.sort(first), np.arange(n)) and np.array_equal(
                flat - first, np.arange(flat.shape[0])[:, None] * n + 0 * first):
            return _Prov(p.leaf, p.idx[0], p.scans + (key,))
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
        return _Prov(p.leaf, idx, p.scans)

    def dot(self, eqn, ins_p, ins_r, key) -> None:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if (ins_p[0] is None) == (ins_p[1] is None):
            return  # a product of two parameters is not an input site
        k = 0 if ins_p[0] is not None else 1
        p, kc, kb = ins_p[k], (lc, rc)[k], (lb, rb)[k]
        if kb:
            self.note(p.leaf, "a batch axis of `dot_general` (vmapped layers: use a scan)")
            return
        self._check_float(eqn.invars[1 - k], p)
        shape = tuple(eqn.invars[k].aval.shape)
        idx = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) if p.idx is None \
            else p.idx
        sel = idx[tuple(slice(None) if a in kc else 0 for a in range(len(shape)))]
        order = [sorted(kc).index(a) for a in kc]
        self._site(eqn, p, key, "dot", k, np.transpose(sel, order).ravel(),
                   idx[tuple(0 if a in kc else slice(None) for a in range(len(shape)))],
                   ins_r[1 - k])

    def conv(self, eqn, ins_p, ins_r, key) -> None:
        p = ins_p[1]
        if p is None or ins_p[0] is not None:
            return
        prm = eqn.params
        if p.idx is not None or prm["feature_group_count"] != 1 or prm["batch_group_count"] != 1:
            self.note(p.leaf, "a grouped or reshaped convolution kernel")
            return
        self._check_float(eqn.invars[0], p)
        shape = self.shapes[p.leaf][len(p.scans):]
        _, ci, *sp = prm["dimension_numbers"].rhs_spec
        axes = [ci, *sp]  # patch features are (in, spatial...) in this order
        grid = np.indices([shape[a] for a in axes]).reshape(len(axes), -1)
        pos = np.zeros(grid.shape[1], np.int64)
        strides = np.cumprod((list(shape) + [1])[::-1])[::-1][1:]
        for a, g in zip(axes, grid):
            pos += strides[a] * g
        free = np.arange(shape[prm["dimension_numbers"].rhs_spec[0]]) * strides[
            prm["dimension_numbers"].rhs_spec[0]]
        self._site(eqn, p, key, "conv", 1, pos, free, ins_r[0])

    def _check_float(self, x, p: _Prov) -> None:
        if not jnp.issubdtype(x.aval.dtype, jnp.floating):
            raise TypeError(
                f"calibrate: kernel {self.paths[p.leaf]!r} multiplies an input of dtype "
                f"{x.aval.dtype}; input statistics need floating inputs. Cast the input to "
                "a float dtype in apply_fn, or exclude the kernel with where=.")

    def _site(self, eqn, p: _Prov, key, kind, k, pos: np.ndarray, free_pos, root) -> None:
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
                               len(self.sites)))


# --------------------------------------------------------------------------
# Running: the jaxpr again, with the statistics of the selected sites


def _bind(eqn, invals: list) -> list:
    got = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) in older JAX
    subfuns, params = got if isinstance(got, tuple) else ((), got)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = v if k not in out else jax.tree.map(jnp.add, out[k], v)
    return out


class _Tapper:
    """Evaluates a jaxpr and returns ``(outputs, taps)``; ``taps[leaf]`` is a
    dict ``sumsq``, ``count`` (and ``gram``) summed over the leaf's sites."""

    def __init__(self, plan: _Plan, leaves: set, gram: bool, target: tuple | None = None):
        self.plan, self.gram, self.target = plan, gram, target
        self.sites = {s.key: s for s in plan.sites if s.leaf in leaves}
        self.active = {s.key[:i] for s in self.sites.values() for i in range(1, len(s.key))}
        self.stack: list = []  # keys of the scans we are inside
        self.it = None  # the iteration of the targeted scan
        self.memo: dict = {}

    def run(self, jaxpr, consts: list, args: list, path: tuple) -> tuple[list, dict]:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        taps: dict = {}
        for eqn in jaxpr.eqns:
            key = path + (id(eqn),)
            invals = [read(v) for v in eqn.invars]
            if key in self.sites:
                outs = _bind(eqn, invals)
                taps = _add(taps, {self.sites[key].leaf: self.tap(self.sites[key], invals)})
            elif key in self.active:
                outs, more = self.nested(eqn, invals, key)
                taps = _add(taps, more)
            else:
                outs = _bind(eqn, invals)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars], taps

    def nested(self, eqn, invals, key) -> tuple[list, dict]:
        prim = eqn.primitive
        if prim in CALLS:
            sub, consts = _open(sub_jaxpr(eqn))
            return self.run(sub, consts, invals, key)
        if prim is _P.scan_p:
            return self.scan(eqn, invals, key)
        if prim is _P.cond_p:
            return self.cond(eqn, invals, key)
        return self.while_(eqn, invals, key)

    # ---- statistics of one site
    def tap(self, s: Site, invals: list) -> dict:
        x = invals[1 - s.kernel_pos]
        memo = (id(x), s.kind, s.kernel_pos, id(s.perm) if s.perm is None else s.perm.tobytes(),
                self._dims(s))
        if memo not in self.memo:  # kernels reading one input share its statistics
            self.memo[memo] = (x, self._stats(s, x))  # x kept alive: its id stays unique
        out = self.memo[memo][1]
        if self.target is not None and s.scans and s.scans[0] == self.target[0]:
            on = self.it == self.target[1]
            out = jax.tree.map(lambda a: jnp.where(on, a, jnp.zeros_like(a)), out)
        return out

    def _dims(self, s: Site) -> tuple:
        eqn_params = self.plan.eqn_params[s.key]
        if s.kind == "dot":
            (lc, rc), _ = eqn_params["dimension_numbers"]
            return tuple((lc, rc)[1 - s.kernel_pos])
        return ()

    def _stats(self, s: Site, x: jax.Array) -> dict:
        prm = self.plan.eqn_params[s.key]
        if s.kind == "dot":
            lc = self._dims(s)
            free = [a for a in range(x.ndim) if a not in lc]
            rows = jnp.transpose(x, free + list(lc)).reshape(-1, int(np.prod(s.in_shape)))
        else:
            dn = prm["dimension_numbers"]
            kshape = self.plan.shapes[s.leaf][len(s.scans):]
            patches = lax.conv_general_dilated_patches(
                x, tuple(kshape[a] for a in dn.rhs_spec[2:]), prm["window_strides"],
                prm["padding"], prm["lhs_dilation"], prm["rhs_dilation"], dn,
                precision=lax.Precision.HIGHEST)
            rows = jnp.moveaxis(patches, dn.out_spec[1], -1).reshape(-1, patches.shape[
                dn.out_spec[1]])
        rows = rows.astype(jnp.float32)
        if s.perm is not None:
            rows = rows[:, s.perm]
        out = {"sumsq": jnp.sum(rows * rows, 0).reshape(s.in_shape),
               "count": jnp.asarray(rows.shape[0], jnp.int32)}
        if self.gram:
            out["gram"] = jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST)
        return out

    # ---- control flow
    def zeros(self, leaf: int, level: int) -> dict:
        """Zero taps of a leaf as seen inside ``level`` of its slicing scans."""
        s = self.plan.leaf_site(leaf)
        lead = tuple(self.plan.shapes[leaf][level:len(s.scans)])
        if self.target is not None and s.scans and s.scans[0] == self.target[0]:
            lead = ()
        d = int(np.prod(s.in_shape))
        out = {"sumsq": jnp.zeros(lead + s.in_shape, jnp.float32),
               "count": jnp.zeros(lead, jnp.int32)}
        if self.gram:
            out["gram"] = jnp.zeros(lead + (d, d), jnp.float32)
        return out

    def _inside(self, key) -> list:
        return sorted({s.leaf for s in self.sites.values() if s.key[:len(key)] == key})

    def _level(self, leaf: int) -> int:
        return sum(k in self.stack for k in self.plan.leaf_site(leaf).scans)

    def scan(self, eqn, invals, key) -> tuple[list, dict]:
        prm = eqn.params
        nc, nk, length = prm["num_consts"], prm["num_carry"], prm["length"]
        consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
        body, bconsts = _open(prm["jaxpr"])
        leaves = self._inside(key)
        targeted = self.target is not None and self.target[0] == key
        stacked = [j for j in leaves if key in self.plan.leaf_site(j).scans and not targeted]
        summed = [j for j in leaves if j not in stacked]
        self.stack.append(key)
        zero = {j: self.zeros(j, self._level(j)) for j in summed}

        def step(carry, x):
            c, acc = carry
            xs_i, it = x
            saved, self.it = self.it, (it if targeted else self.it)
            try:
                outs, taps = self.run(body, bconsts, list(consts) + list(c) + list(xs_i), key)
            finally:
                self.it = saved
            acc = _add(acc, {j: taps[j] for j in summed if j in taps})
            ys = {j: taps[j] if j in taps else self.zeros(j, self._level(j)) for j in stacked}
            return (outs[:nk], acc), (outs[nk:], ys)

        try:
            (c, acc), (ys, tys) = lax.scan(
                step, (list(init), zero), (list(xs), jnp.arange(length)), length=length,
                reverse=prm["reverse"], unroll=prm["unroll"])
        finally:
            self.stack.pop()
        return list(c) + list(ys), {**acc, **tys}

    def cond(self, eqn, invals, key) -> tuple[list, dict]:
        leaves = self._inside(key)
        zero = {j: self.zeros(j, self._level(j)) for j in leaves}

        def branch(br):
            def f(*ops):
                sub, consts = _open(br)
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
        cond_j, cond_c = _open(prm["cond_jaxpr"])
        body_j, body_c = _open(prm["body_jaxpr"])
        zero = {j: self.zeros(j, self._level(j)) for j in self._inside(key)}

        def cond_fn(carry):
            return jcore.jaxpr_as_fun(jcore.ClosedJaxpr(cond_j, cond_c))(*cconsts, *carry[0])[0]

        def body_fn(carry):
            outs, taps = self.run(body_j, body_c, list(bconsts) + list(carry[0]), key)
            return outs, _add(carry[1], taps)

        outs, taps = lax.while_loop(cond_fn, body_fn, (list(init), zero))
        return list(outs), taps


# --------------------------------------------------------------------------
# The plan: one traced jaxpr (per batch shape) and its sites


@dataclasses.dataclass
class _Plan:
    closed: Any
    sites: list
    shapes: list  # of the array leaves
    paths: list
    eqn_params: dict
    scan_lengths: dict
    steps: dict = dataclasses.field(default_factory=dict)

    def leaf_site(self, leaf: int) -> Site:
        return next(s for s in self.sites if s.leaf == leaf)

    def leaves(self) -> list[int]:
        return sorted({s.leaf for s in self.sites})

    def step(self, leaves, gram: bool, target=None) -> Callable:
        """Jitted ``step(acc, arrays, batch_leaves, layer) -> acc + taps`` (cached)."""
        key = (tuple(leaves), gram, target)
        if key not in self.steps:
            f = self.tapped(leaves, gram, target)

            def step(acc, arrays, batch, layer):
                return _add(acc, f(arrays, batch, layer))

            self.steps[key] = jax.jit(step, donate_argnums=0)
        return self.steps[key]

    def tapped(self, leaves, gram: bool, target=None) -> Callable:
        """``f(arrays, batch_leaves) -> taps`` for ``leaves``."""
        jaxpr, consts = self.closed.jaxpr, self.closed.consts

        def f(arrays, batch, layer=None):
            t = _Tapper(self, set(leaves), gram, None if target is None else (target, layer))
            return t.run(jaxpr, consts, list(arrays) + list(batch), ())[1]

        return f


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval")


class Model:
    """A model function, the layout of its parameters, and its plans (one
    traced jaxpr per batch shape, each with its compiled steps)."""

    def __init__(self, apply_fn: Callable, params: PyTree, example: Any, where: Any):
        self.apply_fn = apply_fn
        self.paths, leaves, self.treedef = _tree.flatten(params)
        self.array_idx = [i for i, x in enumerate(leaves) if _is_array(x)]
        self.leaves = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) if _is_array(x)
                       else x for x in leaves]  # arrays come with every call
        self.selected = self._select(params, leaves, example, where)
        self.plans: dict = {}
        self.plan(example)

    def arrays_of(self, params: PyTree) -> list:
        """The array leaves of ``params`` (laid out as when the model was built)."""
        leaves = jax.tree_util.tree_leaves(params)
        return [leaves[i] for i in self.array_idx]

    def _select(self, params, leaves, example, where) -> list[int]:
        """Indices (into the array leaves) of the kernels to calibrate."""
        if where is None:
            from jaxprune import graph as _graph

            where = _graph.trace(self.apply_fn, params, example).kernels
        sel = _tree.flags(params, where)
        out = []
        for j, i in enumerate(self.array_idx):
            if sel[i]:
                if not _tree.is_float(leaves[i]):
                    raise TypeError(
                        f"calibrate: leaf {self.paths[i]!r} has dtype "
                        f"{jnp.result_type(leaves[i])}; only floating kernels can be "
                        "calibrated. Exclude it with where=.")
                out.append(j)
        if not out:
            raise ValueError(f"calibrate: where={where!r} selects no array leaf of params "
                             f"(paths: {self.paths[:20]}).")
        return out

    def rebuild(self, arrays: list) -> PyTree:
        full = list(self.leaves)
        for i, x in zip(self.array_idx, arrays):
            full[i] = x
        return _tree.unflatten(self.treedef, full)

    def plan(self, batch: Any) -> _Plan:
        leaves, bdef = jax.tree_util.tree_flatten(batch)
        sig = (bdef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        if sig not in self.plans:
            self.plans[sig] = self._make_plan(batch)
        return self.plans[sig]

    def _make_plan(self, batch: Any) -> _Plan:
        bleaves, bdef = jax.tree_util.tree_flatten(batch)

        def fn(arrays, bl):
            return self.apply_fn(self.rebuild(arrays), jax.tree_util.tree_unflatten(bdef, bl))

        specs = [self.leaves[i] for i in self.array_idx]
        closed = jax.make_jaxpr(fn)(specs, bleaves)
        shapes = [tuple(x.shape) for x in specs]
        paths = [self.paths[i] for i in self.array_idx]
        w = _Walk(shapes, self.selected, paths)
        n = len(self.array_idx)
        provs = [_Prov(j, None, ()) if j in self.selected else None for j in range(n)]
        roots = [("in", k) for k in range(len(closed.jaxpr.invars))]
        w.walk(closed.jaxpr, provs + [None] * len(bleaves), roots, ())
        _check_sites(w, paths, self.selected)
        return _Plan(closed, w.sites, shapes, paths, _eqn_params(closed.jaxpr, ()),
                     w.scan_lengths)


_MODELS: dict = {}  # recent models, so that repeated calls reuse their compiled steps
_MODELS_KEPT = 4


def model(apply_fn: Callable, params: PyTree, example: Any, where: Any) -> Model:
    """A :class:`Model`, reused when ``apply_fn``, the parameters' layout and
    ``where`` are the same as in a recent call (as :func:`jax.jit` reuses a
    function's compilations)."""
    paths, leaves, treedef = _tree.flatten(params)
    layout = tuple((np.shape(x), str(jnp.result_type(x))) if _is_array(x) else ("static", x)
                   for x in leaves)
    key = (apply_fn, treedef, layout, where)
    try:
        hash(key)
    except TypeError:  # unhashable where= (a bool tree) or static leaves
        return Model(apply_fn, params, example, where)
    if key not in _MODELS:
        _MODELS[key] = Model(apply_fn, params, example, where)
        while len(_MODELS) > _MODELS_KEPT:
            del _MODELS[next(iter(_MODELS))]
    m = _MODELS.pop(key)
    _MODELS[key] = m  # most recent last
    m.plan(example)
    return m


def _eqn_params(jaxpr, path: tuple) -> dict:
    """``{key: params}`` of every equation, nested ones included."""
    out = {}
    for eqn in jaxpr.eqns:
        key = path + (id(eqn),)
        out[key] = eqn.params
        for sub in _subs(eqn):
            out.update(_eqn_params(_open(sub)[0], key))
    return out


def _subs(eqn) -> list:
    out = []
    for v in eqn.params.values():
        if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            out.append(v)
        elif isinstance(v, tuple) and v and isinstance(v[0], (jcore.Jaxpr, jcore.ClosedJaxpr)):
            out.extend(v)
    return out


def _check_sites(w: _Walk, paths: list, selected: list) -> None:
    seen = {}
    for s in w.sites:
        first = seen.setdefault(s.leaf, s)
        if (first.in_axes, first.scans) != (s.in_axes, s.scans):
            raise ValueError(
                f"calibrate: kernel {paths[s.leaf]!r} is read with different input axes "
                f"({first.in_axes} and {s.in_axes}) or layer scans; its statistics would "
                "not line up. Exclude it with where=.")
        if len(s.scans) > 1:
            raise ValueError(
                f"calibrate: kernel {paths[s.leaf]!r} is sliced by nested scans; only one "
                "layer axis is supported. Exclude it with where=.")
    missing = [j for j in selected if j not in seen]
    if missing:
        why = "; ".join(f"{paths[j]!r}" + (f" (reaches {', '.join(sorted(set(w.notes[j])))})"
                                           if j in w.notes else "") for j in missing)
        raise ValueError(
            f"calibrate: no dot_general or conv_general_dilated reads these selected kernels "
            f"as a weight, so they have no input statistics: {why}. Select kernels the "
            "graph sees (where=None uses jp.graph.trace(...).kernels), or exclude these "
            "with where=.")


# --------------------------------------------------------------------------
# calibrate


def _batches(batches: Iterable) -> Iterable:
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("calibrate: batches is empty; pass at least one batch.") from None
    return first, itertools.chain([first], it)


def _zeros(model: Model, plan: _Plan, gram: bool) -> dict:
    out = {}
    for j in plan.leaves():
        s = plan.leaf_site(j)
        lead = tuple(plan.shapes[j][: len(s.scans)])
        d = int(np.prod(s.in_shape))
        out[j] = {"sumsq": jnp.zeros(lead + s.in_shape, jnp.float32),
                  "count": jnp.zeros(lead, jnp.int32)}
        if gram:
            out[j]["gram"] = jnp.zeros(lead + (d, d), jnp.float32)
    return out


def points(plan: _Plan) -> dict:
    """``{leaf: point}``: kernels reading the same set of inputs share a point
    (numbered in the order of their first read)."""
    roots: dict = {}
    for s in plan.sites:
        roots.setdefault(s.leaf, []).append(s.root)
    ids: dict = {}
    out = {}
    for s in plan.sites:
        if s.leaf not in out:
            key = tuple(dict.fromkeys(roots[s.leaf]))
            out[s.leaf] = ids.setdefault(key, len(ids))
    return out


def stacks(plan: _Plan) -> dict:
    """``{scan key: index}`` of the scans that slice kernels (layer stacks)."""
    keys = dict.fromkeys(s.scans[0] for s in plan.sites if s.scans)
    return {k: i for i, k in enumerate(keys)}


def to_stats(model: Model, plan: _Plan, acc: dict) -> dict:
    """The accumulated taps as ``{path: InputStats}``."""
    pts, stk = points(plan), stacks(plan)
    out = {}
    for j in plan.leaves():
        s = plan.leaf_site(j)
        lead = len(s.scans)
        shape = plan.shapes[j]
        in_axes = s.in_axes
        out_axes = tuple(a for a in range(len(shape) - lead) if a not in in_axes)
        a = acc[j]
        out[plan.paths[j]] = InputStats(
            a["sumsq"], a["count"], a.get("gram"), tuple(shape), in_axes, out_axes,
            shape[0] if lead else None, pts[j], stk[s.scans[0]] if lead else None)
    return out


def calibrate(apply_fn: Callable, params: PyTree, batches: Iterable, *, gram: bool = False,
              where: Any = None) -> dict[str, InputStats]:
    """Input statistics of every kernel over calibration batches.

    For every selected kernel ``W`` and every ``dot_general`` or convolution
    that multiplies it with an activation ``X`` (rows = tokens or pixels,
    columns = the kernel's input features): ``sumsq_j = sum_rows X_j^2``,
    ``count = #rows`` and, with ``gram=True``, ``X^T X``; summed over all
    batches and over every use of the kernel. One jitted step per batch
    shape; its state is the statistics only.

    Args:
      apply_fn: ``(params, batch) -> outputs``: a plain function,
        ``lambda v, x: model.apply(v, x)`` (Linen) or
        ``lambda s, x: nnx.merge(graphdef, s)(x)`` (NNX).
      params: the parameter pytree.
      batches: an iterable of batches (each passed as ``apply_fn(params,
        batch)``; any pytree of arrays).
      gram: also accumulate the Gram matrix of each kernel's inputs.
      where: the kernels to calibrate (see :mod:`jaxprune.tree`); ``None``:
        the kernels of :func:`jaxprune.graph.trace`.

    Returns:
      ``{path: InputStats}`` (see the module docstring).

    Raises:
      ValueError: if ``batches`` is empty, or a selected kernel is read by no
        dot or convolution the walk can follow (with what it reaches instead).
      TypeError: if a selected kernel or its input is not floating.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 1))}
      >>> f = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
      >>> s = jp.calibrate(f, p, [jnp.ones((4, 2))], gram=True)
      >>> s["a"].sumsq.tolist(), s["b"].gram.shape, s["a"].point != s["b"].point
      ([4.0, 4.0], (3, 3), True)

    References:
      Sun et al., "A simple and effective pruning approach for large language
      models", ICLR 2024; Frantar & Alistarh, "SparseGPT", ICML 2023.
    """
    first, all_batches = _batches(batches)
    mdl = model(apply_fn, params, first, where)
    plan = mdl.plan(first)
    acc = _zeros(mdl, plan, gram)
    arrays = mdl.arrays_of(params)
    for batch in all_batches:
        step = mdl.plan(batch).step(mdl.selected, gram)
        acc = step(acc, arrays, jax.tree_util.tree_leaves(batch), jnp.int32(0))
    return to_stats(mdl, plan, acc)

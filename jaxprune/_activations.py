"""A small activation hook: the inputs of every kernel, read from the jaxpr.

``apply_fn`` is re-run by an interpreter over its jaxpr. Every
``dot_general`` or ``conv_general_dilated`` whose operand is a variable leaf
(directly, or through a dtype conversion or copy) is a *site*: its other
operand, the activation entering that kernel, is recorded, and a zero
*probe* is added to it so that the gradient of a loss with respect to the
probe is the gradient with respect to that activation. Calls (``jit``,
``custom_jvp``/``custom_vjp``, ``remat``) are inlined; other higher-order
primitives (``scan``, ``while``, ``cond``) run as they are, unhooked.

This is the statistic ``jp.calibrate`` collects per kernel input; the
per-unit reductions (:func:`unit_stats`) can move there as a statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import tree as _tree
from jaxprune.graph._control import CALLS, sub_jaxpr
from jaxprune.graph._model import rebuild

_PASS = {lax.convert_element_type_p, getattr(lax, "copy_p", None)}
_CALLS = {p for p in CALLS if p is not None}


class Site(NamedTuple):
    """A kernel read: the kernel's leaf and, per contracted kernel axis, the
    activation axis it meets."""

    leaf: int
    axes: dict


def _site(eqn, tags: list) -> tuple[int, Site] | None:
    """``(activation operand index, Site)`` if ``eqn`` reads a kernel leaf."""
    if eqn.primitive is lax.dot_general_p:
        (lc, rc), _ = eqn.params["dimension_numbers"]
        for k, a, kc, ac in ((1, 0, rc, lc), (0, 1, lc, rc)):
            if tags[k] is not None and tags[a] is None:
                return a, Site(tags[k], dict(zip(kc, ac)))
    elif eqn.primitive is lax.conv_general_dilated_p and eqn.params["feature_group_count"] == 1 \
            and eqn.params["batch_group_count"] == 1 and tags[1] is not None and tags[0] is None:
        dn = eqn.params["dimension_numbers"]
        return 0, Site(tags[1], {dn.rhs_spec[1]: dn.lhs_spec[1]})
    return None


def _run(jaxpr, consts, args, tags, probes, sites, record):
    env, tag = {}, {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, t in zip(jaxpr.invars, args, tags):
        env[v], tag[v] = x, t
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        tin = [None if isinstance(v, jax.extend.core.Literal) else tag.get(v) for v in eqn.invars]
        found = _site(eqn, tin)
        if found is not None:
            a, site = found
            if probes is not None:
                ins[a] = ins[a] + probes[len(sites)]
            sites.append(site)
            record.append(ins[a])
        if eqn.primitive in _CALLS:
            sub = sub_jaxpr(eqn)
            outs = _run(sub.jaxpr, sub.consts, ins, tin, probes, sites, record)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = params if isinstance(params, tuple) else ((), params)
            outs = eqn.primitive.bind(*subfuns, *ins, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
            if eqn.primitive in _PASS and tin and tin[0] is not None:
                tag[v] = tin[0]
    return [read(v) for v in jaxpr.outvars]


def kernel_inputs(graph, apply_fn: Callable, variables: Any, args: tuple,
                  probes: list | None = None) -> tuple[Any, list, list]:
    """Runs ``apply_fn``; returns ``(outputs, sites, activations)``."""
    static = dict(graph.static)
    arrays = [x for i, x in enumerate(jax.tree_util.tree_leaves(variables)) if i not in static]
    flat_args, args_def = jax.tree_util.tree_flatten(args)

    def f(arrs, fargs):
        v = rebuild(graph.treedef, list(arrs), graph.static, fill=...)
        return apply_fn(v, *jax.tree_util.tree_unflatten(args_def, fargs))

    closed = jax.make_jaxpr(f)(arrays, flat_args)
    out_def = jax.tree_util.tree_structure(jax.eval_shape(f, arrays, flat_args))
    tags = list(range(len(arrays))) + [None] * len(flat_args)
    sites, record = [], []
    outs = _run(closed.jaxpr, closed.consts, arrays + flat_args, tags, probes, sites, record)
    return jax.tree_util.tree_unflatten(out_def, outs), sites, record


def _per_position(x: jax.Array, axis: int, fn) -> jax.Array:
    others = tuple(a for a in range(x.ndim) if a != axis)
    return fn(x, others)


def _to_units(v: jax.Array, units: np.ndarray, size: int, mean: bool) -> jax.Array:
    """Positions (last axis) into units: sums, or means."""
    valid = units >= 0
    s = jax.ops.segment_sum(jnp.moveaxis(v[..., valid], -1, 0), units[valid], size)
    s = jnp.moveaxis(s, 0, -1)
    if mean:
        s = s / jnp.maximum(np.bincount(units[valid], minlength=size), 1)
    return s


def unit_stats(graph, apply_fn: Callable, variables: Any, args: tuple,
               loss_fn: Callable | None) -> dict:
    """Per-unit APoZ, activity and (with ``loss_fn``) Taylor scores of every
    prunable group, from its consumers' inputs (see
    :func:`jaxprune.sensitivity.unit_stats`); one jitted call."""
    arrays, rest = _tree.split_arrays(variables)  # non-array leaves (Equinox) closed over
    return jax.jit(lambda v, a: _unit_stats(graph, apply_fn, _tree.merge_arrays(rest, v), a,
                                            loss_fn))(arrays, args)


def _unit_stats(graph, apply_fn: Callable, variables: Any, args: tuple,
                loss_fn: Callable | None) -> dict:
    sites: list = []

    def activations(probes=None):
        out, found, acts = kernel_inputs(graph, apply_fn, variables, args, probes)
        sites[:] = found
        return out, acts

    if loss_fn is None:
        _, acts = activations()
        grads = [None] * len(acts)
    else:
        shapes = jax.eval_shape(lambda: activations()[1])
        zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]

        def loss(probes):
            out, acts = activations(probes)
            return loss_fn(out), acts

        grads, acts = jax.grad(loss, has_aux=True)(zeros)
    apoz, taylor = [], []
    for g in graph.groups:
        a, t = _group_stats(g, sites, acts, grads)
        apoz.append(a if g.prunable else None)
        taylor.append(t if g.prunable else None)
    out = {"apoz": tuple(apoz), "activity": tuple(None if a is None else 1.0 - a for a in apoz)}
    if loss_fn is not None:
        out["taylor"] = tuple(taylor)
    return out


def _group_stats(g, sites: list, acts: list, grads: list):
    if g.layers:
        return None, None
    zero_fracs, products = [], []
    for m in g.members:
        for site, x, gx in zip(sites, acts, grads):
            if site.leaf != m.leaf or m.axis not in site.axes:
                continue
            ax = site.axes[m.axis]
            z = _per_position(x == 0, ax, lambda v, o: jnp.mean(v.astype(jnp.float32), axis=o))
            zero_fracs.append(_to_units(z, m.units, g.size, mean=True))
            if gx is not None:
                prod = jnp.moveaxis((x * gx).astype(jnp.float32), ax, -1)
                per_ex = jnp.sum(prod.reshape(prod.shape[0], -1, prod.shape[-1]), axis=1) \
                    if ax != 0 else prod.reshape(1, -1, prod.shape[-1]).sum(1)
                products.append(_to_units(per_ex, m.units, g.size, mean=False))
    if not zero_fracs:
        return None, None
    apoz = sum(zero_fracs) / len(zero_fracs)
    taylor = jnp.mean(jnp.abs(sum(products)), axis=0) if products else None
    return apoz, taylor

"""The activation taps behind :func:`jaxprune.sensitivity.unit_stats`.

The graph's reader (:mod:`jaxprune.graph.sites`) finds every
``dot_general`` or ``conv_general_dilated`` that reads a variable leaf as
it is (up to a dtype conversion or copy), outside ``scan``, ``while`` and
``cond`` (calls such as ``jit``, ``remat``, ``custom_jvp``/``custom_vjp``
are followed); :func:`jaxprune.graph.sites.run` re-evaluates the model with
a hook at those sites that records the activation entering the kernel and
adds a zero *probe* to it, so that the gradient of a loss with respect to
the probe is the gradient with respect to that activation. This is the
hook :func:`jaxprune.calibrate` uses for its statistics, with another tap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import tree as _tree
from jaxprune.graph import rebuild
from jaxprune.graph import sites as _sites


class Site(NamedTuple):
    """A kernel read: the kernel's leaf and, per contracted kernel axis, the
    activation axis it meets."""

    leaf: int
    axes: dict


class _Probe:
    """The hook: records each site's activation, plus its probe if given."""

    def __init__(self, order: dict, probes: list | None):
        self.order, self.probes = order, probes

    def key(self, s: _sites.Site) -> int:
        return self.order[s.order]

    def tap(self, s: _sites.Site, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.probes is not None:
            x = x + self.probes[self.key(s)]
        return x, x

    def zeros(self, s: _sites.Site, lead: tuple) -> Any:
        raise AssertionError("activation taps are outside loops")  # pragma: no cover


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
    found = _sites.find(closed, [np.shape(x) for x in arrays], list(range(len(arrays))))
    chosen = sorted((s for s in found.sites + found.batched if s.direct and not s.control),
                    key=lambda s: s.order)
    hook = _Probe({s.order: i for i, s in enumerate(chosen)}, probes)
    outs, taps = _sites.run(found, closed, arrays + flat_args, chosen, hook)
    sites = [Site(s.leaf, dict(s.pairs)) for s in chosen]
    return jax.tree_util.tree_unflatten(out_def, outs), sites, [taps[i] for i in range(len(chosen))]


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

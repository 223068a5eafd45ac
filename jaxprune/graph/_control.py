"""Rules for higher-order primitives: calls, ``cond``, ``while``, ``scan``
and ``shard_map``. Each recurses into its sub-jaxprs with the operands'
descriptors, so a model under ``jit``, ``remat``, ``custom_jvp`` or a
layer ``scan`` is seen whole."""

from __future__ import annotations

from jaxprune.graph._desc import codes
from jaxprune.graph._rules import primitive, rule
from jaxprune.graph._walk import V, Walker, has_copies
from jaxprune.graph.sites import CALLS, sub_jaxpr

try:  # not exported by jax.extend
    from jax._src.shard_map import shard_map_p
except ImportError:  # pragma: no cover - older/newer layouts
    shard_map_p = None

@rule(*CALLS)
def call(w: Walker, eqn, args):
    """A primitive that runs a sub-jaxpr on its operands (``jit``, ``remat``,
    ``custom_jvp``, ...); the rule ``jaxprune.graph.rules.call``."""
    return w.walk_closed(sub_jaxpr(eqn), list(args))


def merge(w: Walker, a: V, b: V) -> V:
    """Two values that are the same value (branches, loop carries)."""
    if not a.rank:
        return a
    axes = w.unify_vars(a, b, [(i, i) for i in range(a.rank)])
    out = V(tuple(axes), a.layer, a.meta)
    return w.strip(out) if has_copies(out) and a.layer is None else out


@rule(primitive("cond_p"))
def _cond(w: Walker, eqn, args):
    ops = list(args[1:])
    outs = None
    for branch in eqn.params["branches"]:
        got = w.walk_closed(branch, ops)
        outs = got if outs is None else [merge(w, a, b) for a, b in zip(outs, got)]
    return outs


@rule(primitive("while_p"))
def _while(w: Walker, eqn, args):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = args[:cn], args[cn:cn + bn], args[cn + bn:]
    out = w.walk_closed(p["body_jaxpr"], list(bconsts) + list(init))
    carry = [merge(w, i, o) for i, o in zip(init, out)]
    w.walk_closed(p["cond_jaxpr"], list(cconsts) + carry)
    return carry


@rule(primitive("scan_p"))
def _scan(w: Walker, eqn, args):
    p = eqn.params
    nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = args[:nc], args[nc:nc + nk], args[nc + nk:]
    body_xs = [_unstack(w, x) for x in xs]
    scale, w.scale = w.scale, w.scale * length
    try:
        out = w.walk_closed(p["jaxpr"], list(consts) + list(carry) + body_xs)
    finally:
        w.scale = scale
    merged = [merge(w, i, o) for i, o in zip(carry, out[:nk])]
    return merged + [_stack(w, y, length) for y in out[nk:]]


def _unstack(w: Walker, x: V) -> V:
    """The per-iteration slice of a scanned operand: a stack's layer copies
    become the iteration's copies."""
    if x.layer == 0:
        return V(x.axes[1:], None, x.meta)
    if x.layer is not None:
        x = w.strip(x)
    w.pin_desc([x.axes[0]], "the scanned axis of a scan")
    return V(x.axes[1:], None, x.meta)


def _stack(w: Walker, y: V, length: int) -> V:
    code = w.reason("the layer axis of a stack")
    layer = 0 if has_copies(y) else None
    return V(((codes(length, code),),) + y.axes, layer, y.meta)


@rule(shard_map_p)
def _shard_map(w: Walker, eqn, args):
    """Inside ``shard_map`` every sharded axis is local: its channels are
    pinned (the body sees a shard, not the axis)."""
    sub = eqn.params["jaxpr"]
    ins = [_reshard(w, a, v.aval.shape) for a, v in zip(args, sub.invars)]
    consts = [] if not hasattr(sub, "constvars") else [w.constant(v.aval.shape)
                                                        for v in sub.constvars]
    outs = w.walk(getattr(sub, "jaxpr", sub), consts, ins)
    return [_reshard(w, o, v.aval.shape) for o, v in zip(outs, eqn.outvars)]


def _reshard(w: Walker, x: V, shape) -> V:
    if x.shape() == tuple(shape):
        return x
    x = w.strip(x)
    code = w.reason("an axis sharded inside shard_map")
    axes = []
    for ax, old, new in zip(x.axes, x.shape(), shape):
        if old == new:
            axes.append(ax)
        else:
            w.pin_desc([ax], "an axis sharded inside shard_map")
            axes.append((codes(int(new), code),))
    return V(tuple(axes), None, x.meta)


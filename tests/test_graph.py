"""jp.graph: leaf roles and channel groups on hand-written models with known
answers; compaction gives the masked model's outputs; clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jaxprune as jp

KEY = jax.random.key(0)


def normal(i, shape):
    """Random normal test data from numpy (no XLA compile per shape)."""
    return jnp.asarray(np.random.default_rng(i).standard_normal(shape), jnp.float32)


def groups_by_name(g):
    return {grp.name: grp for grp in g.groups}


def member_axes(grp):
    return sorted((m.path, m.axis) for m in grp.members)


def compacts_exactly(f, v, x, sparsity=0.5, **kw):
    g = jp.graph.trace(f, v, x)
    masks = jp.structured.masks(g, jp.structured.scores(g, v), sparsity, **kw)
    small = jp.structured.compact(g, v, masks)
    want = f(jp.apply_masks(v, masks), x)
    got = jax.jit(f)(small, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    before = sum(np.size(a) for a in jax.tree.leaves(v))
    after = sum(np.size(a) for a in jax.tree.leaves(small))
    return g, masks, small, before, after


# --------------------------------------------------------------------------
# Models (plain JAX: sizes come from array shapes)


def mlp_params(widths=(6, 8, 5, 3)):
    return {f"l{i}": {"w": normal(i, (a, b)), "b": normal(100 + i, (b,))}
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}


def mlp(p, x):
    n = len(p)
    for i in range(n):
        x = x @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"]
        x = jax.nn.gelu(x) if i < n - 1 else x
    return x


def conv(x, k, stride=1, groups=1):
    return lax.conv_general_dilated(x, k, (stride, stride), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)


def bn(x, p):
    return (x - p["mean"]) * lax.rsqrt(p["var"] + 1e-5) * p["scale"] + p["bias"]


def bn_params(i, c):
    return {"scale": 1 + 0.1 * normal(i, (c,)), "bias": 0.1 * normal(i + 1, (c,)),
            "mean": 0.1 * normal(i + 2, (c,)), "var": 1 + jnp.abs(normal(i + 3, (c,)))}


def cnn_params(c=8, d=12):
    return {"stem": normal(1, (3, 3, 3, c)), "bn0": bn_params(10, c),
            "c1": normal(2, (3, 3, c, d)), "bn1": bn_params(20, d),
            "c2": normal(3, (3, 3, d, c)), "bn2": bn_params(30, c),
            "head": {"w": normal(4, (c, 4)), "b": normal(5, (4,))}}


def cnn(p, x):
    h = jax.nn.relu(bn(conv(x, p["stem"]), p["bn0"]))
    y = jax.nn.relu(bn(conv(h, p["c1"]), p["bn1"]))
    y = bn(conv(y, p["c2"]), p["bn2"])
    h = jax.nn.relu(h + y)  # residual
    return jnp.mean(h, axis=(1, 2)) @ p["head"]["w"] + p["head"]["b"]


# --------------------------------------------------------------------------
# Groups with known answers


def test_mlp_groups_and_roles():
    p = mlp_params()
    g = jp.graph.trace(mlp, p, jnp.ones((2, 6)))
    assert [grp.size for grp in g.prunable] == [8, 5]
    assert member_axes(g.prunable[0]) == [("l0/b", 0), ("l0/w", 1), ("l1/w", 0)]
    assert member_axes(g.prunable[1]) == [("l1/b", 0), ("l1/w", 1), ("l2/w", 0)]
    out = [grp for grp in g.groups if not grp.prunable]
    assert out and "model output" in out[0].reasons[0]
    assert g.leaf("l0/w").role == "kernel" and g.leaf("l0/w").in_axes == (0,)
    assert g.leaf("l0/b").role == "bias"
    assert g.macs == 2 * (6 * 8 + 8 * 5 + 5 * 3)
    assert jax.tree.leaves(g.kernels) == [False, True, False, True, False, True]


def test_cnn_with_batchnorm_and_residual():
    p = cnn_params()
    g = jp.graph.trace(cnn, p, jnp.ones((2, 6, 6, 3)))
    by = {grp.name: grp for grp in g.prunable}
    res, mid = by["c2:3"], by["c1:3"]
    assert res.size == 8 and mid.size == 12
    assert ("stem", 3) in member_axes(res) and ("c2", 3) in member_axes(res)
    assert ("head/w", 0) in member_axes(res) and ("bn0/mean", 0) in member_axes(res)
    assert member_axes(mid) == [("bn1/bias", 0), ("bn1/mean", 0), ("bn1/scale", 0),
                                ("bn1/var", 0), ("c1", 3), ("c2", 2)]
    roles = {i.path: (i.role, i.kind) for i in g.leaves}
    assert roles["bn1/scale"] == ("norm", "scale") and roles["bn1/bias"] == ("norm", "shift")
    assert roles["bn1/mean"][0] == "stat" and roles["bn1/var"][0] == "stat"
    assert g.leaf("c1").in_axes == (2,) and g.leaf("c1").out_axes == (3,)
    print(g)  # the table renders


def test_depthwise_conv_couples_channel_with_its_outputs():
    p = {"a": normal(0, (1, 1, 2, 4)), "dw": normal(1, (3, 3, 1, 8)), "b": normal(2, (1, 1, 8, 3))}

    def f(p, x):
        h = jax.nn.relu(conv(x, p["a"]))
        h = jax.nn.relu(conv(h, p["dw"], groups=4))  # multiplier 2
        return conv(h, p["b"])

    g = jp.graph.trace(f, p, jnp.ones((1, 5, 5, 2)))
    (grp,) = g.prunable
    units = {m.path: m.units for m in grp.members}
    np.testing.assert_array_equal(units["a"], [0, 1, 2, 3])
    np.testing.assert_array_equal(units["dw"], [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(units["b"], [0, 0, 1, 1, 2, 2, 3, 3])


def test_grouped_conv_prunes_the_same_index_in_every_group():
    p = {"a": normal(0, (1, 1, 2, 8)), "gc": normal(1, (1, 1, 4, 6)), "b": normal(2, (1, 1, 6, 2))}

    def f(p, x):
        h = jax.nn.relu(conv(x, p["a"]))
        return conv(jax.nn.relu(conv(h, p["gc"], groups=2)), p["b"])

    g = jp.graph.trace(f, p, jnp.ones((1, 3, 3, 2)))
    by = {grp.name: grp for grp in g.prunable}
    a = {m.path: m.units for m in by["a:3"].members}
    np.testing.assert_array_equal(a["a"], [0, 1, 2, 3, 0, 1, 2, 3])  # in-group index
    np.testing.assert_array_equal(a["gc"], [0, 1, 2, 3])
    out = {m.path: m.units for m in by["gc:3"].members}
    np.testing.assert_array_equal(out["gc"], [0, 1, 2, 0, 1, 2])


def test_concat_keeps_branches_apart_and_flatten_into_dense():
    p = {"a": normal(0, (1, 1, 3, 4)), "b": normal(1, (1, 1, 3, 5)), "fc": normal(2, (2 * 2 * 9, 3))}

    def f(p, x):
        y = jnp.concatenate([jax.nn.relu(conv(x, p["a"])), jax.nn.relu(conv(x, p["b"]))], -1)
        return y.reshape(y.shape[0], -1) @ p["fc"]

    g = jp.graph.trace(f, p, jnp.ones((1, 2, 2, 3)))
    by = {grp.name: grp for grp in g.prunable}
    fa = {m.path: m.units for m in by["a:3"].members}["fc"]
    fb = {m.path: m.units for m in by["b:3"].members}["fc"]
    rows = np.arange(36).reshape(2, 2, 9)  # (h, w, channel) flattened
    np.testing.assert_array_equal(fa[rows[..., :4].ravel()], np.tile(np.arange(4), 4))
    np.testing.assert_array_equal(fb[rows[..., 4:].ravel()], np.tile(np.arange(5), 4))
    assert (fa[rows[..., 4:].ravel()] == -1).all()


def test_scanned_stack_has_per_layer_units_and_a_shared_residual():
    L, d, F = 3, 4, 6
    p = {"inp": normal(0, (5, d)), "w1": normal(1, (L, d, F)), "b1": normal(2, (L, F)),
         "w2": normal(3, (L, F, d)), "out": normal(4, (d, 2))}

    def f(p, x):
        def body(h, lp):
            return h + jnp.tanh(h @ lp[0] + lp[1]) @ lp[2], None
        h, _ = lax.scan(body, x @ p["inp"], (p["w1"], p["b1"], p["w2"]))
        return h @ p["out"]

    g = jp.graph.trace(f, p, jnp.ones((2, 5)))
    by = {grp.name: grp for grp in g.prunable}
    hid, res = by["w1:2"], by["inp:1"]
    assert (hid.size, hid.layers) == (F, L) and res.layers is None and res.size == d
    assert g.leaf("w1").layers == L and g.leaf("inp").layers is None
    w1 = {m.path: m.units for m in hid.members}["w1"]
    assert w1.shape == (L, F) and (w1 == np.arange(F)).all()
    assert g.macs == 2 * (5 * d + L * (d * F + F * d) + d * 2)  # batch 2, scan x L
    _, masks, small, before, after = compacts_exactly(f, p, normal(9, (2, 5)))
    assert small["w1"].shape == (L, d // 2, F // 2) and after < before


def test_linen_scan_stack_is_per_layer():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(4)(nn.relu(nn.Dense(8)(x)))

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            s = nn.scan(lambda m, c, _: (m(c), None), variable_axes={"params": 0},
                        split_rngs={"params": True}, length=3)
            return nn.Dense(2)(s(MLP(), nn.Dense(4)(x), None)[0])

    m = Stack()
    x = jnp.ones((2, 4))
    v = m.init(KEY, x)
    g = jp.graph.trace(lambda v, x: m.apply(v, x), v, x)
    hidden = [grp for grp in g.prunable if grp.layers == 3]
    assert len(hidden) == 1 and hidden[0].size == 8


def test_jit_remat_cond_and_while_are_seen_through():
    p = {"a": normal(0, (4, 8)), "b": normal(1, (8, 8)), "c": normal(2, (8, 3))}

    @jax.jit
    def inner(p, h):
        return jax.checkpoint(lambda h: jnp.tanh(h @ p["b"]))(h)

    def f(p, x):
        h = jax.nn.relu(x @ p["a"])
        h = lax.cond(x.sum() > 0, lambda h: inner(p, h), lambda h: 2.0 * h, h)
        h = lax.fori_loop(0, 2, lambda i, h: h * 0.5, h)
        return h @ p["c"]

    g = jp.graph.trace(f, p, jnp.ones((2, 4)))
    (grp,) = g.prunable
    assert member_axes(grp) == [("a", 1), ("b", 0), ("b", 1), ("c", 0)]
    compacts_exactly(f, p, normal(5, (2, 4)))


def test_layernorm_residual_is_fixed_with_a_reason():
    p = {"w": normal(0, (4, 6)), "s": jnp.ones(6), "o": normal(1, (6, 2))}

    def f(p, x):
        h = x @ p["w"]
        h = (h - h.mean(-1, keepdims=True)) * lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)
        return (h * p["s"]) @ p["o"]

    g = jp.graph.trace(f, p, jnp.ones((2, 4)))
    assert not g.prunable
    (grp,) = [grp for grp in g.groups if ("s", 0) in member_axes(grp)]
    assert any("reduction" in r for r in grp.reasons)
    assert g.leaf("s").role == "norm"


def test_roles_on_library_models():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(11, 8, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                                               rngs=rngs)
            self.ln = nnx.LayerNorm(8, rngs=rngs)
            self.out = nnx.Linear(8, 11, rngs=rngs)

        def __call__(self, t):
            x = self.emb(t)
            return self.out(self.ln(x + self.attn(x)))

    gd, state = nnx.split(Tiny(nnx.Rngs(0)))
    g = jp.graph.trace(lambda s, t: nnx.merge(gd, s)(t), state, jnp.ones((1, 5), jnp.int32))
    roles = {i.path: i.role for i in g.leaves}
    assert roles["emb/embedding"] == "embedding"
    assert roles["attn/query/kernel"] == "kernel" and roles["attn/query/bias"] == "bias"
    assert roles["ln/scale"] == "norm" and roles["out/kernel"] == "kernel"
    heads = [grp for grp in g.prunable if ("attn/query/kernel", 1) in member_axes(grp)]
    assert heads and heads[0].size == 2
    assert ("attn/out/kernel", 0) in member_axes(heads[0])
    kernels = jax.tree.leaves(g.kernels)
    assert sum(kernels) == 5  # q, k, v, out projection, output layer


def test_trace_is_fast_enough_for_a_resnet():
    p = cnn_params(16, 32)
    g = jp.graph.trace(cnn, p, jnp.ones((1, 8, 8, 3)))
    assert g.trace_seconds < 5.0


# --------------------------------------------------------------------------
# Compaction equals masking (hypothesis over widths)


@settings(max_examples=4, deadline=None)
@given(st.integers(2, 9), st.integers(2, 9), st.sampled_from([0.25, 0.5, 0.75]))
def test_mlp_compaction_matches_masks(h1, h2, s):
    p = mlp_params((5, h1, h2, 3))
    _, _, small, before, after = compacts_exactly(mlp, p, normal(7, (4, 5)), s)
    assert small["l0"]["w"].shape[1] == max(1, round(h1 * (1 - s)))
    assert after <= before


@settings(max_examples=4, deadline=None)
@given(st.integers(2, 8), st.integers(2, 8), st.sampled_from(["uniform", "global"]))
def test_cnn_compaction_matches_masks(c, d, allocation):
    p = cnn_params(c, d)
    x = normal(8, (2, 5, 5, 3))
    compacts_exactly(cnn, p, x, 0.5, allocation=allocation)


def test_round_to_keeps_multiples():
    p = mlp_params((5, 16, 12, 3))
    g = jp.graph.trace(mlp, p, jnp.ones((1, 5)))
    masks = jp.structured.masks(g, jp.structured.scores(g, p), 0.4, round_to=4)
    kept = jp.structured.kept_units(g, masks)
    assert sorted(int(k.sum()) for k in kept.values()) == [8, 12]  # 9.6 -> 10 -> 12 (ties up)


def test_scores_by_name():
    p = cnn_params()
    x = jnp.ones((1, 4, 4, 3))
    g = jp.graph.trace(cnn, p, x)
    grads = jax.grad(lambda p: cnn(p, x).sum())(p)
    for score, kw in [("l1", {}), ("l2", {}), ("bn_scale", {}), ("taylor", {"grads": grads}),
                      ("random", {"key": KEY})]:
        sc = jp.structured.scores(g, p, score, **kw)
        assert [None if s is None else s.shape for s in sc] == [
            None if not grp.prunable else (grp.size,) for grp in g.groups]
    bn_sc = jp.structured.scores(g, p, "bn_scale")
    mid = [grp for grp in g.groups if grp.name == "c1:3"][0]
    np.testing.assert_allclose(bn_sc[mid.index], jnp.abs(p["bn1"]["scale"]), rtol=1e-6)


# --------------------------------------------------------------------------
# Errors


def test_unknown_primitive_pins_channels_and_names_it():
    from jax.extend.core import Primitive

    twice = Primitive("my_twice")
    twice.def_impl(lambda x: 2 * x)
    twice.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
    p = mlp_params((4, 6, 2))

    def f(p, x):
        return twice.bind(x @ p["l0"]["w"] + p["l0"]["b"]) @ p["l1"]["w"]

    g = jp.graph.trace(f, p, jnp.ones((1, 4)))
    assert not g.prunable
    assert any("my_twice" in r for grp in g.groups for r in grp.reasons)
    jp.graph.register(twice, jp.graph.rules.elementwise)
    try:
        assert len(jp.graph.trace(f, p, jnp.ones((1, 4))).prunable) == 1
    finally:
        from jaxprune.graph._rules import RULES

        RULES.pop(twice)


def test_apply_fn_that_never_reads_the_variables():
    p = mlp_params()
    with pytest.raises(ValueError, match="never reads the variables"):
        jp.graph.trace(lambda v, x: mlp(p, x), jax.tree.map(jnp.zeros_like, p), jnp.ones((1, 6)))


def test_mismatched_masks_round_to_and_fixed_groups():
    p = mlp_params()
    g = jp.graph.trace(mlp, p, jnp.ones((1, 6)))
    sc = jp.structured.scores(g, p)
    with pytest.raises(ValueError, match="round_to=9 is larger than group"):
        jp.structured.masks(g, sc, 0.5, round_to=9)
    masks = jp.structured.masks(g, sc, 0.5)
    bad = jax.tree.map(lambda m: m, masks)
    bad["l0"]["b"] = jnp.ones(8, bool)  # bias kept, kernel column removed
    with pytest.raises(ValueError, match="do not prune group 'l0/w:1' as a whole"):
        jp.structured.compact(g, p, bad)
    out = jax.tree.map(lambda m: m, masks)
    out["l2"]["b"] = jnp.array([True, False, True])
    out["l2"]["w"] = jnp.broadcast_to(out["l2"]["b"], (5, 3)) & out["l2"]["w"]
    with pytest.raises(ValueError, match="cannot be pruned: it reaches the model output"):
        jp.structured.compact(g, p, out)
    with pytest.raises(ValueError, match="group 'l2/w:1' cannot be pruned"):
        jp.structured.masks(g, sc, 0.5, groups=["l2/w:1"])
    with pytest.raises(ValueError, match="mask for leaf 'l0/w' has shape"):
        jp.structured.compact(g, p, {**masks, "l0": {"w": jnp.ones((2, 2), bool),
                                                      "b": masks["l0"]["b"]}})


def test_structured_prune_trains_inside_optax_and_compacts():
    import optax

    p = cnn_params()
    x = normal(3, (4, 6, 6, 3))
    g = jp.graph.trace(cnn, p, x)
    tx = jp.structured.prune(optax.adam(1e-2), graph=g, update_every=2,
                             sparsity=optax.polynomial_schedule(0.0, 0.5, 1, 4))
    state = tx.init(p)

    @jax.jit
    def step(p, s):
        grads = jax.grad(lambda p: jnp.sum(cnn(p, x) ** 2))(p)
        u, s = tx.update(grads, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(7):
        p, state = step(p, state)
    masks = jp.get_masks(state)
    assert float(jnp.sum(p["c1"][..., ~masks["bn1"]["scale"]] ** 2)) == 0.0
    small = jp.structured.compact(g, p, masks)
    assert small["c1"].shape[-1] == 6 and small["stem"].shape[-1] == 4
    np.testing.assert_allclose(cnn(small, x), cnn(p, x), rtol=1e-5, atol=1e-5)


def test_structured_prune_with_some_groups_keeps_the_others_whole():
    import optax

    ks = jax.random.split(jax.random.key(0), 4)
    p = {f"l{i}": {"w": jax.random.normal(ks[i], (8, 8)), "b": jnp.zeros(8)} for i in range(4)}

    def f(p, x):
        for i in range(4):
            x = jax.nn.relu(x @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"])
        return x

    g = jp.graph.trace(f, p, jnp.ones((2, 8)))
    tx = jp.structured.prune(optax.sgd(0.1), graph=g, sparsity=0.5, groups=[0], update_every=1)
    state = tx.init(p)
    u, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, p), state, p)
    masks = jp.get_masks(state)
    assert int(jnp.sum(~masks["l0"]["w"])) == 32 and int(jnp.sum(~masks["l1"]["w"])) == 32
    assert bool(jnp.all(masks["l2"]["w"])) and bool(jnp.all(masks["l3"]["w"]))
    new = optax.apply_updates(p, u)
    assert float(jnp.sum(new["l0"]["w"][:, ~masks["l0"]["b"]] ** 2)) == 0.0


def test_pooling_passes_channels_through():
    p = {"c1": normal(0, (3, 3, 3, 8)), "c2": normal(1, (3, 3, 8, 4))}

    def f(p, x):
        h = jax.nn.relu(conv(x, p["c1"]))
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
        h = lax.reduce_window(h, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
        return conv(h, p["c2"])

    g = jp.graph.trace(f, p, jnp.ones((1, 8, 8, 3)))
    assert [(grp.name, grp.size) for grp in g.prunable] == [("c1:3", 8)]
    (out,) = [grp for grp in g.groups if not grp.prunable]  # a bias-less output layer
    assert out.name == "c2:3" and "model output" in out.reasons[0]
    compacts_exactly(f, p, normal(2, (1, 8, 8, 3)))

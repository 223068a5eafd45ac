"""Stacked layers (nnx.scan / MaxText style, leaves shaped (L, ...)) get
per-layer budgets: the same model written stacked and unstacked gives the
same masks (uniform, ERK, regex, lottery rounds) and the same counts
(global), in the pure functions and the transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import assert_trees_equal
from jax import lax

import jaxprune as jp

L, D, H = 3, 8, 12


def stacked_params(seed=0, axis=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    # layers at very different scales: one budget for the whole stack would
    # prune the small layers much more than the large ones
    scale = jnp.array([0.1, 1.0, 10.0])[:, None, None]
    w1 = jax.random.normal(ks[0], (L, D, H)) * scale
    w2 = jax.random.normal(ks[1], (L, H, D)) * scale
    p = {"head": {"kernel": jax.random.normal(ks[2], (D, 4))},
         "layers": {"b": jnp.zeros((L, H)), "w1": w1, "w2": w2}}
    if axis:
        p["layers"]["w1"] = jnp.moveaxis(w1, 0, axis)
        p["layers"]["w2"] = jnp.moveaxis(w2, 0, axis)
    return p


def unstack(tree, axis=0):
    """The same model with one leaf per layer: layers/0/w1, layers/1/w1, ..."""
    lay = tree["layers"]
    per = [{k: (jnp.take(v, i, axis=axis if k != "b" else 0) if jnp.ndim(v) else v)
            for k, v in lay.items()} for i in range(L)]
    return {"head": tree["head"], "layers": per}


def restack(tree, axis=0):
    lay = tree["layers"]
    return {"head": tree["head"], "layers": {
        k: jnp.stack([lay[i][k] for i in range(L)], axis=axis if k != "b" else 0)
        if jnp.ndim(lay[0][k]) else lay[0][k] for k in lay[0]}}


def masks(scores, sparsity, allocation="uniform", **kw):
    """jp.allocation.masks under jit (one compilation instead of op-by-op)."""
    return jax.jit(lambda s: jp.allocation.masks(s, sparsity, allocation=allocation, **kw))(scores)


def layer_counts(mask, axis=0):
    m = jnp.moveaxis(jnp.asarray(mask), axis, 0)
    return np.asarray(m.reshape(m.shape[0], -1).sum(1)).tolist()


# --------------------------------------------------------------------------
# Pure functions


@pytest.mark.parametrize("allocation", ["uniform", {"w2": 0.5}])  # ERK: layer_axis=1 test
def test_masks_per_layer_equal_unstacked(allocation):
    p = stacked_params()
    s = jp.scores.magnitude(p)
    got = masks(s, 0.8, allocation, layers="layers/")
    want = masks(unstack(s), 0.8, allocation)
    assert_trees_equal(unstack(got), want)
    if allocation == "uniform":  # without layers= one budget: the small layers lose more
        assert layer_counts(got["layers"]["w1"]) == [round(D * H * 0.2)] * L
        one = masks(s, 0.8, "uniform")
        assert len(set(layer_counts(one["layers"]["w1"]))) > 1


def test_global_is_one_threshold_over_the_stack():
    p = stacked_params()
    s = jp.scores.magnitude(p)
    got = masks(s, 0.8, "global", layers="layers/")
    want = masks(unstack(s), 0.8, "global")
    assert jp.summary(got).total == jp.summary(want).total
    assert_trees_equal(unstack(got), want)  # continuous scores: no ties, the same weights


def test_erk_treats_each_layer_as_a_layer_and_layer_axis_1():
    p = stacked_params(axis=1)  # MaxText's param_scan_axis=1: (D, L, H)
    assert p["layers"]["w1"].shape == (D, L, H)
    sp = jp.allocation.sparsities(p, 0.8, allocation="erk", layers="layers/", layer_axis=1)
    flat = jp.allocation.sparsities(unstack(p, 1), 0.8, allocation="erk")
    assert float(sp["layers"]["w1"]) == pytest.approx(float(flat["layers"][0]["w1"]), abs=1e-6)
    got = masks(jp.scores.magnitude(p), 0.8, "erk", layers="layers/", layer_axis=1)
    want = masks(jp.scores.magnitude(unstack(p, 1)), 0.8, "erk")
    assert_trees_equal(unstack(got, 1), want)


def test_topk_keep_per_layer_and_random_masks():
    p = stacked_params()
    m = jax.jit(lambda s: jp.masks.topk(s, keep={"head": 5, "layers": 10}, layers="layers/"))(p)
    assert layer_counts(m["layers"]["w2"]) == [10] * L and int(m["head"]["kernel"].sum()) == 5
    r = jax.jit(lambda p: jp.allocation.random_masks(jax.random.key(1), p, 0.75,
                                                 allocation="uniform",
                                                     layers="layers/"))(p)
    assert layer_counts(r["layers"]["w1"]) == [round(D * H / 4)] * L


# --------------------------------------------------------------------------
# Transforms


def fake_grads(p):
    """Gradients that are elementwise functions of the parameters, so stacked
    and unstacked runs see the same values at the same weights."""
    return jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.1, p)


def run(tx, p, steps):
    state = jax.jit(tx.init)(p)  # one compile, not one per eager op

    @jax.jit
    def step(p, state):
        u, state = tx.update(fake_grads(p), state, p)
        return optax.apply_updates(p, u), state

    history = []
    for _ in range(steps):
        p, state = step(p, state)
        history.append(jp.get_masks(state))
    return p, history


def test_prune_stacked_equals_unstacked():
    sched = optax.linear_schedule(0.0, 0.8, 4)
    p = stacked_params()
    make = lambda **kw: jp.prune(optax.adam(1e-2), sparsity=sched, update_every=2, **kw)  # noqa: E731
    ps, hs = run(make(layers="layers/"), p, 6)
    pu, hu = run(make(), unstack(p), 6)
    for a, b in zip(hs, hu):
        assert_trees_equal(unstack(a), b)
    assert_trees_equal(unstack(ps), pu)
    assert layer_counts(hs[-1]["layers"]["w1"]) == [round(D * H * 0.2)] * L


def apply_fn(p, x):
    """The stacked model: a scan over the layers."""
    def body(x, lp):
        w1, b, w2 = lp
        return x + jnp.tanh(x @ w1 + b) @ w2, None
    x, _ = lax.scan(body, x, (p["layers"]["w1"], p["layers"]["b"], p["layers"]["w2"]))
    return x @ p["head"]["kernel"]


def test_prune_with_the_graph_as_layers():
    p = stacked_params()
    g = jp.graph.trace(apply_fn, p, jnp.ones((2, D)))
    assert jp.tree.selected(p, g.stacked) == ["layers/b", "layers/w1", "layers/w2"]
    a = masks(p, 0.7, where=g.kernels, layers=g)
    b = masks(p, 0.7, where=g.kernels, layers="layers/")
    assert_trees_equal(a, b)
    rows = [r["path"] for r in jp.summary(a, where=g.kernels, layers=g).rows]
    assert rows == ["head/kernel"] + [f"layers/{k}[{i}]" for k in ("w1", "w2") for i in range(L)]


def test_linen_scan_stack_with_the_graph():
    import models

    apply_fn, variables, x = models.linen_scan_stack(layers=4)
    g = jp.graph.trace(apply_fn, variables, x)
    params = variables["params"]
    tx = jp.prune(optax.sgd(0.1), sparsity=0.75, update_every=1, layers=g)
    _, (masks,) = run(tx, params, 1)
    assert layer_counts(masks["layers"]["Dense_0"]["kernel"]) == [16] * 4
    assert int(masks["head"]["kernel"].sum()) == 6  # (8, 3) at 75%: 6 kept
    rows = jp.summary(masks, layers=g).rows
    assert [r["kept"] for r in rows if r["path"].startswith("layers/")] == [16] * 4


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_lottery_ticket_stacked(allocation):
    p = stacked_params()
    make = lambda **kw: jp.lottery_ticket(optax.sgd(1e-2), rounds=2, steps_per_round=2,  # noqa: E731
                                          prune_rate=0.5, allocation=allocation, **kw)
    _, hs = run(make(layers="layers/"), p, 4)
    _, hu = run(make(), unstack(p), 4)
    for a, b in zip(hs, hu):
        assert jp.summary(a).total == jp.summary(b).total
        if allocation == "uniform":
            assert_trees_equal(unstack(a), b)
    if allocation == "uniform":
        assert layer_counts(hs[-1]["layers"]["w2"]) == [round(D * H / 4)] * L


@pytest.mark.parametrize("method,allocation", [(jp.rigl, "erk"), (jp.set_training, "uniform")])
def test_dynamic_keeps_per_layer_counts(method, allocation):
    p = stacked_params()
    tx = method(optax.adam(1e-2), sparsity=0.75, update_every=2, drop_fraction=0.5,
                allocation=allocation, layers="layers/")
    _, hs = run(tx, p, 5)
    want = masks(unstack(p), 0.75, allocation)
    for k in ("w1", "w2"):
        per = [int(want["layers"][i][k].sum()) for i in range(L)]
        for m in hs:
            assert layer_counts(m["layers"][k]) == per
    assert int(hs[-1]["head"]["kernel"].sum()) == int(want["head"]["kernel"].sum())
    assert not np.array_equal(hs[0]["layers"]["w1"], hs[-1]["layers"]["w1"])  # it exchanged


def test_drop_and_grow_per_layer():
    p = stacked_params()
    m = jax.jit(lambda s: jp.masks.topk(s, keep=20, where="w1", layers="w1"))(p)
    new, grown = jax.jit(lambda p, m: jp.dynamic.drop_and_grow(p, m, fake_grads(p), 0.5,
                                                               layers="w1"))(p, m)
    assert layer_counts(new["layers"]["w1"]) == [20] * L
    assert layer_counts(grown["layers"]["w1"]) == [10] * L


def test_ste_training_stacked_equals_unstacked():
    p = stacked_params()
    _, hs = run(jp.ste_training(optax.sgd(1e-2), sparsity=0.6, layers="layers/"), p, 2)
    _, hu = run(jp.ste_training(optax.sgd(1e-2), sparsity=0.6), unstack(p), 2)
    assert_trees_equal(unstack(hs[-1]), hu[-1])


def test_random_like_keeps_per_layer_counts():
    m = {"w": jnp.arange(3 * 4 * 5).reshape(3, 4, 5) % 7 < jnp.array([1, 3, 6])[:, None, None]}
    r = jax.jit(lambda m: jp.masks.random_like(jax.random.key(0), m, layers="w"))(m)
    assert layer_counts(r["w"]) == layer_counts(m["w"])
    assert not np.array_equal(r["w"], m["w"])


def test_snip_uniform_per_layer():
    p = stacked_params()
    x = jax.random.normal(jax.random.key(3), (16, D))
    loss = lambda p, x: jnp.mean(apply_fn(p, x) ** 2)  # noqa: E731
    m = jax.jit(lambda p: jp.snip(loss, p, x, 0.5, allocation="uniform", layers="layers/"))(p)
    assert layer_counts(m["layers"]["w1"]) == [D * H // 2] * L


# --------------------------------------------------------------------------
# Summary and errors


def test_summary_per_layer_rows_layer_axis():
    p = stacked_params(axis=1)
    m = masks(p, 0.5, layers="layers/", layer_axis=1)
    rows = {r["path"]: r for r in jp.summary(m, layers="layers/", layer_axis=1).rows}
    assert rows["layers/w1[2]"]["shape"] == (D, H)
    assert [rows[f"layers/w1[{i}]"]["sparsity"] for i in range(L)] == [0.5] * L


def test_bad_layer_axis_errors():
    p = stacked_params()
    with pytest.raises(ValueError, match=r"layer_axis=3 is out of range for the stacked leaf "
                                         r"'layers/w1' of shape \(3, 8, 12\).*param_scan_axis"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, layers="layers/", layer_axis=3).init(p)
    with pytest.raises(TypeError, match="layer_axis must be an int"):
        jp.allocation.masks(p, 0.5, layers="layers/", layer_axis="0")
    with pytest.raises(ValueError, match="marks none of the leaves being pruned"):
        jp.rigl(optax.sgd(0.1), sparsity=0.5, layers="head/bias|layers/b").init(
            {**p, "head": {**p["head"], "bias": jnp.zeros(4)}})
    with pytest.raises(ValueError, match=r"leaf 'v' of shape \(5,\) as a stack"):
        jp.masks.topk({"v": jnp.ones(5)}, 0.5, where="v", layers="v")
    g = jp.graph.trace(apply_fn, p, jnp.ones((1, D)))
    with pytest.raises(ValueError, match=r"inside a scan of 3 layers, but its axis 1 "
                                         r"\(layer_axis=1\) has length 8"):
        jp.lottery_ticket(optax.sgd(0.1), rounds=1, steps_per_round=2, layers=g,
                          layer_axis=1).init(p)
    with pytest.raises(ValueError, match=r"layers=graph \(its leaves read inside a scan\) "
                                         "marks none"):
        jp.set_training(optax.sgd(0.1), sparsity=0.5, layers=g).init(unstack(p))


def test_nnx_scan_stack_with_the_graph():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return x + jax.nn.relu(self.lin(x))

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=L)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)
            self.head = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            return self.head(body(x, self.blocks))

    graphdef, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
    g = jp.graph.trace(lambda p, x: nnx.merge(graphdef, p)(x), params, jnp.ones((2, 8)))
    assert g.leaf("blocks/lin/kernel").layers == L
    tx = jp.prune(optax.sgd(0.1), sparsity=0.75, update_every=1, layers=g)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(params, state, params)
    rows = jp.summary(jp.get_masks(state), layers=g).rows
    assert [(r["path"], r["kept"]) for r in rows] == [
        *[(f"blocks/lin/kernel[{i}]", 16) for i in range(L)], ("head/kernel", 4)]

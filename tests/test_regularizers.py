"""jp.regularizers: proximal L1 and group lasso give exact zeros and the
closed-form shrinkage on a quadratic; subgradients equal the penalty's
gradient; they compose with jp.prune / jp.structured.prune; threshold then
compact gives a smaller model computing the same function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxprune as jp


def normal(i, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(i).standard_normal(shape), jnp.float32)


def descend(tx, params, target, steps):
    """``steps`` updates on the quadratic ``0.5 ||p - target||^2`` (jitted)."""
    state = tx.init(params)

    def body(carry, _):
        p, s = carry
        g = jax.tree.map(lambda a, b: a - b, p, target)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.jit(lambda c: lax.scan(body, c, None, length=steps))((params, state))
    return p


def test_proximal_l1_exact_zeros_and_soft_threshold():
    c = {"w": normal(0, (8, 8)), "b": normal(1, (8,))}
    lam, lr = 0.6, 0.5
    tx = optax.chain(optax.sgd(lr), jp.regularizers.l1(lam, learning_rate=lr))
    p = descend(tx, jax.tree.map(jnp.zeros_like, c), c, 60)
    w, cw = np.asarray(p["w"]), np.asarray(c["w"])
    want = np.sign(cw) * np.maximum(np.abs(cw) - lam, 0)
    np.testing.assert_allclose(w, want, atol=1e-5)
    assert np.array_equal(w == 0, np.abs(cw) <= lam)  # exact zeros, exactly there
    np.testing.assert_allclose(p["b"], c["b"], atol=1e-5)  # biases not selected


def test_l1_schedule_learning_rate_and_subgradient():
    p = {"w": jnp.array([[1.0, -2.0, 0.0], [1.0, -2.0, 0.0]])}  # (2, 3): a kernel
    g = {"w": jnp.full((2, 3), 0.5)}
    tx = optax.chain(jp.regularizers.l1(0.1), optax.sgd(1.0))
    u, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(u["w"], [[-0.6, -0.4, -0.5]] * 2, rtol=1e-6)
    sched = optax.linear_schedule(1.0, 0.0, 10)
    tx = optax.chain(optax.sgd(sched), jp.regularizers.l1(0.5, learning_rate=sched))
    u, s = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(optax.apply_updates(p, u)["w"], [[0.0, -2.0, 0.0]] * 2, atol=1e-6)
    assert int(s[1].count) == 1
    tx = optax.inject_hyperparams(jp.regularizers.l1)(strength=0.2)
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    np.testing.assert_allclose(u["w"], [[0.7, 0.3, 0.5]] * 2, rtol=1e-6)


def one_group_model():
    """One prunable group (the 6 hidden units): a's columns with c's rows;
    c's outputs reach the model output, so groups do not overlap."""
    params = {"a": normal(2, (4, 6)), "c": normal(3, (6, 2))}
    f = lambda p, x: jnp.tanh(x @ p["a"]) @ p["c"]  # noqa: E731
    return params, f, jp.graph.trace(f, params, jnp.ones((1, 4)))


def test_proximal_group_lasso_block_soft_threshold():
    c, f, g = one_group_model()
    c = {"a": c["a"] * jnp.array([1, 0.1, 1, 0.2, 2, 0.05]), "c": c["c"]}
    c = {"a": c["a"], "c": c["c"] * jnp.array([1, 0.1, 1, 0.2, 2, 0.05])[:, None]}
    norms = np.sqrt(np.sum(np.asarray(c["a"]) ** 2, 0) + np.sum(np.asarray(c["c"]) ** 2, 1))
    lam = float(np.sort(norms)[2]) + 1e-3  # three units go to zero
    tx = optax.chain(optax.sgd(0.5), jp.regularizers.group_lasso(g, lam, learning_rate=0.5))
    p = descend(tx, jax.tree.map(jnp.zeros_like, c), c, 80)
    factor = np.maximum(0, 1 - lam / norms)
    np.testing.assert_allclose(p["a"], np.asarray(c["a"]) * factor, atol=1e-5)
    np.testing.assert_allclose(p["c"], np.asarray(c["c"]) * factor[:, None], atol=1e-5)
    dead = factor == 0
    assert dead.sum() == 3
    assert np.all(np.asarray(p["a"])[:, dead] == 0) and np.all(np.asarray(p["c"])[dead] == 0)
    # Threshold at zero and compact: 3 units left, same function.
    masks = jp.regularizers.threshold(g, p)
    small = jp.structured.compact(g, p, masks)
    assert small["a"].shape == (4, 3) and small["c"].shape == (3, 2)
    x = normal(4, (5, 4))
    np.testing.assert_allclose(f(small, x), f(p, x), rtol=1e-5, atol=1e-6)


def mlp():
    params = {"l0": {"w": normal(5, (5, 7)), "b": normal(6, (7,))},
              "l1": {"w": normal(7, (7, 6)), "b": normal(8, (6,))},
              "l2": {"w": normal(9, (6, 2))}}

    def f(p, x):
        h = jax.nn.relu(x @ p["l0"]["w"] + p["l0"]["b"])
        h = jax.nn.relu(h @ p["l1"]["w"] + p["l1"]["b"])
        return h @ p["l2"]["w"]

    return params, f, jp.graph.trace(f, params, jnp.ones((1, 5)))


def test_group_lasso_subgradient_is_the_penalty_gradient():
    p, _, g = mlp()  # overlapping groups: l1/w rows belong to l0's units, columns to l1's

    def penalty(q):
        n0 = jnp.sqrt(jnp.sum(q["l0"]["w"] ** 2, 0) + q["l0"]["b"] ** 2 +
                      jnp.sum(q["l1"]["w"] ** 2, 1))
        n1 = jnp.sqrt(jnp.sum(q["l1"]["w"] ** 2, 0) + q["l1"]["b"] ** 2 +
                      jnp.sum(q["l2"]["w"] ** 2, 1))
        return 0.3 * (n0.sum() + n1.sum())

    tx = jp.regularizers.group_lasso(g, 0.3)
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    want = jax.grad(penalty)(p)
    for k in p:
        for n in p[k]:
            np.testing.assert_allclose(u[k][n], want[k][n], rtol=1e-5, atol=1e-7)


def bn_model():
    params = {"conv": normal(10, (3, 2, 6)), "bn": {"scale": normal(11, (6,)),
                                                   "bias": normal(12, (6,))},
              "head": normal(13, (6, 3))}

    def f(p, x):
        h = lax.conv_general_dilated(x, p["conv"], (1,), "SAME",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
        h = (h - h.mean((0, 1))) * lax.rsqrt(h.var((0, 1)) + 1e-5)
        h = jax.nn.relu(h * p["bn"]["scale"] + p["bn"]["bias"])
        return h.mean(1) @ p["head"]

    return params, f, jp.graph.trace(f, params, jnp.ones((4, 8, 2)))


def test_slimming_touches_only_norm_scales():
    p, _, g = bn_model()
    zero = jax.tree.map(jnp.zeros_like, p)
    tx = jp.regularizers.slimming(g, 0.1)
    u, _ = jax.jit(tx.update)(zero, tx.init(p), p)
    np.testing.assert_allclose(u["bn"]["scale"], 0.1 * np.sign(p["bn"]["scale"]))
    assert all(float(jnp.abs(u[k]).max()) == 0 for k in ("conv", "head"))
    assert float(jnp.abs(u["bn"]["bias"]).max()) == 0
    tx = optax.chain(optax.sgd(1.0), jp.regularizers.slimming(g, 0.5, learning_rate=1.0))
    u, _ = jax.jit(tx.update)(zero, tx.init(p), p)
    new = optax.apply_updates(p, u)
    s = np.asarray(p["bn"]["scale"])
    np.testing.assert_allclose(new["bn"]["scale"], np.sign(s) * np.maximum(np.abs(s) - 0.5, 0),
                               atol=1e-6)
    np.testing.assert_array_equal(new["conv"], p["conv"])


def test_compose_with_structured_prune_and_prune():
    p, f, g = mlp()
    x, y = normal(20, (16, 5)), normal(21, (16, 2))
    loss = lambda q: jnp.mean((f(q, x) - y) ** 2)  # noqa: E731
    lr = 0.05
    tx = jp.structured.prune(
        optax.chain(optax.sgd(lr), jp.regularizers.group_lasso(g, 0.05, learning_rate=lr)),
        graph=g, sparsity=0.5, update_every=5)
    state = tx.init(p)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(12):
        p, state = step(p, state)
    masks = jp.get_masks(state)
    for leaf, m in zip(jax.tree.leaves(p), jax.tree.leaves(masks)):
        assert np.all(np.asarray(leaf)[~np.broadcast_to(np.asarray(m), leaf.shape)] == 0)
    small = jp.structured.compact(g, p, masks)
    assert small["l0"]["w"].shape[1] < 7
    # Unstructured pruning with the subgradient L1 before the optimizer.
    tx = jp.prune(optax.chain(jp.regularizers.l1(1e-3), optax.adam(1e-2)), sparsity=0.5,
                  update_every=1)
    u, s = jax.jit(tx.update)(jax.grad(loss)(p), tx.init(p), p)
    assert int(jp.get_masks(s)["l1"]["w"].sum()) == jp.select.keep_count(42, 0.5)


def test_errors():
    p, _, g = mlp()
    with pytest.raises(ValueError, match="strength must be a number >= 0"):
        jp.regularizers.l1(-1.0)
    with pytest.raises(ValueError, match="learning_rate must be a number >= 0"):
        jp.regularizers.group_lasso(g, 0.1, learning_rate=-0.1)
    with pytest.raises(ValueError, match="normalisation scale"):
        jp.regularizers.slimming(g, 0.1)
    with pytest.raises(ValueError, match="do not match the traced variables"):
        tx = jp.regularizers.group_lasso(g, 0.1)
        tx.update({"x": jnp.ones(3)}, tx.init(None), {"x": jnp.ones(3)})

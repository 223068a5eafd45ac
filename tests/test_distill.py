"""jp.distill: Hinton's loss against a numpy oracle (soft term with T^2,
hard term with integer or soft labels, the teacher gets no gradient), the
feature term, clear errors, and distillation from the dense teacher during
jp.prune / jp.structured.prune training and after compaction (pruned weights
stay zero, the loss falls)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp


def normal(i, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(i).standard_normal(shape), jnp.float32)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def oracle(s, t, labels, temperature, alpha):
    """Hinton 2015 in float64 numpy: T^2 KL(p_t^T || p_s^T) and CE(labels, p_s)."""
    lt, ls = np_log_softmax(t / temperature), np_log_softmax(s / temperature)
    soft = temperature**2 * (np.exp(lt) * (lt - ls)).sum(-1)
    if labels is None:
        return soft.mean()
    lsm = np_log_softmax(s)
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        hard = -np.take_along_axis(lsm, np.asarray(labels)[..., None], -1)[..., 0]
    else:
        hard = -(np.asarray(labels) * lsm).sum(-1)
    return (alpha * soft + (1 - alpha) * hard).mean()


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (3.0, 0.0),
                                               (0.5, 1.0)])
def test_loss_matches_numpy_oracle(temperature, alpha):
    s, t = normal(0, (5, 3, 7), 2.0), normal(1, (5, 3, 7), 2.0)
    labels = jnp.asarray(np.random.default_rng(2).integers(0, 7, (5, 3)))
    soft_labels = jax.nn.softmax(normal(3, (5, 3, 7)))
    for lab in (None, labels, soft_labels):
        got = jp.distill.loss(s, t, lab, temperature=temperature, alpha=alpha)
        want = oracle(s, t, None if lab is None else np.asarray(lab), temperature, alpha)
        np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient_and_t_squared_keeps_the_gradient_scale():
    s, t = normal(0, (64, 10)), normal(1, (64, 10))
    g_t = jax.grad(lambda t: jp.distill.loss(s, t))(t)
    assert np.all(np.asarray(g_t) == 0)
    # d/ds of T^2 KL -> (s - t) / (C T^0) as T grows: the scale stays put.
    g = [jax.grad(lambda s: jp.distill.loss(s, t, temperature=T))(s) for T in (4.0, 32.0)]
    small = [float(jnp.linalg.norm(x)) for x in g]
    assert small[1] == pytest.approx(small[0], rel=0.1)
    # Without the T^2 the soft gradient would shrink 64-fold between the two.
    np.testing.assert_allclose(g[1], (s - t - (s - t).mean(-1, keepdims=True)) / 10 / 64,
                               rtol=0.05, atol=1e-4)


def test_features_matches_oracle_and_stops_teacher_gradient():
    a = {"x": normal(0, (4, 3)), "y": normal(1, (2, 5))}
    b = {"x": normal(2, (4, 3)), "y": normal(3, (2, 5))}
    want = np.mean([np.mean((np.asarray(a[k]) - np.asarray(b[k])) ** 2) for k in ("x", "y")])
    np.testing.assert_allclose(float(jp.distill.features(a, b)), want, rtol=1e-6)
    g = jax.grad(lambda b: jp.distill.features(a, b))(b)
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(g))


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "temperature must be a number > 0"),
    ({"temperature": "2"}, "temperature must be a number > 0"),
    ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
])
def test_bad_options(kwargs, match):
    s = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=match):
        jp.distill.loss(s, s, **kwargs)
    with pytest.raises(ValueError, match=match):
        jp.distill.loss_fn(lambda p, x: x, {}, **kwargs)


def test_bad_shapes_and_labels():
    s = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"student_logits \(2, 3\) and teacher_logits \(2, 4\)"):
        jp.distill.loss(s, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"expected integer labels of shape \(2,\)"):
        jp.distill.loss(s, s, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="expected integer labels"):
        jp.distill.loss(s, s, jnp.zeros((2,), jnp.float32))  # float class ids
    with pytest.raises(ValueError, match=r"at \"\['h'\]\" the student's shape \(2, 3\)"):
        jp.distill.features({"h": s}, {"h": jnp.zeros((2, 4))})
    with pytest.raises(ValueError, match="trees differ"):
        jp.distill.features({"h": s}, {"g": s})
    with pytest.raises(ValueError, match="no activations"):
        jp.distill.features({}, {})


def mlp():
    params = {"l0": {"w": normal(0, (6, 16), 0.5), "b": jnp.zeros(16)},
              "l1": {"w": normal(1, (16, 4), 0.5), "b": jnp.zeros(4)}}

    def f(p, x):
        return jax.nn.relu(x @ p["l0"]["w"] + p["l0"]["b"]) @ p["l1"]["w"] + p["l1"]["b"]

    return params, f


def train(tx, params, fn, x, y, steps):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(fn)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    first = float(fn(params, x, y))
    for _ in range(steps):
        params, state = step(params, state)
    return params, state, first, float(fn(params, x, y))


def zeros_held(params, masks):
    for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
        if np.any(np.asarray(leaf)[~np.broadcast_to(np.asarray(m), leaf.shape)] != 0):
            return False
    return True


def test_distill_during_prune_and_structured_prune_and_after_compact():
    dense, f = mlp()
    x = normal(5, (64, 6))
    y = jnp.argmax(f(dense, x), -1)
    fn = jp.distill.loss_fn(f, dense, temperature=2.0, alpha=0.7)
    # Unstructured: jp.prune on the dense copy, the dense model teaching.
    tx = jp.prune(optax.adam(1e-2), sparsity=0.7, update_every=1)
    p, s, _, _ = train(tx, dense, fn, x, y, 30)
    masks = jp.get_masks(s)
    assert zeros_held(p, masks) and jp.sparsity_of(p) == pytest.approx(0.7, abs=0.01)
    # Structured: whole hidden units go, then compaction; distillation goes on.
    g = jp.graph.trace(f, dense, jnp.ones((1, 6)))
    tx = jp.structured.prune(optax.adam(1e-2), graph=g, sparsity=0.5, update_every=1)
    p, s, _, after_prune = train(tx, dense, fn, x, y, 30)
    masks = jp.get_masks(s)
    assert zeros_held(p, masks)
    small = jp.structured.compact(g, p, masks)
    assert small["l0"]["w"].shape == (6, 8)
    np.testing.assert_allclose(float(fn(small, x, y)), after_prune, rtol=1e-5)
    small, _, first, last = train(optax.adam(1e-2), small, fn, x, y, 40)
    assert last < first  # the compacted student keeps learning from the dense teacher

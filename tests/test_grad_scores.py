"""Gradient scores (Taylor, movement) and SNIP against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune.train.at_init import snip_scores

W0 = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]], np.float32)
B0 = np.array([0.5, -0.5, 1.0], np.float32)
X = np.array([[1.0, 2.0], [-1.0, 0.5]], np.float32)


def _loss(p):
    # A small non-quadratic loss so gradients change as the weights move.
    h = jnp.tanh(jnp.asarray(X) @ p["w"] + p["b"])
    return jnp.sum((h - 0.3) ** 2)


def _run_prune(score, steps=3, lr=0.1):
    """Runs jp.prune (no pruning yet: sparsity 0) and records (w, g) each step."""
    params = {"w": jnp.asarray(W0), "b": jnp.asarray(B0)}
    tx = jp.prune(optax.sgd(lr), sparsity=0.0, score=score, update_every=1)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p))
    seen = []
    for _ in range(steps):
        g = jax.grad(_loss)(params)
        seen.append({k: (np.asarray(params[k], np.float64), np.asarray(g[k], np.float64)) for k in params})
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
    return state, seen


@pytest.mark.parametrize("squared", [False, True])
def test_taylor_ema_matches_hand_computation(squared):
    decay = 0.5
    state, seen = _run_prune(jp.scores.taylor(decay=decay, squared=squared))
    for k in ("w", "b"):
        acc = 0.0
        for step in seen:
            w, g = step[k]
            t = (w * g) ** 2 if squared else w * g
            acc = decay * acc + (1 - decay) * t
        np.testing.assert_allclose(np.asarray(state.score_state[k]), acc, rtol=1e-5, atol=1e-7)
    sc = jp.scores.taylor(decay=decay, squared=squared)
    score = sc.score(state.score_state, None, None, None)
    want = np.asarray(state.score_state["w"]) if squared else np.abs(np.asarray(state.score_state["w"]))
    np.testing.assert_array_equal(np.asarray(score["w"]), want)


def test_taylor_registered_defaults_use_decay_09():
    state, seen = _run_prune("taylor", steps=2)
    (w0, g0), (w1, g1) = seen[0]["w"], seen[1]["w"]
    want = 0.9 * (0.1 * w0 * g0) + 0.1 * w1 * g1
    np.testing.assert_allclose(np.asarray(state.score_state["w"]), want, rtol=1e-5, atol=1e-7)


def test_movement_is_minus_sum_w_times_g():
    state, seen = _run_prune("movement", steps=4)
    for k in ("w", "b"):
        want = -sum(w * g for w, g in (s[k] for s in seen))
        np.testing.assert_allclose(np.asarray(state.score_state[k]), want, rtol=1e-5, atol=1e-7)


def test_movement_masks_keep_weights_moving_away_from_zero():
    # w * g < 0: the step moves w away from 0 (kept); w * g > 0: toward 0 (pruned).
    params = {"w": jnp.array([[10.0, 0.1, -5.0, -0.1]])}
    grads = {"w": jnp.array([[1.0, -1.0, 1.0, -1.0]])}
    tx = jp.prune(optax.sgd(0.0), sparsity=0.5, score="movement", update_every=1,
                  where=lambda p, x: True)
    u, state = tx.update(grads, tx.init(params), params)
    # movement = -w*g = [-10, 0.1, 5, -0.1]: keep positions 1 and 2.
    assert jp.get_masks(state)["w"].tolist() == [[False, True, True, False]]


def test_pure_functions_and_registry():
    p, g = {"w": jnp.array([[2.0, -1.0]])}, {"w": jnp.array([[3.0, 2.0]])}
    assert {"taylor", "movement", "saliency"} <= set(jp.scores.names())
    assert jp.scores.get("taylor")(p, g)["w"].tolist() == [[6.0, 2.0]]
    assert jp.scores.get("movement")(p, g)["w"].tolist() == [[-6.0, 2.0]]
    assert jp.scores.taylor_importance(p, g, squared=True)["w"].tolist() == [[36.0, 4.0]]


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, "0.9"])
def test_taylor_bad_decay(decay):
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\)"):
        jp.scores.taylor(decay=decay)


def test_taylor_bf16_accumulates_in_float32():
    p = {"w": jnp.ones((2, 2), jnp.bfloat16)}
    sc = jp.scores.taylor()
    st = sc.update(sc.init(p), p, p)
    assert st["w"].dtype == jnp.float32


# --------------------------------------------------------------------------
# SNIP


def _dead_feature_problem():
    key = jax.random.key(0)
    x = jax.random.normal(key, (64, 4))
    x = x.at[:, 1].set(0.0).at[:, 3].set(0.0)  # inputs 1 and 3 are always zero
    params = {"w": jax.random.normal(jax.random.key(1), (4, 3)) + 2.0, "b": jnp.zeros(3)}

    def loss(p, batch):
        xb, yb = batch
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    y = jnp.ones((64, 3))
    return loss, params, (x, y)


def test_snip_prunes_weights_of_dead_inputs():
    loss, params, batch = _dead_feature_problem()
    masks = jp.snip(loss, params, batch, sparsity=0.5)
    m = np.asarray(masks["w"])
    assert not m[1].any() and not m[3].any(), m
    assert m[0].all() and m[2].all(), m
    assert masks["b"].shape == () and bool(masks["b"])


def test_snip_known_ranking_linear_model():
    # loss = sum(x @ W): dL/dW[i, j] = sum_b x[b, i], so |w * g| is known exactly.
    params = {"w": jnp.array([[1.0, 4.0], [2.0, 0.5], [3.0, 1.0]])}
    x = jnp.array([[1.0, 2.0, -1.0]])
    masks = jp.snip(lambda p, x: jnp.sum(x @ p["w"]), params, x, sparsity=0.5)
    # |w*g| = [[1, 4], [4, 1], [3, 1]] -> keep 4, 4, 3 (ties at 1 dropped).
    assert masks["w"].tolist() == [[False, True], [True, False], [True, False]]


def test_snip_averages_over_a_list_of_batches():
    loss, params, (x, y) = _dead_feature_problem()
    batches = [(x[:16], y[:16]), (x[16:40], y[16:40]), (x[40:], y[40:])]
    got = snip_scores(loss, params, batches)
    want = sum(
        np.abs(np.asarray(params["w"]) * np.asarray(jax.grad(loss)(params, b)["w"])) for b in batches
    ) / 3
    np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=1e-5)
    masks = jp.snip(loss, params, batches, sparsity=0.75, allocation="uniform")
    assert int(masks["w"].sum()) == 3


def test_snip_errors():
    loss, params, batch = _dead_feature_problem()
    with pytest.raises(ValueError, match="sparsity"):
        jp.snip(loss, params, batch, sparsity=1.5)
    with pytest.raises(ValueError, match="unknown allocation"):
        jp.snip(loss, params, batch, sparsity=0.5, allocation="bogus")
    with pytest.raises(ValueError, match="empty list"):
        jp.snip(loss, params, [], sparsity=0.5)
    with pytest.raises(TypeError, match="loss_fn"):
        jp.snip("not a function", params, batch, sparsity=0.5)
    with pytest.raises(ValueError, match="matches no leaf"):
        jp.snip(loss, params, batch, sparsity=0.5, where="nope")

"""Dynamic sparse training: SET, RigL, STE (exact counts, regrowth, errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import run_steps

import jaxprune as jp
from jaxprune.core.select import keep_count
from jaxprune.train.dynamic import drop_and_grow, zero_state_outside


def _params():
    k = jax.random.split(jax.random.key(3), 2)
    return {
        "l1": {"kernel": jax.random.normal(k[0], (12, 10)), "bias": jnp.zeros(10)},
        "l2": {"kernel": jax.random.normal(k[1], (10, 6)), "bias": jnp.zeros(6)},
    }


def _loss(p):
    x = jnp.linspace(-1.0, 1.0, 12 * 5).reshape(5, 12)
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return jnp.sum((h @ p["l2"]["kernel"] + p["l2"]["bias"] - 0.5) ** 2)


def _train(tx, steps, params=None):
    """``[(params, state, grads)]``: the initial entry, then one per step."""
    params = _params() if params is None else params
    return [(h.params, h.state, h.grads) for h in run_steps(tx, params, steps, _loss)]


def _kernels(tree):
    return [np.asarray(tree["l1"]["kernel"]), np.asarray(tree["l2"]["kernel"])]


@pytest.mark.parametrize("make", ["set", "rigl"])
def test_exact_counts_drop_grow_and_zero_pruned_every_step(make):
    s, f, every = 0.8, 0.3, 3
    tx = (jp.set_training if make == "set" else jp.rigl)(
        optax.adam(1e-2), sparsity=s, drop_fraction=f, update_every=every, allocation="uniform"
    )
    hist = _train(tx, 10)
    sizes = [120, 60]
    want_k = [keep_count(n, s) for n in sizes]
    for t in range(1, len(hist)):
        p_prev, st_prev, _ = hist[t - 1]
        p, st, _ = hist[t]
        old, new = _kernels(jp.get_masks(st_prev)), _kernels(jp.get_masks(st))
        assert [int(m.sum()) for m in new] == want_k, f"step {t}"
        for m, w in zip(new, _kernels(p)):
            assert not np.any(w[~m]), f"step {t}: pruned weights nonzero"
        assert jp.sparsity_of(jp.get_masks(st)) == pytest.approx(1 - sum(want_k) / sum(sizes))
        count = t - 1  # the count seen by this update
        changed = count > 0 and count % every == 0
        for o, n, k in zip(old, new, want_k):
            dropped, grown = int((o & ~n).sum()), int((n & ~o).sum())
            d = int(np.round(f * k)) if changed else 0
            assert (dropped, grown) == (d, d), f"step {t}: {(dropped, grown)} != {d}"


def test_rigl_drops_smallest_grows_largest_gradient_zero_value_and_moments():
    every = 4
    tx = jp.rigl(optax.adam(1e-2), sparsity=0.7, drop_fraction=0.25, update_every=every, allocation="uniform")
    hist = _train(tx, every + 1)
    p_prev, st_prev, _ = hist[every]  # state before the update with count == every
    p, st, g = hist[every + 1]
    for name in ("l1", "l2"):
        w = np.asarray(p_prev[name]["kernel"])
        grad = np.abs(np.asarray(g[name]["kernel"]))
        old = np.asarray(jp.get_masks(st_prev)[name]["kernel"])
        new = np.asarray(jp.get_masks(st)[name]["kernel"])
        k = int(old.sum())
        d = int(np.round(0.25 * k))
        # Drop: the d kept weights of smallest magnitude.
        kept_mag = np.where(old, np.abs(w), np.inf).ravel()
        want_drop = set(np.argsort(kept_mag, kind="stable")[:d])
        assert set(np.flatnonzero((old & ~new).ravel())) == want_drop
        # Grow: the d inactive positions of largest dense-gradient magnitude.
        inactive = np.where(~old, grad, -np.inf).ravel()
        want_grow = set(np.argsort(-inactive, kind="stable")[:d])
        grown = new & ~old
        assert set(np.flatnonzero(grown.ravel())) == want_grow
        # Regrown weights start at exactly zero, with zeroed Adam moments.
        assert not np.any(np.asarray(p[name]["kernel"])[grown])
        adam = st.inner_state[0]
        assert not np.any(np.asarray(adam.mu[name]["kernel"])[grown | ~new])
        assert not np.any(np.asarray(adam.nu[name]["kernel"])[grown | ~new])
        # Gradient information did reach the growth criterion.
        assert np.all(grad.ravel()[list(want_grow)] > 0)


def test_rigl_cosine_decay_and_end_step():
    f, every, end = 0.5, 2, 8
    tx = jp.rigl(optax.sgd(0.05), sparsity=0.5, drop_fraction=f, update_every=every, end_step=end,
                 allocation="uniform")
    hist = _train(tx, 14)
    sched = optax.cosine_decay_schedule(f, end)
    for t in range(1, len(hist)):
        count = t - 1
        old = _kernels(jp.get_masks(hist[t - 1][1]))
        new = _kernels(jp.get_masks(hist[t][1]))
        for o, n in zip(old, new):
            k = int(o.sum())
            active = count > 0 and count % every == 0 and count < end
            d = int(np.round(np.float32(sched(count)) * k)) if active else 0
            assert int((o & ~n).sum()) == d, f"count {count}"


def test_set_regrows_at_random_inactive_positions_with_seed():
    def masks_after(seed):
        tx = jp.set_training(optax.sgd(0.1), sparsity=0.9, drop_fraction=0.5, update_every=1,
                             allocation="uniform", seed=seed)
        return _kernels(jp.get_masks(_train(tx, 3)[-1][1]))

    a, b, c = masks_after(0), masks_after(0), masks_after(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_random_keys_distinct_deterministic_and_balanced():
    params = {"a": jnp.zeros((256, 256)), "b": jnp.zeros((3,)), "c": jnp.zeros(())}
    k1 = jp.dynamic.random_keys(jax.random.key(0), params)
    k2 = jp.dynamic.random_keys(jax.random.key(0), params)
    k3 = jp.dynamic.random_keys(jax.random.key(1), params)
    a = np.asarray(k1["a"]).ravel()
    assert k1["a"].dtype == jnp.uint32 and k1["c"].shape == ()
    assert len(np.unique(a)) == a.size  # a keyed bijection of the index
    assert np.array_equal(a, np.asarray(k2["a"]).ravel())
    assert np.mean(a == np.asarray(k3["a"]).ravel()) < 1e-3
    # Every bit is set in half the entries (65536 draws: 5 sd is 0.0098).
    bits = (a[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 0.0098), bits.mean(axis=0)


def test_set_growth_is_uniform_over_inactive_positions():
    # One SET exchange per key: 32 of 128 inactive positions grow. Over 400
    # keys each inactive position grows about 100 times (sd 8.7); none of the
    # active ones ever does.
    p = {"w": jnp.linspace(1.0, 2.0, 256).reshape(16, 16)}
    m = {"w": (jnp.arange(256) < 128).reshape(16, 16)}

    @jax.jit
    def grown(key):
        return drop_and_grow(p, m, jp.dynamic.random_keys(key, p), 0.25)[1]["w"]

    counts = sum(np.asarray(grown(jax.random.key(i)), np.int64) for i in range(400)).ravel()
    assert counts[:128].sum() == 0
    assert counts[128:].sum() == 400 * 32
    assert np.all(np.abs(counts[128:] - 100) < 5 * 8.7), counts[128:]


def test_drop_and_grow_stores_no_score_sized_temporary():
    # Drop and grow keys are recomputed inside each counting pass (LazyScores),
    # so one exchange allocates far less than a key per weight (4 MiB here).
    p = {"w": jax.random.normal(jax.random.key(0), (1024, 1024))}
    m = {"w": jax.random.uniform(jax.random.key(1), (1024, 1024)) < 0.1}
    g = {"w": jax.random.normal(jax.random.key(2), (1024, 1024))}
    f = jax.jit(lambda p, m, g: drop_and_grow(p, m, g, 0.3))
    temp = f.lower(p, m, g).compile().memory_analysis().temp_size_in_bytes
    assert temp < 1024 * 1024 * 4 // 8, f"temp {temp} bytes"
    rk = jax.jit(lambda p, m, key: drop_and_grow(p, m, jp.dynamic._random_keys_lazy(key, p), 0.3))
    temp = rk.lower(p, m, jax.random.key(3)).compile().memory_analysis().temp_size_in_bytes
    assert temp < 1024 * 1024 * 4 // 8, f"temp {temp} bytes (random growth)"


def test_erk_initial_masks_are_exact_per_leaf():
    params = _params()
    tx = jp.set_training(optax.sgd(0.1), sparsity=0.8)  # allocation="erk"
    masks = jp.get_masks(tx.init(params))
    per_leaf = jp.allocation.erk(params, 0.8)
    for name, n in (("l1", 120), ("l2", 60)):
        want = keep_count(n, float(per_leaf[name]["kernel"]))
        assert int(masks[name]["kernel"].sum()) == want
    assert jp.sparsity_of(masks) == pytest.approx(0.8, abs=0.01)


def test_drop_and_grow_caps_at_inactive_count_and_handles_nan():
    p = {"w": jnp.array([[1.0, jnp.nan, 3.0, 0.0]])}
    m = {"w": jnp.array([[True, True, True, False]])}
    g = {"w": jnp.array([[0.0, 0.0, 0.0, jnp.nan]])}
    new, grown = drop_and_grow(p, m, g, 1.0)  # d = min(3, 1) = 1; NaN |w| drops first
    assert new["w"].tolist() == [[True, False, True, True]]
    assert grown["w"].tolist() == [[False, False, False, True]]


def test_zero_state_outside_reaches_chained_and_nested_states():
    params = _params()
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9), optax.adam(1e-3))
    state = jax.tree.map(lambda x: jnp.ones_like(x) if jnp.ndim(x) else x, inner.init(params))
    keep = jax.tree.map(lambda x: jnp.zeros(x.shape, bool) if x.ndim == 2 else jnp.ones((), bool), params)
    out = zero_state_outside(inner, state, keep)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    assert not np.any(np.asarray(out[1][0].trace["l1"]["kernel"]))
    assert not np.any(np.asarray(out[2][0].mu["l2"]["kernel"]))
    assert np.all(np.asarray(out[2][0].mu["l2"]["bias"]) == 1)


# --------------------------------------------------------------------------
# STE


def test_apply_masks_ste_forward_masked_gradient_dense():
    p = {"w": jnp.array([[1.0, -2.0, 3.0]]), "b": jnp.array([1.0])}
    m = {"w": jnp.array([[True, False, True]]), "b": jnp.ones((), bool)}
    c = jnp.array([[2.0, 5.0, 7.0]])
    loss = lambda q: jnp.sum(jp.apply_masks_ste(q, m)["w"] * c) + q["b"][0]  # noqa: E731
    assert float(loss(p)) == 1 * 2 + 3 * 7 + 1
    g = jax.grad(loss)(p)
    assert g["w"].tolist() == [[2.0, 5.0, 7.0]]  # the pruned weight gets its gradient
    assert jp.apply_masks_ste(p, m)["w"].tolist() == [[1.0, 0.0, 3.0]]


def test_ste_keeps_dense_weights_and_pruned_weights_can_return():
    params = {"w": jnp.array([[1.0, 0.5, 0.1, 0.05]])}
    target = jnp.array([[0.0, 0.0, 2.0, 0.0]])  # pushes the small w[2] up, the others down
    tx = jp.ste_training(optax.sgd(0.2), sparsity=0.5, update_every=1, where="w")
    state = tx.init(params)

    def loss(p, masks):
        return jnp.sum((jp.apply_masks_ste(p, masks)["w"] - target) ** 2)

    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p, jp.get_masks(s)), s, p))
    first = None
    for _ in range(15):
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
        m = np.asarray(jp.get_masks(state)["w"])
        assert int(m.sum()) == 2
        first = m.copy() if first is None else first
    assert not first[0, 2]  # pruned at first ...
    assert np.asarray(jp.get_masks(state)["w"])[0, 2]  # ... and back in the mask later
    assert np.all(np.asarray(params["w"]) != 0)  # dense weights are never zeroed


def test_ste_schedule_and_exact_sparsity():
    tx = jp.ste_training(optax.adam(1e-2), sparsity=optax.linear_schedule(0.0, 0.75, 4), update_every=2)
    hist = _train(tx, 6)
    masks = jp.get_masks(hist[-1][1])
    assert [int(m.sum()) for m in _kernels(masks)] == [30, 15]


# --------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("factory", [jp.set_training, jp.rigl])
@pytest.mark.parametrize("frac", [-0.1, 1.5])
def test_bad_drop_fraction(factory, frac):
    with pytest.raises(ValueError, match=r"drop_fraction must be a number in \[0, 1\]") as e:
        factory(optax.sgd(0.1), sparsity=0.5, drop_fraction=frac)
    assert repr(frac) in str(e.value)


@pytest.mark.parametrize("factory", [jp.set_training, jp.rigl, jp.ste_training])
@pytest.mark.parametrize("sparsity", [-0.5, 1.2])
def test_bad_sparsity(factory, sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        factory(optax.sgd(0.1), sparsity=sparsity)


@pytest.mark.parametrize("factory", [jp.set_training, jp.rigl, jp.ste_training])
def test_unknown_allocation(factory):
    with pytest.raises(ValueError, match="unknown allocation 'bogus'"):
        factory(optax.sgd(0.1), sparsity=0.5, allocation="bogus")


@pytest.mark.parametrize("factory", [jp.set_training, jp.rigl, jp.ste_training])
def test_missing_params(factory):
    tx = factory(optax.sgd(0.1), sparsity=0.5)
    state = tx.init(_params())
    with pytest.raises(ValueError, match="needs params"):
        tx.update(_params(), state)


def test_other_bad_arguments():
    with pytest.raises(TypeError, match="fixed sparsity"):
        jp.set_training(optax.sgd(0.1), sparsity=optax.linear_schedule(0.0, 0.5, 10))
    with pytest.raises(TypeError, match="end_step=None"):
        jp.rigl(optax.sgd(0.1), sparsity=0.5, drop_fraction=lambda t: 0.3, end_step=100)
    with pytest.raises(ValueError, match="update_every must be a positive int"):
        jp.rigl(optax.sgd(0.1), sparsity=0.5, update_every=0)
    with pytest.raises(ValueError, match="end_step must be a positive int"):
        jp.rigl(optax.sgd(0.1), sparsity=0.5, end_step=-3)
    with pytest.raises(ValueError, match="apply_masks_ste: the mask for leaf 'w'"):
        jp.apply_masks_ste({"w": jnp.ones((2, 2))}, {"w": jnp.ones((3, 2), bool)})


def test_rigl_schedule_with_end_step_none_is_what_the_error_suggests():
    # The error above says: keep the schedule and pass end_step=None. It works:
    # the schedule sets the fraction (0 from step 4 on: no exchange there).
    sched = lambda t: jnp.where(t < 4, 0.5, 0.0)  # noqa: E731
    tx = jp.rigl(optax.sgd(0.05), sparsity=0.5, drop_fraction=sched, update_every=2,
                 end_step=None, allocation="uniform")
    hist = _train(tx, 6)
    moved = [int(np.sum(_kernels(jp.get_masks(hist[t][1]))[0]
                        != _kernels(jp.get_masks(hist[t - 1][1]))[0])) for t in range(1, 7)]
    assert moved[2] > 0 and moved[4] == 0, moved  # the updates at counts 2 and 4


def test_factories_take_sparsity_as_a_keyword_only():
    for factory in (jp.set_training, jp.rigl, jp.ste_training):
        with pytest.raises(TypeError, match="positional argument"):
            factory(optax.sgd(0.1), 0.5)


def test_zero_state_outside_with_masked_multi_transform_and_factored_inner():
    params = _params()
    keep = jax.tree.map(lambda x: jnp.zeros(x.shape, bool) if x.ndim == 2 else jnp.ones((), bool),
                        params)
    labels = lambda p: jax.tree.map(lambda x: "k" if x.ndim == 2 else "b", p)  # noqa: E731
    for inner in (optax.masked(optax.adam(1e-3), lambda p: jax.tree.map(lambda x: x.ndim == 2, p)),
                  optax.multi_transform({"k": optax.adam(1e-3), "b": optax.sgd(0.1, momentum=0.9)},
                                        labels),
                  optax.adafactor(1e-3)):
        state = jax.tree.map(lambda x: jnp.ones_like(x) if jnp.ndim(x) else x, inner.init(params))
        out = zero_state_outside(inner, state, keep)
        assert jax.tree.structure(out) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state)):
            assert a.shape == b.shape and a.dtype == b.dtype  # factored moments untouched
        for _, mu in optax.tree_utils.tree_get_all_with_path(out, "mu"):
            assert not np.any(np.asarray(mu["l1"]["kernel"]))

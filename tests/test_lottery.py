"""Tests of jaxprune.lottery: IMP with rewinding as an optax wrapper, and the
lottery-ticket controls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from harness import assert_trees_equal, make_step, run_steps

import jaxprune as jp
from jaxprune.train import lottery

S, R, RATE = 4, 3, 0.2


def make_params():
    k = jax.random.split(jax.random.key(0), 3)
    # Odd sizes, so the per-round keep counts round non-trivially.
    return {
        "l1": {"kernel": jax.random.normal(k[0], (7, 13)), "bias": jnp.zeros(13)},
        "l2": {"kernel": jax.random.normal(k[1], (13, 5)), "bias": jnp.zeros(5)},
    }


def loss(p):
    x = jnp.linspace(-1.0, 1.0, 7 * 3).reshape(3, 7)
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    y = h @ p["l2"]["kernel"] + p["l2"]["bias"]
    return jnp.sum((y - 1.0) ** 2)


def run(tx, params, steps):
    """``[(params, state)]``: the initial entry, then one per update call."""
    return [(h.params, h.state) for h in run_steps(tx, params, steps, loss)]


def kernels(tree):
    return [tree["l1"]["kernel"], tree["l2"]["kernel"]]


@pytest.fixture(scope="module")
def global_run():
    tx = jp.lottery_ticket(optax.adam(1e-2), rounds=R, steps_per_round=S, prune_rate=RATE)
    return tx, run(tx, make_params(), S * (R + 1))


def test_rewind_restores_theta0(global_run):
    _, hist = global_run
    p0 = hist[0][0]
    for r in range(1, R + 1):
        params, state = hist[r * S]  # just after the r-th round-end call
        assert int(lottery.current_round(state)) == r
        masks = jp.get_masks(state)
        exact = lottery.rewound_params(state)
        want = lottery.rewind(p0, masks)
        assert_trees_equal(exact, want)  # bit-exact
        for a, b, prev in zip(
            jax.tree.leaves(params), jax.tree.leaves(want), jax.tree.leaves(hist[r * S - 1][0])
        ):
            # p + (theta_0 - p): a few ulp of the larger of the two.
            tol = 4 * np.finfo(np.float32).eps * np.maximum(np.abs(prev), np.abs(b))
            assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= tol)
        # Pruned weights exactly zero; the snapshot is theta_0 itself.
        for x, m in zip(kernels(params), kernels(masks)):
            assert not np.any(np.asarray(x)[~np.asarray(m)])
        assert_trees_equal(state.snapshot, p0)


def test_exact_sparsity_and_nested_global(global_run):
    _, hist = global_run
    n = 7 * 13 + 13 * 5
    # 156 * 0.8 ** r = 156, 124.8, 99.84, 79.872, rounded by hand.
    want_kept = [156, 125, 100, 80]
    want_sparsity = [0.0, 0.2, 0.36, 0.488]
    prev = None
    for r in range(R + 1):
        state = hist[r * S][1]
        masks = [np.asarray(m) for m in kernels(jp.get_masks(state))]
        kept = sum(int(m.sum()) for m in masks)
        assert kept == want_kept[r], (r, kept)
        assert float(lottery.current_sparsity(state)) == pytest.approx(1 - kept / n)
        assert lottery.imp_sparsity(r, RATE) == pytest.approx(want_sparsity[r], abs=1e-12)
        if prev is not None:
            for a, b in zip(masks, prev):
                assert not np.any(a & ~b), "a pruned weight came back"
        prev = masks
    # After the last round the masks stay fixed.
    last = hist[-1][1]
    assert int(lottery.current_round(last)) == R
    for a, b in zip(kernels(jp.get_masks(last)), kernels(jp.get_masks(hist[R * S][1]))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_exact_sparsity_uniform():
    rounds, rate = 4, 0.3
    tx = jp.lottery_ticket(
        optax.sgd(1e-2), rounds=rounds, steps_per_round=2, prune_rate=rate, allocation="uniform"
    )
    hist = run(tx, make_params(), 2 * rounds)
    # 91 * 0.7 ** r = 91, 63.7, 44.59, 31.213, 21.8491; 65 * 0.7 ** r = 65, 45.5
    # (half to even: 46), 31.85, 22.295, 15.6065.
    want = {91: [91, 64, 45, 31, 22], 65: [65, 46, 32, 22, 16]}
    prev = None
    for r in range(rounds + 1):
        masks = [np.asarray(m) for m in kernels(jp.get_masks(hist[2 * r][1]))]
        for m in masks:
            assert int(m.sum()) == want[m.size][r], (r, m.shape, int(m.sum()))
        if prev is not None:
            assert all(not np.any(a & ~b) for a, b in zip(masks, prev))
        prev = masks


def test_exact_counts_large_leaf():
    # 13_058_834 * 0.1875 = 2_448_531.4: a float32 traced sparsity cannot
    # express this count (n * (1 - s) jumps over it); integer counts can.
    n_rows = 2_048
    p = {"w": jax.random.normal(jax.random.key(1), (n_rows, 3001))}
    n = p["w"].size
    tx = jp.lottery_ticket(optax.sgd(0.0), rounds=2, steps_per_round=1, prune_rate=0.37)
    step = jax.jit(lambda p, s: tx.update(p, s, p)[1])
    s = tx.init(p)
    for r in (1, 2):
        s = step(p, s)
        assert int(jp.get_masks(s)["w"].sum()) == round(n * 0.63**r)


def test_inner_state_reset_and_schedule_restart():
    sched = optax.linear_schedule(1e-2, 0.0, transition_steps=100)
    inner = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(sched), optax.scale(-1.0))
    tx = jp.lottery_ticket(inner, rounds=2, steps_per_round=3)
    p0 = make_params()
    hist = run(tx, p0, 7)
    fresh = inner.init(p0)
    before = hist[2][1].inner_state  # two real steps done
    counts = [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(before, "count")]
    assert counts == [2, 2]
    after = hist[3][1].inner_state  # right after the round end
    assert_trees_equal(after, fresh)
    # ... and the next step uses count 0 again.
    after2 = hist[4][1].inner_state
    counts = [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(after2, "count")]
    assert counts == [1, 1]
    # Moments of pruned weights stay exactly zero.
    mu = optax.tree_utils.tree_get(after2, "mu")
    for m, x in zip(kernels(jp.get_masks(hist[4][1])), kernels(mu)):
        assert not np.any(np.asarray(x)[~np.asarray(m)])


def test_late_rewinding_snapshot_at_step_k():
    k = 2
    tx = jp.lottery_ticket(optax.adam(1e-2), rounds=2, steps_per_round=5, rewind_step=k)
    hist = run(tx, make_params(), 11)
    theta_k = hist[k][0]  # the params passed to update call number k
    assert not np.array_equal(np.asarray(theta_k["l1"]["kernel"]), np.asarray(hist[0][0]["l1"]["kernel"]))
    for i in (k + 1, 5, 10, 11):
        assert_trees_equal(hist[i][1].snapshot, theta_k)
    state = hist[5][1]
    want = lottery.rewind(theta_k, jp.get_masks(state))
    assert_trees_equal(lottery.rewound_params(state), want)
    np.testing.assert_allclose(hist[5][0]["l1"]["bias"], theta_k["l1"]["bias"], rtol=1e-6, atol=1e-7)


def test_scan_matches_loop(global_run):
    tx, hist = global_run
    p0 = hist[0][0]

    @jax.jit
    def train(p, s):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), lottery.current_round(s)

        return jax.lax.scan(body, (p, s), length=len(hist) - 1)

    (p, s), rounds = train(p0, tx.init(p0))
    assert rounds.tolist() == [min((i + 1) // S, R) for i in range(len(hist) - 1)]
    assert_trees_equal(jp.get_masks(s), jp.get_masks(hist[-1][1]))
    assert_trees_equal(p, hist[-1][0], rtol=1e-5, atol=1e-6)


def test_orbax_resume_bit_identical(global_run, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx, hist = global_run
    step4 = make_step(tx, loss)
    step = lambda p, s: step4(p, s)[:2]  # noqa: E731
    total, cut = len(hist) - 1, S + 2  # cut in the middle of round 1
    p0 = hist[0][0]
    params, state = p0, tx.init(p0)
    for _ in range(cut):
        params, state = step(params, state)
    ckpt = ocp.StandardCheckpointer()
    path = tmp_path / "ckpt"
    ckpt.save(path, {"params": params, "opt_state": state})
    ckpt.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
    restored = ckpt.restore(path, target)
    params, state = restored["params"], restored["opt_state"]
    assert isinstance(state, lottery.LotteryState)
    for _ in range(total - cut):
        params, state = step(params, state)
    ref_p, ref_s = hist[-1]
    assert_trees_equal((params, state), (ref_p, ref_s))


def test_found_inside_wrappers():
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        jp.lottery_ticket(optax.adam(1e-2), rounds=2, steps_per_round=2, prune_rate=0.5),
    )
    tx = optax.MultiSteps(tx, every_k_schedule=2)
    hist = run(tx, make_params(), 8)
    state = hist[-1][1]
    assert int(lottery.current_round(state)) == 2
    assert float(lottery.current_sparsity(state)) == pytest.approx(1 - 39 / 156)
    assert jp.get_masks(state)["l1"]["kernel"].shape == (7, 13)
    rp = lottery.rewound_params(state)
    assert float(jnp.sum(rp["l1"]["kernel"] != 0)) + float(jnp.sum(rp["l2"]["kernel"] != 0)) == 39
    with pytest.raises(ValueError, match="no lottery_ticket state"):
        lottery.current_round(optax.adam(1e-2).init(make_params()))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(prune_rate=0.0), ValueError, ["prune_rate", "(0, 1)", "0.0"]),
        (dict(prune_rate=1.0), ValueError, ["prune_rate", "(0, 1)"]),
        (dict(prune_rate=-0.2), ValueError, ["prune_rate", "-0.2"]),
        (dict(prune_rate="0.2"), TypeError, ["prune_rate"]),
        (dict(rounds=0), ValueError, ["rounds", ">= 1", "0"]),
        (dict(rounds=2.0), TypeError, ["rounds", "int"]),
        (dict(steps_per_round=0), ValueError, ["steps_per_round", ">= 1"]),
        (dict(rewind_step=10), ValueError, ["rewind_step=10", "steps_per_round=10"]),
        (dict(rewind_step=-1), ValueError, ["rewind_step", ">= 0"]),
        (dict(allocation="nope"), ValueError, ["allocation", "nope"]),
        (dict(score="nope"), ValueError, ["score", "nope"]),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    args = dict(rounds=3, steps_per_round=10)
    args.update(kwargs)
    with pytest.raises(exc) as e:
        jp.lottery_ticket(optax.sgd(0.1), **args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_params():
    tx = jp.lottery_ticket(optax.sgd(0.1), rounds=1, steps_per_round=2)
    p = make_params()
    with pytest.raises(ValueError, match="params"):
        tx.init(None)
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))


def _ticket_masks():
    return {
        "l1": {"kernel": jnp.arange(91).reshape(7, 13) % 3 == 0, "bias": jnp.ones((), bool)},
        "l2": {"kernel": jnp.arange(65).reshape(13, 5) % 4 == 1, "bias": jnp.ones((), bool)},
    }


def test_controls_keep_per_layer_counts():
    masks = _ticket_masks()
    key = jax.random.key(3)
    for fn in (jp.masks.random_like, lottery.shuffle_mask, jax.jit(jp.masks.random_like)):
        out = fn(key, masks)
        for a, b in zip(kernels(out), kernels(masks)):
            assert a.dtype == jnp.bool_ and a.shape == b.shape
            assert int(a.sum()) == int(b.sum())
            assert not np.array_equal(np.asarray(a), np.asarray(b))
        assert out["l1"]["bias"].ndim == 0 and bool(out["l1"]["bias"])
    # axis: counts per slice are kept too.
    out = lottery.shuffle_mask(key, masks, axis=0)
    for a, b in zip(kernels(out), kernels(masks)):
        assert np.array_equal(np.asarray(a.sum(0)), np.asarray(b.sum(0)))
    with pytest.raises(ValueError, match="axis=5"):
        lottery.shuffle_mask(key, masks, axis=5)
    # Different keys, different masks.
    a = jp.masks.random_like(jax.random.key(0), masks)["l1"]["kernel"]
    b = jp.masks.random_like(jax.random.key(1), masks)["l1"]["kernel"]
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_random_reinit():
    masks = _ticket_masks()
    p0 = make_params()
    q = lottery.random_reinit(jax.random.key(0), p0, masks)
    for x, m, x0 in zip(kernels(q), kernels(masks), kernels(p0)):
        x, m = np.asarray(x), np.asarray(m)
        assert np.array_equal(x != 0, m)
        # a fresh draw from the same per-layer values
        assert not np.array_equal(x[m], np.asarray(x0)[m])
        assert set(x[m].tolist()) <= set(np.asarray(x0).ravel().tolist())
    q2 = lottery.random_reinit(jax.random.key(1), lambda k: jax.tree.map(lambda x: x + 1, p0), masks)
    assert np.array_equal(np.asarray(q2["l1"]["kernel"] != 0), np.asarray(masks["l1"]["kernel"]))
    assert np.array_equal(np.asarray(q2["l1"]["bias"]), np.ones(13))


def test_snapshot_and_rewind_functional():
    p = make_params()
    snap = lottery.snapshot(p)
    assert snap["l1"]["kernel"] is not p["l1"]["kernel"]
    masks = _ticket_masks()
    r = lottery.rewind(snap, masks)
    assert np.array_equal(np.asarray(r["l1"]["kernel"]), np.where(masks["l1"]["kernel"], p["l1"]["kernel"], 0))
    assert np.array_equal(np.asarray(r["l2"]["bias"]), np.asarray(p["l2"]["bias"]))
    assert float(lottery.imp_sparsity(jnp.arange(3), 0.5)[2]) == 0.75


def test_random_mask_is_a_deprecated_alias_of_random_like():
    masks = _ticket_masks()
    with pytest.warns(DeprecationWarning, match="jaxprune.masks.random_like"):
        old = lottery.random_mask(jax.random.key(4), masks)
    new = jp.masks.random_like(jax.random.key(4), masks)
    assert_trees_equal(old, new)


def test_random_like_positions_are_uniform():
    # 2 of 8 positions kept, 800 keys: each position is kept about 200 times
    # (sd 12.2); the selection on random keys has no positional bias.
    m = {"w": jnp.arange(8).reshape(2, 4) < 2}
    f = jax.jit(lambda k: jp.masks.random_like(k, m)["w"])
    counts = sum(np.asarray(f(jax.random.key(i)), np.int64) for i in range(800)).ravel()
    assert counts.sum() == 1600
    assert np.all(np.abs(counts - 200) < 5 * 12.2), counts


# --------------------------------------------------------------------------
# Rewinding non-parameter state (BatchNorm statistics)


@pytest.fixture(scope="module")
def resnet_grads():
    """A Linen ResNet and one jitted (gradient, new statistics) function,
    compiled once for every rewind step below (the model's compile is most of
    the test's time; only the transform differs between them)."""
    import models

    apply_fn, variables, x = models.linen_resnet()
    labels = jnp.arange(x.shape[0]) % 10

    @jax.jit
    def grads(params, stats):
        def loss_fn(p):
            logits, new = apply_fn({"params": p, "batch_stats": stats}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new

        (_, new), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return g, new

    return variables, grads


@pytest.mark.parametrize("k", [0, 1])
def test_rewind_extra_rewinds_batch_stats_exactly(k, resnet_grads):
    variables, grads = resnet_grads
    s_per_round, rounds = 3, 2
    tx = jp.lottery_ticket(optax.adam(1e-2), rounds=rounds, steps_per_round=s_per_round,
                           rewind_step=k, prune_rate=0.5)

    @jax.jit
    def update(g, new, params, state, snap):
        u, state = tx.update(g, state, params)
        stats, snap = jp.lottery.rewind_extra(state, new, snap)
        return optax.apply_updates(params, u), stats, state, snap

    def step(params, stats, state, snap):
        g, new = grads(params, stats)
        return (*update(g, new, params, state, snap), new)

    params, stats = variables["params"], variables["batch_stats"]
    state, snap = jax.jit(tx.init)(params), jp.lottery.snapshot(stats)
    want_snap = stats  # rewind_step=0: the initial statistics
    events = []
    for t in range(s_per_round * (rounds + 1)):
        params, stats, state, snap, new = step(params, stats, state, snap)
        events.append(int(state.event))
        if t == k and k > 0:
            want_snap = new  # the statistics passed to the call that took the snapshot
        expect = want_snap if int(state.event) & lottery.REWOUND else new
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(expect)):
            assert np.array_equal(np.asarray(a), np.asarray(b)), (t, k)
        if int(state.event) == lottery.REWOUND:  # not vacuous: the statistics had moved
            assert any(not np.array_equal(np.asarray(a), np.asarray(b))
                       for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want_snap)))
    snapshot_bit = [lottery.SNAPSHOT if (t == k and k > 0) else 0 for t in range(9)]
    rewound_bit = [lottery.REWOUND if t in (2, 5) else 0 for t in range(9)]
    assert events == [a + b for a, b in zip(snapshot_bit, rewound_bit)]


def test_rewind_extra_when_one_update_snapshots_and_rewinds():
    # rewind_step = steps_per_round - 1: the first round-end call takes the
    # snapshot and rewinds to it (event 3); the extra state passes through
    # that call and is restored to it at the next round end.
    tx = jp.lottery_ticket(optax.sgd(0.1), rounds=2, steps_per_round=3, rewind_step=2)
    p = make_params()
    state, extra = tx.init(p), {"mean": jnp.zeros(3)}
    snap = jp.lottery.snapshot(extra)
    step = jax.jit(lambda s, e, sn: (lambda s: (s, *jp.lottery.rewind_extra(s, e, sn)))(
        tx.update(p, s, p)[1]))
    seen = []
    for _ in range(6):
        state, extra, snap = step(state, {"mean": extra["mean"] + 1.0}, snap)
        seen.append((int(state.event), float(extra["mean"][0]), float(snap["mean"][0])))
    assert seen == [(0, 1.0, 0.0), (0, 2.0, 0.0), (3, 3.0, 3.0), (0, 4.0, 3.0), (0, 5.0, 3.0),
                    (2, 3.0, 3.0)]

"""prune(), keep_masks(), get_masks(), allocations, checkpoints, Flax models."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from battery import dict_params, loss
from harness import run_steps

import jaxprune as jp
from jaxprune.train import base as _transform_base


def f32_keep(n, s):
    """The keep count for a traced (float32) sparsity: exact round(n (1 - s32))."""
    from oracle import keep_count

    return keep_count(n, s, traced=True)


def train(tx, params, steps, loss_fn=loss):
    """``[(params, state)]`` after each of ``steps`` jitted steps."""
    return [(h.params, h.state) for h in run_steps(tx, params, steps, loss_fn)[1:]]


@pytest.mark.parametrize(
    "inner",
    [
        optax.adam(1e-2),
        optax.adamw(1e-2, weight_decay=0.5),
        optax.sgd(0.05, momentum=0.9),
        optax.lion(1e-3, weight_decay=0.1),
    ],
    ids=["adam", "adamw", "sgd_momentum", "lion"],
)
def test_schedule_exact_and_pruned_stay_zero(inner):
    sched = optax.polynomial_schedule(0.0, 0.9, power=3, transition_steps=150, transition_begin=20)
    every = 10
    tx = jp.prune(inner, sparsity=sched, update_every=every)
    hist = train(tx, dict_params(), 220)
    for i, (p, s) in enumerate(hist):
        masks = jp.get_masks(s)
        for name in ("dense1", "dense2"):
            m, w = masks[name]["kernel"], p[name]["kernel"]
            assert int(jnp.sum(~m & (w != 0))) == 0, (i, name)
            if i % every == 0:  # masks were recomputed at count == i
                want = f32_keep(m.size, float(sched(i)))
                assert int(m.sum()) == want, (i, name, int(m.sum()), want)
        assert masks["dense1"]["bias"].shape == ()
    # Nested: masks only shrink.
    for (_, s0), (_, s1) in zip(hist, hist[1:]):
        m0, m1 = jp.get_masks(s0)["dense1"]["kernel"], jp.get_masks(s1)["dense1"]["kernel"]
        assert not bool(jnp.any(m1 & ~m0))
    assert jp.sparsity_of(hist[-1][0]) == pytest.approx(0.9, abs=1 / 64)


def test_moments_of_pruned_weights_stay_zero():
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5, update_every=1)
    (p, s), *_ = train(tx, dict_params(), 1)
    hist = train(tx, dict_params(), 5)
    p, s = hist[-1]
    m = jp.get_masks(s)["dense1"]["kernel"]
    adam_state = s.inner_state[0]
    assert float(jnp.abs(jnp.where(m, 0, adam_state.mu["dense1"]["kernel"])).max()) == 0.0
    assert float(jnp.abs(jnp.where(m, 0, adam_state.nu["dense1"]["kernel"])).max()) == 0.0


def test_kept_weights_get_exact_inner_update():
    inner = optax.adam(1e-2)
    tx = jp.prune(inner, sparsity=0.5, update_every=1000)
    p = dict_params()
    s = tx.init(p)
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    m = jp.get_masks(s)
    u_ref, _ = inner.update(_transform_base.mask_grads(g, m), inner.init(p), p)
    k = m["dense1"]["kernel"]
    np.testing.assert_array_equal(
        np.where(k, u["dense1"]["kernel"], 0), np.where(k, u_ref["dense1"]["kernel"], 0)
    )
    np.testing.assert_array_equal(u["dense1"]["bias"], u_ref["dense1"]["bias"])


def test_non_update_steps_keep_masks():
    tx = jp.prune(optax.sgd(0.1), sparsity=optax.linear_schedule(0.0, 0.5, 10), update_every=5)
    hist = train(tx, dict_params(), 12)
    ms = [jp.get_masks(s)["dense1"]["kernel"] for _, s in hist]
    for i in range(1, 12):
        if i % 5:
            np.testing.assert_array_equal(ms[i], ms[i - 1])
    assert int(ms[4].sum()) == f32_keep(128, 0.0)
    assert int(ms[5].sum()) == f32_keep(128, 0.25)
    assert int(ms[10].sum()) == f32_keep(128, 0.5)


def test_regrow_when_not_nested():
    # A gradient score that flips sign: nested masks can never regrow.
    p = {"w": jnp.ones((4, 4))}

    def score_fn(params, grads):
        return {"w": grads["w"]}

    for nested, expect_regrow in ((True, False), (False, True)):
        tx = jp.prune(optax.sgd(0.0), sparsity=0.5, update_every=1, score=score_fn, nested=nested)
        s = tx.init(p)
        g1 = {"w": jnp.arange(16.0).reshape(4, 4)}
        g2 = {"w": -jnp.arange(16.0).reshape(4, 4)}
        _, s = tx.update(g1, s, p)
        m1 = jp.get_masks(s)["w"]
        _, s = tx.update(g2, s, p)
        m2 = jp.get_masks(s)["w"]
        assert int(m2.sum()) == 8
        assert bool(jnp.any(m2 & ~m1)) == expect_regrow


def test_allocation_dict_and_callable():
    p = dict_params()
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, update_every=1, allocation={"dense2": 0.25})
    (_, s), = train(tx, p, 1)
    m = jp.get_masks(s)
    assert int(m["dense1"]["kernel"].sum()) == 64
    assert int(m["dense2"]["kernel"].sum()) == 48

    def alloc(params, s):
        return jax.tree.map(lambda x: s if x.shape == (8, 16) else 0.0, params)

    tx = jp.prune(optax.sgd(0.1), sparsity=0.75, update_every=1, allocation=alloc)
    (_, s), = train(tx, p, 1)
    m = jp.get_masks(s)
    assert int(m["dense1"]["kernel"].sum()) == 32
    assert int(m["dense2"]["kernel"].sum()) == 64


def test_erk_budget_and_dense_layers():
    p = {"big": jnp.ones((200, 200)), "small": jnp.ones((4, 200)), "b": jnp.ones(3)}
    s = jp.allocation.erk(p, 0.9)
    dens = {k: 1 - float(s[k]) for k in ("big", "small")}
    kept = dens["big"] * 40000 + dens["small"] * 800
    assert kept == pytest.approx(0.1 * 40800, rel=1e-4)
    assert dens["small"] == 1.0  # would exceed density 1: kept dense
    # Reference ERK: density ∝ (sum of dims) / (prod of dims).
    eps = (0.1 * 40800 - 800) / (400 / 40000 * 40000)
    assert dens["big"] == pytest.approx(eps * 400 / 40000, rel=1e-4)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.9, update_every=1, allocation="erk")
    st = tx.init(p)
    _, st = tx.update(jax.tree.map(jnp.ones_like, p), st, p)
    m = jp.get_masks(st)
    assert int(m["small"].sum()) == 800
    assert int(m["big"].sum()) == f32_keep(40000, float(s["big"]))


def test_scan_training_loop():
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5, update_every=3)
    p = dict_params()
    s = tx.init(p)

    def body(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, s), _ = jax.lax.scan(body, (p, s), None, length=10)
    assert int(s.count) == 10
    assert int(jp.get_masks(s)["dense1"]["kernel"].sum()) == 64
    assert int(jnp.sum(p["dense1"]["kernel"] != 0)) == 64


def test_orbax_checkpoint_resumes_bit_identically(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = jp.prune(
        optax.adamw(1e-2, weight_decay=0.1),
        sparsity=optax.polynomial_schedule(0.0, 0.8, 3, 20),
        update_every=4,
        score="random",
    )
    p0 = dict_params()

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    p, s = p0, tx.init(p0)
    for _ in range(10):
        p, s = step(p, s)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
    ckpt.wait_until_finished()
    # Uninterrupted run.
    pa, sa = p, s
    for _ in range(15):
        pa, sa = step(pa, sa)
    # Restored run.
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": p, "opt_state": s})
    restored = ckpt.restore(tmp_path / "ckpt", abstract)
    pb, sb = restored["params"], restored["opt_state"]
    assert jax.tree_util.tree_structure(sb) == jax.tree_util.tree_structure(s)
    for _ in range(15):
        pb, sb = step(pb, sb)
    for x, y in zip(jax.tree_util.tree_leaves((pa, sa)), jax.tree_util.tree_leaves((pb, sb))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_keep_masks_and_get_masks():
    p = dict_params()
    masks = jp.masks.topk(jp.scores.magnitude(p), 0.5)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), jp.keep_masks(masks))
    hist = train(tx, p, 5)
    pe, se = hist[-1]
    got = jp.get_masks(se)
    np.testing.assert_array_equal(got["dense1"]["kernel"], masks["dense1"]["kernel"])
    for _, (pp, _) in enumerate(hist):
        assert int(jnp.sum(~masks["dense1"]["kernel"] & (pp["dense1"]["kernel"] != 0))) == 0
    assert int(jnp.sum(pe["dense1"]["kernel"] != 0)) == 64


def test_get_masks_errors():
    with pytest.raises(ValueError, match="no masks found"):
        jp.get_masks(optax.adam(1e-3).init(dict_params()))
    p = dict_params()
    m = jp.masks.topk(jp.scores.magnitude(p), 0.5)
    tx = optax.chain(jp.keep_masks(m), jp.keep_masks(m))
    with pytest.raises(ValueError, match="several transforms"):
        jp.get_masks(tx.init(p))


# ---------------------------------------------------------------- errors


def test_error_update_without_params():
    tx = jp.prune(optax.adam(1e-3), sparsity=0.5)
    p = dict_params()
    s = tx.init(p)
    with pytest.raises(ValueError, match=r"needs params.*tx.update\(grads, opt_state, params\)"):
        tx.update(p, s)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_error_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match=r"sparsity.*\[0, 1\]"):
        jp.prune(optax.adam(1e-3), sparsity=bad)


def test_error_schedule_out_of_range():
    with pytest.raises(ValueError, match=r"sparsity\(step=.*\[0, 1\]"):
        jp.prune(optax.adam(1e-3), sparsity=optax.linear_schedule(0.0, 1.5, 100))


def test_error_unknown_score_and_allocation():
    with pytest.raises(ValueError, match=r"unknown score 'magnitud'.*magnitude"):
        jp.prune(optax.adam(1e-3), sparsity=0.5, score="magnitud")
    with pytest.raises(ValueError, match=r"unknown allocation 'globl'.*global"):
        jp.prune(optax.adam(1e-3), sparsity=0.5, allocation="globl")
    with pytest.raises(TypeError, match="score must be"):
        jp.prune(optax.adam(1e-3), sparsity=0.5, score=3)


def test_error_where_selects_nothing():
    tx = jp.prune(optax.adam(1e-3), sparsity=0.5, where="conv")
    with pytest.raises(ValueError, match=r"where='conv' matches no leaf.*dense1/kernel"):
        tx.init(dict_params())
    tx = jp.prune(optax.adam(1e-3), sparsity=0.5)
    with pytest.raises(ValueError, match="selects no leaf"):
        tx.init({"w": jnp.zeros(3)})


def test_error_allocation_key_matches_nothing():
    tx = jp.prune(optax.adam(1e-3), sparsity=0.5, allocation={"conv.*": 0.3})
    with pytest.raises(ValueError, match=r"allocation key 'conv\.\*' matches no selected leaf"):
        tx.init(dict_params())


def test_error_update_every():
    with pytest.raises(ValueError, match="update_every"):
        jp.prune(optax.adam(1e-3), sparsity=0.5, update_every=0)


def test_error_integer_leaf_selected():
    tx = jp.prune(optax.adam(1e-3), sparsity=0.5, where="step")
    with pytest.raises(TypeError, match=r"'step' has dtype int32"):
        tx.init({"w": jnp.ones((2, 2)), "step": jnp.zeros((2, 2), jnp.int32)})


# ---------------------------------------------------------------- Flax and others


def test_flax_nnx_optimizer():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 32, rngs=rngs)
            self.l2 = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    tx = jp.prune(optax.adam(1e-2), sparsity=0.75, update_every=2)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jnp.arange(16) % 4

    @nnx.jit
    def step(model, opt):
        def lf(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        grads = nnx.grad(lf)(model)
        opt.update(model, grads)

    for _ in range(4):
        step(model, opt)
    assert int(jnp.sum(model.l1.kernel[...] != 0)) == 64
    assert int(jnp.sum(model.l2.kernel[...] != 0)) == 32
    masks = jp.get_masks(opt.opt_state)
    kept = [int(jnp.sum(m)) for m in jax.tree_util.tree_leaves(masks) if jnp.ndim(m)]
    assert sorted(kept) == [32, 64]


def test_flax_linen_train_state():
    import flax.linen as nn
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))

    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jnp.arange(16) % 4
    model = MLP()
    variables = model.init(jax.random.key(0), x)
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5, update_every=1, allocation="global")
    st = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

    @jax.jit
    def step(st):
        def lf(p):
            return optax.softmax_cross_entropy_with_integer_labels(st.apply_fn({"params": p}, x), y).mean()

        return st.apply_gradients(grads=jax.grad(lf)(st.params))

    for _ in range(3):
        st = step(st)
    k = [st.params["Dense_0"]["kernel"], st.params["Dense_1"]["kernel"]]
    assert sum(int(jnp.sum(w != 0)) for w in k) == (256 + 128) // 2


def test_equinox_style_module():
    import dataclasses

    @dataclasses.dataclass
    class Linear:
        weight: jax.Array
        bias: jax.Array

    jax.tree_util.register_dataclass(Linear, data_fields=["weight", "bias"], meta_fields=[])
    model = [Linear(jnp.arange(1.0, 17.0).reshape(4, 4), jnp.ones(4))]
    tx = jp.prune(optax.sgd(0.0), sparsity=0.25, update_every=1)
    s = tx.init(model)
    u, s = tx.update(jax.tree.map(jnp.zeros_like, model), s, model)
    model = optax.apply_updates(model, u)
    assert int(jnp.sum(model[0].weight != 0)) == 12
    assert jp.tree.paths(model) == ["0/weight", "0/bias"]


def test_error_scalar_leaf_selected():
    tx = jp.prune(optax.adam(1e-3), sparsity=0.5, where="w|scale")
    with pytest.raises(ValueError, match=r"scalar leaf 'scale'"):
        tx.init({"w": jnp.ones((2, 2)), "scale": jnp.ones(())})


def test_nnx_keep_masks_and_apply_masks_accept_other_containers():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    masks = jp.masks.topk(jp.scores.magnitude(params), 0.5)
    pure = nnx.to_pure_dict(masks)  # a plain dict: other containers, same paths
    pruned = jp.apply_masks(params, pure)
    assert jp.sparsity_of(pruned) == 0.5
    opt = nnx.Optimizer(model, optax.chain(optax.adam(1e-2), jp.keep_masks(pure)), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (16, 8))

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        opt.update(model, grads)

    step(model, opt)
    assert int(jnp.sum(model.l1.kernel[...] != 0)) == 64
    assert int(jnp.sum(model.l2.kernel[...] != 0)) == 32


def test_error_schedule_that_fails():
    def broken(step):
        raise RuntimeError("boom")

    with pytest.raises(ValueError, match=r"sparsity schedule failed when called on step 0.*boom"):
        jp.prune(optax.adam(1e-3), sparsity=broken)


class _Sched(NamedTuple):
    count: jax.Array
    masks: dict
    key: jax.Array
    inner_state: tuple


def _sched_state(params, inner):
    return _Sched(jnp.zeros((), jnp.int32), _transform_base.initial_masks(params, None),
                  _transform_base.seed_key(0), inner.init(params))


def test_scheduled_update_recomputes_on_update_steps_only():
    """The skeleton: new masks on update steps, the state's otherwise; the
    step trains with ``train`` when given; count + 1; the state's type kept."""
    params = {"w": jnp.arange(1.0, 5.0).reshape(2, 2)}
    inner = optax.sgd(0.0)
    state, calls = _sched_state(params, inner), []

    def recompute(s):
        m = {"w": params["w"] >= 3.0}
        return {"masks": m, "key": s.key + 1, "train": {"w": params["w"] >= 4.0}}

    def step(s, masks):
        calls.append(masks)
        return _transform_base.masked_update(inner, params, s.inner_state, params, masks)

    outs = []
    for _ in range(3):
        u, state = _transform_base.scheduled_update(
            "demo", inner, params, state, params, {}, is_update=lambda s: s.count == 1,
            recompute=recompute, fields=("masks", "key", "train"), step=step)
        outs.append((optax.apply_updates(params, u)["w"], state))
    assert type(state) is _Sched and int(state.count) == 3
    np.testing.assert_array_equal(outs[0][0], params["w"])  # step 0: all-True masks
    np.testing.assert_array_equal(outs[1][0], [[0.0, 0.0], [0.0, 4.0]])  # trained on `train`
    np.testing.assert_array_equal(outs[2][0], [[0.0, 0.0], [3.0, 4.0]])  # new masks kept
    assert outs[1][1].key.tolist() == (outs[0][1].key + 1).tolist()
    assert len(calls) == 3


def test_scheduled_update_names_unknown_fields():
    params = {"w": jnp.ones((2, 2))}
    inner = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"fields \['units'\] are not fields of _Sched"):
        _transform_base.scheduled_update(
            "demo", inner, params, _sched_state(params, inner), params, {},
            is_update=lambda s: True, recompute=lambda s: {}, fields=("masks", "units"))

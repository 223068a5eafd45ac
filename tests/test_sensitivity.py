"""jp.sensitivity and the layer-aware budgets of jp.allocation: curves equal a
plain loop of single-layer prunings; budgets meet their targets (exactly for
unstructured, within one unit's cost for structured); the solver beats
uniform where one layer is fragile; activation statistics; clear errors."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest
from jax import lax

import jaxprune as jp


def normal(i, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(i).standard_normal(shape), jnp.float32)


def raises(exc, *fragments):
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# --------------------------------------------------------------------------
# Models: a 1-D CNN with BatchNorm (inference form) and an MLP


def conv1d(x, k, stride=1):
    return lax.conv_general_dilated(x, k, (stride,), "SAME",
                                    dimension_numbers=("NWC", "WIO", "NWC"))


def cnn_variables(chans=(1, 8, 12, 16)):
    p, s = {}, {}
    for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
        p[f"conv{i}"] = normal(i, (3, a, b), 1 / np.sqrt(3 * a))
        p[f"bn{i}"] = {"scale": 1 + normal(10 + i, (b,), 0.1), "bias": normal(20 + i, (b,), 0.1)}
        s[f"bn{i}"] = {"mean": normal(30 + i, (b,), 0.1), "var": 1 + jnp.abs(normal(40 + i, (b,)))}
    p["head"] = {"w": normal(50, (chans[-1], 4)), "b": jnp.zeros(4)}
    return {"params": p, "stats": s}


def cnn(v, x):
    p, s = v["params"], v["stats"]
    h = x[..., None]
    for i in range(3):
        h = conv1d(h, p[f"conv{i}"], 2 if i == 1 else 1)
        h = (h - s[f"bn{i}"]["mean"]) * lax.rsqrt(s[f"bn{i}"]["var"] + 1e-5)
        h = jax.nn.relu(h * p[f"bn{i}"]["scale"] + p[f"bn{i}"]["bias"])
    return h.mean(axis=1) @ p["head"]["w"] + p["head"]["b"]


X = normal(99, (32, 20))
Y = jnp.arange(32) % 4


def cnn_loss(v):
    return optax.softmax_cross_entropy_with_integer_labels(cnn(v, X), Y).mean()


GROUP_LEVELS = (0.25, 0.5, 0.75, 0.9)


@functools.lru_cache(maxsize=1)
def cnn_scan():
    """The CNN, its graph and its group curves (shared by several tests)."""
    v = cnn_variables()
    g = jp.graph.trace(cnn, v, X)
    curves = jp.sensitivity.scan(cnn_loss, v, levels=GROUP_LEVELS, granularity="group",
                                 graph=g, batch_size=4)
    return v, g, curves


def mlp_params():
    return {"l0": {"w": normal(1, (6, 16)), "b": normal(2, (16,))},
            "l1": {"w": normal(3, (16, 12)), "b": normal(4, (12,))},
            "l2": {"w": normal(5, (12, 3)), "b": normal(6, (3,))}}


def mlp(p, x):
    h = jax.nn.relu(x @ p["l0"]["w"] + p["l0"]["b"])
    h = jax.nn.relu(h @ p["l1"]["w"] + p["l1"]["b"])
    return h @ p["l2"]["w"] + p["l2"]["b"]


XM = normal(7, (24, 6))


def mlp_metric(p):
    return jnp.mean((mlp(p, XM) - mlp(mlp_params(), XM)) ** 2) + jnp.mean(mlp(p, XM) ** 2)


# --------------------------------------------------------------------------
# Curves equal a plain loop


def test_leaf_curves_equal_a_loop_of_single_leaf_prunings():
    params = mlp_params()
    levels = (0.0, 0.3, 0.5, 0.9, 1.0)
    curves = jp.sensitivity.scan(mlp_metric, params, levels=levels)
    assert curves.names == ("l0/w", "l1/w", "l2/w")
    assert curves.evaluations == 1 + 3 * len(levels)
    metric = jax.jit(mlp_metric)
    for row, path in zip(curves.values, curves.names):
        for v, s in zip(row, levels):
            layer, _ = path.split("/")
            w = np.asarray(params[layer]["w"])
            keep = oracle.topk_leaf(np.abs(w), oracle.keep_count(w.size, s))
            pruned = {**params, layer: {**params[layer], "w": jnp.asarray(np.where(keep, w, 0))}}
            np.testing.assert_allclose(v, float(metric(pruned)), rtol=1e-5)
    assert curves.base == pytest.approx(float(mlp_metric(params)), rel=1e-6)
    tree = curves.tree()
    assert tree["l0"]["b"] is None and tree["l1"]["w"].shape == (len(levels),)
    assert "l1/w" in curves.table()


def test_group_curves_equal_a_loop_of_single_group_prunings():
    v, g, curves = cnn_scan()
    levels = GROUP_LEVELS
    assert curves.names == tuple(grp.name for grp in g.prunable)
    scores = jp.structured.scores(g, v)
    loss = jax.jit(lambda v, m: cnn_loss(jp.apply_masks(v, m)))
    for name, row in zip(curves.names, curves.values):
        for val, s in zip(row, levels):
            want = float(loss(v, jp.structured.masks(g, scores, s, groups=[name])))
            np.testing.assert_allclose(val, want, rtol=1e-5, atol=1e-6)


def test_scan_accepts_custom_scores():
    params = mlp_params()
    scores = jax.tree.map(lambda w: -jnp.abs(w), params)  # prune the largest first
    curves = jp.sensitivity.scan(mlp_metric, params, levels=(0.5,), where="l1/w", scores=scores)
    w = np.asarray(params["l1"]["w"])
    keep = oracle.topk_leaf(-np.abs(w), oracle.keep_count(w.size, 0.5))
    pruned = {**params, "l1": {**params["l1"], "w": jnp.asarray(np.where(keep, w, 0))}}
    np.testing.assert_allclose(curves.values[0, 0], float(mlp_metric(pruned)), rtol=1e-5)


# --------------------------------------------------------------------------
# Budgets meet their targets


def test_unstructured_budget_is_exact_in_weights_kept():
    params = mlp_params()
    curves = jp.sensitivity.scan(mlp_metric, params, levels=(0.2, 0.5, 0.8, 0.95))
    n = sum(int(np.size(params[k]["w"])) for k in params)
    for s in (0.1, 0.37, 0.6, 0.77):
        rates = jp.allocation.from_sensitivity(curves, s)
        kept = sum(jp.select.keep_count(int(np.size(params[k]["w"])), rates[k]["w"])
                   for k in params)
        assert kept == round(n * (1 - s))
        assert curves.cost(rates) == pytest.approx(kept / n)
    masks = jax.jit(jp.masks.topk)(jp.scores.magnitude(params), rates)  # the same via topk
    assert sum(int(np.sum(masks[k]["w"])) for k in params) == kept


def test_unstructured_budget_callable_under_jit_with_a_schedule():
    params = mlp_params()
    curves = jp.sensitivity.scan(mlp_metric, params, levels=(0.25, 0.5, 0.75, 0.95))
    alloc = jp.allocation.from_sensitivity(curves)
    sched = optax.linear_schedule(0.0, 0.7, 4)
    tx = jp.prune(optax.sgd(0.0), sparsity=sched, allocation=alloc, update_every=1)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p))
    n = sum(int(np.size(params[k]["w"])) for k in params)
    for i in range(5):
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
        kept = sum(int(np.sum(jp.get_masks(state)[k]["w"])) for k in params)
        assert kept == jp.select.keep_count(n, float(np.float32(sched(i))))
    # The traced solution equals the host one.
    host = jp.allocation.from_sensitivity(curves, 0.7)
    traced = jax.jit(alloc)(params, 0.7)
    for k in params:
        assert float(traced[k]["w"]) == pytest.approx(host[k]["w"], abs=1e-6)


def test_unstructured_flops_budget_weighs_macs():
    params = mlp_params()
    g = jp.graph.trace(mlp, params, XM)
    curves = jp.sensitivity.scan(mlp_metric, params, levels=(0.25, 0.5, 0.75, 0.95), graph=g)
    rates = jp.allocation.from_sensitivity(curves, 0.5, cost="flops")
    macs = {k: g.leaf(f"{k}/w").macs for k in params}
    kept = sum(macs[k] * (1 - rates[k]["w"]) for k in params)
    per_weight = max(macs[k] / np.size(params[k]["w"]) for k in params)
    assert 0.5 * sum(macs.values()) - per_weight <= kept <= 0.5 * sum(macs.values()) + 1e-6


def compacted_cost(g, fn, v, masks, x):
    small = jp.structured.compact(g, v, masks)
    params = sum(int(np.size(a)) for a in jax.tree.leaves(small["params"]))
    return params, jp.graph.trace(fn, small, x).macs


def test_cost_model_counts_what_compaction_removes():
    v, g, curves = cnn_scan()
    rates = {curves.names[0]: 0.5, curves.names[2]: 0.25}
    masks = jp.structured.masks(g, jp.structured.scores(g, v), rates)
    p, macs = compacted_cost(g, cnn, v, masks, X)
    assert curves.model("params").dense == sum(np.size(a) for a in jax.tree.leaves(v["params"]))
    assert curves.model("flops").dense == g.macs
    assert curves.cost(rates, "params") * curves.model("params").dense == p
    assert curves.cost(rates, "flops") * g.macs == macs


@pytest.mark.parametrize("cost", ["params", "flops"])
def test_structured_budgets_within_one_unit(cost):
    v, g, curves = cnn_scan()
    model = curves.model(cost)
    unit = model.unit_costs(curves.sizes).max()
    scores = jp.structured.scores(g, v)
    budgets = {
        "sensitivity": lambda s: jp.allocation.from_sensitivity(curves, s, cost=cost),
        "uniform": lambda s: jp.allocation.uniform_budget(g, s, cost=cost),
        "global": lambda s: jp.allocation.global_budget(g, scores, s, cost=cost),
    }
    for name, make in budgets.items():
        for s in (0.3, 0.5, 0.7):
            rates = make(s)
            kept = jp.structured.kept_units(g, jp.structured.masks(g, scores, rates))
            counts = [int(kept[grp.index].sum()) if grp.index in kept else grp.size
                      for grp in g.prunable]
            got = model(np.array(counts))
            assert got == pytest.approx(curves.cost(rates, cost) * model.dense)
            target = (1 - s) * model.dense
            assert got <= target + 1e-6, (name, s)
            if name != "uniform":  # one rate for all groups moves in steps of several units
                assert target - got < unit, (name, s, target - got, unit)


def fragile_model():
    """Two equal kernels; the metric punishes zeros in ``fragile`` 20x more."""
    w = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (16, 16)), jnp.float32)
    params = {"fragile": w, "robust": w}

    def metric(p):
        lost = lambda a, b: jnp.sum(jnp.abs(a - b))  # noqa: E731
        return 20 * lost(p["fragile"], w) + lost(p["robust"], w)

    return params, metric


def prune_np(params, rates):
    out = {}
    for k, w in params.items():
        w = np.asarray(w)
        out[k] = jnp.asarray(np.where(oracle.topk_leaf(np.abs(w), oracle.keep_count(
            w.size, rates[k])), w, 0))
    return out


def test_solver_beats_uniform_when_one_layer_is_fragile():
    params, metric = fragile_model()
    curves = jp.sensitivity.scan(metric, params, levels=(0.2, 0.4, 0.6, 0.8, 0.95))
    for s in (0.3, 0.45):
        rates = jp.allocation.from_sensitivity(curves, s)
        aware = float(metric(prune_np(params, rates)))
        uniform = float(metric(prune_np(params, {k: s for k in params})))
        assert rates["fragile"] < s < rates["robust"]
        assert aware < 0.5 * uniform


def test_structured_solver_beats_uniform_when_one_group_is_fragile():
    """An MLP whose first hidden layer feeds the output through large weights."""
    p = mlp_params()
    p["l1"]["w"] = p["l1"]["w"] * 0.05
    p["l2"]["w"] = p["l2"]["w"] * 20
    g = jp.graph.trace(mlp, p, XM)
    ref = mlp(p, XM)
    metric = lambda q: jnp.mean((mlp(q, XM) - ref) ** 2)  # noqa: E731
    curves = jp.sensitivity.scan(metric, p, levels=(0.25, 0.5, 0.75), granularity="group",
                                 graph=g)
    scores = jp.structured.scores(g, p)
    aware = jp.allocation.from_sensitivity(curves, 0.4, cost="params")
    uni = jp.allocation.uniform_budget(g, 0.4, cost="params")
    m_aware = float(metric(jp.apply_masks(p, jp.structured.masks(g, scores, aware))))
    m_uni = float(metric(jp.apply_masks(p, jp.structured.masks(g, scores, uni))))
    assert m_aware < m_uni


def test_adaptive_allocation_in_prune_is_exact_and_follows_the_metric():
    params, metric = fragile_model()
    alloc = jp.sensitivity.adaptive(metric, levels=(0.2, 0.4, 0.6, 0.8, 0.95))
    tx = jp.prune(optax.sgd(0.0), sparsity=0.4, allocation=alloc, update_every=1)
    u, state = jax.jit(tx.update)(params, tx.init(params), params)
    masks = jp.get_masks(state)
    assert int(masks["fragile"].sum() + masks["robust"].sum()) == round(512 * 0.6)
    assert int(masks["fragile"].sum()) > int(masks["robust"].sum())


# --------------------------------------------------------------------------
# Contribution and activation budgets


def test_unit_stats_match_a_direct_computation():
    p = mlp_params()
    g = jp.graph.trace(mlp, p, XM)
    y = jnp.arange(24) % 3

    def loss_of(out):
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    st = jp.sensitivity.unit_stats(g, mlp, p, XM, loss_fn=loss_of)
    h0 = jax.nn.relu(XM @ p["l0"]["w"] + p["l0"]["b"])
    by_name = {grp.name: grp.index for grp in g.groups}
    i0 = by_name["l0/w:1"]
    np.testing.assert_allclose(st["apoz"][i0], np.mean(np.asarray(h0) == 0, axis=0), rtol=1e-6)
    np.testing.assert_allclose(st["activity"][i0], 1 - st["apoz"][i0])

    def loss_h0(h):
        h1 = jax.nn.relu(h @ p["l1"]["w"] + p["l1"]["b"])
        return loss_of(h1 @ p["l2"]["w"] + p["l2"]["b"])

    gh = jax.grad(loss_h0)(h0)
    np.testing.assert_allclose(st["taylor"][i0], np.mean(np.abs(h0 * gh), axis=0), rtol=1e-4,
                               atol=1e-7)


def test_contribution_curves_give_budgets():
    v, g, _ = cnn_scan()
    st = jp.sensitivity.unit_stats(g, cnn, v, X, loss_fn=lambda o: optax.
                                   softmax_cross_entropy_with_integer_labels(o, Y).mean())
    for key in ("activity", "taylor"):
        curves = jp.sensitivity.from_scores(st[key], levels=(0.25, 0.5, 0.75, 0.9), graph=g)
        assert np.all(np.diff(curves.damage(), axis=1) >= -1e-6)
        rates = jp.allocation.from_sensitivity(curves, 0.5, cost="flops")
        assert curves.cost(rates, "flops") <= 0.5 + 1e-9
    one = jp.sensitivity.from_scores(st["taylor"], levels=(0.5,), graph=g, groups="conv1")
    assert one.names == ("params/conv1:2",)
    # Unstructured: saliency scores make leaf curves.
    p = mlp_params()
    grads = jax.grad(mlp_metric)(p)
    curves = jp.sensitivity.from_scores(jp.scores.saliency(p, grads), p, levels=(0.5, 0.9))
    rates = jp.allocation.from_sensitivity(curves, 0.6)
    assert curves.cost(rates) == pytest.approx(0.4, abs=1e-2)


# --------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("bad", [(), (0.5, 1.5), (-0.1,), (0.5, 0.2), (0.3, 0.3),
                                 (float("nan"),), [[0.1, 0.2]]])
def test_bad_levels(bad):
    with raises(ValueError, "levels"):
        jp.sensitivity.scan(mlp_metric, mlp_params(), levels=bad)


def test_levels_not_numbers():
    with raises(TypeError, "levels", "'many'"):
        jp.sensitivity.scan(mlp_metric, mlp_params(), levels="many")


def test_non_scalar_metric():
    with raises(ValueError, "metric_fn", "scalar", "(24, 3)", ".mean()"):
        jp.sensitivity.scan(lambda p: mlp(p, XM), mlp_params())


def test_impossible_budgets():
    params = mlp_params()
    curves = jp.sensitivity.scan(mlp_metric, params, levels=(0.5, 0.8))
    with raises(ValueError, "cannot be met", "0.8", "higher levels"):
        jp.allocation.from_sensitivity(curves, 0.9)
    with raises(ValueError, "flops", "graph="):
        jp.allocation.from_sensitivity(curves, 0.5, cost="flops")
    with raises(ValueError, "cost must be one of", "'macs'"):
        jp.allocation.from_sensitivity(curves, 0.5, cost="macs")
    v, g, gc = cnn_scan()
    with raises(ValueError, "budget cannot be met", "last scanned level"):
        jp.allocation.from_sensitivity(gc, 0.97)
    with raises(ValueError, "budget cannot be met", "one unit per group"):
        jp.allocation.uniform_budget(g, 0.999, cost="flops")
    with raises(ValueError, "group curves need a sparsity"):
        jp.allocation.from_sensitivity(gc)


def test_granularity_errors():
    with raises(ValueError, "granularity", "'layer'"):
        jp.sensitivity.scan(mlp_metric, mlp_params(), granularity="layer")
    with raises(ValueError, "graph="):
        jp.sensitivity.scan(mlp_metric, mlp_params(), granularity="group")


def test_group_budgets_plug_into_structured_prune():
    """A {group: sparsity} budget is accepted by jp.structured.prune as its
    sparsity and gives, on the same variables, structured.masks' masks; an
    unknown group name is an error that lists the names."""
    v, g, curves = cnn_scan()
    rates = jp.allocation.from_sensitivity(curves, 0.5, cost="flops")
    scores = jp.structured.scores(g, v)
    want = jp.structured.masks(g, scores, rates)
    tx = jp.structured.prune(optax.sgd(0.0), graph=g, sparsity=rates, update_every=1)
    zero = jax.tree.map(jnp.zeros_like, v)
    _, state = jax.jit(tx.update)(zero, tx.init(v), v)
    got = jp.get_masks(state)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.broadcast_to(a, np.shape(b)), b,
                                      err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="name no group"):
        jp.structured.prune(optax.sgd(0.0), graph=g, sparsity={"no such group": 0.5})
    with pytest.raises(ValueError, match="takes one sparsity"):
        jp.structured.prune(optax.sgd(0.0), graph=g, sparsity=rates, allocation="global")


def test_where_chooses_leaves_and_groups_chooses_groups():
    """where= selects leaves, groups= selects groups; the old where= for groups
    warns, and a groups= on leaf curves is an error."""
    p = mlp_params()
    g = jp.graph.trace(mlp, p, XM)
    name = g.prunable[0].name
    new = jp.sensitivity.scan(mlp_metric, p, levels=(0.5,), granularity="group", graph=g,
                              groups=[name])
    with pytest.warns(DeprecationWarning, match=r"scan\(groups=...\)"):
        old = jp.sensitivity.scan(mlp_metric, p, levels=(0.5,), granularity="group", graph=g,
                                  where=[name])
    assert new.names == old.names == (name,)
    np.testing.assert_array_equal(new.values, old.values)
    with pytest.raises(ValueError, match="groups= chooses graph groups"):
        jp.sensitivity.scan(mlp_metric, p, levels=(0.5,), groups=[name])
    with pytest.warns(DeprecationWarning, match=r"levels=, where="):
        jp.sensitivity.scan(mlp_metric, p, (0.5,), None)

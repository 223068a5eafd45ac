"""jp.search: both agents improve their reward on a toy problem with a known
best allocation; every candidate meets the budget (within one unit's cost);
clear errors."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp

SHAPES = [(10, 20), (20, 10), (20, 20), (40, 10)]
FRAGILITY = np.array([4.0, 1.0, 2.0, 1.0])


@functools.lru_cache(maxsize=1)
def toy():
    """Four leaves; the metric is -sum_l c_l s_l^2 (s_l: the leaf's fraction
    of zeros). Under sum_l n_l s_l = S N the best budget is s_l proportional
    to n_l / c_l (capped at max_sparsity)."""
    rng = np.random.default_rng(0)
    params = {f"l{i}": jnp.asarray(rng.uniform(0.5, 1.5, s), jnp.float32)
              for i, s in enumerate(SHAPES)}

    def metric(p):
        return -sum(c * jnp.mean(p[f"l{i}"] == 0) ** 2 for i, c in enumerate(FRAGILITY))

    return params, metric


def optimum(sparsity, cap):
    n = np.array([np.prod(s) for s in SHAPES], float)
    lo, hi = 0.0, 1e3
    for _ in range(100):
        lam = (lo + hi) / 2
        s = np.minimum(lam * n / FRAGILITY / n.sum(), cap)
        lo, hi = (lam, hi) if (s * n).sum() < sparsity * n.sum() else (lo, lam)
    return s, -(FRAGILITY * s ** 2).sum()


@pytest.mark.parametrize("agent", ["es", "ddpg"])
def test_agent_improves_towards_the_known_best_allocation(agent):
    params, metric = toy()
    best_s, best_metric = optimum(0.5, 0.8)
    uniform = -(FRAGILITY * 0.25).sum()
    res = jp.search(metric, params, 0.5, granularity="leaf", cost="params", agent=agent,
                    higher_is_better=True,
                    iterations=15, population=16, max_sparsity=0.8, seed=0)
    assert res.evaluations == 15 * 16 and len(res.curve) == 15
    # The curve is a running best: its end is the returned budget's metric,
    # measured again here, and it rose after the first iteration.
    masks = jp.masks.topk(jp.scores.magnitude(params), res.budget)
    assert res.curve[-1] == res.metric
    assert float(metric(jp.apply_masks(params, masks))) == pytest.approx(res.metric, rel=1e-6)
    assert res.curve[-1] > res.curve[0]
    assert res.mean[-1] > res.mean[0]  # the policy itself improves
    assert res.metric > uniform + 0.5 * (best_metric - uniform)
    assert res.metric >= best_metric - 0.05
    n = np.array([np.prod(s) for s in SHAPES])
    assert int(res.kept.sum()) == round(n.sum() * 0.5)  # params budget met exactly
    rates = np.array([res.budget[f"l{i}"] for i in range(4)])
    assert np.abs(rates - best_s).max() < 0.15


def test_structured_search_meets_the_flops_budget_within_one_unit():
    from test_sensitivity import XM, mlp, mlp_metric, mlp_params

    p = mlp_params()
    g = jp.graph.trace(mlp, p, XM)
    res = jp.search(mlp_metric, p, 0.5, graph=g, granularity="group", cost="flops",
                    iterations=2, population=4)
    from jaxprune.budgets import cost as _budget

    model = _budget.graph_model(g, list(g.prunable), "flops")
    unit = model.unit_costs(np.array([grp.size for grp in g.prunable])).max()
    kept = model(res.kept)
    assert kept <= 0.5 * g.macs + 1e-6 and 0.5 * g.macs - kept < unit
    assert res.cost == pytest.approx(kept / g.macs)
    masks = jp.structured.masks(g, jp.structured.scores(g, p), res.budget)
    assert float(mlp_metric(jp.apply_masks(p, masks))) == pytest.approx(res.metric, rel=1e-5)


def test_search_errors():
    params, metric = toy()
    with pytest.raises(ValueError, match="agent must be one of"):
        jp.search(metric, params, 0.5, granularity="leaf", cost="params", agent="ppo")
    with pytest.raises(ValueError, match="budget cannot be met.*max_sparsity=0.5"):
        jp.search(metric, params, 0.7, granularity="leaf", cost="params", max_sparsity=0.5)
    with pytest.raises(ValueError, match="needs graph="):
        jp.search(metric, params, 0.5, granularity="leaf", cost="flops")
    with pytest.raises(ValueError, match="scalar"):
        jp.search(lambda p: p["l0"], params, 0.5, granularity="leaf", cost="params")

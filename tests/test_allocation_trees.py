"""Per-leaf allocation trees (what from_sensitivity returns) wherever a regex
map is accepted, and the allocation registry shared with structured.masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp


def params():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {"fragile": {"kernel": jax.random.normal(k1, (10, 10))},
            "robust": {"kernel": jax.random.normal(k2, (10, 10)), "bias": jnp.ones(10)},
            "robustness": {"kernel": jax.random.normal(k3, (10, 10))}}


def sparsity(masks, path):
    leaf = masks
    for k in path.split("/"):
        leaf = leaf[k]
    return 1.0 - float(np.mean(np.asarray(leaf)))


@pytest.fixture(scope="module")
def rates():
    p = params()
    metric = lambda q: (10 * jnp.sum(q["fragile"]["kernel"] == 0)  # noqa: E731
                        + jnp.sum(q["robust"]["kernel"] == 0) + jnp.sum(q["robustness"]["kernel"] == 0))
    curves = jp.sensitivity.scan(metric, p, levels=(0.5, 0.9))
    return jp.allocation.from_sensitivity(curves, 0.6)


def test_from_sensitivity_output_is_a_tree(rates):
    assert rates["fragile"]["kernel"] == 0.0
    assert rates["robust"]["kernel"] == rates["robustness"]["kernel"] == 0.9


@pytest.mark.parametrize("make", [
    lambda a: jp.prune(optax.sgd(0.0), sparsity=0.5, allocation=a, update_every=1),
    lambda a: jp.lottery_ticket(optax.sgd(0.0), rounds=1, steps_per_round=1, allocation=a),
    lambda a: jp.set_training(optax.sgd(0.0), sparsity=0.5, allocation=a),
    lambda a: jp.rigl(optax.sgd(0.0), sparsity=0.5, allocation=a),
], ids=["prune", "lottery_ticket", "set_training", "rigl"])
def test_transforms_take_the_tree(make, rates):
    p = params()
    tx = make(rates)
    state = tx.init(p)
    for _ in range(2):
        _, state = jax.jit(tx.update)(p, state, p)
    m = jp.get_masks(state)
    assert sparsity(m, "fragile/kernel") == 0.0
    assert sparsity(m, "robust/kernel") == pytest.approx(0.9)
    assert sparsity(m, "robustness/kernel") == pytest.approx(0.9)
    assert np.ndim(m["robust"]["bias"]) == 0


def test_snip_and_the_mask_functions_take_the_tree(rates):
    p = params()
    loss = lambda q, b: jnp.sum(jax.tree.leaves(q)[0] ** 2) + sum(  # noqa: E731
        jnp.sum(x) for x in jax.tree.leaves(q))
    for m in (jp.snip(loss, p, None, sparsity=0.5, allocation=rates),
              jp.allocation.masks(jp.scores.magnitude(p), 0.5, rates),
              jp.allocation.random_masks(jax.random.key(1), p, 0.5, rates)):
        assert [sparsity(m, k) for k in ("fragile/kernel", "robust/kernel")] == \
            pytest.approx([0.0, 0.9])
    assert jp.allocation.sparsities(p, 0.5, rates) == rates


def test_exact_names_and_none_leaves_the_rest_to_sparsity():
    p = params()
    tree = {"fragile": None, "robust": 0.2, "robustness": {"kernel": 0.7}}
    s = jp.allocation.sparsities(p, 0.5, tree)
    assert s["fragile"]["kernel"] == 0.5 and s["robust"]["kernel"] == 0.2
    assert s["robustness"]["kernel"] == 0.7  # a regex "robust" would also have matched it
    assert jp.allocation.sparsities(p, 0.5, {"robust": 0.2})["robustness"]["kernel"] == 0.2


def test_schedules_in_the_tree_follow_the_step():
    p = params()
    tree = {"fragile": optax.linear_schedule(0.0, 0.2, 10), "robust": None, "robustness": None}
    tx = jp.prune(optax.sgd(0.0), sparsity=0.5, allocation=tree, update_every=1)
    state = tx.init(p)
    for _ in range(11):
        _, state = jax.jit(tx.update)(p, state, p)
    m = jp.get_masks(state)
    assert sparsity(m, "fragile/kernel") == pytest.approx(0.2)
    assert sparsity(m, "robust/kernel") == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"'fragile/kernel' a schedule.*step="):
        jp.allocation.sparsities(p, 0.5, tree)


def test_tree_errors():
    p = params()
    with pytest.raises(ValueError, match=r"not a prefix tree of the parameters.*from_sensitivity"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, allocation={"fragile": {"kernel": 0.1}}).init(p)
    with pytest.raises(ValueError, match=r"allocation\['robust/kernel'\].*\[0, 1\]"):
        jp.prune(optax.sgd(0.1), sparsity=0.5,
                 allocation={"fragile": 0.1, "robust": {"kernel": 1.5, "bias": 0.0}})
    with pytest.raises(TypeError, match="allocation must be one of"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, allocation=0.5)


def test_a_registered_allocation_serves_masks_and_structured_masks():
    p = {"a": jax.random.normal(jax.random.key(0), (4, 8)),
         "c": jax.random.normal(jax.random.key(1), (8, 2))}
    f = lambda q, x: jnp.tanh(x @ q["a"]) @ q["c"]  # noqa: E731
    g = jp.graph.trace(f, p, jnp.ones((1, 4)))
    half = jp.allocation.Allocation(
        "half_test", sparsities=lambda params, s, where, layers, axis: [
            s / 2 for _ in jax.tree.leaves(params)],
        units=lambda scores, sp: [jnp.int32(sc.shape[-1] - round(sc.shape[-1] * s / 2))
                                  for sc, s in zip(scores, sp)])
    jp.allocation.register(half)
    try:
        assert "half_test" in jp.allocation.NAMES
        m = jp.allocation.masks(jp.scores.magnitude(p), 0.5, "half_test")
        assert int(m["a"].sum()) == 24
        sm = jp.structured.masks(g, jp.structured.scores(g, p), 1.0, allocation="half_test")
        assert int(sm["a"].any(axis=0).sum()) == 4
    finally:
        jp.allocation.REGISTRY.pop("half_test")


def test_registry_errors():
    with pytest.raises(ValueError, match=r"'erk' has no structured form.*'uniform', 'global'"):
        p = {"a": jnp.ones((4, 8)), "c": jnp.ones((8, 2))}
        g = jp.graph.trace(lambda q, x: jnp.tanh(x @ q["a"]) @ q["c"], p, jnp.ones((1, 4)))
        jp.structured.masks(g, jp.structured.scores(g, p), 0.5, allocation="erk")
    with pytest.raises(TypeError, match="structured.masks: allocation must be a name"):
        jp.structured.masks(g, jp.structured.scores(g, p), 0.5, allocation={"a": 0.5})
    with pytest.raises(ValueError, match="needs sparsities= or masks="):
        jp.allocation.register(jp.allocation.Allocation("nothing"))
    with pytest.raises(TypeError, match="register takes an Allocation"):
        jp.allocation.register("uniform")
    with pytest.raises(ValueError, match=r"unknown allocation 'unifrm'"):
        jp.allocation.sparsities({"w": jnp.ones((4, 4))}, 0.5, "unifrm")

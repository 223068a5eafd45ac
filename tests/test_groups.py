"""One group selector (``groups=``): the same rules in structured.masks, the
regularizers, sensitivity, search and the budget functions."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp


@functools.lru_cache(maxsize=1)
def mlp():
    p = {f"l{i}": {"w": jnp.asarray(np.random.default_rng(i).normal(size=s), jnp.float32)}
         for i, s in enumerate([(4, 8), (8, 6), (6, 2)])}

    def apply(p, x):
        return jnp.tanh(jnp.tanh(x @ p["l0"]["w"]) @ p["l1"]["w"]) @ p["l2"]["w"]

    return p, jp.graph.trace(apply, p, jnp.ones((1, 4))), apply


SPELLINGS = [
    ("^l1/", ["l1/w:1"]),
    (lambda g: g.size == 8, ["l0/w:1"]),
    (["l1/w:1", "l0/w:1"], ["l1/w:1", "l0/w:1"]),
    ({"l0/w:1": True, "l1/w:1": False}, ["l0/w:1"]),
    (None, ["l0/w:1", "l1/w:1"]),
]


@pytest.mark.parametrize("groups, want", SPELLINGS)
def test_every_spelling_chooses_the_same_groups_everywhere(groups, want):
    p, g, apply = mlp()
    assert [x.name for x in jp.graph.choose_groups(g, groups, what="t")] == want
    aligned = [x.name in want for x in g.groups]
    assert [x.name for x in jp.graph.choose_groups(g, aligned, what="t")] == sorted(
        want, key=[x.name for x in g.groups].index)
    masks = jp.structured.masks(g, jp.structured.scores(g, p), 0.5, groups=groups)
    # a group "lX/w:1" removes output columns of lX (and input rows of the next)
    pruned = {k for k in ("l0", "l1") if bool(np.any(~np.asarray(masks[k]["w"]).any(0)))}
    assert pruned == {n.split("/")[0] for n in want}
    assert set(jp.allocation.uniform_budget(g, 0.3, groups=groups)) == set(want)
    curves = jp.sensitivity.scan(lambda q: jnp.sum(apply(q, jnp.ones((1, 4)))), p, levels=(0.5,),
                                 granularity="group", graph=g, groups=groups)
    assert sorted(curves.names) == sorted(want)
    tx = jp.regularizers.group_lasso(g, 1.0, learning_rate=1.0, groups=groups)
    u, _ = tx.update(jax_zeros(p), tx.init(p), p)
    touched = {k for k in p if float(jnp.abs(u[k]["w"]).sum()) > 0}
    assert {n.split("/")[0] for n in want} <= touched


def jax_zeros(p):
    return {k: {"w": jnp.zeros_like(v["w"])} for k, v in p.items()}


@pytest.mark.parametrize("groups, match", [
    (["nope"], "no group 'nope'"),
    ([7], "no group 7"),
    (["l2/w:1"], "cannot be pruned"),
    ("^zzz", "chose no prunable group"),
    ([True, False], "2 bools for"),
    ({"l0/w:1": 1}, "maps group names to bools"),
])
def test_choose_groups_errors_name_the_problem(groups, match):
    _, g, _ = mlp()
    with pytest.raises((ValueError, TypeError), match=match):
        jp.graph.choose_groups(g, groups, what="structured.masks")


def test_structured_scores_have_a_registry_like_unstructured_ones():
    p, g, _ = mlp()
    assert set(jp.structured.SCORES) <= set(jp.structured.score_names())
    jp.structured.register_score("l2_squared", jp.structured.UnitScore(jnp.square))
    assert "l2_squared" in jp.structured.score_names()
    got = jp.structured.scores(g, p, "l2_squared")
    want = jp.structured.scores(g, p, "l2")
    for a, b in zip(got, want):
        if b is not None:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b) ** 2, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown score 'nope'.*l2_squared"):
        jp.structured.scores(g, p, "nope")
    with pytest.raises(TypeError, match="needs a UnitScore"):
        jp.structured.register_score("bad", jnp.square)

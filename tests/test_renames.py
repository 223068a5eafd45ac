"""The settled names, the calling conventions, and the deprecated aliases:
every old name still works, warns with DeprecationWarning and says the new
name (CHANGELOG.md lists them)."""

from __future__ import annotations

import importlib
import inspect

import jax
import jax.numpy as jnp
import optax
import pytest
from harness import assert_trees_equal

import jaxprune as jp


def _params():
    return {"a": {"kernel": jnp.arange(1.0, 13.0).reshape(3, 4), "bias": jnp.ones(4)},
            "c": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2), "bias": jnp.ones(2)}}


# --------------------------------------------------------------------------
# Deprecated aliases


def test_deprecated_functions_warn_and_match_the_new_ones():
    p, key = _params(), jax.random.key(0)
    masks = jp.masks.topk(p, 0.5)
    cases = [
        ("jaxprune.sparsity_of", lambda: jp.sparsity(p), lambda: jp.sparsity_of(p)),
        ("jaxprune.tree.flags", lambda: jp.tree.select(p), lambda: jp.tree.flags(p)),
        ("jaxprune.apply_masks_ste", lambda: jp.straight_through(p, masks),
         lambda: jp.apply_masks_ste(p, masks)),
        ("jaxprune.allocation.random_masks",
         lambda: jp.dynamic.random_masks(key, p, 0.5, "uniform"),
         lambda: jp.allocation.random_masks(key, p, 0.5, allocation="uniform")),
        ("jaxprune.masks.random_like", lambda: jp.lottery.random_mask(key, masks),
         lambda: jp.masks.random_like(key, masks)),
        ("jaxprune.allocation.sparsities", lambda: jp.allocation.per_leaf("erk", p, 0.5),
         lambda: jax.tree.leaves(jp.allocation.sparsities(p, 0.5, allocation="erk"))),
        ("jaxprune.allocation.masks",
         lambda: jp.allocation.compute_masks(p, 0.5, "global", None, p),
         lambda: jp.allocation.masks(p, 0.5, allocation="global", params=p)),
        ("jaxprune.scores.random(params, key=key)", lambda: jp.scores.random(key, p),
         lambda: jp.scores.random(p, key=key)),
    ]
    for new, old_call, new_call in cases:
        with pytest.warns(DeprecationWarning, match=new.replace("(", r"\(").replace(")", r"\)")):
            old = old_call()
        assert_trees_equal(old, new_call())


def test_deprecated_ste_keeps_its_old_signature():
    p = _params()
    with pytest.warns(DeprecationWarning, match="jaxprune.ste_training"):
        old = jp.ste(optax.sgd(0.1), 0.5, 1)
    new = jp.ste_training(optax.sgd(0.1), sparsity=0.5, update_every=1)
    g = jax.tree.map(jnp.ones_like, p)
    assert_trees_equal(old.update(g, old.init(p), p), new.update(g, new.init(p), p))


def test_deprecated_dynamic_random_masks_keeps_erk_default():
    p, key = _params(), jax.random.key(1)
    with pytest.warns(DeprecationWarning):
        old = jp.dynamic.random_masks(key, p, 0.5)
    assert_trees_equal(old, jp.allocation.random_masks(key, p, 0.5, allocation="erk"))


def test_snip_module_moved_to_at_init():
    assert callable(jp.snip) and jp.snip is jp.at_init.snip
    assert jp.at_init.snip_scores is importlib.import_module("jaxprune.at_init").snip_scores
    with pytest.warns(DeprecationWarning, match="jaxprune.at_init.snip_scores"):
        from jaxprune.snip import snip_scores
    assert snip_scores is jp.at_init.snip_scores
    assert callable(jp.snip)  # importing the old module did not replace the function


@pytest.mark.parametrize("old, new, name", [
    ("jaxprune.search", "jaxprune.agents", "SearchResult"),
    ("jaxprune.transform_base", "jaxprune.train.base", "check_positive_int"),
    ("jaxprune.deprecation", "jaxprune._deprecation", "alias"),
])
def test_old_module_paths_warn_and_name_the_new_module(old, new, name):
    with pytest.warns(DeprecationWarning, match=f"{new}.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)
    assert callable(jp.search) and jp.search is jp.agents.search  # the function stays


DEPRECATED = {"jaxprune": ("sparsity", "ste", "straight_through", "transform_base",
                           "deprecation"),
              "jaxprune.masks": ("sparsity",), "jaxprune.tree": ("select",),
              "jaxprune.lottery": ("random_mask",),
              "jaxprune.dynamic": ("ste", "straight_through", "random_masks"),
              "jaxprune.allocation": ("per_leaf", "compute_masks")}


@pytest.mark.parametrize("module", sorted(DEPRECATED))
def test_deprecated_names_work_but_are_in_no_all(module):
    mod = importlib.import_module(module)
    for old in DEPRECATED[module]:
        assert old not in mod.__all__, f"{module}.{old} is deprecated but in __all__"
        assert getattr(mod, old) is not None


def test_no_public_function_hides_a_module_of_its_name():
    import sys
    import types

    for name in jp.__all__:
        value = getattr(jp, name)
        hidden = sys.modules.get(f"jaxprune.{name}")
        if not isinstance(value, types.ModuleType) and hidden is not None:
            assert type(hidden) is not types.ModuleType, (
                f"jp.{name} is a {type(value).__name__} and hides the module jaxprune.{name}")


# --------------------------------------------------------------------------
# One calling convention


@pytest.mark.parametrize("name", jp.scores.names())
def test_every_score_function_takes_params_grads_key(name):
    fn = jp.scores.get(name)
    sig = inspect.signature(fn)
    assert list(sig.parameters)[:2] == ["params", "grads"], sig
    assert sig.parameters["key"].kind == inspect.Parameter.KEYWORD_ONLY
    p = _params()
    out = fn(p, jax.tree.map(jnp.ones_like, p), key=jax.random.key(0))
    assert jax.tree.structure(out) == jax.tree.structure(p)


@pytest.mark.parametrize("factory", [jp.prune, jp.set_training, jp.rigl, jp.ste_training,
                                     jp.lottery_ticket])
def test_training_transforms_take_inner_then_keywords(factory):
    params = list(inspect.signature(factory).parameters.values())
    assert params[0].name == "inner" and params[0].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in params[1:]), factory


def test_allocation_functions_order_their_arguments_alike():
    for fn in (jp.allocation.sparsities, jp.allocation.masks, jp.allocation.random_masks):
        names = [p for p in inspect.signature(fn).parameters]
        i = names.index("sparsity")
        assert names[i + 1] == "allocation" and "where" in names, (fn, names)
        assert inspect.signature(fn).parameters["where"].kind == inspect.Parameter.KEYWORD_ONLY


def test_uniform_is_topk_and_global_is_global_topk():
    p = _params()
    s = jp.scores.magnitude(p)
    assert_trees_equal(jp.allocation.masks(s, 0.5, allocation="uniform"), jp.masks.topk(s, 0.5))
    assert_trees_equal(jp.allocation.masks(s, 0.5, allocation="global"),
                       jp.masks.global_topk(s, 0.5))


def test_topk_keep_counts_equal_sparsity_masks():
    s = jp.scores.magnitude(_params())
    assert_trees_equal(jp.masks.topk(s, keep={"a": 6, "c": 4}), jp.masks.topk(s, 0.5))
    assert_trees_equal(jp.masks.global_topk(s, keep=10), jp.masks.global_topk(s, 0.5))
    traced = jax.jit(lambda s, k: jp.masks.global_topk(s, keep=k))(s, jnp.int32(10))
    assert_trees_equal(traced, jp.masks.global_topk(s, 0.5))


@pytest.mark.parametrize("old, new, message", [
    (lambda s: jp.masks.topk(s, 0.5, "a/"), lambda s: jp.masks.topk(s, 0.5, where="a/"),
     r"jp.masks.topk\(\.\.\., where\) by position"),
    (lambda s: jp.masks.n_of_m(s, 1, 2, -1), lambda s: jp.masks.n_of_m(s, n=1, m=2, axis=-1),
     "n, m, axis"),
    (lambda s: jp.masks.channels(s, 0.5, 0), lambda s: jp.masks.channels(s, 0.5, axis=0),
     "axis"),
    (lambda s: jp.allocation.masks(s, 0.5, "global"),
     lambda s: jp.allocation.masks(s, 0.5, allocation="global"), "allocation"),
    (lambda s: jp.allocation.erk(s, 0.5, "a/"), lambda s: jp.allocation.erk(s, 0.5, where="a/"),
     "where"),
    (lambda s: jp.sparsity_of(s, "a/"), lambda s: jp.sparsity_of(s, where="a/"), "where"),
])
def test_options_made_keyword_only_still_work_by_position_and_warn(old, new, message):
    s = jp.scores.magnitude(_params())
    with pytest.warns(DeprecationWarning, match=message):
        got = old(s)
    assert_trees_equal(got, new(s))


def test_keyword_only_shim_rejects_a_value_given_twice_or_too_many():
    s = jp.scores.magnitude(_params())
    with pytest.raises(TypeError, match="multiple values for 'where'"):
        jp.masks.topk(s, 0.5, "a/", where="c/")
    with pytest.raises(TypeError, match="positional arguments"):
        jp.masks.topk(s, 0.5, "a/", 3)

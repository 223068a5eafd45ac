"""Bad arguments raise ValueError / TypeError at trace time, and the message
names the argument, the value given and, where there is one, the leaf path."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp


def params():
    return {
        "encoder": {"kernel": jnp.ones((8, 6)), "bias": jnp.ones(6)},
        "head": {"kernel": jnp.ones((6, 3)), "bias": jnp.ones(3)},
    }


def raises(exc, *fragments):
    """pytest.raises(exc) whose message must contain every fragment (literally)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# --------------------------------------------------------------------------
# sparsity values


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), np.float32(2.0), float("inf")])
@pytest.mark.parametrize("fn", [jp.masks.topk, jp.masks.global_topk, jp.masks.block, jp.masks.channels])
def test_sparsity_out_of_range_or_nan(fn, bad):
    kw = {"block_shape": 2} if fn is jp.masks.block else {}
    with raises(ValueError, "sparsity", "[0, 1]", repr(bad)):
        fn(jp.scores.magnitude(params()), bad, **kw)


def test_sparsity_out_of_range_under_jit_raises_at_trace_time():
    f = jax.jit(jp.masks.topk, static_argnums=1)
    with raises(ValueError, "sparsity", "1.01"):
        f(params(), 1.01)


def test_per_leaf_sparsity_out_of_range_names_the_leaf():
    with raises(ValueError, "sparsity", "head/kernel", "-0.5"):
        jp.masks.topk(params(), {"encoder": 0.5, "head": -0.5})


def test_sparsity_not_a_number():
    with raises(TypeError, "sparsity", "'lots'"):
        jp.masks.topk(params(), "lots")


def test_global_topk_with_a_tree_sparsity():
    with raises(ValueError, "global_topk", "one sparsity", "topk"):
        jp.masks.global_topk(params(), {"encoder": 0.5, "head": 0.9})


# --------------------------------------------------------------------------
# trees that do not match


def test_apply_masks_mismatched_trees():
    p = params()
    masks = {"encoder": {"kernel": jnp.ones((8, 6), bool), "bias": True},
             "decoder": {"kernel": jnp.ones((6, 3), bool), "bias": True}}
    with raises(ValueError, "params", "masks", "head/kernel", "decoder/kernel"):
        jp.apply_masks(p, masks)


def test_apply_masks_mask_of_wrong_shape_names_the_leaf():
    p = params()
    masks = jax.tree.map(lambda x: jnp.ones((), bool), p)
    masks["head"]["kernel"] = jnp.ones((3, 6), bool)
    with raises(ValueError, "head/kernel", "(3, 6)", "(6, 3)"):
        jp.apply_masks(p, masks)


def test_saliency_mismatched_params_and_grads():
    p = params()
    grads = {"encoder": p["encoder"], "head": {"kernel": p["head"]["kernel"]}}  # no head/bias
    with raises(ValueError, "params", "grads", "head/bias"):
        jp.scores.saliency(p, grads)


# --------------------------------------------------------------------------
# leaves that cannot be pruned


@pytest.mark.parametrize("fn", [jp.masks.topk, jp.masks.global_topk])
def test_integer_leaf_selected(fn):
    tree = {"w": jnp.ones((4, 4)), "step": jnp.zeros((2, 2), jnp.int32)}
    with raises(TypeError, "'step'", "int32", "where="):
        fn(tree, 0.5, where=lambda path, leaf: True)


def test_integer_leaf_selected_by_n_of_m():
    with raises(TypeError, "'counts'", "int32"):
        jp.masks.n_of_m({"counts": jnp.zeros((4, 4), jnp.int32)}, where="counts")


# --------------------------------------------------------------------------
# N:M


def test_n_of_m_axis_not_divisible_by_m():
    tree = {"b": {"kernel": jnp.ones((6, 4)), "bias": jnp.ones(4)}}
    with raises(ValueError, "b/kernel", "(6, 4)", "m=4", "6"):
        jp.masks.n_of_m(tree, n=2, m=4)


@pytest.mark.parametrize("n, m, frag", [(5, 4, "n=5"), (-1, 4, "n=-1"), (2, 0, "m=0"),
                                         (1.5, 4, "n=1.5"), (2, 4.0, "m=4.0"), (2, -4, "m=-4")])
def test_n_of_m_invalid_n_or_m(n, m, frag):
    with raises(ValueError, frag):
        jp.masks.n_of_m(params(), n=n, m=m)


def test_n_of_m_axis_out_of_range():
    with raises(ValueError, "axis=2", "encoder/kernel"):
        jp.masks.n_of_m(params(), n=1, m=2, axis=2)


# --------------------------------------------------------------------------
# block


def test_block_larger_than_leaf():
    with raises(ValueError, "block_shape", "(8, 8)", "head/kernel", "(6, 3)"):
        jp.masks.block(params(), 0.5, block_shape=(8, 8), where="head/kernel")


def test_block_does_not_divide():
    with raises(ValueError, "encoder/kernel", "(8, 6)", "(3, 3)"):
        jp.masks.block(params(), 0.5, block_shape=(3, 3))


def test_block_bad_reduce_and_shape():
    with raises(ValueError, "reduce", "'median'"):
        jp.masks.block(params(), 0.5, block_shape=2, reduce="median")
    with raises(ValueError, "block_shape", "(0, 2)"):
        jp.masks.block(params(), 0.5, block_shape=(0, 2))


# --------------------------------------------------------------------------
# channels


@pytest.mark.parametrize("axis", [2, -3])
def test_channels_axis_out_of_range(axis):
    with raises(ValueError, f"axis={axis}", "encoder/kernel", "(8, 6)"):
        jp.masks.channels(params(), 0.5, axis=axis)


def test_channels_bad_reduce():
    with raises(ValueError, "reduce", "'l3'", "'l1', 'l2', 'mean', 'max'"):
        jp.masks.channels(params(), 0.5, reduce="l3")


# --------------------------------------------------------------------------
# where=


def test_where_regex_matches_no_leaf():
    with raises(ValueError, "where='decoder'", "matches no leaf", "encoder/kernel"):
        jp.masks.topk(params(), 0.5, where="decoder")


def test_where_invalid_regex():
    with raises(ValueError, "where='kernel('", "regular expression"):
        jp.masks.topk(params(), 0.5, where="kernel(")


def test_where_callable_selects_nothing():
    with raises(ValueError, "selects no leaf", "encoder/kernel"):
        jp.masks.global_topk(params(), 0.5, where=lambda path, leaf: False)


def test_where_prefix_tree_that_does_not_match():
    with raises(ValueError, "where", "prefix"):
        jp.masks.topk(params(), 0.5, where={"encoder": True})


def test_where_prefix_tree_of_non_bools():
    with raises(TypeError, "where", "bool", "'yes'"):
        jp.masks.topk(params(), 0.5, where={"encoder": "yes", "head": False})


def test_where_errors_raise_under_jit():
    with raises(ValueError, "where='nothing'"):
        jax.jit(lambda s: jp.masks.topk(s, 0.5, where="nothing"))(params())


# --------------------------------------------------------------------------
# scores


def test_unknown_score_name():
    with raises(ValueError, "'nope'", "magnitude", "saliency", "random"):
        jp.scores.get("nope")


# --------------------------------------------------------------------------
# Factory arguments


_UPDATE_EVERY_FACTORIES = {
    "prune": lambda **kw: jp.prune(optax.sgd(0.1), sparsity=0.5, **kw),
    "set_training": lambda **kw: jp.set_training(optax.sgd(0.1), sparsity=0.5, **kw),
    "rigl": lambda **kw: jp.rigl(optax.sgd(0.1), sparsity=0.5, **kw),
    "ste_training": lambda **kw: jp.ste_training(optax.sgd(0.1), sparsity=0.5, **kw),
}


@pytest.mark.parametrize("name", sorted(_UPDATE_EVERY_FACTORIES))
@pytest.mark.parametrize("bad, exc", [(2.5, TypeError), (True, TypeError), ("10", TypeError),
                                      (0, ValueError), (-3, ValueError)])
def test_update_every_must_be_a_positive_int(name, bad, exc):
    with raises(exc, name, "update_every", repr(bad)):
        _UPDATE_EVERY_FACTORIES[name](update_every=bad)


@pytest.mark.parametrize("name", sorted(_UPDATE_EVERY_FACTORIES))
def test_update_every_accepts_numpy_and_0d_integer_arrays(name):
    _UPDATE_EVERY_FACTORIES[name](update_every=np.int64(3))
    _UPDATE_EVERY_FACTORIES[name](update_every=jnp.asarray(3))


# --------------------------------------------------------------------------
# tx.init(variables) with batch_stats, then update(grads of params)


def _linen_variables():
    """The variables of a Linen Dense + BatchNorm model: params and batch_stats."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x)))

    return Net().init(jax.random.key(0), jnp.ones((1, 5)))


_ALL_TRANSFORMS = {
    "prune": lambda v: jp.prune(optax.sgd(0.1), sparsity=0.5),
    "lottery_ticket": lambda v: jp.lottery_ticket(optax.sgd(0.1), rounds=1, steps_per_round=2),
    "set_training": lambda v: jp.set_training(optax.sgd(0.1), sparsity=0.5),
    "rigl": lambda v: jp.rigl(optax.sgd(0.1), sparsity=0.5),
    "ste_training": lambda v: jp.ste_training(optax.sgd(0.1), sparsity=0.5),
    "keep_masks": lambda v: jp.keep_masks(jax.tree.map(lambda x: jnp.ones((), bool), v)),
}


@pytest.mark.parametrize("name", sorted(_ALL_TRANSFORMS))
def test_init_with_all_collections_then_update_with_param_grads(name):
    variables = _linen_variables()
    tx = _ALL_TRANSFORMS[name](variables)
    state = tx.init(variables)  # a common mistake: batch_stats included
    grads = jax.tree.map(jnp.zeros_like, variables["params"])
    with raises(ValueError, f"{name}.update", "batch_stats/", "tx.init(variables['params'])"):
        tx.update(grads, state, variables["params"])
    with raises(ValueError, f"{name}.update", "tx.init(variables['params'])"):
        jax.jit(tx.update)(grads, state, variables["params"])


# --------------------------------------------------------------------------
# Messages: paths, signatures, no raw internals


def test_get_masks_with_several_transforms_prints_paths():
    p = params()
    m = jp.masks.topk(jp.scores.magnitude(p), 0.5)
    tx = optax.chain(jp.keep_masks(m), jp.keep_masks(m))
    with pytest.raises(ValueError, match="several transforms") as e:
        jp.get_masks(tx.init(p))
    assert "'0/KeepMasksState.masks'" in str(e.value), str(e.value)  # not KeyEntry tuples
    assert "Key(" not in str(e.value), str(e.value)


def test_snip_does_not_relabel_a_type_error_inside_the_model():
    def loss(p, batch):
        raise TypeError("boom inside the model")

    with pytest.raises(TypeError, match="boom inside the model") as e:
        jp.snip(loss, params(), jnp.ones((2, 8)), sparsity=0.5)
    assert "must take (params, batch)" not in str(e.value)


def test_snip_wrong_signature():
    with raises(TypeError, "loss_fn(p)", "cannot be called as loss_fn(params, batch)"):
        jp.snip(lambda p: 0.0, params(), jnp.ones((2, 8)), sparsity=0.5)


def test_allocation_errors_are_clear():
    p = params()
    with raises(TypeError, "allocation must be one of", "int"):
        jp.allocation.sparsities(p, 0.5, allocation=3)
    with raises(ValueError, "'global' has no per-leaf sparsities", "jp.allocation.masks"):
        jp.allocation.sparsities(p, 0.5, allocation="global")


def test_keep_counts_errors():
    s = jp.scores.magnitude(params())
    with raises(TypeError, "keep", "2.5", "int"):
        jp.masks.topk(s, keep=2.5)
    with raises(ValueError, "keep=100", "encoder/kernel", "[0, 48]"):
        jp.masks.topk(s, keep=100)
    with raises(ValueError, "keep=100", "[0, 66]"):
        jp.masks.global_topk(s, keep=100)
    with raises(TypeError, "either sparsity", "keep="):
        jp.masks.topk(s, 0.5, keep=3)
    with raises(TypeError, "either sparsity", "keep="):
        jp.masks.global_topk(s)
    with raises(ValueError, "global_topk takes one keep", "topk"):
        jp.masks.global_topk(s, keep={"encoder": 1, "head": 2})


def test_score_functions_say_what_they_need():
    with raises(TypeError, "random needs a PRNG key", "key="):
        jp.scores.random(params())
    with raises(TypeError, "saliency", "saliency(params, grads)"):
        jp.scores.saliency(params())


def test_allocation_module_has_no_unreachable_assertion():
    import inspect

    assert "unreachable" not in inspect.getsource(jp.allocation)

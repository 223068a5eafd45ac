"""Leaf selection: the default where= (jp.tree.is_kernel) on models of every
style (tests/models.py), the where= forms, and leaves that are not arrays
(Equinox activation functions)."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune.core.select import keep_count


@pytest.fixture(scope="module", params=sorted(models.MODELS))
def model(request):
    name = request.param
    return (name, *models.MODELS[name]())


def test_default_selects_exactly_the_kernels(model):
    name, _, variables, _ = model
    assert sorted(jp.tree.selected(variables)) == sorted(models.KERNELS[name])


def test_summary_of_unpruned_params_lists_the_selection(model):
    name, _, variables, _ = model
    s = jp.summary(variables)
    assert sorted(r["path"] for r in s.rows) == sorted(models.KERNELS[name])
    assert all(r["kept"] == r["size"] and r["sparsity"] == 0.0 for r in s.rows)


def _topk_and_apply(variables):
    masks = jp.masks.topk(jp.scores.magnitude(variables), 0.5)
    return masks, jp.apply_masks(variables, masks)


def test_default_masks_prune_kernels_and_leave_everything_else(model):
    name, apply_fn, variables, x = model
    masks, pruned = eqx.filter_jit(_topk_and_apply)(variables)
    paths, leaves, _ = jp.tree.flatten(variables)
    kernels = set(models.KERNELS[name])
    kept = size = 0
    for p, v, m, q in zip(paths, leaves, jax.tree.leaves(masks), jax.tree.leaves(pruned)):
        if p in kernels:
            assert m.shape == v.shape and int(m.sum()) == keep_count(v.size, 0.5), p
            kept, size = kept + int(m.sum()), size + v.size
        else:
            assert np.shape(m) == () and bool(m), f"{name}: {p} got a mask"
            if jp.tree.is_key(v):  # PRNG keys (nnx.Rngs state) pass through
                np.testing.assert_array_equal(jax.random.key_data(q), jax.random.key_data(v))
            elif jp.tree.is_array(v):
                np.testing.assert_array_equal(np.asarray(q), np.asarray(v), err_msg=p)
            else:
                assert q is v, p  # an activation function passes through
    assert jp.sparsity_of(pruned) == pytest.approx(1 - kept / size)
    out = apply_fn(pruned, x)
    assert jax.tree.map(np.shape, out) == jax.tree.map(np.shape, apply_fn(variables, x))


def test_scan_stack_summary_per_layer():
    _, variables, _ = models.linen_scan_stack(layers=4)
    s = jp.summary(variables, layers="^params/layers/")
    paths = [r["path"] for r in s.rows]
    assert paths == ["params/head/kernel", "params/input/kernel"] + [
        f"params/layers/Dense_0/kernel[{i}]" for i in range(4)]
    assert all(r["shape"] == (8, 8) for r in s.rows[2:])


# --------------------------------------------------------------------------
# Equinox: leaves that are not arrays


def test_equinox_pure_functions_pass_non_array_leaves():
    apply_fn, model, x = models.equinox_cnn()
    assert not any(jp.tree.flags(model, lambda p, leaf: True)[i]
                   for i, leaf in enumerate(jax.tree.leaves(model)) if not jp.tree.is_array(leaf))
    grads = eqx.filter_grad(lambda m: jnp.sum(apply_fn(m, x) ** 2))(model)  # None at functions
    scores = jp.scores.saliency(model, grads)
    masks = eqx.filter_jit(lambda s: jp.masks.global_topk(s, 0.75))(scores)
    pruned = jp.apply_masks(model, masks)
    assert jp.sparsity_of(pruned) == pytest.approx(0.75, abs=1e-3)
    assert pruned.layers[2] is jax.nn.relu and pruned.layers[6].activation is jax.nn.gelu
    assert apply_fn(pruned, x).shape == (2, 10)
    assert apply_fn(jp.apply_masks_ste(model, masks), x).shape == (2, 10)
    random = jp.scores.random(model, key=jax.random.key(0))
    assert random.layers[3] is jnp.ravel
    # A regex that matches functions too selects only the arrays.
    assert jp.tree.selected(model, "^layers/6/") == [
        "layers/6/layers/0/weight", "layers/6/layers/0/bias", "layers/6/layers/1/weight",
        "layers/6/layers/1/bias"]
    assert "layers/2" not in {r["path"] for r in jp.summary(model, where=lambda p, leaf: True).rows}


@pytest.mark.parametrize("factory", [
    functools.partial(jp.prune, sparsity=0.5),
    functools.partial(jp.lottery_ticket, rounds=1, steps_per_round=2),
    functools.partial(jp.set_training, sparsity=0.5),
    functools.partial(jp.rigl, sparsity=0.5),
    functools.partial(jp.ste_training, sparsity=0.5),
], ids=["prune", "lottery_ticket", "set_training", "rigl", "ste_training"])
def test_equinox_transform_init_says_how_to_filter(factory):
    _, model, _ = models.equinox_cnn()
    tx = factory(optax.adam(1e-3))
    with pytest.raises(TypeError, match=r"(?s)'layers/1/init'.*eqx\.filter\(model, eqx\.is_array\)"):
        tx.init(model)


def test_equinox_training_with_partitioned_params():
    apply_fn, model, x = models.equinox_cnn()
    params, static = eqx.partition(model, eqx.is_array)
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5, update_every=1)
    state = tx.init(params)

    @eqx.filter_jit
    def step(model, state):
        grads = eqx.filter_grad(lambda m: jnp.sum(apply_fn(m, x) ** 2))(model)
        u, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, u), state

    for _ in range(2):
        model, state = step(model, state)
    assert jp.sparsity_of(model) == pytest.approx(0.5, abs=1e-3)
    assert sorted(jp.tree.selected(model)) == sorted(models.KERNELS["equinox_cnn"])


# --------------------------------------------------------------------------
# where= forms


def _params():
    return {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
            "out": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}


def _biases(params):
    return jax.tree.map(lambda x: x.ndim == 1, params)


def test_where_optax_style_callable():
    p = _params()
    assert jp.tree.selected(p, _biases) == ["dense/bias", "out/bias"]
    # The same function works as optax.masked's mask, and as jp.prune's where=.
    masked = optax.masked(optax.sgd(1.0), _biases)
    u, _ = masked.update(p, masked.init(p))
    assert float(u["dense"]["kernel"][0, 0]) == 1.0 and float(u["dense"]["bias"][0]) == -1.0
    masks = jp.masks.topk(p, 0.5, where=_biases)
    assert masks["dense"]["kernel"].shape == () and int(masks["dense"]["bias"].sum()) == 2
    tx = jp.prune(optax.sgd(0.0), sparsity=0.5, update_every=1, where=_biases)
    _, state = tx.update(p, tx.init(p), p)
    assert int(jp.get_masks(state)["out"]["bias"].sum()) == 1


def test_where_optax_style_callable_on_nnx_state():
    _, state, _ = models.nnx_minigpt()
    sel = jp.tree.selected(state, lambda params: jax.tree.map(lambda x: x.ndim == 3, params))
    assert sel and all("/mha/" in p and p.endswith("kernel") for p in sel)


@pytest.mark.parametrize("fn", [lambda *a: True, lambda path, leaf=None: True,
                                lambda: True, lambda a, b, c: True, print])
def test_where_callable_with_an_ambiguous_signature(fn):
    with pytest.raises(ValueError, match="unclear whether it is a"):
        jp.tree.flags(_params(), fn)


def test_where_keyword_defaults_do_not_make_it_ambiguous():
    def fn(path, leaf, *, flag=True):
        return flag and path.endswith("kernel")

    assert jp.tree.selected(_params(), fn) == ["dense/kernel", "out/kernel"]
    assert jp.tree.selected(_params(), functools.partial(lambda suffix, params: jax.tree.map(
        lambda x: x.ndim == 2, params), "k")) == ["dense/kernel", "out/kernel"]


@pytest.mark.parametrize("path, shape, dtype, want", [
    ("Dense_0/kernel", (3, 4), jnp.float32, True),
    ("conv/weight", (8, 3, 3, 3), jnp.bfloat16, True),
    ("mask/kernel", (3, 4), jnp.bool_, True),
    ("Dense_0/kernel", (3, 1), jnp.float32, False),  # one axis longer than 1
    ("Dense_0/kernel", (1, 1, 5), jnp.float32, False),
    ("Dense_0/kernel", (3, 4), jnp.int32, False),
    ("attn/query/Bias", (2, 8), jnp.float32, False),  # names ignore case
    ("block/GAMMA", (2, 8), jnp.float32, False),
    ("layers/moving_variance", (4, 8), jnp.float32, False),
    ("decoder/embed_tokens/weight", (10, 4), jnp.float32, False),
    ("transformer/wte/weight", (10, 4), jnp.float32, False),
    ("emb", (256, 64), jnp.float32, False),  # plain-dict GPTs (examples/prune_lm.py)
    ("pos", (128, 64), jnp.float32, False),
    ("model/tok_emb", (256, 64), jnp.float32, False),
    ("model/pos_embedding/w", (128, 64), jnp.float32, False),
    ("patch_emb", (16, 64), jnp.float32, False),
    ("emb_proj/kernel", (64, 64), jnp.float32, True),  # a projection after an embedding
    ("head", (64, 256), jnp.float32, True),  # an LM head is a dense kernel
    ("h/0/ln_1/weight", (4, 4), jnp.float32, False),
    ("features/bn1/weight", (4, 4), jnp.float32, False),
    ("RMSNorm_0/kernel", (4, 4), jnp.float32, False),
    ("cache/attn/cached_key", (2, 4, 4), jnp.float32, False),
    ("intermediates/h", (2, 4), jnp.float32, False),
    ("batch_stats/conv/mean", (2, 4), jnp.float32, False),
])
def test_is_kernel_rule(path, shape, dtype, want):
    assert jp.tree.is_kernel(path, jnp.zeros(shape, dtype)) is want
    assert jp.tree.is_kernel(path, jax.ShapeDtypeStruct(shape, dtype)) is want


def test_is_kernel_non_arrays():
    assert not jp.tree.is_kernel("layers/2", jax.nn.relu)
    assert not jp.tree.is_kernel("name", "a string")

"""Tutorial-style models as users write them (tests/models.py): state that is
not weights (PRNG keys, nnx RngCount counters, BatchNorm statistics, bool
flags, Equinox non-array fields) passes through tracing, structured masks,
compaction, calibration, Wanda, SparseGPT, sensitivity and the training
transforms untouched; compacted models rebuild with working RNG streams."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest

import jaxprune as jp

NAMES = ["nnx_minigpt", "nnx_cnn", "nnx_scan_gpt", "linen_dropout_cnn", "equinox_bn_cnn",
         "plain_rng_state"]
NNX_MODELS = {"nnx_minigpt": models.nnx_minigpt_model, "nnx_cnn": models.nnx_cnn_model,
              "nnx_scan_gpt": models.nnx_scan_gpt_model}


def _state_leaves(variables):
    """(path, leaf) of every leaf that is not a float array: the state."""
    paths, leaves, _ = jp.tree.flatten(variables)
    return [(p, x) for p, x in zip(paths, leaves) if not jp.tree.is_float(x)]


def _same_leaf(a, b, path):
    if jp.tree.is_key(a):
        assert jp.tree.is_key(b) and a.dtype == b.dtype, path
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b), path)
    elif jp.tree.is_array(a):
        assert np.asarray(a).dtype == np.asarray(b).dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), path)
    else:
        assert a is b, path


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    name = request.param
    apply_fn, variables, x = models.MODELS[name]()
    g = jp.graph.trace(apply_fn, variables, x)
    masks = jp.structured.masks(g, jp.structured.scores(g, variables), 0.5)
    small = jp.structured.compact(g, variables, masks)
    return name, apply_fn, variables, x, g, masks, small


def test_every_model_holds_state_and_prunable_groups(case):
    name, _, variables, _, g, _, _ = case
    kinds = {type(x).__name__ if not jp.tree.is_array(x) else
             ("key" if jp.tree.is_key(x) else np.asarray(x).dtype.kind)
             for _, x in _state_leaves(variables)}
    stats = any(p.startswith("batch_stats/") for p in jp.tree.paths(variables))
    assert kinds or stats, name  # every model here keeps state beside its weights
    if name.startswith("nnx"):
        assert "key" in kinds and "u" in kinds  # RngKey and RngCount (uint32)
    assert g.prunable, name


def test_state_passes_through_compaction_untouched(case):
    name, _, variables, _, _, masks, small = case
    before, after = _state_leaves(variables), _state_leaves(small)
    assert [p for p, _ in before] == [p for p, _ in after]
    for (p, a), (_, b) in zip(before, after):
        assert b is a, f"{name}: {p} was rebuilt or converted"
    for (p, m) in zip(jp.tree.paths(masks), jax.tree.leaves(masks)):
        if p in dict(before):
            assert np.shape(m) == () and bool(m), p
    assert jp.tree.paths(small) == jp.tree.paths(variables)


def _run_small(name, apply_fn, small, x, variables):
    """The compacted model, rebuilt the way each library needs, on ``x``."""
    if name in NNX_MODELS:
        from flax import nnx

        model, _ = NNX_MODELS[name]()
        return jp.resize.nnx(nnx.graphdef(model), small)(x)
    if name.startswith("linen"):
        with jp.resize.linen():
            return apply_fn(small, x)
    if name.startswith("equinox"):
        return apply_fn((jp.resize.equinox(small[0]), small[1]), x)
    return apply_fn(small, x)


def test_compacted_model_computes_the_masked_model(case):
    name, apply_fn, variables, x, g, masks, small = case
    sizes = [np.size(a) for a in jax.tree.leaves(small) if jp.tree.is_float(a)]
    assert sum(sizes) < sum(np.size(a) for a in jax.tree.leaves(variables) if jp.tree.is_float(a))
    want = apply_fn(jp.apply_masks(variables, masks), x)
    np.testing.assert_allclose(_run_small(name, apply_fn, small, x, variables), want,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(NNX_MODELS))
def test_compact_nnx_rebuilds_a_model_whose_dropout_runs(name):
    from flax import nnx

    model, x = NNX_MODELS[name]()
    graphdef, state = nnx.split(model)
    g = jp.graph.trace(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    masks = jp.structured.masks(g, jp.structured.scores(g, state), 0.5)
    small = jp.resize.compact_nnx(g, model, masks)
    want = nnx.merge(graphdef, jp.apply_masks(state, masks))(x)
    np.testing.assert_allclose(small(x), want, rtol=1e-4, atol=1e-5)
    small.train()
    def count():
        return sum(int(np.sum(np.asarray(c))) for c in jax.tree.leaves(nnx.state(small,
                                                                                  nnx.RngCount)))

    kw = {"training": True} if name == "nnx_minigpt" else {}  # the tutorial's flag
    before = count()
    a, b = small(x, **kw), nnx.jit(lambda m, x: m(x, **kw))(small, x)
    assert a.shape == b.shape == want.shape
    assert not np.allclose(a, b)  # the streams advance: a new dropout mask per call
    assert count() > before


@pytest.mark.parametrize("name", sorted(NNX_MODELS))
def test_prune_trains_inside_nnx_optimizer(name):
    from flax import nnx

    model, x = NNX_MODELS[name]()
    model.train()
    opt = nnx.Optimizer(model, jp.prune(optax.adam(1e-3), sparsity=0.5, update_every=1),
                        wrt=nnx.Param)

    kw = {"training": True} if name == "nnx_minigpt" else {}  # the tutorial's flag

    @nnx.jit
    def step(model, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x, **kw) ** 2))(model)
        opt.update(model, grads)
        return loss

    keys = [jax.random.key_data(k) for k in jax.tree.leaves(nnx.state(model, nnx.RngKey))]
    for _ in range(2):
        assert np.isfinite(float(step(model, opt, x)))
    params = nnx.state(model, nnx.Param)
    assert jp.sparsity_of(params) == pytest.approx(0.5, abs=0.01)
    for k, k2 in zip(keys, jax.tree.leaves(nnx.state(model, nnx.RngKey))):
        np.testing.assert_array_equal(k, jax.random.key_data(k2))  # keys are not trained


# NNX models: test_compact_nnx_rebuilds_a_model_whose_dropout_runs
@pytest.mark.parametrize("case", [n for n in NAMES if n not in NNX_MODELS], indirect=True)
def test_train_mode_runs_after_compaction_in_every_library(case):
    name, apply_fn, _, x, _, _, small = case
    key = jax.random.key(7)
    if name.startswith("linen"):
        with jp.resize.linen():
            y, stats = apply_fn(small, x, train=True, rngs={"dropout": key})
        assert jax.tree.map(np.shape, stats) == jax.tree.map(np.shape, small["batch_stats"])
    elif name.startswith("equinox"):
        model = eqx.nn.inference_mode(jp.resize.equinox(small[0]), value=False)
        y, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))(
            x, small[1], jax.random.split(key, x.shape[0]))
    else:
        y = apply_fn(small, x, train=True)
    assert np.all(np.isfinite(np.asarray(y)))


def test_wanda_and_sparsegpt_leave_the_state_alone(case):
    name, apply_fn, variables, x, _, _, _ = case
    stats = jp.calibrate(apply_fn, variables, [x])
    kernels = set(models.KERNELS[name])
    assert set(stats) <= kernels and stats
    masks = jp.oneshot.wanda(variables, stats, 0.5)
    for p, m in zip(jp.tree.paths(masks), jax.tree.leaves(masks)):
        assert (np.ndim(m) > 0) == (p in stats), p
    pruned, masks2 = jp.oneshot.sparsegpt(apply_fn, variables, [x], sparsity=0.5)
    for (p, a), (_, b) in zip(_state_leaves(variables), _state_leaves(pruned)):
        _same_leaf(a, b, p)
    assert jp.sparsity_of(masks2, where=lambda p, _: p in stats) == pytest.approx(0.5, abs=0.02)
    assert np.all(np.isfinite(np.asarray(apply_fn(pruned, x))))


def test_sensitivity_and_unit_stats_on_state_and_static_fields(case):
    name, apply_fn, variables, x, g, _, _ = case
    metric = lambda v: jnp.mean(apply_fn(v, x) ** 2)  # noqa: E731
    leaf = jp.sensitivity.scan(metric, variables, levels=(0.5,))
    assert sorted(leaf.names) == sorted(models.KERNELS[name])
    group = jp.sensitivity.scan(metric, variables, levels=(0.5,), granularity="group", graph=g)
    # groups=None: every prunable group but head dims (as in structured.masks)
    assert set(group.names) == {grp.name for grp in g.prunable if grp.kind != "head_dims"}
    st = jp.sensitivity.unit_stats(g, apply_fn, variables, x, loss_fn=lambda y: jnp.mean(y ** 2))
    # scan bodies are not hooked (documented): a scanned stack's groups get no statistics
    assert any(a is not None for a in st["apoz"]) == (name != "nnx_scan_gpt")


def test_transforms_pass_keys_and_counters_through():
    """The whole NNX state (keys, counters) as the optimizer's tree, with an
    inner optimizer that leaves non-float leaves alone: every transform steps
    the floats and passes the rest."""
    apply_fn, state, x = models.nnx_minigpt()
    g = jp.graph.trace(apply_fn, state, x)
    labels = jax.tree.map(lambda v: "w" if jp.tree.is_float(v) else "state", state)
    inner = optax.partition({"w": optax.sgd(0.1), "state": optax.set_to_zero()}, labels)
    grads = jax.jit(jax.grad(lambda s: jnp.mean(apply_fn(s, x) ** 2), allow_int=True))(state)
    for tx in (jp.prune(inner, sparsity=0.5, update_every=1),
               jp.lottery_ticket(inner, rounds=1, steps_per_round=1),
               jp.rigl(inner, sparsity=0.5),
               jp.structured.prune(inner, graph=g, sparsity=0.5, update_every=1),
               optax.chain(inner, jp.regularizers.l1(1e-2, learning_rate=0.1)),
               optax.chain(inner, jp.regularizers.group_lasso(g, 1e-2, learning_rate=0.1))):
        s = jax.jit(tx.init)(state)  # one compile, not one per eager op
        for _ in range(2):
            u, s = jax.jit(tx.update)(grads, s, state)
        paths = jp.tree.paths(state)
        for p, v, du in zip(paths, jax.tree.leaves(state), jax.tree.leaves(u)):
            if not jp.tree.is_float(v):
                assert du.dtype == jax.dtypes.float0, p


def test_a_key_that_masks_would_cut_is_a_clear_error():
    apply_fn, state, x = models.nnx_scan_gpt()
    g = jp.graph.trace(apply_fn, state, x)
    masks = jp.structured.masks(g, jp.structured.scores(g, state), 0.5)
    paths = jp.tree.paths(masks)
    i = next(i for i, p in enumerate(paths) if p.endswith("dropout/rngs/key"))
    leaves = jax.tree.leaves(masks)
    leaves[i] = jnp.array([True, False, True])  # one bool per stacked key
    bad = jax.tree.unflatten(jax.tree.structure(masks), leaves)
    with pytest.raises(TypeError, match=r"(?s)'blocks/dropout/rngs/key' is a PRNG key.*"
                                        r"jp\.structured\.masks"):
        jp.structured.compact(g, state, bad)


def test_keys_are_never_selected():
    _, state, _ = models.nnx_minigpt()
    assert not any(jp.tree.is_key(x) for p, x in zip(*jp.tree.flatten(state)[:2])
                   if p in jp.tree.selected(state, lambda p, x: True))
    with pytest.raises(ValueError, match="selects no leaf"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, where=r"rngs/key$").init(state)
    with pytest.raises(TypeError, match=r"'transformer_blocks/0/dropout1/rngs/count'.*state"):
        jp.masks.topk(state, 0.5, where="rngs/count")


def test_tracing_in_training_mode_says_to_trace_in_inference_mode():
    apply_fn, variables, x = models.plain_rng_state()
    g = jp.graph.trace(lambda v, x: apply_fn(v, x, train=True), variables, x)
    (grp,) = [grp for grp in g.groups if grp.name == "dense/kernel:1"]
    assert not grp.prunable
    assert any("random bits" in r and "inference mode" in r for r in grp.reasons)
    assert [grp.name for grp in jp.graph.trace(apply_fn, variables, x).prunable] == [
        "dense/kernel:1"]


def test_one_key_value_head_groups_have_unique_names():
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_graph_transformers import decoder, decoder_params

    p = decoder_params(kv=1)
    g = jp.graph.trace(decoder, p, jnp.zeros((2, 8), jnp.int32))
    names = [grp.name for grp in g.groups]
    assert len(names) == len(set(names))
    fixed = [grp for grp in g.groups if not grp.prunable and "wqkv" in grp.name]
    assert fixed and all(grp.kind == "head_dims" for grp in fixed)
    heads = next(grp for grp in g.groups if grp.name == "blocks/0/wqkv:1")
    assert heads.prunable and heads.kind == "heads"
    assert "head_dims" in str(g)

"""Key paths and where= on every kind of pytree jaxprune promises to handle:
dicts, lists, tuples, NamedTuples, Flax NNX State, Flax Linen variables and
an Equinox-style registered dataclass module; global_topk and apply_masks
run (under jit) on each of them."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from flax import nnx

import jaxprune as jp

F32, BF16 = np.float32, jnp.bfloat16


def _rand(rng, shape, dtype=F32):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32).astype(dtype))


class Dense(NamedTuple):
    kernel: Any
    bias: Any


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight", "bias"],
                   meta_fields=["activation"])
@dataclasses.dataclass
class Linear:
    """An Equinox-style module: a dataclass whose fields are its children."""

    weight: Any
    bias: Any
    activation: str = "relu"


class MLP:
    """A module registered with keys: children addressed by attribute name."""

    def __init__(self, layers, scale):
        self.layers, self.scale = layers, scale

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(x @ layer.weight + layer.bias)
        return x * self.scale


jax.tree_util.register_pytree_with_keys(
    MLP,
    lambda m: (((jax.tree_util.GetAttrKey("layers"), m.layers),
                (jax.tree_util.GetAttrKey("scale"), m.scale)), None),
    lambda aux, children: MLP(*children),
)


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(8, name="hidden")(x))
        return nn.Dense(3, name="out")(x)


def build(kind, rng):
    """(pytree, expected paths in tree_leaves order, expected default-selected paths)."""
    if kind == "dict":
        t = {"enc": {"kernel": _rand(rng, (6, 8)), "bias": _rand(rng, (8,))}, "dec": {"kernel": _rand(rng, (8, 3), BF16)}}
        return t, ["dec/kernel", "enc/bias", "enc/kernel"], ["dec/kernel", "enc/kernel"]
    if kind == "list":
        t = [_rand(rng, (6, 8)), [_rand(rng, (8,)), _rand(rng, (8, 3))]]
        return t, ["0", "1/0", "1/1"], ["0", "1/1"]
    if kind == "tuple":
        t = (_rand(rng, (4, 5), BF16), (_rand(rng, (5, 2)), _rand(rng, (2,))))
        return t, ["0", "1/0", "1/1"], ["0", "1/0"]
    if kind == "namedtuple":
        t = {"layers": [Dense(_rand(rng, (6, 8)), _rand(rng, (8,))), Dense(_rand(rng, (8, 3)), _rand(rng, (3,)))]}
        return (t, ["layers/0/kernel", "layers/0/bias", "layers/1/kernel", "layers/1/bias"],
                ["layers/0/kernel", "layers/1/kernel"])
    if kind == "nnx":
        model = NnxModel(nnx.Rngs(int(rng.integers(1000))))
        t = nnx.state(model, nnx.Param)
        return t, ["l1/bias", "l1/kernel", "l2/bias", "l2/kernel"], ["l1/kernel", "l2/kernel"]
    if kind == "linen":
        t = LinenModel().init(jax.random.key(int(rng.integers(1000))), jnp.ones((1, 6)))
        return (t, ["params/hidden/bias", "params/hidden/kernel", "params/out/bias", "params/out/kernel"],
                ["params/hidden/kernel", "params/out/kernel"])
    if kind == "dataclass":
        t = MLP([Linear(_rand(rng, (6, 8)), _rand(rng, (8,))), Linear(_rand(rng, (8, 3)), _rand(rng, (3,)), "none")],
                jnp.float32(2.0))
        return (t, ["layers/0/weight", "layers/0/bias", "layers/1/weight", "layers/1/bias", "scale"],
                ["layers/0/weight", "layers/1/weight"])
    raise ValueError(kind)


KINDS = ["dict", "list", "tuple", "namedtuple", "nnx", "linen", "dataclass"]


@pytest.mark.parametrize("kind", KINDS)
def test_paths_and_where(kind):
    tree, paths, selected = build(kind, np.random.default_rng(0))
    assert jp.tree.paths(tree) == paths
    assert not any(p.endswith("/value") or p.endswith(".value") for p in jp.tree.paths(tree))
    sel = lambda w: [p for p, s in zip(paths, jp.tree.flags(tree, w)) if s]  # noqa: E731
    assert sel(None) == selected
    # regex on the "/"-joined path
    first = selected[0]
    assert sel("^" + re.escape(first) + "$") == [first]
    last = paths[-1]
    assert sel(re.escape(last) + "$") == [last]
    if any("bias" in p for p in paths):
        assert sel("bias") == [p for p in paths if "bias" in p]
    # callable (path, leaf) -> bool; leaves are arrays (not NNX Variables)
    seen = []
    assert sel(lambda p, x: seen.append((p, np.shape(x))) or np.ndim(x) == 1) == [
        p for p, x in zip(paths, jax.tree.leaves(tree)) if np.ndim(x) == 1]
    assert [p for p, _ in seen] == paths
    # round trip flatten / unflatten keeps the type
    names, leaves, treedef = jp.tree.flatten(tree)
    assert names == paths
    assert type(jp.tree.unflatten(treedef, leaves)) is type(tree)


_GLOBAL = jax.jit(jp.masks.global_topk)
_APPLY = jax.jit(jp.apply_masks)


@pytest.mark.parametrize("kind", KINDS)
def test_global_topk_and_apply_masks(kind):
    tree, paths, selected = build(kind, np.random.default_rng(1))
    scores = jp.scores.magnitude(tree)
    assert jax.tree.structure(scores) == jax.tree.structure(tree)
    masks = _GLOBAL(scores, jnp.float32(0.6))
    assert type(masks) is type(tree)
    assert jax.tree.structure(masks) == jax.tree.structure(tree)
    leaves = jax.tree.leaves(tree)
    m_leaves = jax.tree.leaves(masks)
    sel_idx = [paths.index(p) for p in selected]
    want = oracle.global_topk([np.abs(oracle.to_f32(leaves[i])) for i in sel_idx], 0.6, traced=True)
    n = sum(leaves[i].size for i in sel_idx)
    assert sum(int(np.asarray(m_leaves[i]).sum()) for i in sel_idx) == oracle.keep_count(n, 0.6, True)
    for j, i in enumerate(sel_idx):
        np.testing.assert_array_equal(np.asarray(m_leaves[i]), want[j], err_msg=f"{kind}: {paths[i]}")
    for i, p in enumerate(paths):
        if i not in sel_idx:
            m = np.asarray(m_leaves[i])
            assert m.shape == () and m.dtype == np.bool_ and bool(m), f"{kind}: {p} not scalar True"

    out = _APPLY(tree, masks)
    assert type(out) is type(tree) and jax.tree.structure(out) == jax.tree.structure(tree)
    for i, (p, x, o) in enumerate(zip(paths, leaves, jax.tree.leaves(out))):
        x, o = np.asarray(x), np.asarray(o)
        assert o.dtype == x.dtype, f"{kind}: {p}"
        if i in sel_idx:
            m = want[sel_idx.index(i)]
            np.testing.assert_array_equal(o[m], x[m], err_msg=f"{kind}: {p}")
            assert np.all(o[~m] == 0), f"{kind}: {p}"
        else:
            np.testing.assert_array_equal(o, x, err_msg=f"{kind}: unselected {p} changed")
    assert jp.sparsity_of(out) == pytest.approx(1 - oracle.keep_count(n, 0.6, True) / n)


def test_nnx_masked_state_updates_the_model():
    model = NnxModel(nnx.Rngs(3))
    state = nnx.state(model, nnx.Param)
    masks = _GLOBAL(jp.scores.magnitude(state), jnp.float32(0.5))
    nnx.update(model, jp.apply_masks(state, masks))
    k1, k2 = np.asarray(model.l1.kernel[...]), np.asarray(model.l2.kernel[...])
    assert int((k1 == 0).sum() + (k2 == 0).sum()) == (48 + 24) // 2
    np.testing.assert_array_equal(k1 != 0, np.asarray(masks["l1"]["kernel"][...]))
    assert model(jnp.ones((2, 6))).shape == (2, 3)


def test_linen_masked_variables_apply():
    model = LinenModel()
    variables = model.init(jax.random.key(0), jnp.ones((1, 6)))
    masks = _GLOBAL(jp.scores.magnitude(variables), jnp.float32(0.75))
    masked = jp.apply_masks(variables, masks)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)), F32)
    p = masked["params"]
    manual = jax.nn.relu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"]) @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(np.asarray(model.apply(masked, x)), np.asarray(manual), rtol=1e-6)
    assert jp.sparsity_of(masked) == 1 - round(72 * 0.25) / 72


def test_path_str_drops_only_a_trailing_value_attribute():
    K, A, S = jax.tree_util.DictKey, jax.tree_util.GetAttrKey, jax.tree_util.SequenceKey
    assert jp.tree.path_str((K("a"), K("kernel"), A("value"))) == "a/kernel"
    assert jp.tree.path_str((K("a"), K("value"))) == "a/value"  # a dict key named value stays
    assert jp.tree.path_str((A("value"), K("b"))) == "value/b"
    assert jp.tree.path_str((A("value"),)) == "value"
    assert jp.tree.path_str((K("w"), S(3), A("kernel"))) == "w/3/kernel"
    assert jp.tree.paths({"a": {"value": jnp.ones(2)}}) == ["a/value"]


def test_where_bool_prefix_tree_on_nnx_state():
    tree, paths, _ = build("nnx", np.random.default_rng(0))
    # a prefix (of the same node type, State) that stops at the layer level
    sel = jp.tree.flags(tree, nnx.State({"l1": False, "l2": True}))
    assert [p for p, s in zip(paths, sel) if s] == ["l2/bias", "l2/kernel"]


def test_where_bool_prefix_tree_on_a_dataclass_module():
    mlp, paths, _ = build("dataclass", np.random.default_rng(0))
    prefix = [False, Linear(True, False, "none")]
    sel = jp.tree.flags(mlp.layers, prefix)
    assert [p for p, s in zip(paths[:4], sel) if s] == ["layers/1/weight"]


def test_where_bool_prefix_tree_that_is_a_callable_module():
    """Equinox modules define __call__, and the Equinox idiom for a filter is a
    bool tree of the model's own type (jax.tree.map(lambda _: False, model)
    with some leaves set True). tree.flags must treat a pytree *node* as a
    prefix tree even when it is callable; it calls it as (path, leaf) instead.
    """
    mlp, paths, _ = build("dataclass", np.random.default_rng(0))
    prefix = MLP([False, Linear(True, False, "none")], False)
    sel = jp.tree.flags(mlp, prefix)
    assert [p for p, s in zip(paths, sel) if s] == ["layers/1/weight"]

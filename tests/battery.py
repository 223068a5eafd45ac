"""The shared battery every pruning transform in jaxprune must pass.

To add a transform, append an :class:`Entry` to ``FACTORIES`` in
``tests/test_battery.py``:

* ``factory(inner, **kwargs) -> GradientTransformationExtraArgs``;
* ``kwargs``: the keyword arguments for the battery's runs (the battery runs
  ``steps`` steps; the transform must reach its final sparsity by then);
* ``sparsity``: the final sparsity of the selected leaves (default where=);
* ``mode``: ``"per_leaf"`` (each kernel keeps exactly ``round(n (1 - s))``)
  or ``"global"`` (the kernels together do), or ``"none"`` to skip the count
  check (e.g. ERK);
* ``injectable``: numeric kwargs that ``optax.inject_hyperparams`` may inject;
* ``zero_pruned``: False for transforms that keep dense weights (STE);
* ``needs_params``: the factory also takes ``params=`` (the tree it will
  train: ``keep_masks`` computes its masks from it, ``structured.prune``
  traces its graph on it, see :func:`mlp_graph`).

Transforms that are not wrappers (``keep_masks``, the regularizers) enter
as the chains the docs prescribe: ``chain(inner, keep_masks(m))``, and a
regularizer inside the pruning wrapper (``prune(chain(inner, l1(...)))``).

Each check runs under ``jax.jit``: chained after ``clip_by_global_norm`` and
around adam; inside ``optax.MultiSteps``; under ``optax.inject_hyperparams``;
with bf16 parameters (kept bf16); with dict, tuple and Flax NNX ``State``
pytrees; state structure (and dtypes, shapes) stable across steps; exact
sparsity reached; pruned weights exactly zero after every step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from harness import assert_same_layout, run_steps

import jaxprune as jp
from jaxprune.core.select import keep_count


class Entry(NamedTuple):
    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict
    sparsity: float
    mode: str = "per_leaf"
    steps: int = 12
    injectable: tuple[str, ...] = ()
    zero_pruned: bool = True
    needs_params: bool = False


def make(entry: Entry, inner: optax.GradientTransformation, params: Any):
    """The entry's transform around ``inner``, for training ``params``."""
    extra = {"params": params} if entry.needs_params else {}
    return entry.factory(inner, **extra, **entry.kwargs)


def mlp_apply(params: Any, x: jax.Array) -> jax.Array:
    """The two-layer MLP of every battery tree (dict, tuple, NNX): kernels
    and biases in pytree order."""
    leaves = jax.tree_util.tree_leaves(params)
    (k1, k2), (b1, b2) = ([x for x in leaves if x.ndim == n] for n in (2, 1))
    return jax.nn.relu(x @ k1 + b1) @ k2 + b2


def mlp_graph(params: Any):
    """The model graph of :func:`mlp_apply` on ``params``: one prunable group,
    the 16 hidden units."""
    x = jnp.ones((2, 8), jax.tree_util.tree_leaves(params)[0].dtype)
    return jp.graph.trace(mlp_apply, params, x)


def dict_params(dtype=jnp.float32) -> Any:
    k = jax.random.split(jax.random.key(42), 4)
    return {
        "dense1": {"kernel": jax.random.normal(k[0], (8, 16), dtype), "bias": jnp.zeros(16, dtype)},
        "dense2": {"kernel": jax.random.normal(k[1], (16, 4), dtype), "bias": jnp.zeros(4, dtype)},
    }


def tuple_params() -> Any:
    p = dict_params()
    return (p["dense1"]["kernel"], p["dense1"]["bias"], (p["dense2"]["kernel"], p["dense2"]["bias"]))


def nnx_params() -> Any:
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 4, rngs=rngs)

    return nnx.state(MLP(nnx.Rngs(0)), nnx.Param)


def loss(params: Any) -> jax.Array:
    """Any smooth function of every leaf (so all leaves get gradients)."""
    leaves = jax.tree_util.tree_leaves(params)
    total = jnp.zeros((), jnp.float32)
    for i, x in enumerate(leaves):
        x = x.astype(jnp.float32)
        target = jnp.cos(jnp.arange(x.size, dtype=jnp.float32) + i).reshape(x.shape)
        total = total + jnp.sum((x - target) ** 2) + jnp.sum(jnp.sin(3 * x))
    return total


def kernels(params: Any) -> list[jax.Array]:
    """The leaves the default where= prunes (dense kernels in these trees)."""
    paths, leaves, _ = jp.tree.flatten(params)
    return [x for p, x in zip(paths, leaves) if jp.tree.is_kernel(p, x)]


def run(tx, params, steps: int):
    """``(params, state, [(params, state, updates) per step])``."""
    history = [(h.params, h.state, h.updates) for h in run_steps(tx, params, steps, loss)[1:]]
    return history[-1][0], history[-1][1], history


def assert_exact(entry: Entry, params: Any, masks: Any | None = None) -> None:
    """Kernels hold exactly the requested number of nonzeros / kept entries."""
    leaves = kernels(masks) if masks is not None else kernels(params)
    kept = [int(jnp.sum(m)) if m.dtype == jnp.bool_ else int(jnp.sum(m != 0)) for m in leaves]
    sizes = [int(m.size) for m in leaves]
    if entry.mode == "per_leaf":
        want = [keep_count(n, entry.sparsity) for n in sizes]
        assert kept == want, f"{entry.name}: kept {kept}, want {want} (sizes {sizes})"
    elif entry.mode == "global":
        want = keep_count(sum(sizes), entry.sparsity)
        assert sum(kept) == want, f"{entry.name}: kept {sum(kept)}, want {want}"


def assert_pruned_zero(entry: Entry, history) -> None:
    if not entry.zero_pruned:
        return
    for i, (p, s, _) in enumerate(history):
        masks = jp.get_masks(s)
        for m, x in zip(jax.tree_util.tree_leaves(masks), jax.tree_util.tree_leaves(p)):
            if m.ndim:
                bad = int(jnp.sum(~m & (x != 0)))
                assert bad == 0, f"{entry.name}: step {i}: {bad} pruned weights are nonzero"


def check_chain_adam(entry: Entry) -> None:
    p0 = dict_params()
    tx = optax.chain(optax.clip_by_global_norm(10.0), make(entry, optax.adam(1e-2), p0))
    params, state, hist = run(tx, p0, entry.steps)
    assert_pruned_zero(entry, hist)
    assert_exact(entry, params if entry.zero_pruned else None, jp.get_masks(state))
    assert_same_layout(tx.init(p0), state)
    assert_trained(entry, p0, params, jp.get_masks(state))


def assert_trained(entry: Entry, p0: Any, params: Any, masks: Any) -> None:
    """Training lowered the loss of the final sparse model: the final masks
    applied to the trained weights beat them applied to the initial ones."""
    before = float(loss(jp.apply_masks(p0, masks)))
    after = float(loss(jp.apply_masks(params, masks)))
    assert after < before, f"{entry.name}: no training happened ({before} -> {after})"


def check_multisteps(entry: Entry) -> None:
    k = 2
    p0 = dict_params()
    tx = optax.MultiSteps(make(entry, optax.adam(1e-2), p0), every_k_schedule=k)
    params, state, hist = run(tx, p0, entry.steps * k)
    # Pruned weights are zero after every *real* update (every k-th step).
    assert_pruned_zero(entry, hist[k - 1 :: k])
    assert_exact(entry, params if entry.zero_pruned else None, jp.get_masks(state))
    assert_same_layout(tx.init(p0), state)


def check_inject(entry: Entry) -> None:
    kwargs = dict(entry.kwargs)
    static = tuple(k for k in kwargs if k not in entry.injectable)
    p0 = dict_params()
    factory = functools.partial(entry.factory, params=p0) if entry.needs_params else entry.factory
    tx = optax.inject_hyperparams(factory, static_args=static)(optax.adam(1e-2), **kwargs)
    params, state, hist = run(tx, p0, entry.steps)
    assert_pruned_zero(entry, hist)
    assert_exact(entry, params if entry.zero_pruned else None, jp.get_masks(state))
    for name in entry.injectable:
        assert name in state.hyperparams, f"{name} not injected"


def check_bf16(entry: Entry) -> None:
    p0 = dict_params(jnp.bfloat16)
    tx = make(entry, optax.adam(1e-2), p0)
    params, state, hist = run(tx, p0, entry.steps)
    for x in jax.tree_util.tree_leaves(params):
        assert x.dtype == jnp.bfloat16, f"{entry.name}: params became {x.dtype}"
    for _, _, u in hist:
        for x in jax.tree_util.tree_leaves(u):
            assert x.dtype == jnp.bfloat16, f"{entry.name}: updates are {x.dtype}"
    assert_pruned_zero(entry, hist)
    assert_exact(entry, params if entry.zero_pruned else None, jp.get_masks(state))


def check_pytrees(entry: Entry) -> None:
    for tree_of in (tuple_params, nnx_params):
        p0 = tree_of()
        tx = make(entry, optax.adam(1e-2), p0)
        params, state, hist = run(tx, p0, entry.steps)
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(p0)
        assert_pruned_zero(entry, hist)
        assert_exact(entry, params if entry.zero_pruned else None, jp.get_masks(state))


def check_no_params_error(entry: Entry) -> None:
    p0 = dict_params()
    tx = make(entry, optax.adam(1e-2), p0)
    state = tx.init(p0)
    try:
        tx.update(p0, state)
    except ValueError as e:
        assert "params" in str(e), str(e)
    else:
        raise AssertionError(f"{entry.name}: update without params did not raise")


CHECKS = {
    "chain_adam": check_chain_adam,
    "multisteps": check_multisteps,
    "inject_hyperparams": check_inject,
    "bf16": check_bf16,
    "pytrees": check_pytrees,
    "no_params_error": check_no_params_error,
}

__all__ = ["CHECKS", "Entry", "dict_params", "loss", "np", "run"]

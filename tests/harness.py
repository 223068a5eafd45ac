"""Shared test helpers: a jitted training step that records every step, tree
comparisons, and the loader of the example scripts. Tests import them by
name (``from harness import run_steps``); there are no fixtures for them."""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


class Step(NamedTuple):
    """One recorded step: parameters and state after it, and the updates and
    gradients it used (``None`` for the initial entry)."""

    params: Any
    state: Any
    updates: Any = None
    grads: Any = None


def make_step(tx: optax.GradientTransformation, loss_fn: Callable[[Any], jax.Array]):
    """A jitted ``(params, state) -> (params, state, updates, grads)`` step of
    ``tx`` on the gradients of ``loss_fn(params)``."""

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u, g

    return step


def run_steps(tx: optax.GradientTransformation, params: Any, steps: int,
              loss_fn: Callable[[Any], jax.Array], step=None) -> list[Step]:
    """Runs ``steps`` jitted steps from ``tx.init(params)``; returns the
    history, ``history[0]`` the initial parameters and state and
    ``history[i]`` the result of step ``i``."""
    step = step or make_step(tx, loss_fn)
    state = tx.init(params)
    history = [Step(params, state)]
    for _ in range(steps):
        params, state, u, g = step(params, state)
        history.append(Step(params, state, u, g))
    return history


def assert_trees_equal(a: Any, b: Any, *, rtol: float = 0.0, atol: float = 0.0,
                       what: str = "trees") -> None:
    """``a`` and ``b`` have the same structure (containers, keys, node types)
    and, leaf by leaf, the same shape, dtype and values (exactly, unless
    ``rtol``/``atol`` allow a difference). Messages name the leaf path."""
    assert_same_layout(a, b, what=what)
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
        where = f"{what}: leaf {jax.tree_util.keystr(path)}"
        if rtol or atol:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                       err_msg=where)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=where)


def assert_same_layout(a: Any, b: Any, *, what: str = "trees") -> None:
    """``a`` and ``b`` have the same structure and, leaf by leaf, the same
    shape and dtype (values may differ)."""
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    assert sa == sb, f"{what}: structures differ:\n{sa}\n!=\n{sb}"
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x) if not hasattr(x, "dtype") else x, y
        y = np.asarray(y) if not hasattr(y, "dtype") else y
        assert (x.shape, x.dtype) == (y.shape, y.dtype), (
            f"{what}: leaf {jax.tree_util.keystr(path)}: {x.shape} {x.dtype} != {y.shape} {y.dtype}")


def load_example(name: str):
    """Imports ``examples/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

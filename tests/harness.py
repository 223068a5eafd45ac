"""Shared test helpers: a jitted training step that records every step, and
the loader of the example scripts. ``conftest.py`` exposes them as fixtures;
helper modules (``battery.py``) import them directly."""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
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


def load_example(name: str):
    """Imports ``examples/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Argument checks shared by the exporters: the model function and its inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxprune.core import tree as tree_lib


def check_model(fn_name: str, apply_fn: Any, example_args: tuple) -> None:
    """Raises if ``apply_fn`` is not callable or no example input was given."""
    if not callable(apply_fn):
        raise TypeError(
            f"{fn_name}: apply_fn must be callable as apply_fn(variables, *example_args), "
            f"got {type(apply_fn).__name__}. Pass the model function first, e.g. "
            f"{fn_name}(model.apply, variables, x).")
    if not example_args:
        raise ValueError(
            f"{fn_name}: no example input was given; the exported model has the shapes and "
            f"dtypes of example_args. Pass one, e.g. {fn_name}(apply_fn, variables, x).")


def input_leaves(fn_name: str, example_args: tuple) -> tuple[list[str], list[Any], Any]:
    """Paths, leaves and treedef of the example inputs; every leaf an array.

    Paths are ``"/"``-joined key paths of the tuple ``example_args``
    (``"0"`` for the first argument, ``"1/mask"`` inside the second).
    """
    names, leaves, treedef = tree_lib.flatten(tuple(example_args))
    if not leaves:
        raise ValueError(f"{fn_name}: example_args hold no arrays; pass at least one input "
                         "array, e.g. x = jnp.zeros((1, 28, 28, 1)).")
    for name, leaf in zip(names, leaves):
        if not tree_lib.is_array(leaf):
            raise TypeError(
                f"{fn_name}: example input {name!r} is a {type(leaf).__name__}, expected an "
                "array (jax or numpy, or a jax.ShapeDtypeStruct) with the shape and dtype the "
                "model will be called on. "
                "Wrap Python numbers with jnp.asarray, or close over non-array arguments "
                "in apply_fn.")
    return names, leaves, treedef


def bind(apply_fn: Callable, variables: Any) -> Callable:
    """``lambda *args: apply_fn(variables, *args)``: the variables become constants."""
    def fn(*args):
        return apply_fn(variables, *args)
    return fn

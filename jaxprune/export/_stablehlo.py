"""The server route: a model with its variables as a serialized ``jax.export``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxprune.export import _check


def _specs(names: list[str], leaves: list[Any], batch_polymorphic: bool) -> list[Any]:
    if not batch_polymorphic:
        return [jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) for x in leaves]
    (batch,) = jax.export.symbolic_shape("b")
    specs = []
    for name, x in zip(names, leaves):
        shape = tuple(x.shape)
        if not shape:
            raise ValueError(
                f"stablehlo: batch_polymorphic=True makes the leading axis of every input a "
                f"symbolic batch size, but example input {name!r} is a scalar. Close over "
                "scalar arguments in apply_fn, or pass batch_polymorphic=False.")
        specs.append(jax.ShapeDtypeStruct((batch, *shape[1:]), x.dtype))
    return specs


def stablehlo(apply_fn: Callable, variables: Any, *example_args: Any,
              batch_polymorphic: bool = False) -> bytes:
    """A model and its variables as one serialized StableHLO module (``jax.export``).

    The variables are closed over, so they are constants of the module:
    ``jax.export.deserialize(blob).call(*args)`` computes
    ``apply_fn(variables, *args)`` on any XLA runtime (CPU, GPU, TPU), with no
    Python model code and no checkpoint. The module is lowered for the
    platform JAX runs on now (``jax.export``'s default).

    Args:
      apply_fn: ``apply_fn(variables, *args)``: a plain function, Linen
        ``model.apply`` (inference mode), NNX ``nnx.merge(graphdef, state)(x)``
        or an Equinox call; any output pytree.
      variables: any pytree (compacted variables included).
      *example_args: inputs with the shapes and dtypes the module accepts
        (arrays or pytrees of arrays).
      batch_polymorphic: if True, the leading axis of every input leaf is one
        symbolic size ``b``, so the module accepts any batch size.

    Returns:
      The serialized module (``bytes``); write it to a file as it is.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxprune as jp
      >>> w = {"w": jnp.arange(6.0).reshape(3, 2)}
      >>> blob = jp.export.stablehlo(lambda v, x: x @ v["w"], w, jnp.ones((4, 3)),
      ...                            batch_polymorphic=True)
      >>> jax.export.deserialize(blob).call(jnp.ones((2, 3))).tolist()
      [[6.0, 9.0], [6.0, 9.0]]

    References:
      JAX documentation, "Exporting and serializing staged-out computations"
      (``jax.export``); OpenXLA StableHLO specification.
    """
    _check.check_model("stablehlo", apply_fn, example_args)
    names, leaves, treedef = _check.input_leaves("stablehlo", example_args)
    specs = jax.tree.unflatten(treedef, _specs(names, leaves, batch_polymorphic))
    fn = jax.jit(_check.bind(apply_fn, variables))
    return bytes(jax.export.export(fn)(*specs).serialize())

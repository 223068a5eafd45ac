"""Pruning at initialisation: SNIP (connection sensitivity).

:func:`snip` scores the initial weights by ``|w * dL/dw|`` on a few batches
and keeps the largest; :func:`snip_scores` returns the scores. (``jp.snip``
is the function; this module is ``jp.at_init``.)

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"w": jnp.ones((4, 2))}
  >>> x = jnp.array([[1.0, 0.0, 3.0, 0.5]])          # input 1 is always zero
  >>> loss = lambda p, x: jnp.sum(x @ p["w"])
  >>> jp.snip(loss, params, x, sparsity=0.5)["w"][:, 0].tolist()
  [True, False, True, False]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import _deprecation
from jaxprune.core import allocation as _alloc
from jaxprune.core import masks as _masks
from jaxprune.core import scores as _scores
from jaxprune.core.tree import PyTree

__all__ = ["snip", "snip_scores"]


def _batches(batch: Any) -> list[Any]:
    if isinstance(batch, list):
        if not batch:
            raise ValueError(
                "snip: batch is an empty list; pass one batch, or a non-empty list of "
                "batches (their |w * g| are averaged)."
            )
        return batch
    return [batch]


def _check_loss_fn(loss_fn: Any, params: PyTree, batch: Any) -> None:
    """``loss_fn`` must accept ``(params, batch)``: checked on its signature,
    so a TypeError raised inside the model is not mistaken for this."""
    if not callable(loss_fn):
        raise TypeError(
            f"snip: loss_fn must be a callable (params, batch) -> loss, got "
            f"{type(loss_fn).__name__}."
        )
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return  # no signature to check (a builtin): call it and see
    try:
        sig.bind(params, batch)
    except TypeError as e:
        raise TypeError(
            f"snip: loss_fn{sig} cannot be called as loss_fn(params, batch): {e}. loss_fn "
            "must take (params, batch) and return a scalar loss; pass several batches as "
            "a Python list."
        ) from None


def snip_scores(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batch: Any) -> PyTree:
    """Connection sensitivity ``mean_b |w * dL_b/dw|`` (float32).

    ``dL/dc`` for a multiplicative gate ``c`` on each weight, at ``c = 1``, is
    ``w * dL/dw``; its magnitude estimates how much the loss changes if the
    weight is removed. With a list of batches the magnitudes are averaged
    (each batch's gradient is computed, jitted, one at a time).

    Args:
      loss_fn: ``(params, batch) -> scalar loss``.
      params: the (initial) parameters.
      batch: one batch (anything ``loss_fn`` takes), or a Python ``list`` of
        batches.

    Returns:
      A score tree with the structure of ``params``.

    References:
      Lee et al., "SNIP: Single-shot network pruning based on connection
      sensitivity", ICLR 2019.
    """
    batches = _batches(batch)
    _check_loss_fn(loss_fn, params, batches[0])
    grad_fn = jax.jit(jax.grad(loss_fn))
    acc = None
    for b in batches:
        s = _scores.saliency(params, grad_fn(params, b))
        acc = s if acc is None else jax.tree.map(jnp.add, acc, s)
    n = float(len(batches))
    return jax.tree.map(lambda a: a / n, acc)


@_deprecation.keyword_only("allocation", "where")
def snip(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    sparsity: float,
    *,
    allocation: Any = "global",
    where: Any = None,
    layers: Any = None,
    layer_axis: int = 0,
) -> PyTree:
    """SNIP: masks at initialisation from connection sensitivity ``|w * g|``.

    Scores every weight by ``s = mean_b |w * dL_b/dw|`` at the given (initial)
    parameters and keeps the largest: with ``allocation="global"`` (as in the
    paper) exactly ``round(n * (1 - sparsity))`` of the ``n`` selected weights
    overall; any other allocation of :mod:`jaxprune.allocation` works too.
    Train the pruned network with ``optax.chain(opt, jp.keep_masks(masks))``.
    (The paper normalises ``s`` by its sum, which changes no ranking.)

    Args:
      loss_fn: ``(params, batch) -> scalar loss``.
      params: the initial parameters.
      batch: one batch, or a Python ``list`` of batches (scores averaged).
      sparsity: fraction of zeros in ``[0, 1]`` among the selected weights.
      allocation: ``"global"`` (default), ``"uniform"``, ``"erk"``, a dict
        ``{regex: sparsity}`` or a callable.
      where: which leaves to prune (default: :func:`jaxprune.tree.is_kernel`).
      layers: which pruned leaves are stacks of layers (a ``where=``-style
        selection or a model graph): with a per-leaf allocation every layer
        gets its own budget (see :mod:`jaxprune.allocation`).
      layer_axis: the layer axis of the stacked leaves (default 0).

    Returns:
      A mask tree (bool arrays for selected leaves, scalar ``True`` elsewhere).

    Raises:
      ValueError: sparsity outside [0, 1], unknown allocation, empty batch list,
        ``where`` selecting nothing; TypeError: non-float selected leaves.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"w": jax.random.normal(jax.random.key(0), (10, 3))}
      >>> x = jax.random.normal(jax.random.key(1), (32, 10))
      >>> loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
      >>> masks = jp.snip(loss, params, [x[:16], x[16:]], sparsity=0.8)
      >>> int(masks["w"].sum())
      6
      >>> tx = optax.chain(optax.adam(1e-3), jp.keep_masks(masks))

    References:
      Lee et al., "SNIP: Single-shot network pruning based on connection
      sensitivity", ICLR 2019.
    """
    _check_loss_fn(loss_fn, params, _batches(batch)[0])
    _masks.check_sparsity(sparsity, "snip: sparsity")
    _alloc.check(allocation, params, where, layers=layers, layer_axis=layer_axis, what="snip")
    _masks.selection(params, where, "params")
    scores = snip_scores(loss_fn, params, batch)
    return _alloc.masks(scores, sparsity, allocation=allocation, where=where, params=params,
                        layers=layers, layer_axis=layer_axis)

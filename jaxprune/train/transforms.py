"""Pruning as optax gradient transformations.

:func:`prune` wraps any optax optimizer. On mask-update steps it scores the
current parameters (and the raw gradients), turns the scores into masks at
the scheduled sparsity, and from then on:

* gradients of pruned weights are zeroed *before* the inner optimizer, so
  momentum and Adam moments of pruned weights stay exactly zero;
* the emitted updates are ``where(mask, u, -p)`` (the same as
  ``where(mask, p + u, 0) - p``, without its rounding), so
  ``optax.apply_updates`` alone yields masked parameters: pruned weights are
  exactly zero after every step, under momentum, Adam and weight decay.

Masks, the step counter, score accumulators and the PRNG key live in the
optimizer state, so an orbax checkpoint of the state saves them and a restore
resumes bit-identically.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> import jaxprune as jp
  >>> params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4), "b": jnp.zeros(4)}
  >>> tx = jp.prune(optax.sgd(0.0), sparsity=0.75, update_every=1)
  >>> state = tx.init(params)
  >>> grads = jax.tree.map(jnp.zeros_like, params)
  >>> updates, state = tx.update(grads, state, params)
  >>> params = optax.apply_updates(params, updates)
  >>> jp.sparsity_of(params), int(jp.get_masks(state)["w"].sum())
  (0.75, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import _deprecation
from jaxprune.core import allocation as _alloc
from jaxprune.core import scores as _scores
from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree
from jaxprune.train import base as _base

Schedule = Callable[[Any], Any]

__all__ = [
    "KeepMasksState",
    "PruneState",
    "STEState",
    "get_masks",
    "keep_masks",
    "prune",
    "ste_training",
]


def _moved(name: str) -> Callable[..., Any]:
    """The shared helpers moved to the internal _transform_base; their old
    names here warn."""
    return _deprecation.alias(getattr(_base, name), f"jaxprune.transforms.{name}",
                              f"jaxprune._transform_base.{name} (internal)")


apply_mask_to_updates = _moved("apply_mask_to_updates")
check_schedule = _moved("check_schedule")
initial_masks = _moved("initial_masks")
mask_grads = _moved("mask_grads")
require_params = _moved("require_params")
schedule_value = _moved("schedule_value")
validate_params = _moved("validate_params")


# --------------------------------------------------------------------------
# prune


class PruneState(NamedTuple):
    """State of :func:`prune`.

    Attributes:
      count: number of updates so far (int32); masks are recomputed when
        ``count % update_every == 0``.
      masks: bool mask tree (scalar ``True`` for leaves not pruned).
      score_state: accumulators of the score (empty for magnitude/saliency).
      key: PRNG key for random scores.
      inner_state: the wrapped optimizer's state.
    """

    count: jax.Array
    masks: PyTree
    score_state: PyTree
    key: jax.Array
    inner_state: optax.OptState


def prune(
    inner: optax.GradientTransformation,
    *,
    sparsity: float | Schedule,
    score: str | Callable[..., PyTree] | _scores.Scorer = "magnitude",
    allocation: Any = "uniform",
    update_every: int = 100,
    where: Any = None,
    nested: bool = True,
    seed: int = 0,
    layers: Any = None,
    layer_axis: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so training prunes the model to a (scheduled) sparsity.

    On every step where ``count % update_every == 0`` the masks are recomputed
    (under :func:`jax.lax.cond`, so other steps pay nothing for selection)
    from the current parameters and, for gradient scores, the raw gradients
    this transform receives (before ``inner``):

    ``masks = allocation(score(params, grads), sparsity(count))``

    With ``nested=True`` (the default, as iterative magnitude pruning
    expects) pruned weights stay pruned: their scores are set to ``-inf``
    before selection, so a weight can only leave the mask. With
    ``nested=False`` a pruned weight regrows when its score recovers
    (its value restarts at zero).

    Args:
      inner: the optimizer to wrap (any optax transformation).
      sparsity: fraction of zeros among the selected weights: a number or an
        optax schedule of the step, e.g. gradual magnitude pruning (Zhu &
        Gupta 2017) is ``optax.polynomial_schedule(0.0, 0.9, power=3,
        transition_steps=1000, transition_begin=100)``.
      score: ``"magnitude"``, ``"saliency"`` (``|w * g|``), ``"random"``, any
        name in :func:`jaxprune.scores.names`, a :class:`~jaxprune.scores.Scorer`
        or a callable ``(params, grads) -> scores``.
      allocation: ``"uniform"``, ``"global"``, ``"erk"``, a dict
        ``{path regex: sparsity}`` or a callable ``(params, sparsity) -> tree``
        (see :mod:`jaxprune.allocation`).
      update_every: mask-update period in steps (the mask is also computed on
        step 0).
      where: which leaves to prune (default: :func:`jaxprune.tree.is_kernel`).
      nested: keep pruned weights pruned (see above).
      seed: seed of the PRNG key used by random scores.
      layers: which pruned leaves are stacks of layers (``nnx.scan``,
        MaxText): a ``where=``-style selection or a model graph; every layer
        then gets its own budget, as if it were its own leaf (see
        :mod:`jaxprune.allocation`). ``None``: no stacks.
      layer_axis: the layer axis of the stacked leaves (default 0).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`PruneState`. Extra keyword arguments of ``update`` are passed
      on to ``inner``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> tx = jp.prune(optax.adam(1e-2), update_every=10,
      ...               sparsity=optax.polynomial_schedule(0.0, 0.5, 3, 20))
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s, g: tx.update(g, s, p))
      >>> for _ in range(30):
      ...     u, state = step(params, state, params)  # any gradients
      ...     params = optax.apply_updates(params, u)
      >>> jp.sparsity_of(params)
      0.5

    References:
      Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of
      pruning for model compression", 2017; Han et al., "Learning both weights
      and connections for efficient neural networks", NeurIPS 2015.
    """
    return _masks_on_schedule(
        inner, _base.masked_update, sparsity=sparsity, score=score, allocation=allocation,
        update_every=update_every, where=where, nested=nested, seed=seed,
        name="prune", layers=layers, layer_axis=layer_axis,
    )


# The state of :func:`ste_training` is that of :func:`prune` (count, masks,
# score_state, key, inner_state): both run the same mask schedule.
STEState = PruneState


def ste_training(
    inner: optax.GradientTransformation,
    *,
    sparsity: float | Schedule,
    update_every: int = 1,
    score: str | Callable[..., PyTree] | _scores.Scorer = "magnitude",
    allocation: Any = "uniform",
    where: Any = None,
    seed: int = 0,
    layers: Any = None,
    layer_axis: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Straight-through sparse training: dense weights, mask recomputed from them.

    The weights stay dense and get the inner optimizer's updates unchanged
    (nothing is zeroed). On every step with ``count % update_every == 0``
    (step 0 included) the mask is recomputed from ``score`` on the dense
    weights at the (scheduled) sparsity and stored in the state. **The model
    must apply it**: inside the loss, run the network on
    ``jp.apply_masks_ste(params, jp.get_masks(opt_state))``; the forward
    pass then uses the masked weights while the gradient reaches every
    weight, so pruned weights can grow back. For deployment, use
    ``jp.apply_masks(params, jp.get_masks(opt_state))``. The state's masks
    are all ``True`` until the first ``update`` (so the very first forward
    pass is dense). Prefer a sparsity schedule at high sparsity: in
    ``examples/compare_methods.py`` STE at 90% from step 0 collapsed on one
    seed of three, while the cubic schedule trained best of all methods.

    Args:
      inner: the optimizer to wrap.
      sparsity: fraction of zeros in [0, 1] or an optax schedule of the step.
      update_every: mask-recomputation period (1, the default: every step, as
        in SR-STE-style training, since the mask follows the dense weights).
      score: ``"magnitude"`` or any score accepted by :func:`jaxprune.prune`.
      allocation: ``"uniform"`` (default), ``"global"``, ``"erk"``, a dict or a
        callable.
      where: which leaves to prune (default: :func:`jaxprune.tree.is_kernel`).
      seed: seed of the PRNG key used by random scores.
      layers: which pruned leaves are stacks of layers: every layer gets its
        own budget, as in :func:`jaxprune.prune`.
      layer_axis: the layer axis of the stacked leaves (default 0).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`STEState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> tx = jp.ste_training(optax.adam(1e-2), sparsity=0.75)
      >>> state = tx.init(params)
      >>> def loss(p, masks):
      ...     return jnp.sum((jp.apply_masks_ste(p, masks)["w"] - 1.0) ** 2)
      >>> for _ in range(3):
      ...     g = jax.grad(loss)(params, jp.get_masks(state))
      ...     u, state = tx.update(g, state, params)
      ...     params = optax.apply_updates(params, u)
      >>> jp.sparsity_of(jp.get_masks(state)), jp.sparsity_of(params)
      (0.75, 0.0)

    References:
      Bengio et al. 2013 (straight-through estimator); Zhou et al., "Learning
      N:M fine-grained structured sparse neural networks from scratch", ICLR
      2021; Lin et al., "Dynamic model pruning with feedback", ICLR 2020.
    """
    return _masks_on_schedule(
        inner, _dense_update, sparsity=sparsity, score=score, allocation=allocation,
        update_every=update_every, where=where, nested=False, seed=seed,
        name="ste_training", layers=layers, layer_axis=layer_axis,
    )


def _dense_update(inner, updates, inner_state, params, masks, **extra_args):
    """The inner update on dense weights (straight-through: the model applies
    the masks); same signature as :func:`jaxprune.train.base.masked_update`."""
    del masks
    return inner.update(updates, inner_state, params, **extra_args)


def _masks_on_schedule(
    inner: optax.GradientTransformation,
    step: Callable[..., tuple],
    *,
    sparsity: float | Schedule,
    score: Any,
    allocation: Any,
    update_every: Any,
    where: Any,
    nested: bool,
    seed: int,
    name: str,
    layers: Any = None,
    layer_axis: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """The engine of :func:`prune` and :func:`ste_training`: masks recomputed
    on a schedule and kept in a :class:`PruneState`, through
    :func:`jaxprune.train.base.scheduled_update`; ``step(inner, updates,
    inner_state, params, masks, **extra_args)`` is the inner update
    (``masked_update`` for pruning, ``_dense_update`` for straight-through)."""
    _base.check_schedule(sparsity)
    _base.check_positive_int(update_every, name, "update_every")
    scorer = _scores.get_scorer(score)
    _alloc.check(allocation)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        _base.validate_params(params, where, name)
        _alloc.check(allocation, params, where, layers=layers, layer_axis=layer_axis, what=name)
        return PruneState(
            count=jnp.zeros((), jnp.int32),
            masks=_base.initial_masks(params, where),
            score_state=scorer.init(params),
            key=_base.seed_key(seed),
            inner_state=inner.init(params),
        )

    def recompute(state, params, grads):
        """New masks from the current scores at this step's sparsity."""
        key_data, sub = _base.split_key(state.key)
        if scorer.lazy is not None and isinstance(nested, bool):  # scores never stored
            scores = _base.nested_lazy(scorer.lazy(params, grads), state.masks, nested)
        else:
            scores = scorer.score(state.score_state, params, grads, sub)
            scores = _base.nested_scores(scores, state.masks, nested)
        s_now = _base.schedule_value(sparsity, state.count)
        masks = _alloc.masks(scores, s_now, allocation=allocation, where=where, params=params,
                             step=state.count, layers=layers, layer_axis=layer_axis)
        return {"masks": masks, "key": key_data}

    def update_fn(updates, state, params=None, **extra_args):
        return _base.scheduled_update(
            name, inner, updates, state, params, extra_args,
            is_update=lambda s: (s.count % update_every) == 0,
            recompute=lambda s: recompute(s, params, updates),
            before=lambda s: s._replace(score_state=scorer.update(s.score_state, params,
                                                                  updates)),
            step=lambda s, masks: step(inner, updates, s.inner_state, params, masks,
                                       **extra_args))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scheduled_masks(inner: optax.GradientTransformation, *, apply: bool, **kwargs: Any
                    ) -> optax.GradientTransformationExtraArgs:
    """Deprecated: the engine's mode flag; use :func:`prune` (``apply=True``)
    or :func:`ste_training` (``apply=False``)."""
    _deprecation.warn("jaxprune.transforms.scheduled_masks",
                      "jaxprune.prune or jaxprune.ste_training")
    return _masks_on_schedule(inner, _base.masked_update if apply else _dense_update, **kwargs)


# --------------------------------------------------------------------------
# keep_masks


class KeepMasksState(NamedTuple):
    """State of :func:`keep_masks`: the fixed masks."""

    masks: PyTree


def keep_masks(masks: PyTree) -> optax.GradientTransformationExtraArgs:
    """Holds given masks fixed: pruned weights become and stay exactly zero.

    Place it *last* in a chain, e.g. for fine-tuning a pruned model:
    ``optax.chain(optax.adamw(1e-3), jp.keep_masks(masks))``. Its updates are
    ``where(mask, u, -p)``, so pruned weights are zero after the first step
    whatever ``params`` held and whatever the optimizer before it does.

    Args:
      masks: a mask tree (as returned by :func:`jaxprune.masks.topk` or
        :func:`get_masks`) with the structure of the parameters.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a
      :class:`KeepMasksState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"w": jnp.ones((2, 2))}
      >>> masks = {"w": jnp.array([[True, False], [False, True]])}
      >>> tx = optax.chain(optax.sgd(0.1), jp.keep_masks(masks))
      >>> u, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
      >>> optax.apply_updates(params, u)["w"].tolist()
      [[0.8999999761581421, 0.0], [0.0, 0.8999999761581421]]
    """

    def init_fn(params):
        _base.check_arrays(params, "keep_masks")
        _tree.check_same_structure(params, masks, "params", "masks")
        # Re-home the masks in the parameters' containers (e.g. NNX Params).
        leaves = [jnp.asarray(m, jnp.bool_) for m in jax.tree_util.tree_leaves(masks)]
        treedef = jax.tree_util.tree_structure(params)
        return KeepMasksState(masks=jax.tree_util.tree_unflatten(treedef, leaves))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _base.require_params(params, "keep_masks")
        _base.check_update_trees(updates, params, state.masks, "keep_masks")
        return _base.apply_mask_to_updates(updates, params, state.masks), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# get_masks


def get_masks(opt_state: optax.OptState) -> PyTree:
    """Finds the masks anywhere in a (chained, wrapped) optimizer state.

    Looks through ``optax.chain``, ``optax.MultiSteps``,
    ``optax.inject_hyperparams`` and any nesting of NamedTuples for a field
    named ``masks`` (every jaxprune transform stores its masks there).

    Raises:
      ValueError: if no masks are found, or several transforms hold masks.
    """
    return _base.find_in_state(
        opt_state, "masks",
        "no masks found in this optimizer state. Is a jaxprune transform "
        "(prune, lottery_ticket, keep_masks, ...) part of the optimizer?",
        "several transforms hold masks (at {paths}); pick one with "
        "optax.tree_utils.tree_get_all_with_path(opt_state, 'masks').")

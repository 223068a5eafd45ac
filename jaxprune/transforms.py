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
  >>> jp.sparsity(params), int(jp.get_masks(state)["w"].sum())
  (0.75, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import allocation as _alloc
from jaxprune import masks as _masks
from jaxprune import scores as _scores
from jaxprune import tree as _tree

PyTree = Any
Schedule = Callable[[Any], Any]

__all__ = [
    "KeepMasksState",
    "PruneState",
    "apply_mask_to_updates",
    "get_masks",
    "keep_masks",
    "mask_grads",
    "prune",
]

_PROBE_STEPS = (0, 1, 2, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


# --------------------------------------------------------------------------
# Shared helpers (used by every pruning transform in the library)


def check_schedule(sparsity: Any, what: str = "sparsity") -> None:
    """Validates a number or schedule; probes a schedule at a few steps."""
    if callable(sparsity):
        for step in _PROBE_STEPS:
            try:
                val = sparsity(jnp.asarray(step, jnp.int32))
            except Exception as e:  # noqa: BLE001 - report any failure clearly
                raise ValueError(
                    f"{what} schedule failed when called on step {step} (an int32 array, "
                    f"as under jit): {type(e).__name__}: {e}"
                ) from e
            try:
                _masks.check_sparsity(val, f"{what}(step={step})")
            except ValueError as e:
                raise ValueError(
                    f"{e} The schedule must stay in [0, 1], e.g. "
                    "optax.polynomial_schedule(0.0, 0.9, power=3, transition_steps=1000)."
                ) from None
        return
    _masks.check_sparsity(sparsity, what)


def schedule_value(sparsity: Any, count: jax.Array) -> jax.Array:
    """The sparsity at ``count`` (a number, or a schedule called on it)."""
    val = sparsity(count) if callable(sparsity) else sparsity
    return jnp.clip(jnp.asarray(val, jnp.float32), 0.0, 1.0)


def mask_grads(grads: PyTree, masks: PyTree) -> PyTree:
    """Zeroes the gradients of pruned weights (dtype kept)."""
    return jax.tree.map(
        lambda g, m: g if m.ndim == 0 else jnp.where(m, g, jnp.zeros((), g.dtype)), grads, masks
    )


def apply_mask_to_updates(updates: PyTree, params: PyTree, masks: PyTree) -> PyTree:
    """``where(mask, u, -p)``: after ``optax.apply_updates`` pruned weights are
    exactly zero and kept weights get exactly ``p + u``. Leaves with a scalar
    mask pass their update through unchanged."""
    def one(u, p, m):
        if m.ndim == 0:
            return u
        return jnp.where(m, u, -p).astype(u.dtype)

    return jax.tree.map(one, updates, params, masks)


def initial_masks(params: PyTree, where: Any) -> PyTree:
    """All-True masks: bool arrays for selected leaves, scalar True elsewhere."""
    sel = _tree.select(params, where)
    _, leaves, treedef = _tree.flatten(params)
    out = [
        jnp.ones(jnp.shape(x), jnp.bool_) if s else jnp.ones((), jnp.bool_)
        for x, s in zip(leaves, sel)
    ]
    return _tree.unflatten(treedef, out)


def validate_params(params: PyTree, where: Any, what: str) -> None:
    """Checks that ``where`` selects float leaves of ``params``."""
    if params is None:
        raise ValueError(
            f"{what} needs the parameters: call tx.update(grads, opt_state, params) "
            "(and in a chain, every transform receives them)."
        )
    paths, leaves, _, sel = _masks._selected(params, where, "params")
    for p, x, s in zip(paths, leaves, sel):
        if s and jnp.ndim(x) == 0:
            raise ValueError(
                f"{what}: where= selects the scalar leaf {p!r}; a scalar cannot be pruned "
                "(its mask would be the 'not pruned' scalar True). Exclude it from where=."
            )


def require_params(params: PyTree, what: str) -> None:
    if params is None:
        raise ValueError(
            f"{what}.update needs params: call tx.update(grads, opt_state, params). "
            "Pruning scores and masks are computed from the current parameters."
        )


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
      where: which leaves to prune (default: float leaves with ndim >= 2).
      nested: keep pruned weights pruned (see above).
      seed: seed of the PRNG key used by random scores.

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
      >>> jp.sparsity(params)
      0.5

    References:
      Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of
      pruning for model compression", 2017; Han et al., "Learning both weights
      and connections for efficient neural networks", NeurIPS 2015.
    """
    return scheduled_masks(
        inner, sparsity=sparsity, score=score, allocation=allocation,
        update_every=update_every, where=where, nested=nested, seed=seed,
        apply=True, name="prune",
    )


def scheduled_masks(
    inner: optax.GradientTransformation,
    *,
    sparsity: float | Schedule,
    score: Any,
    allocation: Any,
    update_every: Any,
    where: Any,
    nested: bool,
    seed: int,
    apply: bool,
    name: str,
) -> optax.GradientTransformationExtraArgs:
    """The engine of :func:`prune` and :func:`jaxprune.ste`: masks recomputed on
    a schedule and kept in a :class:`PruneState`. With ``apply=True`` they are
    applied to gradients and updates (pruning); with ``apply=False`` the
    weights stay dense and the model applies the masks (straight-through)."""
    check_schedule(sparsity)
    scorer = _scores.get_scorer(score)
    _alloc.check(allocation)
    if isinstance(update_every, (int, np.integer)) and update_every < 1:
        raise ValueError(f"update_every must be a positive int, got {update_every!r}.")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        validate_params(params, where, name)
        _alloc.check(allocation, params, where)
        return PruneState(
            count=jnp.zeros((), jnp.int32),
            masks=initial_masks(params, where),
            score_state=scorer.init(params),
            key=jax.random.key_data(jax.random.key(seed)),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        require_params(params, name)
        grads = updates
        score_state = scorer.update(state.score_state, params, grads)
        s_now = schedule_value(sparsity, state.count)

        def recompute(key_data):
            key, sub = jax.random.split(jax.random.wrap_key_data(key_data))
            scores = scorer.score(score_state, params, grads, sub)
            # Nested masks: pruned weights score -inf, so they stay pruned.
            scores = jax.tree.map(
                lambda sc, m: sc if m.ndim == 0 else jnp.where(m | jnp.logical_not(nested), sc, -jnp.inf),
                scores,
                state.masks,
            )
            new = _alloc.compute_masks(scores, s_now, allocation, where, params, state.count)
            return new, jax.random.key_data(key)

        is_update = (state.count % update_every) == 0
        masks, key_data = lax.cond(
            is_update, recompute, lambda k: (state.masks, k), state.key
        )
        if apply:
            g = mask_grads(grads, masks)
            u, inner_state = inner.update(g, state.inner_state, params, **extra_args)
            u = apply_mask_to_updates(u, params, masks)
        else:  # straight-through: dense weights, the model applies the masks
            u, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        return u, PruneState(
            count=optax.safe_increment(state.count),
            masks=masks,
            score_state=score_state,
            key=key_data,
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
        _masks._check_same_structure(params, masks, "params", "masks")
        # Re-home the masks in the parameters' containers (e.g. NNX Params).
        leaves = [jnp.asarray(m, jnp.bool_) for m in jax.tree_util.tree_leaves(masks)]
        treedef = jax.tree_util.tree_structure(params)
        return KeepMasksState(masks=jax.tree_util.tree_unflatten(treedef, leaves))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, "keep_masks")
        return apply_mask_to_updates(updates, params, state.masks), state

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
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "masks")
    if not found:
        raise ValueError(
            "no masks found in this optimizer state. Is a jaxprune transform "
            "(prune, lottery_ticket, keep_masks, ...) part of the optimizer?"
        )
    # Keep the outermost ones (a state nested inside another's masks is not ours).
    if len(found) > 1:
        paths = [p for p, _ in found]
        raise ValueError(
            f"several transforms hold masks (at {paths}); pick one with "
            "optax.tree_utils.tree_get_all_with_path(opt_state, 'masks')."
        )
    return found[0][1]

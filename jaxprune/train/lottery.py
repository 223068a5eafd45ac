"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding.

:func:`lottery_ticket` runs the whole IMP schedule of Frankle & Carbin (2019)
inside one optax transformation, so a single jit-compiled training step runs
every round:

1. train for a round of ``steps_per_round`` update calls;
2. prune ``prune_rate`` of the weights that are still alive (magnitude, or
   any score), so after round ``r`` the sparsity is exactly
   ``1 - (1 - prune_rate) ** r``;
3. rewind the survivors to their values ``theta_k`` at step ``rewind_step``
   (``theta_0``, the initialisation, when ``rewind_step=0``; Frankle et al.
   2020 for ``k > 0``), zero the pruned ones, restart the inner optimizer;
4. repeat for ``rounds`` rounds, then keep training the final ticket.

The optimizer only sees the parameters. Other model state (Flax Linen
``batch_stats``, any collection the step updates) is rewound with them by
:func:`rewind_extra`, called after every update: it takes its snapshot in the
update that took the parameters' snapshot and restores it in every update
that rewound them (:attr:`LotteryState.event` says which). With
``rewind_step=0`` initialise its snapshot with ``snapshot(extra)``::

    extra_snap = jp.lottery.snapshot(variables["batch_stats"])
    ...  # in the jitted step, after tx.update:
    batch_stats, extra_snap = jp.lottery.rewind_extra(opt_state, new_batch_stats, extra_snap)

The functional pieces are here too, for users who drive rounds themselves
(:func:`snapshot`, :func:`rewind`, :func:`imp_sparsity`), and the controls of
the lottery-ticket experiments: :func:`random_reinit` (the ticket's mask, a
fresh initialisation), :func:`jaxprune.masks.random_like` (a random mask
with the ticket's per-layer sparsity) and :func:`shuffle_mask` (the ticket's
mask permuted within each layer).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> import jaxprune as jp
  >>> params = {"w": jax.random.normal(jax.random.key(0), (10, 10))}
  >>> tx = jp.lottery_ticket(optax.sgd(0.1), rounds=2, steps_per_round=3,
  ...                        prune_rate=0.5)
  >>> state = tx.init(params)
  >>> step = jax.jit(lambda p, s: tx.update(p, s, p))  # grads = params
  >>> for _ in range(6):
  ...     u, state = step(params, state)
  ...     params = optax.apply_updates(params, u)
  >>> int(jp.lottery.current_round(state)), float(jp.lottery.current_sparsity(state))
  (2, 0.75)

References:
  Frankle & Carbin, "The lottery ticket hypothesis: finding sparse, trainable
  neural networks", ICLR 2019; Frankle, Dziugaite, Roy & Carbin, "Linear mode
  connectivity and the lottery ticket hypothesis", ICML 2020 (late
  rewinding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune import _deprecation
from jaxprune.core import allocation as _alloc
from jaxprune.core import masks as _masks
from jaxprune.core import scores as _scores
from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree
from jaxprune.train import base as _base

__all__ = [
    "REWOUND",
    "SNAPSHOT",
    "LotteryState",
    "current_round",
    "current_sparsity",
    "imp_sparsity",
    "lottery_ticket",
    "random_reinit",
    "rewind",
    "rewind_extra",
    "rewound_params",
    "shuffle_mask",
    "snapshot",
]

SNAPSHOT = 1
"""Bit of :attr:`LotteryState.event`: this update took the snapshot."""
REWOUND = 2
"""Bit of :attr:`LotteryState.event`: this update rewound the parameters."""


# --------------------------------------------------------------------------
# Exact per-round keep counts


def imp_sparsity(round: Any, prune_rate: Any = 0.2) -> Any:
    """Sparsity after ``round`` rounds of IMP: ``1 - (1 - prune_rate) ** round``.

    Each round prunes ``prune_rate`` of the weights still alive. Works on
    Python numbers (returns a float) and on arrays (elementwise).

    Args:
      round: the number of pruning rounds done (0 = dense).
      prune_rate: fraction of the remaining weights pruned per round.

    Returns:
      The fraction of zeros among the selected weights.

    Example:
      >>> round(imp_sparsity(10, 0.2), 4)
      0.8926

    References:
      Frankle & Carbin, "The lottery ticket hypothesis", ICLR 2019.
    """
    if isinstance(round, (int, float, np.number)) and isinstance(prune_rate, (int, float, np.number)):
        return 1.0 - (1.0 - float(prune_rate)) ** float(round)
    return 1.0 - (1.0 - jnp.asarray(prune_rate, jnp.float32)) ** jnp.asarray(round, jnp.float32)


def _keep_table(n: int, rounds: int, prune_rate: float) -> list[int]:
    """``round(n * (1 - prune_rate) ** r)`` for ``r = 0 .. rounds`` (float64,
    half to even: the rule of :func:`jaxprune.select.keep_count`)."""
    return [int(np.clip(np.round(n * (1.0 - prune_rate) ** r), 0, n)) for r in range(rounds + 1)]


# --------------------------------------------------------------------------
# lottery_ticket


class LotteryState(NamedTuple):
    """State of :func:`lottery_ticket`.

    Attributes:
      count: number of ``update`` calls so far (int32). Round ``r`` spans
        calls ``r * steps_per_round`` to ``(r + 1) * steps_per_round - 1``;
        the last call of each of the first ``rounds`` rounds prunes and
        rewinds.
      round: pruning rounds done so far (int32, ``0 .. rounds``); the
        selected weights are at sparsity ``1 - (1 - prune_rate) ** round``.
      event: what the last update did (int32 bits): 0 nothing special,
        :data:`SNAPSHOT` (1) it took the snapshot, :data:`REWOUND` (2) it
        rewound, 3 both (``rewind_step == steps_per_round - 1``). Read by
        :func:`rewind_extra`.
      masks: bool mask tree (scalar ``True`` for leaves not pruned).
      snapshot: the parameters ``theta_k`` at step ``rewind_step`` (taken by
        ``init`` when ``rewind_step=0``, by the update at count ``k``
        otherwise), unmasked.
      score_state: accumulators of the score (empty for magnitude).
      key: PRNG key data, for random scores.
      inner_state: the wrapped optimizer's state (re-initialised at every
        rewind).
    """

    count: jax.Array
    round: jax.Array
    event: jax.Array
    masks: PyTree
    snapshot: PyTree
    score_state: PyTree
    key: jax.Array
    inner_state: optax.OptState


_INJECT_HINT = (
    " Under optax.inject_hyperparams pass it in static_args, e.g. "
    "optax.inject_hyperparams(jp.lottery_ticket, static_args=('rounds', "
    "'steps_per_round', 'prune_rate'))."
)


def _static_int(value: Any, name: str, low: int, fix: str) -> int:
    """A Python int (a concrete 0-d integer array is accepted), >= low."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a concrete int (it sets the round schedule), got a traced "
            f"value.{_INJECT_HINT}"
        )
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0 and value.dtype.kind in "iu":
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}). {fix}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}. {fix}")
    return int(value)


def _rewind_step(rewind_step: Any, steps_per_round: int) -> Any:
    if isinstance(rewind_step, jax.core.Tracer):
        return rewind_step  # injected by optax.inject_hyperparams: used as is
    k = _static_int(rewind_step, "lottery_ticket: rewind_step", 0,
                    "Use 0 to rewind to the initialisation or k > 0 for late rewinding.")
    if k >= steps_per_round:
        raise ValueError(
            f"lottery_ticket: rewind_step={k} must be < steps_per_round={steps_per_round}: "
            "the snapshot is taken during the first round. Use a smaller rewind_step "
            "(e.g. 0 to rewind to the initialisation)."
        )
    return k


def _prune_rate(prune_rate: Any) -> float:
    if isinstance(prune_rate, jax.core.Tracer):
        raise TypeError(
            "lottery_ticket: prune_rate must be a concrete number (it sets the exact "
            f"kept count of every round), got a traced value.{_INJECT_HINT}"
        )
    if isinstance(prune_rate, (np.ndarray, jax.Array)) and prune_rate.ndim == 0:
        prune_rate = float(prune_rate)
    if isinstance(prune_rate, bool) or not isinstance(prune_rate, (int, float, np.number)):
        raise TypeError(
            f"lottery_ticket: prune_rate must be a number in (0, 1), got {prune_rate!r}."
        )
    if not (0.0 < float(prune_rate) < 1.0):
        raise ValueError(
            f"lottery_ticket: prune_rate must be in (0, 1) (the fraction of the remaining "
            f"weights pruned per round), got {prune_rate!r}. Frankle & Carbin use 0.2."
        )
    return float(prune_rate)


class _Plan(NamedTuple):
    """The static schedule and choices of a :func:`lottery_ticket`."""

    rounds: int
    steps_per_round: int
    rewind_step: Any  # an int, or a tracer under inject_hyperparams
    prune_rate: float
    scorer: _scores.Scorer
    allocation: Any
    where: Any
    layers: Any = None
    layer_axis: int = 0


def _plan(rounds, steps_per_round, prune_rate, rewind_step, allocation, score, where,
          layers=None, layer_axis=0) -> _Plan:
    """Checks the arguments of :func:`lottery_ticket`."""
    r = _static_int(rounds, "lottery_ticket: rounds", 1,
                    "Pass the number of pruning rounds, e.g. rounds=10.")
    s = _static_int(steps_per_round, "lottery_ticket: steps_per_round", 1,
                    "Pass the update calls per round, e.g. steps_per_round=1500.")
    k = _rewind_step(rewind_step, s)
    rate = _prune_rate(prune_rate)
    scorer = _scores.get_scorer(score)
    _alloc.check(allocation)
    return _Plan(r, s, k, rate, scorer, allocation, where, layers, layer_axis)


def _round_keep(plan: _Plan, params: PyTree, scores: PyTree, next_round: jax.Array) -> Any:
    """What the next round keeps: ``keep=`` for ``"global"`` (an int) and
    ``"uniform"`` (a per-leaf tree of ints, per layer for stacked leaves),
    else the overall sparsity."""
    _, leaves, _ = _tree.flatten(params)
    sel = _tree.flags(params, plan.where)
    stack = _tree.stacked_axes(params, plan.layers, plan.layer_axis, sel, "lottery_ticket")
    if plan.allocation != "uniform":  # "global" counts all weights together
        stack = [None] * len(stack)
    # a stacked leaf's count is per layer (every layer prunes its own share)
    sizes = [int(np.size(x)) // (1 if a is None else max(np.shape(x)[a], 1))
             for x, on, a in zip(leaves, sel, stack) if on]
    if plan.allocation == "global":
        table = _keep_table(sum(sizes), plan.rounds, plan.prune_rate)
        return jnp.asarray(np.array(table, np.int32))[next_round]
    if plan.allocation == "uniform":
        cols = iter([jnp.asarray(np.array(_keep_table(n, plan.rounds, plan.prune_rate),
                                          np.int32))[next_round] for n in sizes])
        per_leaf = [next(cols) if on else 0 for on in sel]
        return _tree.unflatten(jax.tree_util.tree_structure(scores), per_leaf)
    table = [imp_sparsity(r, plan.prune_rate) for r in range(plan.rounds + 1)]
    return jnp.asarray(np.array(table, np.float32))[next_round]


def _new_masks(plan: _Plan, state: LotteryState, params: PyTree, grads: PyTree,
               score_state: PyTree) -> tuple[PyTree, jax.Array]:
    """The next round's masks (nested in the current ones) and key data."""
    key_data, sub = _base.split_key(state.key)
    scores = plan.scorer.score(score_state, params, grads, sub)
    scores = _base.nested_scores(scores, state.masks)
    keep = _round_keep(plan, params, scores, state.round + 1)
    treedef = jax.tree_util.tree_structure(scores)
    sel = _tree.flags(params, plan.where)
    chosen = _tree.unflatten(treedef, sel)
    stack = None if plan.layers is None else _tree.unflatten(treedef, [
        a is not None for a in _tree.stacked_axes(params, plan.layers, plan.layer_axis, sel,
                                                  "lottery_ticket")])
    if plan.allocation == "global":
        masks = _masks.global_topk(scores, where=chosen, keep=keep)
    elif plan.allocation == "uniform":
        masks = _masks.topk(scores, where=chosen, keep=keep, layers=stack,
                            layer_axis=plan.layer_axis)
    else:
        masks = _alloc.masks(scores, keep, allocation=plan.allocation, where=plan.where,
                             params=params,
                             step=state.count, layers=stack, layer_axis=plan.layer_axis)
    masks = jax.tree.map(lambda new, old: new & old, masks, state.masks)
    return masks, key_data


def _take_snapshot(plan: _Plan, state: LotteryState, params: PyTree):
    """``(snapshot, took)``: the parameters of the update at count
    ``rewind_step`` (``k > 0``), else the stored snapshot."""
    if isinstance(plan.rewind_step, int) and plan.rewind_step == 0:
        return state.snapshot, jnp.zeros((), jnp.bool_)
    took = state.count == plan.rewind_step
    snap = lax.cond(took, lambda: jax.tree.map(jnp.asarray, params), lambda: state.snapshot)
    return snap, took


def _round_end(plan: _Plan, state: LotteryState, params: PyTree, grads: PyTree) -> dict:
    """What a round end changes in the state: the next round's masks, key
    and round, and a fresh score state for the rewound weights."""
    masks, key_data = _new_masks(plan, state, params, grads, state.score_state)
    return {"masks": masks, "key": key_data, "round": state.round + 1,
            "score_state": plan.scorer.init(rewind(state.snapshot, masks))}


def _rewind_or_train(end: jax.Array, inner, grads: PyTree, state: LotteryState,
                     params: PyTree, extra_args) -> tuple[PyTree, Any]:
    """The step of :func:`lottery_ticket` (``state``: after the round end's
    new masks): on a round end the survivors are rewound to the snapshot
    (emitted as ``rewound - p``) with a fresh inner state; otherwise the
    masked inner step."""
    def train():
        return _base.masked_update(inner, grads, state.inner_state, params, state.masks,
                                   **extra_args)

    def rewound():
        new = rewind(state.snapshot, state.masks)
        u = jax.tree.map(lambda r, p, t: (r - p).astype(t.dtype) if _tree.is_float(p)
                         else np.zeros(t.shape, t.dtype),  # keys, counters, flags: not rewound
                         new, params, like)
        return u, inner.init(new)

    like = jax.eval_shape(train)[0]
    return lax.cond(end, rewound, train)


def lottery_ticket(
    inner: optax.GradientTransformation,
    *,
    rounds: int,
    steps_per_round: int,
    prune_rate: float = 0.2,
    rewind_step: int = 0,
    allocation: Any = "global",
    score: str | Callable[..., PyTree] | _scores.Scorer = "magnitude",
    where: Any = None,
    seed: int = 0,
    layers: Any = None,
    layer_axis: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so training runs iterative magnitude pruning with rewinding.

    The whole IMP schedule lives in the optimizer state. With
    ``S = steps_per_round`` and ``count`` the number of update calls so far:

    * at ``count == rewind_step`` the parameters are saved as the snapshot
      ``theta_k`` (at ``init`` when ``rewind_step=0``: ``theta_0``);
    * ordinary calls mask the gradients of pruned weights before ``inner``
      and emit ``where(mask, u, -p)``, so pruned weights stay exactly zero;
    * the *round-end* call (``count % S == S - 1``, for the first ``rounds``
      rounds) does no gradient step. It scores the parameters it receives
      (the weights trained for this round) with pruned weights scoring
      ``-inf``, keeps exactly ``round(n * (1 - prune_rate) ** (r + 1))`` of
      the ``n`` selected weights (masks are nested), emits
      ``where(mask, theta_k - p, -p)`` (survivors back to ``theta_k``,
      pruned weights to zero; unselected leaves such as biases are rewound
      too) and resets the inner state to ``inner.init(rewound)`` (fresh
      moments; an inner learning-rate schedule restarts with its count).

    So each round is ``S - 1`` training steps and a round-end call, and after
    ``rounds * S`` calls the final ticket (sparsity
    ``1 - (1 - prune_rate) ** rounds``) keeps training with fixed masks.
    Evaluate the trained weights of round ``r`` *before* its round-end call
    (when ``count % S == S - 1``): that call replaces them by the rewound
    ticket. The round-end branch runs under :func:`jax.lax.cond`, so one
    compiled step serves every round, also inside :func:`jax.lax.scan`.

    ``optax.apply_updates`` yields ``p + (theta_k - p)``, which may differ
    from ``theta_k`` by a rounding; :func:`rewound_params` returns the exact
    ``theta_k * mask`` from the state. Model state outside the parameters
    (BatchNorm statistics) is rewound by :func:`rewind_extra` (module
    docstring).

    Sparsity is exact for ``allocation="global"`` (counted over all selected
    weights together) and ``"uniform"`` (per leaf): both get integer keep
    counts (``keep=`` of :func:`jaxprune.masks.global_topk` and
    :func:`jaxprune.masks.topk`). Other allocations (``"erk"``, a dict, a
    callable) get the overall sparsity ``1 - (1 - prune_rate) ** r`` and are
    intersected with the previous mask so tickets stay nested.

    Args:
      inner: the optimizer to wrap (any optax transformation).
      rounds: number of pruning rounds (``>= 1``).
      steps_per_round: update calls per round, the round-end call included
        (``>= 1``).
      prune_rate: fraction of the remaining selected weights pruned at each
        round end, in ``(0, 1)``; 0.2 in Frankle & Carbin.
      rewind_step: the step ``k`` whose parameters survivors are rewound to;
        ``0`` rewinds to the initialisation, ``k > 0`` is late rewinding
        (must be ``< steps_per_round``).
      allocation: ``"global"`` (default: one threshold over all selected
        weights, as in Frankle & Carbin), ``"uniform"`` (every leaf at the
        same sparsity) or any allocation of :mod:`jaxprune.allocation`.
      score: ``"magnitude"`` (IMP) or any ``score=`` accepted by
        :func:`jaxprune.prune`; gradient scores see the gradients passed to
        the round-end call.
      where: which leaves to prune (default: :func:`jaxprune.tree.is_kernel`).
      seed: seed of the PRNG key used by random scores.
      layers: which pruned leaves are stacks of layers (``nnx.scan``,
        MaxText): a ``where=``-style selection or a model graph. With
        ``"uniform"`` every layer keeps exactly ``round(n * (1 - prune_rate)
        ** r)`` of its ``n`` weights, as if it were its own leaf (ERK and
        the other allocations also budget per layer); ``"global"`` counts
        all weights together either way.
      layer_axis: the layer axis of the stacked leaves (default 0).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`LotteryState`; :func:`jaxprune.get_masks` finds its masks.

    Raises:
      ValueError / TypeError: for ``prune_rate`` outside ``(0, 1)``,
        ``rounds < 1``, ``steps_per_round < 1``, ``rewind_step`` outside
        ``[0, steps_per_round)``; at ``update`` time if ``params`` is
        missing.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
      >>> tx = jp.lottery_ticket(optax.adam(1e-2), rounds=3, steps_per_round=5)
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def train_step(p, s):
      ...     g = jax.grad(lambda p: jnp.sum((p["w"] - 1.0) ** 2))(p)
      ...     u, s = tx.update(g, s, p)
      ...     return optax.apply_updates(p, u), s
      >>> for _ in range(15):
      ...     params, state = train_step(params, state)
      >>> int(jp.get_masks(state)["w"].sum()), round(256 * 0.8 ** 3)
      (131, 131)
      >>> ticket = jp.lottery.rewound_params(state)  # theta_0 * mask, exact

    References:
      Frankle & Carbin, "The lottery ticket hypothesis: finding sparse,
      trainable neural networks", ICLR 2019; Frankle, Dziugaite, Roy &
      Carbin, "Linear mode connectivity and the lottery ticket hypothesis",
      ICML 2020 (rewinding to ``theta_k``, ``k > 0``).
    """
    plan = _plan(rounds, steps_per_round, prune_rate, rewind_step, allocation, score, where,
                 layers, layer_axis)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        _base.validate_params(params, where, "lottery_ticket")
        _alloc.check(allocation, params, where, layers=layers, layer_axis=layer_axis,
                     what="lottery_ticket")
        zero = jnp.zeros((), jnp.int32)
        return LotteryState(
            count=zero, round=zero, event=zero, masks=_base.initial_masks(params, where),
            snapshot=jax.tree.map(jnp.asarray, params), score_state=plan.scorer.init(params),
            key=_base.seed_key(seed), inner_state=inner.init(params),
        )

    def is_end(state):
        return (state.count % plan.steps_per_round == plan.steps_per_round - 1) & (
            state.round < plan.rounds)

    def before(state, params, updates):
        snap, took = _take_snapshot(plan, state, params)
        event = took.astype(jnp.int32) * SNAPSHOT + is_end(state).astype(jnp.int32) * REWOUND
        return state._replace(event=event, snapshot=snap, score_state=plan.scorer.update(
            state.score_state, params, updates))

    def update_fn(updates, state, params=None, **extra_args):
        return _base.scheduled_update(
            "lottery_ticket", inner, updates, state, params, extra_args,
            is_update=is_end,
            recompute=lambda s: _round_end(plan, s, params, updates),
            fields=("masks", "key", "round", "score_state"),
            before=lambda s: before(s, params, updates),
            step=lambda s, masks: _rewind_or_train(is_end(state), inner, updates, s, params,
                                                   extra_args))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# Reading the state


def _find_state(opt_state: optax.OptState) -> LotteryState:
    if isinstance(opt_state, LotteryState):
        return opt_state
    return _base.find_in_state(
        opt_state, "LotteryState",
        "no lottery_ticket state found in this optimizer state. Pass the state "
        "of an optimizer built with jaxprune.lottery_ticket(...) (alone, in "
        "optax.chain, MultiSteps or inject_hyperparams).",
        "several lottery_ticket states found (at {paths}); pass the one you "
        "mean, e.g. optax.tree_utils.tree_get_all_with_path(state, 'LotteryState').")


def current_round(opt_state: optax.OptState) -> jax.Array:
    """The number of pruning rounds done so far (int32 array, ``0 .. rounds``).

    Finds the :class:`LotteryState` anywhere in a chained or wrapped state.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> tx = optax.chain(optax.clip(1.0),
      ...                  jp.lottery_ticket(optax.sgd(0.1), rounds=2, steps_per_round=4))
      >>> int(current_round(tx.init({"w": jnp.ones((4, 4))})))
      0
    """
    return _find_state(opt_state).round


def current_sparsity(opt_state: optax.OptState) -> jax.Array:
    """Fraction of zeros among the selected weights of the current masks (float32).

    Equals ``imp_sparsity(current_round(state), prune_rate)`` up to the exact
    rounding of the kept count. Works under ``jit``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> tx = jp.lottery_ticket(optax.sgd(0.1), rounds=2, steps_per_round=4)
      >>> float(current_sparsity(tx.init({"w": jnp.ones((4, 4))})))
      0.0
    """
    masks = _find_state(opt_state).masks
    leaves = [m for m in jax.tree_util.tree_leaves(masks) if jnp.ndim(m) > 0]
    total = sum(int(m.size) for m in leaves)
    if total == 0:
        return jnp.zeros((), jnp.float32)
    kept = sum(jnp.sum(m, dtype=jnp.int32) for m in leaves)
    return (jnp.float32(total) - kept.astype(jnp.float32)) / jnp.float32(total)


def rewound_params(opt_state: optax.OptState) -> PyTree:
    """The current ticket ``theta_k * mask``, bit-exact, from the state.

    Right after a round-end call the parameters obtained through
    ``optax.apply_updates`` are ``p + (theta_k - p)``, which can differ from
    ``theta_k`` by a rounding; this returns the exact values (use it to
    replace the parameters, or to evaluate the ticket at its rewind point).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> p = {"w": jnp.arange(16.0).reshape(4, 4)}
      >>> tx = jp.lottery_ticket(optax.sgd(0.1), rounds=1, steps_per_round=1,
      ...                        prune_rate=0.5)
      >>> s = tx.init(p)
      >>> _, s = tx.update(p, s, p)
      >>> rewound_params(s)["w"][0].tolist(), rewound_params(s)["w"][3].tolist()
      ([0.0, 0.0, 0.0, 0.0], [12.0, 13.0, 14.0, 15.0])
    """
    st = _find_state(opt_state)
    return rewind(st.snapshot, st.masks)


# --------------------------------------------------------------------------
# Functional pieces


def snapshot(params: PyTree) -> PyTree:
    """A copy of the parameters, to rewind to later (``theta_k``).

    Args:
      params: the parameters at the rewind point (step 0 or ``k``).

    Returns:
      A tree of fresh arrays with the same values, dtypes and structure.

    Example:
      >>> import jax.numpy as jnp
      >>> theta0 = snapshot({"w": jnp.ones((2, 2))})
      >>> theta0["w"].sum().item()
      4.0

    References:
      Frankle & Carbin, "The lottery ticket hypothesis", ICLR 2019.
    """
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


def rewind(snapshot: PyTree, masks: PyTree) -> PyTree:
    """Resets a ticket: ``where(mask, theta_k, 0)``, bit-exact.

    Leaves with a scalar ``True`` mask (not pruned) are returned as they are
    in the snapshot; dtypes are kept.

    Args:
      snapshot: the parameters at the rewind point (:func:`snapshot`).
      masks: a mask tree with the structure of ``snapshot``.

    Returns:
      The rewound parameters.

    Example:
      >>> import jax.numpy as jnp
      >>> p = rewind({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([True, False])})
      >>> p["w"].tolist()
      [1.0, 0.0]

    References:
      Frankle & Carbin, "The lottery ticket hypothesis", ICLR 2019; Frankle
      et al., "Linear mode connectivity and the lottery ticket hypothesis",
      ICML 2020.
    """

    return _masks.apply_masks(jax.tree.map(jnp.asarray, snapshot), masks)


def rewind_extra(opt_state: optax.OptState, extra: PyTree,
                 extra_snapshot: PyTree) -> tuple[PyTree, PyTree]:
    """Snapshots and rewinds model state outside the parameters with them.

    :func:`lottery_ticket` rewinds the parameters it sees; other collections
    the model updates while training (Flax Linen ``batch_stats``, running
    averages) belong to the same rewind point. Call this after every update
    with the new values of those collections and their snapshot: when the
    update took the parameters' snapshot (:data:`SNAPSHOT` in
    :attr:`LotteryState.event`) the snapshot becomes ``extra``; when it
    rewound the parameters (:data:`REWOUND`), ``extra`` becomes the snapshot,
    exactly. Otherwise both pass through. With ``rewind_step=0`` (snapshot
    at ``init``) start from ``extra_snapshot = snapshot(extra)`` at
    initialisation; with ``rewind_step=k > 0`` the snapshot holds the
    collections as passed to the call whose update took the parameters'
    snapshot. Works under ``jit`` and inside ``lax.scan``. (Under
    ``optax.MultiSteps`` call it only on the steps where MultiSteps applied
    an update.)

    Args:
      opt_state: the optimizer state after the update (a
        :class:`LotteryState`, alone or inside a chain or wrapper).
      extra: the collections after this step (any pytree of arrays).
      extra_snapshot: their snapshot, a pytree of the same structure.

    Returns:
      ``(extra, extra_snapshot)`` to carry to the next step.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> p = {"w": jnp.arange(16.0).reshape(4, 4)}
      >>> tx = jp.lottery_ticket(optax.sgd(0.1), rounds=1, steps_per_round=2)
      >>> s, stats = tx.init(p), {"mean": jnp.zeros(4)}
      >>> snap = jp.lottery.snapshot(stats)
      >>> for step in range(2):
      ...     _, s = tx.update(p, s, p)
      ...     stats = {"mean": stats["mean"] + 1.0}  # the model's running average moves
      ...     stats, snap = jp.lottery.rewind_extra(s, stats, snap)
      ...     print(int(s.event), stats["mean"].tolist())
      0 [1.0, 1.0, 1.0, 1.0]
      2 [0.0, 0.0, 0.0, 0.0]

    References:
      Frankle et al., "Linear mode connectivity and the lottery ticket
      hypothesis", ICML 2020 (rewinding the whole training state).
    """
    event = _find_state(opt_state).event
    took, rewound = (event & SNAPSHOT) != 0, (event & REWOUND) != 0
    _tree.check_same_structure(extra, extra_snapshot, "extra", "extra_snapshot")
    snap = jax.tree.map(lambda e, s: jnp.where(took, e, s).astype(jnp.result_type(s)),
                        extra, extra_snapshot)
    extra = jax.tree.map(lambda e, s: jnp.where(rewound, s, e).astype(jnp.result_type(e)),
                         extra, snap)
    return extra, snap


random_mask = _deprecation.alias(_masks.random_like, "jaxprune.lottery.random_mask",
                                 "jaxprune.masks.random_like")


def shuffle_mask(key: jax.Array, masks: PyTree, axis: int | None = None) -> PyTree:
    """The mask permuted at random within each layer.

    With ``axis=None`` each array leaf's entries are permuted as a whole
    (layer-wise shuffling: same per-layer sparsity, as in Frankle et al.
    2021); with an ``axis`` the entries are permuted independently within
    each slice along ``axis`` (e.g. ``axis=0`` for a Dense kernel
    ``(in, out)`` keeps every output unit's fan-in). Scalar leaves pass
    through.

    Args:
      key: a PRNG key.
      masks: a mask tree.
      axis: ``None`` or the axis along which entries are permuted.

    Returns:
      A mask tree with exactly the same kept count per leaf (and per slice
      with ``axis``). Works under ``jit``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = {"w": jnp.array([[True, False], [True, True]])}
      >>> s = shuffle_mask(jax.random.key(1), m, axis=0)
      >>> s["w"].sum(axis=0).tolist()
      [2, 1]

    References:
      Frankle, Dziugaite, Roy & Carbin, "Pruning neural networks at
      initialization: why are we missing the mark?", ICLR 2021.
    """
    leaves, treedef = jax.tree_util.tree_flatten(masks)
    out = []
    for i, m in enumerate(leaves):
        m = jnp.asarray(m, jnp.bool_)
        if m.ndim == 0 or m.size == 0:
            out.append(m)
            continue
        k = jax.random.fold_in(key, i)
        if axis is None:
            out.append(jax.random.permutation(k, m.reshape(-1)).reshape(m.shape))
        else:
            if not -m.ndim <= axis < m.ndim:
                raise ValueError(
                    f"shuffle_mask: axis={axis} is out of range for a mask of shape "
                    f"{m.shape}. Use axis=None or an axis of every pruned leaf."
                )
            out.append(jax.random.permutation(k, m, axis=axis, independent=True))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_reinit(
    key: jax.Array,
    init_fn_or_params: Callable[[jax.Array], PyTree] | PyTree,
    masks: PyTree,
) -> PyTree:
    """Same mask, fresh initialisation: the random re-init control.

    With a callable, the new parameters are ``init_fn(key)`` (e.g.
    ``lambda k: model.init(k, x)["params"]``), masked. With a parameter
    tree, every leaf is replaced by a random permutation of its own values
    (a fresh draw from the same per-layer distribution, whatever the
    initialiser), masked.

    Args:
      key: a PRNG key.
      init_fn_or_params: ``key -> params`` or a parameter tree at
        initialisation.
      masks: the ticket's masks (structure of the parameters).

    Returns:
      The re-initialised, masked parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"w": jnp.arange(1.0, 7.0).reshape(2, 3)}
      >>> m = {"w": jnp.array([[True, False, True], [False, True, False]])}
      >>> q = random_reinit(jax.random.key(0), p, m)
      >>> int((q["w"] != 0).sum()), bool((q["w"] != 0).tolist() == m["w"].tolist())
      (3, True)

    References:
      Frankle & Carbin, "The lottery ticket hypothesis", ICLR 2019 (random
      reinitialisation destroys winning tickets).
    """
    if callable(init_fn_or_params):
        fresh = init_fn_or_params(key)
    else:
        leaves, treedef = jax.tree_util.tree_flatten(init_fn_or_params)
        out = []
        for i, x in enumerate(leaves):
            x = jnp.asarray(x)
            if x.ndim == 0 or x.size <= 1:
                out.append(x)
            else:
                k = jax.random.fold_in(key, i)
                out.append(jax.random.permutation(k, x.reshape(-1)).reshape(x.shape))
        fresh = jax.tree_util.tree_unflatten(treedef, out)
    return rewind(fresh, masks)

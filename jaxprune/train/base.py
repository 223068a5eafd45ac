"""The shared pieces of every pruning transform.

Every optax transformation in jaxprune (:func:`jaxprune.prune`,
:func:`jaxprune.keep_masks`, :func:`jaxprune.lottery_ticket`, SET, RigL,
STE) is built from these: argument checks (schedules, fractions, positive
ints), checks of the trees ``init`` and ``update`` receive, the masked
update step

``grads -> where(mask, g, 0) -> inner.update -> where(mask, u, -p)``

(so momentum and Adam moments of pruned weights stay exactly zero, and
``optax.apply_updates`` alone yields exactly zero pruned weights), the
scheduled step around it (:func:`scheduled_update`: checks, new masks under
``lax.cond`` on update steps, the masked step, the count), nested
scoring (pruned weights score ``-inf``) and PRNG key handling. Import
direction: this module sits between the pure functions (tree, select,
masks, scores, allocation) and the transforms (transforms, dynamic,
lottery, structured.prune); it imports only the former.

Example:
  >>> import jax.numpy as jnp, optax
  >>> params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  >>> masks = {"w": jnp.array([[True, False], [True, True]])}
  >>> inner = optax.sgd(1.0)
  >>> u, _ = masked_update(inner, params, inner.init(params), params, masks)
  >>> optax.apply_updates(params, u)["w"].tolist()
  [[0.0, 0.0], [0.0, 0.0]]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxprune.core import masks as _masks
from jaxprune.core import select as _select
from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree

__all__ = [
    "apply_mask_to_updates",
    "check_arrays",
    "check_fixed_sparsity",
    "check_fraction",
    "check_positive_int",
    "check_schedule",
    "check_update_trees",
    "find_in_state",
    "initial_masks",
    "is_traced",
    "mask_grads",
    "masked_update",
    "nested_scores",
    "require_params",
    "schedule_value",
    "scheduled_update",
    "seed_key",
    "split_key",
    "validate_params",
]

_PROBE_STEPS = (0, 1, 2, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


# --------------------------------------------------------------------------
# Argument checks


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (e.g. a hyperparameter injected under jit)."""
    return isinstance(x, jax.core.Tracer)


def check_schedule(sparsity: Any, what: str = "sparsity") -> None:
    """Validates a number or schedule; probes a schedule at a few steps."""
    if not callable(sparsity):
        _masks.check_sparsity(sparsity, what)
        return
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


def check_fixed_sparsity(sparsity: Any, what: str) -> None:
    """A number in [0, 1] (dynamic sparse training keeps one sparsity)."""
    if callable(sparsity):
        raise TypeError(
            f"{what}: sparsity must be a number (dynamic sparse training keeps a fixed "
            f"sparsity), got the callable {sparsity!r}. For a sparsity schedule use "
            "jp.prune(..., sparsity=optax.polynomial_schedule(...))."
        )
    _masks.check_sparsity(sparsity, "sparsity")


def check_fraction(value: Any, what: str, name: str = "drop_fraction") -> None:
    """A number in [0, 1] (traced values pass)."""
    if is_traced(value):
        return
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"{what}: {name} must be a number in [0, 1], got {type(value).__name__} "
            f"({value!r})."
        ) from None
    if v.ndim != 0 or isinstance(value, bool) or not (0.0 <= float(v) <= 1.0):
        raise ValueError(
            f"{what}: {name} must be a number in [0, 1] (the fraction of kept weights "
            f"exchanged per update), got {value!r}. Use e.g. {name}=0.3."
        )


def check_positive_int(value: Any, what: str, name: str) -> None:
    """An int >= 1: a Python or NumPy int, or a 0-d integer array (what
    ``optax.inject_hyperparams`` passes); a tracer must have an integer dtype.

    Raises:
      TypeError: for a float (``2.5``), a bool or anything not an integer.
      ValueError: for an integer below 1.
    """
    if is_traced(value):
        if not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(f"{what}: {name} must be an integer, got a traced {value.dtype}.")
        return
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0 and value.dtype.kind in "iu":
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{what}: {name} must be a positive int (a number of steps), got {value!r} "
            f"({type(value).__name__}). Use e.g. {name}=100."
        )
    if value < 1:
        raise ValueError(f"{what}: {name} must be a positive int, got {value!r}.")


def schedule_value(sparsity: Any, count: jax.Array) -> jax.Array:
    """The sparsity at ``count`` (a number, or a schedule called on it)."""
    val = sparsity(count) if callable(sparsity) else sparsity
    return jnp.clip(jnp.asarray(val, jnp.float32), 0.0, 1.0)


# --------------------------------------------------------------------------
# The trees init and update receive


def require_params(params: PyTree, what: str) -> None:
    """Raises ``ValueError`` if ``update`` was called without ``params``."""
    if params is None:
        raise ValueError(
            f"{what}.update needs params: call tx.update(grads, opt_state, params). "
            "Pruning scores and masks are computed from the current parameters."
        )


def check_arrays(params: PyTree, what: str) -> None:
    """Raises ``TypeError`` naming the first leaf of ``params`` that is not an
    array (an Equinox module's activation function) and how to filter it."""
    for p, x in zip(*_tree.flatten(params)[:2]):
        if not _tree.is_array(x):
            raise TypeError(
                f"{what}.init: leaf {p!r} of the parameters is a {type(x).__name__}, not an "
                "array; an optimizer can only hold arrays. For an Equinox model pass its "
                "arrays only: tx.init(eqx.filter(model, eqx.is_array)) (or "
                "params, static = eqx.partition(model, eqx.is_array))."
            )


def validate_params(params: PyTree, where: Any, what: str) -> None:
    """Checks, in ``init``, that ``params`` holds only arrays and that
    ``where`` selects float, non-scalar leaves of it."""
    if params is None:
        raise ValueError(
            f"{what} needs the parameters: call tx.init(params) "
            "(and in a chain, every transform receives them)."
        )
    check_arrays(params, what)
    paths, leaves, _, sel = _masks.selection(params, where, "params")
    for p, x, s in zip(paths, leaves, sel):
        if s and jnp.ndim(x) == 0:
            raise ValueError(
                f"{what}: where= selects the scalar leaf {p!r}; a scalar cannot be pruned "
                "(its mask would be the 'not pruned' scalar True). Exclude it from where=."
            )


def _collections_hint(state_paths: list[str], other_paths: list[str]) -> str:
    heads = sorted({p.split("/")[0] for p in state_paths})
    for head in heads:
        inner = [p[len(head) + 1:] for p in state_paths if p.startswith(head + "/")]
        if inner == other_paths:
            return (f" The state was built for a tree with the collections {heads}: call "
                    f"tx.init(variables[{head!r}]) with the parameters only (other collections "
                    "such as batch_stats are not trained by the optimizer).")
    return " Build the state with tx.init(params) from the same tree you pass to update."


def check_update_trees(grads: PyTree, params: PyTree, masks: PyTree, what: str) -> None:
    """Raises ``ValueError`` (at trace time) if the gradients or parameters
    given to ``update`` do not match the tree ``init`` built the state for."""
    ref = jax.tree_util.tree_structure(masks)
    for name, tree in (("gradients", grads), ("params", params)):
        if jax.tree_util.tree_structure(tree) == ref:
            continue
        state_paths, paths = _tree.paths(masks), _tree.paths(tree)
        if state_paths == paths:
            continue
        only_s = sorted(set(state_paths) - set(paths))[:5]
        only_t = sorted(set(paths) - set(state_paths))[:5]
        raise ValueError(
            f"{what}.update: the {name} do not match the tree the optimizer state was "
            f"initialised with. Leaves only in the state: {only_s}; only in the {name}: "
            f"{only_t}." + _collections_hint(state_paths, paths)
        )


def initial_masks(params: PyTree, where: Any) -> PyTree:
    """All-True masks: bool arrays for selected leaves, scalar True elsewhere."""
    sel = _tree.flags(params, where)
    _, leaves, treedef = _tree.flatten(params)
    out = [jnp.ones(jnp.shape(x) if s else (), jnp.bool_) for x, s in zip(leaves, sel)]
    return _tree.unflatten(treedef, out)


# --------------------------------------------------------------------------
# Masked updates


def mask_grads(grads: PyTree, masks: PyTree) -> PyTree:
    """Zeroes the gradients of pruned weights (dtype kept); leaves with a
    scalar mask pass through."""
    return jax.tree.map(lambda g, m: g if np.ndim(m) == 0 else _masks.apply_mask(g, m),
                        grads, masks)


def apply_mask_to_updates(updates: PyTree, params: PyTree, masks: PyTree) -> PyTree:
    """``where(mask, u, -p)``: after ``optax.apply_updates`` pruned weights are
    exactly zero and kept weights get exactly ``p + u``. Leaves with a scalar
    mask pass their update through unchanged."""
    def one(u, p, m):
        return u if np.ndim(m) == 0 else jnp.where(m, u, -p).astype(u.dtype)

    return jax.tree.map(one, updates, params, masks)


def masked_update(inner: optax.GradientTransformation, grads: PyTree, inner_state: Any,
                  params: PyTree, masks: PyTree, **extra_args: Any) -> tuple[PyTree, Any]:
    """The masked update step of every pruning transform.

    ``g = where(mask, grads, 0)``; ``u, s = inner.update(g, inner_state,
    params)``; returns ``(where(mask, u, -p), s)``.
    """
    g = mask_grads(grads, masks)
    u, inner_state = inner.update(g, inner_state, params, **extra_args)
    return apply_mask_to_updates(u, params, masks), inner_state


def scheduled_update(
    what: str,
    inner: optax.GradientTransformation,
    updates: PyTree,
    state: Any,
    params: PyTree,
    extra_args: Mapping[str, Any],
    *,
    is_update: Callable[[Any], jax.Array],
    recompute: Callable[[Any], dict],
    fields: tuple[str, ...] = ("masks", "key"),
    before: Callable[[Any], Any] | None = None,
    reset: Callable[[Any, PyTree], Any] | None = None,
    step: Callable[[Any, PyTree], tuple[PyTree, Any]] | None = None,
) -> tuple[PyTree, Any]:
    """The ``update`` of every transform whose masks change on a schedule.

    ``state`` is the transform's NamedTuple state, with at least ``count``,
    ``masks`` and ``inner_state``; the new state is ``state._replace(...)``,
    so its type and fields never change. The step is::

        require_params; check_update_trees(updates, params, state.masks)
        state = before(state)                  # fields updated every step
        new = cond(is_update(state), recompute, the state's fields)(state)
        state = state._replace(**new)          # only `fields` cross the cond
        inner_state = cond(is_update, reset(inner_state, train), inner_state)
        u, inner_state = step(state, train)    # default: masked_update(inner, updates,
                                               #   inner_state, params, train, **extra_args)
        return u, state._replace(count=count + 1, inner_state=inner_state)

    Args:
      what: the transform's name, for error messages.
      inner, updates, state, params, extra_args: what ``update_fn`` received.
      is_update: ``state -> bool`` scalar: is this an update step (e.g.
        ``count % update_every == 0``).
      recompute: ``state -> {field: new value}`` for every name in
        ``fields``, run on update steps only (under :func:`jax.lax.cond`,
        so other steps pay nothing for selection).
      fields: the state fields ``recompute`` replaces. The name ``"train"``
        is not a field: the masks the step trains with on this update when
        they are not the new masks (SET/RigL leave just-grown positions
        out); on other steps they are ``state.masks``.
      before: ``state -> state``, run on every step before the cond (score
        accumulators, a snapshot); ``None``: nothing.
      reset: ``(inner_state, train masks) -> inner_state`` on update steps,
        before the step, under its own cond whose identity branch XLA can
        alias (SET/RigL zero the moments of exchanged positions).
      step: ``(state, masks) -> (updates, inner_state)``, the inner step on
        the state after the cond (and ``reset``) with the masks it trains
        with; ``None``: :func:`masked_update` (straight-through training
        steps the dense weights instead, lottery tickets rewind on a round
        end).

    Returns:
      ``(updates, new state)``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from typing import NamedTuple
      >>> class S(NamedTuple):
      ...     count: jnp.ndarray
      ...     masks: dict
      ...     key: jnp.ndarray
      ...     inner_state: tuple
      >>> params = {"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])}
      >>> inner = optax.sgd(0.0)
      >>> state = S(jnp.zeros((), jnp.int32), initial_masks(params, None), seed_key(0),
      ...           inner.init(params))
      >>> def recompute(s):  # keep the 2 largest magnitudes
      ...     return {"masks": {"w": jnp.abs(params["w"]) >= 2.0}, "key": s.key}
      >>> u, state = scheduled_update("demo", inner, params, state, params, {},
      ...                             is_update=lambda s: s.count % 10 == 0,
      ...                             recompute=recompute)
      >>> optax.apply_updates(params, u)["w"].tolist(), int(state.count)
      ([[0.0, -3.0], [2.0, 0.0]], 1)
    """
    unknown = [f for f in fields if f != "train" and f not in state._fields]
    if unknown:
        raise ValueError(f"{what}: scheduled_update fields {unknown} are not fields of "
                         f"{type(state).__name__} {state._fields} (nor 'train').")
    require_params(params, what)
    check_update_trees(updates, params, state.masks, what)
    if before is not None:
        state = before(state)
    now = {f: state.masks if f == "train" else getattr(state, f) for f in fields}
    pred = is_update(state)
    new = dict(lax.cond(pred, lambda: recompute(state), lambda: now))
    train = new.pop("train", None)
    state = state._replace(**new)
    train = state.masks if train is None else train
    if reset is not None:
        state = state._replace(inner_state=lax.cond(pred, lambda s: reset(s, train),
                                                    lambda s: s, state.inner_state))
    if step is None:
        u, inner_state = masked_update(inner, updates, state.inner_state, params, train,
                                       **extra_args)
    else:
        u, inner_state = step(state, train)
    return u, state._replace(count=optax.safe_increment(state.count), inner_state=inner_state)


def _active(fn, *args_and_mask: jax.Array) -> jax.Array:
    *args, m = args_and_mask
    return jnp.where(m, fn(*args), -jnp.inf)


def nested_lazy(scores: PyTree, masks: PyTree, nested: bool) -> PyTree:
    """:func:`nested_scores` of :class:`jaxprune.select.LazyScores` leaves
    (from :attr:`jaxprune.scores.Scorer.lazy`), still lazy: pruned weights
    score ``-inf`` inside every counting pass, and nothing score-sized is
    stored."""
    def one(sc, m):
        if not isinstance(sc, _select.LazyScores) or np.ndim(m) == 0 or not nested:
            return sc
        return _select.LazyScores(functools.partial(_active, sc.fn), (*sc.args, m))

    return jax.tree.map(one, scores, masks, is_leaf=lambda x: isinstance(x, _select.LazyScores))


def nested_scores(scores: PyTree, masks: PyTree, nested: Any = True) -> PyTree:
    """Scores with pruned weights at ``-inf`` (when ``nested``), so a new
    selection keeps them pruned: masks only shrink."""
    def one(sc, m):
        if np.ndim(m) == 0:
            return sc
        return jnp.where(m | jnp.logical_not(nested), sc, -jnp.inf)

    return jax.tree.map(one, scores, masks)


def find_in_state(opt_state: Any, name: str, missing: str, several: str) -> Any:
    """The one value of a (chained, wrapped) optimizer state found by
    ``optax.tree_utils.tree_get_all_with_path(opt_state, name)`` (a field
    name such as ``"masks"``, or a state class name).

    Raises:
      ValueError: ``missing`` if there is none; ``several`` (formatted with
        ``paths``, the paths of every match) if there are several.
    """
    found = optax.tree_utils.tree_get_all_with_path(opt_state, name)
    if not found:
        raise ValueError(missing)
    if len(found) > 1:
        raise ValueError(several.format(paths=[_tree.path_str(p) for p, _ in found]))
    return found[0][1]


# --------------------------------------------------------------------------
# PRNG keys (stored as raw key data, so states stay plain arrays)


def seed_key(seed: int) -> jax.Array:
    """The key data of ``jax.random.key(seed)``."""
    return jax.random.key_data(jax.random.key(seed))


def split_key(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(next key data, a fresh key)`` from stored key data."""
    key, sub = jax.random.split(jax.random.wrap_key_data(key_data))
    return jax.random.key_data(key), sub

"""Dynamic sparse training: SET, RigL and straight-through (STE) training.

:func:`set_training` and :func:`rigl` train a sparse network from the first
step, at a fixed sparsity: the mask starts random (at the per-leaf
sparsities of an allocation, ERK by default) and every ``update_every`` steps
each selected leaf exchanges connections:

* **drop** ``d = round(f * k)`` of its ``k`` kept weights, those of smallest
  magnitude (``f`` the drop fraction at this step);
* **grow** ``d`` weights among the positions that were inactive before this
  update: at random (SET; a keyed hash of the position, see
  :func:`random_keys`) or of largest dense-gradient magnitude (RigL).

Both selections are exact (:func:`jaxprune.select.select_groups`), so every
leaf keeps exactly ``k`` weights at every step. A just-dropped weight cannot
regrow in the same update, so exactly ``d`` connections leave and ``d`` new
ones arrive (``d`` is capped at the number of inactive positions). Regrown
weights start at exactly zero, and their optimizer moments are reset: on an
update step every leaf of the inner optimizer state that mirrors the
parameters (a subtree with the parameters' tree structure and leaf shapes,
e.g. Adam's ``mu`` and ``nu``, momentum traces, ``MultiSteps`` accumulators)
is zeroed at every position outside ``old_mask & new_mask``, before the inner
update, and the gradients of those positions are zeroed for this step.
Pruned weights are exactly zero after every step (the updates are
``where(mask, u, -p)``, as in :func:`jaxprune.prune`). Mask updates run under
:func:`jax.lax.cond`, so other steps cost what a masked step costs.

:func:`ste` instead keeps dense weights and recomputes a mask from them;
the model applies it in its forward pass with :func:`straight_through`, so
gradients reach pruned weights and they can come back.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> import jaxprune as jp
  >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
  >>> tx = jp.rigl(optax.adam(1e-2), sparsity=0.9, update_every=5, allocation="uniform")
  >>> state = tx.init(params)
  >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
  >>> update = jax.jit(tx.update)
  >>> for _ in range(12):
  ...     u, state = update(jax.grad(loss)(params), state, params)
  ...     params = optax.apply_updates(params, u)
  >>> int((params["w"] != 0).sum()) <= 26, int(jp.get_masks(state)["w"].sum())
  (True, 26)

References:
  Mocanu et al., "Scalable training of artificial neural networks with
  adaptive sparse connectivity inspired by network science", Nature
  Communications 2018 (SET); Evci et al., "Rigging the lottery: making all
  tickets winners", ICML 2020 (RigL, ERK); Bengio et al., "Estimating or
  propagating gradients through stochastic neurons", 2013 (straight-through
  estimator); Zhou et al., "Learning N:M fine-grained structured sparse neural
  networks from scratch", ICLR 2021 (STE for sparse training).
"""

from __future__ import annotations

import functools
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
from jaxprune import select as _select
from jaxprune import tree as _tree
from jaxprune.transforms import (
    PruneState,
    apply_mask_to_updates,
    check_schedule,
    mask_grads,
    require_params,
    scheduled_masks,
    validate_params,
)

PyTree = Any
Schedule = Callable[[Any], Any]

__all__ = [
    "DynamicState",
    "STEState",
    "drop_and_grow",
    "random_keys",
    "random_masks",
    "rigl",
    "set_training",
    "ste",
    "straight_through",
    "zero_state_outside",
]


# --------------------------------------------------------------------------
# Argument checks


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_fixed_sparsity(sparsity: Any, what: str) -> None:
    if callable(sparsity):
        raise TypeError(
            f"{what}: sparsity must be a number (dynamic sparse training keeps a fixed "
            f"sparsity), got the callable {sparsity!r}. For a sparsity schedule use "
            "jp.prune(..., sparsity=optax.polynomial_schedule(...))."
        )
    _masks.check_sparsity(sparsity, "sparsity")


def _check_fraction(value: Any, what: str, name: str = "drop_fraction") -> None:
    if _is_traced(value):
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


def _check_positive_int(value: Any, what: str, name: str) -> None:
    if _is_traced(value) or isinstance(value, jax.Array):
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what}: {name} must be a positive int, got {value!r}.")


# --------------------------------------------------------------------------
# Pure building blocks


def random_masks(
    key: jax.Array, params: PyTree, sparsity: Any, allocation: Any = "erk", where: Any = None
) -> PyTree:
    """Random masks at the per-leaf sparsities of an allocation.

    Each selected leaf keeps exactly the count its allocation gives it
    (``round(n_l * (1 - s_l))``), chosen uniformly at random.

    Args:
      key: a PRNG key.
      params: the parameters (shapes and structure are used).
      sparsity: overall fraction of zeros among the selected weights.
      allocation: ``"erk"``, ``"uniform"``, ``"global"``, a dict or a callable
        (see :mod:`jaxprune.allocation`).
      where: which leaves to prune.

    Returns:
      A mask tree.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = random_masks(jax.random.key(0), {"w": jnp.ones((4, 5))}, 0.5, "uniform")
      >>> int(m["w"].sum())
      10
    """
    return _alloc.compute_masks(
        _scores.random(key, params), sparsity, allocation, where, params
    )


def drop_and_grow(
    params: PyTree, masks: PyTree, grow_scores: PyTree, drop_fraction: Any
) -> tuple[PyTree, PyTree]:
    """One SET/RigL connection exchange, per leaf, with exact counts.

    For every leaf with an array mask holding ``k`` of ``n`` weights:
    ``d = min(round(drop_fraction * k), n - k)``; keep the ``k - d`` kept
    weights of largest ``|w|`` (NaN magnitudes count as 0), and grow the ``d``
    positions inactive in ``masks`` with the largest ``grow_scores`` (NaN
    counts as 0). Ties break by position (lower flat index first).

    Args:
      params: the parameters.
      masks: the current mask tree (scalar ``True`` for unpruned leaves).
      grow_scores: growth scores with the structure of ``params``: floats,
        ranked by magnitude (RigL: the dense gradient), ``uint32`` keys
        ranked as unsigned integers (SET: :func:`random_keys`), or
        :class:`jaxprune.select.LazyScores` computing either on the fly.

    No key or score array is stored: both selections recompute their keys
    from ``params``, ``masks`` and ``grow_scores`` inside every counting pass
    (see :class:`jaxprune.select.LazyScores`), so an exchange inside a
    training step adds almost nothing to the step's scratch memory.
      drop_fraction: fraction of each leaf's kept weights to exchange (a
        number or a traced scalar).

    Returns:
      ``(new_masks, grown)``: the new masks, and masks of the positions that
      became active (``new & ~old``); exactly ``d`` per leaf in each of
      ``old & ~new`` and ``grown``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"w": jnp.array([[3.0, 0.1, 0.0, 0.0, 2.0, 0.0]])}
      >>> m = {"w": jnp.array([[True, True, False, False, True, False]])}
      >>> g = {"w": jnp.array([[0.0, 0.0, 5.0, 1.0, 0.0, 9.0]])}
      >>> new, grown = drop_and_grow(p, m, g, 0.34)
      >>> new["w"].astype(int).tolist(), grown["w"].astype(int).tolist()
      ([[1, 0, 0, 0, 1, 1]], [[0, 0, 0, 0, 0, 1]])

    References:
      Mocanu et al. 2018 (SET); Evci et al., ICML 2020 (RigL).
    """
    _, pleaves, treedef = _tree.flatten(params)
    mleaves = treedef.flatten_up_to(masks)
    gleaves = treedef.flatten_up_to(grow_scores)  # LazyScores leaves stay whole
    idx = [i for i, m in enumerate(mleaves) if jnp.ndim(m) > 0]
    frac = jnp.asarray(drop_fraction, jnp.float32)
    # Drop and grow keys are computed on the fly inside each counting pass
    # (LazyScores), from the parameters, masks and growth scores: the exchange
    # stores no score-sized temporary.
    scores, groups, keep = [], [], []
    for j, i in enumerate(idx):
        m = mleaves[i]
        n = int(np.prod(m.shape))
        k = _select.count_true(m)
        d = jnp.round(frac * k.astype(jnp.float32)).astype(jnp.int32)
        d = jnp.clip(d, 0, n - k)
        scores += [_select.LazyScores(_drop_score, (pleaves[i], m)), _grow_lazy(gleaves[i], m)]
        groups += [2 * j, 2 * j + 1]
        keep += [k - d, d]
    sel = _select.select_groups(scores, groups, keep) if idx else []
    new, grown = list(mleaves), [jnp.zeros((), jnp.bool_)] * len(mleaves)
    for j, i in enumerate(idx):
        kept, grow = sel[2 * j], sel[2 * j + 1]
        new[i] = kept | grow
        grown[i] = grow
    return _tree.unflatten(treedef, new), _tree.unflatten(treedef, grown)


def _drop_score(p: jax.Array, m: jax.Array) -> jax.Array:
    """Kept weights by ``|w|`` (NaN as 0); inactive positions rank last."""
    w = jnp.abs(p.astype(jnp.float32))
    return jnp.where(m, jnp.where(jnp.isnan(w), 0.0, w), -jnp.inf)


def _grow_lazy(g: Any, m: jax.Array) -> _select.LazyScores:
    """Growth candidates (inactive positions) by ``g``: float scores by
    magnitude (NaN as 0), ``uint32`` keys as they are; active positions rank
    last."""
    if isinstance(g, _select.LazyScores):
        inner_fn, inner_args = g.fn, tuple(g.args)
    else:
        inner_fn, inner_args = _select._identity, (jnp.asarray(g),)

    def fn(m, *args):
        v = inner_fn(*args)
        if v.dtype == jnp.uint32:
            return jnp.where(m, jnp.uint32(0), jnp.maximum(v, jnp.uint32(1)))
        v = jnp.abs(v.astype(jnp.float32))
        return jnp.where(m, -jnp.inf, jnp.where(jnp.isnan(v), 0.0, v))

    return _select.LazyScores(fn, (m, *inner_args))


def random_keys(key: jax.Array, params: PyTree) -> PyTree:
    """Uniform random ``uint32`` bits with the structure of ``params``, cheap.

    A counter-based generator: each element's bits are a keyed hash of its
    flat index (two rounds of the ``murmur3`` 32-bit finaliser, keyed by two
    32-bit words drawn from ``key``, a different pair per leaf). It is one
    elementwise pass that XLA fuses into its consumer, where
    :func:`jax.random.bits` (threefry) on XLA:CPU costs about 30x the time and
    a temporary 4x the output (``benchmarks/bench_dynamic.py`` prints both). Use it for random *rankings* (SET's regrowth);
    use :mod:`jax.random` where statistical guarantees matter.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> b = random_keys(jax.random.key(0), {"w": jnp.zeros((3, 4))})
      >>> b["w"].dtype, len(set(b["w"].ravel().tolist()))  # distinct within a leaf
      (dtype('uint32'), 12)

    References:
      Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011
      (counter-based generators); Appleby, MurmurHash3 (the finaliser).
    """
    return jax.tree.map(lambda s: s.fn(*s.args), _random_keys_lazy(key, params),
                        is_leaf=lambda x: isinstance(x, _select.LazyScores))


def _random_keys_lazy(key: jax.Array, params: PyTree) -> PyTree:
    """:func:`random_keys` as :class:`~jaxprune.select.LazyScores` (computed
    where they are used, never stored)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    words = jax.random.bits(key, (max(len(leaves), 1), 2), jnp.uint32)
    out = [
        _select.LazyScores(functools.partial(_hash_bits, jnp.shape(x)), (words[i, 0], words[i, 1]))
        for i, x in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def _hash_bits(shape: tuple, w0: jax.Array, w1: jax.Array) -> jax.Array:
    """``fmix32(fmix32(flat_index + w0) ^ w1)``. ``w0`` is added to the last
    axis's iota before anything else, so inside a selection loop nothing
    index-sized is loop-invariant (XLA would hoist and store it)."""
    if not shape:
        return _fmix32(_fmix32(w0) ^ w1)
    acc = lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1) + w0
    stride = shape[-1]
    for ax in range(len(shape) - 2, -1, -1):
        acc = acc + lax.broadcasted_iota(jnp.uint32, shape, ax) * jnp.uint32(stride)
        stride *= shape[ax]
    return _fmix32(_fmix32(acc) ^ w1)


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of ``uint32`` with full
    avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def zero_state_outside(state: PyTree, params: PyTree, keep: PyTree) -> PyTree:
    """Zeroes optimizer-state entries that mirror parameters outside ``keep``.

    Every subtree of ``state`` with the tree structure of ``params`` and the
    same leaf shapes (Adam's ``mu``/``nu``, momentum traces, accumulators) is
    replaced by ``where(keep, x, 0)``; counters, schedules and anything else
    pass through.

    Args:
      state: an optimizer state (any nesting).
      params: the parameters (structure and shapes are compared).
      keep: bool mask tree with the structure of ``params``.

    Returns:
      The state with the same structure, dtypes and shapes.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> p = {"w": jnp.ones((1, 2))}
      >>> st = optax.sgd(0.1, momentum=0.9).init(p)
      >>> st = (optax.TraceState(trace={"w": jnp.ones((1, 2))}),) + st[1:]
      >>> zero_state_outside(st, p, {"w": jnp.array([[True, False]])})[0].trace["w"].tolist()
      [[1.0, 0.0]]
    """
    treedef = jax.tree_util.tree_structure(params)
    shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(params)]
    keep_leaves = treedef.flatten_up_to(keep)

    def mirrors(x: Any) -> bool:
        try:
            if jax.tree_util.tree_structure(x) != treedef:
                return False
        except Exception:  # noqa: BLE001 - exotic nodes are not params
            return False
        return [jnp.shape(v) for v in jax.tree_util.tree_leaves(x)] == shapes

    def zero(x: Any) -> Any:
        if not mirrors(x):
            return x
        leaves = treedef.flatten_up_to(x)
        out = [
            v if jnp.ndim(m) == 0 or not hasattr(v, "dtype")
            else jnp.where(m, v, jnp.zeros((), v.dtype))
            for v, m in zip(leaves, keep_leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.tree.map(zero, state, is_leaf=mirrors)


# --------------------------------------------------------------------------
# SET and RigL


class DynamicState(NamedTuple):
    """State of :func:`set_training` and :func:`rigl`.

    Attributes:
      count: number of updates so far (int32); connections are exchanged when
        ``count > 0`` and ``count % update_every == 0``.
      masks: bool mask tree (scalar ``True`` for leaves not pruned); every
        selected leaf keeps the same number of weights at every step.
      key: PRNG key data (initial mask, SET regrowth).
      inner_state: the wrapped optimizer's state.
    """

    count: jax.Array
    masks: PyTree
    key: jax.Array
    inner_state: optax.OptState


def _dynamic(
    inner: optax.GradientTransformation,
    sparsity: Any,
    drop_fraction: Any,
    update_every: Any,
    end_step: Any,
    allocation: Any,
    where: Any,
    seed: Any,
    growth: str,
    what: str,
) -> optax.GradientTransformationExtraArgs:
    _check_fixed_sparsity(sparsity, what)
    if callable(drop_fraction):
        check_schedule(drop_fraction, f"{what}: drop_fraction")
    else:
        _check_fraction(drop_fraction, what)
    _check_positive_int(update_every, what, "update_every")
    if end_step is not None:
        _check_positive_int(end_step, what, "end_step")
    _alloc.check(allocation)
    inner = optax.with_extra_args_support(inner)
    if growth == "gradient" and end_step is not None and not callable(drop_fraction):
        frac_at = optax.cosine_decay_schedule(drop_fraction, decay_steps=end_step)
    elif callable(drop_fraction):
        frac_at = drop_fraction
    else:
        frac_at = lambda count: drop_fraction  # noqa: E731

    def init_fn(params):
        validate_params(params, where, what)
        _alloc.check(allocation, params, where)
        key, sub = jax.random.split(jax.random.key(seed))
        return DynamicState(
            count=jnp.zeros((), jnp.int32),
            masks=random_masks(sub, params, sparsity, allocation, where),
            key=jax.random.key_data(key),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        require_params(params, what)
        grads = updates
        count = state.count
        frac = jnp.asarray(frac_at(count), jnp.float32)

        def exchange(key_data):
            key, sub = jax.random.split(jax.random.wrap_key_data(key_data))
            if growth == "random":
                gs = _random_keys_lazy(sub, params)
            else:
                gs = grads  # ranked by magnitude inside drop_and_grow
            new, grown = drop_and_grow(params, state.masks, gs, frac)
            train = jax.tree.map(lambda n, g: n & ~g, new, grown)
            return new, train, jax.random.key_data(key)

        def keep(key_data):
            return state.masks, state.masks, key_data

        is_update = (count > 0) & (count % update_every == 0)
        if end_step is not None:
            is_update = is_update & (count < end_step)
        # Only the (small) masks go through the first cond; the optimizer
        # state goes through its own cond, whose identity branch XLA can alias.
        masks, train, key_data = lax.cond(is_update, exchange, keep, state.key)
        inner_state = lax.cond(
            is_update,
            lambda s: zero_state_outside(s, params, train),
            lambda s: s,
            state.inner_state,
        )
        g = mask_grads(grads, train)
        u, inner_state = inner.update(g, inner_state, params, **extra_args)
        u = apply_mask_to_updates(u, params, train)
        return u, DynamicState(
            count=optax.safe_increment(count),
            masks=masks,
            key=key_data,
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def set_training(
    inner: optax.GradientTransformation,
    sparsity: float,
    drop_fraction: float | Schedule = 0.3,
    update_every: int = 100,
    allocation: Any = "erk",
    where: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Sparse Evolutionary Training (SET): drop smallest, regrow at random.

    The mask starts random at the per-leaf sparsities of ``allocation``. On
    every step with ``count > 0`` and ``count % update_every == 0``, each
    selected leaf with ``k`` kept weights drops the ``d = round(f * k)`` of
    smallest ``|w|`` and activates ``d`` positions drawn uniformly among those
    inactive before the update (see :func:`drop_and_grow`). Regrown weights
    start at exactly zero with zeroed optimizer moments (see the module
    docstring). Pruned weights are exactly zero after every step and every
    leaf keeps exactly ``k`` weights throughout.

    Args:
      inner: the optimizer to wrap.
      sparsity: fixed fraction of zeros among the selected weights, in [0, 1].
      drop_fraction: ``f`` in [0, 1], or an optax schedule of the step.
      update_every: steps between connection exchanges.
      allocation: per-leaf sparsities: ``"erk"`` (default), ``"uniform"``,
        ``"global"`` (random global mask, then per-leaf exchanges), a dict or a
        callable (see :mod:`jaxprune.allocation`).
      where: which leaves to prune (default: float leaves with ndim >= 2).
      seed: seed of the initial mask and of the random regrowth.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`DynamicState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> tx = jp.set_training(optax.sgd(0.1), 0.75, update_every=2, allocation="uniform")
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda g, s, p: tx.update(g, s, p))
      >>> for _ in range(5):
      ...     u, state = step(params, state, params)
      ...     params = optax.apply_updates(params, u)
      >>> jp.sparsity(jp.get_masks(state)), float(jp.sparsity(params)) >= 0.75
      (0.75, True)

    References:
      Mocanu et al., "Scalable training of artificial neural networks with
      adaptive sparse connectivity inspired by network science", Nature
      Communications 2018.
    """
    return _dynamic(
        inner, sparsity, drop_fraction, update_every, None, allocation, where, seed,
        growth="random", what="set_training",
    )


def rigl(
    inner: optax.GradientTransformation,
    sparsity: float,
    drop_fraction: float = 0.3,
    update_every: int = 100,
    end_step: int | None = None,
    allocation: Any = "erk",
    where: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """RigL: drop smallest magnitudes, regrow where the dense gradient is largest.

    Like :func:`set_training`, but the ``d`` grown positions are those, among
    the inactive ones, with the largest ``|g|``, where ``g`` is the raw dense
    gradient this transform receives (the gradient of the loss with respect
    to every weight, pruned ones included, since they sit at zero). The drop
    fraction decays as ``f_t = optax.cosine_decay_schedule(drop_fraction,
    end_step)(t)``, i.e. ``f/2 (1 + cos(pi t / end_step))``, and no exchange
    happens from ``end_step`` on (``end_step=None``: constant ``f``, updates
    throughout; the paper uses 75% of training). Regrown weights start at
    exactly zero and their optimizer moments are reset (module docstring).

    Args:
      inner: the optimizer to wrap.
      sparsity: fixed fraction of zeros among the selected weights, in [0, 1].
      drop_fraction: initial fraction ``f`` in [0, 1] of kept weights exchanged.
      update_every: steps between connection exchanges (``Delta T``).
      end_step: last step with exchanges (``T_end``), or ``None``.
      allocation: ``"erk"`` (default, as in the paper), ``"uniform"``,
        ``"global"``, a dict or a callable.
      where: which leaves to prune (default: float leaves with ndim >= 2).
      seed: seed of the initial random mask.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`DynamicState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> tx = jp.rigl(optax.adam(1e-2), 0.75, update_every=2, end_step=10,
      ...              allocation="uniform")
      >>> state = tx.init(params)
      >>> grad = jax.grad(lambda p: jnp.sum((p["w"] - 1.0) ** 2))
      >>> update = jax.jit(tx.update)
      >>> for _ in range(5):
      ...     u, state = update(grad(params), state, params)
      ...     params = optax.apply_updates(params, u)
      >>> int(jp.get_masks(state)["w"].sum())
      16

    References:
      Evci et al., "Rigging the lottery: making all tickets winners", ICML 2020.
    """
    if callable(drop_fraction):
        raise TypeError(
            "rigl: drop_fraction must be a number (it is cosine-decayed to 0 at end_step); "
            f"got {drop_fraction!r}. For another schedule use set_training or pass "
            "end_step=None."
        )
    return _dynamic(
        inner, sparsity, drop_fraction, update_every, end_step, allocation, where, seed,
        growth="gradient", what="rigl",
    )


# --------------------------------------------------------------------------
# Straight-through training


def straight_through(params: PyTree, masks: PyTree) -> PyTree:
    """Masked weights in the forward pass, dense gradients in the backward pass.

    Returns ``p + stop_gradient(where(m, p, 0) - p)`` per leaf: the value is
    exactly ``where(m, p, 0)``, the gradient with respect to ``p`` is the
    gradient with respect to the masked weight, for *every* entry, so pruned
    weights keep learning and can re-enter the mask. Leaves with a scalar
    mask are returned unchanged. Call it inside the loss.

    Args:
      params: the dense parameters.
      masks: a mask tree, e.g. ``jp.get_masks(opt_state)`` of :func:`ste`.

    Returns:
      Parameters to run the model with.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"w": jnp.array([[1.0, 2.0]])}
      >>> m = {"w": jnp.array([[True, False]])}
      >>> loss = lambda p: jnp.sum(straight_through(p, m)["w"] * jnp.array([[3.0, 4.0]]))
      >>> float(loss(p)), jax.grad(loss)(p)["w"].tolist()
      (3.0, [[3.0, 4.0]])

    References:
      Bengio et al., "Estimating or propagating gradients through stochastic
      neurons for conditional computation", 2013; Zhou et al., "Learning N:M
      fine-grained structured sparse neural networks from scratch", ICLR 2021.
    """
    _masks._check_same_structure(params, masks, "params", "masks")

    def one(p, m):
        m = jnp.asarray(m)
        if m.ndim == 0:
            return p
        if m.shape != jnp.shape(p):
            raise ValueError(
                f"straight_through: mask shape {m.shape} differs from the parameter shape "
                f"{jnp.shape(p)}; pass the masks of these parameters (jp.get_masks(state))."
            )
        return p + lax.stop_gradient(jnp.where(m, p, jnp.zeros((), p.dtype)) - p)

    return jax.tree.map(one, params, masks)


# The state of :func:`ste` is that of :func:`jaxprune.prune` (count, masks,
# score_state, key, inner_state): both run the same mask schedule.
STEState = PruneState


def ste(
    inner: optax.GradientTransformation,
    sparsity: float | Schedule,
    update_every: int = 1,
    score: str | Callable[..., PyTree] | _scores.Scorer = "magnitude",
    allocation: Any = "uniform",
    where: Any = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Straight-through sparse training: dense weights, mask recomputed from them.

    The weights stay dense and get the inner optimizer's updates unchanged
    (nothing is zeroed). On every step with ``count % update_every == 0``
    (step 0 included) the mask is recomputed from ``score`` on the dense
    weights at the (scheduled) sparsity and stored in the state. **The model
    must apply it**: inside the loss, run the network on
    ``jp.straight_through(params, jp.get_masks(opt_state))``; the forward
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
      update_every: mask-recomputation period (1: every step, as in
        SR-STE-style training).
      score: ``"magnitude"`` or any score accepted by :func:`jaxprune.prune`.
      allocation: ``"uniform"`` (default), ``"global"``, ``"erk"``, a dict or a
        callable.
      where: which leaves to prune (default: float leaves with ndim >= 2).
      seed: seed of the PRNG key used by random scores.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`STEState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> tx = jp.ste(optax.adam(1e-2), sparsity=0.75)
      >>> state = tx.init(params)
      >>> def loss(p, masks):
      ...     return jnp.sum((jp.straight_through(p, masks)["w"] - 1.0) ** 2)
      >>> for _ in range(3):
      ...     g = jax.grad(loss)(params, jp.get_masks(state))
      ...     u, state = tx.update(g, state, params)
      ...     params = optax.apply_updates(params, u)
      >>> jp.sparsity(jp.get_masks(state)), jp.sparsity(params)
      (0.75, 0.0)

    References:
      Bengio et al. 2013 (straight-through estimator); Zhou et al., "Learning
      N:M fine-grained structured sparse neural networks from scratch", ICLR
      2021; Lin et al., "Dynamic model pruning with feedback", ICLR 2020.
    """
    _check_positive_int(update_every, "ste", "update_every")
    return scheduled_masks(
        inner, sparsity=sparsity, score=score, allocation=allocation,
        update_every=update_every, where=where, nested=False, seed=seed,
        apply=False, name="ste",
    )

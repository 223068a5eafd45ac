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
update step every copy of the parameters inside the inner optimizer state
(found by :func:`optax.tree_utils.tree_map_params`: Adam's ``mu`` and
``nu``, momentum traces, ``MultiSteps`` accumulators) is zeroed at every
position outside ``old_mask & new_mask``, before the inner update, and the
gradients of those positions are zeroed for this step. Pruned weights are
exactly zero after every step (the updates are ``where(mask, u, -p)``, as in
:func:`jaxprune.prune`). Mask updates run under :func:`jax.lax.cond`, so
other steps cost what a masked step costs.

:func:`jaxprune.ste_training` (in :mod:`jaxprune.transforms`, beside the
engine it shares with :func:`jaxprune.prune`) instead keeps dense weights
and recomputes a mask from them; the model applies it in its forward pass
with :func:`jaxprune.apply_masks_ste`, so gradients reach pruned weights
and they can come back.

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

from jaxprune import _deprecation
from jaxprune.core import allocation as _alloc
from jaxprune.core import masks as _masks
from jaxprune.core import select as _select
from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree
from jaxprune.train import base as _base
from jaxprune.train.transforms import STEState as STEState  # old path (not in __all__)
from jaxprune.train.transforms import ste_training as ste_training  # old path

Schedule = Callable[[Any], Any]

__all__ = [
    "DynamicState",
    "drop_and_grow",
    "random_keys",
    "rigl",
    "set_training",
    "zero_state_outside",
]


# --------------------------------------------------------------------------
# Pure building blocks


def random_masks(key: jax.Array, params: PyTree, sparsity: Any, allocation: Any = "erk",
                 where: Any = None) -> PyTree:
    """Deprecated: use :func:`jaxprune.allocation.random_masks` (whose
    ``allocation`` defaults to ``"uniform"``; this alias keeps ``"erk"``)."""
    _deprecation.warn("jaxprune.dynamic.random_masks", "jaxprune.allocation.random_masks")
    return _alloc.random_masks(key, params, sparsity, allocation=allocation, where=where)


def drop_and_grow(
    params: PyTree, masks: PyTree, grow_scores: PyTree, drop_fraction: Any, *,
    layers: Any = None, layer_axis: int = 0,
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
      drop_fraction: fraction of each leaf's kept weights to exchange (a
        number or a traced scalar).
      layers: which leaves are stacks of layers (a ``where=``-style
        selection or a model graph): every layer of one exchanges its own
        ``d = min(round(drop_fraction * k_l), n_l - k_l)``, so per-layer
        counts stay constant. ``layer_axis``: their layer axis.

    Returns:
      ``(new_masks, grown)``: the new masks, and masks of the positions that
      became active (``new & ~old``); exactly ``d`` per leaf in each of
      ``old & ~new`` and ``grown``.

    No key or score array is stored: both selections recompute their keys
    from ``params``, ``masks`` and ``grow_scores`` inside every counting pass
    (see :class:`jaxprune.select.LazyScores`), so an exchange inside a
    training step adds almost nothing to the step's scratch memory.

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
    stack = _tree.stacked_axes(params, layers, layer_axis,
                               [jnp.ndim(m) > 0 for m in mleaves], "drop_and_grow")
    new, grown = list(mleaves), [jnp.zeros((), jnp.bool_)] * len(mleaves)
    frac = jnp.asarray(drop_fraction, jnp.float32)
    for i, a in enumerate(stack):
        if a is not None:
            new[i], grown[i] = _exchange_layers(pleaves[i], mleaves[i], gleaves[i], frac, a)
    idx = [i for i, m in enumerate(mleaves) if jnp.ndim(m) > 0 and stack[i] is None]
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
    for j, i in enumerate(idx):
        kept, grow = sel[2 * j], sel[2 * j + 1]
        new[i] = kept | grow
        grown[i] = grow
    return _tree.unflatten(treedef, new), _tree.unflatten(treedef, grown)


def _exchange_layers(p: jax.Array, m: jax.Array, g: Any, frac: jax.Array,
                     axis: int) -> tuple[jax.Array, jax.Array]:
    """:func:`drop_and_grow` of a stacked leaf: every layer (index of
    ``axis``) exchanges its own share; ``(new mask, grown)``."""
    others = tuple(a for a in range(m.ndim) if a != axis)
    n = int(np.prod([m.shape[a] for a in others], dtype=np.int64))
    k = jnp.sum(m, axis=others, dtype=jnp.int32)
    d = jnp.clip(jnp.round(frac * k.astype(jnp.float32)).astype(jnp.int32), 0, n - k)
    kept = _select.select_along(_select.LazyScores(_drop_score, (p, m)), others, k - d)
    grow = _select.select_along(_grow_lazy(g, m), others, d)
    return kept | grow, grow


def _drop_score(p: jax.Array, m: jax.Array) -> jax.Array:
    """Kept weights by ``|w|`` (NaN as 0); inactive positions rank last."""
    w = jnp.abs(p.astype(jnp.float32))
    return jnp.where(m, jnp.where(jnp.isnan(w), 0.0, w), -jnp.inf)


def _identity(x: jax.Array) -> jax.Array:
    return x


def _grow_lazy(g: Any, m: jax.Array) -> _select.LazyScores:
    """Growth candidates (inactive positions) by ``g``: float scores by
    magnitude (NaN as 0), ``uint32`` keys as they are; active positions rank
    last."""
    if isinstance(g, _select.LazyScores):
        inner_fn, inner_args = g.fn, tuple(g.args)
    else:
        inner_fn, inner_args = _identity, (jnp.asarray(g),)

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


def _mirror_leaf(x: Any, m: Any) -> Any:
    """``where(m, x, 0)`` for a state leaf shaped like its parameter; other
    leaves (factored moments, masked-out nodes) pass through."""
    if not _tree.is_array(x) or np.ndim(m) == 0 or np.shape(x) != np.shape(m):
        return x
    return _masks.apply_mask(x, m)


def zero_state_outside(inner: Any, state: PyTree, keep: PyTree) -> PyTree:
    """Zeroes the entries of optimizer-state copies of the parameters outside ``keep``.

    The copies of the parameters inside ``state`` (Adam's ``mu``/``nu``,
    momentum traces, accumulators) are found with
    :func:`optax.tree_utils.tree_map_params`, which runs ``inner.init`` on a
    placeholder: no matching of shapes. Their leaves shaped like their
    parameter become ``where(keep, x, 0)``; counters, schedules, factored
    moments and anything else pass through.

    Args:
      inner: the optimizer whose state this is (anything with ``init``).
      state: its state.
      keep: bool mask tree with the structure of the parameters.

    Returns:
      The state with the same structure, dtypes and shapes.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> p = {"w": jnp.ones((1, 2))}
      >>> opt = optax.sgd(0.1, momentum=0.9)
      >>> st = (optax.TraceState(trace={"w": jnp.ones((1, 2))}),) + opt.init(p)[1:]
      >>> zero_state_outside(opt, st, {"w": jnp.array([[True, False]])})[0].trace["w"].tolist()
      [[1.0, 0.0]]
    """
    if not (callable(inner) or hasattr(inner, "init")):
        raise TypeError(
            "zero_state_outside(inner, state, keep) takes the optimizer first (its init "
            f"finds the copies of the parameters in the state); got {type(inner).__name__}."
        )
    return optax.tree_utils.tree_map_params(
        inner, _mirror_leaf, state, keep, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )


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


class _Exchange(NamedTuple):
    """What tells SET and RigL apart: how positions grow and how many move."""

    name: str
    grow_scores: Callable[[jax.Array, PyTree, PyTree], PyTree]  # (key, params, grads)
    fraction_at: Callable[[jax.Array], Any]  # count -> drop fraction
    end_step: Any  # no exchange from this count on (None: never stop)


def _random_growth(key: jax.Array, params: PyTree, grads: PyTree) -> PyTree:
    """SET: random ranks of the positions (a keyed hash, never stored)."""
    del grads
    return _random_keys_lazy(key, params)


def _gradient_growth(key: jax.Array, params: PyTree, grads: PyTree) -> PyTree:
    """RigL: the dense gradient, ranked by magnitude inside drop_and_grow."""
    del key, params
    return grads


def _check_dynamic(name: str, sparsity: Any, drop_fraction: Any, update_every: Any,
                   end_step: Any, allocation: Any) -> None:
    _base.check_fixed_sparsity(sparsity, name)
    if callable(drop_fraction):
        _base.check_schedule(drop_fraction, f"{name}: drop_fraction")
    else:
        _base.check_fraction(drop_fraction, name)
    _base.check_positive_int(update_every, name, "update_every")
    if end_step is not None:
        _base.check_positive_int(end_step, name, "end_step")
    _alloc.check(allocation)


def _is_exchange_step(count: jax.Array, update_every: Any, end_step: Any) -> jax.Array:
    is_update = (count > 0) & (count % update_every == 0)
    return is_update if end_step is None else is_update & (count < end_step)


def _exchange(ex: _Exchange, state: DynamicState, params: PyTree, grads: PyTree,
              layers: Any = None, layer_axis: int = 0) -> dict:
    """One exchange: the new ``masks`` and ``key``, and the masks of the
    positions trained this step (``train``). Just-grown positions are not
    trained on this step (their moments and gradients start from zero)."""
    key_data, sub = _base.split_key(state.key)
    frac = jnp.asarray(ex.fraction_at(state.count), jnp.float32)
    new, grown = drop_and_grow(params, state.masks, ex.grow_scores(sub, params, grads), frac,
                               layers=layers, layer_axis=layer_axis)
    train = jax.tree.map(lambda n, g: n & ~g, new, grown)
    return {"masks": new, "train": train, "key": key_data}


def _dynamic(inner: optax.GradientTransformation, ex: _Exchange, *, sparsity: Any,
             update_every: Any, allocation: Any, where: Any, seed: Any,
             layers: Any = None, layer_axis: int = 0) -> optax.GradientTransformationExtraArgs:
    """The SET / RigL transform: a random initial mask, then exchanges."""
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        _base.validate_params(params, where, ex.name)
        _alloc.check(allocation, params, where, layers=layers, layer_axis=layer_axis,
                     what=ex.name)
        key, sub = jax.random.split(jax.random.key(seed))
        return DynamicState(
            count=jnp.zeros((), jnp.int32),
            masks=_alloc.random_masks(sub, params, sparsity, allocation=allocation, where=where,
                                      layers=layers, layer_axis=layer_axis),
            key=jax.random.key_data(key),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        # Only the (small) masks go through the exchange's cond; the optimizer
        # state goes through its own (reset), whose identity branch XLA can alias.
        return _base.scheduled_update(
            ex.name, inner, updates, state, params, extra_args,
            is_update=lambda s: _is_exchange_step(s.count, update_every, ex.end_step),
            recompute=lambda s: _exchange(ex, s, params, updates, layers, layer_axis),
            fields=("masks", "train", "key"),
            reset=lambda s, train: zero_state_outside(inner, s, train))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _constant(value: Any) -> Callable[[jax.Array], Any]:
    return lambda count: value


def set_training(
    inner: optax.GradientTransformation,
    *,
    sparsity: float,
    drop_fraction: float | Schedule = 0.3,
    update_every: int = 100,
    allocation: Any = "erk",
    where: Any = None,
    seed: int = 0,
    layers: Any = None,
    layer_axis: int = 0,
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
      allocation: per-leaf sparsities: ``"erk"`` (default, as in Evci et al.
        2020), ``"uniform"``, ``"global"`` (random global mask, then per-leaf
        exchanges), a dict or a callable (see :mod:`jaxprune.allocation`).
      where: which leaves to prune (default: :func:`jaxprune.tree.is_kernel`).
      seed: seed of the initial mask and of the random regrowth.
      layers: which pruned leaves are stacks of layers (``nnx.scan``,
        MaxText): a ``where=``-style selection or a model graph. Each layer
        then starts at its own budget (ERK from the shape of one layer) and
        exchanges its own connections, so every layer keeps its count.
      layer_axis: the layer axis of the stacked leaves (default 0).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`DynamicState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> tx = jp.set_training(optax.sgd(0.1), sparsity=0.75, update_every=2,
      ...                      allocation="uniform")
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda g, s, p: tx.update(g, s, p))
      >>> for _ in range(5):
      ...     u, state = step(params, state, params)
      ...     params = optax.apply_updates(params, u)
      >>> jp.sparsity_of(jp.get_masks(state)), float(jp.sparsity_of(params)) >= 0.75
      (0.75, True)

    References:
      Mocanu et al., "Scalable training of artificial neural networks with
      adaptive sparse connectivity inspired by network science", Nature
      Communications 2018.
    """
    _check_dynamic("set_training", sparsity, drop_fraction, update_every, None, allocation)
    fraction_at = drop_fraction if callable(drop_fraction) else _constant(drop_fraction)
    ex = _Exchange("set_training", _random_growth, fraction_at, None)
    return _dynamic(inner, ex, sparsity=sparsity, update_every=update_every,
                    allocation=allocation, where=where, seed=seed, layers=layers,
                    layer_axis=layer_axis)


def _rigl_fraction(drop_fraction: Any, end_step: Any) -> Callable[[jax.Array], Any]:
    if callable(drop_fraction):
        if end_step is not None:
            raise TypeError(
                "rigl: drop_fraction is a schedule and end_step is given; rigl decays a "
                "number drop_fraction to 0 at end_step with a cosine. Pass a number, or keep "
                f"the schedule {drop_fraction!r} and pass end_step=None (the schedule then "
                "sets the fraction at every step, and exchanges continue throughout)."
            )
        return drop_fraction
    if end_step is None:
        return _constant(drop_fraction)
    return optax.cosine_decay_schedule(drop_fraction, decay_steps=end_step)


def rigl(
    inner: optax.GradientTransformation,
    *,
    sparsity: float,
    drop_fraction: float | Schedule = 0.3,
    update_every: int = 100,
    end_step: int | None = None,
    allocation: Any = "erk",
    where: Any = None,
    seed: int = 0,
    layers: Any = None,
    layer_axis: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """RigL: drop smallest magnitudes, regrow where the dense gradient is largest.

    Like :func:`set_training`, but the ``d`` grown positions are those, among
    the inactive ones, with the largest ``|g|``, where ``g`` is the raw dense
    gradient this transform receives (the gradient of the loss with respect
    to every weight, pruned ones included, since they sit at zero). With
    ``end_step`` the drop fraction decays as ``f_t =
    optax.cosine_decay_schedule(drop_fraction, end_step)(t)``, i.e.
    ``f/2 (1 + cos(pi t / end_step))``, and no exchange happens from
    ``end_step`` on (the paper uses 75% of training). With ``end_step=None``
    ``drop_fraction`` (a number, or any schedule of the step) applies
    throughout. Regrown weights start at exactly zero and their optimizer
    moments are reset (module docstring).

    Args:
      inner: the optimizer to wrap.
      sparsity: fixed fraction of zeros among the selected weights, in [0, 1].
      drop_fraction: fraction ``f`` in [0, 1] of kept weights exchanged (the
        initial one with ``end_step``), or a schedule (with ``end_step=None``).
      update_every: steps between connection exchanges (``Delta T``).
      end_step: last step with exchanges (``T_end``), or ``None``.
      allocation: ``"erk"`` (default, as in the paper), ``"uniform"``,
        ``"global"``, a dict or a callable.
      where: which leaves to prune (default: :func:`jaxprune.tree.is_kernel`).
      seed: seed of the initial random mask.
      layers: which pruned leaves are stacks of layers, as in
        :func:`set_training` (every layer keeps its own count).
      layer_axis: the layer axis of the stacked leaves (default 0).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`DynamicState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> tx = jp.rigl(optax.adam(1e-2), sparsity=0.75, update_every=2, end_step=10,
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
    _check_dynamic("rigl", sparsity, drop_fraction, update_every, end_step, allocation)
    ex = _Exchange("rigl", _gradient_growth, _rigl_fraction(drop_fraction, end_step), end_step)
    return _dynamic(inner, ex, sparsity=sparsity, update_every=update_every,
                    allocation=allocation, where=where, seed=seed, layers=layers,
                    layer_axis=layer_axis)


# --------------------------------------------------------------------------
# Straight-through training


straight_through = _deprecation.alias(
    _masks.apply_masks_ste, "jaxprune.straight_through", "jaxprune.apply_masks_ste")

# ste_training and its state live with their engine, in transforms.py; these
# names stay here for old imports (jaxprune.dynamic.ste_training).
def ste(inner: optax.GradientTransformation, sparsity: float | Schedule, update_every: int = 1,
        score: Any = "magnitude", allocation: Any = "uniform", where: Any = None,
        seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Deprecated alias of :func:`ste_training` (which takes ``sparsity`` and
    the rest as keywords)."""
    _deprecation.warn("jaxprune.ste", "jaxprune.ste_training")
    return ste_training(inner, sparsity=sparsity, update_every=update_every, score=score,
                        allocation=allocation, where=where, seed=seed)

"""Importance scores: pure functions from parameters (and gradients) to scores.

A score tree has the structure of the parameters; larger means more
important. Scores are computed for every floating leaf (``where=`` is applied
later, by the mask functions); other leaves (integer arrays, an Equinox
module's activation functions) pass through unchanged, so trees always line
up and selecting such a leaf for pruning is an error.

Every score function has one calling convention, :class:`ScoreFn`:
``fn(params, grads=None, *, key=None) -> scores``: :func:`magnitude` uses
neither ``grads`` nor ``key``, :func:`saliency` needs ``grads``,
:func:`random` needs ``key``. Scores that accumulate over training steps
(Taylor, movement) are :class:`Scorer` objects, used by the transforms'
``score=``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"w": jnp.array([[1.0, -3.0]])}
  >>> jp.scores.magnitude(params)["w"].tolist()
  [[1.0, 3.0]]
  >>> jp.scores.saliency(params, {"w": jnp.array([[2.0, 0.1]])})["w"].tolist()
  [[2.0, 0.30000001192092896]]
  >>> jp.scores.random(params, key=jax.random.key(0))["w"].shape
  (1, 2)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from jaxprune import _deprecation
from jaxprune.core import select as _select
from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree

__all__ = [
    "ScoreFn",
    "Scorer",
    "get",
    "get_scorer",
    "magnitude",
    "movement",
    "movement_importance",
    "names",
    "random",
    "register",
    "saliency",
    "taylor",
    "taylor_importance",
    "wanda",
]


class ScoreFn(Protocol):
    """The calling convention of every score function in jaxprune.

    ``fn(params, grads=None, *, key=None) -> scores``: ``params`` the
    parameter pytree, ``grads`` gradients of the loss with its structure
    (for gradient scores), ``key`` a PRNG key (for random scores); the
    result is a score tree with the structure of ``params``, larger meaning
    more important. A function that needs an argument it did not get raises
    ``TypeError``.
    """

    def __call__(self, params: PyTree, grads: PyTree | None = None, *,
                 key: jax.Array | None = None) -> PyTree: ...


def _score_leaf(fn, w, *rest):
    """``fn(w, *rest)`` on floating leaves; other leaves pass through."""
    return fn(w, *rest) if _tree.is_float(w) else w


def _map(fn, params: PyTree, grads: PyTree | None = None) -> PyTree:
    """``fn`` per leaf of ``params`` (and of ``grads``, checked to match; a
    ``None`` gradient, as ``eqx.filter_grad`` gives non-array leaves, leaves
    the leaf as it is)."""
    if grads is None:
        return jax.tree.map(lambda w: _score_leaf(fn, w), params)
    _tree.check_same_structure(params, grads, "params", "grads")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    g_leaves = _tree.leaves_like(params, grads)
    out = [w if g is None else _score_leaf(fn, w, g) for w, g in zip(leaves, g_leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _need_grads(grads: PyTree | None, fn: str) -> None:
    if grads is None:
        raise TypeError(
            f"{fn} is a gradient score: call {fn}(params, grads) with the gradients of the "
            "loss (same structure as params)."
        )


def magnitude(params: PyTree, grads: PyTree | None = None, *, key: jax.Array | None = None) -> PyTree:
    """Magnitude score ``|w|`` (``grads`` and ``key`` are not used).

    Example:
      >>> import jax.numpy as jnp
      >>> magnitude({"w": jnp.array([-2.0, 1.0])})["w"].tolist()
      [2.0, 1.0]

    References:
      Han et al., "Learning both weights and connections for efficient neural
      networks", NeurIPS 2015; Zhu & Gupta, "To prune, or not to prune", 2017.
    """
    del grads, key
    return _map(jnp.abs, params)


def _is_prng_key(x: Any) -> bool:
    if not isinstance(x, jax.Array):
        return False
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return True
    return x.dtype == jnp.uint32 and x.shape == (2,)


def random(params: PyTree, grads: PyTree | None = None, *, key: jax.Array | None = None) -> PyTree:
    """Uniform random scores in ``[0, 1)`` (float32), independent per leaf.

    The same ``key`` gives the same scores; leaf ``i`` (in pytree order)
    draws from ``jax.random.fold_in(key, i)``. ``grads`` is not used. The
    old argument order ``random(key, params)`` still works, with a
    ``DeprecationWarning``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = random({"w": jnp.zeros((2, 2))}, key=jax.random.key(0))
      >>> s["w"].shape
      (2, 2)
    """
    if key is None and grads is not None and _is_prng_key(params):
        _deprecation.warn("jaxprune.scores.random(key, params)",
                          "jaxprune.scores.random(params, key=key)")
        params, key = grads, params
    if key is None:
        raise TypeError("random needs a PRNG key: call random(params, key=jax.random.key(0)).")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out = [
        _score_leaf(lambda x, i=i: jax.random.uniform(
            jax.random.fold_in(key, i), jnp.shape(x), jnp.float32), x)
        for i, x in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def saliency(params: PyTree, grads: PyTree | None = None, *, key: jax.Array | None = None) -> PyTree:
    """Connection sensitivity ``|w * g|`` (first-order change of the loss if
    the weight is removed), computed in float32.

    Args:
      params: the parameters.
      grads: gradients of the loss with the structure of ``params``.
      key: not used.

    Example:
      >>> import jax.numpy as jnp
      >>> saliency({"w": jnp.array([2.0, -1.0])}, {"w": jnp.array([0.5, 3.0])})["w"].tolist()
      [1.0, 3.0]

    References:
      Lee et al., "SNIP: Single-shot network pruning based on connection
      sensitivity", ICLR 2019; Mozer & Smolensky, "Skeletonization", 1989.
    """
    del key
    _need_grads(grads, "saliency")
    return _map(lambda w, g: jnp.abs(_wg(w, g)), params, grads)


class Scorer(NamedTuple):
    """A score usable inside a training-time transform (``score=`` argument).

    Stateless scores (magnitude, saliency) have an empty state; scores that
    accumulate over steps (Taylor, movement) keep their accumulators in the
    transform's state, so they are checkpointed with it.

    Attributes:
      init: ``params -> state``.
      update: ``(state, params, grads) -> state``, called on every step with
        the raw gradients (before any optimizer).
      score: ``(state, params, grads, key) -> scores`` on mask-update steps.
      lazy: optional ``(params, grads) -> scores`` whose floating leaves are
        :class:`jaxprune.select.LazyScores` giving exactly ``score``'s
        values: a transform then selects on them without ever storing a
        score-sized array (the mask update holds no score buffer). Set for
        the stateless ``"magnitude"`` and ``"saliency"``.
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, PyTree], PyTree]
    score: Callable[[PyTree, PyTree, PyTree, jax.Array], PyTree]
    lazy: Callable[[PyTree, PyTree], PyTree] | None = None


def stateless(fn: Callable[..., PyTree]) -> Scorer:
    """A :class:`Scorer` with an empty state from a :class:`ScoreFn` (or a
    callable ``(params, grads) -> scores`` that takes no ``key``)."""
    try:
        takes_key = any(p.name == "key" or p.kind == inspect.Parameter.VAR_KEYWORD
                        for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        takes_key = False
    if takes_key:
        return Scorer(init=lambda params: (), update=lambda s, p, g: s,
                      score=lambda s, p, g, k: fn(p, g, key=k))
    return Scorer(init=lambda params: (), update=lambda s, p, g: s,
                  score=lambda s, p, g, k: fn(p, g))


_REGISTRY: dict[str, Callable[..., PyTree]] = {
    "magnitude": magnitude,
    "random": random,
    "saliency": saliency,
}



def _abs_wg(w: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.abs(_wg(w, g))


def _lazy(fn: Callable[..., jax.Array], name: str,
          uses_grads: bool) -> Callable[[PyTree, PyTree], PyTree]:
    """``(params, grads) -> LazyScores`` of ``fn(w)`` (``fn(w, g)`` for a
    gradient score) per floating leaf, where :func:`_map` computes them."""

    def lazy(params: PyTree, grads: PyTree) -> PyTree:
        if not uses_grads:
            return _map(lambda w: _select.LazyScores(fn, (w,)), params)
        _need_grads(grads, name)
        return _map(lambda w, g: _select.LazyScores(fn, (w, g)), params, grads)

    return lazy


_SCORERS: dict[str, Scorer] = {name: stateless(fn) for name, fn in _REGISTRY.items()}
_SCORERS["magnitude"] = _SCORERS["magnitude"]._replace(lazy=_lazy(jnp.abs, "magnitude", False))
_SCORERS["saliency"] = _SCORERS["saliency"]._replace(lazy=_lazy(_abs_wg, "saliency", True))


def register(name: str, scorer: Scorer, fn: Callable[..., PyTree] | None = None) -> None:
    """Registers a :class:`Scorer` (and optionally a pure :class:`ScoreFn`) by name."""
    _SCORERS[name] = scorer
    if fn is not None:
        _REGISTRY[name] = fn


def names() -> list[str]:
    """Names accepted by ``score=`` in the transforms."""
    return sorted(_SCORERS)


def get(name: str) -> Callable[..., PyTree]:
    """The pure score function (:class:`ScoreFn`) registered under ``name``.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown score {name!r}; known score functions are {sorted(_REGISTRY)}."
        )
    return _REGISTRY[name]


def get_scorer(score: str | Callable[..., PyTree] | Scorer) -> Scorer:
    """Resolves a ``score=`` argument to a :class:`Scorer`.

    Args:
      score: a registered name (see :func:`names`), a :class:`Scorer`, or a
        :class:`ScoreFn` ``(params, grads=None, *, key=None) -> scores`` (a
        callable ``(params, grads) -> scores`` without ``key`` works too).

    Raises:
      ValueError: for an unknown name; TypeError for anything else.
    """
    if isinstance(score, Scorer):
        return score
    if isinstance(score, str):
        if score not in _SCORERS:
            raise ValueError(
                f"unknown score {score!r}; known scores are {names()}, or pass a callable "
                "(params, grads) -> scores."
            )
        return _SCORERS[score]
    if callable(score):
        return stateless(score)
    raise TypeError(
        f"score must be a name ({names()}), a Scorer or a callable (params, grads) -> "
        f"scores; got {type(score).__name__}."
    )


# --------------------------------------------------------------------------
# Accumulated gradient scores: Taylor (EMA of w * g) and movement (-sum w * g)


def _wg(w: jax.Array, g: jax.Array) -> jax.Array:
    return w.astype(jnp.float32) * g.astype(jnp.float32)


def _zeros_f32(params: PyTree) -> PyTree:
    return jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), params)


def taylor_importance(params: PyTree, grads: PyTree | None = None, *, key: jax.Array | None = None,
                      squared: bool = False) -> PyTree:
    """First-order Taylor importance of one batch: ``|w * g|`` or ``(w * g)**2``.

    This is the one-step form of :func:`taylor` (its registered pure
    function); computed in float32.

    Example:
      >>> import jax.numpy as jnp
      >>> s = taylor_importance({"w": jnp.array([[2.0, -1.0]])}, {"w": jnp.array([[3.0, 2.0]])},
      ...                       squared=True)
      >>> s["w"].tolist()
      [[36.0, 4.0]]

    References:
      Molchanov et al., "Importance estimation for neural network pruning",
      CVPR 2019.
    """
    del key
    _need_grads(grads, "taylor_importance")

    def one(w, g):
        wg = _wg(w, g)
        return wg * wg if squared else jnp.abs(wg)

    return _map(one, params, grads)


def taylor(decay: float = 0.9, squared: bool = False) -> Scorer:
    """First-order Taylor importance, averaged over steps with an EMA.

    Every step (raw gradients ``g``, before the optimizer) updates, in float32,

    * ``squared=False``: ``a <- decay * a + (1 - decay) * (w * g)``; score ``|a|``
      (Molchanov et al. 2017: the magnitude of the averaged first-order change
      of the loss when ``w`` is removed);
    * ``squared=True``: ``a <- decay * a + (1 - decay) * (w * g)**2``; score
      ``a`` (Molchanov et al. 2019: the averaged squared Taylor term).

    ``a`` starts at zero and is not bias-corrected (a common factor that does
    not change any ranking). The registered ``"taylor"`` uses the defaults.

    Args:
      decay: EMA decay in ``[0, 1)``; ``0`` scores the current batch only.
      squared: use the squared Taylor term.

    Returns:
      A :class:`Scorer` whose state is the float32 accumulator tree.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import jaxprune as jp
      >>> tx = jp.prune(optax.sgd(0.1), sparsity=0.5, score=jp.scores.taylor(decay=0.5))
      >>> sc = jp.scores.taylor(decay=0.5)
      >>> p, g = {"w": jnp.array([[1.0, 2.0]])}, {"w": jnp.array([[4.0, -1.0]])}
      >>> st = sc.update(sc.init(p), p, g)
      >>> st["w"].tolist()
      [[2.0, -1.0]]

    References:
      Molchanov et al., "Pruning convolutional neural networks for resource
      efficient inference", ICLR 2017; Molchanov et al., "Importance
      estimation for neural network pruning", CVPR 2019.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(
            f"taylor: decay must be a number in [0, 1), got {decay!r}. Use e.g. decay=0.9 "
            "(an EMA over about 10 steps), or decay=0.0 for the current batch only."
        )
    decay = float(decay)

    def update(state, params, grads):
        def one(a, w, g):
            if not _tree.is_float(w):
                return a
            t = _wg(w, g)
            t = t * t if squared else t
            return decay * a + (1.0 - decay) * t

        return jax.tree.map(one, state, params, grads)

    def score(state, params, grads, key):
        del grads, key
        return jax.tree.map(lambda a: a if squared else jnp.abs(a), state)

    return Scorer(init=_zeros_f32, update=update, score=score)


def movement_importance(params: PyTree, grads: PyTree | None = None, *,
                        key: jax.Array | None = None) -> PyTree:
    """One-step movement score ``-w * g`` (float32): positive when the step
    moves ``w`` away from zero.

    Example:
      >>> import jax.numpy as jnp
      >>> movement_importance({"w": jnp.array([[2.0, -1.0]])}, {"w": jnp.array([[3.0, 2.0]])})["w"].tolist()
      [[-6.0, 2.0]]

    References:
      Sanh et al., "Movement pruning: adaptive sparsity by fine-tuning",
      NeurIPS 2020.
    """
    del key
    _need_grads(grads, "movement_importance")
    return _map(lambda w, g: -_wg(w, g), params, grads)


def movement() -> Scorer:
    """Movement pruning score ``S = -sum_t w_t * g_t`` over all steps so far.

    The accumulator (float32, in the transform state) adds ``-w * g`` on every
    step, with the raw gradients; weights moving away from zero score high,
    weights shrinking toward zero score low, whatever their magnitude.
    Registered as ``"movement"``.

    Returns:
      A :class:`Scorer` whose state is the float32 accumulator tree.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> sc = jp.scores.movement()
      >>> p, g = {"w": jnp.array([[1.0, 2.0]])}, {"w": jnp.array([[4.0, -1.0]])}
      >>> st = sc.update(sc.update(sc.init(p), p, g), p, g)
      >>> sc.score(st, p, g, None)["w"].tolist()
      [[-8.0, 4.0]]

    References:
      Sanh et al., "Movement pruning: adaptive sparsity by fine-tuning",
      NeurIPS 2020.
    """

    def update(state, params, grads):
        return jax.tree.map(
            lambda a, w, g: a - _wg(w, g) if _tree.is_float(w) else a, state, params, grads
        )

    def score(state, params, grads, key):
        del params, grads, key
        return state

    return Scorer(init=_zeros_f32, update=update, score=score)


register("taylor", taylor(), taylor_importance)
register("movement", movement(), movement_importance)


def wanda(params: PyTree, stats: Any) -> PyTree:
    """Wanda score ``|W_ij| * ||X_j||_2``: weight magnitude times the norm of
    its input feature over the calibration data, in float32.

    Leaves without statistics score zero (so ``where=`` should pick the
    calibrated kernels, as :func:`jaxprune.oneshot.wanda` does).

    Args:
      params: the parameters.
      stats: ``{path: InputStats}`` from :func:`jaxprune.calibrate` on the
        same parameters.

    Returns:
      A score tree with the structure of ``params``.

    Raises:
      ValueError: if a path of ``stats`` is not a leaf of ``params`` or its
        shape differs from the one calibrated.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"w": jnp.array([[1.0, -1.0], [2.0, 0.5]])}
      >>> st = jp.calibrate(lambda p, x: x @ p["w"], p, [jnp.array([[3.0, 1.0]])])
      >>> jp.scores.wanda(p, st)["w"].tolist()
      [[3.0, 3.0], [2.0, 0.5]]

    References:
      Sun et al., "A simple and effective pruning approach for large language
      models", ICLR 2024.
    """
    paths, leaves, treedef = _tree.flatten(params)
    check_stats(paths, leaves, stats)
    out = []
    for p, w in zip(paths, leaves):
        if p in stats:
            st = stats[p]
            norm = st.expanded(jnp.sqrt(st.sumsq.astype(jnp.float32)))
            out.append(jnp.abs(jnp.asarray(w, jnp.float32)) * norm)
        else:
            out.append(jnp.zeros(jnp.shape(w), jnp.float32))
    return _tree.unflatten(treedef, out)


def check_stats(paths: list, leaves: list, stats: Any) -> None:
    """Raises ``ValueError`` if calibration ``stats`` (``{kernel path:
    InputStats}``) do not belong to these flattened parameter leaves (a path
    they lack, or another shape). Package API (Wanda, OWL), not in
    ``__all__``."""
    shapes = {p: tuple(jnp.shape(x)) for p, x in zip(paths, leaves)}
    for p, st in stats.items():
        if p not in shapes:
            raise ValueError(
                f"stats hold leaf {p!r}, which params do not have (params leaves: "
                f"{paths[:12]}). Calibrate the same parameter tree: "
                "stats = jp.calibrate(apply_fn, params, batches).")
        if shapes[p] != tuple(st.shape):
            raise ValueError(
                f"stats for leaf {p!r} were computed for shape {tuple(st.shape)}, but the "
                f"parameter has shape {shapes[p]}. Recalibrate on these params.")

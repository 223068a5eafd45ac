"""Knowledge distillation: a pruned (or compacted, or quantized) student
learns from the dense teacher's soft targets.

* :func:`loss`: Hinton's loss, ``alpha * T^2 * KL(p_t^T || p_s^T) + (1 -
  alpha) * CE(labels, p_s)``, the teacher through ``stop_gradient``;
* :func:`features`: an optional feature-matching term (FitNets), the mean
  squared error between matching student and teacher activations;
* :func:`loss_fn`: ``(variables, inputs, labels) -> loss`` for a student
  with the teacher's ``apply_fn`` and the dense variables as the default
  teacher (the same function serves the masked model during
  ``jp.prune`` / ``jp.structured.prune`` training and the compacted one).

Example:
  >>> import jax.numpy as jnp
  >>> import jaxprune as jp
  >>> s = jnp.array([[2.0, 0.0, -1.0]]); t = jnp.array([[3.0, 0.5, -2.0]])
  >>> round(float(jp.distill.loss(s, s)), 6)  # a student equal to its teacher
  0.0
  >>> float(jp.distill.loss(s, t, jnp.array([0]))) > 0
  True

References:
  Hinton, Vinyals & Dean, "Distilling the knowledge in a neural network",
  2015; Romero et al., "FitNets: hints for thin deep nets", ICLR 2015.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core.tree import PyTree

__all__ = ["features", "loss", "loss_fn"]


def _check_options(temperature: Any, alpha: Any) -> None:
    if not (isinstance(temperature, (int, float, np.number)) and temperature > 0):
        raise ValueError(f"distill.loss: temperature must be a number > 0, got {temperature!r}. "
                         "Hinton et al. use 1 to 20; 2.0 is the default.")
    if not (isinstance(alpha, (int, float, np.number)) and 0 <= alpha <= 1):
        raise ValueError(f"distill.loss: alpha must be a number in [0, 1], got {alpha!r} "
                         "(the weight of the soft term; 1 - alpha weighs the labels).")


def _hard_term(student: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy with integer labels (shape ``logits.shape[:-1]``) or
    target distributions (shape ``logits.shape``)."""
    labels = jnp.asarray(labels)
    if labels.shape == student.shape[:-1] and jnp.issubdtype(labels.dtype, jnp.integer):
        return optax.losses.softmax_cross_entropy_with_integer_labels(student, labels)
    if labels.shape == student.shape and jnp.issubdtype(labels.dtype, jnp.floating):
        return optax.losses.softmax_cross_entropy(student, labels)
    raise ValueError(
        f"distill.loss: labels of shape {labels.shape} and dtype {labels.dtype} do not fit "
        f"logits of shape {student.shape}: expected integer labels of shape "
        f"{student.shape[:-1]} or float targets of shape {student.shape}.")


def loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: Any = None, *,
         temperature: float = 2.0, alpha: float = 0.5) -> jax.Array:
    """Hinton's distillation loss, averaged over every leading axis.

    ``L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) *
    CE(labels, softmax(s))``. The ``T^2`` keeps the soft term's gradients at
    the scale of the hard term's as ``T`` changes. The teacher goes through
    ``jax.lax.stop_gradient``. Without ``labels`` the loss is the soft term
    alone (``alpha`` is then ignored). Computed in float32.

    Args:
      student_logits: ``(..., classes)`` logits of the student.
      teacher_logits: the teacher's logits, the same shape.
      labels: ``None``, integer labels of shape ``(...)``, or target
        distributions of shape ``(..., classes)``.
      temperature: ``T > 0`` of the soft targets.
      alpha: weight of the soft term in ``[0, 1]``.

    Returns:
      The scalar loss.

    Raises:
      ValueError: for mismatched shapes or labels, ``temperature <= 0`` or
        ``alpha`` outside ``[0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> s = jnp.array([[1.0, 0.0]]); t = jnp.array([[0.0, 1.0]])
      >>> round(float(jp.distill.loss(s, t, temperature=1.0)), 4)  # KL(t || s)
      0.4621

    References:
      Hinton, Vinyals & Dean, "Distilling the knowledge in a neural
      network", NIPS Deep Learning Workshop 2015 (section 2, the ``T^2``).
    """
    _check_options(temperature, alpha)
    s = jnp.asarray(student_logits)
    t = jnp.asarray(teacher_logits)
    if s.shape != t.shape or s.ndim < 1:
        raise ValueError(
            f"distill.loss: student_logits {s.shape} and teacher_logits {t.shape} must have "
            "the same shape (..., classes). Compute both on the same inputs.")
    s = s.astype(jnp.float32)
    t = jax.lax.stop_gradient(t.astype(jnp.float32))
    soft = optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(s / temperature), jax.nn.log_softmax(t / temperature))
    soft = temperature**2 * soft
    if labels is None:
        return jnp.mean(soft)
    return jnp.mean(alpha * soft + (1.0 - alpha) * _hard_term(s, labels))


def features(student: PyTree, teacher: PyTree) -> jax.Array:
    """Feature matching: the mean squared error between activations.

    ``L = mean_l mean((f_s^l - sg(f_t^l))^2)`` over the matching leaves of
    two pytrees of activations (one leaf per tapped layer). Add it to
    :func:`loss` with a weight: ``loss(...) + beta * features(fs, ft)``.
    After compaction a pruned layer is narrower than the teacher's: tap
    layers whose width is kept (the residual stream, the logits), or
    project first.

    Args:
      student: the student's activations (a pytree of arrays).
      teacher: the teacher's, the same structure and shapes.

    Returns:
      The scalar loss (the mean over leaves of each leaf's mean).

    Raises:
      ValueError: for different structures, shapes, or an empty tree.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> float(jp.distill.features({"h": jnp.ones((2, 3))}, {"h": jnp.zeros((2, 3))}))
      1.0

    References:
      Romero et al., "FitNets: hints for thin deep nets", ICLR 2015.
    """
    ps, ss = jax.tree_util.tree_flatten_with_path(student)
    pt, st = jax.tree_util.tree_flatten_with_path(teacher)
    if ss != st:
        raise ValueError(f"distill.features: student and teacher trees differ: {ss} vs {st}. "
                         "Tap the same layers in both models.")
    if not ps:
        raise ValueError("distill.features: no activations given; pass at least one array.")
    terms = []
    for (path, a), (_, b) in zip(ps, pt):
        a, b = jnp.asarray(a), jnp.asarray(b)
        if a.shape != b.shape:
            raise ValueError(
                f"distill.features: at {jax.tree_util.keystr(path)!r} the student's shape "
                f"{a.shape} differs from the teacher's {b.shape}. Tap a layer whose width "
                "is kept by compaction, or project the student's activation first.")
        d = a.astype(jnp.float32) - jax.lax.stop_gradient(b.astype(jnp.float32))
        terms.append(jnp.mean(d * d))
    return sum(terms) / len(terms)


def loss_fn(apply_fn: Callable, teacher_variables: PyTree, *,
            teacher_apply_fn: Callable | None = None, temperature: float = 2.0,
            alpha: float = 0.5) -> Callable:
    """A distillation loss ``(variables, inputs, labels=None) -> loss``.

    The teacher is ``teacher_apply_fn(teacher_variables, inputs)`` (by
    default the student's own ``apply_fn`` on the dense variables: the
    dense model teaches its pruned self), the student is ``apply_fn(variables,
    inputs)``, combined by :func:`loss`. The same function works while
    ``jp.prune`` / ``jp.structured.prune`` mask the student and after
    ``jp.structured.compact`` shrinks it, as long as ``apply_fn`` reads its
    sizes from the arrays (pure functions, Linen; see
    :mod:`jaxprune.resize` for the others).

    Args:
      apply_fn: the student's ``(variables, inputs) -> logits``.
      teacher_variables: the teacher's variables (the dense model's).
      teacher_apply_fn: the teacher's function (default ``apply_fn``).
      temperature, alpha: as in :func:`loss`.

    Returns:
      ``fn(variables, inputs, labels=None) -> scalar``, differentiable in
      ``variables``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxprune as jp
      >>> f = lambda p, x: x @ p["w"]
      >>> dense = {"w": jnp.array([[1.0, -1.0], [0.5, 2.0]])}
      >>> fn = jp.distill.loss_fn(f, dense)
      >>> x = jnp.ones((4, 2))
      >>> float(fn(dense, x))  # the teacher teaching itself
      0.0
      >>> g = jax.grad(fn)(jp.apply_masks(dense, {"w": jnp.eye(2, dtype=bool)}), x)
      >>> g["w"].shape
      (2, 2)

    References:
      Hinton et al. 2015; Sanh et al., "Movement pruning", NeurIPS 2020
      (distillation from the dense teacher during pruning).
    """
    _check_options(temperature, alpha)
    teacher_apply = apply_fn if teacher_apply_fn is None else teacher_apply_fn

    def fn(variables: PyTree, inputs: Any, labels: Any = None) -> jax.Array:
        t = teacher_apply(teacher_variables, inputs)
        return loss(apply_fn(variables, inputs), t, labels, temperature=temperature,
                    alpha=alpha)

    return fn

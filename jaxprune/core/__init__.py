"""The core: pure functions on parameter trees, no model and no optimizer.

``tree`` (leaf paths, ``where=``) -> ``select`` (exact k-th-largest
selection) -> ``masks`` (top-k, N:M, blocks, channels) -> ``scores``
(magnitude, saliency, Taylor, movement) -> ``allocation`` (per-leaf budgets).
Public paths are ``jaxprune.tree``, ``jaxprune.select``, ``jaxprune.masks``,
``jaxprune.scores`` and ``jaxprune.allocation`` (``jp.masks`` etc.).
"""

"""jaxprune: exact, fast neural-network pruning for JAX, as optax transforms.

Example:
  >>> import jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"w": jnp.arange(8.0).reshape(2, 4), "b": jnp.zeros(4)}
  >>> masks = jp.masks.global_topk(jp.scores.magnitude(params), 0.75)
  >>> jp.sparsity(jp.apply_masks(params, masks))
  0.75
"""

from jaxprune import masks, scores, select, tree
from jaxprune.masks import apply_masks, pack, sparsity, summary, unpack

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "apply_masks",
    "masks",
    "pack",
    "scores",
    "select",
    "sparsity",
    "summary",
    "tree",
    "unpack",
]

"""jaxprune: exact, fast neural-network pruning for JAX, as optax transforms.

Example:
  >>> import jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"w": jnp.arange(8.0).reshape(2, 4), "b": jnp.zeros(4)}
  >>> masks = jp.masks.global_topk(jp.scores.magnitude(params), 0.75)
  >>> jp.sparsity(jp.apply_masks(params, masks))
  0.75
"""

from jaxprune import allocation, masks, scores, select, transforms, tree
from jaxprune.masks import apply_masks, pack, sparsity, summary, unpack
from jaxprune.transforms import PruneState, get_masks, keep_masks, prune

__version__ = "0.1.0"

__all__ = [
    "PruneState",
    "__version__",
    "allocation",
    "apply_masks",
    "get_masks",
    "keep_masks",
    "masks",
    "pack",
    "prune",
    "scores",
    "select",
    "sparsity",
    "summary",
    "transforms",
    "tree",
    "unpack",
]

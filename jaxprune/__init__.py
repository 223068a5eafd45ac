"""jaxprune: exact, fast neural-network pruning for JAX, as optax transforms.

Example:
  >>> import jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"w": jnp.arange(8.0).reshape(2, 4), "b": jnp.zeros(4)}
  >>> masks = jp.masks.global_topk(jp.scores.magnitude(params), 0.75)
  >>> jp.sparsity(jp.apply_masks(params, masks))
  0.75
"""

from jaxprune import (
    allocation,
    dynamic,
    graph,
    lottery,
    masks,
    regularizers,
    scores,
    select,
    sensitivity,
    structured,
    transforms,
    tree,
)
from jaxprune.dynamic import DynamicState, STEState, rigl, set_training, ste, straight_through
from jaxprune.lottery import LotteryState, lottery_ticket
from jaxprune.masks import apply_masks, pack, sparsity, summary, unpack
from jaxprune.search import SearchResult, search
from jaxprune.snip import snip
from jaxprune.transforms import PruneState, get_masks, keep_masks, prune

__version__ = "0.1.0"

__all__ = [
    "DynamicState",
    "LotteryState",
    "PruneState",
    "STEState",
    "SearchResult",
    "__version__",
    "allocation",
    "apply_masks",
    "dynamic",
    "get_masks",
    "graph",
    "keep_masks",
    "lottery",
    "lottery_ticket",
    "masks",
    "pack",
    "prune",
    "regularizers",
    "rigl",
    "scores",
    "search",
    "select",
    "sensitivity",
    "set_training",
    "snip",
    "sparsity",
    "ste",
    "straight_through",
    "structured",
    "summary",
    "transforms",
    "tree",
    "unpack",
]

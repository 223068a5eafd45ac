"""jaxprune: exact, fast neural-network pruning for JAX, as optax transforms.

Example:
  >>> import jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"w": jnp.arange(8.0).reshape(2, 4), "b": jnp.zeros(4)}
  >>> jp.tree.selected(params)  # what where=None prunes: kernels, not biases
  ['w']
  >>> masks = jp.masks.global_topk(jp.scores.magnitude(params), 0.75)
  >>> jp.sparsity_of(jp.apply_masks(params, masks))
  0.75
"""

import sys as _sys
import types as _types

from jaxprune import (
    allocation,
    at_init,
    calibration,
    deprecation,
    distill,
    dynamic,
    export,
    graph,
    lottery,
    masks,
    oneshot,
    quant,
    regularizers,
    resize,
    scores,
    select,
    sensitivity,
    structured,
    transform_base,
    transforms,
    tree,
)
from jaxprune.at_init import snip
from jaxprune.calibration import calibrate
from jaxprune.dynamic import (
    DynamicState,
    STEState,
    rigl,
    set_training,
    ste_training,
)
from jaxprune.lottery import LotteryState, lottery_ticket
from jaxprune.masks import (
    apply_masks,
    apply_masks_ste,
    pack,
    sparsity_of,
    summary,
    unpack,
)
from jaxprune.search import SearchResult, search
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
    "apply_masks_ste",
    "at_init",
    "calibrate",
    "calibration",
    "deprecation",
    "distill",
    "dynamic",
    "export",
    "get_masks",
    "graph",
    "keep_masks",
    "lottery",
    "lottery_ticket",
    "masks",
    "oneshot",
    "pack",
    "prune",
    "quant",
    "regularizers",
    "resize",
    "rigl",
    "scores",
    "search",
    "select",
    "sensitivity",
    "set_training",
    "snip",
    "sparsity_of",
    "ste_training",
    "structured",
    "summary",
    "transforms",
    "transform_base",
    "tree",
    "unpack",
]

# Deprecated names (not in __all__; they warn and name the new one). The old
# module jaxprune.snip is now jaxprune.at_init; `jp.snip` is the function, so
# the old module lives only in sys.modules, where
# `from jaxprune.snip import snip_scores` finds it.
sparsity = masks.sparsity
ste = dynamic.ste
straight_through = dynamic.straight_through


class _DeprecatedModule(_types.ModuleType):
    def __init__(self, name: str, target: _types.ModuleType, new: str):
        super().__init__(name, f"Deprecated: use {new}.")
        self._target, self._new = target, new

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        deprecation.warn(f"{self.__name__}.{attr}", f"{self._new}.{attr}")
        return getattr(self._target, attr)


_sys.modules.setdefault(
    "jaxprune.snip", _DeprecatedModule("jaxprune.snip", at_init, "jaxprune.at_init"))

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

from jaxprune import _deprecation, export, graph, oneshot, structured
from jaxprune.budgets import agents, sensitivity
from jaxprune.budgets.agents import SearchResult, search
from jaxprune.compress import distill, quant
from jaxprune.core import allocation, masks, scores, select, tree
from jaxprune.core.masks import (
    apply_masks,
    apply_masks_ste,
    pack,
    sparsity_of,
    summary,
    unpack,
)
from jaxprune.oneshot import calibration
from jaxprune.oneshot.calibration import calibrate
from jaxprune.structured import resize
from jaxprune.train import at_init, dynamic, lottery, regularizers, transforms
from jaxprune.train import base as _transform_base
from jaxprune.train.at_init import snip
from jaxprune.train.dynamic import DynamicState, rigl, set_training
from jaxprune.train.lottery import LotteryState, lottery_ticket
from jaxprune.train.transforms import (
    PruneState,
    STEState,
    get_masks,
    keep_masks,
    prune,
    ste_training,
)

__version__ = "0.1.0"

__all__ = [
    "DynamicState",
    "LotteryState",
    "PruneState",
    "STEState",
    "SearchResult",
    "__version__",
    "agents",
    "allocation",
    "apply_masks",
    "apply_masks_ste",
    "at_init",
    "calibrate",
    "calibration",
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
    "tree",
    "unpack",
]

# Deprecated names (not in __all__; they warn and name the new one).
sparsity = masks.sparsity
ste = dynamic.ste
straight_through = dynamic.straight_through


class _DeprecatedModule(_types.ModuleType):
    """An old module path: every attribute warns and names the new module."""

    def __init__(self, name: str, target: _types.ModuleType, new: str, note: str = ""):
        super().__init__(name, f"Deprecated: use {new}{note}.")
        self._target, self._new, self._note = target, new, note

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # dunders and probes (doctest, mock) never warn
            raise AttributeError(attr)
        _deprecation.warn(f"{self.__name__}.{attr}", f"{self._new}.{attr}{self._note}")
        return getattr(self._target, attr)


def _old_module(old: str, target: _types.ModuleType, new: str,
                note: str = "") -> _types.ModuleType:
    """Registers ``jaxprune.<old>`` (importable, warning on use, naming
    ``jaxprune.<new>``)."""
    module = _DeprecatedModule(f"jaxprune.{old}", target, f"jaxprune.{new}", note)
    _sys.modules[module.__name__] = module
    return module


# Old module paths: jaxprune.snip (now at_init; `jp.snip` is the function),
# jaxprune.search (now agents; `jp.search` is the function), and the
# internals that were public (transform_base, deprecation).
_old_module("snip", at_init, "at_init")
_old_module("search", agents, "agents")
transform_base = _old_module("transform_base", _transform_base, "train.base",
                             " (internal, no public API)")
deprecation = _old_module("deprecation", _deprecation, "_deprecation",
                          " (internal, no public API)")


# The folders (core, train, structured, oneshot, budgets, compress, export,
# graph) are the layout; the public module paths stay flat: jaxprune.masks,
# jaxprune.transforms, ... are the modules above, also for `import` and
# `from ... import`.
for _name, _module in {
        "tree": tree, "select": select, "masks": masks, "scores": scores,
        "allocation": allocation, "transforms": transforms, "dynamic": dynamic,
        "lottery": lottery, "at_init": at_init, "regularizers": regularizers,
        "resize": resize, "calibration": calibration, "sensitivity": sensitivity,
        "agents": agents, "quant": quant, "distill": distill}.items():
    _sys.modules.setdefault(f"jaxprune.{_name}", _module)
del _name, _module

"""The model graph, read from the jaxpr: leaf roles and coupled channel groups.

:func:`trace` walks ``jax.make_jaxpr(apply_fn)(variables, *args)`` with one
rule per primitive and returns a :class:`ModelGraph`: the role of every leaf
(kernel, embedding, bias, norm, running statistic) with its input and output
axes, the groups of channels that must be pruned together (a layer's output
channels with its bias, norm parameters and the next layers' input slices;
both branches of a residual add; a head's query, key, value and output
slices), whether each group can be pruned and why not, and the MACs of every
dot and convolution. :mod:`jaxprune.graph.sites` is the graph's reader
for the other tools: where each kernel is read and one hook to tap its
input there (calibration, SparseGPT, activation statistics).

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxprune as jp
  >>> params = {"a": {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}, "c": {"w": jnp.ones((8, 2))}}
  >>> g = jp.graph.trace(lambda p, x: jnp.tanh(x @ p["a"]["w"] + p["a"]["b"]) @ p["c"]["w"],
  ...                    params, jnp.ones((1, 4)))
  >>> g.prunable[0].name, g.prunable[0].size, g.macs
  ('a/w:1', 8, 48)
"""

from jaxprune.core import tree as _tree
from jaxprune.graph import _control as _control  # registers the control-flow rules
from jaxprune.graph import rules, sites
from jaxprune.graph._groups import WEIGHT_ROLES, choose_groups, layer_counts
from jaxprune.graph._model import Group, LeafInfo, Member, ModelGraph, rebuild
from jaxprune.graph._trace import register, trace

__all__ = ["WEIGHT_ROLES", "Group", "LeafInfo", "Member", "ModelGraph", "choose_groups",
           "rebuild", "register", "rules", "sites", "trace"]

# layers=graph in every function of jp.tree's users (stacked layers).
_tree.register_layer_source(ModelGraph, layer_counts)

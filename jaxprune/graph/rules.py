"""Ready-made rules for :func:`jaxprune.graph.register`.

* :func:`elementwise`: same-shape operands (scalars broadcast), position
  ``i`` of every operand is position ``i`` of the output (``add``, ``tanh``);
* :func:`passthrough`: each output is its operand, unchanged (casts,
  copies, sharding annotations, identity-like custom primitives);
* :func:`call`: the primitive runs a sub-jaxpr (found in its params as
  ``jaxpr``, ``call_jaxpr`` or ``fun_jaxpr``) on its operands.

Example:
  >>> import jaxprune as jp
  >>> from jax.extend.core import primitives as P
  >>> jp.graph.register(P.tanh_p, jp.graph.rules.elementwise)  # already the default
"""

from jaxprune.graph._control import call
from jaxprune.graph._rules import elementwise, passthrough

__all__ = ["call", "elementwise", "passthrough"]

"""Structured pruning: units from the model graph scored, masked as groups,
physically removed (``units``), and model size attributes updated
(``resize``, public as ``jaxprune.resize``). See :mod:`jaxprune.structured.units`.
"""

from jaxprune.structured.units import *  # noqa: F403 (the public face)
from jaxprune.structured.units import __all__, common_prefix, leaf_masks  # noqa: F401

"""One-shot (post-training) pruning from activations: calibration statistics
(``calibration``, public as ``jaxprune.calibration``), Wanda and SparseGPT
(``pruners``). See :mod:`jaxprune.oneshot.pruners`.
"""

from jaxprune.oneshot.pruners import *  # noqa: F403 (the public face)
from jaxprune.oneshot.pruners import __all__  # noqa: F401

"""Shipping a pruned model: StableHLO and LiteRT files, and their sizes.

* :func:`stablehlo`: the server route, ``jax.export`` serialized; any XLA
  runtime (CPU, GPU, TPU) runs it without the model's Python code.
* :func:`litert`: the edge route, a LiteRT (TFLite) flatbuffer through
  ``jax2tf`` and the TFLite converter, float, float16, int8 weights or full
  integer from calibration batches, optionally with sparse weights (extra
  ``litert``); :class:`LiteRTModel` runs one and reads its weights back.
* :func:`report`: bytes on disk of every artifact (orbax checkpoint,
  StableHLO, LiteRT variants) beside parameters, nonzeros and MACs.

This package sits on top of the library: it may use any module, none
imports it. Sizes are read from written files, never estimated.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxprune as jp
  >>> v = {"w": jnp.eye(3)}
  >>> blob = jp.export.stablehlo(lambda v, x: x @ v["w"], v, jnp.ones((2, 3)))
  >>> jax.export.deserialize(blob).call(jnp.ones((2, 3))).shape
  (2, 3)
"""

from jaxprune.export._litert import QUANTIZE, LiteRTModel, densify, litert
from jaxprune.export._report import FORMATS, Report, file_bytes, report
from jaxprune.export._stablehlo import stablehlo

__all__ = [
    "FORMATS",
    "LiteRTModel",
    "QUANTIZE",
    "Report",
    "densify",
    "file_bytes",
    "litert",
    "report",
    "stablehlo",
]

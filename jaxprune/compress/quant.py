"""Quantization that keeps the masks, on google/qwix (extra ``quant``).

No quantizer of our own: the numerics are qwix's (``qwix.quantize``,
``qwix.dequantize``, ``QtProvider`` for QAT, ``PtqProvider`` and
``quantize_params`` for PTQ). This module holds the masks through them.

* **QAT with masks held (PQAT).** qwix fake-quantizes the weights in the
  forward pass and leaves the float weights in the parameters, so a pruning
  transform on the float weights composes: ``jp.prune`` / ``jp.structured.prune``
  / ``jp.lottery_ticket`` keep them exactly zero, and symmetric fake
  quantization maps zero to zero. The five lines (NNX)::

    qmodel = jp.quant.qat(model, x, weight_qtype="int8", act_qtype="int8")
    opt = nnx.Optimizer(qmodel, jp.prune(optax.adam(1e-3), sparsity=0.5), wrt=nnx.Param)
    ...                                       # train as usual
    masks = jp.get_masks(opt.opt_state)
    served = jp.quant.ptq(qmodel, x, masks=masks, weight_qtype="int8")

  For Linen, ``jp.quant.qat(module)`` returns the module to ``init`` /
  ``apply``. For plain functions of a parameter tree,
  :func:`fake_quant` inside the loss is the same QAT (straight-through).
* **PTQ of a pruned model.** ``qwix.quantize_params`` replaces kernels by
  quantized arrays, after which masks no longer fit the tree: :func:`ptq`
  and :func:`quantize` apply the masks first, quantize second, and check
  that every pruned weight is still exactly zero.
* **Joint one-shot.** :func:`column_quantizer` gives
  ``jp.oneshot.sparsegpt(..., quantize=...)`` qwix's rounding, so each
  column is pruned and quantized in one OBS pass (the reference's
  ``--wbits``).

Example:
  >>> import jax.numpy as jnp
  >>> import jaxprune as jp
  >>> w = {"w": jnp.array([[0.0, 1.0], [-0.5, 0.0], [0.25, 0.3]])}
  >>> q = jp.quant.quantize(w, "int8")
  >>> jp.quant.dequantize(q)["w"][:, 0].tolist()  # zeros stay zero
  [0.0, -0.49803924560546875, 0.250980406999588]

References:
  Jacob et al., "Quantization and training of neural networks for
  efficient integer-arithmetic-only inference", CVPR 2018; TF Model
  Optimization's pruning-preserving QAT (PQAT), 2021; google/qwix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import masks as _masks
from jaxprune.core import tree as _tree
from jaxprune.core.tree import PyTree

__all__ = ["column_quantizer", "dequantize", "fake_quant", "ptq", "qat", "quantize"]

INSTALL = 'pip install "jaxprune[quant]"'


def qwix_module():
    """Imports qwix, or raises an ImportError that names the extra."""
    try:
        import qwix
    except ImportError as e:
        raise ImportError(f"jp.quant needs qwix (JAX quantization, qwix>=0.1.8), which is not "
                          f"installed. Install the extra: {INSTALL}") from e
    return qwix


def _check_qtype(qtype: Any, fn: str) -> None:
    try:
        ok = qtype == "nf4" or (jnp.issubdtype(jnp.dtype(qtype), jnp.number)
                                and jnp.dtype(qtype).itemsize <= 1)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"jp.quant.{fn}: qtype {qtype!r} is not a quantized type; use "
                         "'int8', 'int4', 'float8_e4m3fn' or another qwix qtype.")


def _is_qarray(x: Any) -> bool:
    qwix = qwix_module()
    return isinstance(x, qwix.QArray)


def _reject_quantized(params: PyTree, fn: str) -> None:
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qarray)
    for path, leaf in flat:
        if (_is_qarray(leaf) or type(leaf).__name__ == "WithAux"
                or any(getattr(k, "key", None) == "qvalue" for k in path)):
            name = jax.tree_util.keystr(path).split("['array']")[0]
            raise ValueError(
                f"jp.quant.{fn}: the leaf at {name!r} is already "
                "quantized. Masks must be applied to the float weights before quantization: "
                f"pass the float parameters and masks=... to jp.quant.{fn}.")


def _axes(leaf: Any, axis: int | tuple, path: str, fn: str) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    nd = jnp.ndim(leaf)
    if not axes or any(not -nd <= a < nd for a in axes):
        raise ValueError(f"jp.quant.{fn}: axis={axis!r} is out of range for the leaf at {path!r} "
                         f"of shape {jnp.shape(leaf)}; give the output-channel axis (default -1).")
    return tuple(sorted(a % nd for a in axes))


def quantize(params: PyTree, qtype: Any = "int8", *, masks: PyTree = None, where: Any = None,
             axis: int | tuple = -1, calibration_method: str = "absmax") -> PyTree:
    """Weight-only post-training quantization of a parameter tree, masks first.

    Each selected leaf ``w`` becomes ``qwix.quantize(where(mask, w, 0),
    qtype, channelwise_axes=axis)``: a ``qwix.QArray`` with one scale per
    output channel, ``q = round(w / s)``, ``s = max|w| / qmax`` (symmetric,
    so ``0`` maps to ``0``). Other leaves stay as they are.

    Args:
      params: float parameters (any pytree).
      qtype: a qwix qtype: ``"int8"``, ``"int4"``, ...
      masks: masks to apply first (``jp.get_masks(state)``), or ``None``.
      where: the leaves to quantize (``None``: kernels, see ``jp.tree``).
      axis: the channel axis (or axes) with their own scales.
      calibration_method: qwix's weight calibration (``"absmax"``, ...).

    Returns:
      The tree with ``qwix.QArray`` leaves where selected.

    Raises:
      ValueError: for an unknown ``qtype``, a bad ``axis``, an already
        quantized leaf, or a quantizer that moved a pruned weight off zero.
      ImportError: without qwix (``pip install "jaxprune[quant]"``).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"w": jnp.array([[1.0, -2.0], [0.5, 4.0]]), "b": jnp.ones(2)}
      >>> q = jp.quant.quantize(p, "int8", masks={"w": jnp.array([[True, False], [True, True]]), "b": True})
      >>> q["w"].qvalue.tolist(), q["w"].scale.shape
      ([[127, 0], [64, 127]], (1, 2))

    References:
      google/qwix, ``qwix.quantize`` (``qarray.quantize_api``).
    """
    qwix = qwix_module()
    _check_qtype(qtype, "quantize")
    _reject_quantized(params, "quantize")
    if masks is not None:
        params = _masks.apply_masks(params, masks)

    def one(path, leaf):
        name = jax.tree_util.keystr(path)
        q = qwix.quantize(jnp.asarray(leaf), qtype,
                          channelwise_axes=_axes(leaf, axis, name, "quantize"),
                          calibration_method=calibration_method)
        _check_zeros(leaf, qwix.dequantize(q), name, "quantize")
        return q

    return _map_selected(one, params, where)


def _map_selected(fn: Callable, params: PyTree, where: Any) -> PyTree:
    """``fn(path, leaf)`` on the leaves ``where`` selects; the others as they are."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    sel = _tree.flags(params, where)
    return jax.tree_util.tree_unflatten(
        treedef, [fn(p, x) if s else x for (p, x), s in zip(flat, sel)])


def _check_zeros(before: Any, after: Any, path: str, fn: str) -> None:
    """Raises if a weight that was exactly zero is not after quantization."""
    try:
        b, a = np.asarray(before), np.asarray(after)
    except jax.errors.TracerArrayConversionError:
        return  # under jit: symmetric qwix quantizers map 0 to 0 (tested)
    moved = int(np.sum((b == 0) & (a != 0)))
    if moved:
        raise ValueError(f"jp.quant.{fn}: {moved} pruned (zero) weights of {path!r} are not zero "
                         "after quantization (an asymmetric calibration's zero point?). Use a "
                         "symmetric calibration_method such as 'absmax'.")


def dequantize(tree: PyTree) -> PyTree:
    """Replaces every ``qwix.QArray`` leaf by its float value.

    Args:
      tree: a tree from :func:`quantize` (other leaves pass through).

    Returns:
      The float tree: ``(qvalue - zero_point) * scale`` per quantized leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> q = jp.quant.quantize({"w": jnp.array([[0.0, 2.0], [1.0, -1.0]])}, "int4")
      >>> jp.quant.dequantize(q)["w"][0].tolist()  # scales 2 / 7.5 and 1 / 7.5 (qwix)
      [0.0, 1.8666667938232422]
    """
    qwix = qwix_module()
    return jax.tree.map(lambda x: qwix.dequantize(x) if _is_qarray(x) else x, tree,
                        is_leaf=_is_qarray)


def fake_quant(params: PyTree, qtype: Any = "int8", *, where: Any = None, axis: int | tuple = -1,
               calibration_method: str = "absmax") -> PyTree:
    """Fake quantization for QAT of a plain function: forward quantized,
    backward straight through.

    ``fq(w) = w + stop_gradient(dequantize(quantize(w)) - w)`` for each
    selected leaf (the rounding of :func:`quantize`), so ``d fq / d w = 1``.
    Use it inside the loss, ``loss(jp.quant.fake_quant(p), x)``, with any
    pruning transform on ``p``: pruned weights are zero, and so is their
    fake-quantized value.

    Args:
      params: float parameters.
      qtype, where, axis, calibration_method: as in :func:`quantize`.

    Returns:
      The tree the forward pass should use.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"w": jnp.array([[0.0, 0.3], [1.0, -1.0]])}
      >>> jp.quant.fake_quant(p, "int4")["w"][0].tolist()
      [0.0, 0.2666666805744171]
      >>> jax.grad(lambda p: jp.quant.fake_quant(p, "int4")["w"].sum())(p)["w"].tolist()
      [[1.0, 1.0], [1.0, 1.0]]

    References:
      Bengio et al. 2013 (straight-through estimator); Jacob et al. 2018.
    """
    qwix = qwix_module()
    _check_qtype(qtype, "fake_quant")

    def one(path, leaf):
        axes = _axes(leaf, axis, jax.tree_util.keystr(path), "fake_quant")
        fq = qwix.dequantize(qwix.quantize(leaf, qtype, channelwise_axes=axes,
                                           calibration_method=calibration_method))
        return leaf + jax.lax.stop_gradient(fq.astype(leaf.dtype) - leaf)

    return _map_selected(one, params, where)


def _rule(provider_rule: str, weight_qtype: Any, act_qtype: Any, module_path: str,
          kwargs: dict) -> Any:
    qwix = qwix_module()
    if weight_qtype is None and act_qtype is None:
        raise ValueError(f"jp.quant.{provider_rule}: weight_qtype and act_qtype are both None; "
                         "nothing would be quantized. Give weight_qtype='int8' at least.")
    for q in (weight_qtype, act_qtype):
        if q is not None:
            _check_qtype(q, provider_rule)
    return qwix.QtRule(module_path=module_path, weight_qtype=weight_qtype, act_qtype=act_qtype,
                       **kwargs)


def qat(model: Any, *inputs: Any, weight_qtype: Any = "int8", act_qtype: Any = None,
        module_path: str = ".*", **rule: Any) -> Any:
    """A Flax model with qwix quantization-aware training (one ``QtRule``).

    ``qwix.quantize_model(model, qwix.QtProvider([qwix.QtRule(...)]),
    *inputs)``: the forward pass fake-quantizes the matching layers'
    weights (and activations with ``act_qtype``); the parameters stay
    float, so a pruning transform holds their masks (see the module doc).

    Args:
      model: a Flax NNX module (``inputs`` required: qwix runs it once) or a
        Linen module (no ``inputs``).
      *inputs: example inputs for NNX.
      weight_qtype, act_qtype: qwix qtypes (``"int8"``, ``"int4"``, None).
      module_path: regex of the module paths to quantize.
      **rule: other ``qwix.QtRule`` fields.

    Returns:
      The QAT model (a copy; NNX) or module (Linen).

    Raises:
      ValueError: if nothing would be quantized, or for an unknown qtype.
      ImportError: without qwix.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxprune as jp
      >>> m = jp.quant.qat(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), jnp.ones((1, 4)))
      >>> m(jnp.ones((3, 4))).shape
      (3, 2)

    References:
      google/qwix, ``QtProvider`` (quantized training).
    """
    qwix = qwix_module()
    r = _rule("qat", weight_qtype, act_qtype, module_path, rule)
    return qwix.quantize_model(model, qwix.QtProvider([r]), *inputs)


def ptq(model: Any, *inputs: Any, variables: PyTree = None, masks: PyTree = None,
        weight_qtype: Any = "int8", act_qtype: Any = None, module_path: str = ".*",
        **rule: Any) -> Any:
    """Post-training quantization of a (pruned) Flax model: masks, then
    ``qwix.quantize_params``.

    Builds qwix's PTQ model, applies ``masks`` to the float parameters,
    quantizes them with ``qwix.quantize_params`` and checks that every
    pruned weight is still exactly zero.

    Args:
      model: an NNX module (float or QAT; its parameters are the ones
        quantized) or a Linen module.
      *inputs: example inputs (run once by qwix for NNX, by ``init`` for
        Linen).
      variables: Linen only: the float variables (``{"params": ...}``).
      masks: masks with the structure of the parameters (for NNX,
        ``jp.get_masks(opt.opt_state)`` of an ``nnx.Optimizer``), or None.
      weight_qtype, act_qtype, module_path, **rule: the qwix rule.

    Returns:
      NNX: the PTQ model holding quantized weights. Linen: ``(module,
      variables)`` for ``module.apply(variables, x)``.

    Raises:
      ValueError: for already quantized parameters (quantize after
        masking), missing ``variables`` for Linen, or moved zeros.
      TypeError: for a model that is neither NNX nor Linen.
      ImportError: without qwix.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxprune as jp
      >>> lin = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> m = jp.quant.ptq(lin, jnp.ones((1, 4)), weight_qtype="int8")
      >>> m.kernel.array.qvalue.dtype
      dtype('int8')

    References:
      google/qwix, ``PtqProvider``, ``quantize_params``.
    """
    qwix = qwix_module()
    from flax import linen as nn
    from flax import nnx

    r = _rule("ptq", weight_qtype, act_qtype, module_path, rule)
    provider = qwix.PtqProvider([r])
    if isinstance(model, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        _reject_quantized(params, "ptq")
        if masks is not None:
            m = masks if isinstance(masks, dict) else nnx.to_pure_dict(masks)
            params = _masks.apply_masks(params, m)
        qmodel = qwix.quantize_model(model, provider, *inputs)
        qparams = qwix.quantize_params(params, qmodel)
        nnx.update(qmodel, qparams)
        _check_tree_zeros(params, qparams, "ptq")
        return qmodel
    if isinstance(model, nn.Module):
        if variables is None or "params" not in variables:
            raise ValueError("jp.quant.ptq: a Linen module needs variables={'params': ...} "
                             "(its trained float variables).")
        params = nn.unbox(variables["params"])
        _reject_quantized(params, "ptq")
        if masks is not None:
            params = _masks.apply_masks(params, masks)
        qmodule = qwix.quantize_model(model, provider)
        abstract = jax.eval_shape(qmodule.init, jax.random.key(0), *inputs)
        qparams = qwix.quantize_params(params, abstract["params"])
        _check_tree_zeros(params, qparams, "ptq")
        return qmodule, {**variables, "params": qparams}
    raise TypeError(f"jp.quant.ptq: model must be a Flax NNX or Linen module, got "
                    f"{type(model).__name__}. For a plain parameter tree use "
                    "jp.quant.quantize(params, qtype, masks=...).")


def _check_tree_zeros(params: PyTree, qparams: PyTree, fn: str) -> None:
    """Compares every float leaf with its quantized counterpart (found by
    path; qwix stores a quantized kernel as ``{array: {qvalue, scale, ...}}``)."""
    qwix = qwix_module()
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, before in flat.items():
        node = qparams
        for k in path:
            node = node[getattr(k, "key", getattr(k, "idx", None))]
        if isinstance(node, dict) and "array" in node:
            a = node["array"]
            node = qwix.dequantize(qwix.QArray(a["qvalue"], a["scale"], a.get("zero_point")))
        elif type(node).__name__ == "WithAux":
            node = qwix.dequantize(node.array)
        _check_zeros(before, node, jax.tree_util.keystr(path), fn)


def column_quantizer(qtype: Any = "int8", *, calibration_method: str = "absmax") -> Callable:
    """qwix's rounding, for SparseGPT with quantization (joint one-shot).

    ``column_quantizer(qtype)(w)`` takes a kernel as ``(outputs, inputs)``,
    fixes one scale per output row from the whole (unpruned) ``w`` as the
    reference's ``find_params(W, weight=True)``, and returns ``fn(col) ->
    dequantize(quantize(col))`` for its columns. Pass it as
    ``jp.oneshot.sparsegpt(..., quantize=jp.quant.column_quantizer("int4"))``:
    every column is pruned, then quantized, and both errors are spread over
    the later columns. Zero stays zero (symmetric).

    Args:
      qtype: a qwix qtype.
      calibration_method: qwix's calibration of the row scales.

    Returns:
      ``w -> (col -> col)``, traceable under jit.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> w = jnp.array([[1.0, 0.3], [-2.0, 0.0]])
      >>> f = jp.quant.column_quantizer("int4")(w)
      >>> f(w[:, 1]).tolist()  # qwix's int4 absmax: scale max|row| / 7.5
      [0.2666666805744171, 0.0]

    References:
      Frantar & Alistarh, SparseGPT, ICML 2023 (``--wbits``); Frantar et
      al., GPTQ, ICLR 2023; qwix ``contrib/gptq_core`` (the rounding).
    """
    qwix = qwix_module()
    _check_qtype(qtype, "column_quantizer")
    from qwix.contrib import gptq_core

    def prepare(w: jax.Array) -> Callable:
        q = qwix.quantize(w, qtype, channelwise_axes=(0,), calibration_method=calibration_method)
        scale = q.scale[:, 0]
        zp = None if q.zero_point is None else q.zero_point[:, 0]

        def col(c: jax.Array) -> jax.Array:
            z = None if zp is None else zp[:, None]
            return gptq_core.quantize(c[:, None], qtype, scale[:, None], z)[1][:, 0]

        return col

    return prepare

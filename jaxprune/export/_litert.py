"""The edge route: a model as a LiteRT (TFLite) flatbuffer, and a runner for it.

:func:`litert` converts ``apply_fn(variables, *args)`` with ``jax2tf``
(native serialization: the StableHLO module inside a TensorFlow function)
and the TFLite converter, which folds the variables into the flatbuffer's
constant buffers and can quantize them. :class:`LiteRTModel` runs a
flatbuffer in ``ai_edge_litert``'s interpreter (``tf.lite.Interpreter`` is
deprecated) and reads its weights back, densifying the converter's sparse
encoding. Both need the ``litert`` extra (``tensorflow-cpu`` for the
converter, ``ai-edge-litert`` for the interpreter); without it they raise an
``ImportError`` that names it.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from jaxprune.export import _check

QUANTIZE = (None, "float16", "dynamic", "int8")


def require(module: str, what: str) -> Any:
    """Imports ``module`` of the ``litert`` extra, or says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs the optional package {module.split('.')[0]!r} ({e}). Install the "
            'extra: pip install "jaxprune[litert]" (tensorflow-cpu and ai-edge-litert).'
        ) from e


def _check_options(quantize: Any, calibration: Any, sparse: Any) -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"litert: quantize={quantize!r} is not one of {QUANTIZE}: None "
                         "(float32), 'float16' (half-size weights), 'dynamic' (int8 weights) "
                         "or 'int8' (full integer, needs calibration=batches).")
    if quantize == "int8" and calibration is None:
        raise ValueError("litert: quantize='int8' needs calibration=batches, the batches "
                         "jp.calibrate takes (an iterable of model inputs), to choose the "
                         "activation ranges. Pass a few representative batches, or use "
                         "quantize='dynamic' (int8 weights, float activations) without any.")
    if quantize != "int8" and calibration is not None:
        raise ValueError(f"litert: calibration batches are only used by quantize='int8', "
                         f"got quantize={quantize!r}. Drop calibration= or pass "
                         "quantize='int8'.")
    if not isinstance(sparse, bool):
        raise TypeError(f"litert: sparse must be True or False, got {sparse!r}.")


def _tf_function(apply_fn: Callable, variables: Any, leaves: list, treedef: Any):
    """The model as a ``tf.function`` of flat inputs ``arg_0, arg_1, ...``
    returning the flat list of output leaves."""
    tf = require("tensorflow", "jp.export.litert")
    jax2tf = require("jax.experimental.jax2tf", "jp.export.litert")
    fn = _check.bind(apply_fn, variables)

    def flat(*xs):
        return tuple(jax.tree.leaves(fn(*jax.tree.unflatten(treedef, xs))))

    converted = jax2tf.convert(flat, with_gradient=False,
                               native_serialization_platforms=("cpu",))
    signature = [tf.TensorSpec(tuple(x.shape), tf.as_dtype(np.dtype(x.dtype)), name=f"arg_{i}")
                 for i, x in enumerate(leaves)]
    return tf.function(converted, autograph=False, input_signature=signature)


def _representative(calibration: Iterable, names: list[str], leaves: list, nargs: int):
    """The converter's representative dataset: flat input lists from batches."""
    def dataset():
        count = 0
        for i, batch in enumerate(calibration):
            args = (batch,) if nargs == 1 else tuple(batch)
            xs = jax.tree.leaves(args)
            if len(xs) != len(leaves):
                raise ValueError(f"litert: calibration batch {i} has {len(xs)} arrays, the "
                                 f"example inputs {len(leaves)} ({names}). With several "
                                 "example inputs, a batch is a tuple of them.")
            for name, x, ref in zip(names, xs, leaves):
                if tuple(np.shape(x)) != tuple(ref.shape):
                    raise ValueError(
                        f"litert: calibration batch {i}, input {name!r}, has shape "
                        f"{tuple(np.shape(x))}; the model was exported for "
                        f"{tuple(ref.shape)} (the example input). Make calibration "
                        "batches the size of the example input.")
            count += 1
            yield [np.asarray(x, dtype=np.dtype(ref.dtype)) for x, ref in zip(xs, leaves)]
        if count == 0:
            raise ValueError("litert: calibration holds no batches; quantize='int8' "
                             "needs at least one.")
    return dataset


def _converter(tff, quantize: str | None, dataset: Callable | None, sparse: bool):
    tf = require("tensorflow", "jp.export.litert")
    conv = tf.lite.TFLiteConverter.from_concrete_functions([tff.get_concrete_function()], tff)
    optimizations = [tf.lite.Optimize.DEFAULT] if quantize else []
    if sparse:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    conv.optimizations = optimizations
    if quantize == "float16":
        conv.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        conv.representative_dataset = dataset
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv


def litert(apply_fn: Callable, variables: Any, *example_args: Any,
           quantize: str | None = None, calibration: Iterable | None = None,
           sparse: bool = False) -> bytes:
    """A model and its variables as a LiteRT (TFLite) flatbuffer.

    ``jax2tf`` wraps ``apply_fn(variables, *args)`` (variables closed over,
    so they become constants) and the TFLite converter lowers it to LiteRT
    builtin ops, which the interpreter runs with XNNPACK on CPU. Inputs are
    the leaves of ``example_args`` in pytree order, with their shapes and
    dtypes (fixed: the batch size is the example's); outputs are the leaves
    of ``apply_fn``'s output, in pytree order. Inputs and outputs stay
    float (or int) in every mode: a quantized model quantizes its input and
    dequantizes its output itself.

    * ``quantize=None``: float32; outputs match ``apply_fn`` to about 1e-6
      relative (the kernels sum in another order).
    * ``"float16"``: weights stored as float16, computed in float32.
    * ``"dynamic"``: weights int8 (per output channel), activations float;
      no calibration.
    * ``"int8"``: full integer: weights int8 per channel, activations int8
      with ranges from the ``calibration`` batches (the batches
      :func:`jaxprune.calibrate` takes: an iterable of inputs, each one
      argument, or a tuple of them when there are several). Every op runs
      in int8; a model with an op the converter cannot quantize (Equinox's
      ``MaxPool2d``, a ``reduce_window`` it does not lower) is an error.
      Error on the tests' small random CNNs: 1.2% of the largest output
      (compacted), 9.8% (50% of weights masked), bounded at 15% there.
      Activations with extreme ranges, such as attention logits masked with
      ``-1e30``, lose everything: use ``"dynamic"`` for such models. Check
      it on your data with :class:`LiteRTModel`.
    * ``sparse=True``: the converter's sparse weight encoding (CSR, or
      blocks of 4 for dense layers) for weights with enough zeros, such as
      unstructured masks; it shrinks the file, the interpreter densifies or
      runs sparse kernels. Pruned zeros stay exact zeros in every mode (an
      int8 zero point is 0).

    Args:
      apply_fn: ``apply_fn(variables, *args)``: a plain function, Linen
        ``model.apply`` (inference mode), NNX ``nnx.merge(graphdef,
        state)(x)``, an Equinox call.
      variables: any pytree (compacted or masked variables included).
      *example_args: inputs with the shapes and dtypes the model will get.
      quantize: ``None``, ``"float16"``, ``"dynamic"`` or ``"int8"``.
      calibration: batches for ``quantize="int8"``, each the size of the
        example input.
      sparse: whether to use the sparse weight encoding.

    Returns:
      The flatbuffer (``bytes``); write it to a ``.tflite`` file as it is.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> v = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> blob = jp.export.litert(lambda v, x: x @ v["w"], v, jnp.ones((1, 2)))
      >>> jp.export.LiteRTModel(blob)(jnp.array([[3.0, 4.0]])).tolist()
      [[3.0, 8.0]]

    References:
      Jacob et al., "Quantization and training of neural networks for
      efficient integer-arithmetic-only inference", CVPR 2018; Google AI
      Edge, "LiteRT post-training quantization" and "jax2tf" documentation.
    """
    _check.check_model("litert", apply_fn, example_args)
    _check_options(quantize, calibration, sparse)
    names, leaves, treedef = _check.input_leaves("litert", example_args)
    tff = _tf_function(apply_fn, variables, leaves, treedef)
    dataset = None
    if quantize == "int8":
        dataset = _representative(calibration, names, leaves, len(example_args))
    try:
        return bytes(_converter(tff, quantize, dataset, sparse).convert())
    except (ValueError, TypeError):
        raise
    except Exception as e:
        raise RuntimeError(
            f"litert: the TFLite converter failed with quantize={quantize!r}, "
            f"sparse={sparse}: {type(e).__name__}: {str(e)[:2000]}. Its log (stderr) names the "
            "op it could not lower; try quantize='dynamic' or None, or export the StableHLO "
            "route (jp.export.stablehlo).") from e


def densify(values: np.ndarray, shape: tuple, sparsity: dict) -> np.ndarray:
    """A LiteRT sparse tensor (``sparsity_parameters``) as a dense array.

    The format (TFLite schema ``SparsityParameters``): ``traversal_order``
    lists the dimensions in storage order, the tensor's own (block
    coordinates for blocked ones) then one per entry of ``block_map`` (the
    position inside a block of that dimension); each level is dense (a
    size) or CSR (``array_segments`` per parent position, ``array_indices``).
    The leaves of the traversal index ``values``.
    """
    order, block_map = list(sparsity["traversal_order"]), list(sparsity.get("block_map", []))
    meta, n = sparsity["dim_metadata"], len(shape)
    pos, coords = np.zeros(1, np.int64), np.zeros((1, len(order)), np.int64)
    for level, m in enumerate(meta):
        if m["format"] == 0:
            size = int(m["dense_size"])
            child = np.arange(size)
            pos = (pos[:, None] * size + child).ravel()
            coords = np.repeat(coords, size, axis=0)
            coords[:, order[level]] = np.tile(child, len(coords) // size)
        else:
            seg, idx = np.asarray(m["array_segments"]), np.asarray(m["array_indices"])
            counts = seg[pos + 1] - seg[pos]
            starts = np.repeat(seg[pos] - np.cumsum(counts) + counts, counts)
            pos = starts + np.arange(counts.sum())
            coords = np.repeat(coords, counts, axis=0)
            coords[:, order[level]] = idx[pos]
    dense = np.zeros(shape, values.dtype)
    full = coords[:, :n].copy()
    for k, dim in enumerate(block_map):
        size = int(meta[order.index(n + k)]["dense_size"])
        full[:, dim] = full[:, dim] * size + coords[:, n + k]
    dense[tuple(full.T)] = values.reshape(-1)[pos]
    return dense


class LiteRTModel:
    """A LiteRT flatbuffer in ``ai_edge_litert``'s interpreter, callable.

    ``LiteRTModel(blob)(*args)`` sets the inputs (the leaves of ``args``,
    in pytree order, as :func:`litert` flattened the example inputs), runs
    the interpreter and returns the output array, or a tuple of the output
    leaves when there are several. The interpreter applies its default
    delegate (XNNPACK on CPU); if that delegate refuses the model (XNNPACK
    has no sparse int8 convolution), it runs without it and
    :attr:`delegated` is False.

    Args:
      blob: a flatbuffer (``bytes``), e.g. from :func:`litert`, or a file path.
      num_threads: interpreter threads (``None``: the runtime's default).

    Attributes:
      interpreter: the ``ai_edge_litert.interpreter.Interpreter``.
      delegated: whether the default delegate (XNNPACK) runs the model.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> v = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> model = jp.export.LiteRTModel(jp.export.litert(lambda v, x: x @ v["w"], v,
      ...                                                jnp.ones((1, 2))), num_threads=1)
      >>> sorted(w.tolist() for w in model.weights().values())  # (out, in)
      [[[1.0, 0.0], [0.0, 2.0]]]
    """

    def __init__(self, blob: bytes | str | os.PathLike, num_threads: int | None = None):
        mod = require("ai_edge_litert.interpreter", "jp.export.LiteRTModel")
        source = ({"model_path": os.fspath(blob)} if isinstance(blob, str | os.PathLike)
                  else {"model_content": bytes(blob)})
        self.delegated = True
        try:
            self.interpreter = mod.Interpreter(**source, num_threads=num_threads)
            self.interpreter.allocate_tensors()
        except RuntimeError:
            self.delegated = False
            self.interpreter = mod.Interpreter(
                **source, num_threads=num_threads,
                experimental_op_resolver_type=mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            self.interpreter.allocate_tensors()
        inputs = self.interpreter.get_input_details()
        if all(re.fullmatch(r"arg_\d+", d["name"]) for d in inputs):
            inputs = sorted(inputs, key=lambda d: int(d["name"][4:]))
        self.inputs, self.outputs = inputs, self.interpreter.get_output_details()

    def __call__(self, *args: Any) -> Any:
        xs = jax.tree.leaves(args)
        if len(xs) != len(self.inputs):
            raise ValueError(f"LiteRTModel: got {len(xs)} input arrays, the model takes "
                             f"{len(self.inputs)}: {[tuple(d['shape']) for d in self.inputs]}.")
        for i, (x, d) in enumerate(zip(xs, self.inputs)):
            x = np.asarray(x)
            if tuple(x.shape) != tuple(d["shape"]):
                raise ValueError(f"LiteRTModel: input {i} has shape {tuple(x.shape)}, the "
                                 f"model was exported for {tuple(d['shape'])}; export again "
                                 "with an example input of the shape you need.")
            self.interpreter.set_tensor(d["index"], x.astype(d["dtype"], copy=False))
        self.interpreter.invoke()
        outs = [self.interpreter.get_tensor(d["index"]).copy() for d in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def constant_indices(self) -> list[int]:
        """Tensors that ops read but no op writes and that are not inputs."""
        read, written = set(), set()
        for op in self.interpreter._get_ops_details():
            read.update(int(i) for i in op["inputs"] if i >= 0)
            written.update(int(i) for i in op["outputs"])
        return sorted(read - written - {int(d["index"]) for d in self.inputs})

    def weights(self, dequantize: bool = True, min_size: int = 2) -> dict[str, np.ndarray]:
        """The constant tensors with at least ``min_size`` entries, by name.

        Sparse tensors are densified; quantized ones are dequantized
        (``scale * (q - zero_point)`` along the quantized dimension) unless
        ``dequantize=False``. Layouts are LiteRT's: a dense kernel
        ``(in, out)`` is stored ``(out, in)``, a conv kernel ``(kh, kw, in,
        out)`` as ``(out, kh, kw, in)``.
        """
        out = {}
        for i in self.constant_indices():
            d = self.interpreter._get_tensor_details(i, 0)
            shape = tuple(int(s) for s in d["shape"])
            if int(np.prod(shape)) < min_size:
                continue
            value = self.interpreter.get_tensor(i)
            if d["sparsity_parameters"]:
                value = densify(value, shape, d["sparsity_parameters"])
            q = d["quantization_parameters"]
            if dequantize and q["scales"].size and np.issubdtype(value.dtype, np.integer):
                axis, shp = int(q["quantized_dimension"]), [1] * value.ndim
                if q["scales"].size > 1:
                    shp[axis] = -1
                value = (q["scales"].reshape(shp) * (value.astype(np.float32)
                                                     - q["zero_points"].reshape(shp)))
            name = d["name"] if d["name"] not in out else f"{d['name']}#{i}"
            out[name] = np.asarray(value)
        return out

"""jp.export: StableHLO and LiteRT files of pruned models, their runner and sizes.

Model styles: a Linen ResNet with ``batch_stats`` (structurally compacted and
unstructurally masked), an NNX decoder, an Equinox CNN, a plain function with
two inputs and a pytree output, and the byte LM of examples/prune_lm.py. The
converter's outputs are computed once per module (fixture ``converted``) and
shared by the tests that read them. tensorflow-cpu and ai-edge-litert are in
the ``test`` extra, so these tests run (never skip) in CI.
"""

from __future__ import annotations

import importlib.util
import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest

import jaxprune as jp

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
INT8_BOUND = 0.15  # |int8 - float| <= 15% of max |float| (measured: 1.2% compacted, 9.8% masked)


def closed(apply_fn, variables):
    """The function the exporters export: variables closed over, jitted."""
    return jax.jit(lambda *a: apply_fn(variables, *a))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def byte_lm():
    spec = importlib.util.spec_from_file_location("example_prune_lm", EXAMPLES / "prune_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    cfg = module.QUICK
    params = module.init_params(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256).astype(jnp.int32)
    return module.make_apply(cfg), params, tokens


def plain():
    """Two inputs (one int), a dict output with two leaves."""
    w = jax.random.normal(jax.random.key(3), (6, 5))

    def apply_fn(v, x, t):
        return {"y": jnp.tanh(x @ v["w"]), "t": t * 2 + 1}

    return apply_fn, {"w": w}, (jnp.ones((3, 6)), jnp.arange(3, dtype=jnp.int32))


def resnet_with_stats():
    """tests/models.linen_resnet with non-trivial running statistics."""
    apply_fn, v, x = models.linen_resnet()
    keys = iter(jax.random.split(jax.random.key(7), 64))
    stats = jax.tree.map(lambda s: s + 0.5 * jnp.abs(jax.random.normal(next(keys), s.shape)),
                         v["batch_stats"])
    return apply_fn, {**v, "batch_stats": stats}, x


@pytest.fixture(scope="module")
def converted():
    """The ResNet compacted to 50% of its channels, and masked to 50% of its
    kernels' weights, each exported once per mode."""
    apply_fn, v, x = resnet_with_stats()
    g = jp.graph.trace(apply_fn, v, x)
    masks = jp.structured.masks(g, jp.structured.scores(g, v), 0.5)
    small = jp.structured.compact(g, v, masks)
    kmasks = jp.masks.topk(jp.scores.magnitude(v["params"]), 0.5)
    masked = {**v, "params": jp.apply_masks(v["params"], kmasks)}
    calib = [jax.random.normal(jax.random.key(10 + i), x.shape) for i in range(4)]

    def fn(vars_):
        with jp.resize.linen():
            return closed(apply_fn, vars_)(x)

    def lin(vars_, **kw):
        with jp.resize.linen():
            return jp.export.litert(apply_fn, vars_, x, **kw)

    out = dict(apply_fn=apply_fn, x=x, calib=calib, small=small, masked=masked, dense=v,
               y_small=fn(small), y_masked=fn(masked))
    out["small_float"] = lin(small)
    out["small_int8"] = lin(small, quantize="int8", calibration=calib)
    for q in (None, "dynamic", "int8"):
        out[f"masked_{q}"] = lin(masked, quantize=q, calibration=calib if q == "int8" else None)
    out["masked_sparse"] = lin(masked, sparse=True)
    return out


# --------------------------------------------------------------------------
# StableHLO


STYLES = {"linen_resnet": resnet_with_stats, "nnx_minigpt": models.nnx_minigpt,
          "equinox_cnn": models.equinox_cnn, "byte_lm": byte_lm}


@pytest.mark.parametrize("style", list(STYLES))
def test_stablehlo_round_trip_exact(style):
    apply_fn, v, x = STYLES[style]()
    blob = jp.export.stablehlo(apply_fn, v, x)
    got = jax.export.deserialize(blob).call(x)
    np.testing.assert_array_equal(got, closed(apply_fn, v)(x))


def test_stablehlo_batch_polymorphic_and_pytrees():
    apply_fn, v, args = plain()
    blob = jp.export.stablehlo(apply_fn, v, *args, batch_polymorphic=True)
    exp = jax.export.deserialize(blob)
    for n in (1, 5):
        x, t = jnp.full((n, 6), 0.3), jnp.arange(n, dtype=jnp.int32)
        got, want = exp.call(x, t), closed(apply_fn, v)(x, t)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    fixed = jax.export.deserialize(jp.export.stablehlo(apply_fn, v, *args))
    with pytest.raises(ValueError):
        fixed.call(jnp.ones((2, 6)), args[1])


def test_stablehlo_of_compacted_resnet(converted):
    c = converted
    with jp.resize.linen():
        blob = jp.export.stablehlo(c["apply_fn"], c["small"], c["x"])
    np.testing.assert_array_equal(jax.export.deserialize(blob).call(c["x"]), c["y_small"])


# --------------------------------------------------------------------------
# LiteRT: outputs


@pytest.mark.parametrize("style", list(STYLES))
def test_litert_float_matches(style):
    apply_fn, v, x = STYLES[style]()
    model = jp.export.LiteRTModel(jp.export.litert(apply_fn, v, x), num_threads=1)
    assert model.delegated
    assert rel_err(model(x), closed(apply_fn, v)(x)) <= 1e-5


def test_litert_compacted_float_and_int8(converted):
    c = converted
    assert rel_err(jp.export.LiteRTModel(c["small_float"])(c["x"]), c["y_small"]) <= 1e-5
    err = rel_err(jp.export.LiteRTModel(c["small_int8"])(c["x"]), c["y_small"])
    assert 0 < err <= INT8_BOUND
    assert len(c["small_int8"]) < len(c["small_float"])  # a tiny model: mostly metadata


def test_litert_int8_is_full_integer(converted):
    model = jp.export.LiteRTModel(converted["small_int8"])
    it = model.interpreter
    ops = [op for op in it._get_ops_details() if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert len(ops) == 7  # 6 convs + the head
    for op in ops:
        for i in op["inputs"][:2]:
            assert it._get_tensor_details(int(i), 0)["dtype"] == np.int8, op


def test_litert_two_inputs_pytree_output():
    apply_fn, v, args = plain()
    model = jp.export.LiteRTModel(jp.export.litert(apply_fn, v, *args))
    got = model(*args)
    want = jax.tree.leaves(closed(apply_fn, v)(*args))  # leaf order: "t", then "y"
    assert len(got) == 2 and got[0].dtype == np.int32
    np.testing.assert_array_equal(got[0], want[0])
    assert rel_err(got[1], want[1]) <= 1e-5


def test_litert_quantize_modes_on_lm():
    apply_fn, v, x = byte_lm()
    want = closed(apply_fn, v)(x)
    f16 = jp.export.litert(apply_fn, v, x, quantize="float16")
    dyn = jp.export.litert(apply_fn, v, x, quantize="dynamic")
    assert rel_err(jp.export.LiteRTModel(f16)(x), want) <= 1e-2
    assert rel_err(jp.export.LiteRTModel(dyn)(x), want) <= 0.1
    full = len(jp.export.litert(apply_fn, v, x))
    assert len(f16) < 0.6 * full and len(dyn) < 0.5 * full  # embeddings stay float


# --------------------------------------------------------------------------
# LiteRT: pruned zeros stay zero in the flatbuffer


def find_layout(kernel: np.ndarray, tensors: dict) -> tuple[str, np.ndarray]:
    """The tensor that holds ``kernel``: the converter transposes kernels and
    folds BatchNorm scales and the mean's ``1/n`` into them, so it is found by
    its zeros: every zero of the kernel is a zero there, with the fewest
    extra zeros (rounding of small weights), in some axis order."""
    zeros, best = kernel == 0, None
    for name, t in tensors.items():
        if t.size != kernel.size:
            continue
        for perm in itertools.permutations(range(kernel.ndim)):
            if zeros.transpose(perm).shape != t.shape:
                continue
            tz = np.transpose(t == 0, np.argsort(perm))
            extra = int((tz & ~zeros).sum())
            if np.all(tz[zeros]) and (best is None or extra < best[0]):
                best = (extra, name, np.transpose(t, np.argsort(perm)))
    assert best is not None, f"no tensor holds a kernel of shape {kernel.shape}"
    return best[1], best[2]


@pytest.mark.parametrize("mode", ["None", "dynamic", "int8", "sparse"])
def test_pruned_zeros_stay_zero(converted, mode):
    c = converted
    model = jp.export.LiteRTModel(c[f"masked_{mode}"])
    tensors = model.weights()
    kernels = [np.asarray(k) for k in jax.tree.leaves(c["masked"]["params"]) if k.ndim >= 2]
    assert len(kernels) == 7
    for kernel in kernels:
        assert (kernel == 0).mean() == pytest.approx(0.5, abs=0.02)
        name, t = find_layout(kernel, tensors)
        assert np.all(t[kernel == 0] == 0), name
        if mode in ("None", "sparse"):  # float: exactly the kernel's zeros
            np.testing.assert_array_equal(t == 0, kernel == 0)
        else:  # int8: a small weight may round to zero
            assert np.count_nonzero(t) >= 0.9 * np.count_nonzero(kernel)
    raw = model.weights(dequantize=False)
    int8 = sum(w.dtype == np.int8 for w in raw.values())
    if mode == "int8":
        assert int8 >= 7
    elif mode == "dynamic":  # the converter quantizes weights of 1024 entries or more
        assert int8 == sum(k.size >= 1024 for k in kernels) == 2
    y = model(c["x"])
    assert rel_err(y, c["y_masked"]) <= (1e-5 if mode in ("None", "sparse") else INT8_BOUND)


def test_sparse_encoding_is_smaller(converted):
    c = converted
    assert len(c["masked_sparse"]) < 0.9 * len(c["masked_None"])
    model = jp.export.LiteRTModel(c["masked_sparse"])
    sparse = [i for i in model.constant_indices()
              if model.interpreter._get_tensor_details(i, 0)["sparsity_parameters"]]
    assert len(sparse) >= 5


def test_densify_matches_numpy_oracle():
    # a 2x3 tensor in CSR over rows, and 4x4 with 2x2 blocks stored CSR over block rows
    csr = {"traversal_order": [0, 1], "dim_metadata": [
        {"format": 0, "dense_size": 2},
        {"format": 1, "array_segments": [0, 2, 3], "array_indices": [0, 2, 1]}]}
    np.testing.assert_array_equal(jp.export.densify(np.array([1.0, 2.0, 3.0]), (2, 3), csr),
                                  [[1, 0, 2], [0, 3, 0]])
    blocks = {"traversal_order": [0, 1, 2, 3], "block_map": [0, 1], "dim_metadata": [
        {"format": 0, "dense_size": 2},
        {"format": 1, "array_segments": [0, 1, 1], "array_indices": [1]},
        {"format": 0, "dense_size": 2}, {"format": 0, "dense_size": 2}]}
    want = np.zeros((4, 4))
    want[0:2, 2:4] = [[1, 2], [3, 4]]
    np.testing.assert_array_equal(jp.export.densify(np.arange(1.0, 5.0), (4, 4), blocks), want)


# --------------------------------------------------------------------------
# Sizes from files


def test_report_sizes_are_file_sizes(tmp_path, converted):
    c = converted
    with jp.resize.linen():
        rep = jp.export.report({"dense": (c["apply_fn"], c["dense"]),
                                "small": (c["apply_fn"], c["small"])}, c["x"],
                               formats=["orbax", "stablehlo", "litert", "litert-int8"],
                               calibration=c["calib"], directory=tmp_path)
    assert len(rep.rows) == 8
    for r in rep.rows:
        path = pathlib.Path(r["path"])
        on_disk = path.stat().st_size if path.is_file() else sum(
            p.stat().st_size for p in path.rglob("*") if p.is_file())
        assert r["bytes"] == on_disk > 0
    arrays = [np.asarray(a) for a in jax.tree.leaves(c["small"])]
    small = [r for r in rep.rows if r["model"] == "small"][0]
    assert small["params"] == sum(a.size for a in arrays)
    assert small["nonzeros"] == sum(np.count_nonzero(a) for a in arrays)
    with jp.resize.linen():
        assert small["macs"] == jp.graph.trace(c["apply_fn"], c["small"], c["x"]).macs
    for fmt in ("orbax", "stablehlo", "litert", "litert-int8"):  # tiny: metadata dominates
        assert rep.bytes("small", fmt) < rep.bytes("dense", fmt)
    assert rep.bytes("small", "litert") < 0.6 * rep.bytes("dense", "litert")
    text = str(rep)
    assert "litert-int8" in text and "small" in text and len(text.splitlines()) == 10


def test_file_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * 7)
    assert jp.export.file_bytes(tmp_path / "a") == 10
    assert jp.export.file_bytes(tmp_path) == 17
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        jp.export.file_bytes(tmp_path / "missing")


# --------------------------------------------------------------------------
# Errors


def test_argument_errors():
    f, v, x = lambda v, x: x @ v["w"], {"w": jnp.ones((3, 2))}, jnp.ones((1, 3))
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        jp.export.stablehlo(v, f, x)
    with pytest.raises(ValueError, match="no example input"):
        jp.export.litert(f, v)
    with pytest.raises(TypeError, match="example input '0' is a float"):
        jp.export.stablehlo(f, v, 1.0)
    with pytest.raises(ValueError, match="'1' is a scalar"):
        jp.export.stablehlo(lambda v, x, s: x * s, v, x, jnp.float32(2), batch_polymorphic=True)
    with pytest.raises(ValueError, match="quantize='int4' is not one of"):
        jp.export.litert(f, v, x, quantize="int4")
    with pytest.raises(ValueError, match="needs calibration=batches"):
        jp.export.litert(f, v, x, quantize="int8")
    with pytest.raises(ValueError, match="only used by quantize='int8'"):
        jp.export.litert(f, v, x, quantize="dynamic", calibration=[x])
    with pytest.raises(TypeError, match="sparse must be True or False"):
        jp.export.litert(f, v, x, sparse=1)
    with pytest.raises(ValueError, match=r"has shape \(4, 3\); the model was exported for"):
        jp.export.litert(f, v, x, quantize="int8", calibration=[jnp.ones((4, 3))])
    with pytest.raises(ValueError, match="holds no batches"):
        jp.export.litert(f, v, x, quantize="int8", calibration=[])
    with pytest.raises(ValueError, match="format 'onnx' is not one of"):
        jp.export.report({"m": (f, v)}, x, formats=["onnx"])
    with pytest.raises(ValueError, match="'litert-int8' needs calibration"):
        jp.export.report({"m": (f, v)}, x, formats=["litert-int8"])
    with pytest.raises(TypeError, match=r"models\['m'\] must be \(apply_fn, variables\)"):
        jp.export.report({"m": f}, x, formats=["stablehlo"])


def test_runner_from_file_errors_and_converter_failure(tmp_path):
    f, v, x = lambda v, x: x @ v["w"], {"w": jnp.ones((3, 2))}, jnp.ones((1, 3))
    (tmp_path / "m.tflite").write_bytes(jp.export.litert(f, v, x))
    model = jp.export.LiteRTModel(tmp_path / "m.tflite")
    np.testing.assert_array_equal(model(x), [[3.0, 3.0]])
    with pytest.raises(ValueError, match=r"input 0 has shape \(2, 3\), the model was exported"):
        model(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="got 2 input arrays, the model takes 1"):
        model(x, x)
    apply_fn, eqx_model, xe = models.equinox_cnn()  # its max pool has no int8 lowering
    with pytest.raises(RuntimeError, match="the TFLite converter failed with quantize='int8'"):
        jp.export.litert(apply_fn, eqx_model, xe, quantize="int8", calibration=[xe])


@pytest.mark.parametrize("module", ["tensorflow", "ai_edge_litert.interpreter"])
def test_missing_extra_names_it(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    f, v, x = lambda v, x: x @ v["w"], {"w": jnp.ones((3, 2))}, jnp.ones((1, 3))
    with pytest.raises(ImportError, match=r'pip install "jaxprune\[litert\]"'):
        if module == "tensorflow":
            jp.export.litert(f, v, x)
        else:
            jp.export.LiteRTModel(b"")

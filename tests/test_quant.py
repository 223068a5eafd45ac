"""jp.quant on qwix: QAT with masks held (NNX with jp.prune,
jp.structured.prune and jp.lottery_ticket; Linen with the same three): pruned
weights stay exactly zero in the float weights and in the fake-quantized
weights at every step, and those fake-quantized weights are the ones qwix's
forward pass uses; PTQ int8 / int4 of pruned models keeps the zeros (masks
applied before quantize_params); joint SparseGPT + quantization; errors."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")
qwix = pytest.importorskip("qwix")


def normal(i, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(i).standard_normal(shape), jnp.float32)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l0 = nnx.Linear(8, 32, rngs=rngs)
        self.l1 = nnx.Linear(32, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(jax.nn.relu(self.l0(x)))))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


X = normal(0, (64, 8))
Y = jnp.arange(64) % 4


def zeros_held(params, masks):
    """Every pruned entry is exactly zero, in the floats and fake-quantized."""
    fq = jp.quant.fake_quant(params, "int8")
    for tree in (params, fq):
        for leaf, m in zip(jax.tree.leaves(tree), jax.tree.leaves(masks)):
            m = np.broadcast_to(np.asarray(m), np.shape(leaf))
            if np.any(np.asarray(leaf)[~m] != 0):
                return False
    return True


def nnx_train(tx, steps, *, act_qtype="int8"):
    """QAT of the NNX MLP with ``tx`` (wrt Param); checks zeros every step."""
    qm = jp.quant.qat(MLP(nnx.Rngs(0)), X, weight_qtype="int8", act_qtype=act_qtype)
    opt = nnx.Optimizer(qm, tx, wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()  # noqa: E731
        opt.update(m, nnx.grad(loss)(m))

    for _ in range(steps):
        step(qm, opt)
        params = nnx.to_pure_dict(nnx.state(qm, nnx.Param))
        masks = nnx.to_pure_dict(jp.get_masks(opt.opt_state))
        assert zeros_held(params, masks)
    return qm, params, masks, opt


def test_qat_forward_uses_the_fake_quantized_weights():
    # Weight-only QAT: the output is the float forward pass on fake_quant(params).
    qm = jp.quant.qat(MLP(nnx.Rngs(0)), X, weight_qtype="int8")
    params = nnx.to_pure_dict(nnx.state(qm, nnx.Param))
    fq = jp.quant.fake_quant(params, "int8")
    ref = MLP(nnx.Rngs(0))
    nnx.update(ref, fq)
    np.testing.assert_allclose(qm(X), ref(X), rtol=1e-5, atol=1e-5)
    assert not np.allclose(qm(X), MLP(nnx.Rngs(0))(X), atol=1e-6)  # it did quantize


def test_nnx_qat_with_prune_holds_masks_every_step():
    qm, params, masks, opt = nnx_train(jp.prune(optax.adam(1e-2), sparsity=0.5, update_every=2),
                                       6)
    assert jp.sparsity_of(params) == pytest.approx(0.5, abs=1e-3)
    # The masks as the optimizer holds them (an nnx.State) are accepted too.
    served = jp.quant.ptq(qm, X, masks=jp.get_masks(opt.opt_state))
    q = np.asarray(served.l1.kernel.array.qvalue)
    assert np.all(q[~np.asarray(masks["l1"]["kernel"])] == 0)


def test_nnx_qat_with_lottery_ticket_holds_masks_every_step():
    tx = jp.lottery_ticket(optax.adam(1e-2), rounds=2, steps_per_round=3, prune_rate=0.5)
    _, params, masks, _ = nnx_train(tx, 7)
    assert jp.sparsity_of(params) == pytest.approx(0.75, abs=0.01)


def test_nnx_qat_with_structured_prune_holds_masks_every_step():
    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    g = jp.graph.trace(lambda p, x: nnx.merge(graphdef, p)(x), params, X[:1])
    tx = jp.structured.prune(optax.adam(1e-2), graph=g, sparsity=0.5, update_every=1)
    _, params, masks, _ = nnx_train(tx, 4)
    kept = jp.structured.kept_units(g, masks)
    assert sorted(len(np.flatnonzero(v)) for v in kept.values()) == [8, 16]


@pytest.mark.parametrize("method", ["prune", "structured", "lottery"])
def test_linen_qat_holds_masks_every_step(method):
    module = jp.quant.qat(LinenMLP(), weight_qtype="int8", act_qtype="int8")
    variables = module.init(jax.random.key(0), X)
    params = variables["params"]
    if method == "prune":
        tx = jp.prune(optax.adam(1e-2), sparsity=0.5, update_every=1)
    elif method == "lottery":
        tx = jp.lottery_ticket(optax.adam(1e-2), rounds=2, steps_per_round=2, prune_rate=0.5)
    else:
        g = jp.graph.trace(lambda p, x: LinenMLP().apply({"params": p}, x), params, X[:1])
        tx = jp.structured.prune(optax.adam(1e-2), graph=g, sparsity=0.5, update_every=1)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            module.apply({"params": p}, X), Y).mean()
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(4):
        params, state = step(params, state)
        assert zeros_held(params, jp.get_masks(state))
    assert jp.sparsity_of(params) > 0.2
    if method != "prune":
        return
    # PTQ of the pruned Linen model: masks first, int4 kernels, zeros kept.
    qmod, qvars = jp.quant.ptq(module, X, variables={"params": params},
                               masks=jp.get_masks(state), weight_qtype="int4")
    k = qvars["params"]["Dense_0"]["kernel"].array
    assert k.qvalue.dtype == jnp.int4
    m = np.asarray(jp.get_masks(state)["Dense_0"]["kernel"])
    assert np.all(np.asarray(k.qvalue, np.int8)[~m] == 0)
    np.testing.assert_allclose(qmod.apply(qvars, X), module.apply({"params": params}, X),
                               atol=0.5)


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_nnx_ptq_of_a_pruned_model_keeps_zeros(qtype):
    qm, params, masks, _ = nnx_train(jp.prune(optax.adam(1e-2), sparsity=0.6, update_every=1), 3,
                                     act_qtype=None)
    served = jp.quant.ptq(qm, X, masks=masks, weight_qtype=qtype)
    for name in ("l0", "l1", "l2"):
        q = getattr(served, name).kernel.array
        assert q.qvalue.dtype == jnp.dtype(qtype)
        m = masks[name]["kernel"]
        assert np.all(np.asarray(q.qvalue, np.int8)[~np.asarray(m)] == 0)
    out = np.asarray(served(X))
    ref = np.asarray(qm(X))
    assert np.abs(out - ref).max() < (0.05 if qtype == "int8" else 0.5)


def test_ptq_applies_masks_given_unmasked_float_weights():
    # Float weights that still hold values where the masks say "pruned".
    model = MLP(nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks = jp.masks.topk(jp.scores.magnitude(params), 0.7)
    served = jp.quant.ptq(model, X, masks=masks)
    q = served.l1.kernel.array.qvalue
    assert np.sum(np.asarray(q) == 0) >= q.size - jp.select.keep_count(q.size, 0.7)


def test_ptq_errors():
    with pytest.raises(ValueError, match="needs variables"):
        jp.quant.ptq(LinenMLP(), X)
    with pytest.raises(TypeError, match="must be a Flax NNX or Linen module, got dict"):
        jp.quant.ptq({"w": X}, X)
    served = jp.quant.ptq(MLP(nnx.Rngs(0)), X)
    with pytest.raises(ValueError, match=r"\"\['l0'\]\['kernel'\]\" is already quantized"):
        jp.quant.ptq(served, X)
    with pytest.raises(ValueError, match="nothing would be quantized"):
        jp.quant.qat(MLP(nnx.Rngs(0)), X, weight_qtype=None)
    with pytest.raises(ValueError, match="qtype 'int9' is not a quantized type"):
        jp.quant.qat(MLP(nnx.Rngs(0)), X, weight_qtype="int9")


@pytest.mark.parametrize("qtype,levels", [("int8", 127), ("int4", 7)])
def test_quantize_plain_tree_keeps_zeros_and_matches_oracle(qtype, levels):
    p = {"conv": normal(1, (5, 4, 6)), "dense": {"w": normal(2, (6, 3)), "b": normal(3, (3,))}}
    masks = jp.masks.topk(jp.scores.magnitude(p), 0.5)
    q = jp.quant.quantize(p, qtype, masks=masks)
    assert isinstance(q["conv"], qwix.QArray) and not isinstance(q["dense"]["b"], qwix.QArray)
    d = jp.quant.dequantize(q)
    for k, w, m in (("conv", p["conv"], masks["conv"]), ("w", p["dense"]["w"], masks["dense"]["w"])):
        got = np.asarray(d["conv"] if k == "conv" else d["dense"]["w"])
        w = np.where(np.asarray(m), np.asarray(w), 0.0)
        assert np.all(got[~np.asarray(m)] == 0)
        # numpy oracle: per output channel, error at most half a step of max|w| / levels.
        step = np.abs(w).max(axis=tuple(range(w.ndim - 1)), keepdims=True) / levels
        assert np.all(np.abs(got - w) <= 0.5 * step * (1 + 1e-5) + 1e-7)
    np.testing.assert_array_equal(d["dense"]["b"], p["dense"]["b"])
    # fake_quant has dequantize(quantize(.)) values and identity gradients.
    fq = jp.quant.fake_quant(jp.apply_masks(p, masks), qtype)
    np.testing.assert_array_equal(fq["conv"], d["conv"])
    g = jax.grad(lambda t: jp.quant.fake_quant(t, qtype)["conv"].sum())(p)
    np.testing.assert_array_equal(g["conv"], np.ones((5, 4, 6)))


def test_quantize_errors(monkeypatch):
    p = {"w": normal(0, (4, 3))}
    with pytest.raises(ValueError, match="qtype 'float' is not a quantized type"):
        jp.quant.quantize(p, "float")
    with pytest.raises(ValueError, match=r"axis=5 is out of range for the leaf at \"\['w'\]\""):
        jp.quant.quantize(p, axis=5)
    q = jp.quant.quantize(p)
    with pytest.raises(ValueError, match=r"\"\['w'\]\" is already quantized"):
        jp.quant.quantize(q)
    # A quantizer that moved pruned weights off zero is caught.
    real = qwix.dequantize
    monkeypatch.setattr(qwix, "dequantize", lambda a: real(a) + 1e-3)
    with pytest.raises(ValueError, match=r"12 pruned \(zero\) weights .* are not zero"):
        jp.quant.quantize({"w": jnp.zeros((4, 3))})


def test_missing_qwix_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "qwix", None)
    with pytest.raises(ImportError, match=r'pip install "jaxprune\[quant\]"'):
        jp.quant.quantize({"w": jnp.ones((2, 2))})
    with pytest.raises(ImportError, match="needs qwix"):
        jp.quant.qat(None)


@pytest.fixture(scope="module")
def layer():
    w = normal(0, (16, 12), 0.5)  # (in, out)
    xs = [normal(1, (128, 16)) * jnp.linspace(0.2, 2.0, 16)]
    return {"w": w}, (lambda p, x: x @ p["w"]), xs


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_with_quantization(layer, nm):
    p, f, xs = layer
    kw = {"n": 2, "m": 4} if nm else {"sparsity": 0.5}
    plain, pm = jp.oneshot.sparsegpt(f, p, xs, blocksize=8, **kw)
    # An identity column quantizer changes nothing.
    same, sm = jp.oneshot.sparsegpt(f, p, xs, blocksize=8, quantize=lambda w: lambda c: c, **kw)
    np.testing.assert_allclose(same["w"], plain["w"], rtol=1e-6, atol=1e-6)
    joint, jm = jp.oneshot.sparsegpt(f, p, xs, blocksize=8,
                                     quantize=jp.quant.column_quantizer("int4"), **kw)
    w, m = np.asarray(joint["w"]), np.asarray(jm["w"])
    assert np.all(w[~m] == 0) and m.mean() == 0.5
    # Every kept weight lies on its output's int4 grid, the scale fixed from the
    # unpruned kernel (max |w| / 7.5 per output, qwix's absmax).
    scale = np.abs(np.asarray(p["w"])).max(0) / 7.5
    ratio = w / scale[None, :]
    np.testing.assert_allclose(ratio, np.round(ratio), atol=1e-3)
    assert np.abs(ratio).max() <= 8 + 1e-4
    # Joint beats prune-then-round on the layer's output error.
    x = xs[0]
    rtn = jp.quant.dequantize(jp.quant.quantize(plain, "int4", masks=pm))["w"]
    err = lambda v: float(jnp.sum((x @ v - x @ p["w"]) ** 2))  # noqa: E731
    assert err(joint["w"]) < err(rtn)


def test_sparsegpt_quantize_must_be_callable(layer):
    p, f, xs = layer
    with pytest.raises(TypeError, match="quantize must be None or a callable"):
        jp.oneshot.sparsegpt(f, p, xs, 0.5, quantize="int8")

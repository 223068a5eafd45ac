"""jp.calibrate: input statistics of every kernel, against numpy, through calls,
remat, einsum, reshaped kernels, layer scans, convolutions, cond and while,
for plain functions, Flax NNX and Linen; memory; errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprune as jp
from jaxprune.oneshot import calibration


def normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def sumsq(x):
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return (x ** 2).sum(0)


def mlp(p, x):
    h = jnp.einsum("bi,io->bo", x, p["a"])  # a jitted einsum: a call in the jaxpr
    h = jax.checkpoint(jax.nn.gelu)(h)
    return jnp.einsum("bi,io->bo", h, p["b"]) + h @ p["b"]  # "b" is read twice


def test_mlp_shared_kernel_remat_einsum_gram():
    p = {"a": normal(0, (4, 6)), "b": normal(1, (6, 3))}
    xs = [normal(2 + i, (5, 4)) for i in range(3)]
    s = jp.calibrate(mlp, p, xs, gram=True)
    x = np.concatenate([np.asarray(b) for b in xs])
    h = np.asarray(jax.nn.gelu(jnp.asarray(x) @ p["a"]), np.float64)
    np.testing.assert_allclose(s["a"].sumsq, sumsq(x), rtol=1e-5)
    np.testing.assert_allclose(s["b"].sumsq, 2 * sumsq(h), rtol=1e-4)
    np.testing.assert_allclose(s["b"].gram, 2 * h.T @ h, rtol=1e-4, atol=1e-5)
    assert int(s["a"].count) == 15 and int(s["b"].count) == 30
    assert (s["a"].in_axes, s["a"].out_axes, s["a"].layers) == ((0,), (1,), None)
    assert s["a"].point != s["b"].point and s["a"].gram.shape == (4, 4)


def heads(p, x):
    """Flax-style kernels (d, h, k) and an output kernel reshaped to (h * k, d)."""
    q = jnp.einsum("btd,dhk->bthk", x, p["q"])
    k = jnp.einsum("btd,dhk->bthk", x, p["k"])
    v = jnp.einsum("btd,dhk->bthk", x, p["v"])
    a = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k), -1)
    o = jnp.einsum("bhts,bshk->bthk", a, v)
    return o.reshape(*x.shape[:2], -1) @ p["o"].reshape(-1, p["o"].shape[-1])


def test_attention_heads_and_reshaped_output_kernel():
    p = {n: normal(i, (8, 2, 3)) for i, n in enumerate("qkv")}
    p["o"] = normal(3, (2, 3, 8))
    x = normal(4, (2, 5, 8))
    s = jp.calibrate(heads, p, [x], gram=True)
    assert s["q"].point == s["k"].point == s["v"].point != s["o"].point
    assert s["o"].in_axes == (0, 1) and s["o"].sumsq.shape == (2, 3)
    q, k, v = (np.einsum("btd,dhk->bthk", np.asarray(x), np.asarray(p[n])) for n in "qkv")
    lg = np.einsum("bthk,bshk->bhts", q, k)
    a = np.exp(lg - lg.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshk->bthk", a, v).reshape(-1, 6)
    np.testing.assert_allclose(np.asarray(s["o"].sumsq).ravel(), sumsq(o), rtol=1e-4)
    np.testing.assert_allclose(s["o"].gram, o.T @ o, rtol=1e-4, atol=1e-5)


def test_kernel_on_the_left_and_transposed():
    p = {"w": normal(0, (2, 3, 5))}
    x = normal(1, (4, 2, 3))
    xf = np.asarray(x).reshape(4, 6)
    for f in (lambda p, x: (p["w"].reshape(6, 5).T @ x.reshape(4, 6).T).T,
              lambda p, x: jnp.einsum("bkh,hko->bo", jnp.swapaxes(x, 1, 2), p["w"])):
        s = jp.calibrate(f, p, [x], gram=True)
        np.testing.assert_allclose(s["w"].gram, xf.T @ xf, rtol=1e-5, atol=1e-6)


def stacked(p, x):
    def body(h, w):
        return h + jnp.tanh(h @ w["w"]) @ w["o"], None

    return lax.scan(body, x, p)[0]


def test_scanned_layers_give_per_layer_stats():
    p = {"w": normal(0, (3, 4, 6), 0.5), "o": normal(1, (3, 6, 4), 0.5)}
    xs = [normal(2, (5, 4)), normal(3, (5, 4))]
    s = jp.calibrate(stacked, p, xs, gram=True)
    h = np.concatenate([np.asarray(b) for b in xs]).astype(np.float64)
    for i in range(3):
        y = np.tanh(h @ np.asarray(p["w"][i]))
        np.testing.assert_allclose(s["w"].sumsq[i], sumsq(h), rtol=1e-4)
        np.testing.assert_allclose(s["o"].gram[i], y.T @ y, rtol=1e-4, atol=1e-5)
        h = h + y @ np.asarray(p["o"][i])
    assert s["w"].layers == 3 and s["w"].stack == 0 and s["w"].count.tolist() == [10] * 3
    assert s["w"].feature_shape == (3, 4, 1)


def test_convolution_patches_in_kernel_order():
    k = {"k": normal(0, (3, 2, 3, 4))}  # HWIO
    x = normal(1, (2, 5, 5, 3))

    def conv(p, x):
        return lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    s = jp.calibrate(conv, k, [x], gram=True)
    patches = lax.conv_general_dilated_patches(
        x, (3, 2), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    rows = np.asarray(patches).reshape(-1, 3, 3, 2).transpose(0, 2, 3, 1).reshape(-1, 18)
    assert s["k"].sumsq.shape == (3, 2, 3) and int(s["k"].count) == 50
    np.testing.assert_allclose(s["k"].gram, rows.T @ rows, rtol=1e-4, atol=1e-5)
    y = np.asarray(conv(k, x)).reshape(-1, 4)  # the Gram's order is the kernel's
    np.testing.assert_allclose(rows @ np.asarray(k["k"]).reshape(18, 4), y, atol=1e-4)


def test_cond_and_while():
    p = {"w": normal(0, (4, 4), 0.5)}

    def f(p, x):
        y = lax.cond(x.sum() > 0, lambda x: x @ p["w"], lambda x: -x @ p["w"], x)
        return lax.while_loop(lambda c: c[0] < 2,
                              lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])), (0, y))[1]

    x = normal(1, (5, 4))
    s = jp.calibrate(f, p, [x], where="w")
    xn, w = np.asarray(x, np.float64), np.asarray(p["w"])
    y = xn @ w if xn.sum() > 0 else -xn @ w
    want = sumsq(xn) + sumsq(y) + sumsq(np.tanh(y @ w))
    np.testing.assert_allclose(s["w"].sumsq, want, rtol=1e-4)
    assert int(s["w"].count) == 15


def test_flax_nnx_and_linen():
    from flax import linen as nn
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                               decode=False, rngs=rngs)
            self.l2 = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.l1(x))
            return self.l2(h + self.attn(h))

    gd, state = nnx.split(Block(nnx.Rngs(0)))
    x = normal(5, (2, 5, 4))
    s = jp.calibrate(lambda st, x: nnx.merge(gd, st)(x), state, [x])
    assert s["attn/query/kernel"].point == s["attn/key/kernel"].point
    assert s["attn/out/kernel"].sumsq.shape == (2, 4)
    np.testing.assert_allclose(s["l1/kernel"].sumsq, sumsq(x), rtol=1e-5)
    masks = jp.oneshot.wanda(state, s, 0.5)
    assert np.asarray(masks["l2"]["kernel"]).sum(0).tolist() == [4, 4, 4]

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="out")(nn.gelu(nn.Dense(8, name="hidden")(x)))

    v = Net().init(jax.random.key(0), x)
    s = jp.calibrate(lambda v, x: Net().apply(v, x), v, [x, x])
    assert sorted(s) == ["params/hidden/kernel", "params/out/kernel"]
    np.testing.assert_allclose(s["params/hidden/kernel"].sumsq, 2 * sumsq(x), rtol=1e-5)


def test_batches_of_two_shapes():
    p = {"w": normal(0, (3, 2))}
    xs = [normal(1, (4, 3)), normal(2, (7, 3)), normal(3, (4, 3))]
    s = jp.calibrate(lambda p, x: x @ p["w"], p, iter(xs))
    np.testing.assert_allclose(s["w"].sumsq, sumsq(np.concatenate(xs)), rtol=1e-5)
    assert int(s["w"].count) == 15


def test_memory_is_the_statistics():
    """The compiled step returns the statistics and nothing else, and no
    array outlives a batch."""
    p = {"a": normal(0, (16, 32)), "b": normal(1, (32, 8))}
    f = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]  # noqa: E731
    x = normal(2, (64, 16))
    mdl = calibration.model(f, p, x, None)
    plan = mdl.plan(x)
    acc = calibration._zeros(mdl, plan, True)
    step = plan.step(mdl.selected, True)
    args = (acc, mdl.arrays_of(p), [x], jnp.int32(0))
    out = jax.eval_shape(step, *args)
    assert jax.tree.structure(out) == jax.tree.structure(acc)
    want = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(acc))
    assert sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(out)) == want == 4 * (
        16 + 32 + 16 * 16 + 32 * 32 + 2)
    mem = step.lower(*args).compile().memory_analysis()
    if mem is not None:  # plus, on CPU, a table of 8-byte pointers to the outputs
        assert want <= mem.output_size_in_bytes <= want + 8 * (len(jax.tree.leaves(acc)) + 1)

    def live_after(n):
        def batches():
            for i in range(n):
                yield normal(10 + i, (64, 16))

        before = len(jax.live_arrays())
        stats = jp.calibrate(f, p, batches(), gram=True)
        return len(jax.live_arrays()) - before, stats

    live_after(1)  # warm the caches
    grown = [live_after(n)[0] for n in (2, 8)]
    assert grown[0] == grown[1] == 6  # the statistics: sumsq, count and gram of 2 kernels


def test_errors():
    p = {"w": normal(0, (3, 3)), "m": normal(1, (3, 3)), "i": jnp.ones((3, 3), jnp.int32)}
    with pytest.raises(ValueError, match="no dot_general or conv_general_dilated reads"):
        jp.calibrate(lambda p, x: (x @ p["w"]) * p["m"][0], p, [jnp.ones((2, 3))],
                     where="^(w|m)$")
    with pytest.raises(TypeError, match="dtype int32; only floating kernels"):
        jp.calibrate(lambda p, x: x @ p["i"], p, [jnp.ones((2, 3), jnp.int32)], where="i")
    dot = lambda p, x: lax.dot_general(x, p["w"], (((1,), (0,)), ((), ())),  # noqa: E731
                                       preferred_element_type=jnp.float32)
    with pytest.raises(TypeError, match="multiplies an input of dtype int8"):
        jp.calibrate(dot, p, [jnp.ones((2, 3), jnp.int8)], where="w")
    with pytest.raises(ValueError, match="batches is empty"):
        jp.calibrate(lambda p, x: x @ p["w"], p, [])
    with pytest.raises(ValueError, match="batch axis of `dot_general`"):
        jp.calibrate(lambda p, x: jax.vmap(lambda w, x: x @ w)(p["s"], x),
                     {"s": jnp.ones((2, 3, 3))}, [jnp.ones((2, 4, 3))])


# --------------------------------------------------------------------------
# One reader: calibration, SparseGPT's captures and the activation taps all
# go through jp.graph.sites; checked on a model with a layer scan, remat,
# custom_vjp and cond against activations computed without the reader.


@jax.custom_vjp
def _cv(x, w):
    return x @ w


_cv.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))


def mixed(p, x, record=None):
    """Layer scan with remat inside, a custom_vjp kernel, a cond. With
    ``record`` (a dict), runs unrolled and records every kernel's input."""
    def rec(name, v):
        if record is not None:
            record.setdefault(name, []).append(np.asarray(v, np.float64))
        return v

    h = jnp.tanh(rec("inp", x) @ p["inp"])

    def body(h, lp):
        a = jax.checkpoint(lambda h: jax.nn.gelu(h @ lp["up"]))(h)
        return h + a @ lp["down"], (h, a)

    if record is None:
        h, _ = lax.scan(body, h, p["stack"])
    else:
        for i in range(p["stack"]["up"].shape[0]):
            lp = jax.tree.map(lambda a: a[i], p["stack"])
            h, (hin, a) = body(h, lp)
            rec(f"up{i}", hin), rec(f"down{i}", a)
    h = _cv(rec("cv", h), p["cv"])
    rec("br", h)  # the cond reads h or -h: the same statistics
    h = lax.cond(h.sum() > 0, lambda h: h @ p["br"], lambda h: -h @ p["br"], h)
    return rec("head", h) @ p["head"]


def mixed_params(d=8, f=16, layers=3):
    return {"inp": normal(30, (6, d), 0.4), "stack": {"up": normal(31, (layers, d, f), 0.35),
                                                      "down": normal(32, (layers, f, d), 0.25)},
            "cv": normal(33, (d, d), 0.35), "br": normal(34, (d, d), 0.35),
            "head": normal(35, (d, 4), 0.35)}


@pytest.fixture(scope="module")
def mixed_case():
    p = mixed_params()
    xs = [normal(40 + i, (32, 6)) for i in range(2)]
    return p, xs


def test_scan_remat_custom_vjp_cond_stats_equal_the_unrolled_activations(mixed_case):
    p, xs = mixed_case
    st = jp.calibrate(mixed, p, xs, gram=True)
    seen: dict = {}
    for x in xs:
        mixed(p, x, seen)
    rows = {k: np.concatenate(v) for k, v in seen.items()}
    for path, name in (("inp", "inp"), ("cv", "cv"), ("br", "br"), ("head", "head")):
        np.testing.assert_allclose(st[path].sumsq, sumsq(rows[name]), rtol=1e-4)
        np.testing.assert_allclose(st[path].gram, rows[name].T @ rows[name], rtol=1e-4,
                                   atol=1e-4)
    for kind in ("up", "down"):
        s = st[f"stack/{kind}"]
        assert s.layers == 3 and s.stack == 0 and s.count.tolist() == [64] * 3
        for i in range(3):
            r = rows[f"{kind}{i}"]
            np.testing.assert_allclose(s.sumsq[i], sumsq(r), rtol=1e-4)
            np.testing.assert_allclose(s.gram[i], r.T @ r, rtol=1e-4, atol=1e-4)


def test_activation_taps_through_remat_and_custom_vjp():
    """unit_stats reads kernels inside remat and custom_vjp calls (the
    reader follows calls) and matches a direct computation."""
    p = {"a": {"w": normal(50, (6, 8)), "b": normal(51, (8,), 0.3)},
         "c": {"w": normal(52, (8, 8))}, "d": {"w": normal(53, (8, 3))}}
    x = normal(54, (16, 6))

    def f(p, x):
        h = jax.checkpoint(lambda x: jax.nn.relu(x @ p["a"]["w"] + p["a"]["b"]))(x)
        return jax.nn.relu(_cv(h, p["c"]["w"])) @ p["d"]["w"]

    g = jp.graph.trace(f, p, x)
    st = jp.sensitivity.unit_stats(g, f, p, x, loss_fn=lambda o: (o ** 2).mean())
    h = jax.nn.relu(x @ p["a"]["w"] + p["a"]["b"])
    i = {grp.name: grp.index for grp in g.groups}["a/w:1"]
    np.testing.assert_allclose(st["apoz"][i], np.mean(np.asarray(h) == 0, axis=0), rtol=1e-6)
    gh = jax.grad(lambda h: (f_rest(p, h) ** 2).mean())(h)
    np.testing.assert_allclose(st["taylor"][i], np.mean(np.abs(h * gh), axis=0), rtol=1e-4,
                               atol=1e-7)


def f_rest(p, h):
    return jax.nn.relu(h @ p["c"]["w"]) @ p["d"]["w"]

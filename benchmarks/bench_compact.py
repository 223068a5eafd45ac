"""Inference speed of structurally pruned, compacted models (``jp.structured``).

Models (plain JAX functions of a params dict; every size is read from array
shapes, so the compacted variables run through the same function):

* ``mlp``: the benchmark MLP 784-2048-2048-10 of ``bench_step.py``;
* ``resnet18`` (``resnet10``, one block per stage, in ``--quick``): ResNet-18 for 32x32x3 inputs, CIFAR-style stem (3x3 conv,
  stride 1, no pooling), widths 64-128-256-512, two basic blocks per stage,
  stride-2 stages with 1x1 projection shortcuts, BatchNorm in inference mode
  (scale, shift, running mean and variance), global average pool, dense head;
* ``resnet18-tv``: the same with torchvision's ImageNet stem (7x7 conv with
  stride 2, 3x3 max pool with stride 2), the network Torch-Pruning was
  measured on: at 32x32 its last stages run at 2x2 and 1x1 pixels.

Transformers (section ``transformer``; batch 8 x 128 tokens, ``--tf-batch``,
``--tf-config vocab=2048,...`` to change sizes):

* ``encoder``: pre-norm, d 256, 6 layers, 8 heads of 32, GELU MLP 1024,
  LayerNorm, learned positions, vocabulary 8192, mean-pooled 10-class head;
  attention written as Flax (NNX) does: kernels ``(d, heads, head_dim)`` and
  ``(heads, head_dim, d)``, biases ``(heads, head_dim)``;
* ``decoder``: pre-norm causal decoder, Llama style: fused QKV projection
  split and reshaped into heads, rotary embeddings, GQA (8 query heads, 4
  key/value heads, by ``repeat``), causal mask, RMSNorm, SwiGLU MLP 1024,
  tied input/output embeddings (vocabulary 8192, logits at every position).

``--quick`` runs both at d 64, 2 layers, 4 heads of 16, sequence 32. The
sparsity is that of the heads (for GQA: of the key/value groups, each with
its query heads) and of the MLP neurons of every layer; ``round_to`` applies
to MLP neurons only. Rows add the kept heads and neurons per layer, the
share of MACs in attention (query-key and attention-value products) and
outside the blocks (the embedding as LM head; it is not pruned), and XLA's
flops / 2 against ``graph.macs``.

For every model and structured sparsity (30%, 50%, 70% of the units of every
prunable group; ``jp.structured.masks(..., allocation="uniform")`` on group-L2
scores of random weights), the variables are masked and compacted with
``jp.structured.compact``; the compacted model is checked against the masked
one and re-traced for its MACs. Then the jitted forward passes (batch 64 by
default) of the dense and the compacted models are timed side by side in one
process: round-robin, one block of ``inner`` synced calls of each variant at
a time (order reversed every other block), ``--reps`` blocks. Reported per
variant: min / median / IQR over blocks of the ms per call, in wall-clock
time and in process CPU time (all threads), the speedup over dense (ratio of
medians, and the median of the per-block paired ratios with its IQR), the
MAC reduction, and their ratio (speedup / MAC reduction; Torch-Pruning on
this machine: 0.71 for ResNet-18, 0.81 for ResNet-50).

Also measured:

* **pruning time**: ``jp.graph.trace`` + ``jp.structured.scores`` +
  ``masks`` + ``compact`` on ResNet-18 (and ResNet-50), the first time in
  the process (cold: JAX compiles the eager ops) and again (warm), eager
  and with ``scores`` + ``masks`` under one ``jax.jit`` (Torch-Pruning:
  0.2 s). Each model and mode runs in a fresh Python process; wall-clock
  and process CPU seconds.
* **trace time against leaf count**: MLPs of growing depth and
  ResNet-18/34/50/101/152 (``graph.trace_seconds``, median of 3 traces, with
  the ``jax.make_jaxpr`` part alone);
* **XLA:CPU convolution throughput** (MACs per CPU-second of one 3x3
  convolution) against channel count and image size: the reason compacted
  models with odd channel counts, and dense models with 2x2 or 1x1 feature
  maps, run slower than their MACs say;
* **MACs against XLA**: ``graph.macs`` against
  ``jax.jit(f).lower(...).compile().cost_analysis()["flops"] / 2``. The graph
  counts every kernel tap of a convolution (as thop, fvcore and
  Torch-Pruning do); XLA leaves out the taps that fall in the zero padding
  and adds elementwise flops, so the table also gives the taps inside the
  input, counted here from the jaxpr.

``--fold-bn`` folds every BatchNorm into its convolution (kernel scaled, a
bias added) in the dense and the compacted variables alike, as serving
does. ``--round-to 1,8`` (the default) times every sparsity twice, with unit
counts as they come and rounded to multiples of 8 (``round_to=8``), in the
same round-robin; a rounding that changes no count is not timed twice.

Run:
  python benchmarks/bench_compact.py --json docs/bench_compact.json
  python benchmarks/bench_compact.py --quick          # smoke run, well under a minute
  python benchmarks/bench_compact.py --skip pruning,speed,trace,conv,macs  # transformers only
  python benchmarks/bench_compact.py --models resnet18 --fold-bn --round-to 1,16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import SIZES, run_info  # noqa: E402
from bench_step import init_params as init_mlp  # noqa: E402

import jaxprune as jp  # noqa: E402

EPS = 1e-5
DN = ("NHWC", "HWIO", "NHWC")
SPARSITIES = (0.3, 0.5, 0.7)
TORCH_PRUNING = {"resnet18": dict(mac_reduction=3.74, speedup=2.66),
                 "resnet50": dict(mac_reduction=3.86, speedup=3.14), "seconds": 0.2}
RESNETS = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
           50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
           152: ("bottleneck", (3, 8, 36, 3))}


# --------------------------------------------------------------------------
# Models: plain functions of a params dict


def mlp(params: dict, x: jax.Array) -> jax.Array:
    """The benchmark MLP (``bench_step.init_params``): ``layer{i}`` dense
    layers with ReLU between them."""
    n = len(params)
    for i in range(n):
        x = x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def init_deep_mlp(seed: int, depth: int, width: int = 512) -> dict:
    """784-width-...-width-10, He-normal kernels (numpy's generator: eager
    ``jax.random`` would compile a program per shape)."""
    rng = np.random.default_rng(seed)
    sizes = (SIZES[0],) + (width,) * (depth - 1) + (SIZES[-1],)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"layer{i}"] = {"kernel": jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2.0 / a),
                                                     jnp.float32),
                               "bias": jnp.zeros(b)}
    return params


def conv_bn(p: dict, x: jax.Array, stride: int = 1, padding="SAME") -> jax.Array:
    """A convolution followed by inference-mode BatchNorm (``scale``,
    ``shift``, ``mean``, ``var``), or by a bias once the norm is folded."""
    y = lax.conv_general_dilated(x, p["kernel"], (stride, stride), padding,
                                 dimension_numbers=DN)
    if "mean" in p:
        return (y - p["mean"]) * lax.rsqrt(p["var"] + EPS) * p["scale"] + p["shift"]
    return y + p["bias"]


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3x3 max pooling, stride 2, padding 1 (torchvision's stem), written as
    the max of nine strided slices of the padded input.

    ``lax.reduce_window`` (``nn.max_pool``) would be shorter, but
    ``jp.graph`` has no rule for ``reduce_window_max`` yet: the channels
    through it would not be grouped (see the report in BENCHMARKS.md).
    """
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    out = None
    for i in range(3):
        for j in range(3):
            s = xp[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2, :]
            out = s if out is None else jnp.maximum(out, s)
    return out


def resnet(params: dict, x: jax.Array) -> jax.Array:
    """ResNet on NHWC images. The structure is read from the params dict:
    a 7x7 stem kernel means torchvision's stem (stride 2 and max pool),
    a block with ``conv3`` is a bottleneck, blocks ``s{i}b0`` of stages
    ``i > 0`` have stride 2, ``proj`` is a projection shortcut."""
    stem = params["stem"]
    if stem["kernel"].shape[0] == 7:
        x = jax.nn.relu(conv_bn(stem, x, 2, ((3, 3), (3, 3))))
        x = max_pool_3x3_s2(x)
    else:
        x = jax.nn.relu(conv_bn(stem, x))
    for name in sorted((k for k in params if k[0] == "s" and k != "stem"),
                       key=lambda k: tuple(int(t) for t in k[1:].split("b"))):
        blk = params[name]
        stage, block = (int(t) for t in name[1:].split("b"))
        stride = 2 if stage > 0 and block == 0 else 1
        if "conv3" in blk:  # bottleneck, stride on the 3x3 (torchvision v1.5)
            h = jax.nn.relu(conv_bn(blk["conv1"], x))
            h = jax.nn.relu(conv_bn(blk["conv2"], h, stride))
            h = conv_bn(blk["conv3"], h)
        else:
            h = jax.nn.relu(conv_bn(blk["conv1"], x, stride))
            h = conv_bn(blk["conv2"], h)
        shortcut = conv_bn(blk["proj"], x, stride) if "proj" in blk else x
        x = jax.nn.relu(h + shortcut)
    x = jnp.mean(x, axis=(1, 2))
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def _init_conv_bn(rng: np.random.Generator, k: int, cin: int, cout: int) -> dict:
    """He-normal kernel; BatchNorm parameters and statistics that look
    trained (scales around 1, small shifts and means, variances 0.5-1.5)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return {"kernel": f32(rng.normal(size=(k, k, cin, cout)) * np.sqrt(2.0 / (k * k * cin))),
            "scale": f32(1.0 + 0.2 * rng.normal(size=cout)),
            "shift": f32(0.1 * rng.normal(size=cout)),
            "mean": f32(0.1 * rng.normal(size=cout)),
            "var": f32(rng.uniform(0.5, 1.5, size=cout))}


def init_resnet(seed: int, depth: int = 18, stem: str = "cifar", classes: int = 10,
                widths=(64, 128, 256, 512)) -> dict:
    """Random weights from numpy's generator (eager ``jax.random`` would
    compile a program per shape: 30 s for a ResNet on a loaded machine)."""
    kind, blocks = RESNETS[depth]
    rng = np.random.default_rng(seed)
    params = {"stem": _init_conv_bn(rng, 7 if stem == "tv" else 3, 3, widths[0])}
    cin = widths[0]
    for s, (w, nb) in enumerate(zip(widths, blocks)):
        out = 4 * w if kind == "bottleneck" else w
        for b in range(nb):
            stride = 2 if s > 0 and b == 0 else 1
            if kind == "bottleneck":
                blk = {"conv1": _init_conv_bn(rng, 1, cin, w),
                       "conv2": _init_conv_bn(rng, 3, w, w),
                       "conv3": _init_conv_bn(rng, 1, w, out)}
            else:
                blk = {"conv1": _init_conv_bn(rng, 3, cin, w),
                       "conv2": _init_conv_bn(rng, 3, w, w)}
            if stride != 1 or cin != out:
                blk["proj"] = _init_conv_bn(rng, 1, cin, out)
            params[f"s{s}b{b}"] = blk
            cin = out
    params["head"] = {"kernel": jnp.asarray(rng.normal(size=(cin, classes)) / np.sqrt(cin),
                                            jnp.float32),
                      "bias": jnp.zeros(classes)}
    return params


# --------------------------------------------------------------------------
# Transformers: an encoder with Flax-style head kernels and a causal decoder
# with a fused QKV projection, rotary embeddings, GQA and tied embeddings


TRANSFORMERS = {  # d, layers, heads, kv heads, head_dim, MLP, seq, vocab
    "encoder": dict(d=256, layers=6, heads=8, kv=8, hd=32, mlp=1024, seq=128, vocab=8192),
    "decoder": dict(d=256, layers=6, heads=8, kv=4, hd=32, mlp=1024, seq=128, vocab=8192),
}
TRANSFORMER_QUICK = dict(d=64, layers=2, heads=4, kv=2, hd=16, mlp=256, seq=32, vocab=512)


def layer_norm(x: jax.Array, p: dict) -> jax.Array:
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def rope(x: jax.Array) -> jax.Array:
    """Rotary embedding, rotate-half style, on ``(b, t, heads, head_dim)``."""
    t, hd = x.shape[1], x.shape[-1]
    freq = 1.0 / (10000 ** (jnp.arange(0, hd, 2) / hd))
    ang = jnp.arange(t)[:, None] * freq[None]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[None, :, None]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[None, :, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def encoder(params: dict, tokens: jax.Array) -> jax.Array:
    """Pre-norm transformer encoder, Flax (NNX ``MultiHeadAttention``)
    style: query/key/value kernels ``(d, heads, head_dim)`` with biases
    ``(heads, head_dim)``, output kernel ``(heads, head_dim, d)``; LayerNorm,
    GELU MLP, learned positions, mean-pooled classifier head."""
    t = tokens.shape[1]
    x = params["embed"][tokens] + params["pos"][:t]
    for p in params["layers"]:
        a = p["attn"]
        h = layer_norm(x, p["ln1"])
        q, k, v = (jnp.einsum("btd,dhk->bthk", h, a[n]["kernel"]) + a[n]["bias"]
                   for n in ("query", "key", "value"))
        s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
        o = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, -1), v)
        x = x + jnp.einsum("bthk,hkd->btd", o, a["out"]["kernel"]) + a["out"]["bias"]
        h = layer_norm(x, p["ln2"])
        h = jax.nn.gelu(h @ p["mlp1"]["kernel"] + p["mlp1"]["bias"])
        x = x + h @ p["mlp2"]["kernel"] + p["mlp2"]["bias"]
    x = layer_norm(x, params["ln_f"])
    return jnp.mean(x, 1) @ params["head"]["kernel"] + params["head"]["bias"]


def decoder(params: dict, tokens: jax.Array, head_dim: int = 32) -> jax.Array:
    """Pre-norm causal decoder, Llama style: fused QKV projection split and
    reshaped into heads of ``head_dim`` (a constant of the code: head counts
    are read from the shapes), rotary embeddings, GQA by ``repeat``, causal mask,
    RMSNorm, SwiGLU MLP, tied input/output embeddings (logits for every
    position)."""
    b, t = tokens.shape
    hd = head_dim
    x = params["embed"][tokens]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for p in params["layers"]:
        h = rms_norm(x, p["norm1"])
        n_q = p["wo"].shape[0] // hd
        n_kv = (p["wqkv"].shape[1] // hd - n_q) // 2
        q, k, v = jnp.split(h @ p["wqkv"], [n_q * hd, (n_q + n_kv) * hd], axis=-1)
        q, k, v = (z.reshape(b, t, -1, hd) for z in (q, k, v))
        q, k = rope(q), rope(k)
        k, v = jnp.repeat(k, n_q // n_kv, axis=2), jnp.repeat(v, n_q // n_kv, axis=2)
        s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(hd)
        s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
        o = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, -1), v).reshape(b, t, n_q * hd)
        x = x + o @ p["wo"]
        h = rms_norm(x, p["norm2"])
        x = x + (jax.nn.silu(h @ p["wg"]) * (h @ p["wu"])) @ p["wd"]
    return rms_norm(x, params["norm_f"]) @ params["embed"].T


def init_transformer(kind: str, seed: int, d: int, layers: int, heads: int, kv: int, hd: int,
                     mlp: int, seq: int, vocab: int, classes: int = 10) -> dict:
    """Random weights (numpy's generator): normal(0, 1/fan_in) kernels,
    norm scales 1 +- 0.1, small biases."""
    rng = np.random.default_rng(seed)

    def w(*shape, fan_in=None):
        fan_in = fan_in or shape[0]
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(fan_in), jnp.float32)

    def small(*shape):
        return jnp.asarray(0.02 * rng.normal(size=shape), jnp.float32)

    def scale(n):
        return jnp.asarray(1 + 0.1 * rng.normal(size=n), jnp.float32)

    if kind == "encoder":
        blocks = [{"ln1": {"scale": scale(d), "bias": small(d)},
                   "attn": {**{n: {"kernel": w(d, heads, hd), "bias": small(heads, hd)}
                               for n in ("query", "key", "value")},
                            "out": {"kernel": w(heads, hd, d, fan_in=heads * hd),
                                    "bias": small(d)}},
                   "ln2": {"scale": scale(d), "bias": small(d)},
                   "mlp1": {"kernel": w(d, mlp), "bias": small(mlp)},
                   "mlp2": {"kernel": w(mlp, d), "bias": small(d)}} for _ in range(layers)]
        return {"embed": w(vocab, d, fan_in=1), "pos": small(seq, d), "layers": blocks,
                "ln_f": {"scale": scale(d), "bias": small(d)},
                "head": {"kernel": w(d, classes), "bias": small(classes)}}
    blocks = [{"norm1": scale(d), "wqkv": w(d, (heads + 2 * kv) * hd),
               "wo": w(heads * hd, d), "norm2": scale(d),
               "wg": w(d, mlp), "wu": w(d, mlp), "wd": w(mlp, d)} for _ in range(layers)]
    return {"embed": w(vocab, d, fan_in=d), "layers": blocks, "norm_f": scale(d)}


def make_transformer(name: str, seed: int, batch: int, quick: bool = False, **over):
    """``(apply_fn, params, tokens, config)`` for ``encoder`` or ``decoder``."""
    cfg = dict(TRANSFORMER_QUICK if quick else TRANSFORMERS[name], **over)
    if name == "encoder":
        cfg["kv"] = cfg["heads"]
    fn = encoder if name == "encoder" else functools.partial(decoder, head_dim=cfg["hd"])
    params = init_transformer(name, seed, **cfg)
    rng = np.random.default_rng(seed + 1000)
    tokens = jnp.asarray(rng.integers(0, cfg["vocab"], size=(batch, cfg["seq"])), jnp.int32)
    return fn, params, tokens, cfg


def fold_bn(params):
    """Every conv + BatchNorm folded into a conv with a bias."""
    if isinstance(params, dict) and "mean" in params:
        s = params["scale"] * lax.rsqrt(params["var"] + EPS)
        return {"kernel": params["kernel"] * s, "bias": params["shift"] - params["mean"] * s}
    if isinstance(params, dict):
        return {k: fold_bn(v) for k, v in params.items()}
    return params


def count_params(params) -> int:
    """Weights and biases, norm scales and shifts (not running statistics)."""
    n = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if getattr(path[-1], "key", None) not in ("mean", "var"):
            n += int(np.size(x))
    return n


def make_model(name: str, seed: int, batch: int, width_div: int = 1):
    """``(apply_fn, params, x)`` for a benchmark model."""
    rng = np.random.default_rng(seed + 1000)
    if name == "mlp":
        params = (init_mlp(jax.random.key(seed)) if width_div == 1
                  else init_deep_mlp(seed, 3, SIZES[1] // width_div))
        return mlp, params, jnp.asarray(rng.normal(size=(batch, SIZES[0])), jnp.float32)
    depth = int(name.split("-")[0][len("resnet"):])
    stem = "tv" if name.endswith("-tv") else "cifar"
    widths = tuple(w // width_div for w in (64, 128, 256, 512))
    return (resnet, init_resnet(seed, depth, stem, widths=widths),
            jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32))


# --------------------------------------------------------------------------
# MACs: the graph's count, XLA's, and taps inside the input


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for item in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _valid_taps(n: int, k: int, stride: int, lo: int, hi: int) -> int:
    """Pairs (output position, kernel tap) of one spatial axis whose input
    position lies inside the input (not in the padding)."""
    out = (n + lo + hi - k) // stride + 1
    i = np.arange(out)[:, None] * stride - lo + np.arange(k)[None, :]
    return int(((i >= 0) & (i < n)).sum())


def valid_tap_macs(fn: Callable, *args) -> int:
    """MACs of every dot and convolution of ``fn``, leaving out the
    convolution taps that read zero padding (as XLA's cost analysis does)."""

    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
                ls, rs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
                total += int(np.prod(eqn.outvars[0].aval.shape)) * int(
                    np.prod([ls[a] for a in lc]))
            elif name == "conv_general_dilated":
                dn = eqn.params["dimension_numbers"]
                ls, rs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
                taps = 1
                for d, (lo, hi) in enumerate(eqn.params["padding"]):
                    taps *= _valid_taps(ls[dn.lhs_spec[2 + d]], rs[dn.rhs_spec[2 + d]],
                                        eqn.params["window_strides"][d], lo, hi)
                total += ls[dn.lhs_spec[0]] * rs[dn.rhs_spec[0]] * rs[dn.rhs_spec[1]] * taps
            for sub in _sub_jaxprs(eqn):
                total += walk(sub)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def xla_macs(fn: Callable, *args) -> float:
    """``cost_analysis()["flops"] / 2`` of the compiled ``fn``."""
    ca = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca["flops"]) / 2


# --------------------------------------------------------------------------
# Timing


def _sync_time(fn, *args) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, time.process_time() - c0


class _Clock:
    """Wall-clock and process CPU seconds of synced stages."""

    def __init__(self):
        self.out: dict = {}

    def __call__(self, name, fn, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        res = jax.block_until_ready(fn(*args, **kwargs))
        self.out[name] = time.perf_counter() - t0
        self.out[name + "_cpu"] = time.process_time() - c0
        return res


def pipeline(apply_fn, params, x, sparsity, round_to, jitted=None) -> dict:
    """Wall and CPU seconds of trace, scores, masks and compact (each synced);
    with ``jitted``, scores + masks run as that one jitted function."""
    clock = _Clock()
    graph = clock("trace", jp.graph.trace, apply_fn, params, x)
    if jitted is None:
        sc = clock("scores", jp.structured.scores, graph, params)
        m = clock("masks", jp.structured.masks, graph, sc, sparsity, round_to=round_to)
    else:
        m = clock("scores+masks (jit)", jitted, graph, params, sparsity)
    clock("compact", jp.structured.compact, graph, params, m)
    out = clock.out
    out["total"] = sum(v for k, v in out.items() if not k.endswith("_cpu"))
    out["total_cpu"] = sum(v for k, v in out.items() if k.endswith("_cpu"))
    return out


def pruning_child(spec: str) -> None:
    """In a fresh process: the pipeline of one model and mode, cold then
    warm; prints one JSON line."""
    name, mode, sparsity, round_to, width_div = spec.split(",")
    sparsity, round_to, width_div = float(sparsity), int(round_to), int(width_div)
    apply_fn, params, x = make_model(name, 0, 64, width_div)
    cache: dict = {}

    def jitted(graph, params, s):
        if "f" not in cache:  # one jitted function per graph, as a user would write it
            cache["f"] = jax.jit(lambda p, s: jp.structured.masks(
                graph, jp.structured.scores(graph, p), s, round_to=round_to))
        return cache["f"](params, s)

    rows = []
    for when in ("cold", "warm"):
        t = pipeline(apply_fn, params, x, sparsity, round_to, jitted if mode == "jit" else None)
        rows.append(dict(model=name, leaves=len(jax.tree.leaves(params)), mode=mode, when=when,
                         **t))
    print(json.dumps(rows))


def pruning_time(models: list[str], sparsity: float, round_to: int,
                 width_div: int = 1, eager_only: bool = False) -> list[dict]:
    """Cold then warm pipeline times per model, eager and jitted, each pair
    in a fresh Python process (cold = nothing compiled yet)."""
    rows = []
    for name in models:
        for mode in ("eager", "jit")[: 1 if eager_only else 2]:
            spec = f"{name},{mode},{sparsity},{round_to},{width_div}"
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--pruning-child",
                                   spec], capture_output=True, text=True, check=True)
            for t in json.loads(proc.stdout.strip().splitlines()[-1]):
                rows.append(t)
                print(f"  {name:<10} {mode:<5} {t['when']:<4}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in t.items()
                    if isinstance(v, float) and not k.endswith("_cpu"))
                    + f" s wall; {t['total_cpu']:.2f} s CPU", flush=True)
    return rows


def time_variants(variants: dict, x, reps: int, block_s: float) -> dict:
    """Round-robin timing. ``variants``: name -> (jitted fn, params).
    Returns name -> {"wall": [ms per call per block], "cpu": [...]}."""
    names = list(variants)
    for fn, p in variants.values():  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(fn(p, x))
    one = np.median([_sync_time(variants[names[0]][0], variants[names[0]][1], x)[0]
                     for _ in range(3)])
    inner = max(1, int(round(block_s / max(one, 1e-6))))
    res = {n: {"wall": [], "cpu": []} for n in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for n in order:
            fn, p = variants[n]
            w = c = 0.0
            for _ in range(inner):
                dw, dc = _sync_time(fn, p, x)
                w, c = w + dw, c + dc
            res[n]["wall"].append(1e3 * w / inner)
            res[n]["cpu"].append(1e3 * c / inner)
    res["_inner"] = inner
    return res


def _stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return dict(min=float(a.min()), median=float(med), q1=float(q1), q3=float(q3))


def bench_model(name: str, args, seed: int, model=None, rounding=lambda r: r,
                extra=None) -> dict:
    """Dense and compacted variants of one model, checked and timed together.

    ``model``: ``(apply_fn, params, x)`` instead of :func:`make_model`;
    ``rounding``: ``round_to`` value -> the ``round_to=`` argument of
    ``masks`` (e.g. ``{"channels": r}``); ``extra``: ``(graph, params,
    apply_fn, x, compacted graph or None) -> dict`` of more row fields."""
    apply_fn, params, x = model or make_model(name, seed, args.batch, args.width_div)
    graph = jp.graph.trace(apply_fn, params, x)
    sc = jp.structured.scores(graph, params)
    entries = [dict(variant="dense", sparsity=0.0, round_to=1, params=params, macs=graph.macs,
                    graph=graph)]
    seen = {}
    for r in args.round_to:
        select = jax.jit(lambda sc, s, r=r: jp.structured.masks(graph, sc, s,
                                                                round_to=rounding(r)))
        for s in args.sparsities:
            m = select(sc, s)
            small = jp.structured.compact(graph, params, m)
            v = f"{int(round(100 * s))}%" + (f" r{r}" if r > 1 else "")
            shapes = tuple(x.shape for x in jax.tree.leaves(small))
            if shapes in seen:  # round_to changed no channel count
                print(f"  {v}: the same channel counts as {seen[shapes]}, not timed again")
                continue
            seen[shapes] = v
            ref = apply_fn(jp.apply_masks(params, m), x)
            got = apply_fn(small, x)
            err = float(jnp.max(jnp.abs(got - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))
            if not err <= 1e-5:
                raise AssertionError(f"{name} {v}: compacted output differs from the masked "
                                     f"model's by {err:.2e} (relative), more than 1e-5")
            g_small = jp.graph.trace(apply_fn, small, x)
            entries.append(dict(variant=v, sparsity=s, round_to=r, params=small,
                                macs=g_small.macs, rel_err=err, graph=g_small))
    pruned = [g for g in graph.groups if g.prunable and g.kind != "head_dims"]  # masks' default
    print(f"\n{name}: {len(jax.tree.leaves(params))} leaves, {len(graph.groups)} groups "
          f"({len(pruned)} pruned: {sum(g.size for g in pruned)} units), batch {args.batch}"
          + (", BatchNorm folded" if args.fold_bn else "")
          + (f", round_to {args.round_to}" if args.round_to != (1,) else ""), flush=True)
    if args.fold_bn:
        for e in entries:
            e["params"] = fold_bn(e["params"])
    fwd = jax.jit(apply_fn)
    variants = {e["variant"]: (fwd, e["params"]) for e in entries}
    t = time_variants(variants, x, args.reps, args.block_s)
    rows = []
    d = {clock: np.asarray(t["dense"][clock]) for clock in ("wall", "cpu")}
    for e in entries:
        v = e["variant"]
        row = dict(model=name, variant=v, sparsity=e["sparsity"], round_to=e["round_to"],
                   params=count_params(e["params"]),
                   macs=int(e["macs"]), mac_reduction=graph.macs / e["macs"],
                   rel_err=e.get("rel_err", 0.0), inner=t["_inner"])
        if extra:
            row.update(extra(graph, e["params"], apply_fn, x, e["graph"]))
        for clock in ("wall", "cpu"):
            ms = np.asarray(t[v][clock])
            st = _stats(ms)
            paired = d[clock] / ms
            row[clock] = st
            row[f"{clock}_speedup"] = float(np.median(d[clock]) / st["median"])
            row[f"{clock}_speedup_paired"] = _stats(paired)
            row[f"{clock}_ratio"] = row[f"{clock}_speedup"] / row["mac_reduction"]
            row[f"{clock}_ms"] = ms.tolist()
        rows.append(row)
    print(table(rows))
    small = {e["sparsity"]: e["params"] for e in entries
             if e["sparsity"] and e["round_to"] == args.round_to[0] and not args.fold_bn}
    return dict(model=name, leaves=len(jax.tree.leaves(params)), groups=len(graph.groups),
                prunable_groups=len(pruned), rows=rows,
                _compacted=(apply_fn, params, x, small))


def _transformer_extra(graph, params, apply_fn, x, g) -> dict:
    """Row fields of a transformer variant: kept heads and MLP neurons per
    layer, where the MACs go, and XLA's count."""
    heads, kv, mlp = [], [], []
    for p in params["layers"]:  # counted from the shapes
        if "wqkv" in p:
            hd = apply_fn.keywords["head_dim"]
            heads.append(p["wo"].shape[0] // hd)
            kv.append((p["wqkv"].shape[1] // hd - heads[-1]) // 2)
            mlp.append(p["wg"].shape[1])
        else:
            heads.append(p["attn"]["query"]["kernel"].shape[1])
            kv.append(p["attn"]["key"]["kernel"].shape[1])
            mlp.append(p["mlp1"]["kernel"].shape[1])
    leaf = sum(info.macs for info in g.leaves)
    outside = sum(info.macs for info in g.leaves if not info.path.startswith("layers/"))
    return dict(heads=heads, kv_heads=kv, mlp_neurons=mlp,
                macs_attention=int(g.macs - leaf),  # activation x activation dots
                macs_outside_blocks=int(outside),  # embedding / LM head / classifier
                xla_macs=xla_macs(apply_fn, params, x))


def transformer_section(args, quick: bool) -> list[dict]:
    """The encoder and the decoder, dense and compacted at ``args.sparsities``
    of heads and MLP neurons (``round_to`` on MLP neurons only: a head
    count rounds to a divisor of the head count)."""
    out = []
    targs = argparse.Namespace(**{**vars(args), "batch": args.tf_batch})
    over = {}
    for kv in filter(None, (args.tf_config or "").split(",")):
        k, v = kv.split("=")
        over[k] = int(v)
    for i, name in enumerate(args.transformers):
        fn, params, x, cfg = make_transformer(name, 10 + i, args.tf_batch, quick, **over)
        print(f"\n{name}: d {cfg['d']}, {cfg['layers']} layers, {cfg['heads']} heads "
              f"({cfg['kv']} key/value) of {cfg['hd']}, MLP {cfg['mlp']}, vocab {cfg['vocab']}, "
              f"batch {args.tf_batch} x seq {cfg['seq']}", flush=True)
        res = bench_model(name, targs, i, model=(fn, params, x),
                          rounding=lambda r: {"channels": r}, extra=_transformer_extra)
        print("| variant | heads (key/value) per layer | MLP per layer | MACs in attention "
              "| MACs outside blocks | XLA flops/2 / graph.macs |\n|---|---:|---:|---:|---:|---:|")
        for r in res["rows"]:
            print(f"| {r['variant']} | {r['heads'][0]} ({r['kv_heads'][0]}) | "
                  f"{r['mlp_neurons'][0]} | {r['macs_attention'] / r['macs']:.1%} | "
                  f"{r['macs_outside_blocks'] / r['macs']:.1%} | "
                  f"{r['xla_macs'] / r['macs']:.3f} |", flush=True)
        res.update(config=cfg, batch=args.tf_batch)
        del res["_compacted"]
        out.append(res)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| variant | params | GMACs | MAC red. | wall ms: min / median [IQR] | CPU ms median "
             "| speedup wall (paired [IQR]) | speedup CPU | speedup / MAC red. (wall, CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        w, c, p = r["wall"], r["cpu"], r["wall_speedup_paired"]
        lines.append(
            f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e9:.2f} | "
            f"{r['mac_reduction']:.2f}x | {w['min']:.1f} / {w['median']:.1f} "
            f"[{w['q1']:.1f}-{w['q3']:.1f}] | {c['median']:.1f} | {r['wall_speedup']:.2f}x "
            f"({p['median']:.2f} [{p['q1']:.2f}-{p['q3']:.2f}]) | {r['cpu_speedup']:.2f}x | "
            f"{r['wall_ratio']:.2f}, {r['cpu_ratio']:.2f} |")
    return "\n".join(lines)


def trace_scaling(quick: bool, batch: int) -> list[dict]:
    models = [(f"mlp depth {d}", "mlp", d) for d in ((2, 8) if quick else (2, 8, 32, 128))]
    models += [(f"resnet{d}", "resnet", d) for d in ((10,) if quick else [k for k in RESNETS if k > 10])]
    rows = []
    for label, kind, d in models:
        if kind == "mlp":
            fn, params, x = mlp, init_deep_mlp(0, d), jnp.ones((batch, SIZES[0]))
        else:
            fn, params, x = resnet, init_resnet(0, d), jnp.ones((batch, 32, 32, 3))
        jp.graph.trace(fn, params, x)  # first trace: JAX's own caches
        total, jaxpr = [], []
        for _ in range(3):
            total.append(jp.graph.trace(fn, params, x).trace_seconds)
            t0 = time.perf_counter()
            jax.make_jaxpr(lambda p, x: fn(p, x))(params, x)  # a fresh function, as trace
            jaxpr.append(time.perf_counter() - t0)
        g = jp.graph.trace(fn, params, x)
        row = dict(model=label, leaves=len(g.leaves), groups=len(g.groups),
                   trace_s=float(np.median(total)), make_jaxpr_s=float(np.median(jaxpr)))
        rows.append(row)
        print(f"| {label} | {row['leaves']} | {row['groups']} | {row['trace_s']:.3f} | "
              f"{row['make_jaxpr_s']:.3f} | {1e3 * row['trace_s'] / row['leaves']:.2f} |",
              flush=True)
    return rows


def mac_check(models: list[str], sparsity: float, batch: int, width_div: int = 1,
              done: dict | None = None) -> list[dict]:
    """``done``: model name -> (apply_fn, params, x, {sparsity: compacted}) of
    the speed section, reused when it has this sparsity."""
    rows = []
    for name in models:
        if done and sparsity in done.get(name, (0, 0, 0, {}))[3]:
            apply_fn, params, x, smalls = done[name]
            small = smalls[sparsity]
        else:
            apply_fn, params, x = make_model(name, 0, batch, width_div)
            g = jp.graph.trace(apply_fn, params, x)
            m = jp.structured.masks(g, jp.structured.scores(g, params), sparsity)
            small = jp.structured.compact(g, params, m)
        for label, p in (("dense", params), (f"{int(100 * sparsity)}% compacted", small)):
            gm = jp.graph.trace(apply_fn, p, x).macs
            xm = xla_macs(apply_fn, p, x)
            vm = valid_tap_macs(apply_fn, p, x)
            row = dict(model=name, variant=label, graph_macs=gm, xla_macs=xm, valid_tap_macs=vm,
                       xla_over_graph=xm / gm, xla_over_valid=xm / vm)
            rows.append(row)
            print(f"| {name} | {label} | {gm / 1e9:.4f} | {xm / 1e9:.4f} | {vm / 1e9:.4f} | "
                  f"{xm / gm:.4f} | {xm / vm:.4f} |", flush=True)
    return rows


CONV_PROBE = ((32, (19, 20, 24, 45, 48, 64)), (8, (77, 80, 128, 154, 160, 256)),
              (4, (256, 512)), (2, (128, 256, 512)), (1, (256, 512)))


def conv_probe(batch: int, quick: bool) -> list[dict]:
    """XLA:CPU throughput of one jitted 3x3 ``SAME`` convolution C -> C on
    ``batch x H x W x C`` inputs: MACs (all taps, as ``graph.macs``) per
    second of process CPU time, median of 5 calls."""
    f = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                      dimension_numbers=DN))
    rows = []
    for hw, channels in (CONV_PROBE[:1] if quick else CONV_PROBE):
        cells = []
        for c in channels:
            x, w = jnp.ones((batch, hw, hw, c)), jnp.ones((3, 3, c, c))
            _sync_time(f, x, w)
            cpu = float(np.median([_sync_time(f, x, w)[1] for _ in range(5)]))
            gmacs = batch * hw * hw * 9 * c * c / cpu / 1e9
            rows.append(dict(hw=hw, channels=c, cpu_ms=1e3 * cpu, gmac_per_cpu_s=gmacs))
            cells.append(f"{c}: {gmacs:.0f}")
        print(f"| {hw}x{hw} | " + ", ".join(cells) + " |", flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: small widths, batch 8, 50%% only, few blocks")
    ap.add_argument("--models", default=None,
                    help="comma-separated: mlp, resnet18, resnet18-tv, resnet34, resnet50 "
                    "(default mlp,resnet18,resnet18-tv)")
    ap.add_argument("--batch", type=int, default=None, help="inference batch (default 64)")
    ap.add_argument("--reps", type=int, default=None, help="timed blocks per variant (default 21)")
    ap.add_argument("--block-s", type=float, default=0.2,
                    help="target seconds of dense calls per block (sets the calls per block)")
    ap.add_argument("--sparsities", default=None, help="default 0.3,0.5,0.7")
    ap.add_argument("--round-to", default=None,
                    help="comma-separated round_to values, e.g. 1,8: every sparsity at each "
                    "(variants 'NN%% rK'), timed together")
    ap.add_argument("--fold-bn", action="store_true",
                    help="fold BatchNorm into the convolutions (dense and compacted)")
    ap.add_argument("--skip", default="",
                    help="comma-separated sections to skip: pruning, speed, transformer, "
                    "trace, conv, macs")
    ap.add_argument("--transformers", default="encoder,decoder",
                    help="transformer section: comma-separated encoder, decoder")
    ap.add_argument("--tf-batch", type=int, default=8, help="transformer batch (default 8)")
    ap.add_argument("--tf-config", default="",
                    help="transformer size overrides, e.g. vocab=2048,heads=4,hd=64")
    ap.add_argument("--json", metavar="PATH", help="write all numbers here")
    ap.add_argument("--pruning-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pruning_child:
        return pruning_child(args.pruning_child)
    q = args.quick
    args.round_to = tuple(int(r) for r in (args.round_to or ("1" if q else "1,8")).split(","))
    args.batch = args.batch or (8 if q else 64)
    args.reps = args.reps or (5 if q else 21)
    args.sparsities = tuple(float(s) for s in (args.sparsities or ("0.5" if q else
                                                                   "0.3,0.5,0.7")).split(","))
    args.models = (args.models or ("mlp,resnet10" if q else "mlp,resnet18,resnet18-tv")).split(",")
    args.width_div = 4 if q else 1
    args.transformers = args.transformers.split(",")
    if q:
        args.block_s = min(args.block_s, 0.02)
    skip = set(filter(None, args.skip.split(",")))
    t_start = time.time()
    info = run_info(batch=args.batch, reps=args.reps, round_to=args.round_to,
                    fold_bn=args.fold_bn, quick=q, threads=os.cpu_count(),
                    transformers=args.transformers, tf_batch=args.tf_batch,
                    tf_config=args.tf_config)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} / {dev.device_kind}, {os.cpu_count()} CPUs, jax "
          f"{jax.__version__}, load average {os.getloadavg()[0]:.1f}, commit {info['commit']}")
    result: dict = dict(info=info, torch_pruning=TORCH_PRUNING)
    info["sections_s"] = {}  # section: [wall s, CPU s of this process and its children]
    last: list = []

    def section(name=None):
        t = os.times()
        now = (time.time(), t.user + t.system + t.children_user + t.children_system)
        if last:
            prev, (w0, c0) = last.pop()
            info["sections_s"][prev] = [now[0] - w0, now[1] - c0]
        if name:
            last.append((name, now))

    if "pruning" not in skip:
        section("pruning")
        s = 0.5 if 0.5 in args.sparsities else args.sparsities[0]
        print(f"\nPruning time (trace + scores + masks + compact) at {s:.0%}, first call in "
              "a fresh process (cold) and again (warm):")
        result["pruning_time"] = pruning_time(["mlp"] if q else ["resnet18", "resnet50"],
                                              s, args.round_to[0], args.width_div, eager_only=q)
    if "speed" not in skip:
        section("speed")
        result["speed"] = [bench_model(name, args, i)
                           for i, name in enumerate(args.models)]
    if "transformer" not in skip:
        section("transformer")
        result["transformer"] = transformer_section(args, q)
    if "trace" not in skip:
        section("trace")
        print("\nTrace time against leaf count (median of 3):\n"
              "| model | leaves | groups | trace s | make_jaxpr s | ms per leaf |\n"
              "|---|---:|---:|---:|---:|---:|")
        result["trace_scaling"] = trace_scaling(q, args.batch)
    if "conv" not in skip:
        section("conv")
        print(f"\nXLA:CPU 3x3 convolution C -> C, batch {args.batch}: GMACs per CPU-second "
              "by channel count C\n| H x W | C: GMAC/s |\n|---|---|")
        result["conv_probe"] = conv_probe(args.batch, q)
    if "macs" not in skip:
        section("macs")
        print(f"\nMACs (G per batch of {args.batch}): graph vs XLA cost_analysis flops/2:\n"
              "| model | variant | graph.macs | XLA flops/2 | taps inside input | XLA/graph "
              "| XLA/inside |\n|---|---|---:|---:|---:|---:|---:|")
        done = {r["model"]: r["_compacted"] for r in result.get("speed", [])}
        result["macs_check"] = mac_check(["mlp", "resnet10" if q else "resnet18"], 0.5,
                                         args.batch, args.width_div, done)
    section()
    for r in result.get("speed", []):
        del r["_compacted"]
    print("\nsections (wall s, CPU s): " + ", ".join(
        f"{k} {w:.0f}, {c:.0f}" for k, (w, c) in info["sections_s"].items()))
    info["loadavg_end"] = os.getloadavg()[0]
    info["wall_s"] = time.time() - t_start
    print(f"\nwall time {info['wall_s']:.0f} s, load average {info['loadavg_start']:.1f} -> "
          f"{info['loadavg_end']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

"""``graph.macs`` against XLA's own count (``cost_analysis()["flops"] / 2``).

The graph counts every dot and every kernel tap of a convolution. XLA adds
the elementwise flops (bias adds, activations: well under 1% here) and
leaves out the convolution taps that fall in zero padding, so the
convolutions are checked with ``VALID`` padding, and a ``SAME``-padded one
against the taps that lie inside the input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprune as jp

DN = ("NHWC", "HWIO", "NHWC")


def xla_macs(fn, *args) -> float:
    ca = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    if not ca or "flops" not in ca:
        pytest.skip("this backend's cost_analysis has no flops")
    return float(ca["flops"]) / 2


def _normal(key, shape, fan_in):
    return jax.random.normal(key, shape) / np.sqrt(fan_in)


def test_mlp_macs_match_xla():
    sizes, batch = (128, 256, 256, 10), 16
    keys = jax.random.split(jax.random.key(0), 3)
    params = [{"w": _normal(k, (a, b), a), "b": jnp.zeros(b)}
              for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

    def f(p, x):
        for i, layer in enumerate(p):
            x = x @ layer["w"] + layer["b"]
            x = jax.nn.relu(x) if i < len(p) - 1 else x
        return x

    x = jnp.ones((batch, sizes[0]))
    exact = batch * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    g = jp.graph.trace(f, params, x)
    assert g.macs == exact
    assert xla_macs(f, params, x) == pytest.approx(exact, rel=0.01)
    # and after compaction (the first 128 units of each hidden layer kept;
    # masks written by hand: jp.structured.masks would compile for seconds)
    keep = np.arange(256) < 128
    masks = [{"w": np.ones((128, 1), bool) & keep, "b": keep},
             {"w": keep[:, None] & keep, "b": keep},
             {"w": np.broadcast_to(keep[:, None], (256, 10)), "b": np.ones(10, bool)}]
    small = jp.structured.compact(g, params, masks)
    g2 = jp.graph.trace(f, small, x)
    assert g2.macs == batch * (128 * 128 + 128 * 128 + 128 * 10)
    assert xla_macs(f, small, x) == pytest.approx(g2.macs, rel=0.01)


def _conv_net(padding):
    def f(p, x):
        x = jax.nn.relu(lax.conv_general_dilated(x, p["c1"], (1, 1), padding,
                                                 dimension_numbers=DN) + p["b1"])
        x = jax.nn.relu(lax.conv_general_dilated(x, p["c2"], (2, 2), padding,
                                                 dimension_numbers=DN))
        return jnp.mean(x, axis=(1, 2)) @ p["head"]

    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    params = {"c1": _normal(k1, (3, 3, 8, 32), 72), "b1": jnp.zeros(32),
              "c2": _normal(k2, (3, 3, 32, 64), 288), "head": _normal(k3, (64, 10), 64)}
    return f, params, jnp.ones((4, 16, 16, 8))


def test_conv_macs_match_xla_valid_padding():
    f, params, x = _conv_net("VALID")
    # 16 -> 14 (3x3), 14 -> 6 (3x3, stride 2)
    exact = 4 * (14 * 14 * 9 * 8 * 32 + 6 * 6 * 9 * 32 * 64) + 4 * 64 * 10
    g = jp.graph.trace(f, params, x)
    assert g.macs == exact
    assert xla_macs(f, params, x) == pytest.approx(exact, rel=0.01)


def test_conv_macs_same_padding_count_every_tap():
    f, params, x = _conv_net("SAME")
    # The graph counts all 9 taps at every output position (as thop, fvcore
    # and Torch-Pruning do): 16x16 and 8x8 outputs.
    full = 4 * (16 * 16 * 9 * 8 * 32 + 8 * 8 * 9 * 32 * 64) + 4 * 64 * 10
    g = jp.graph.trace(f, params, x)
    assert g.macs == full

    # XLA counts only the taps that read the input: per spatial axis, 46 of
    # the 48 (output, tap) pairs at stride 1 (16 outputs), 23 of 24 at
    # stride 2 (8 outputs, padding 0 before and 1 after).
    inside = 4 * (46 * 46 * 8 * 32 + 23 * 23 * 32 * 64) + 4 * 64 * 10
    assert xla_macs(f, params, x) == pytest.approx(inside, rel=0.01)
    assert inside < 0.93 * full

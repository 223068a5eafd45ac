"""The masking of a pruned train step fuses: no separate pass over the params.

A step of ``jp.prune`` that does not update the masks should cost what the
dense step costs: the masks are read inside the fusions that the dense step
runs anyway (the optimizer's moment updates and the parameter update), not
applied in passes of their own. Timing cannot show a few percent on 2 busy
cores, so this reads the compiled program instead: outside the mask-update
branch (a ``conditional``), the pruned step must compute no more
kernel-shaped arrays than the dense step. A separate masking pass (a
``where`` not fused into the optimizer, a copy of the masks, a layout change
of a kernel) would be one more.

Kernel shapes are chosen so that no activation or other array has them,
and only top-level instructions that compute something are counted (not
parameters, tuples, tuple elements or bitcasts), so the test does not depend
on fusion names or on how XLA splits the rest of the step.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

# Distinctive conv and dense kernel shapes (no activation has them).
CONV1, CONV2, DENSE = (3, 3, 5, 7), (3, 3, 7, 11), (11 * 4 * 4, 13)
_NOT_COMPUTED = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"conv1": {"kernel": jax.random.normal(k[0], CONV1) * 0.3, "bias": jnp.zeros(7)},
            "conv2": {"kernel": jax.random.normal(k[1], CONV2) * 0.3, "bias": jnp.zeros(11)},
            "head": {"kernel": jax.random.normal(k[2], DENSE) * 0.1, "bias": jnp.zeros(13)}}


def _loss(params, x, y):
    def conv(h, layer):
        out = jax.lax.conv_general_dilated(h, layer["kernel"], (2, 2), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(out + layer["bias"])

    h = conv(conv(x, params["conv1"]), params["conv2"])
    logits = h.reshape(h.shape[0], -1) @ params["head"]["kernel"] + params["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _entry_hlo(tx, params, x, y) -> str:
    def step(params, opt_state, x, y):
        grads = jax.grad(_loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, y).compile().as_text()
    entry = re.search(r"^ENTRY .*?^}", text, re.M | re.S)
    assert entry, "no ENTRY computation in the compiled HLO"
    return entry.group(0)


def _computed(entry: str, shape: tuple) -> list[str]:
    """Top-level instructions of ``entry`` whose result is an array of
    ``shape`` (any dtype, any layout) and that compute something."""
    dims = ",".join(map(str, shape))
    pat = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*[a-z0-9]+\[" + re.escape(dims)
                     + r"\](?:\{[^}]*\})?\s+([a-z-]+)\(", re.M)
    return [m.group(0).strip() for m in pat.finditer(entry) if m.group(1) not in _NOT_COMPUTED]


INNER = {"adam": optax.adam(1e-3), "momentum": optax.sgd(1e-2, momentum=0.9)}


def _batch():
    return jax.random.normal(jax.random.key(1), (4, 16, 16, 5)), jnp.arange(4) % 13


@functools.cache
def _dense_entry(inner: str) -> str:
    """The dense step's ENTRY computation with ``INNER[inner]``, compiled
    once per module (the same program for every test that compares to it)."""
    return _entry_hlo(INNER[inner], _params(), *_batch())


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_masking_adds_no_pass_over_the_params(inner, allocation):
    params = _params()
    x, y = _batch()
    dense = _dense_entry(inner)
    inner = INNER[inner]
    pruned = _entry_hlo(jp.prune(inner, sparsity=0.9, allocation=allocation, update_every=100),
                        params, x, y)
    assert "conditional(" in pruned  # the mask update is a branch, not in the entry
    for shape in (CONV1, CONV2, DENSE):
        d, p = _computed(dense, shape), _computed(pruned, shape)
        assert d, f"no kernel-shaped {shape} computation found in the dense step: the test's " \
                  "HLO pattern no longer matches this XLA's text format"
        assert len(p) <= len(d), (
            f"the pruned step computes {len(p)} arrays of kernel shape {shape} outside the "
            f"mask update, the dense step {len(d)}: masking is a separate pass.\n"
            "pruned:\n  " + "\n  ".join(p) + "\ndense:\n  " + "\n  ".join(d))


def test_the_check_sees_a_separate_masking_pass():
    """The check fails on a step that masks the parameters in a pass of its own
    (a masked copy of the params the loss reads, as a naive
    ``apply_masks(params)`` before the forward pass would do)."""
    params = _params()
    x, y = _batch()
    masks = jp.masks.topk(jp.scores.magnitude(params), 0.5)

    def loss(p, x, y):
        return _loss(jp.masks.apply_masks(p, masks), x, y)

    def step(params, opt_state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = optax.adam(1e-3).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    dense = _dense_entry("adam")
    opt = optax.adam(1e-3).init(params)
    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, x, y).compile().as_text()
    naive = re.search(r"^ENTRY .*?^}", text, re.M | re.S).group(0)
    assert np.any([len(_computed(naive, s)) > len(_computed(dense, s)) for s in (CONV1, CONV2, DENSE)])


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("name", ["magnitude", "saliency"])
def test_prune_lazy_scores_match_stored_scores(allocation, nested, name):
    """``score="magnitude"`` / ``"saliency"`` select on lazy scores
    (``Scorer.lazy``: recomputed in every pass, never stored); the same
    function passed as a callable takes the stored-score path. Both give
    bit-identical parameters and states, ties and bf16 included."""
    params = _params()
    params["conv1"]["kernel"] = jnp.round(params["conv1"]["kernel"] * 4) / 4  # ties
    params["conv2"]["kernel"] = params["conv2"]["kernel"].astype(jnp.bfloat16)
    outs = []
    for score in (name, jp.scores.get(name)):
        tx = jp.prune(optax.adam(1e-2), sparsity=optax.linear_schedule(0.0, 0.8, 6), score=score,
                      allocation=allocation, update_every=2, nested=nested)
        state, p = tx.init(params), params
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
        for i in range(7):
            g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)).astype(x.dtype), p)
            u, state = step(p, state, g)
            p = optax.apply_updates(p, u)
        outs.append((p, state))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jp.sparsity_of(outs[0][0]) == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("name", ["magnitude", "saliency"])
def test_lazy_scores_leave_no_score_buffer(name):
    """The lazy path is the one taken: the compiled step's scratch buffer is
    smaller than with the same scores stored (a callable); equal buffers
    would mean both took the stored path. (On this small net XLA packs the
    stored scores into reused space, so the gap is below their size.)"""
    params = _params()
    temps = []
    for score in (name, jp.scores.get(name)):
        tx = jp.prune(optax.adam(1e-2), sparsity=0.5, score=score, update_every=2)
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
        compiled = step.lower(params, tx.init(params), params).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    assert temps[0] < temps[1], temps

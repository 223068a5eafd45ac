"""jp.graph on transformer blocks as JAX users write them: Flax-style head
kernels, fused QKV with reshape into heads, rotary embeddings, GQA, tied
embeddings, a scanned stack; compaction equals masking; errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprune as jp


def normal(i, shape, scale=1.0):
    rng = np.random.default_rng(i)
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def rms(x, s):
    return x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s


def rope_half(x):
    """Rotary embedding, rotate-half style (pairs j and j + hd/2)."""
    t, hd = x.shape[1], x.shape[-1]
    freq = 1.0 / (10000 ** (jnp.arange(0, hd, 2) / hd))
    ang = jnp.arange(t)[:, None] * freq[None]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[None, :, None]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[None, :, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def causal_softmax(s):
    t = s.shape[-1]
    return jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9), -1)


HD = 8  # head size, a constant of the code (heads are counted from shapes)


def gqa_block(p, x, rotary=True):
    """Fused QKV, split, reshape into heads, rotary, GQA by repeat, causal."""
    b, t, _ = x.shape
    h = p["wo"].shape[0] // HD
    kv = (p["wqkv"].shape[1] // HD - h) // 2
    q, k, v = jnp.split(x @ p["wqkv"], [h * HD, (h + kv) * HD], axis=-1)
    q, k, v = (a.reshape(b, t, -1, HD) for a in (q, k, v))
    if rotary:
        q, k = rope_half(q), rope_half(k)
    k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
    a = causal_softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(HD))
    o = jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, h * HD)
    return o @ p["wo"]


def decoder(params, tokens, rotary=True):
    x = params["emb"][tokens]  # tied input/output embedding
    for p in params["blocks"]:
        x = x + gqa_block(p, rms(x, p["n1"]), rotary)
        y = rms(x, p["n2"])
        x = x + (jax.nn.silu(y @ p["wg"]) * (y @ p["wu"])) @ p["wd"]
    return rms(x, params["nf"]) @ params["emb"].T


def decoder_params(d=32, h=4, kv=2, f=48, vocab=40, layers=2):
    blocks = [{"wqkv": normal(10 * i, (d, (h + 2 * kv) * HD), 0.2),
               "wo": normal(10 * i + 1, (h * HD, d), 0.2),
               "wg": normal(10 * i + 2, (d, f), 0.2), "wu": normal(10 * i + 3, (d, f), 0.2),
               "wd": normal(10 * i + 4, (f, d), 0.2),
               "n1": 1 + normal(10 * i + 5, (d,), 0.1), "n2": 1 + normal(10 * i + 6, (d,), 0.1)}
              for i in range(layers)]
    return {"emb": normal(99, (vocab, d)), "blocks": blocks, "nf": jnp.ones(d)}


def flax_style_mha(p, x):
    """Kernels (d, heads, head_dim) and (heads, head_dim, d), as Flax writes them."""
    q = jnp.einsum("btd,dhk->bthk", x, p["q"]) + p["qb"]
    k = jnp.einsum("btd,dhk->bthk", x, p["k"]) + p["kb"]
    v = jnp.einsum("btd,dhk->bthk", x, p["v"]) + p["vb"]
    a = causal_softmax(jnp.einsum("bthk,bshk->bhts", q, k))
    return jnp.einsum("bhts,bshk->bthk", a, v).reshape(*x.shape[:2], -1) @ p["o"].reshape(
        -1, p["o"].shape[-1])


def mha_params(d=16, h=4, hd=6):
    return {"q": normal(1, (d, h, hd)), "k": normal(2, (d, h, hd)), "v": normal(3, (d, h, hd)),
            "qb": normal(4, (h, hd)), "kb": normal(5, (h, hd)), "vb": normal(6, (h, hd)),
            "o": normal(7, (h, hd, d)), "inp": normal(8, (5, d)), "out": normal(9, (d, 3))}


def mha_model(p, x):
    h = jnp.tanh(x @ p["inp"])
    return (h + flax_style_mha(p, h)) @ p["out"]


def by_kind(g, kind):
    return [grp for grp in g.prunable if grp.kind == kind]


def check_compaction(f, v, x, sparsity=0.5, **kw):
    g = jp.graph.trace(f, v, x)
    masks = jp.structured.masks(g, jp.structured.scores(g, v), sparsity, **kw)
    small = jp.structured.compact(g, v, masks)
    want, got = f(jp.apply_masks(v, masks), x), jax.jit(f)(small, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    return g, small


# --------------------------------------------------------------------------
# Groups


def test_flax_style_heads_and_head_dims():
    p = mha_params()
    g = jp.graph.trace(mha_model, p, jnp.ones((2, 7, 5)))
    (heads,) = by_kind(g, "heads")
    assert heads.size == 4 and heads.heads_per_unit == 1
    axes = {(m.path, m.axis) for m in heads.members}
    assert {("q", 1), ("k", 1), ("v", 1), ("o", 0), ("qb", 0), ("kb", 0), ("vb", 0)} <= axes
    dims = by_kind(g, "head_dims")
    assert sorted(grp.size for grp in dims) == [6, 6]  # query/key dims; value/output dims
    qk = [grp for grp in dims if ("q", 2) in {(m.path, m.axis) for m in grp.members}][0]
    assert {(m.path, m.axis) for m in qk.members} == {("q", 2), ("k", 2), ("qb", 1), ("kb", 1)}
    assert g.leaf("q").in_axes == (0,) and g.leaf("q").out_axes == (1, 2)
    assert g.leaf("o").in_axes == (0, 1)


def test_fused_qkv_gqa_rotary_and_tied_embeddings():
    p = decoder_params()
    g = jp.graph.trace(decoder, p, jnp.ones((2, 6), jnp.int32))
    heads = by_kind(g, "heads")
    assert len(heads) == 2 and all(grp.size == 2 and grp.heads_per_unit == 2 for grp in heads)
    units = {m.path: m.units for m in heads[0].members}
    q_heads = units["blocks/0/wqkv"][: 4 * HD].reshape(4, HD)
    assert (q_heads == np.array([0, 0, 1, 1])[:, None]).all()  # 2 query heads per kv group
    kv = units["blocks/0/wqkv"][4 * HD:].reshape(2, 2, HD)
    assert (kv == np.array([0, 1])[None, :, None]).all()  # k heads, then v heads
    mlp = [grp for grp in g.prunable if grp.kind == "channels"]
    assert [grp.size for grp in mlp] == [48, 48]
    assert {m.path for m in mlp[0].members} == {"blocks/0/wg", "blocks/0/wu", "blocks/0/wd"}
    assert g.leaf("emb").role == "embedding" and g.leaf("emb").tied
    (residual,) = [grp for grp in g.groups if ("emb", 1) in {(m.path, m.axis)
                                                             for m in grp.members}]
    assert not residual.prunable and any("reduction" in r for r in residual.reasons)


def test_rotary_pairs_head_dims_within_flax_style_heads():
    p = mha_params(hd=8)

    def f(p, x):
        h = jnp.tanh(x @ p["inp"])
        q = rope_half(jnp.einsum("btd,dhk->bthk", h, p["q"]))
        k = rope_half(jnp.einsum("btd,dhk->bthk", h, p["k"]))
        v = jnp.einsum("btd,dhk->bthk", h, p["v"])
        a = causal_softmax(jnp.einsum("bthk,bshk->bhts", q, k))
        o = jnp.einsum("bhts,bshk->bthk", a, v)
        return (h + jnp.einsum("bthk,hkd->btd", o, p["o"])) @ p["out"]

    g = jp.graph.trace(f, p, jnp.ones((1, 5, 5)))
    assert [grp.size for grp in by_kind(g, "heads")] == [4]
    # rotary frequencies depend on the position within a head: query/key dims
    # cannot be removed (the compacted model would rotate differently)
    fixed = [grp for grp in g.groups if ("q", 2) in {(m.path, m.axis) for m in grp.members}]
    assert fixed and not fixed[0].prunable and "constant" in " ".join(fixed[0].reasons)
    check_compaction(f, p, normal(3, (2, 5, 5)))


def test_scanned_decoder_compacts_to_a_stack():
    d, layers = 16, 3
    p = {"emb": normal(0, (30, d)), "wqkv": normal(1, (layers, d, 3 * 2 * HD), 0.3),
         "wo": normal(2, (layers, 2 * HD, d), 0.3), "wu": normal(3, (layers, d, 24), 0.3),
         "wd": normal(4, (layers, 24, d), 0.3), "out": normal(5, (d, 30))}

    def f(p, t):
        def body(x, lp):
            y = gqa_block({"wqkv": lp[0], "wo": lp[1]}, x, rotary=False)
            x = x + y
            return x + jax.nn.gelu(x @ lp[2]) @ lp[3], None
        x, _ = lax.scan(body, p["emb"][t], (p["wqkv"], p["wo"], p["wu"], p["wd"]))
        return x @ p["out"]

    t = jnp.array([[1, 2, 3, 4, 5]])
    g, small = check_compaction(f, p, t)
    heads = by_kind(g, "heads")
    assert len(heads) == 1 and (heads[0].size, heads[0].layers) == (2, layers)
    assert small["wqkv"].shape == (layers, d // 2, 3 * HD)
    assert small["wu"].shape == (layers, d // 2, 12)


# --------------------------------------------------------------------------
# Compaction


def test_decoder_compaction_matches_masking_at_half_heads_and_neurons():
    p = decoder_params()
    tokens = jnp.array([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])
    g, small = check_compaction(decoder, p, tokens, 0.5)
    assert small["blocks"][0]["wqkv"].shape == (32, (2 + 2) * HD)  # 2 q heads, 1 kv head
    assert small["blocks"][0]["wg"].shape == (32, 24)
    assert jp.graph.trace(decoder, small, tokens).macs < g.macs


def test_flax_style_compaction_with_head_dims():
    p = mha_params()
    x = normal(1, (2, 7, 5))
    _, small = check_compaction(mha_model, p, x, 0.5)  # heads only
    assert small["q"].shape == (8, 2, 6) and small["o"].shape == (2, 6, 8)
    # head dims when named (this code neither rescales by head_dim nor checks sizes)
    _, small = check_compaction(mha_model, p, x, 0.5, groups=lambda grp: grp.prunable)
    assert small["q"].shape == (8, 2, 3) and small["o"].shape == (2, 3, 8)


def test_hidden_size_pruning_is_opt_in_and_changes_the_norm():
    p = decoder_params(layers=1)
    tokens = jnp.array([[3, 1, 4, 1, 5, 9]])
    g = jp.graph.trace(decoder, p, tokens, allow_reductions=True)
    res = [grp for grp in g.prunable if ("emb", 1) in {(m.path, m.axis) for m in grp.members}]
    assert res and res[0].notes and "statistics" in res[0].notes[0]
    masks = jp.structured.masks(g, jp.structured.scores(g, p), 0.25, groups=[res[0].index])
    small = jp.structured.compact(g, p, masks)
    assert small["emb"].shape == (40, 24)
    masked, compacted = decoder(jp.apply_masks(p, masks), tokens), decoder(small, tokens)
    rel = float(jnp.linalg.norm(masked - compacted) / jnp.linalg.norm(masked))
    assert 1e-4 < rel < 1.0  # RMSNorm now averages over 24 channels, not 32


# --------------------------------------------------------------------------
# Errors


def test_gqa_head_count_and_round_to_errors():
    p = decoder_params()
    g = jp.graph.trace(decoder, p, jnp.ones((1, 4), jnp.int32))
    sc = jp.structured.scores(g, p)
    with pytest.raises(ValueError, match="keep=3 query heads is impossible.*multiple of 2"):
        jp.structured.masks(g, sc, 0.0, keep={"heads": 3})
    m = jp.structured.masks(g, sc, 0.0, keep={"heads": 2})
    assert m["blocks"][0]["wo"].reshape(4, HD, -1).any(axis=(1, 2)).sum() == 2
    q = mha_params(hd=6)
    gq = jp.graph.trace(mha_model, q, jnp.ones((1, 3, 5)))
    every = dict(groups=lambda grp: grp.prunable)
    with pytest.raises(ValueError, match="round_to=4 does not divide the 6 head_dims"):
        jp.structured.masks(gq, jp.structured.scores(gq, q), 0.5, round_to={"head_dims": 4},
                            **every)
    jp.structured.masks(gq, jp.structured.scores(gq, q), 0.5, round_to={"head_dims": 3}, **every)


def test_position_table_is_an_embedding_and_biases_stay_biases():
    """x = tok[ids] + pos[:t]: ``pos`` varies along the sequence, so it is an
    embedding; a (d,) bias and a (heads, head_dim) attention bias, constant
    over tokens, are biases."""
    r = np.random.default_rng(0)
    p = {"tok": r.standard_normal((20, 8)), "pos": r.standard_normal((16, 8)),
         "wq": r.standard_normal((8, 2, 4)), "bq": r.standard_normal((2, 4)),
         "b": r.standard_normal(8), "out": r.standard_normal((2, 4, 8))}
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)

    def f(p, ids):
        x = p["tok"][ids] + p["pos"][: ids.shape[1]] + p["b"]
        q = jnp.einsum("btd,dhk->bthk", x, p["wq"]) + p["bq"]
        return jnp.einsum("bthk,hkd->btd", jnp.tanh(q), p["out"])

    g = jp.graph.trace(f, p, jnp.zeros((2, 6), jnp.int32))
    roles = {k: g.leaf(k).role for k in p}
    assert roles == {"tok": "embedding", "pos": "embedding", "wq": "kernel", "bq": "bias",
                     "b": "bias", "out": "kernel"}
    assert g.leaf("pos").out_axes == (1,)
    assert jp.tree.selected(p, where=g.kernels) == ["out", "wq"]

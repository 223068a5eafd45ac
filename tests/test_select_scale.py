"""Structural checks of jaxprune.select at scale, on the compiled program
(no timing): temporaries of a selection over lazily computed scores, and
how the program grows with the number of leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import oracle

from jaxprune.core import select as sel

D = 512
N_LEAVES = 4


def _lazy_abs(ws):
    return [sel.LazyScores(jnp.abs, (w,)) for w in ws]


def _memory(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis()


def test_lazy_selection_allocates_only_its_masks():
    # A global and a per-leaf selection over 4 leaves of 512 x 512 |w|,
    # computed inside every pass: besides the bool masks (the outputs), the
    # temporaries are far below 10% of the parameters (partial counts,
    # the sample, the search state). A stored score, key or position array
    # would be 100% (float32 / uint32 / int32) or 25% (bool).
    ws = [jax.ShapeDtypeStruct((D, D), jnp.float32)] * N_LEAVES
    param_bytes = N_LEAVES * D * D * 4
    n = N_LEAVES * D * D
    cases = {
        "global": lambda ws: sel.select_groups(_lazy_abs(ws), [0] * N_LEAVES, [n // 10]),
        "per leaf": lambda ws: sel.select_groups(_lazy_abs(ws), list(range(N_LEAVES)),
                                                 [D * D // 10] * N_LEAVES),
        "along": lambda ws: [sel.select_along(sel.LazyScores(jnp.abs, (w,)), 0, D // 10) for w in ws],
    }
    for name, fn in cases.items():
        mem = _memory(fn, ws)
        assert n <= mem.output_size_in_bytes < n + 1024, (name, mem.output_size_in_bytes)
        assert mem.temp_size_in_bytes < param_bytes // 16, (
            f"{name}: {mem.temp_size_in_bytes} bytes of temporaries for {param_bytes} bytes of "
            "parameters")


def test_program_grows_by_a_few_kernels_per_leaf_of_a_shape_seen():
    # Leaves of one shape share their kernels; each one adds a handful of
    # fusion instructions (its sample, count, mask and loop index), not the
    # ~13 per leaf of the earlier tie-breaking code.
    def fusions(n_leaves):
        ws = [jax.ShapeDtypeStruct((64, 96), jnp.float32)] * n_leaves
        f = jax.jit(lambda ws: sel.select_groups(list(ws), [0] * n_leaves, [7]))
        return f.lower(ws).compile().as_text().count("fusion(")

    few, many = fusions(8), fusions(24)
    assert (many - few) / 16 <= 5, (few, many)


def test_keep_count_vectorised_matches_scalar():
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 2**31 - 1, 50)
    sizes[:5] = [0, 1, 2, 3, 7]
    s = rng.random(50).astype(np.float32)
    want = [oracle.keep_count(int(a), float(b), traced=True) for a, b in zip(sizes, s)]
    got = jax.jit(lambda s: sel.keep_count(sizes, s))(jnp.asarray(s))
    np.testing.assert_array_equal(np.asarray(got), want)
    got = sel.keep_count(sizes[:20], 0.3)
    np.testing.assert_array_equal(got, [oracle.keep_count(int(a), 0.3) for a in sizes[:20]])

"""Global magnitude masks: jaxprune's selection vs argsort vs a one-pass floor.

By default it sweeps the real-model shape sets of ``shape_sets.py``
(ResNet-50, BERT-base, GPT-2 small, LLaMA-7B/4, odd squares, last axes not
multiples of 32, ...), every leaf selected, and prints the worst set
(``run_suite``). With ``--sizes`` it runs the older sweep below.

The params tree holds 4 square float32 kernels (``d x d``) and 4 biases
(length ``d``), with ``4 * d * d`` close to each requested size; weights are
random normal (seed 0). Their float32 magnitudes do tie: ``jax.random.normal``
yields a few million distinct float32 values near the 90% threshold, so at
16M and beyond several weights often share the threshold value. For each size it times, under
``jax.jit`` and after a compile/warm-up call, the minimum over repetitions:

* ``global``  jaxprune: ``global_topk(magnitude(p), s)``, scores inside the jit;
* ``topk``    jaxprune per-leaf ``topk(magnitude(p), s)`` on the same tree;
* ``argsort`` the sorting method (what JaxPruner does): concatenate ``|w|`` of
  all kernels, ``jnp.argsort``, threshold at ``k``, ``mask = |w| >= thr``;
* ``floor``   one compare-and-count pass, ``sum(jnp.sum(|w| > t))``;
* ``packed``  the same pass with ``jaxprune.select.count_true`` (the fastest
  one-pass count we know on CPU).

The cheap methods are timed round-robin (one call of each per repetition),
so that load from other processes hits them alike. It checks that
``global`` keeps exactly ``round(n * (1 - s))`` kernel weights, that ``topk``
keeps exactly ``round(d * d * (1 - s))`` per kernel, and that ``global``
equals the argsort mask where argsort ran (up to ties at the threshold, which
argsort keeps all of and jaxprune breaks by position: see
``compare_with_argsort``). It also counts the search passes
``global`` makes (``count_true`` calls, seen through ``jax.debug.callback`` in
a separate, untimed trace); with ``--breakdown`` it also times the pieces of
``global`` (key materialisation, that many count passes, the final masks).

Run:
  python benchmarks/bench_select.py                  # the shape suite (shape_sets.py)
  python benchmarks/bench_select.py --quick          # smoke test: the suite scaled down
  python benchmarks/bench_select.py --sets no-32 --baseline /tmp/old_select.py  # side by side
  python benchmarks/bench_select.py --sizes 1M,4M,16M,64M     # the old square-kernel sweep
  python benchmarks/bench_select.py --sizes 1M,4M --reps 5 --json out.json
  python benchmarks/bench_select.py --sizes 16M --breakdown
  python benchmarks/bench_select.py --billion --reps 3          # 2**30 weights: time, peak RSS
  python benchmarks/bench_select.py --billion --billion-d 4096  # the same at 64M, quickly
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
import jaxprune.core.select as jp_select

N_LAYERS = 4
_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    """``"16M"`` -> 16 * 2**20; plain integers are taken as they are."""
    t = text.strip().upper()
    if t and t[-1] in _SUFFIX:
        return int(float(t[:-1]) * _SUFFIX[t[-1]])
    return int(t)


def size_label(size: int) -> str:
    for suf, mult in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if size >= mult and size % mult == 0:
            return f"{size // mult}{suf}"
    return str(size)


def source_id() -> str:
    """Which jaxprune was measured: its path, git commit (if any), and a hash
    of select.py + masks.py + scores.py (to match an export or a dirty tree)."""
    root = Path(jaxprune.__file__).resolve().parent
    h = hashlib.sha256()
    for name in ("select.py", "masks.py", "scores.py"):
        h.update((root / "core" / name).read_bytes())
    rev = "no git"
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
        rev = out + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{root} ({rev}; sources sha256 {h.hexdigest()[:12]})"


def make_params(d: int, seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(seed), 2 * N_LAYERS)
    params = {
        f"layer{i}": {
            "bias": jax.random.normal(keys[2 * i], (d,), jnp.float32),
            "kernel": jax.random.normal(keys[2 * i + 1], (d, d), jnp.float32),
        }
        for i in range(N_LAYERS)
    }
    return jax.block_until_ready(params)


def kernels(params: dict) -> list[jax.Array]:
    return [params[f"layer{i}"]["kernel"] for i in range(N_LAYERS)]


def make_fns(sparsity: float) -> dict:
    def jp_global(p):
        return jaxprune.masks.global_topk(jaxprune.scores.magnitude(p), sparsity)

    def jp_topk(p):
        return jaxprune.masks.topk(jaxprune.scores.magnitude(p), sparsity)

    def argsort(p):
        ws = kernels(p)
        flat = jnp.concatenate([jnp.abs(w).reshape(-1) for w in ws])
        n = flat.shape[0]
        k = int(np.round(n * (1.0 - sparsity)))
        order = jnp.argsort(flat)  # ascending
        thr = flat[order[n - k]]  # k-th largest
        return [jnp.abs(w) >= thr for w in ws]

    def floor(p, t):
        return sum(jnp.sum(jnp.abs(w) > t, dtype=jnp.int32) for w in kernels(p))

    def packed(p, t):
        return sum(jp_select.count_true(jnp.abs(w) > t) for w in kernels(p))

    return {
        "global": jax.jit(jp_global),
        "topk": jax.jit(jp_topk),
        "argsort": jax.jit(argsort),
        "floor": jax.jit(floor),
        "packed": jax.jit(packed),
        "_global_fn": jp_global,
    }


def time_once(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3


def count_passes(fn, params) -> list[tuple[str, int]]:
    """The counting passes made by one run of ``fn`` (an untimed trace).

    Returns ``(phase, count)`` per pass: ``"search"`` while the threshold key
    is searched, ``"tie"`` once the search has moved on to the position of
    the last kept tie; ``count`` is the group's count at that pass (the
    first group's, for a selection with several).
    """
    seen: list[tuple[str, int]] = []
    orig_step = jp_select._step

    def step(s, f_g, target, first_phase):
        jax.debug.callback(lambda ph, c: seen.append(("tie" if int(ph[0]) == 2 else "search",
                                                      int(c[0]))), s.phase, f_g)
        return orig_step(s, f_g, target, first_phase)

    jp_select._step = step
    try:
        # A new function object, so that jit traces afresh (its cache is
        # keyed on the function) and the callback is inside.
        out = jax.jit(lambda p: fn(p))(params)
        jax.block_until_ready(out)
        jax.effects_barrier()
    finally:
        jp_select._step = orig_step
    return seen


def _flat_index(shape) -> jax.Array:
    """Row-major position of every element (int32), from iotas."""
    idx = jnp.zeros(shape, jnp.int32)
    stride = 1
    for ax in range(len(shape) - 1, -1, -1):
        idx = idx + jax.lax.broadcasted_iota(jnp.int32, tuple(shape), ax) * stride
        stride *= shape[ax]
    return idx


def breakdown(params, t_search: int, t_tie: int, reps: int) -> dict:
    """Times the pieces global_topk is made of, round-robin with global_topk.

    Pieces (all kernels, under jit): materialising the uint32 keys of |w|;
    ``t_search`` count passes ``count_true(key >= g)`` in a ``while_loop``;
    ``t_tie`` tie passes ``count_true((key == t) & (position < p))``; the final
    masks ``(key > t) | ((key == t) & (position < p))``; and the packed floor.
    """
    ws = kernels(params)
    keys = jax.block_until_ready(
        jax.jit(lambda ws: [jp_select.sortable_key(jnp.abs(w)) for w in ws])(ws))
    g = jnp.uint32(0xBFD00000)  # |w| ~ 1.6: near the threshold at sparsity 0.9

    def search(ks, g, n):
        def body(s):
            i, acc = s
            gi = g + i.astype(jnp.uint32)
            return i + 1, acc + sum(jp_select.count_true(k >= gi) for k in ks)
        return jax.lax.while_loop(lambda s: s[0] < n, body, (0, jnp.int32(0)))[1]

    def ties(ks, g, n):
        def body(s):
            i, acc = s
            c = sum(jp_select.count_true((k == g) & (_flat_index(k.shape) < 1000 * i)) for k in ks)
            return i + 1, acc + c
        return jax.lax.while_loop(lambda s: s[0] < n, body, (0, jnp.int32(0)))[1]

    pieces = {
        "global": (jax.jit(lambda p: jaxprune.masks.global_topk(
            jaxprune.scores.magnitude(p), 0.9)), (params,)),
        "keys": (jax.jit(lambda ws: [jp_select.sortable_key(jnp.abs(w)) for w in ws]), (ws,)),
        "search passes": (jax.jit(search), (keys, g, t_search)),
        "tie passes": (jax.jit(ties), (keys, g, t_tie)),
        "final masks": (jax.jit(lambda ks, g, p: [
            (k > g) | ((k == g) & (_flat_index(k.shape) < p)) for k in ks]), (keys, g, jnp.int32(5))),
        "packed floor": (jax.jit(lambda ws, t: sum(
            jp_select.count_true(jnp.abs(w) > t) for w in ws)), (ws, jnp.float32(1.6))),
    }
    if not t_tie:
        del pieces["tie passes"]
    for f, a in pieces.values():
        jax.block_until_ready(f(*a))
    names = list(pieces)
    times: dict[str, list[float]] = {nm: [] for nm in names}
    for r in range(reps):
        for j in range(len(names)):
            nm = names[(r + j) % len(names)]
            times[nm].append(time_once(pieces[nm][0], *pieces[nm][1]))
    return {nm: min(v) for nm, v in times.items()}


def compare_with_argsort(absw, g_masks, a_masks, k) -> dict:
    """Compares jaxprune's global mask with the argsort mask.

    float32 |w| of random normal weights can tie at the threshold (at 16M
    they do). Then ``|w| >= thr`` keeps more than ``k``, while jaxprune keeps
    exactly ``k``, the tied ones first in pytree order then by flat index.
    So: ``matches_argsort`` is True if the masks are equal, ``"ties"`` if they
    differ only on entries equal to the threshold and jaxprune's mask equals
    that position rule, False otherwise.
    """
    if all(np.array_equal(a, b) for a, b in zip(g_masks, a_masks)):
        return dict(matches_argsort=True, ties_at_threshold=None)
    # The argsort threshold is the smallest |w| its mask keeps.
    thr = min(float(a[m].min()) for a, m in zip(absw, a_masks) if m.any())
    above = [a > thr for a in absw]
    tied = [a == thr for a in absw]
    r = k - int(sum(np.count_nonzero(x) for x in above))  # ties to keep
    oracle, left = [], r
    for ab, ti in zip(above, tied):
        flat = ti.reshape(-1).copy()
        pos = np.flatnonzero(flat)
        flat[pos[left:]] = False
        left = max(0, left - pos.size)
        oracle.append(ab | flat.reshape(ti.shape))
    same_off_ties = all(
        np.array_equal(g[~ti], a[~ti]) for g, a, ti in zip(g_masks, a_masks, tied)
    )
    ok = same_off_ties and all(np.array_equal(g, o) for g, o in zip(g_masks, oracle))
    return dict(
        matches_argsort="ties" if ok else False,
        ties_at_threshold=int(sum(np.count_nonzero(x) for x in tied)),
        ties_kept=r,
    )


def bench_size(size: int, fns: dict, args: argparse.Namespace) -> dict:
    d = max(4, int(round(math.sqrt(size / N_LAYERS))))
    n = N_LAYERS * d * d
    s = args.sparsity
    k = int(np.round(n * (1.0 - s)))
    k_leaf = int(np.round(d * d * (1.0 - s)))
    params = make_params(d, args.seed)
    row: dict = dict(size=size, label=size_label(size), d=d, n=n, k=k, sparsity=s)

    # Warm up (compile) and check.
    m_global = jax.block_until_ready(fns["global"](params))
    g_kernels = [np.asarray(m) for m in kernels(m_global)]
    kept = int(sum(np.count_nonzero(m) for m in g_kernels))
    m_topk = jax.block_until_ready(fns["topk"](params))
    kept_leaf = [int(np.count_nonzero(np.asarray(m))) for m in kernels(m_topk)]
    absw = [np.abs(np.asarray(w)) for w in kernels(params)]
    # Floor threshold: the largest pruned |w| (any value would do; this one
    # makes the count near k). Both floors must agree with numpy.
    t_val = max(float(a[~m].max()) if (~m).any() else -1.0 for a, m in zip(absw, g_kernels))
    t = jnp.float32(t_val)
    floor_count = int(fns["floor"](params, t))
    packed_count = int(fns["packed"](params, t))
    np_count = int(sum(np.count_nonzero(a > np.float32(t_val)) for a in absw))
    # Ties at the threshold (the smallest kept |w|): > 1 means the tie-breaking
    # path of global_topk ran (unless all of them fit in k).
    thr = min(float(a[m].min()) for a, m in zip(absw, g_kernels) if m.any())
    n_tied = int(sum(np.count_nonzero(a == np.float32(thr)) for a in absw))
    n_ge = int(sum(np.count_nonzero(a >= np.float32(thr)) for a in absw))
    row.update(
        kept=kept,
        exact=kept == k,
        topk_kept=kept_leaf,
        topk_exact=all(c == k_leaf for c in kept_leaf),
        floor_count=floor_count,
        packed_count=packed_count,
        floor_ok=floor_count == packed_count == np_count,
        tied_at_threshold=n_tied,
        ties_broken=n_ge != k,
    )
    seen = count_passes(fns["_global_fn"], params)
    row.update(
        search_passes=sum(1 for ph, _ in seen if ph == "search"),
        tie_passes=sum(1 for ph, _ in seen if ph == "tie"),
        pass_counts=seen,
    )
    row["passes"] = f"{row['search_passes']}+{row['tie_passes']}"

    # Cheap methods: round-robin, rotating the order each repetition.
    names = ["global", "topk", "floor", "packed"]
    fargs = {"global": (params,), "topk": (params,), "floor": (params, t), "packed": (params, t)}
    times: dict[str, list[float]] = {nm: [] for nm in names}
    for r in range(args.reps):
        for j in range(len(names)):
            nm = names[(r + j) % len(names)]
            times[nm].append(time_once(fns[nm], *fargs[nm]))

    # Argsort: its own (fewer) repetitions at large sizes.
    if size > args.skip_argsort_above:
        row["argsort_skipped"] = True
        row["matches_argsort"] = None
    else:
        row["argsort_skipped"] = False
        m_arg = [np.asarray(m) for m in jax.block_until_ready(fns["argsort"](params))]
        row["argsort_kept"] = int(sum(np.count_nonzero(m) for m in m_arg))
        row.update(compare_with_argsort(absw, g_kernels, m_arg, k))
        a_reps = args.reps if size <= args.argsort_full_reps_upto else args.argsort_reps
        times["argsort"] = [time_once(fns["argsort"], params) for _ in range(max(1, a_reps))]

    ms = {nm: min(v) for nm, v in times.items()}
    row["ms"] = ms
    row["times_ms"] = times
    row["argsort_over_global"] = ms["argsort"] / ms["global"] if "argsort" in ms else None
    row["global_over_floor"] = ms["global"] / ms["floor"]
    row["global_over_packed"] = ms["global"] / ms["packed"]
    row["topk_over_global"] = ms["topk"] / ms["global"]
    if args.breakdown:
        row["breakdown_ms"] = breakdown(params, row["search_passes"], row["tie_passes"], args.reps)
    return row


HEADER = (
    f"{'size':>5} {'d':>5} {'global ms':>10} {'topk ms':>9} {'argsort ms':>11} "
    f"{'floor ms':>9} {'packed ms':>10} {'arg/glob':>9} {'glob/floor':>10} "
    f"{'glob/packed':>11} {'passes':>6} {'ties':>4} {'exact':>5} {'topk ex':>7} {'=argsort':>8}"
)


def fmt_row(r: dict) -> str:
    ms = r["ms"]

    def f(x, w, p=1):
        return f"{x:>{w}.{p}f}"

    arg = "skipped" if r["argsort_skipped"] else f(ms["argsort"], 11)
    ratio = "-" if r["argsort_over_global"] is None else f(r["argsort_over_global"], 9)
    match = {None: "-", True: "yes", "ties": "ties*", False: "NO"}[r["matches_argsort"]]
    return (
        f"{r['label']:>5} {r['d']:>5} {f(ms['global'], 10)} {f(ms['topk'], 9)} {arg:>11} "
        f"{f(ms['floor'], 9)} {f(ms['packed'], 10)} {ratio:>9} "
        f"{f(r['global_over_floor'], 10, 2)} {f(r['global_over_packed'], 11, 2)} "
        f"{r['passes']:>6} {r['tied_at_threshold'] if r['ties_broken'] else '-':>4} "
        f"{'yes' if r['exact'] else 'NO':>5} "
        f"{'yes' if r['topk_exact'] else 'NO':>7} {match:>8}"
    )


# --------------------------------------------------------------------------
# The shape suite: real-model shape sets (shape_sets.py), worst set printed


def make_set_params(shapes, seed: int = 0) -> dict:
    """Random normal float32 kernels of ``shapes`` (``k00``, ``k01``, ...)."""
    key = jax.random.key(seed)
    return jax.block_until_ready({f"k{i:02d}": jax.random.normal(jax.random.fold_in(key, i), s)
                                  for i, s in enumerate(shapes)})


def suite_fns(sparsity: float, baseline: str | None = None) -> dict:
    """The methods the suite times: ``global`` is the obvious call, every
    leaf selected; ``floor`` the one-pass compare-and-count; ``baseline``
    (with ``--baseline PATH``) the global selection of another version of
    ``select.py`` (e.g. ``git show main:jaxprune/select.py > /tmp/old.py``),
    on the same ``|w|``, for a side-by-side comparison in one process."""
    def every(path, x):
        return True

    def argsort(p):
        ws = jax.tree.leaves(p)
        flat = jnp.concatenate([jnp.abs(w).reshape(-1) for w in ws])
        k = int(np.round(flat.shape[0] * (1.0 - sparsity)))
        thr = flat[jnp.argsort(flat)[flat.shape[0] - k]]
        return [jnp.abs(w) >= thr for w in ws]

    fns = {
        "global": jax.jit(lambda p: jax.tree.leaves(jaxprune.masks.global_topk(
            jaxprune.scores.magnitude(p), sparsity, where=every))),
        "floor": jax.jit(lambda p, t: sum(jnp.sum(jnp.abs(x) > t) for x in jax.tree.leaves(p))),
        "packed": jax.jit(lambda p, t: sum(jp_select.count_true(jnp.abs(x) > t)
                                           for x in jax.tree.leaves(p))),
        "argsort": jax.jit(argsort),
    }
    if baseline:  # an older select.py, loaded as its own module
        spec = importlib.util.spec_from_file_location("baseline_select", baseline)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)

        def base(p):
            ws = jax.tree.leaves(p)
            k = old.keep_count(sum(w.size for w in ws), sparsity)
            return old.select_groups([jnp.abs(w) for w in ws], [0] * len(ws), [k])

        fns["baseline"] = jax.jit(base)
    return fns


def bench_set(name: str, shapes, fns: dict, args: argparse.Namespace) -> dict:
    """One shape set: exact counts, equality with argsort (up to ties), and
    the methods timed round-robin (argsort separately, fewer reps)."""
    params = make_set_params(shapes, args.seed)
    ws = jax.tree.leaves(params)
    n = sum(w.size for w in ws)
    k = int(np.round(n * (1.0 - args.sparsity)))
    t0 = time.perf_counter()
    g_masks = [np.asarray(m) for m in jax.block_until_ready(fns["global"](params))]
    compile_s = time.perf_counter() - t0
    absw = [np.abs(np.asarray(w)) for w in ws]
    kept = int(sum(np.count_nonzero(m) for m in g_masks))
    t_val = max(float(a[~m].max()) if (~m).any() else -1.0 for a, m in zip(absw, g_masks))
    t = jnp.float32(t_val)
    row = dict(set=name, n=n, k=k, leaves=len(ws), kept=kept, exact=kept == k,
               compile_s=compile_s, floor_count=int(fns["floor"](params, t)),
               np_count=int(sum(np.count_nonzero(a > np.float32(t_val)) for a in absw)))
    row["floor_ok"] = row["floor_count"] == row["np_count"]
    names = ["global", "floor", "packed"] + (["baseline"] if "baseline" in fns else [])
    fargs = {"global": (params,), "floor": (params, t), "packed": (params, t), "baseline": (params,)}
    if "baseline" in fns:
        b_kept = sum(int(np.count_nonzero(np.asarray(m))) for m in fns["baseline"](params))
        row["baseline_exact"] = b_kept == k
    times: dict[str, list[float]] = {nm: [] for nm in names}
    for r in range(args.reps):
        for j in range(len(names)):
            nm = names[(r + j) % len(names)]
            times[nm].append(time_once(fns[nm], *fargs[nm]))
    if args.no_argsort:
        row["matches_argsort"] = None
    else:
        a_masks = [np.asarray(m) for m in jax.block_until_ready(fns["argsort"](params))]
        row.update(compare_with_argsort(absw, g_masks, a_masks, k))
        times["argsort"] = [time_once(fns["argsort"], params) for _ in range(args.argsort_reps)]
    ms = {nm: min(v) for nm, v in times.items()}
    if "baseline" in ms:
        row["baseline_over_floor"] = ms["baseline"] / ms["floor"]
    row.update(ms=ms, times_ms=times, global_over_floor=ms["global"] / ms["floor"],
               argsort_over_global=ms["argsort"] / ms["global"] if "argsort" in ms else None)
    return row


SUITE_HEADER = (f"{'set':>16} {'weights':>8} {'leaves':>6} {'global ms':>10} {'floor ms':>9} "
                f"{'packed ms':>10} {'argsort ms':>11} {'glob/floor':>10} {'arg/glob':>9} "
                f"{'exact':>5} {'=argsort':>8}")


def fmt_set_row(r: dict) -> str:
    ms = r["ms"]
    arg = f"{ms['argsort']:>11.1f}" if "argsort" in ms else f"{'-':>11}"
    ratio = f"{r['argsort_over_global']:>9.0f}" if r["argsort_over_global"] else f"{'-':>9}"
    match = {None: "-", True: "yes", "ties": "ties*", False: "NO"}[r["matches_argsort"]]
    base = (f" {ms['baseline']:>11.1f} {r['baseline_over_floor']:>10.2f}"
            if "baseline" in ms else "")
    return (f"{r['set']:>16} {r['n'] / 1e6:>7.1f}M {r['leaves']:>6} {ms['global']:>10.1f} "
            f"{ms['floor']:>9.1f} {ms['packed']:>10.1f} {arg} {r['global_over_floor']:>10.2f} "
            f"{ratio} {'yes' if r['exact'] else 'NO':>5} {match:>8}{base}")


def run_suite(args: argparse.Namespace) -> list[dict]:
    """Every set of ``--sets`` (``--quick``: scaled down), then the worst."""
    import shape_sets

    names = [x for x in args.sets.split(",") if x] if args.sets else list(shape_sets.SETS)
    fns = suite_fns(args.sparsity, args.baseline)
    print(SUITE_HEADER + (f" {'baseline ms':>11} {'base/floor':>10}" if args.baseline else ""),
          flush=True)
    rows = []
    for name in names:
        shapes = shape_sets.SETS[name]
        if args.quick:
            shapes = shape_sets.quick(shapes)
        rows.append(bench_set(name, shapes, fns, args))
        print(fmt_set_row(rows[-1]), flush=True)
    worst = max(rows, key=lambda r: r["global_over_floor"])
    ok = all(r["exact"] and r["floor_ok"] and r["matches_argsort"] is not False for r in rows)
    print(f"\nworst set: {worst['set']}, global {worst['global_over_floor']:.2f}x the one-pass "
          f"floor (target <= 4: {'met' if worst['global_over_floor'] <= 4 else 'NOT met'})")
    arg = [r for r in rows if r["argsort_over_global"]]
    if arg:
        low = min(arg, key=lambda r: r["argsort_over_global"])
        print(f"least speed-up over argsort: {low['set']}, {low['argsort_over_global']:.0f}x "
              f"(target >= 50: {'met' if low['argsort_over_global'] >= 50 else 'NOT met'})")
    print(f"all counts exact, masks equal to argsort (up to ties) where it ran: "
          f"{'yes' if ok else 'NO'}")
    return rows


# --------------------------------------------------------------------------
# --billion: a billion parameters, time and peak resident memory


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rise(fn, *args):
    """Runs ``fn(*args)`` (compiled beforehand) and returns ``(out, seconds,
    rise)``: ``rise`` is how far the process's peak resident set (VmHWM) rose
    above its resident set at the start of the call, in bytes. The
    high-water mark is reset first (``5`` to ``/proc/self/clear_refs``), after
    ``malloc_trim`` has returned freed heap memory to the system (else the
    call could reuse pages that count as resident already)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _proc_kib("VmRSS")
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    dt = time.perf_counter() - t0
    return out, dt, (_proc_kib("VmHWM") - rss0) * 1024


def billion(args) -> dict:
    """``global_topk`` and ``topk`` over ``N_LAYERS`` float32 kernels of
    ``d x d`` (d = 16384: 2**30 weights, 4 GiB) at ``args.sparsity``.

    Variants: ``lazy`` is ``global_topk`` / ``topk`` given the magnitudes as
    :class:`select.LazyScores` leaves (``|w|`` computed inside every pass from
    the kernels, never stored); ``obvious`` is the README's call,
    ``global_topk(magnitude(params))`` under ``jit``, which the masks turn
    into the lazy form; ``arrays`` gives ``|w|`` as arrays the masks cannot
    recompute (behind an optimization barrier), a parameter-sized temporary
    (both with ``--billion-arrays``). Each variant
    is compiled first, then timed (min of ``--reps``); its peak resident set
    rise is measured on the first timed call. ``floor`` is one naive
    compare-and-count pass, ``packed`` the same with ``count_true``.
    """
    d = args.billion_d
    n = N_LAYERS * d * d
    s = args.sparsity
    k = int(np.round(n * (1.0 - s)))
    k_leaf = int(np.round(d * d * (1.0 - s)))
    rng = np.random.default_rng(args.seed)
    ws = []
    for _ in range(N_LAYERS):
        host = rng.standard_normal((d, d), dtype=np.float32)
        ws.append(jax.block_until_ready(jnp.array(host)))
        del host
    print(f"{N_LAYERS} kernels {d} x {d} float32 ({n * 4 / 2**30:.2f} GiB), sparsity {s}, "
          f"k = {k}; resident set now {_proc_kib('VmRSS') / 2**20:.2f} GiB", flush=True)

    def lazy(ws):
        return jax.tree.map(lambda w: jp_select.LazyScores(jnp.abs, (w,)), _tree(ws))

    variants = {
        "global/lazy": jax.jit(lambda ws: kernels(jaxprune.masks.global_topk(lazy(ws), s))),
        "topk/lazy": jax.jit(lambda ws: kernels(jaxprune.masks.topk(lazy(ws), s))),
    }
    if args.billion_arrays:
        variants["global/obvious"] = jax.jit(
            lambda ws: kernels(jaxprune.masks.global_topk(jaxprune.scores.magnitude(_tree(ws)), s)))
        variants["topk/obvious"] = jax.jit(
            lambda ws: kernels(jaxprune.masks.topk(jaxprune.scores.magnitude(_tree(ws)), s)))
        variants["global/arrays"] = jax.jit(
            lambda ws: kernels(jaxprune.masks.global_topk(jax.tree.map(_stored_abs, _tree(ws)), s)))
    t = jnp.float32(1.6448536)  # about the 90% quantile of |N(0, 1)|
    floors = {
        "floor": jax.jit(lambda ws, t: sum(jnp.sum(jnp.abs(w) > t, dtype=jnp.int32) for w in ws)),
        "packed": jax.jit(lambda ws, t: sum(jp_select.count_true(jnp.abs(w) > t) for w in ws)),
    }
    out: dict = dict(d=d, n=n, k=k, k_leaf=k_leaf, sparsity=s, ms={}, peak_rise_gib={},
                     temp_gib={}, exact={})
    for name, f in {**floors, **variants}.items():
        a = (ws, t) if name in floors else (ws,)
        compiled = f.lower(*a).compile()
        out["temp_gib"][name] = compiled.memory_analysis().temp_size_in_bytes / 2**30
        times = []
        for r in range(args.reps):
            res, dt, rise = peak_rise(compiled, *a)
            times.append(dt)
            if r == 0:
                out["peak_rise_gib"][name] = rise / 2**30
                if name in variants:
                    counts = [int(np.count_nonzero(np.asarray(m))) for m in res]
                    out["exact"][name] = (sum(counts) == k if name.startswith("global")
                                          else all(c == k_leaf for c in counts))
            del res
        out["ms"][name] = min(times) * 1e3
        extra = "" if name in floors else (
            f", exact count {'yes' if out['exact'][name] else 'NO'}")
        print(f"{name:>14}: {min(times):7.3f} s (min of {args.reps}), peak RSS rise "
              f"{out['peak_rise_gib'][name]:.2f} GiB, XLA temp {out['temp_gib'][name]:.3f} GiB"
              + extra, flush=True)
    masks_gib = n / 2**30
    budget = masks_gib + 0.1 * n * 4 / 2**30
    for name in variants:
        ratio = out["ms"][name] / out["ms"]["floor"]
        rise = out["peak_rise_gib"][name]
        print(f"{name}: {ratio:.2f}x one naive pass (target <= 4: {'met' if ratio <= 4 else 'NOT met'}); "
              f"peak rise {rise:.2f} GiB against masks {masks_gib:.2f} + 10% of the parameters "
              f"= {budget:.2f} GiB ({'met' if rise <= budget else 'NOT met'})")
    return out


def _stored_abs(w: jax.Array) -> jax.Array:
    """``|w|`` as scores the masks cannot recompute (a copy XLA must store)."""
    return jax.lax.optimization_barrier(jnp.abs(w))


def _tree(ws) -> dict:
    return {f"layer{i}": {"kernel": w} for i, w in enumerate(ws)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None,
                    help="the old sweep instead of the suite: comma-separated total sizes "
                         "of 4 square kernels (K/M/G = 2**10/20/30), e.g. 1M,4M,16M,64M")
    ap.add_argument("--sets", default=None,
                    help="suite: comma-separated set names of shape_sets.SETS (default all)")
    ap.add_argument("--quick", action="store_true", help="suite: scaled-down sets, 2 reps (smoke)")
    ap.add_argument("--no-argsort", action="store_true", help="suite: skip the argsort method")
    ap.add_argument("--baseline", metavar="SELECT_PY",
                    help="suite: also time the global selection of this older select.py")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions (>= 5 advised)")
    ap.add_argument("--argsort-reps", type=int, default=3,
                    help="argsort repetitions above --argsort-full-reps-upto")
    ap.add_argument("--argsort-full-reps-upto", type=parse_size, default=parse_size("4M"),
                    help="up to this size argsort gets --reps repetitions")
    ap.add_argument("--skip-argsort-above", type=parse_size, default=parse_size("16M"),
                    help="skip argsort above this size (it is slow)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the pieces of global_topk (keys, passes, masks)")
    ap.add_argument("--json", metavar="PATH", help="write all numbers here")
    ap.add_argument("--billion", action="store_true",
                    help="only the billion-parameter run: time and peak memory (see billion())")
    ap.add_argument("--billion-d", type=int, default=16384,
                    help="kernel side for --billion (4 kernels of d x d)")
    ap.add_argument("--billion-arrays", action="store_true",
                    help="--billion also runs global_topk/topk(magnitude(params)) and |w| as arrays")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.argsort_reps = min(args.reps, 2), 1

    dev = jax.devices()[0]
    info = dict(
        command="python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        platform=dev.platform,
        device_kind=dev.device_kind,
        n_devices=jax.device_count(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        python=platform.python_version(),
        jax=jax.__version__,
        jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        sparsity=args.sparsity,
        reps=args.reps,
        jaxprune=source_id(),
        loadavg_start=os.getloadavg(),
    )
    print(f"device: {dev.platform} / {dev.device_kind} ({jax.device_count()} device(s)), "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}, python {platform.python_version()}")
    print(f"jaxprune: {info['jaxprune']}")
    print("load average at start: " + ", ".join(f"{x:.2f}" for x in info["loadavg_start"]))
    if args.billion:
        info["billion"] = billion(args)
        info["loadavg_end"] = os.getloadavg()
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(info=info), fh, indent=1)
        return 0 if all(info["billion"]["exact"].values()) else 1
    if args.sizes is None:
        print(f"shape suite (shape_sets.py{', --quick' if args.quick else ''}), every leaf "
              f"selected, sparsity {args.sparsity}, min of {args.reps} reps (argsort "
              f"{args.argsort_reps}); times in ms")
        rows = run_suite(args)
        info["loadavg_end"] = os.getloadavg()
        print("load average at end: " + ", ".join(f"{x:.2f}" for x in info["loadavg_end"]))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(info=info, rows=rows), fh, indent=1)
        return 0 if all(r["exact"] and r["matches_argsort"] is not False for r in rows) else 1
    sizes = [parse_size(x) for x in args.sizes.split(",") if x.strip()]
    print(f"{N_LAYERS} kernels d x d + {N_LAYERS} biases, random normal, sparsity {args.sparsity}, "
          f"min of {args.reps} reps (argsort: {args.argsort_reps} above "
          f"{size_label(args.argsort_full_reps_upto)}, skipped above "
          f"{size_label(args.skip_argsort_above)}); times in ms")
    print(HEADER, flush=True)

    fns = make_fns(args.sparsity)
    rows = []
    for size in sizes:
        r = bench_size(size, fns, args)
        rows.append(r)
        print(fmt_row(r), flush=True)

    ok = all(r["exact"] and r["topk_exact"] and r["floor_ok"] and r["matches_argsort"] is not False
             for r in rows)
    print("\npasses = counting passes of global_topk over all kernels: threshold-key "
          "search + tie-position search (when the threshold key is tied across the cut). "
          "ties = weights tied at the threshold when some but not all are kept (- when "
          "none are split). Per pass, the count minus k (threshold passes: #{key >= g}; "
          "tie passes: #{key > g} + #{key == g before the guessed position}):")
    for r in rows:
        cs = [f"{c - r['k']:+d}" if ph == "search" else f"tie {c - r['k']:+d}"
              for ph, c in r["pass_counts"]]
        print(f"  {r['label']:>5}: {', '.join(cs)}")
    if args.breakdown:
        print("\nbreakdown of global_topk: its pieces timed round-robin with it (min of "
              f"{args.reps}), ms and (x packed floor):")
        for r in rows:
            b = r["breakdown_ms"]
            pk = b["packed floor"]
            parts = [nm for nm in b if nm not in ("global", "packed floor")]
            rest = b["global"] - sum(b[nm] for nm in parts)
            txt = ", ".join(
                f"{nm}{' x' + str(r['search_passes']) if nm == 'search passes' else ''}"
                f"{' x' + str(r['tie_passes']) if nm == 'tie passes' else ''} "
                f"{b[nm]:.1f} ({b[nm] / pk:.1f}x)" for nm in parts)
            print(f"  {r['label']:>5}: global_topk {b['global']:.1f} ({b['global'] / pk:.1f}x) = "
                  f"{txt}, rest {rest:.1f} ({rest / pk:.1f}x); packed floor {pk:.1f}")
        print("  (rest: the sample sort, tie-breaking other than count passes, loop "
              "overhead and noise; it can be negative)")
    for r in rows:
        if r["matches_argsort"] == "ties":
            print(f"* {r['label']}: {r['ties_at_threshold']} kernel weights tie at the argsort "
                  f"threshold; argsort (|w| >= thr) keeps {r['argsort_kept']} != k = {r['k']}; "
                  f"jaxprune keeps the first {r['ties_kept']} of them by position and equals "
                  "argsort everywhere else")
    print("\nall counts exact, masks equal to argsort (up to tie-breaking) where it ran: "
          f"{'yes' if ok else 'NO'}")
    for r in rows:
        if r["label"] == "16M":
            a = r["argsort_over_global"]
            print("targets at 16M: argsort/global >= 50: "
                  + ("not measured" if a is None else f"{a:.0f}x {'met' if a >= 50 else 'NOT met'}")
                  + f"; global/floor <= 4: {r['global_over_floor']:.2f}x "
                  + ("met" if r["global_over_floor"] <= 4 else "NOT met")
                  + f"; global/packed floor: {r['global_over_packed']:.2f}x "
                  + ("(<= 4)" if r["global_over_packed"] <= 4 else "(> 4)"))
    info["loadavg_end"] = os.getloadavg()
    print("load average at end: " + ", ".join(f"{x:.2f}" for x in info["loadavg_end"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(info=info, rows=rows), fh, indent=1)
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

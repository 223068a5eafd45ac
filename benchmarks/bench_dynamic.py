"""Training-step overhead of dynamic sparse training (RigL, SET) over dense Adam.

Model: the benchmark MLP 784-2048-2048-10 (about 5.8M parameters, float32),
a fixed batch of 256 random inputs and labels, softmax cross-entropy,
Adam(1e-3). Every variant is one ``jax.jit`` train step (grad +
``tx.update`` + ``optax.apply_updates``, params and optimizer state donated):

* ``dense``       ``optax.adam``;
* ``keep_masks``  ``optax.chain(adam, jp.keep_masks(m))``: a fixed 90% mask
  (the floor of any masked step: one ``where(m, u, -p)`` pass);
* ``set``         ``jp.set_training(adam, sparsity=0.9, update_every=100)``;
* ``rigl``        ``jp.rigl(adam, sparsity=0.9, update_every=100, end_step=10**9)``
  (ERK allocation for both, as in the papers).

Timing: one block = ``--block`` (default 100) steps of every variant,
interleaved step by step (one synced step of each variant in turn), so that
load from other processes hits all variants alike; each block holds exactly
one connection update for SET and RigL (the step counter is aligned so every
block contains one step with ``count % 100 == 0``). Reported: min and median
over ``--reps`` blocks of ms/step (the block mean, update step included),
and their ratios to dense (wall clock, and process CPU time), and the minor
page faults per step (a step whose XLA temp buffer is above glibc's 32 MiB
mmap threshold maps and faults it in afresh every step). Also: the
connection update alone
(``drop_and_grow`` on these params, jitted), to see what one update costs,
each step's XLA scratch buffer (``memory_analysis``), and SET's random
growth keys (``jp.dynamic.random_keys``) against ``jax.random.bits``.

Run:
  python benchmarks/bench_dynamic.py                 # --reps 3 (300 steps each)
  python benchmarks/bench_dynamic.py --reps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The benchmark MLP (784-2048-2048-10) and its loss, shared with bench_step.py.
from bench_step import (  # noqa: E402
    BATCH,
    SIZES,
    init_params,
    loss_fn,
    run_info,  # noqa: E402
)
from bench_step import Runner as StepRunner  # noqa: E402

import jaxprune as jp
from jaxprune.train.dynamic import drop_and_grow

SPARSITY = 0.9
UPDATE_EVERY = 100


def variants(params):
    adam = optax.adam(1e-3)
    masks = jp.allocation.random_masks(jax.random.key(1), params, SPARSITY, allocation="erk")
    return {
        "dense": adam,
        "keep_masks": optax.chain(adam, jp.keep_masks(jax.tree.map(jnp.copy, masks))),
        "set": jp.set_training(adam, sparsity=SPARSITY, update_every=UPDATE_EVERY),
        "rigl": jp.rigl(adam, sparsity=SPARSITY, update_every=UPDATE_EVERY, end_step=10**9),
    }


class Runner(StepRunner):
    """bench_step's runner (its jitted step, ``temp_mib`` and ``one``), with one
    step taken at construction: it compiles and moves the count to 1."""

    def __init__(self, tx, params, x, y):
        super().__init__(tx, params, x, y)
        self.one()


def interleaved_block(runners: dict, n: int) -> dict:
    """``n`` steps of every variant, interleaved step by step (A B C D A B ...),
    so that load changes hit all variants alike; returns per variant the
    (wall ms/step, CPU ms/step, page faults/step) of the block."""
    total = {name: np.zeros(3) for name in runners}
    for _ in range(n):
        for name, r in runners.items():
            total[name] += r.one()
    return {name: tuple(float(v) for v in t / n) for name, t in total.items()}


def random_growth_keys(reps: int, shape=(2048, 2048)) -> dict:
    """SET's random regrowth keys for one 2048x2048 kernel, consumed by one
    count (as a selection pass would): ``jax.random.bits`` (threefry) against
    ``jp.dynamic.random_keys`` (a keyed hash of the position). Returns, per
    method, the min ms over ``reps`` and XLA's scratch buffer in MiB."""
    mask = jax.random.uniform(jax.random.key(1), shape) < 0.1
    params = {"w": jnp.zeros(shape)}

    def threefry(key):
        return jax.random.bits(key, shape, jnp.uint32)

    def hashed(key):
        return jp.dynamic.random_keys(key, params)["w"]

    out = {}
    for name, gen in (("jax.random.bits", threefry), ("random_keys", hashed)):
        fn = jax.jit(lambda key, m, gen=gen: jp.select.count_true(
            jnp.where(m, jnp.uint32(0), gen(key)) >= jnp.uint32(0xF0000000)))
        key = jax.random.key(0)
        temp = fn.lower(key, mask).compile().memory_analysis().temp_size_in_bytes / 2**20
        jax.block_until_ready(fn(key, mask))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(key, mask))
            ts.append((time.perf_counter() - t0) * 1e3)
        out[name] = dict(min_ms=min(ts), temp_mib=temp)
        print(f"random growth keys, 2048x2048, {name}: min {min(ts):.1f} ms, scratch {temp:.1f} MiB")
    return out


def count_updates(state) -> int:
    found = optax.tree_utils.tree_get_all_with_path(state, "count")
    return int(found[0][1]) if found else -1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="timed blocks per variant")
    ap.add_argument("--block", type=int, default=UPDATE_EVERY, help="steps per block")
    ap.add_argument("--json", metavar="PATH", help="write all numbers here")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    info = run_info(reps=args.reps, block=args.block)
    print(f"device: {dev.platform} / {dev.device_kind}, {os.cpu_count()} CPUs, jax "
          f"{jax.__version__}, load average {os.getloadavg()[0]:.1f}")
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (BATCH, SIZES[0]))
    y = jax.random.randint(ky, (BATCH,), 0, SIZES[-1])
    params = init_params(kp)
    runners = {name: Runner(tx, params, x, y) for name, tx in variants(params).items()}
    temp = {name: r.temp_mib() for name, r in runners.items()}
    print("XLA scratch buffer per step (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in temp.items()))
    rng = random_growth_keys(reps=5)
    times = {name: [] for name in runners}  # wall ms/step per block
    cpu = {name: [] for name in runners}  # CPU ms/step per block
    faults = {name: [] for name in runners}  # page faults/step per block
    for rep in range(args.reps):
        for name, (ms, cms, flt) in interleaved_block(runners, args.block).items():
            times[name].append(ms)
            cpu[name].append(cms)
            faults[name].append(flt)
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in times.items()))
    # Every SET/RigL runner went through count % 100 == 0 once per block.
    for name in ("set", "rigl"):
        assert count_updates(runners[name].carry[1]) == 1 + args.block * args.reps

    # The connection update alone (drop by |w|, grow by |g|), jitted.
    masks = jp.allocation.random_masks(jax.random.key(1), params, SPARSITY, allocation="erk")
    grads = jax.grad(loss_fn)(params, x, y)
    upd = jax.jit(lambda p, m, g: drop_and_grow(p, m, jax.tree.map(jnp.abs, g), 0.3))
    jax.block_until_ready(upd(params, masks, grads))
    upd_ms = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(upd(params, masks, grads))
        upd_ms.append((time.perf_counter() - t0) * 1e3)

    d_min, d_med = min(times["dense"]), float(np.median(times["dense"]))
    c_med = float(np.median(cpu["dense"]))
    rows = {}
    print("\n| variant | wall ms/step min | median | x dense (min) | x dense (median) "
          "| x dense (CPU, median) | page faults/step |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        mn, md = min(ts), float(np.median(ts))
        cr = float(np.median(cpu[name])) / c_med
        fl = float(np.median(faults[name]))
        rows[name] = dict(min_ms=mn, median_ms=md, ratio_min=mn / d_min, ratio_median=md / d_med,
                          cpu_ratio_median=cr, page_faults_median=fl, blocks=ts,
                          cpu_blocks=cpu[name])
        print(f"| {name} | {mn:.1f} | {md:.1f} | {mn / d_min:.3f} | {md / d_med:.3f} | {cr:.3f} "
              f"| {fl:.0f} |")
    print(f"\nconnection update alone (drop_and_grow, 3 kernels): min {min(upd_ms):.1f} ms")
    info["loadavg_end"] = os.getloadavg()[0]
    out = dict(info=info, rows=rows, update_alone_ms=upd_ms, temp_mib=temp, random_keys=rng)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

"""Cost of one counting pass that counts K guesses at once (a k-ary search
step) against one that counts one, on 4 kernels of 4096x250 (4M weights).

Each pass reads the weights once and, per guess, tests the selection
predicate and packs and counts it (as ``select.py``'s passes do): ``K``
guesses of the threshold key alone (phase 1 of the search), and ``Kp`` with
the tie-position test too. ``floor`` is the one-pass ``sum(|w| > t)`` of the
issue-18 check. If a pass were memory-bound, K guesses would cost about one;
on this CPU they cost about K/2 to K (compute-bound), so fewer passes of a
k-ary search do not pay for their cost.

Run:
  python benchmarks/bench_kary.py --reps 15
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.core import select as sel


def _packed_count(pred):
    bits = pred.reshape(-1, 32, 32).astype(jnp.uint32) << lax.broadcasted_iota(jnp.uint32, (1, 1, 32), 2)
    return jnp.sum(lax.population_count(jnp.sum(bits, axis=2, dtype=jnp.uint32)), dtype=jnp.int32)


def k_pass(k: int, ties: bool):
    def f(ws, cuts):
        out = []
        for w in ws:
            view = w.reshape(-1, 1024)
            v = sel._bits_of(jnp.abs, [view])
            pos = (lax.broadcasted_iota(jnp.int32, view.shape, 0) * 1024
                   + lax.broadcasted_iota(jnp.int32, view.shape, 1))
            for j in range(k):
                lo, width, e, we, p = cuts[j]
                pred = (v - lo) < width
                if ties:
                    pred = pred | (((v - e) < we) & (pos < p.astype(jnp.int32)))
                out.append(_packed_count(pred))
        return jnp.stack(out)
    return jax.jit(f)


def best_ms(f, *args, reps: int) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--ks", default="1,2,3,4,7")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((4096, 250)).astype(np.float32)) for _ in range(4)]
    cuts = jnp.asarray(np.array([[0xBFC00000 + j, 0x3FC00000, 0xBFC00000 + j, 1, 1_000_000]
                                 for j in range(8)], np.uint32))
    floor = jax.jit(lambda ws: sum(jnp.sum(jnp.abs(w) > 1.6) for w in ws))
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    out = {"floor": best_ms(floor, ws, reps=args.reps)}
    for k in (int(x) for x in args.ks.split(",")):
        for ties in (False, True):
            out[f"K{k}{'p' if ties else ''}"] = best_ms(k_pass(k, ties), ws, cuts, reps=args.reps)
    print(" ".join(f"{name} {ms:.2f} ms" for name, ms in out.items()))
    return out


if __name__ == "__main__":
    main()

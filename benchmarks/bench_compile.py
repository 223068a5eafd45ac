"""Compile time of a jitted mask selection as the number of leaves grows.

XLA compiles one fused kernel per leaf for each piece of the selection (the
counting pass in the search loop, the sample, the tie rows, the final mask),
so compile time grows with the leaf count. Leaves of identical shape share
kernels, so a model with many equal layers compiles faster than one whose
every leaf has its own shape. This prints, for ``global_topk`` and per-leaf
``topk`` of magnitude scores over ``n`` kernels of shape ``(64, 64 + j)``
(``j`` = leaf index for distinct shapes, ``j = 0`` for identical shapes), the
trace-and-lower time, the XLA compile time and the number of fusions in the
compiled program. Each configuration runs in a fresh trace (no cache hit).

Run:
  python benchmarks/bench_compile.py                  # 25, 50, 100 leaves
  python benchmarks/bench_compile.py --leaves 10,200 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp

import jaxprune as jp


def measure(n: int, distinct: bool, kind: str) -> dict:
    params = {f"l{j}": jnp.ones((64, 64 + (j if distinct else 0))) for j in range(n)}
    fn = {"global": jp.masks.global_topk, "topk": jp.masks.topk}[kind]
    f = jax.jit(lambda p: fn(jp.scores.magnitude(p), 0.9))
    t0 = time.perf_counter()
    lowered = f.lower(params)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return dict(leaves=n, shapes="distinct" if distinct else "identical", kind=kind,
                lower_s=t1 - t0, compile_s=t2 - t1,
                fusions=compiled.as_text().count("fusion("))


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leaves", default="25,50,100", help="comma-separated leaf counts")
    ap.add_argument("--json", metavar="PATH", help="write the rows here")
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| leaves | shapes | selection | lower s | compile s | fusions |")
    print("|---:|---|---|---:|---:|---:|")
    rows = []
    for n in (int(v) for v in args.leaves.split(",")):
        for distinct in (True, False):
            for kind in ("global", "topk"):
                r = measure(n, distinct, kind)
                rows.append(r)
                print(f"| {n} | {r['shapes']} | {kind} | {r['lower_s']:.1f} | {r['compile_s']:.1f} "
                      f"| {r['fusions']} |", flush=True)
    if args.json:
        info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    jax=jax.__version__, cpus=os.cpu_count())
        with open(args.json, "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""The issue-18 pre-stop check: a global magnitude mask against the one-pass
floor on 4 kernels of each shape, optionally side by side with another
version of ``select.py`` (round-robin in the same process, masks compared).

``global`` = ``global_topk(scores.magnitude(p), 0.9, where=lambda path, x: True)``,
``floor`` = ``sum(jnp.sum(jnp.abs(x) > 1.6))``, both jitted, best of ``--reps``.

Run:
  git show 875b013:jaxprune/core/select.py > /tmp/old_select.py
  python benchmarks/bench_check.py --reps 25 --baseline /tmp/old_select.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from jaxprune.core import masks as _masks

EVERY = lambda path, x: True  # noqa: E731


def _selection(mod):
    def f(p):
        saved, _masks._select = _masks._select, mod
        try:
            return jp.masks.global_topk(jp.scores.magnitude(p), 0.9, where=EVERY)
        finally:
            _masks._select = saved
    return jax.jit(f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1000x1000,1024x1024,1023x1025,4096x250")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--baseline", metavar="SELECT_PY", help="another select.py, timed alongside")
    args = ap.parse_args(argv)
    fns = {"global": _selection(_masks._select)}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_select", args.baseline)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fns["baseline"] = _selection(mod)
    fns["floor"] = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x) > 1.6) for x in jax.tree.leaves(p)))
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"best of {args.reps}")
    rng = np.random.default_rng(0)
    for name in args.shapes.split(","):
        shape = tuple(int(d) for d in name.split("x"))
        p = {f"k{i}": jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for i in range(4)}
        for f in fns.values():
            jax.block_until_ready(f(p))
        same = ""
        if "baseline" in fns:
            a, b = jax.tree.leaves(fns["global"](p)), jax.tree.leaves(fns["baseline"](p))
            same = f", masks equal {all(bool((x == y).all()) for x, y in zip(a, b))}"
        ts = {k: [] for k in fns}
        for _ in range(args.reps):
            for k, f in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(f(p))
                ts[k].append(time.perf_counter() - t)
        ms = {k: min(v) * 1e3 for k, v in ts.items()}
        base = (f", baseline {ms['baseline']:.2f} ms ({ms['baseline'] / ms['floor']:.2f}x)"
                if "baseline" in ms else "")
        print(f"{name} x4: global {ms['global']:.2f} ms ({ms['global'] / ms['floor']:.2f}x floor)"
              f"{base}, floor {ms['floor']:.2f} ms{same}", flush=True)


if __name__ == "__main__":
    main()

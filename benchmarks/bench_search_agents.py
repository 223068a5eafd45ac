"""jp.search agents (DDPG as in AMC, and the evolution strategy) on a toy
whose best budget is known.

Four leaves of 200, 200, 400 and 400 weights; the metric is
``-sum_l c_l s_l^2`` with ``c = (4, 1, 2, 1)`` and ``s_l`` the leaf's
fraction of zeros. Under a parameter budget ``sum_l n_l s_l = S N`` the best
budget is ``s_l`` proportional to ``n_l / c_l`` (capped at
``max_sparsity``); uniform pruning scores ``-S^2 sum_l c_l``. Each agent runs
``iterations x population`` candidates per seed; printed: the best metric
found (mean +- std over seeds), the best-so-far after 16, 80, 160 and all
candidates, the mean of the last batch, and seconds per search (compile
included).

Run:
  python benchmarks/bench_search_agents.py --json docs/bench_search_agents.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

import jaxprune as jp

SHAPES = ((10, 20), (20, 10), (20, 20), (40, 10))
FRAGILITY = np.array([4.0, 1.0, 2.0, 1.0])


def toy():
    rng = np.random.default_rng(0)
    params = {f"l{i}": jnp.asarray(rng.uniform(0.5, 1.5, s), jnp.float32)
              for i, s in enumerate(SHAPES)}

    def metric(p):
        return -sum(c * jnp.mean(p[f"l{i}"] == 0) ** 2 for i, c in enumerate(FRAGILITY))

    return params, metric


def optimum(sparsity: float, cap: float) -> float:
    n = np.array([np.prod(s) for s in SHAPES], float)
    lo, hi = 0.0, 1e3
    for _ in range(100):
        lam = (lo + hi) / 2
        s = np.minimum(lam * n / FRAGILITY / n.sum(), cap)
        lo, hi = (lam, hi) if (s * n).sum() < sparsity * n.sum() else (lo, lam)
    return float(-(FRAGILITY * s ** 2).sum())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    cfg = ap.parse_args(argv)
    params, metric = toy()
    out = {"config": vars(cfg), "optimum": optimum(cfg.sparsity, 0.8),
           "uniform": float(-(FRAGILITY * cfg.sparsity ** 2).sum())}
    marks = [i for i in (0, 4, 9, cfg.iterations - 1) if i < cfg.iterations]
    for agent in ("es", "ddpg"):
        rows = []
        for seed in range(cfg.seeds):
            t0 = time.perf_counter()
            r = jp.search(metric, params, cfg.sparsity, granularity="leaf", cost="params",
                          higher_is_better=True, agent=agent, iterations=cfg.iterations, population=cfg.population,
                          seed=seed)
            rows.append({"best": r.metric, "curve": r.curve.tolist(), "mean": r.mean.tolist(),
                         "seconds": time.perf_counter() - t0})
        best = np.array([r["best"] for r in rows])
        at = np.array([[r["curve"][i] for i in marks] for r in rows]).mean(0)
        out[agent] = rows
        print(f"{agent:>4}: best {best.mean():.4f} +- {best.std():.4f}; best so far after "
              + ", ".join(f"{(i + 1) * cfg.population}: {a:.4f}" for i, a in zip(marks, at))
              + f"; last batch mean {np.mean([r['mean'][-1] for r in rows]):.4f}; "
              f"{np.mean([r['seconds'] for r in rows]):.1f} s per search")
    print(f"optimum {out['optimum']:.4f}, uniform {out['uniform']:.4f}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

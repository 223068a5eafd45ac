"""SparseGPT's captures: cached activations against one pass per point.

On the byte-level decoder of ``examples/prune_lm.py`` (its model, data and
checkpoints; trained here for ``--train-steps`` steps, or loaded), prints in
one process:

* the capture cost in full-forward equivalents (``jp.oneshot.capture_passes``:
  MACs of the dots each capture runs after dead-code elimination, over the
  MACs of one forward pass; the statistics themselves are not counted), for
  the cached path and the general one;
* for each setting, ``jp.oneshot.sparsegpt`` with ``cached=True`` and
  ``cached=False`` side by side: validation perplexity, whether the masks are
  equal, the largest weight difference, and the wall time of a second
  (warm) call of each.

Run:
  python benchmarks/bench_sparsegpt_capture.py --train-steps 150
  python benchmarks/bench_sparsegpt_capture.py --quick
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import prune_lm as ex  # noqa: E402

import jaxprune as jp  # noqa: E402


def model(args):
    cfg = ex.QUICK if args.quick else ex.FULL
    train, train_hash = ex.read_files(ex.TRAIN_FILES[: cfg.train_files])
    val, val_hash = ex.read_files(ex.VAL_FILES)
    corpus = ex.digest({**train_hash, **val_hash})
    ckpt = ex.checkpoint_path(pathlib.Path(args.results), cfg, args.train_steps, 0, corpus)
    if ckpt.exists():
        params, _ = ex.load(ckpt, cfg)
    else:
        params, info = ex.train(cfg, train, args.train_steps, 0, False)
        ex.save(ckpt, params, info)
    rng = np.random.default_rng(1)
    calib = [jnp.asarray(b) for b in np.split(ex.windows(train, cfg.calib, cfg.ctx, rng),
                                               cfg.calib // cfg.calib_batch)]
    return cfg, params, calib, ex.windows(val, cfg.val, cfg.ctx + 1)


def timed(fn):
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--results", default=os.path.join("results", "prune_lm"))
    args = ap.parse_args(argv)
    cfg, params, calib, val = model(args)
    apply = ex.make_apply(cfg)
    ex.capture_cost(apply, params, calib)
    print(f"dense ppl {ex.evaluate(apply, params, val):.4f}")
    for setting in ("50%", "2:4"):
        sparsity, n, m, _ = ex.SETTINGS[setting]
        row = {}
        for cached in (True, False):
            (new, masks), secs = timed(lambda c=cached: jp.oneshot.sparsegpt(
                apply, params, calib, sparsity, n=n, m=m, blocksize=cfg.blocksize,
                where=ex.WHERE, cached=c))
            row[cached] = (new, masks, secs, ex.evaluate(apply, new, val))
        (a, ma, ta, pa), (b, mb, tb, pb) = row[True], row[False]
        same = all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(ma),
                                                                 jax.tree.leaves(mb)))
        diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                                  jax.tree.leaves(b)))
        print(f"{setting:>4}: ppl cached {pa:.4f}, general {pb:.4f}; masks equal {same}; "
              f"max weight difference {diff:.2e}; warm call cached {ta:.2f} s, general "
              f"{tb:.2f} s")


if __name__ == "__main__":
    main()

"""Training-step overhead of ``jp.prune`` over a dense Adam step.

Model: an MLP 784-2048-2048-10 (about 5.8M parameters, float32), a fixed
batch of 256 random inputs and labels, softmax cross-entropy, Adam(1e-3).
Every variant is one ``jax.jit`` train step (grad + ``tx.update`` +
``optax.apply_updates``, params and optimizer state donated):

* ``dense``          ``optax.adam``;
* ``a/uniform``, ``a/global``  ``jp.prune(adam, sparsity=0.9,
  update_every=10**9, allocation=...)``, timed on steps that do not update
  the masks (only step 0 does, and it runs in the warm-up);
* ``b/uniform``, ``b/global``  the same with ``update_every=10``; each timed
  block holds 10 steps, one of them a mask update, so the figure is the
  average over update and non-update steps;
* ``b/argsort``      the sorting method, for comparison: a prune-like
  transform that every 10 steps recomputes one global magnitude mask with
  ``concatenate`` + ``argsort`` (threshold at the k-th largest |w|), and
  otherwise masks exactly like ``jp.prune``.

With ``--breakdown`` it also times pieces of the pruned step, to see where
the overhead goes: ``fixed-mask`` (``optax.chain(adam, jp.keep_masks(m))``:
one ``where(m, u, -p)`` pass, no gradient masking, no ``lax.cond``),
``grad+upd mask`` (gradient masking + ``where(m, u, -p)`` with fixed masks,
no ``lax.cond``), ``trivial cond`` (the same masks held in the state behind a
``lax.cond`` whose other branch is cheap) and the mask update alone (``jp.prune``'s selection on the
same params, outside the step).

Timing: every step is synced with ``block_until_ready`` and timed on its
own, in wall-clock time and in process CPU time (all threads; robust to
other processes taking the CPU). The variants are run round-robin, one step
of each at a time, so that load from other processes hits them alike; one
repetition is 10 steps of each variant (a "block"). Reported are the min and
median over ``--reps`` blocks of ms/step (the block's mean), their ratios to
dense, and for case b the mask-update step against the nine other steps of
its block.

Also printed: each step's XLA scratch buffer (``memory_analysis()``).
The ``faults/step`` column counts minor page faults per step
(``getrusage``). On Linux/glibc, XLA:CPU allocates each execution's temp
buffer with ``malloc``; a buffer over glibc's largest mmap threshold (32 MiB)
is a fresh ``mmap`` every step and its touched pages fault again each time.
The lax.cond branch that recomputes masks makes the step's temp buffer larger
(60 MiB against 24 MiB here), so the pruned steps pay those faults and the
dense step does not. Setting ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` (or preloading tcmalloc/jemalloc) keeps the
buffer on the heap and removes that cost; run it both ways to see it.

With ``--model resnet18`` or ``--model resnet50`` the model is the Linen
ResNet of ``bench_compile.py`` (Flax's ImageNet example: full width,
BatchNorm, 32x32 inputs, batch 32, 1000 classes; the step also updates the
batch statistics) and only case a (no mask update in the timed steps) and
the breakdown variants are run: the convolutional counterpart of the MLP's
1.0x.

Run:
  python benchmarks/bench_step.py                      # --reps 20
  python benchmarks/bench_step.py --model resnet50 --reps 12 --breakdown
  python benchmarks/bench_step.py --reps 40 --breakdown --json out.json
  python benchmarks/bench_step.py --only a/uniform,a/global --reps 30
  MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \
      python benchmarks/bench_step.py --breakdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxprune as jp
from jaxprune.train import base as jpt

SIZES = (784, 2048, 2048, 10)
BATCH = 256
SPARSITY = 0.9
BLOCK = 10  # steps per timed block (= update_every in case b)


def init_params(key):
    params = {}
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {
            "kernel": jax.random.normal(sub, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
            "bias": jnp.zeros(n_out),
        }
    return params


def loss_fn(params, x, y):
    for i in range(len(SIZES) - 1):
        layer = params[f"layer{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(SIZES) - 2:
            x = jax.nn.relu(x)
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


class ArgsortState(NamedTuple):
    count: jax.Array
    masks: Any
    inner_state: Any


def argsort_prune(inner, sparsity, update_every):
    """The sorting method: a global magnitude mask from concatenate + argsort,
    recomputed every ``update_every`` steps; masking as in ``jp.prune``."""

    def global_mask(params):
        flat = jnp.concatenate([jnp.abs(p).ravel() for p in jax.tree.leaves(params) if p.ndim >= 2])
        n = flat.size
        k = round(n * (1 - sparsity))
        thr = flat[jnp.argsort(flat)[n - k]]  # the k-th largest |w|
        return jax.tree.map(lambda p: jnp.abs(p) >= thr if p.ndim >= 2 else jnp.ones((), bool),
                            params)

    def init_fn(params):
        return ArgsortState(jnp.zeros((), jnp.int32), jpt.initial_masks(params, None),
                            inner.init(params))

    def update_fn(updates, state, params=None):
        masks = lax.cond(state.count % update_every == 0, global_mask,
                         lambda p: state.masks, params)
        g = jpt.mask_grads(updates, masks)
        u, inner_state = inner.update(g, state.inner_state, params)
        u = jpt.apply_mask_to_updates(u, params, masks)
        return u, ArgsortState(state.count + 1, masks, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def masked_only(inner, masks):
    """Gradient masking + ``where(m, u, -p)`` with fixed masks (no cond)."""

    def update_fn(updates, state, params=None):
        g = jpt.mask_grads(updates, masks)
        u, state = inner.update(g, state, params)
        return jpt.apply_mask_to_updates(u, params, masks), state

    return optax.GradientTransformation(inner.init, update_fn)


class CondState(NamedTuple):
    count: jax.Array
    masks: Any
    inner_state: Any


def cond_trivial(inner, masks):
    """Masks held in the state behind a ``lax.cond`` that never fires and whose
    other branch is cheap (``~masks``): the cost of the cond mechanism alone."""

    def init_fn(params):
        return CondState(jnp.zeros((), jnp.int32), masks, inner.init(params))

    def update_fn(updates, state, params=None):
        m = lax.cond(state.count % 10**9 == 0, lambda m: jax.tree.map(jnp.logical_not, m),
                     lambda m: m, state.masks)
        g = jpt.mask_grads(updates, m)
        u, inner_state = inner.update(g, state.inner_state, params)
        u = jpt.apply_mask_to_updates(u, params, m)
        return u, CondState(state.count + 1, m, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def make_step(tx):
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def make_variants(params, breakdown, cases=("a", "b")):
    adam = optax.adam(1e-3)
    txs = {"dense": adam}
    for case, every in (("a", 10**9), ("b", BLOCK)):
        if case not in cases:
            continue
        for alloc in ("uniform", "global"):
            txs[f"{case}/{alloc}"] = jp.prune(adam, sparsity=SPARSITY, update_every=every,
                                              allocation=alloc)
    if "b" in cases:
        txs["b/argsort"] = argsort_prune(adam, SPARSITY, BLOCK)
    else:  # the lazy-score sketch of bench_compile.py: no score buffers in the cond branch
        from bench_compile import lazy_prune

        for alloc in ("uniform", "global"):
            txs[f"a/lazy-{alloc}"] = lazy_prune(adam, SPARSITY, 10**9, alloc)
    if breakdown:
        masks = jp.masks.topk(jp.scores.magnitude(params), SPARSITY)
        # Own copies: keep_masks puts its masks in the (donated) optimizer state.
        txs["fixed-mask"] = optax.chain(adam, jp.keep_masks(jax.tree.map(jnp.copy, masks)))
        txs["grad+upd mask"] = masked_only(adam, jax.tree.map(jnp.copy, masks))
        # Starts at count 1 (past the cond's firing step), masks not flipped.
        txs["trivial cond"] = cond_trivial(adam, jax.tree.map(jnp.logical_not, masks))
    return txs


class Runner:
    """One variant: its jitted step and its own (params, opt_state), or for a
    ResNet (params, batch_stats, opt_state)."""

    def __init__(self, tx, params, x, y, model=None, batch_stats=None):
        self.x, self.y = x, y
        params = jax.tree.map(jnp.copy, params)
        if model is None:
            self.step = make_step(tx)
            self.carry = (params, tx.init(params))
        else:
            from bench_compile import resnet_step

            step = resnet_step(model, tx)
            self.step = jax.jit(lambda p, b, o, x, y: step(p, b, o, x, y)[:3],
                                donate_argnums=(0, 1, 2))
            self.carry = (params, jax.tree.map(jnp.copy, batch_stats), tx.init(params))

    def temp_mib(self) -> float:
        """XLA's scratch buffer for one step (``memory_analysis``), in MiB."""
        compiled = self.step.lower(*self.carry, self.x, self.y).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    def one(self) -> tuple[float, float, int]:
        """Runs one step (synced); returns its wall and process CPU time in ms
        and the minor page faults it caused."""
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0, c0 = time.perf_counter(), time.process_time()
        self.carry = jax.block_until_ready(self.step(*self.carry, self.x, self.y))
        t1, c1 = time.perf_counter(), time.process_time()
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        return (t1 - t0) * 1e3, (c1 - c0) * 1e3, f1 - f0


def time_mask_update(params, allocation, reps):
    """The mask update of jp.prune alone (scores + selection), jitted: a list of
    (wall, CPU) ms."""
    fn = jax.jit(lambda p: jp.allocation.masks(jp.scores.magnitude(p), SPARSITY,
                                               allocation=allocation,
                                               params=p))
    jax.block_until_ready(fn(params))
    ts = []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(params))
        ts.append(((time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3))
    return ts


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with local changes), if in a git repo."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def run_info(**extra) -> dict:
    """Where and when a benchmark ran: date, device, versions, load, malloc
    environment and git commit, plus ``extra``."""
    dev = jax.devices()[0]
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        platform=dev.platform, device_kind=dev.device_kind, cpus=os.cpu_count(),
        jax=jax.__version__, python=platform.python_version(),
        loadavg_start=os.getloadavg()[0],
        malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        commit=git_commit(), **extra,
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="timed blocks of 10 steps per variant")
    ap.add_argument("--breakdown", action="store_true", help="also time pieces of the step")
    ap.add_argument("--only", metavar="NAMES",
                    help="comma-separated variants to run (dense is always run)")
    ap.add_argument("--json", metavar="PATH", help="write all numbers here")
    ap.add_argument("--model", default="mlp", choices=("mlp", "resnet18", "resnet50"),
                    help="the MLP (default) or a Linen ResNet of bench_compile.py (case a only)")
    args = ap.parse_args(argv)

    dev = jax.devices()[0]
    info = run_info(reps=args.reps, model=args.model)
    print(f"device: {dev.platform} / {dev.device_kind}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__}, load average {os.getloadavg()[0]:.1f}, "
          f"malloc env {info['malloc_env'] or 'default'}")

    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    model = batch_stats = None
    if args.model == "mlp":
        x = jax.random.normal(kx, (BATCH, SIZES[0]))
        y = jax.random.randint(ky, (BATCH,), 0, SIZES[-1])
        params = init_params(kp)
        desc = f"MLP {'-'.join(map(str, SIZES))}"
    else:
        from bench_compile import resnet_shapes

        model, _, _, xs, ys = resnet_shapes(int(args.model[len("resnet"):]))
        x = jax.random.normal(kx, xs.shape)
        y = jax.random.randint(ky, ys.shape, 0, 1000)
        variables = jax.jit(lambda k: model.init(k, x, train=False))(kp)
        params, batch_stats = variables["params"], variables["batch_stats"]
        desc = f"{args.model} ({len(jax.tree.leaves(params))} leaves)"
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(f"{desc} ({n_params / 1e6:.2f}M params), batch {x.shape[0]}, "
          f"adam, sparsity {SPARSITY}, {args.reps} blocks of {BLOCK} steps per variant")

    cases = ("a", "b") if model is None else ("a",)
    variants = make_variants(params, args.breakdown or bool(args.only), cases)
    if args.only:
        wanted = {"dense", *args.only.split(",")}
        unknown = wanted - set(variants)
        if unknown:
            ap.error(f"--only: unknown variants {sorted(unknown)}; known: {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in wanted}
    runners = {}
    for name, tx in variants.items():
        runners[name] = r = Runner(tx, params, x, y, model, batch_stats)
        for _ in range(BLOCK):  # compile; step 0 (a mask update in the pruned variants) + 9
            r.one()
    temp = {name: r.temp_mib() for name, r in runners.items()}
    print("XLA scratch buffer per step (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in temp.items()))
    # times[clock][name][rep] = the BLOCK step times of that block, in ms.
    times = {clock: {name: [] for name in runners} for clock in ("wall", "cpu")}
    faults = {name: [] for name in runners}  # minor page faults of every step
    for rep in range(args.reps):
        block = {name: [] for name in runners}
        for _ in range(BLOCK):  # round-robin, one step of each variant at a time
            for name, r in runners.items():
                block[name].append(r.one())
        for name, ts in block.items():
            times["wall"][name].append([w for w, _, _ in ts])
            times["cpu"][name].append([c for _, c, _ in ts])
            faults[name].extend(f for _, _, f in ts)
        print(f"rep {rep + 1}/{args.reps} wall ms/step: " + ", ".join(
            f"{k} {np.mean(v[-1]):.0f}" for k, v in times["wall"].items()), file=sys.stderr)

    # Exactness: every pruned variant holds 90% zeros in its kernels.
    for name, r in runners.items():
        if name != "dense":
            assert abs(jp.sparsity_of(r.carry[0]) - SPARSITY) < 1e-6, (name, jp.sparsity_of(r.carry[0]))

    rows, split = [], {}
    for clock in ("wall", "cpu"):
        # ms/step of a block = the mean of its 10 steps.
        blocks = {name: [float(np.mean(b)) for b in bs] for name, bs in times[clock].items()}
        dmin, dmed = np.min(blocks["dense"]), np.median(blocks["dense"])
        print(f"\n{clock + ' time':<16} {'min ms':>8} {'median ms':>10} {'min/dense':>10} "
              f"{'med/dense':>10} {'paired: median [q25, q75]':>27} {'faults/step':>12}")
        for name, ts in blocks.items():
            # Paired: each block against the dense block of the same repetition.
            paired = np.array(ts) / np.array(blocks["dense"])
            row = dict(clock=clock, variant=name, min_ms=float(np.min(ts)),
                       median_ms=float(np.median(ts)), ratio_min=float(np.min(ts) / dmin),
                       ratio_median=float(np.median(ts) / dmed),
                       paired_median=float(np.median(paired)),
                       paired_q25=float(np.quantile(paired, 0.25)),
                       paired_q75=float(np.quantile(paired, 0.75)),
                       page_faults_median=float(np.median(faults[name])))
            rows.append(row)
            print(f"{name:<16} {row['min_ms']:>8.1f} {row['median_ms']:>10.1f} "
                  f"{row['ratio_min']:>9.3f}x {row['ratio_median']:>9.3f}x "
                  f"{row['paired_median']:>10.3f}x [{row['paired_q25']:.3f}, {row['paired_q75']:.3f}] "
                  f"{row['page_faults_median']:>12.0f}")

        # Case b: the mask-update step (first of each block) against the other nine.
        print(f"{'case b, ' + clock:<16} {'update step ms (min / med)':>28} "
              f"{'other steps ms (min / med)':>28}")
        for name, bs in times[clock].items():
            if not name.startswith("b/"):
                continue
            upd = [b[0] for b in bs]
            rest = [t for b in bs for t in b[1:]]
            split[f"{clock}/{name}"] = dict(
                update_min_ms=float(np.min(upd)), update_median_ms=float(np.median(upd)),
                other_min_ms=float(np.min(rest)), other_median_ms=float(np.median(rest)))
            print(f"{name:<16} {np.min(upd):>13.1f} / {np.median(upd):>8.1f} "
                  f"{np.min(rest):>17.1f} / {np.median(rest):>8.1f}")

    mask_update = {}
    if args.breakdown:
        for alloc in ("uniform", "global"):
            ts = np.array(time_mask_update(params, alloc, max(5, args.reps)))
            mask_update[alloc] = dict(wall_min_ms=float(ts[:, 0].min()),
                                      wall_median_ms=float(np.median(ts[:, 0])),
                                      cpu_min_ms=float(ts[:, 1].min()),
                                      cpu_median_ms=float(np.median(ts[:, 1])))
            print(f"mask update alone ({alloc}): wall min {ts[:, 0].min():.1f} / median "
                  f"{np.median(ts[:, 0]):.1f} ms, cpu min {ts[:, 1].min():.1f} / median "
                  f"{np.median(ts[:, 1]):.1f} ms")
    info["loadavg_end"] = os.getloadavg()[0]
    result = dict(info=info, rows=rows, case_b_steps=split, mask_update=mask_update, temp_mib=temp,
                  step_times_ms=times)  # [clock][variant][block][step]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

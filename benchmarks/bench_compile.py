"""Compile time of jitted mask selections and pruned train steps.

Four measurements, each in a fresh trace (no cache hit), inputs given as
shapes only (``jax.ShapeDtypeStruct``: nothing is allocated or run):

* ``--synthetic``: ``global_topk`` and per-leaf ``topk`` of magnitude scores
  over ``n`` float32 kernels of shape ``(64, 64 + j)`` (``j`` = leaf index for
  distinct shapes, ``j = 0`` for identical shapes).
* ``--models``: one jitted train step (grad + Adam + ``apply_updates`` +
  BatchNorm statistics, params and optimizer state donated) of the Linen
  ResNets of Flax's ImageNet example (ResNet-18: 62 param leaves, 21
  kernels; ResNet-50: 161 leaves, 54 kernels; full width, 32x32 inputs,
  batch 32, 1000 classes): dense ``optax.adam`` against
  ``jp.prune(optax.adam, sparsity=0.9, allocation=uniform|global,
  update_every=100)``; with ``--sketch`` also :func:`lazy_prune`, the same
  step with the scores passed lazily and one vectorised ``keep_count``
  (the caller-side changes proposed for masks.py / transforms.py).
* ``--transformer``: ``global_topk`` over the parameters of an unstacked
  GPT-style decoder (``d_model`` 1024, MLP 4096, vocabulary 50304,
  no biases: per layer q, k, v, o ``(d, d)``, up ``(d, 4d)``, down
  ``(4d, d)`` and two norm scales ``(d,)``; plus the token embedding and a
  final norm scale), for several layer counts; 24 layers = 195 leaves of 5
  distinct shapes. ``where`` selects every leaf (``all``) or the default
  (``ndim >= 2``: the 145 matrices); with ``--sketch`` also every leaf with
  the scores passed as ``select.LazyScores`` (``all, lazy``).

* ``--suite``: ``global_topk`` and per-leaf ``topk`` of magnitude scores
  over every leaf of each real-model shape set of ``shape_sets.py``
  (ResNet-50, BERT-base, GPT-2 small, LLaMA-7B/4, odd squares, last axes
  not multiples of 32, ...); the worst set is printed last.

For each: the trace-and-lower time, the XLA compile time (wall clock), the
process CPU time of both (all threads: less sensitive to other jobs than wall
time, which they slow down) and the number of fusions in the compiled
program (which does not depend on load).

Run:
  python benchmarks/bench_compile.py                        # all three
  python benchmarks/bench_compile.py --synthetic --leaves 10,200 --json out.json
  python benchmarks/bench_compile.py --models resnet18,resnet50 --reps 3
  python benchmarks/bench_compile.py --models resnet18 --sketch   # + the proposed lazy-score step
  python benchmarks/bench_compile.py --transformer --layers 6,12,24
  python benchmarks/bench_compile.py --transformer --layers 24 --baseline /tmp/old_select.py
  python benchmarks/bench_compile.py --suite --reps 1        # the shape suite
  python benchmarks/bench_compile.py --quick                 # smoke test: scaled-down suite
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxprune as jp


def _shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def time_compile(fn, *args) -> dict:
    """Lower and compile ``fn`` (a jitted function) for ``args`` (shapes)."""
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = fn.lower(*args)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    return dict(lower_s=t1 - t0, compile_s=t2 - t1, lower_cpu_s=c1 - c0, compile_cpu_s=c2 - c1,
                fusions=compiled.as_text().count("fusion("))


# --------------------------------------------------------------------------
# Synthetic kernels


def measure(n: int, distinct: bool, kind: str) -> dict:
    params = {f"l{j}": jax.ShapeDtypeStruct((64, 64 + (j if distinct else 0)), jnp.float32)
              for j in range(n)}
    fn = {"global": jp.masks.global_topk, "topk": jp.masks.topk}[kind]
    f = jax.jit(lambda p: fn(jp.scores.magnitude(p), 0.9))
    return dict(leaves=n, shapes="distinct" if distinct else "identical", kind=kind,
                **time_compile(f, params))


def run_synthetic(leaves: Sequence[int]) -> list:
    print("| leaves | shapes | selection | lower s | compile s | fusions |")
    print("|---:|---|---|---:|---:|---:|")
    rows = []
    for n in leaves:
        for distinct in (True, False):
            for kind in ("global", "topk"):
                r = measure(n, distinct, kind)
                rows.append(r)
                print(f"| {n} | {r['shapes']} | {kind} | {r['lower_s']:.1f} | {r['compile_s']:.1f} "
                      f"| {r['fusions']} |", flush=True)
    return rows


# --------------------------------------------------------------------------
# ResNets (Flax's ImageNet example, flax.linen)


def resnet(depth: int, num_classes: int = 1000):
    import flax.linen as nn

    class ResNetBlock(nn.Module):
        filters: int
        conv: Any
        norm: Any
        strides: tuple = (1, 1)

        @nn.compact
        def __call__(self, x):
            residual = x
            y = self.conv(self.filters, (3, 3), self.strides)(x)
            y = nn.relu(self.norm()(y))
            y = self.conv(self.filters, (3, 3))(y)
            y = self.norm(scale_init=nn.initializers.zeros_init())(y)
            if residual.shape != y.shape:
                residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
                residual = self.norm(name="norm_proj")(residual)
            return nn.relu(residual + y)

    class BottleneckResNetBlock(nn.Module):
        filters: int
        conv: Any
        norm: Any
        strides: tuple = (1, 1)

        @nn.compact
        def __call__(self, x):
            residual = x
            y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
            y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
            y = self.conv(self.filters * 4, (1, 1))(y)
            y = self.norm(scale_init=nn.initializers.zeros_init())(y)
            if residual.shape != y.shape:
                residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
                residual = self.norm(name="norm_proj")(residual)
            return nn.relu(residual + y)

    class ResNet(nn.Module):
        stage_sizes: Sequence[int]
        block_cls: Any
        num_filters: int = 64

        @nn.compact
        def __call__(self, x, train: bool = True):
            conv = functools.partial(nn.Conv, use_bias=False)
            norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                     epsilon=1e-5)
            x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
            x = nn.relu(norm(name="bn_init")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            for i, block_size in enumerate(self.stage_sizes):
                for j in range(block_size):
                    strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                    x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv,
                                       norm=norm)(x)
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(num_classes)(x)

    if depth == 18:
        return ResNet(stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
    if depth == 50:
        return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)
    raise ValueError(depth)


def resnet_step(model, tx) -> Callable:
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd["batch_stats"]

        (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_bs, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def resnet_shapes(depth: int, batch: int = 32):
    model = resnet(depth)
    x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
    return model, variables["params"], variables["batch_stats"], x, y


def lazy_prune(inner, sparsity: float, update_every: int, allocation: str):
    """A sketch of ``jp.prune``'s update (magnitude scores, nested masks) with
    the two changes proposed for masks.py / transforms.py: the scores reach
    the selection as ``select.LazyScores`` (``where(m, |w|, -inf)`` computed
    inside every pass, never stored), and the keep counts of all leaves come
    from one vectorised ``keep_count`` call. Same state, cond and masking."""
    from jaxprune.core import select as sel
    from jaxprune.train import transforms as jpt

    def init_fn(params):
        return (jnp.zeros((), jnp.int32), jpt.initial_masks(params, None), inner.init(params))

    def update_fn(updates, state, params=None):
        count, masks, inner_state = state
        leaves, treedef = jax.tree.flatten(params)
        mleaves = treedef.flatten_up_to(masks)
        idx = [i for i, m in enumerate(mleaves) if m.ndim]

        def recompute():
            scores = [sel.LazyScores(lambda w, m: jnp.where(m, jnp.abs(w), -jnp.inf),
                                     (leaves[i], mleaves[i])) for i in idx]
            sizes = np.array([leaves[i].size for i in idx])
            s = jpt.schedule_value(sparsity, count)
            if allocation == "global":
                new = sel.select_groups(scores, [0] * len(idx), [sel.keep_count(int(sizes.sum()), s)])
            else:
                new = sel.select_groups(scores, list(range(len(idx))), sel.keep_count(sizes, s))
            out = list(mleaves)
            for i, m in zip(idx, new):
                out[i] = m
            return treedef.unflatten(out)

        masks = lax.cond(count % update_every == 0, recompute, lambda: masks)
        u, inner_state = inner.update(jpt.mask_grads(updates, masks), inner_state, params)
        return jpt.apply_mask_to_updates(u, params, masks), (count + 1, masks, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def step_txs(sketch: bool = False) -> dict:
    adam = optax.adam(1e-3)
    txs = {
        "dense": adam,
        "prune/uniform": jp.prune(adam, sparsity=0.9, allocation="uniform", update_every=100),
        "prune/global": jp.prune(adam, sparsity=0.9, allocation="global", update_every=100),
    }
    if sketch:
        txs["sketch/uniform"] = lazy_prune(adam, 0.9, 100, "uniform")
        txs["sketch/global"] = lazy_prune(adam, 0.9, 100, "global")
    return txs


def run_models(names: Sequence[str], reps: int, sketch: bool = False) -> list:
    """Dense and pruned step compile times, ``reps`` fresh compiles each,
    interleaved (dense, pruned, dense, ...) so that load hits them alike."""
    print("| model | leaves | kernels | step | lower s | compile s (min, median) | "
          "total / dense (median) | CPU s (median) | CPU / dense | fusions |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in names:
        depth = int(name.replace("resnet", ""))
        model, params, bs, x, y = resnet_shapes(depth)
        n_leaves = len(jax.tree.leaves(params))
        n_kernels = sum(1 for v in jax.tree.leaves(params) if len(v.shape) >= 2)
        times: dict[str, list] = {}
        for _ in range(reps):
            for label, tx in step_txs(sketch).items():
                opt = jax.eval_shape(tx.init, params)
                times.setdefault(label, []).append(
                    time_compile(resnet_step(model, tx), params, bs, opt, x, y))
        dense_total = np.median([t["lower_s"] + t["compile_s"] for t in times["dense"]])
        dense_cpu = np.median([t["lower_cpu_s"] + t["compile_cpu_s"] for t in times["dense"]])
        for label, ts in times.items():
            lower = np.median([t["lower_s"] for t in ts])
            comp = [t["compile_s"] for t in ts]
            total = np.median([t["lower_s"] + t["compile_s"] for t in ts])
            cpu = np.median([t["lower_cpu_s"] + t["compile_cpu_s"] for t in ts])
            r = dict(model=name, leaves=n_leaves, kernels=n_kernels, step=label,
                     lower_s=float(lower), compile_s=comp, total_median_s=float(total),
                     total_over_dense=float(total / dense_total), cpu_median_s=float(cpu),
                     cpu_over_dense=float(cpu / dense_cpu), runs=ts, fusions=ts[0]["fusions"])
            rows.append(r)
            print(f"| {name} | {n_leaves} | {n_kernels} | {label} | {lower:.1f} | "
                  f"{min(comp):.1f}, {np.median(comp):.1f} | {total / dense_total:.2f} | "
                  f"{cpu:.1f} | {cpu / dense_cpu:.2f} | {r['fusions']} |", flush=True)
    return rows


# --------------------------------------------------------------------------
# Unstacked transformer


def transformer_shapes(layers: int, d: int = 1024, vocab: int = 50304) -> dict:
    f32 = jnp.float32

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, f32)

    params = {"embed": s(vocab, d), "final_norm": s(d)}
    for i in range(layers):
        params[f"layer{i:02d}"] = {
            "attn": {"q": s(d, d), "k": s(d, d), "v": s(d, d), "o": s(d, d)},
            "mlp": {"up": s(d, 4 * d), "down": s(4 * d, d)},
            "norm1": s(d),
            "norm2": s(d),
        }
    return params


def _lazy_global(params, sparsity: float):
    """A global magnitude selection over every leaf with the scores passed
    as ``select.LazyScores`` (what ``global_topk`` would do if it accepted
    them): no |w| array is stored, |w| is computed inside every pass."""
    from jaxprune.core import select as sel

    leaves = jax.tree.leaves(params)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    return sel.select_groups([sel.LazyScores(jnp.abs, (x,)) for x in leaves], [0] * len(leaves),
                             [sel.keep_count(n, sparsity)])


def _load_select(path: str):
    """Another version of ``select.py`` (e.g. ``git show REV:jaxprune/core/select.py``),
    loaded as its own module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_select", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _with_select(mod, fn):
    """``fn`` with ``jp.masks`` selecting through ``mod`` while it is traced."""
    from jaxprune.core import masks as _masks

    def wrapped(*args):
        saved, _masks._select = _masks._select, mod
        try:
            return fn(*args)
        finally:
            _masks._select = saved

    return wrapped


def run_transformer(layer_counts: Sequence[int], reps: int, lazy: bool = False,
                    baseline: str | None = None) -> list:
    print("| layers | leaves | where | selected | lower s | compile s (min, median) | "
          "total s (median) | CPU s (median) | fusions |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for layers in layer_counts:
        params = transformer_shapes(layers)
        n_leaves = len(jax.tree.leaves(params))
        variants = [("all", lambda path, leaf: True, False), ("default", None, False)]
        if lazy:
            variants += [("all, lazy", None, True)]
        if baseline:  # the same rows with another select.py, compiled in turn with them
            variants += [(f"{name}, baseline", where, False) for name, where, _ in variants[:2]]
            base_mod = _load_select(baseline)
        for where_name, where, as_lazy in variants:
            n_sel = sum(1 for v in jax.tree.leaves(params) if where is not None or len(v.shape) >= 2)
            if as_lazy:
                n_sel = n_leaves
            ts = []
            for _ in range(reps):
                if as_lazy:
                    f = jax.jit(lambda p: _lazy_global(p, 0.9))
                else:
                    def f(p, where=where):
                        return jp.masks.global_topk(jp.scores.magnitude(p), 0.9, where=where)
                    if where_name.endswith("baseline"):
                        f = _with_select(base_mod, f)
                    f = jax.jit(f)
                jax.clear_caches()  # fresh traces of the jitted per-leaf kernels too
                ts.append(time_compile(f, params))
            comp = [t["compile_s"] for t in ts]
            total = float(np.median([t["lower_s"] + t["compile_s"] for t in ts]))
            cpu = float(np.median([t["lower_cpu_s"] + t["compile_cpu_s"] for t in ts]))
            r = dict(layers=layers, leaves=n_leaves, where=where_name, selected=n_sel,
                     lower_s=float(np.median([t["lower_s"] for t in ts])), compile_s=comp,
                     total_median_s=total, cpu_median_s=cpu, runs=ts, fusions=ts[0]["fusions"])
            rows.append(r)
            print(f"| {layers} | {n_leaves} | {where_name} | {n_sel} | {r['lower_s']:.1f} | "
                  f"{min(comp):.1f}, {np.median(comp):.1f} | {total:.1f} | {cpu:.1f} | "
                  f"{r['fusions']} |", flush=True)
    return rows


# --------------------------------------------------------------------------
# The shape suite (shape_sets.py)


def run_suite(names: Sequence[str] | None, reps: int, quick: bool = False) -> list:
    """Compile time of ``global_topk`` and per-leaf ``topk`` of magnitude
    scores over every leaf of each shape set; prints the worst set."""
    import shape_sets

    every = lambda path, leaf: True  # noqa: E731
    print("| set | leaves | distinct shapes | selection | lower s | compile s (median) | "
          "CPU s (median) | fusions |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    rows = []
    for name in names or list(shape_sets.SETS):
        shapes = shape_sets.SETS[name]
        if quick:
            shapes = shape_sets.quick(shapes)
        params = {f"k{i:02d}": jax.ShapeDtypeStruct(sh, jnp.float32) for i, sh in enumerate(shapes)}
        for kind, fn in (("global", jp.masks.global_topk), ("topk", jp.masks.topk)):
            ts = [time_compile(jax.jit(lambda p, fn=fn: fn(jp.scores.magnitude(p), 0.9, where=every)),
                               params) for _ in range(reps)]
            r = dict(set=name, leaves=len(shapes), distinct=len(set(shapes)), kind=kind,
                     lower_s=float(np.median([t["lower_s"] for t in ts])),
                     compile_s=float(np.median([t["compile_s"] for t in ts])),
                     cpu_s=float(np.median([t["lower_cpu_s"] + t["compile_cpu_s"] for t in ts])),
                     fusions=ts[0]["fusions"], runs=ts)
            rows.append(r)
            print(f"| {name} | {r['leaves']} | {r['distinct']} | {kind} | {r['lower_s']:.1f} | "
                  f"{r['compile_s']:.1f} | {r['cpu_s']:.1f} | {r['fusions']} |", flush=True)
    for kind in ("global", "topk"):
        worst = max((r for r in rows if r["kind"] == kind), key=lambda r: r["cpu_s"])
        print(f"worst set for {kind}: {worst['set']}, {worst['cpu_s']:.1f} CPU s "
              f"({worst['lower_s'] + worst['compile_s']:.1f} s wall)")
    return rows


def _commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(jp.__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "jaxprune"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "no git"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true", help="the synthetic kernels table")
    ap.add_argument("--leaves", default="25,50,100", help="synthetic: comma-separated leaf counts")
    ap.add_argument("--models", nargs="?", const="resnet18,resnet50", default=None,
                    help="train-step compile of these models (default resnet18,resnet50)")
    ap.add_argument("--sketch", action="store_true",
                    help="models: also the step with lazy scores and one keep_count (see "
                    "lazy_prune); transformer: also the selection with lazy scores")
    ap.add_argument("--transformer", action="store_true", help="global selection on a transformer")
    ap.add_argument("--layers", default="6,12,24", help="transformer: comma-separated layer counts")
    ap.add_argument("--reps", type=int, default=3, help="fresh compiles per model/transformer row")
    ap.add_argument("--suite", nargs="?", const="", default=None,
                    help="the shape suite (shape_sets.py): all sets, or comma-separated names")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: scaled-down suite, resnet18, 2-layer transformer, 1 rep")
    ap.add_argument("--json", metavar="PATH", help="write the rows here")
    ap.add_argument("--baseline", metavar="SELECT_PY",
                    help="transformer: also compile the rows with this select.py (side by side)")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 1
        args.suite = "" if args.suite is None else args.suite
        args.models = args.models and "resnet18"
        args.layers = "2"
    if not (args.synthetic or args.models or args.transformer or args.suite is not None):
        args.synthetic, args.models, args.transformer = True, "resnet18,resnet50", True
        args.suite = ""
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                jax=jax.__version__, cpus=os.cpu_count(), jaxprune=_commit(),
                loadavg_start=os.getloadavg()[0])
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"jaxprune {info['jaxprune']}, load average {info['loadavg_start']:.1f}")
    out: dict = dict(info=info)
    if args.suite is not None:
        out["suite"] = run_suite([x for x in args.suite.split(",") if x], args.reps, args.quick)
    if args.synthetic:
        out["synthetic"] = run_synthetic([int(v) for v in args.leaves.split(",")])
    if args.models:
        out["models"] = run_models(args.models.split(","), args.reps, args.sketch)
    if args.transformer:
        out["transformer"] = run_transformer([int(v) for v in args.layers.split(",")], args.reps,
                                             args.sketch, args.baseline)
    info["loadavg_end"] = os.getloadavg()[0]
    print(f"load average at end: {info['loadavg_end']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

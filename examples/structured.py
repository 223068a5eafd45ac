"""Structured pruning on MNIST-1D: a 1-D CNN made smaller *and* faster.

A 1-D CNN (convolutions of widths 32-64-128 with kernel widths 5-5-3 and
strides 1-2-2, each followed by BatchNorm and ReLU; flatten; a dense layer of
256 units; a 10-way head) is trained on MNIST-1D. It is written as a plain
JAX function of a ``{"params", "stats"}`` dict whose sizes come from the
array shapes, with BatchNorm written out (batch statistics and running
averages in training, the running averages in inference).

From the trained network, for every target sparsity ``s`` (default 30%,
50%, 70%), two models get the same fine-tuning budget (Adam, cosine decay,
``--finetune`` steps; the sparsity follows the cubic schedule of Zhu &
Gupta from 0 to ``s`` over the first 60% of them, masks updated every
``finetune // 20`` steps):

* **structured**: ``jp.structured.prune`` removes a fraction ``s`` of the
  units of every prunable channel group (conv filters with their BatchNorm
  parameters and statistics and the next layer's input slices, dense
  neurons), scored by group L2 norm; the result is compacted with
  ``jp.structured.compact`` into a model with smaller arrays that the same
  forward function runs;
* **unstructured**: ``jp.prune`` (global magnitude) zeroes single kernel
  weights (``where=graph.kernels``) until the network has as many nonzero
  parameters as the compacted structured model. Its arrays keep their dense
  shapes: the zeros are still multiplied, so its latency is the dense
  latency.

Reported per seed and as mean +- std over seeds: test accuracy, parameters
(nonzero, for the unstructured model), MACs (``graph.macs``; for the
unstructured model the MACs executed, which are the dense ones, and in
brackets those with a nonzero weight) and inference latency of a jitted
forward pass on a batch of ``--latency-batch`` test sequences, dense,
compacted and masked models timed side by side in one process (round-robin
blocks of synced calls, median and IQR over blocks, wall-clock and process
CPU time). The plot shows accuracy against latency.

Training runs as a Python loop over a jitted step: on XLA:CPU this network's
training step inside ``lax.scan`` ran about 7x slower than the same step
called from Python (BENCHMARKS.md).

Data: ``mnist1d.data.make_dataset`` (4000 train / 1000 test sequences of
length 40, generated locally, already standardised; no download).

Run:
  python examples/structured.py --json structured.json --plot structured.png
  python examples/structured.py --quick   # CI-sized: well under a minute
  python examples/structured.py --from-json structured.json --plot structured.png  # replot

References:
  Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024;
  Li et al., "Pruning filters for efficient ConvNets", ICLR 2017; Fang et
  al., "DepGraph: towards any structural pruning", CVPR 2023; Zhu & Gupta,
  "To prune, or not to prune", 2017.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxprune as jp

EPS = 1e-5
MOMENTUM = 0.9
STRIDES = {"conv1": 1, "conv2": 2, "conv3": 2}  # conv layers, in order; kernel widths
# come from the kernels' shapes


# --------------------------------------------------------------------------
# Data and model


def load_data() -> dict:
    import mnist1d.data as d

    data = d.make_dataset(d.get_dataset_args())  # generated locally, standardised
    return {"x": jnp.asarray(data["x"], jnp.float32)[..., None],
            "y": jnp.asarray(data["y"], jnp.int32),
            "x_test": jnp.asarray(data["x_test"], jnp.float32)[..., None],
            "y_test": jnp.asarray(data["y_test"], jnp.int32)}


def init(key: jax.Array, widths=(32, 64, 128), kernel_widths=(5, 5, 3), hidden: int = 256,
         length: int = 40) -> dict:
    """He-normal kernels; BatchNorm scale 1, shift 0; running mean 0, var 1."""
    params, stats, c_in = {}, {}, 1
    keys = jax.random.split(key, len(widths) + 2)
    for k, name, w, kw in zip(keys, STRIDES, widths, kernel_widths):
        params[name] = {"kernel": jax.random.normal(k, (kw, c_in, w)) * np.sqrt(2.0 / (kw * c_in)),
                        "scale": jnp.ones(w), "shift": jnp.zeros(w)}
        stats[name] = {"mean": jnp.zeros(w), "var": jnp.ones(w)}
        c_in, length = w, -(-length // STRIDES[name])
    flat = c_in * length
    params["fc"] = {"kernel": jax.random.normal(keys[-2], (flat, hidden)) * np.sqrt(2.0 / flat),
                    "bias": jnp.zeros(hidden)}
    params["head"] = {"kernel": jax.random.normal(keys[-1], (hidden, 10)) / np.sqrt(hidden),
                      "bias": jnp.zeros(10)}
    return {"params": params, "stats": stats}


def forward(variables: dict, x: jax.Array, train: bool = False):
    """Logits and (in training) the batch statistics of every BatchNorm."""
    params, stats, batch_stats = variables["params"], variables["stats"], {}
    for name, stride in STRIDES.items():
        p = params[name]
        y = lax.conv_general_dilated(x, p["kernel"], (stride,), "SAME",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
        if train:
            mean, var = jnp.mean(y, axis=(0, 1)), jnp.var(y, axis=(0, 1))
            batch_stats[name] = {"mean": mean, "var": var}
        else:
            mean, var = stats[name]["mean"], stats[name]["var"]
        x = jax.nn.relu((y - mean) * lax.rsqrt(var + EPS) * p["scale"] + p["shift"])
    x = x.reshape(x.shape[0], -1)  # flatten (length, channels) into the dense layer
    x = jax.nn.relu(x @ params["fc"]["kernel"] + params["fc"]["bias"])
    return x @ params["head"]["kernel"] + params["head"]["bias"], batch_stats


def apply(variables: dict, x: jax.Array) -> jax.Array:
    """Inference: what ``jp.graph.trace`` sees and what is timed."""
    return forward(variables, x)[0]


def loss_fn(params, stats, x, y):
    logits, batch_stats = forward({"params": params, "stats": stats}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), batch_stats


def count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def nonzero(tree) -> int:
    return int(sum(int(jnp.count_nonzero(x)) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------
# Training


def cubic(final, steps: int):
    """Zhu & Gupta's cubic schedule from 0 to ``final`` over ``steps``
    (``final`` may be traced: one compiled step serves every sparsity)."""
    return lambda count: final * (1.0 - (1.0 - jnp.minimum(count / steps, 1.0)) ** 3)


class Trainer:
    """A jitted train step per method; ``run`` loops over it from Python."""

    def __init__(self, data: dict, cfg: argparse.Namespace, graph):
        self.data, self.cfg = data, cfg
        x, y = data["x"], data["y"]
        ramp = max(cfg.update_every, (int(0.6 * cfg.finetune) // cfg.update_every)
                   * cfg.update_every)

        def make_tx(method, target):
            if method == "dense":
                return optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.steps))
            adam = optax.adam(optax.cosine_decay_schedule(cfg.finetune_lr, cfg.finetune))
            if method == "structured":
                return jp.structured.prune(adam, graph=graph, sparsity=cubic(target, ramp),
                                           score="l2", update_every=cfg.update_every)
            return jp.prune(adam, sparsity=cubic(target, ramp), score="magnitude",
                            allocation="global", where=graph.kernels["params"],
                            update_every=cfg.update_every)

        def step(method, params, stats, state, idx, target):
            tx = make_tx(method, target)
            (loss, batch), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, stats, x[idx], y[idx])
            updates, state = tx.update(grads, state, params)
            stats = jax.tree.map(lambda r, b: MOMENTUM * r + (1 - MOMENTUM) * b, stats, batch)
            return optax.apply_updates(params, updates), stats, state, loss

        self.make_tx = make_tx
        self.steps = {m: jax.jit(lambda *a, m=m: step(m, *a), donate_argnums=(0, 1, 2))
                      for m in ("dense", "structured", "unstructured")}

    def run(self, method: str, variables: dict, steps: int, seed: int, target: float = 0.0,
            progress: bool = True, desc: str = ""):
        from tqdm import tqdm

        params = jax.tree.map(jnp.copy, variables["params"])
        stats = jax.tree.map(jnp.copy, variables["stats"])
        state = self.make_tx(method, 0.5).init(params)
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, self.data["x"].shape[0], (steps, self.cfg.batch))
        target = jnp.float32(target)
        for i in tqdm(range(steps), desc=desc, disable=not progress, leave=False,
                      file=sys.stderr, mininterval=1.0):
            params, stats, state, loss = self.steps[method](params, stats, state,
                                                           jnp.asarray(idx[i]), target)
        jax.block_until_ready(params)
        return {"params": params, "stats": stats}, state


# --------------------------------------------------------------------------
# Latency: round-robin, synced, in one process


def time_variants(variants: dict, x: jax.Array, reps: int, block_s: float) -> dict:
    fwd = jax.jit(apply)
    names = list(variants)
    for v in variants.values():
        for _ in range(2):
            jax.block_until_ready(fwd(v, x))
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(fwd(variants[names[0]], x))
    inner = max(1, int(round(block_s / ((time.perf_counter() - t0) / 3))))
    out = {n: {"wall": [], "cpu": []} for n in names}
    for rep in range(reps):
        for n in (names if rep % 2 == 0 else names[::-1]):
            w = c = 0.0
            for _ in range(inner):
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(fwd(variants[n], x))
                w, c = w + time.perf_counter() - t0, c + time.process_time() - c0
            out[n]["wall"].append(1e3 * w / inner)
            out[n]["cpu"].append(1e3 * c / inner)
    return {n: {clock: dict(median=float(np.median(v)), q1=float(np.percentile(v, 25)),
                            q3=float(np.percentile(v, 75)), min=float(np.min(v)))
                for clock, v in t.items()} for n, t in out.items()}


# --------------------------------------------------------------------------
# The experiment


def accuracy(variables, x, y) -> float:
    return float(jnp.mean(jnp.argmax(jax.jit(apply)(variables, x), -1) == y))


def run_seed(seed: int, cfg, data, progress: bool) -> dict:
    variables = init(jax.random.key(seed), cfg.widths, hidden=cfg.hidden)
    xt, yt = data["x_test"], data["y_test"]
    xlat = xt[: cfg.latency_batch]
    graph = jp.graph.trace(apply, variables, xlat)
    trainer = Trainer(data, cfg, graph)
    tag = f"seed {seed}"
    dense, _ = trainer.run("dense", variables, cfg.steps, seed, progress=progress,
                           desc=f"{tag} dense")
    kernels = [x for x, k in zip(jax.tree.leaves(dense["params"]),
                                 jax.tree.leaves(graph.kernels["params"])) if k]
    n_kernel = sum(x.size for x in kernels)
    res = {"dense": dict(acc=accuracy(dense, xt, yt), params=count(dense["params"]),
                         macs=graph.macs, nonzero_macs=graph.macs)}
    models = {"dense": dense}
    for s in cfg.sparsities:
        name = f"{round(100 * s)}%"
        tuned, state = trainer.run("structured", dense, cfg.finetune, 1000 * seed + 1, s,
                                   progress, f"{tag} structured {name}")
        masks = jp.get_masks(state)
        masked_acc = accuracy(tuned, xt, yt)
        small = jp.structured.compact(graph, tuned, masks)
        small_graph = jp.graph.trace(apply, small, xlat)
        n_small = count(small["params"])
        res[f"structured {name}"] = dict(
            acc=accuracy(small, xt, yt), masked_acc=masked_acc, params=n_small,
            macs=small_graph.macs, nonzero_macs=small_graph.macs,
            shapes={k: list(v["kernel"].shape) for k, v in small["params"].items()})
        models[f"structured {name}"] = small
        # Unstructured: as many nonzero parameters as the compacted model.
        target = (res["dense"]["params"] - n_small) / n_kernel
        tuned_u, _ = trainer.run("unstructured", dense, cfg.finetune, 1000 * seed + 1, target,
                                 progress, f"{tag} unstructured {name}")
        nz_macs = sum(info.macs * float(jnp.mean(x != 0))
                      for info, x in zip(graph.leaves, jax.tree.leaves(tuned_u))
                      if info.role == "kernel")
        res[f"unstructured {name}"] = dict(
            acc=accuracy(tuned_u, xt, yt), params=nonzero(tuned_u["params"]),
            kernel_sparsity=float(target), macs=graph.macs, nonzero_macs=int(round(nz_macs)))
        models[f"unstructured {name}"] = tuned_u
    lat = time_variants(models, xlat, cfg.reps, cfg.block_s)
    for k in res:
        res[k]["latency"] = lat[k]
    return res


def summarise(cfg, per_seed: list[dict], wall: float) -> dict:
    rows = []
    for name in per_seed[0]:
        runs = [r[name] for r in per_seed]
        acc = np.array([r["acc"] for r in runs])
        row = dict(model=name, acc_mean=float(acc.mean()), acc_std=float(acc.std()),
                   params=int(np.mean([r["params"] for r in runs])),
                   macs=int(np.mean([r["macs"] for r in runs])),
                   nonzero_macs=int(np.mean([r["nonzero_macs"] for r in runs])))
        for clock in ("wall", "cpu"):
            med = np.array([r["latency"][clock]["median"] for r in runs])
            row[f"{clock}_ms"] = float(np.median(med))
            row[f"{clock}_q1"] = float(np.median([r["latency"][clock]["q1"] for r in runs]))
            row[f"{clock}_q3"] = float(np.median([r["latency"][clock]["q3"] for r in runs]))
            dense = np.array([r["latency"][clock]["median"] for r in
                              (s["dense"] for s in per_seed)])
            row[f"{clock}_speedup"] = float(np.median(dense / med))
        if "masked_acc" in runs[0]:
            row["max_masked_vs_compact_diff"] = float(max(abs(r["masked_acc"] - r["acc"])
                                                          for r in runs))
        rows.append(row)
    return {"config": {k: v for k, v in vars(cfg).items()
                       if k not in ("json", "plot", "from_json")},
            "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "wall_time_s": wall, "rows": rows,
            "per_seed": per_seed}


def table(out: dict) -> str:
    c = out["config"]
    lines = [f"MNIST-1D test accuracy (%), mean +- std over {len(out['per_seed'])} seed(s); "
             f"latency of a batch of {c['latency_batch']}: median over blocks [IQR], ms",
             "| model | accuracy | params | MACs (nonzero) | wall ms [IQR] | CPU ms | speedup "
             "(wall, CPU) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        macs = f"{r['macs'] / 1e6:.1f}M"
        if r["nonzero_macs"] != r["macs"]:
            macs += f" ({r['nonzero_macs'] / 1e6:.1f}M)"
        lines.append(
            f"| {r['model']} | {100 * r['acc_mean']:.1f} +- {100 * r['acc_std']:.1f} | "
            f"{r['params']:,} | {macs} | {r['wall_ms']:.2f} [{r['wall_q1']:.2f}-"
            f"{r['wall_q3']:.2f}] | {r['cpu_ms']:.2f} | {r['wall_speedup']:.2f}x, "
            f"{r['cpu_speedup']:.2f}x |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    """Accuracy against latency: wall-clock (left) and process CPU time
    (right; the steadier figure when other jobs share the machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=100, sharey=True)
    for ax, clock in zip(axes, ("wall", "cpu")):
        d = next(r for r in out["rows"] if r["model"] == "dense")
        ax.errorbar([d[f"{clock}_ms"]], [100 * d["acc_mean"]], yerr=[100 * d["acc_std"]],
                    xerr=[[d[f"{clock}_ms"] - d[f"{clock}_q1"]],
                          [d[f"{clock}_q3"] - d[f"{clock}_ms"]]], fmt="ks", capsize=2,
                    label="dense")
        for kind, color, marker in (("structured", "C0", "o"), ("unstructured", "C3", "^")):
            rs = [r for r in out["rows"] if r["model"].startswith(kind + " ")]
            x = np.array([r[f"{clock}_ms"] for r in rs])
            y = 100 * np.array([r["acc_mean"] for r in rs])
            xerr = [x - [r[f"{clock}_q1"] for r in rs], [r[f"{clock}_q3"] for r in rs] - x]
            ax.errorbar(x, y, yerr=100 * np.array([r["acc_std"] for r in rs]), xerr=xerr,
                        fmt=marker + "-", color=color, ms=5, capsize=2,
                        label=kind + (" (compacted)" if kind == "structured" else
                                      " (same nonzero params, dense shapes)"))
            for i, (r, xi, yi) in enumerate(zip(rs, x, y)):
                # unstructured points share one latency: labels stacked downwards
                ax.annotate(r["model"].split()[1], (xi, yi), textcoords="offset points",
                            xytext=(5, -10 * i - 4) if kind == "unstructured" else (4, 4),
                            fontsize=8, color=color)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        what = "wall-clock" if clock == "wall" else "process CPU time"
        ax.set_xlabel(f"latency, batch of {out['config']['latency_batch']} "
                      f"(ms {what}, median, IQR)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"test accuracy (%), {len(out['per_seed'])} seed(s), mean +- std")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.suptitle("Structured (compacted) vs unstructured pruning of a 1-D CNN on MNIST-1D")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (well under a minute)")
    ap.add_argument("--seeds", type=int, default=None, help="default 3; quick 1")
    ap.add_argument("--steps", type=int, default=None, help="dense training steps (default 2000)")
    ap.add_argument("--finetune", type=int, default=None,
                    help="fine-tuning steps while and after pruning (default 1000)")
    ap.add_argument("--sparsities", default=None,
                    help="structured sparsities (default 0.3,0.5,0.7; quick 0.5)")
    ap.add_argument("--widths", default=None, help="conv widths (default 32,64,128)")
    ap.add_argument("--hidden", type=int, default=None, help="dense units (default 256)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--update-every", type=int, default=None,
                    help="mask update period (default finetune // 20)")
    ap.add_argument("--latency-batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=None, help="timed blocks (default 21)")
    ap.add_argument("--block-s", type=float, default=0.1, help="seconds per timed block")
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--plot", default=None, help="write the PNG plot here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--from-json", metavar="PATH",
                    help="no training: print the table and write --plot from a saved --json")
    cfg = ap.parse_args(argv)
    q = cfg.quick
    cfg.seeds = cfg.seeds or (1 if q else 3)
    cfg.steps = cfg.steps or (200 if q else 2000)
    cfg.finetune = cfg.finetune or (100 if q else 1000)
    cfg.sparsities = [float(s) for s in (cfg.sparsities or ("0.5" if q else "0.3,0.5,0.7"))
                      .split(",")]
    cfg.widths = tuple(int(w) for w in (cfg.widths or ("16,32,64" if q else "32,64,128"))
                       .split(","))
    cfg.hidden = cfg.hidden or (64 if q else 256)
    cfg.update_every = cfg.update_every or max(1, cfg.finetune // 20)
    cfg.reps = cfg.reps or (5 if q else 21)
    if q:
        cfg.block_s = min(cfg.block_s, 0.02)
    return cfg


def main(argv=None) -> dict:
    cfg = parse(argv)
    if cfg.from_json:
        with open(cfg.from_json) as f:
            out = json.load(f)
    else:
        t0, load0 = time.time(), os.getloadavg()[0]
        data = load_data()
        per_seed = [run_seed(seed, cfg, data, not cfg.no_progress) for seed in range(cfg.seeds)]
        out = summarise(cfg, per_seed, time.time() - t0)
        out["load_average"] = [load0, os.getloadavg()[0]]
    print(table(out))
    for r in out["rows"]:
        if "max_masked_vs_compact_diff" in r:
            print(f"{r['model']}: compacted accuracy - masked accuracy, largest over seeds: "
                  f"{100 * r['max_masked_vs_compact_diff']:.2f} points")
    print(f"wall time: {out['wall_time_s']:.0f} s on {out['device']}")
    if cfg.json and not cfg.from_json:
        with open(cfg.json, "w") as f:
            json.dump(out, f, indent=1)
    if cfg.plot:
        plot(out, cfg.plot)
    return out


if __name__ == "__main__":
    main()

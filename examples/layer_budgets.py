"""Layer-aware budgets on MNIST-1D: which channels of which layer to remove.

A 1-D CNN (five convolutions with BatchNorm and ReLU, global average pool,
dense head; a plain-JAX model of a params dict, so compaction needs no size
adapters) is trained on MNIST-1D, then pruned *structurally* to two budgets,
each with its own runs:

* ``flops``: keep 50% of the dense MACs;
* ``params``: keep 30% of the dense parameters.

Per-layer budgets (channels kept in each of the five groups) come from:

* ``uniform``: one rate for every layer (``jp.allocation.uniform_budget``);
* ``global``: one threshold on L2 unit norms divided by their layer's mean
  (``jp.allocation.global_budget``);
* ``sensitivity``: validation-loss curves of each layer pruned alone
  (``jp.sensitivity.scan``, one vmapped call), then the budget solver
  (``jp.allocation.from_sensitivity``);
* ``adaptive``: gradual pruning over the first half of fine-tuning; at each
  of its mask updates the curves are re-measured on the current weights and
  the solver re-run at the scheduled (cubic) budget;
* ``gradual_global``: the same gradual schedule with one global threshold on
  the normalised unit norms at each update instead (the control that
  separates adaptive budgets from gradual pruning);
* ``search``: ``jp.search`` (the agent of ``--agent``) maximising validation
  accuracy of the pruned, not fine-tuned, model;
* ``slimming``: the network is trained with L1 on the BatchNorm scales
  (``jp.regularizers.slimming``) and one threshold on ``|gamma|`` meets the
  budget (Liu et al. 2017).

Units within a layer are ranked by L2 norm (``|gamma|`` for slimming). Every
pruned model is fine-tuned for the same number of steps (adaptive prunes
during the first half of them) and compacted (``jp.structured.compact``).
Fine-tuning runs on the masked variables: a structured mask zeroes every
member of a removed unit, so the masked model computes the compacted model's
function with the same gradients on the kept weights, and one compiled step
serves every method.
Reported, over seeds: test accuracy after fine-tuning (and before, "pruned",
with the BatchNorm statistics re-estimated on a training batch), parameters
and MACs kept, measured latency of the compacted model (jitted, batch of 1000
test sequences, timed alternately with the dense model; the minimum over
``--reps`` calls, as the machine may be shared, medians in the JSON) and the
speedup, and the time spent choosing the budget. The validation metrics of
sensitivity, adaptive and search also re-estimate the BatchNorm statistics
(on 500 training sequences) before evaluating a pruned candidate. ``--compare-agents`` also runs both agents of ``jp.search`` with the
same number of evaluations on each dense model.

Data: ``mnist1d`` (4000 training sequences, of which the last 500 are the
validation set used by sensitivity, adaptive and search; 1000 test).

Run:
  python examples/layer_budgets.py --json layer_budgets.json --plot layer_budgets.png
  python examples/layer_budgets.py --quick   # CI-sized

References:
  He et al., "AMC: AutoML for model compression and acceleration on mobile
  devices", ECCV 2018; Han et al., NeurIPS 2015 (sensitivity); Liu et al.,
  "Learning efficient convolutional networks through network slimming",
  ICCV 2017; Greydanus & Kobak, "Scaling down deep learning with MNIST-1D",
  ICML 2024.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxprune as jp

CHANNELS = (16, 32, 32, 64, 64)
KERNELS = (5, 3, 3, 3, 3)
STRIDES = (1, 2, 1, 2, 1)
METHODS = ("uniform", "global", "sensitivity", "adaptive", "gradual_global", "search",
           "slimming")
BUDGETS = {"flops": 0.5, "params": 0.7}  # fraction of the dense cost removed


# --------------------------------------------------------------------------
# Data and model


def load_data() -> dict:
    import mnist1d.data as d

    data = d.make_dataset(d.get_dataset_args())
    x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int32)
    return {"x": x[:-500], "y": y[:-500], "x_val": x[-500:], "y_val": y[-500:],
            "x_test": np.asarray(data["x_test"], np.float32),
            "y_test": np.asarray(data["y_test"], np.int32)}


def init_variables(key: jax.Array, channels=CHANNELS) -> dict:
    p, s, c_in = {}, {}, 1
    for i, (c, k) in enumerate(zip(channels, KERNELS)):
        w = jax.random.normal(jax.random.fold_in(key, i), (k, c_in, c)) * np.sqrt(2 / (k * c_in))
        p[f"conv{i}"] = {"w": w}
        p[f"bn{i}"] = {"scale": jnp.ones(c), "bias": jnp.zeros(c)}
        s[f"bn{i}"] = {"mean": jnp.zeros(c), "var": jnp.ones(c)}
        c_in = c
    head = jax.random.normal(jax.random.fold_in(key, 99), (c_in, 10)) / np.sqrt(c_in)
    p["head"] = {"w": head, "b": jnp.zeros(10)}
    return {"params": p, "stats": s}


def forward(v: dict, x: jax.Array, train: bool = False, momentum: float = 0.9) -> tuple:
    """Logits, and the running statistics (updated in training mode:
    ``momentum * old + (1 - momentum) * batch``)."""
    p, s = v["params"], v["stats"]
    h, new = x[..., None], {}
    for i in range(len(STRIDES)):
        h = lax.conv_general_dilated(h, p[f"conv{i}"]["w"], (STRIDES[i],), "SAME",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
        st = s[f"bn{i}"]
        if train:
            mean, var = h.mean((0, 1)), h.var((0, 1))
            new[f"bn{i}"] = {"mean": momentum * st["mean"] + (1 - momentum) * mean,
                             "var": momentum * st["var"] + (1 - momentum) * var}
        else:
            mean, var, new[f"bn{i}"] = st["mean"], st["var"], st
        h = (h - mean) * lax.rsqrt(var + 1e-5)
        h = jax.nn.relu(h * p[f"bn{i}"]["scale"] + p[f"bn{i}"]["bias"])
    return h.mean(1) @ p["head"]["w"] + p["head"]["b"], new


def apply_fn(v: dict, x: jax.Array) -> jax.Array:
    return forward(v, x)[0]


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def accuracy(v, x, y):
    return jnp.mean(jnp.argmax(apply_fn(v, x), -1) == y)


@jax.jit
def recalibrate(v, x):
    """The BatchNorm statistics re-estimated on ``x`` (the masks removed
    channels, so the next layers' input statistics changed): what a pruned,
    not fine-tuned model is evaluated with (adaptive BN, Li et al. 2020)."""
    return {"params": v["params"], "stats": forward(v, x, train=True, momentum=0.0)[1]}


# --------------------------------------------------------------------------
# Training: one jitted loop; masks (all True when dense or compacted) keep
# pruned units at zero during adaptive pruning. ``steps`` is traced (the
# loop's trip count), so every run of a method compiles one program.


@functools.partial(jax.jit, static_argnames=("batch", "slim"))
def fit(v, masks, key, x, y, lr, steps, batch, slim=None):
    steps = jnp.asarray(steps, jnp.float32)
    # optax.cosine_decay_schedule(lr, steps), which needs a Python number of steps
    sched = lambda c: lr * (0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(c, steps) / steps)))  # noqa: E731
    tx = optax.adam(sched) if slim is None else optax.chain(slim, optax.adam(sched))
    opt = tx.init(v["params"])

    def step(i, carry):
        v, opt = carry
        idx = jax.random.randint(jax.random.fold_in(key, i), (batch,), 0, x.shape[0])

        def loss(p):
            logits, stats = forward({"params": p, "stats": v["stats"]}, x[idx], train=True)
            return xent(logits, y[idx]), stats

        (_, stats), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        g = jax.tree.map(lambda a, m: jnp.where(m, a, 0), g, masks["params"])
        u, opt = tx.update(g, opt, v["params"])
        p = jax.tree.map(lambda a, m: jnp.where(m, a, 0), optax.apply_updates(v["params"], u),
                         masks["params"])
        stats = jax.tree.map(lambda a, m: jnp.where(m, a, 0), stats, masks["stats"])
        return {"params": p, "stats": stats}, opt

    v, _ = lax.fori_loop(0, steps.astype(jnp.int32), step, (v, opt))
    return v


def ones_like(v):
    return jax.tree.map(lambda a: jnp.ones(a.shape, bool), v)


def slimming_tx(graph, strength):
    """Network slimming's L1 on the BatchNorm scales (subgradient, as in the
    paper), placed before Adam. Cached so that ``fit`` compiles once."""
    return _slim_cache.setdefault(strength, jp.regularizers.slimming(graph, strength))


_slim_cache: dict = {}


# --------------------------------------------------------------------------
# Budgets per method


def kept_units(graph, masks) -> np.ndarray:
    kept = jp.structured.kept_units(graph, masks)
    return np.array([int(kept[g.index].sum()) if g.index in kept else g.size
                     for g in graph.prunable])


def one_shot(method, ctx, budget):
    """Per-group rates and the variables they prune, for the one-shot methods."""
    g, v, s, cost = ctx["graph"], ctx["dense"], BUDGETS[budget], budget
    t0, extra = time.perf_counter(), 0.0
    if method == "uniform":
        rates = jp.allocation.uniform_budget(g, s, cost=cost)
    elif method == "global":
        rates = jp.allocation.global_budget(g, jp.structured.scores(g, v), s, cost=cost)
    elif method == "sensitivity":
        if "curves" not in ctx:  # one scan serves both budgets; each row is charged it
            ctx["curves"] = jp.sensitivity.scan(ctx["val_loss"], v, granularity="group", graph=g)
            t0 = time.perf_counter()
        rates = jp.allocation.from_sensitivity(ctx["curves"], s, cost=cost)
        extra = ctx["curves"].seconds
    elif method == "search":
        cfg = ctx["cfg"]
        res = jp.search(ctx["val_acc"], v, s, graph=g, granularity="group", cost=cost,
                        higher_is_better=True, agent=cfg.agent,
                        iterations=cfg.iterations, population=cfg.population,
                        seed=ctx["seed"])
        rates = res.budget
    else:  # slimming
        v = ctx["slim"]
        rates = jp.allocation.global_budget(g, jp.structured.scores(g, v, "bn_scale"), s, cost=cost,
                                            normalize=False)
    seconds = time.perf_counter() - t0 + extra
    scores = jp.structured.scores(g, v, "bn_scale" if method == "slimming" else "l2")
    return v, jp.structured.masks(g, scores, rates), seconds


def gradual(ctx, budget, how):
    """Gradual pruning over ``prune_steps``. At each update the budget is
    re-solved at the scheduled cost: ``how="sensitivity"`` re-measures the
    curves on the current weights (adaptive budgets), ``how="global"`` puts
    one threshold on the current normalised unit norms. Returns the masked
    variables, their masks, the seconds spent on budgets and the kept units
    after each update."""
    cfg, g, d = ctx["cfg"], ctx["graph"], ctx["data"]
    v, masks = ctx["dense"], ones_like(ctx["dense"])
    s_final, updates = BUDGETS[budget], cfg.updates
    chunk = max(cfg.prune_steps // updates, 1)
    seconds, history = 0.0, []
    for u in range(updates):
        s_now = s_final * (1 - (1 - (u + 1) / updates) ** 3)
        t0 = time.perf_counter()
        scores = jp.structured.scores(g, v)
        if how == "sensitivity":
            curves = jp.sensitivity.scan(ctx["val_loss"], v, granularity="group", graph=g)
            rates = jp.allocation.from_sensitivity(curves, s_now, cost=budget)
        else:
            rates = jp.allocation.global_budget(g, scores, s_now, cost=budget)
        seconds += time.perf_counter() - t0
        masks = jp.structured.masks(g, scores, rates)
        v = jp.apply_masks(v, masks)
        history.append(kept_units(g, masks).tolist())
        v = fit(v, masks, jax.random.fold_in(ctx["key"], 1000 + u), d["x"], d["y"], cfg.lr_ft,
                chunk, cfg.batch)
    return v, masks, seconds, history


# --------------------------------------------------------------------------
# Evaluation


def measure(small, ctx, cfg) -> dict:
    """Test accuracy, size, MACs (from the compacted model's graph) and
    latency: the compacted and the dense model timed alternately on 1000
    sequences, minimum (and median) of ``reps`` calls each."""
    d = ctx["data"]
    xt, yt = jnp.asarray(d["x_test"]), jnp.asarray(d["y_test"])
    f = jax.jit(apply_fn)
    times, logits = {"small": [], "dense": []}, {}
    for i in range(cfg.reps + 1):
        for name, v in (("small", small), ("dense", ctx["dense"])):
            t0 = time.perf_counter()
            logits[name] = f(v, xt).block_until_ready()
            if i:
                times[name].append(time.perf_counter() - t0)
    params = sum(int(np.size(a)) for a in jax.tree.leaves(small["params"]))
    macs = jp.graph.trace(apply_fn, small, xt[:1]).macs
    med = {k: 1e3 * float(np.median(t)) for k, t in times.items()}
    best = {k: 1e3 * float(np.min(t)) for k, t in times.items()}
    acc = float(jnp.mean(jnp.argmax(logits["small"], -1) == yt))  # no compile per shape
    return {"accuracy": acc, "params": params, "macs": macs,
            "latency_ms": best["small"], "speedup": best["dense"] / best["small"],
            "latency_median_ms": med["small"], "speedup_median": med["dense"] / med["small"]}


def run_method(method, budget, ctx) -> dict:
    """Budget, masks, fine-tuning with the masks (the compacted model's function
    and gradients, with one compile for every method), compaction, measures."""
    cfg, g, d = ctx["cfg"], ctx["graph"], ctx["data"]
    steps, history = cfg.ft_steps, None
    if method in ("adaptive", "gradual_global"):
        how = "sensitivity" if method == "adaptive" else "global"
        base, masks, seconds, history = gradual(ctx, budget, how)
        steps = cfg.ft_steps - cfg.prune_steps
    else:
        base, masks, seconds = one_shot(method, ctx, budget)
    base = jp.apply_masks(base, masks)
    xt, yt = jnp.asarray(d["x_test"]), jnp.asarray(d["y_test"])
    pruned = float(accuracy(recalibrate(base, jnp.asarray(d["x"][:500])), xt, yt))
    tuned = fit(base, masks, jax.random.fold_in(ctx["key"], 7), d["x"], d["y"], cfg.lr_ft,
                steps, cfg.batch)
    row = measure(jp.structured.compact(g, tuned, masks), ctx, cfg)
    sizes = np.array([grp.size for grp in g.prunable])
    row.update(pruned=pruned, search_s=seconds, kept=(kept_units(g, masks) / sizes).tolist(),
               history=history)
    return row


def dense_model(ctx, key, slim: bool):
    cfg, d = ctx["cfg"], ctx["data"]
    v = init_variables(key)
    reg = slimming_tx(ctx["graph"], cfg.slim_strength) if slim else None
    return fit(v, ones_like(v), jax.random.fold_in(key, 1), d["x"], d["y"], cfg.lr,
               cfg.steps, cfg.batch, reg)


def compare_agents(ctx) -> dict:
    cfg, out = ctx["cfg"], {}
    for agent in ("es", "ddpg"):
        res = jp.search(ctx["val_acc"], ctx["dense"], BUDGETS["flops"], graph=ctx["graph"],
                        granularity="group", cost="flops", higher_is_better=True, agent=agent, iterations=cfg.iterations,
                        population=cfg.population, seed=ctx["seed"])
        out[agent] = {"best": res.metric, "curve": res.curve.tolist(),
                      "mean": res.mean.tolist(), "seconds": res.seconds,
                      "evaluations": res.evaluations}
    return out


def run_seed(seed: int, data: dict, cfg) -> dict:
    key = jax.random.key(seed)
    v0 = init_variables(key)
    xv, yv = jnp.asarray(data["x_val"]), jnp.asarray(data["y_val"])
    xc = jnp.asarray(data["x"][:500])  # calibration batch for the BatchNorm statistics
    ctx = {"cfg": cfg, "data": data, "seed": seed, "key": key,
           "graph": jp.graph.trace(apply_fn, v0, xv[:1]),
           "val_loss": lambda v: xent(apply_fn(recalibrate(v, xc), xv), yv),
           "val_acc": lambda v: accuracy(recalibrate(v, xc), xv, yv)}
    ctx["dense"] = dense_model(ctx, key, slim=False)
    ctx["slim"] = dense_model(ctx, key, slim=True)
    out = {"dense": measure(ctx["dense"], ctx, cfg),
           "slim_dense": measure(ctx["slim"], ctx, cfg), "rows": {}}
    for budget in cfg.budgets:
        for method in cfg.methods:
            out["rows"][f"{budget}/{method}"] = run_method(method, budget, ctx)
            _progress(cfg, seed, budget, method, out["rows"][f"{budget}/{method}"])
    if cfg.compare_agents:
        out["agents"] = compare_agents(ctx)
    return out


def _progress(cfg, seed, budget, method, row):
    if not cfg.no_progress:
        print(f"seed {seed} {budget:>6} {method:>14}: acc {100 * row['accuracy']:.1f} "
              f"(pruned {100 * row['pruned']:.1f}), macs {row['macs']:,}, params "
              f"{row['params']:,}, {row['latency_ms']:.2f} ms, search {row['search_s']:.1f} s",
              file=sys.stderr)


# --------------------------------------------------------------------------
# Summary, table, plot


def summarise(cfg, seeds: list, wall: float) -> dict:
    dense = seeds[0]["dense"]
    rows = []
    for budget in cfg.budgets:
        for method in cfg.methods:
            per = [s["rows"][f"{budget}/{method}"] for s in seeds]
            row = {"budget": budget, "method": method}
            for k in ("accuracy", "pruned", "params", "macs", "latency_ms", "speedup",
                      "search_s"):
                a = np.array([p[k] for p in per], float)
                row[f"{k}_mean"], row[f"{k}_std"] = float(a.mean()), float(a.std())
            row["params_frac"] = row["params_mean"] / dense["params"]
            row["macs_frac"] = row["macs_mean"] / dense["macs"]
            row["kept"] = np.mean([p["kept"] for p in per], axis=0).tolist()
            if per[0]["history"] is not None:
                row["history"] = np.mean([p["history"] for p in per], axis=0).tolist()
            rows.append(row)
    acc = np.array([s["dense"]["accuracy"] for s in seeds])
    lat = np.array([s["dense"]["latency_ms"] for s in seeds])
    out = {"config": {k: v for k, v in vars(cfg).items() if k not in ("json", "plot")},
           "device": jax.devices()[0].device_kind, "wall_time_s": wall,
           "dense": {"accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
                     "params": dense["params"], "macs": dense["macs"],
                     "latency_ms": float(lat.mean())},
           "slimming_dense_accuracy": float(np.mean([s["slim_dense"]["accuracy"]
                                                     for s in seeds])),
           "rows": rows, "per_seed": seeds}
    if cfg.compare_agents:
        out["agents"] = {a: {"best_mean": float(np.mean([s["agents"][a]["best"] for s in seeds])),
                             "best_std": float(np.std([s["agents"][a]["best"] for s in seeds])),
                             "seconds_mean": float(np.mean([s["agents"][a]["seconds"]
                                                            for s in seeds]))}
                         for a in ("es", "ddpg")}
    return out


def table(out: dict) -> str:
    d = out["dense"]
    lines = [f"dense: test accuracy {100 * d['accuracy_mean']:.1f} +- "
             f"{100 * d['accuracy_std']:.1f}%, {d['params']:,} params, {d['macs']:,} MACs, "
             f"{d['latency_ms']:.2f} ms per 1000 sequences",
             "| budget | method | accuracy (%) | pruned, not fine-tuned (%) | params | MACs | "
             "latency (ms) | speedup | search (s) | channels kept per layer |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in out["rows"]:
        kept = " / ".join(f"{k:.2f}" for k in r["kept"])
        lines.append(
            f"| {r['budget']} | {r['method']} | {100 * r['accuracy_mean']:.1f} +- "
            f"{100 * r['accuracy_std']:.1f} | {100 * r['pruned_mean']:.1f} +- "
            f"{100 * r['pruned_std']:.1f} | {100 * r['params_frac']:.1f}% | "
            f"{100 * r['macs_frac']:.1f}% | {r['latency_ms_mean']:.2f} | "
            f"{r['speedup_mean']:.2f}x | {r['search_s_mean']:.1f} | {kept} |")
    if "agents" in out:
        a = out["agents"]
        lines.append("")
        lines.append("jp.search agents, 50% MACs, best validation accuracy of the pruned "
                     "(not fine-tuned) model at equal evaluations: " + ", ".join(
                         f"{k} {100 * v['best_mean']:.1f} +- {100 * v['best_std']:.1f}% "
                         f"({v['seconds_mean']:.0f} s)" for k, v in a.items()))
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = out["config"]["budgets"]
    panels = len(budgets) + ("agents" in out)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.8), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        rows = [r for r in out["rows"] if r["budget"] == budget]
        width = 0.8 / len(rows)
        for j, r in enumerate(rows):
            x = np.arange(len(r["kept"])) + (j - len(rows) / 2 + 0.5) * width
            ax.bar(x, r["kept"], width, label=f"{r['method']} ({100 * r['accuracy_mean']:.1f}%)")
        ax.set_xticks(range(len(rows[0]["kept"])))
        ax.set_xticklabels([f"conv{i}\n{c}" for i, c in enumerate(CHANNELS)])
        ax.set_ylabel("fraction of channels kept")
        frac = "50% of MACs" if budget == "flops" else "30% of params"
        ax.set_title(f"per-layer budgets, keep {frac}")
        ax.set_ylim(0, 1.5)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.legend(fontsize=7, ncol=2, loc="upper center")
    if "agents" in out:
        ax = axes[0][-1]
        for a, c in (("es", "C0"), ("ddpg", "C3")):
            curves = 100 * np.array([s["agents"][a]["curve"] for s in out["per_seed"]])
            means = 100 * np.array([s["agents"][a]["mean"] for s in out["per_seed"]])
            it = np.arange(1, curves.shape[1] + 1) * out["config"]["population"]
            ax.plot(it, curves.mean(0), color=c, label=f"{a}: best so far")
            ax.plot(it, means.mean(0), color=c, ls=":", label=f"{a}: batch mean")
        ax.set_xlabel("candidates evaluated")
        ax.set_ylabel("validation accuracy, pruned (%)")
        ax.set_title("jp.search agents, keep 50% of MACs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------
# Entry point


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="dense training steps")
    ap.add_argument("--ft-steps", type=int, default=None, help="fine-tuning steps")
    ap.add_argument("--budgets", nargs="+", choices=tuple(BUDGETS), default=list(BUDGETS))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--agent", choices=("es", "ddpg"), default="es")
    ap.add_argument("--iterations", type=int, default=None, help="search iterations")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--updates", type=int, default=None, help="adaptive mask updates")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr-ft", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--slim-strength", type=float, default=1e-3)
    ap.add_argument("--compare-agents", action="store_true")
    ap.add_argument("--reps", type=int, default=None, help="latency repetitions")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-progress", action="store_true")
    cfg = ap.parse_args(argv)
    q = cfg.quick
    cfg.seeds = cfg.seeds or (1 if q else 3)
    cfg.steps = cfg.steps or (200 if q else 3000)
    cfg.ft_steps = cfg.ft_steps or (40 if q else 800)
    cfg.prune_steps = cfg.ft_steps // 2
    cfg.iterations = cfg.iterations or (2 if q else 25)
    cfg.updates = cfg.updates or (2 if q else 5)
    cfg.reps = cfg.reps or (3 if q else 30)
    if q:
        cfg.population = min(cfg.population, 8)
    return cfg


def main(argv=None) -> dict:
    cfg = parse(argv)
    t0 = time.time()
    data = load_data()
    seeds = [run_seed(s, data, cfg) for s in range(cfg.seeds)]
    out = summarise(cfg, seeds, time.time() - t0)
    print(table(out))
    print(f"wall time: {out['wall_time_s']:.0f} s on {out['device']}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(out, f, indent=1)
    if cfg.plot:
        plot(out, cfg.plot)
    return out


if __name__ == "__main__":
    main()

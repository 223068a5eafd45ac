"""Head-to-head study: eleven ways to train a sparse 1-D CNN on MNIST-1D.

One model, one data set, one training budget; only the sparsification
method changes:

=============  ==============================================================
dense          no pruning (the reference)
random         static random mask from step 0 (``keep_masks``)
gmp            gradual magnitude pruning (``jp.prune``, cubic
               ``optax.polynomial_schedule``; Zhu & Gupta 2017)
snip           SNIP mask at initialisation (``jp.snip``; Lee et al. 2019)
saliency       gradual pruning scored by ``|w * g|`` of the current batch
taylor         gradual pruning scored by the EMA Taylor importance
               (Molchanov et al. 2017/2019)
movement       gradual pruning scored by movement ``-sum w * g`` (Sanh et al.
               2020)
set            SET (``jp.set_training``; Mocanu et al. 2018)
rigl           RigL (``jp.rigl``; Evci et al. 2020)
ste            straight-through training (``jp.ste_training`` + ``jp.apply_masks_ste``),
               dense weights, magnitude mask on the same cubic schedule as gmp
ste_fixed      the same at the final sparsity from step 0
=============  ==============================================================

Every method prunes the same kernels (all but the first convolution, which
has only ``5 * 32`` weights) with the same per-kernel ("uniform") allocation,
at 80%, 90% and 95% sparsity, with Adam and a cosine learning-rate decay.
For each method, all (sparsity, seed) runs are ``jax.vmap``-ed together and
trained by one jitted ``lax.scan``. The gradual methods (gmp, saliency,
taylor, movement, ste) follow the cubic schedule from 10% to 60% of
training; SET and RigL exchange connections every ``steps // 40`` steps
(RigL until 75% of training); the masks of the pruning methods are updated
every ``steps // 40`` steps, STE's every ``steps // 200``.

The data come from ``mnist1d.data.make_dataset`` (generated locally, no
download). Reported: test accuracy (mean +- std over seeds) of the final
masked network, and the sparsity of its masks (pruned kernels).

Run:
  python examples/compare_methods.py --json study.json --plot study.png
  python examples/compare_methods.py --quick        # CI: dense, random, gmp, rigl at 90%,
                                                    # 300 steps, 2 seeds (~1.5 min on 2 busy cores)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxprune as jp

METHODS = (
    "dense", "random", "gmp", "snip", "saliency", "taylor", "movement", "set", "rigl", "ste",
    "ste_fixed",
)
QUICK_METHODS = ("dense", "random", "gmp", "rigl")
WHERE = r"^(conv2|conv3|dense)/kernel$"  # the first conv stays dense


# --------------------------------------------------------------------------
# Data and model


def load_data(num_samples: int = 5000):
    """MNIST-1D, generated locally (no download): 40-sample signals, 10 classes."""
    import mnist1d.data as d

    args = d.get_dataset_args()
    args.num_samples = num_samples
    data = d.make_dataset(args)
    xtr = np.asarray(data["x"], np.float32)
    mean, std = xtr.mean(), xtr.std()
    norm = lambda x: jnp.asarray((np.asarray(x, np.float32) - mean) / std)[..., None]  # noqa: E731
    return norm(data["x"]), jnp.asarray(data["y"]), norm(data["x_test"]), jnp.asarray(data["y_test"])


def init_cnn(key: jax.Array, channels: int = 32, length: int = 40) -> dict:
    """Three 1-D convolutions (kernel 5; strides 1, 2, 2) and a linear head."""
    k = jax.random.split(key, 4)

    def conv(key, c_in, c_out):
        w = jax.random.normal(key, (5, c_in, c_out)) * jnp.sqrt(2.0 / (5 * c_in))
        return {"kernel": w, "bias": jnp.zeros(c_out)}

    flat = channels * (length // 4)
    return {
        "conv1": conv(k[0], 1, channels),
        "conv2": conv(k[1], channels, channels),
        "conv3": conv(k[2], channels, channels),
        "dense": {
            "kernel": jax.random.normal(k[3], (flat, 10)) * jnp.sqrt(1.0 / flat),
            "bias": jnp.zeros(10),
        },
    }


def apply_cnn(params: dict, x: jax.Array) -> jax.Array:
    def conv(h, p, stride):
        # "SAME" 1-D convolution as one matmul on stacked shifted slices (im2col):
        # much faster than lax.conv on small CPU problems, forward and backward.
        w = p["kernel"]
        width, length = w.shape[0], h.shape[1]
        hp = jnp.pad(h, ((0, 0), (width // 2, width // 2), (0, 0)))
        cols = jnp.concatenate([hp[:, i : i + length : stride] for i in range(width)], axis=-1)
        return jax.nn.relu(cols @ w.reshape(-1, w.shape[-1]) + p["bias"])

    h = conv(x, params["conv1"], 1)
    h = conv(h, params["conv2"], 2)
    h = conv(h, params["conv3"], 2)
    return h.reshape(h.shape[0], -1) @ params["dense"]["kernel"] + params["dense"]["bias"]


def loss_fn(params: dict, batch) -> jax.Array:
    x, y = batch
    logits = apply_cnn(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(apply_cnn(params, x), -1) == y)


# --------------------------------------------------------------------------
# One method, all (sparsity, seed) runs vmapped


def make_run(method: str, cfg: dict, data):
    """A function ``(seed, sparsity) -> (test accuracy, mask sparsity)``."""
    xtr, ytr, xte, yte = data
    steps, bs = cfg["steps"], cfg["batch"]
    lr = optax.cosine_decay_schedule(cfg["lr"], steps)
    alloc = cfg["allocation"]
    upd = cfg["update_every"]

    def gradual(s):
        return optax.polynomial_schedule(
            0.0, s, power=3, transition_steps=int(0.5 * steps), transition_begin=int(0.1 * steps)
        )

    def run(seed, s):
        key = jax.random.key(seed)
        k_init, k_mask, k_data = jax.random.split(key, 3)
        params = init_cnn(k_init, cfg["channels"])
        adam = optax.adam(lr)
        if method == "dense":
            tx = adam
        elif method == "random":
            masks = jp.allocation.random_masks(k_mask, params, s, allocation=alloc, where=WHERE)
            tx = optax.chain(adam, jp.keep_masks(masks))
        elif method == "snip":
            idx = jax.random.randint(k_mask, (cfg["snip_batches"], bs), 0, xtr.shape[0])
            batches = [(xtr[i], ytr[i]) for i in idx]
            masks = jp.snip(loss_fn, params, batches, s, allocation=alloc, where=WHERE)
            tx = optax.chain(adam, jp.keep_masks(masks))
        elif method in ("gmp", "saliency", "taylor", "movement"):
            score = "magnitude" if method == "gmp" else method
            tx = jp.prune(adam, sparsity=gradual(s), score=score, allocation=alloc,
                          update_every=upd, where=WHERE)
        elif method == "set":
            tx = jp.set_training(adam, sparsity=s, drop_fraction=0.3, update_every=cfg["dst_every"],
                                 allocation=alloc, where=WHERE, seed=seed)
        elif method == "rigl":
            tx = jp.rigl(adam, sparsity=s, drop_fraction=0.3, update_every=cfg["dst_every"],
                         end_step=int(0.75 * steps), allocation=alloc, where=WHERE, seed=seed)
        elif method == "ste":
            tx = jp.ste_training(adam, sparsity=gradual(s), update_every=cfg["ste_every"],
                                 allocation=alloc, where=WHERE)
        elif method == "ste_fixed":
            tx = jp.ste_training(adam, sparsity=s, update_every=cfg["ste_every"],
                                 allocation=alloc, where=WHERE)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        state = tx.init(params)

        def step(carry, key):
            p, st = carry
            i = jax.random.randint(key, (bs,), 0, xtr.shape[0])
            if method.startswith("ste"):
                g = jax.grad(lambda q: loss_fn(jp.apply_masks_ste(q, jp.get_masks(st)), (xtr[i], ytr[i])))(p)
            else:
                g = jax.grad(loss_fn)(p, (xtr[i], ytr[i]))
            u, st = tx.update(g, st, p)
            return (optax.apply_updates(p, u), st), None

        (params, state), _ = lax.scan(step, (params, state), jax.random.split(k_data, steps))
        if method == "dense":
            return accuracy(params, xte, yte), jnp.float32(0.0)
        masks = jp.get_masks(state)
        params = jp.apply_masks(params, masks)
        kernels = [masks[n]["kernel"] for n in ("conv2", "conv3", "dense")]
        pruned = sum(jnp.sum(~k) for k in kernels)
        return accuracy(params, xte, yte), pruned / sum(k.size for k in kernels)

    return run


def study(cfg: dict, methods, sparsities, seeds, data, log=print) -> dict:
    results = {}
    for method in methods:
        sps = [0.0] if method == "dense" else list(sparsities)
        seed_grid = jnp.array([sd for _ in sps for sd in seeds], jnp.int32)
        sp_grid = jnp.array([s for s in sps for _ in seeds], jnp.float32)
        t0 = time.time()
        fn = jax.jit(jax.vmap(make_run(method, cfg, data)))
        acc, meas = jax.block_until_ready(fn(seed_grid, sp_grid))
        dt = time.time() - t0
        acc = np.asarray(acc).reshape(len(sps), len(seeds))
        meas = np.asarray(meas).reshape(len(sps), len(seeds))
        results[method] = {
            f"{s:.2f}": {
                "acc": [float(a) for a in acc[j]],
                "mean": float(acc[j].mean()),
                "std": float(acc[j].std(ddof=1)) if len(seeds) > 1 else 0.0,
                "mask_sparsity": float(meas[j].mean()),
            }
            for j, s in enumerate(sps)
        }
        log(f"{method:9s} done in {dt:6.1f} s: " + ", ".join(
            f"{k}: {v['mean'] * 100:.1f}" for k, v in results[method].items()))
    return results


def table(results: dict, sparsities) -> str:
    dense = results.get("dense", {}).get("0.00")
    head = "| method | " + " | ".join(f"{int(s * 100)}% sparse" for s in sparsities) + " |"
    lines = [head, "|---" * (len(sparsities) + 1) + "|"]
    for method, res in results.items():
        cells = []
        for s in sparsities:
            r = dense if method == "dense" else res.get(f"{s:.2f}")
            cells.append(f"{r['mean'] * 100:.1f} +- {r['std'] * 100:.1f}" if r else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, sparsities, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    xs = np.arange(len(sparsities))
    for method, res in results.items():
        if method == "dense":
            r = res["0.00"]
            ax.axhspan((r["mean"] - r["std"]) * 100, (r["mean"] + r["std"]) * 100, color="k", alpha=0.12)
            ax.axhline(r["mean"] * 100, color="k", lw=1, label="dense")
            continue
        m = [res[f"{s:.2f}"]["mean"] * 100 for s in sparsities]
        e = [res[f"{s:.2f}"]["std"] * 100 for s in sparsities]
        ax.errorbar(xs, m, yerr=e, marker="o", ms=3, capsize=2, lw=1, label=method)
    ax.set_xticks(xs, [f"{int(s * 100)}%" for s in sparsities])
    ax.set_xlabel("sparsity (pruned kernels)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST-1D, 1-D CNN: sparse training methods")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short CI run (< 1 minute)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds")
    ap.add_argument("--sparsities", type=str, default=None,
                    help="comma-separated (default 0.8,0.9,0.95; --quick: 0.9)")
    ap.add_argument("--methods", type=str, default=None,
                    help=f"comma-separated subset of {','.join(METHODS)} (default all; "
                         f"--quick: {','.join(QUICK_METHODS)})")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--samples", type=int, default=None, help="MNIST-1D num_samples")
    ap.add_argument("--allocation", type=str, default="uniform",
                    help="per-kernel budget for every method: uniform, global or erk")
    ap.add_argument("--json", type=str, default=None, help="write results to this JSON file")
    ap.add_argument("--plot", type=str, default=None, help="write a PNG plot here")
    args = ap.parse_args(argv)
    methods_arg = args.methods or ",".join(QUICK_METHODS if args.quick else METHODS)
    methods = [m for m in methods_arg.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {','.join(METHODS)}")
    sparsities = [float(s) for s in (args.sparsities or ("0.9" if args.quick else "0.8,0.9,0.95")).split(",")]
    steps = args.steps or (300 if args.quick else 3000)
    n_seeds = args.seeds or (2 if args.quick else 3)
    samples = args.samples or (1500 if args.quick else 5000)
    cfg = dict(
        steps=steps, batch=100, lr=1e-2, channels=args.channels, allocation=args.allocation,
        update_every=max(1, steps // 40), dst_every=max(1, steps // 40),
        ste_every=max(1, steps // 200), snip_batches=4,
    )
    t0 = time.time()
    data = load_data(samples)
    print(f"MNIST-1D: {data[0].shape[0]} train / {data[2].shape[0]} test; config {cfg}")
    results = study(cfg, methods, sparsities, list(range(n_seeds)), data)
    print(table(results, sparsities))
    print(f"total {time.time() - t0:.0f} s")
    out = {"config": cfg, "sparsities": sparsities, "seeds": n_seeds, "samples": samples,
           "results": results, "seconds": time.time() - t0}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        plot(results, sparsities, args.plot)
    return out


if __name__ == "__main__":
    main()

"""Lottery tickets on MNIST-1D: iterative magnitude pruning with rewinding.

Reproduces the lottery-ticket experiment of Frankle & Carbin (2019) at the
scale of the MNIST-1D study (Greydanus & Kobak): an MLP 40-500-500-10 with a
residual second layer (``h = h + relu(W2 h)``), Adam (lr 2e-2), batch 100,
1500 steps per round, magnitude pruning of 20% of the remaining weights
per round (all three kernels; biases are not pruned), survivors rewound to
their initial values. 17 rounds bring the kernels to 2.3% of their weights.

``--allocation uniform`` (the default) prunes every kernel to the same
sparsity, layer-wise, as the MNIST-1D study does; ``--allocation global``
uses one magnitude threshold over the three kernels (Frankle & Carbin's
choice for large networks). The choice matters for the random-mask
control, which copies the ticket's per-layer sparsity: global pruning keeps
the small input and output layers far denser than the 500x500 one (at 4.4%
overall: about 22%, 2.7% and 20%), and a random mask with those per-layer
densities is nearly as good as the ticket (see BENCHMARKS.md).

At every round the winning ticket is compared with two controls, each
trained for a full round at the ticket's sparsity:

* **random mask**: a random mask with the ticket's per-layer sparsity
  (``jp.masks.random_like``), applied to the same initialisation;
* **random re-init**: the ticket's mask on a fresh initialisation
  (``jp.lottery.random_reinit``).

The ticket runs through ``jp.lottery_ticket``: the whole IMP schedule
(snapshot of theta_0, pruning at every round end, rewinding, fresh Adam
moments) lives in the optimizer state, and one compiled training step runs
every round. ``steps_per_round`` is ``steps + 1``: ``steps`` Adam steps,
then the round-end call that prunes and rewinds; the trained ticket is
evaluated just before that call. Reported: test accuracy at the end of each
round ("final") and the best of the evaluations every ``--eval-every`` steps
("best"), for each seed; the table shows mean +- std over seeds.

Data: ``mnist1d.data.make_dataset`` (4000 train / 1000 test sequences of
length 40, generated locally, already standardised; no download).

Run:
  python examples/lottery_mnist1d.py --json lottery_mnist1d.json --plot lottery_mnist1d.png
  python examples/lottery_mnist1d.py --quick   # CI-sized: well under a minute

References:
  Frankle & Carbin, "The lottery ticket hypothesis: finding sparse,
  trainable neural networks", ICLR 2019; Greydanus & Kobak, "Scaling down
  deep learning with MNIST-1D", ICML 2024 (lottery tickets on MNIST-1D).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxprune as jp
from jaxprune.train import lottery

VARIANTS = ("ticket", "random_mask", "random_reinit")


# --------------------------------------------------------------------------
# Data and model


def load_data() -> dict[str, np.ndarray]:
    import mnist1d.data as d

    data = d.make_dataset(d.get_dataset_args())  # generated locally, standardised
    return {
        "x": np.asarray(data["x"], np.float32),
        "y": np.asarray(data["y"], np.int32),
        "x_test": np.asarray(data["x_test"], np.float32),
        "y_test": np.asarray(data["y_test"], np.int32),
    }


def init_params(key: jax.Array, hidden: int = 500, n_in: int = 40, n_out: int = 10) -> dict:
    """PyTorch ``nn.Linear`` default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    shapes = {"dense1": (n_in, hidden), "dense2": (hidden, hidden), "out": (hidden, n_out)}
    params = {}
    for i, (name, (fan_in, fan_out)) in enumerate(shapes.items()):
        kw, kb = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / np.sqrt(fan_in)
        params[name] = {
            "kernel": jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound),
        }
    return params


def forward(params: dict, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    h = h + jax.nn.relu(h @ params["dense2"]["kernel"] + params["dense2"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()


def accuracy(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(forward(params, x), -1) == y)


# --------------------------------------------------------------------------
# Training (one jitted lax.scan per round and per model)


def make_trainers(data: dict, cfg: argparse.Namespace):
    x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
    xt, yt = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    n, steps, every = x.shape[0], cfg.steps, cfg.eval_every

    def batch(key, i):
        idx = jax.random.randint(jax.random.fold_in(key, i), (cfg.batch,), 0, n)
        return x[idx], y[idx]

    def scan_steps(tx, params, state, key, length):
        """``length`` update calls; test accuracy after every ``every``-th of
        the first ``steps`` (and after step ``steps``), -1 elsewhere."""

        def body(carry, i):
            p, s = carry
            g = jax.grad(loss_fn)(p, *batch(key, i))
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
            acc = lax.cond(
                (i < steps) & (((i + 1) % every == 0) | (i == steps - 1)),
                lambda: accuracy(p, xt, yt),
                lambda: jnp.float32(-1.0),
            )
            return (p, s), acc

        (params, state), accs = lax.scan(body, (params, state), jnp.arange(length))
        return params, state, accs

    ticket_tx = jp.lottery_ticket(
        optax.adam(cfg.lr),
        rounds=cfg.rounds,
        steps_per_round=steps + 1,
        prune_rate=cfg.prune_rate,
        rewind_step=0,
        allocation=cfg.allocation,
    )

    @jax.jit
    def ticket_round(params, state, key):
        """One IMP round in one scan: ``steps`` Adam steps (the accuracy of
        the trained ticket is taken after the last), then the round-end call
        (prune + rewind; after the last round an ordinary step, not used)."""
        params, state, accs = scan_steps(ticket_tx, params, state, key, steps + 1)
        return params, state, accs[steps - 1], jnp.max(accs)

    @jax.jit
    def control_run(params, masks, key):
        """A full round of masked training from ``params`` (already masked)."""
        tx = optax.chain(optax.adam(cfg.lr), jp.keep_masks(masks))
        _, _, accs = scan_steps(tx, params, tx.init(params), key, steps)
        return accs[-1], jnp.max(accs)

    return ticket_tx, ticket_round, control_run


# --------------------------------------------------------------------------
# The experiment


def kept_fraction(masks: dict) -> float:
    leaves = [m for m in jax.tree.leaves(masks) if m.ndim]
    return float(sum(int(m.sum()) for m in leaves) / sum(m.size for m in leaves))


def run(cfg: argparse.Namespace, progress: bool = True) -> dict:
    t0 = time.time()
    data = load_data()
    ticket_tx, ticket_round, control_run = make_trainers(data, cfg)
    R = cfg.rounds
    res = {v: {"final": np.zeros((cfg.seeds, R + 1)), "best": np.zeros((cfg.seeds, R + 1))} for v in VARIANTS}
    remaining = np.zeros((cfg.seeds, R + 1))
    from tqdm import tqdm

    random_mask = jax.jit(jp.masks.random_like)
    bar = tqdm(total=cfg.seeds * (3 * R + 1), desc="lottery", disable=not progress, file=sys.stderr)
    for seed in range(cfg.seeds):
        key = jax.random.key(seed)
        k_init, k_data, k_ctrl = jax.random.split(key, 3)
        theta0 = init_params(k_init, cfg.hidden)
        params, state = theta0, ticket_tx.init(theta0)
        for r in range(R + 1):
            masks = jp.get_masks(state)
            remaining[seed, r] = kept_fraction(masks)
            k_round = jax.random.fold_in(k_data, r)
            params, state, fin, best = ticket_round(params, state, k_round)
            res["ticket"]["final"][seed, r], res["ticket"]["best"][seed, r] = float(fin), float(best)
            bar.update()
            if r == 0:  # dense: the controls are the same network
                for v in VARIANTS[1:]:
                    res[v]["final"][seed, 0] = res["ticket"]["final"][seed, 0]
                    res[v]["best"][seed, 0] = res["ticket"]["best"][seed, 0]
                continue
            kr = jax.random.fold_in(k_ctrl, r)
            rmask = random_mask(jax.random.fold_in(kr, 0), masks)
            start = {
                "random_mask": (lottery.rewind(theta0, rmask), rmask),
                "random_reinit": (
                    lottery.random_reinit(
                        jax.random.fold_in(kr, 1), lambda k: init_params(k, cfg.hidden), masks
                    ),
                    masks,
                ),
            }
            for v, (p0, m) in start.items():
                fin, best = control_run(p0, m, k_round)
                res[v]["final"][seed, r], res[v]["best"][seed, r] = float(fin), float(best)
                bar.update()
        bar.set_postfix(seed=seed)
    bar.close()
    wall = time.time() - t0
    return summarise(cfg, res, remaining, wall)


def _nearest_round(remaining: np.ndarray, sparsity: float) -> int:
    return int(np.argmin(np.abs((1.0 - remaining) - sparsity)))


def summarise(cfg, res, remaining, wall) -> dict:
    rem = remaining.mean(0)
    rows = []
    for r in range(cfg.rounds + 1):
        row = {"round": r, "remaining": float(rem[r]), "sparsity": float(1 - rem[r])}
        for v in VARIANTS:
            for kind in ("final", "best"):
                a = res[v][kind][:, r]
                row[f"{v}_{kind}_mean"] = float(a.mean())
                row[f"{v}_{kind}_std"] = float(a.std())
        rows.append(row)
    dense = res["ticket"]["final"][:, 0]
    targets = {}
    for name, s in (("sparsity_90", 0.90), ("sparsity_96", 0.96)):
        r = _nearest_round(rem, s)
        t = res["ticket"]["final"][:, r]
        rm = res["random_mask"]["final"][:, r]
        targets[name] = {
            "round": r,
            "sparsity": float(1 - rem[r]),
            "ticket": float(t.mean()),
            "random_mask": float(rm.mean()),
            "random_reinit": float(res["random_reinit"]["final"][:, r].mean()),
            "dense": float(dense.mean()),
            "ticket_minus_dense": float(t.mean() - dense.mean()),
            "ticket_minus_random_mask": float(t.mean() - rm.mean()),
        }
    targets["ticket_ge_dense_at_90"] = targets["sparsity_90"]["ticket_minus_dense"] >= 0.0
    targets["ticket_beats_random_mask_by_10pts_at_96"] = (
        targets["sparsity_96"]["ticket_minus_random_mask"] >= 0.10
    )
    return {
        "config": {k: v for k, v in vars(cfg).items() if k not in ("json", "plot")},
        "device": jax.devices()[0].device_kind,
        "wall_time_s": wall,
        "dense": {"final_mean": float(dense.mean()), "final_std": float(dense.std()),
                  "best_mean": float(res["ticket"]["best"][:, 0].mean()),
                  "best_std": float(res["ticket"]["best"][:, 0].std())},
        "rows": rows,
        "per_seed": {
            "remaining": remaining.tolist(),
            **{f"{v}_{kind}": res[v][kind].tolist() for v in VARIANTS for kind in ("final", "best")},
        },
        "targets": targets,
    }


def table(out: dict, kind: str = "final") -> str:
    lines = [
        f"test accuracy (%) at the end of each round ({kind}), mean +- std over "
        f"{out['config']['seeds']} seeds; dense {100 * out['dense'][kind + '_mean']:.1f} +- "
        f"{100 * out['dense'][kind + '_std']:.1f}",
        "| round | remaining | ticket | random mask | random re-init |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in out["rows"]:
        cells = [
            f"{100 * row[f'{v}_{kind}_mean']:.1f} +- {100 * row[f'{v}_{kind}_std']:.1f}"
            for v in VARIANTS
        ]
        lines.append(f"| {row['round']} | {100 * row['remaining']:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rem = 100 * np.array([row["remaining"] for row in out["rows"]])
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    labels = {"ticket": "winning ticket (IMP, rewind to init)", "random_mask": "random mask",
              "random_reinit": "random re-init"}
    for v, c in zip(VARIANTS, ("C0", "C3", "C2")):
        acc = 100 * np.array(out["per_seed"][f"{v}_final"])
        mean, std = acc.mean(0), acc.std(0)
        ax.plot(rem, mean, "o-", color=c, ms=3, label=labels[v])
        ax.fill_between(rem, mean - std, mean + std, color=c, alpha=0.2, lw=0)
    ax.axhline(100 * out["dense"]["final_mean"], color="k", ls="--", lw=1, label="dense")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Lottery tickets on MNIST-1D ({out['config']['seeds']} seeds, mean +- std)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (well under a minute)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="pruning rounds (default 17; quick 3)")
    ap.add_argument("--steps", type=int, default=None, help="Adam steps per round (default 1500; quick 100)")
    ap.add_argument("--prune-rate", type=float, default=0.2)
    ap.add_argument(
        "--allocation",
        choices=("uniform", "global"),
        default="uniform",
        help="uniform: every kernel at the same sparsity (layer-wise pruning, as in the "
        "MNIST-1D study); global: one magnitude threshold over all kernels",
    )
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--plot", default=None, help="write the PNG plot here")
    ap.add_argument("--no-progress", action="store_true")
    cfg = ap.parse_args(argv)
    quick = cfg.quick
    cfg.seeds = cfg.seeds or (1 if quick else 3)
    cfg.rounds = cfg.rounds or (3 if quick else 17)
    cfg.steps = cfg.steps or (100 if quick else 1500)
    cfg.eval_every = min(cfg.eval_every, cfg.steps)
    return cfg


def main(argv=None) -> dict:
    cfg = parse(argv)
    out = run(cfg, progress=not cfg.no_progress)
    print(table(out, "final"))
    print()
    print(table(out, "best"))
    t = out["targets"]
    print(
        f"\nticket - dense at {100 * t['sparsity_90']['sparsity']:.1f}% sparsity: "
        f"{100 * t['sparsity_90']['ticket_minus_dense']:+.1f} points; "
        f"ticket - random mask at {100 * t['sparsity_96']['sparsity']:.1f}% sparsity: "
        f"{100 * t['sparsity_96']['ticket_minus_random_mask']:+.1f} points"
    )
    print(f"wall time: {out['wall_time_s']:.0f} s on {out['device']}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(out, f, indent=1)
    if cfg.plot:
        plot(out, cfg.plot)
    return out


if __name__ == "__main__":
    main()

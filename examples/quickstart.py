"""Quick start: gradual magnitude pruning of an MLP to 90% sparsity.

What it shows:

* ``jp.prune`` wraps an optax optimizer (here Adam). Nothing else changes in
  the training loop: ``optax.apply_updates`` alone keeps pruned weights at
  exactly zero.
* The sparsity follows the cubic schedule of Zhu & Gupta (2017),
  ``optax.polynomial_schedule(0.0, 0.9, power=3, ...)``, and the masks are
  recomputed from the weight magnitudes every ``update_every`` steps.
* Three MLPs (64-256-256-10) are trained the same way on scikit-learn's 8x8
  digits: dense, magnitude-pruned to 90%, and a control pruned to the same
  per-kernel sparsity with random scores (``score="random"``).
* ``jp.summary(params)`` prints, per kernel, how many weights are left.

Run:
  python examples/quickstart.py                 # ~2000 steps, < 1 min on a CPU
  python examples/quickstart.py --quick         # a few seconds
  python examples/quickstart.py --json out.json # also write the numbers
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxprune as jp

SPARSITY = 0.9


def load_data():
    """Digits (1797 images, 8x8, 10 classes), a fixed stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return jnp.asarray(xtr), jnp.asarray(ytr), jnp.asarray(xte), jnp.asarray(yte)


def init_mlp(key, sizes=(64, 256, 256, 10)):
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {
            "kernel": jax.random.normal(sub, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
            "bias": jnp.zeros(n_out),
        }
    return params


def mlp(params, x):
    *hidden, last = params.values()
    for layer in hidden:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    return x @ last["kernel"] + last["bias"]


def loss_fn(params, x, y):
    logits = mlp(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(mlp(params, x), -1) == y))


def train(tx, data, steps, batch_size=128, seed=0):
    """Trains an MLP with ``tx``; the whole loop is one jitted ``lax.scan``."""
    xtr, ytr, _, _ = data
    params = init_mlp(jax.random.key(seed))
    opt_state = tx.init(params)

    def step(carry, key):
        params, opt_state = carry
        idx = jax.random.randint(key, (batch_size,), 0, len(xtr))
        grads = jax.grad(loss_fn)(params, xtr[idx], ytr[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    keys = jax.random.split(jax.random.key(seed + 1), steps)
    run = jax.jit(lambda carry: jax.lax.scan(step, carry, keys)[0])
    return run((params, opt_state))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="300 steps, a few seconds")
    parser.add_argument("--json", metavar="PATH", help="write the results to this file")
    args = parser.parse_args(argv)
    steps = 300 if args.quick else args.steps
    data = load_data()

    # Cubic ramp from 0 to 90% between 10% and 60% of training; masks are
    # recomputed every `update_every` steps (the last update lands on the ramp's end).
    update_every = max(1, steps // 40)
    sparsity = optax.polynomial_schedule(
        0.0, SPARSITY, power=3, transition_steps=steps // 2, transition_begin=steps // 10
    )
    adam = optax.adam(1e-3)
    pruned_tx = jp.prune(adam, sparsity=sparsity, update_every=update_every)
    random_tx = jp.prune(adam, sparsity=sparsity, update_every=update_every, score="random")

    dense, _ = train(adam, data, steps)
    pruned, opt_state = train(pruned_tx, data, steps)
    control, _ = train(random_tx, data, steps)

    table = jp.summary(pruned)  # kernels only (the default where=); biases are not pruned
    print(table)
    _, _, xte, yte = data
    results = {
        "steps": steps,
        "target_sparsity": SPARSITY,
        "sparsity": jp.sparsity_of(pruned),
        "random_sparsity": jp.sparsity_of(control),
        "mask_sparsity": jp.sparsity_of(jp.get_masks(opt_state)),
        "dense_acc": accuracy(dense, xte, yte),
        "pruned_acc": accuracy(pruned, xte, yte),
        "random_acc": accuracy(control, xte, yte),
        "summary": table.to_dict(),  # per leaf: path, shape, size, kept, sparsity
    }
    print(f"\ntest accuracy after {steps} steps:")
    print(f"  dense                      {results['dense_acc']:.2%}")
    print(f"  magnitude-pruned to {results['sparsity']:.0%}   {results['pruned_acc']:.2%}")
    print(f"  random-pruned to {results['random_sparsity']:.0%}      {results['random_acc']:.2%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()

"""Pruning a Flax NNX model: ``jp.prune`` inside ``nnx.Optimizer``.

A small CNN on scikit-learn's 8x8 digits is trained twice, dense and with
gradual magnitude pruning to 90% of every kernel (conv and linear; biases are
not pruned). The only change from dense NNX training is the optax optimizer
handed to ``nnx.Optimizer``::

    tx = jp.prune(optax.adam(1e-3), sparsity=schedule, update_every=...)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, grads)          # inside an nnx.jit train step

It then reads the masks back from the optimizer state with
``jp.get_masks(optimizer.opt_state)`` (an ``nnx.State`` of bool arrays, the
structure of the parameters) and prints the per-kernel summary of the model.

Run:
  python examples/flax_nnx.py                  # ~1500 steps, about a minute on a CPU
  python examples/flax_nnx.py --quick          # a few seconds
  python examples/flax_nnx.py --json out.json  # also write the numbers
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxprune as jp

SPARSITY = 0.9


def load_data():
    """Digits as (N, 8, 8, 1) images, a fixed stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(4 * 4 * 64, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))  # 8x8 -> 4x4
        x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    grads = nnx.grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def train(tx, data, steps, batch_size=128, seed=0):
    xtr, _, ytr, _ = data
    model = CNN(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(xtr), batch_size)
        train_step(model, optimizer, xtr[idx], ytr[idx])
    return model, optimizer


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="150 steps, a few seconds")
    parser.add_argument("--json", metavar="PATH", help="write the results to this file")
    args = parser.parse_args(argv)
    steps = 150 if args.quick else args.steps
    data = load_data()
    _, xte, _, yte = data

    update_every = max(1, steps // 30)
    sparsity = optax.polynomial_schedule(
        0.0, SPARSITY, power=3, transition_steps=steps // 2, transition_begin=steps // 10
    )
    dense, _ = train(optax.adam(1e-3), data, steps)
    tx = jp.prune(optax.adam(1e-3), sparsity=sparsity, update_every=update_every)
    model, optimizer = train(tx, data, steps)

    params = nnx.state(model, nnx.Param)
    masks = jp.get_masks(optimizer.opt_state)  # nnx.State of bool arrays, like params
    table = jp.summary(params)
    print(table)
    results = {
        "steps": steps,
        "target_sparsity": SPARSITY,
        "sparsity": jp.sparsity_of(params),
        "mask_sparsity": jp.sparsity_of(masks),
        "dense_acc": float(accuracy(dense, xte, yte)),
        "pruned_acc": float(accuracy(model, xte, yte)),
        "summary": table.to_dict(),  # per leaf: path, shape, size, kept, sparsity
    }
    print(f"\ntest accuracy after {steps} steps:")
    print(f"  dense                      {results['dense_acc']:.2%}")
    print(f"  magnitude-pruned to {results['sparsity']:.0%}   {results['pruned_acc']:.2%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()

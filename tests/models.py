"""Small models written in the styles of real model code, for tests that need
real model structure (leaf selection here, the model graph later).

Each builder returns ``(apply_fn, variables, example_input)`` with
``apply_fn(variables, example_input)`` the model's output (inference mode):

* :func:`linen_resnet`: a Flax Linen ResNet as in Flax's ImageNet example
  (``conv_init``/``bn_init``, residual blocks of Conv + BatchNorm with a 1x1
  projection, ``batch_stats``, a Dense head); ``apply_fn(v, x, train=True)``
  returns ``(logits, new_batch_stats)``.
* :func:`nnx_minigpt`: a Flax NNX decoder in the style of the MiniGPT tutorial
  (token and position ``nnx.Embed``, ``nnx.MultiHeadAttention`` with
  ``(d, heads, head_dim)`` kernels and ``(heads, head_dim)`` biases,
  LayerNorm, an MLP, a causal mask); ``variables`` is the ``nnx.Param``
  state.
* :func:`equinox_cnn`: an Equinox CNN as in Equinox's MNIST example
  (``eqx.nn.Conv2d`` with a ``(C, 1, 1)`` bias, pooling, ``eqx.nn.Linear``,
  an ``eqx.nn.MLP``, and activation functions as pytree leaves);
  ``variables`` is the model itself.
* :func:`linen_scan_stack`: a Linen stack of blocks under ``nn.scan`` with
  ``variable_axes={'params': 0, 'batch_stats': 0}`` (biases, LayerNorm and
  BatchNorm leaves are ``(L, d)``).
* :func:`pmap_replicated`: a Linen MLP with BatchNorm whose variables carry a
  leading device axis of 2, as ``jax.pmap`` training replicates them;
  ``apply_fn`` maps over that axis (``jax.vmap``, as ``pmap`` maps over
  devices).

:data:`KERNELS` lists, per builder, the paths of its dense and conv kernels:
what the default ``where=`` must select, and nothing else.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["KERNELS", "MODELS", "equinox_cnn", "linen_resnet", "linen_scan_stack",
           "nnx_minigpt", "pmap_replicated"]


# --------------------------------------------------------------------------
# Flax Linen ResNet


def _resnet_module():
    import flax.linen as nn

    class ResNetBlock(nn.Module):
        filters: int
        strides: tuple = (1, 1)

        @nn.compact
        def __call__(self, x, train: bool):
            norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
            y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
            y = nn.relu(norm()(y))
            y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
            y = norm()(y)
            if x.shape != y.shape:
                x = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False,
                            name="conv_proj")(x)
                x = norm(name="norm_proj")(x)
            return nn.relu(x + y)

    class ResNet(nn.Module):
        num_classes: int = 10

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_init")(x)
            x = nn.relu(x)
            x = ResNetBlock(8)(x, train)
            x = ResNetBlock(16, strides=(2, 2))(x, train)
            return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))

    return ResNet()


def linen_resnet(seed: int = 0):
    """A Linen ResNet (2 blocks) on ``(2, 8, 8, 3)`` images."""
    model = _resnet_module()
    x = jax.random.normal(jax.random.key(seed + 1), (2, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(seed), x)

    def apply_fn(variables, x, train=False):
        if not train:
            return model.apply(variables, x)
        y, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return y, updated["batch_stats"]

    return apply_fn, variables, x


# --------------------------------------------------------------------------
# Flax NNX MiniGPT


def _minigpt(maxlen, vocab, d, heads, ff, layers, rngs):
    from flax import nnx

    class TokenAndPositionEmbedding(nnx.Module):
        def __init__(self):
            self.token_emb = nnx.Embed(vocab, d, rngs=rngs)
            self.pos_emb = nnx.Embed(maxlen, d, rngs=rngs)

        def __call__(self, tokens):
            return self.token_emb(tokens) + self.pos_emb(jnp.arange(tokens.shape[-1]))

    class TransformerBlock(nnx.Module):
        def __init__(self):
            self.mha = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False,
                                              rngs=rngs)
            self.layer_norm1 = nnx.LayerNorm(d, rngs=rngs)
            self.linear1 = nnx.Linear(d, ff, rngs=rngs)
            self.linear2 = nnx.Linear(ff, d, rngs=rngs)
            self.layer_norm2 = nnx.LayerNorm(d, rngs=rngs)

        def __call__(self, x, mask):
            x = self.layer_norm1(x + self.mha(x, mask=mask))
            return self.layer_norm2(x + self.linear2(nnx.relu(self.linear1(x))))

    class MiniGPT(nnx.Module):
        def __init__(self):
            self.embedding_layer = TokenAndPositionEmbedding()
            self.transformer_blocks = nnx.List([TransformerBlock() for _ in range(layers)])
            self.output_layer = nnx.Linear(d, vocab, rngs=rngs)

        def __call__(self, tokens):
            mask = nnx.make_causal_mask(tokens)
            x = self.embedding_layer(tokens)
            for block in self.transformer_blocks:
                x = block(x, mask)
            return self.output_layer(x)

    return MiniGPT()


def nnx_minigpt(seed: int = 0):
    """A 2-block NNX decoder (vocab 32, d 16, 2 heads of 8) on ``(2, 8)`` tokens."""
    from flax import nnx

    model = _minigpt(maxlen=8, vocab=32, d=16, heads=2, ff=32, layers=2, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(seed + 1), (2, 8), 0, 32)

    def apply_fn(params, tokens):
        return nnx.merge(graphdef, params, rest)(tokens)

    return apply_fn, params, tokens


# --------------------------------------------------------------------------
# Equinox CNN


def equinox_cnn(seed: int = 0):
    """An Equinox CNN on ``(2, 1, 12, 12)`` images (vmapped over the batch)."""
    import equinox as eqx

    class CNN(eqx.Module):
        layers: list

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.layers = [
                eqx.nn.Conv2d(1, 3, kernel_size=3, key=k1),
                eqx.nn.MaxPool2d(kernel_size=2),
                jax.nn.relu,
                jnp.ravel,
                eqx.nn.Linear(3 * 9 * 9, 16, key=k2),
                jax.nn.sigmoid,
                eqx.nn.MLP(16, 10, width_size=16, depth=1, activation=jax.nn.gelu, key=k3),
                jax.nn.log_softmax,
            ]

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = CNN(jax.random.key(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (2, 1, 12, 12))
    return (lambda model, x: jax.vmap(model)(x)), model, x


# --------------------------------------------------------------------------
# Flax Linen scan over layers


def linen_scan_stack(seed: int = 0, layers: int = 4):
    """``layers`` blocks (Dense, LayerNorm, BatchNorm, residual) under
    ``nn.scan`` between an input and a head Dense, on ``(2, 4)`` inputs."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            y = nn.LayerNorm()(nn.Dense(x.shape[-1])(x))
            y = nn.BatchNorm(use_running_average=True)(y)
            return x + nn.relu(y), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8, name="input")(x)
            blocks = nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0},
                             split_rngs={"params": True}, length=layers)
            x, _ = blocks(name="layers")(x, None)
            return nn.Dense(3, name="head")(x)

    model = Stack()
    x = jax.random.normal(jax.random.key(seed + 1), (2, 4))
    return model.apply, jax.jit(model.init)(jax.random.key(seed), x), x


# --------------------------------------------------------------------------
# pmap-style replicated variables


def pmap_replicated(seed: int = 0, devices: int = 2):
    """A Linen MLP with BatchNorm, variables replicated on a leading axis of
    ``devices``; inputs ``(devices, 4, 6)``."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(8)(x)))
            return nn.Dense(3)(x)

    model = MLP()
    x = jax.random.normal(jax.random.key(seed + 1), (devices, 4, 6))
    variables = jax.jit(model.init)(jax.random.key(seed), x[0])
    replicated = jax.tree.map(lambda v: jnp.broadcast_to(v, (devices, *v.shape)), variables)
    return jax.vmap(model.apply), replicated, x


MODELS = {
    "linen_resnet": linen_resnet,
    "nnx_minigpt": nnx_minigpt,
    "equinox_cnn": equinox_cnn,
    "linen_scan_stack": linen_scan_stack,
    "pmap_replicated": pmap_replicated,
}

KERNELS = {
    "linen_resnet": [
        "params/Dense_0/kernel",
        "params/ResNetBlock_0/Conv_0/kernel",
        "params/ResNetBlock_0/Conv_1/kernel",
        "params/ResNetBlock_1/Conv_0/kernel",
        "params/ResNetBlock_1/Conv_1/kernel",
        "params/ResNetBlock_1/conv_proj/kernel",
        "params/conv_init/kernel",
    ],
    "nnx_minigpt": [
        *[f"transformer_blocks/{i}/{name}/kernel"
          for i in range(2)
          for name in ("linear1", "linear2", "mha/key", "mha/out", "mha/query", "mha/value")],
        "output_layer/kernel",
    ],
    "equinox_cnn": [
        "layers/0/weight",
        "layers/4/weight",
        "layers/6/layers/0/weight",
        "layers/6/layers/1/weight",
    ],
    "linen_scan_stack": [
        "params/head/kernel",
        "params/input/kernel",
        "params/layers/Dense_0/kernel",
    ],
    "pmap_replicated": [
        "params/Dense_0/kernel",
        "params/Dense_1/kernel",
    ],
}

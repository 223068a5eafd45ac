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
  ``(d, heads, head_dim)`` kernels, ``(heads, head_dim)`` biases and
  attention dropout, ``nnx.Dropout`` after attention and MLP, LayerNorm, a
  causal mask); ``variables`` is the whole ``nnx.split`` state, so it holds
  PRNG keys and ``RngCount`` counters beside the parameters: the default
  test model. :func:`nnx_minigpt_model` gives the module itself.
* :func:`nnx_cnn`: the Flax NNX MNIST tutorial CNN with ``nnx.BatchNorm``
  and ``nnx.Dropout`` (state: params, batch statistics, keys, counters).
* :func:`nnx_scan_gpt`: MiniGPT blocks made with ``nnx.vmap`` (split RNGs)
  and run with ``nnx.scan``: stacked ``(L,)`` keys and counters.
* :func:`linen_dropout_cnn`: a Linen CNN with ``nn.BatchNorm`` and
  ``nn.Dropout(deterministic=not train)``.
* :func:`equinox_bn_cnn`: an Equinox CNN with ``eqx.nn.BatchNorm`` (its
  running statistics in an ``eqx.nn.State``) and ``eqx.nn.Dropout``;
  ``variables`` is ``(eqx.nn.inference_mode(model), state)``.
* :func:`plain_rng_state`: a dict of parameters with what training loops
  keep beside them: raw ``uint32`` key data, a typed key, a step counter,
  a bool flag.
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

__all__ = ["KERNELS", "MODELS", "equinox_bn_cnn", "equinox_cnn", "linen_dropout_cnn",
           "linen_resnet", "linen_scan_stack", "nnx_cnn", "nnx_minigpt", "nnx_minigpt_model",
           "nnx_scan_gpt", "plain_rng_state", "pmap_replicated"]


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


def _minigpt(maxlen, vocab, d, heads, ff, layers, rngs, kv_heads=None, rate=0.1):
    from flax import nnx

    class TokenAndPositionEmbedding(nnx.Module):
        def __init__(self):
            self.token_emb = nnx.Embed(vocab, d, rngs=rngs)
            self.pos_emb = nnx.Embed(maxlen, d, rngs=rngs)

        def __call__(self, tokens):
            return self.token_emb(tokens) + self.pos_emb(jnp.arange(tokens.shape[-1]))

    class TransformerBlock(nnx.Module):
        def __init__(self):
            self.mha = nnx.MultiHeadAttention(num_heads=heads, in_features=d,
                                              num_kv_heads=kv_heads, dropout_rate=rate,
                                              decode=False, rngs=rngs)
            self.dropout1 = nnx.Dropout(rate=rate, rngs=rngs)
            self.layer_norm1 = nnx.LayerNorm(d, epsilon=1e-6, rngs=rngs)
            self.linear1 = nnx.Linear(d, ff, rngs=rngs)
            self.linear2 = nnx.Linear(ff, d, rngs=rngs)
            self.dropout2 = nnx.Dropout(rate=rate, rngs=rngs)
            self.layer_norm2 = nnx.LayerNorm(d, epsilon=1e-6, rngs=rngs)

        def __call__(self, x, mask, training=False):
            attn = self.mha(x, mask=mask, deterministic=not training)
            x = self.layer_norm1(x + self.dropout1(attn, deterministic=not training))
            y = self.linear2(nnx.relu(self.linear1(x)))
            return self.layer_norm2(x + self.dropout2(y, deterministic=not training))

    class MiniGPT(nnx.Module):
        def __init__(self):
            self.embedding_layer = TokenAndPositionEmbedding()
            self.transformer_blocks = nnx.List([TransformerBlock() for _ in range(layers)])
            self.output_layer = nnx.Linear(d, vocab, rngs=rngs)

        def __call__(self, tokens, training=False):
            mask = nnx.make_causal_mask(tokens)
            x = self.embedding_layer(tokens)
            for block in self.transformer_blocks:
                x = block(x, mask, training=training)
            return self.output_layer(x)

    return MiniGPT()


def nnx_minigpt_model(seed: int = 0, *, heads: int = 2, kv_heads: int | None = None,
                      layers: int = 2):
    """The NNX MiniGPT module (vocab 32, d 16, ``heads`` heads, MLP 32; dropout
    0.1 in attention and after each sublayer) and ``(2, 8)`` tokens."""
    from flax import nnx

    model = _minigpt(maxlen=8, vocab=32, d=16, heads=heads, ff=32, layers=layers,
                     rngs=nnx.Rngs(params=seed, dropout=seed + 2), kv_heads=kv_heads)
    tokens = jax.random.randint(jax.random.key(seed + 1), (2, 8), 0, 32)
    return model, tokens


def _nnx_apply(model):
    """``apply_fn(state, *args)`` of an NNX module (inference mode) and its
    whole state (parameters, statistics, PRNG keys and counters)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return (lambda state, *args: nnx.merge(graphdef, state)(*args)), state


def nnx_minigpt(seed: int = 0):
    """A 2-block NNX decoder (vocab 32, d 16, 2 heads of 8) on ``(2, 8)`` tokens;
    ``variables`` is the whole state, keys and counters included."""
    model, tokens = nnx_minigpt_model(seed)
    apply_fn, state = _nnx_apply(model)
    return apply_fn, state, tokens


def nnx_cnn_model(seed: int = 0):
    """The NNX MNIST tutorial CNN with BatchNorm after each conv, on
    ``(4, 12, 12, 1)`` images."""
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, *, rngs):
            self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(8, rngs=rngs)
            self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
            self.bn2 = nnx.BatchNorm(16, rngs=rngs)
            self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = nnx.Linear(16 * 3 * 3, 32, rngs=rngs)
            self.dropout = nnx.Dropout(rate=0.1, rngs=rngs)
            self.linear2 = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = self.avg_pool(nnx.relu(self.bn1(self.conv1(x))))
            x = self.avg_pool(nnx.relu(self.bn2(self.conv2(x))))
            x = x.reshape(x.shape[0], -1)
            return self.linear2(self.dropout(nnx.relu(self.linear1(x))))

    model = CNN(rngs=nnx.Rngs(params=seed, dropout=seed + 2))
    x = jax.random.normal(jax.random.key(seed + 1), (4, 12, 12, 1))
    model.train()
    model(x)  # one training step's statistics, so the running averages are not 0 and 1
    model.eval()
    return model, x


def nnx_cnn(seed: int = 0):
    """:func:`nnx_cnn_model` as ``(apply_fn, state, images)`` (inference mode)."""
    model, x = nnx_cnn_model(seed)
    apply_fn, state = _nnx_apply(model)
    return apply_fn, state, x


def nnx_scan_gpt_model(seed: int = 0, layers: int = 3):
    """MiniGPT-style pre-norm blocks (attention with dropout, MLP, dropout)
    created with ``nnx.split_rngs`` + ``nnx.vmap`` and run with ``nnx.scan``;
    every block has its own dropout stream (keys and counters ``(layers,)``)."""
    from flax import nnx

    d, heads, ff, vocab = 16, 2, 32, 32

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False,
                                               dropout_rate=0.1, rngs=rngs)
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.up = nnx.Linear(d, ff, rngs=rngs)
            self.down = nnx.Linear(ff, d, rngs=rngs)
            self.dropout = nnx.Dropout(0.1, rngs=rngs)

        def __call__(self, x):
            x = x + self.dropout(self.attn(self.ln1(x)))
            return x + self.dropout(self.down(nnx.gelu(self.up(self.ln2(x)))))

    class ScanGPT(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, d, rngs=rngs)

            @nnx.split_rngs(splits=layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)
            self.head = nnx.Linear(d, vocab, rngs=rngs)

        def __call__(self, tokens):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            return self.head(body(self.embed(tokens), self.blocks))

    model = ScanGPT(nnx.Rngs(params=seed, dropout=seed + 2))
    model.eval()
    return model, jax.random.randint(jax.random.key(seed + 1), (2, 8), 0, vocab)


def nnx_scan_gpt(seed: int = 0):
    """:func:`nnx_scan_gpt_model` as ``(apply_fn, state, tokens)``."""
    model, tokens = nnx_scan_gpt_model(seed)
    apply_fn, state = _nnx_apply(model)
    return apply_fn, state, tokens


# --------------------------------------------------------------------------
# Flax Linen CNN with dropout


def linen_dropout_cnn(seed: int = 0):
    """A Linen CNN (Conv, BatchNorm, Dropout, Conv, Dense, Dropout, Dense) on
    ``(4, 12, 12, 1)`` images; ``apply_fn(v, x, train=True, rngs=...)``
    returns ``(logits, new_batch_stats)``."""
    import flax.linen as nn

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
            x = nn.relu(nn.Conv(16, (3, 3))(x)).mean(axis=(1, 2))
            x = nn.Dropout(0.2)(nn.relu(nn.Dense(32)(x)), deterministic=not train)
            return nn.Dense(10)(x)

    model = CNN()
    x = jax.random.normal(jax.random.key(seed + 1), (4, 12, 12, 1))
    variables = jax.jit(model.init)(jax.random.key(seed), x)

    def apply_fn(variables, x, train=False, rngs=None):
        if not train:
            return model.apply(variables, x)
        y, new = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
        return y, new["batch_stats"]

    return apply_fn, variables, x


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


def equinox_bn_cnn(seed: int = 0):
    """An Equinox CNN with ``eqx.nn.BatchNorm`` (statistics in an
    ``eqx.nn.State``) and ``eqx.nn.Dropout``, made with
    ``eqx.nn.make_with_state``; ``variables`` is
    ``(eqx.nn.inference_mode(model), state)``, inputs ``(4, 1, 12, 12)``."""
    import equinox as eqx

    class CNN(eqx.Module):
        conv1: eqx.nn.Conv2d
        bn1: eqx.nn.BatchNorm
        conv2: eqx.nn.Conv2d
        bn2: eqx.nn.BatchNorm
        dropout: eqx.nn.Dropout
        linear1: eqx.nn.Linear
        linear2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3, k4 = jax.random.split(key, 4)
            self.conv1 = eqx.nn.Conv2d(1, 8, 3, padding=1, key=k1)
            self.bn1 = eqx.nn.BatchNorm(8, axis_name="batch", mode="ema")
            self.conv2 = eqx.nn.Conv2d(8, 8, 3, padding=1, key=k2)
            self.bn2 = eqx.nn.BatchNorm(8, axis_name="batch", mode="ema")
            self.dropout = eqx.nn.Dropout(0.2)
            self.linear1 = eqx.nn.Linear(8 * 6 * 6, 16, key=k3)
            self.linear2 = eqx.nn.Linear(16, 10, key=k4)

        def __call__(self, x, state, key=None):
            x, state = self.bn1(self.conv1(x), state)
            x, state = self.bn2(self.conv2(jax.nn.relu(x)), state)
            x = eqx.nn.MaxPool2d(2, 2)(jax.nn.relu(x))
            x = self.dropout(jnp.ravel(x), key=key)
            return self.linear2(jax.nn.relu(self.linear1(x))), state

    model, state = eqx.nn.make_with_state(CNN)(jax.random.key(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (4, 1, 12, 12))
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))
    _, state = batched(x, state, jax.random.split(jax.random.key(seed + 2), 4))  # statistics

    def apply_fn(variables, x):
        model, state = variables
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, state)[0]

    return apply_fn, (eqx.nn.inference_mode(model), state), x


# --------------------------------------------------------------------------
# Parameters with training state beside them


def plain_rng_state(seed: int = 0):
    """A dict MLP whose variables also hold raw ``uint32`` key data (for
    dropout), a typed key, an int32 step and a bool flag (whether the bias is
    used); ``apply_fn(v, x, train=True)`` draws dropout from the key data and
    the step. Inputs ``(3, 6)``."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    variables = {"dense": {"kernel": jax.random.normal(k1, (6, 16)),
                           "bias": jax.random.normal(k2, (16,))},
                 "out": {"kernel": jax.random.normal(k2, (16, 4))},
                 "dropout_key": jax.random.PRNGKey(seed + 3),
                 "key": jax.random.key(seed + 4),
                 "step": jnp.zeros((), jnp.int32),
                 "use_bias": jnp.array(True)}

    def apply_fn(v, x, train=False):
        b = jnp.where(v["use_bias"], v["dense"]["bias"], 0.0)
        h = jax.nn.relu(x @ v["dense"]["kernel"] + b)
        if train:
            keep = jax.random.bernoulli(jax.random.fold_in(v["dropout_key"], v["step"]), 0.9,
                                        h.shape)
            h = jnp.where(keep, h / 0.9, 0.0)
        return h @ v["out"]["kernel"]

    x = jax.random.normal(jax.random.key(seed + 1), (3, 6))
    return apply_fn, variables, x


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
    "nnx_cnn": nnx_cnn,
    "nnx_scan_gpt": nnx_scan_gpt,
    "linen_dropout_cnn": linen_dropout_cnn,
    "equinox_bn_cnn": equinox_bn_cnn,
    "plain_rng_state": plain_rng_state,
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
    "nnx_cnn": ["conv1/kernel", "conv2/kernel", "linear1/kernel", "linear2/kernel"],
    "nnx_scan_gpt": ["blocks/attn/key/kernel", "blocks/attn/out/kernel",
                     "blocks/attn/query/kernel", "blocks/attn/value/kernel", "blocks/down/kernel",
                     "blocks/up/kernel", "head/kernel"],
    "linen_dropout_cnn": ["params/Conv_0/kernel", "params/Conv_1/kernel",
                          "params/Dense_0/kernel", "params/Dense_1/kernel"],
    "equinox_bn_cnn": ["0/conv1/weight", "0/conv2/weight", "0/linear1/weight",
                       "0/linear2/weight"],
    "plain_rng_state": ["dense/kernel", "out/kernel"],
}

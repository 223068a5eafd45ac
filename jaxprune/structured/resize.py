"""Size attributes after compaction: layers whose sizes match their arrays.

:func:`jaxprune.structured.compact` returns the variables with the removed
units sliced out. A plain function that reads sizes from array shapes runs on
them as it is; model libraries also store sizes as attributes, which must
follow the arrays:

* Flax NNX: :func:`nnx` merges a compacted state and updates the size
  attributes of standard layers; :func:`compact_nnx` splits, compacts,
  merges and resizes in one call;
* Equinox: :func:`equinox` returns a copy of a module whose standard layers
  have their static size fields updated;
* Flax Linen: modules are rebuilt from their attributes at every ``apply``
  and check the stored shapes against them. Inside ``with`` :func:`linen`
  standard layers read their sizes from their parameters;
  :func:`linen_sizes` reports the new sizes per module path, for rebuilding
  a model with explicit sizes.

Every size is read from array shapes, so all of this runs under ``jax.jit``.
Only standard layers are known (each function lists them); other modules
are left as they are. A user module that stores a size of its own, or
branches on one (``if x.shape[-1] != self.features: add a projection``),
cannot be fixed generically: set its attributes yourself, or give it
explicit flags (``use_projection=True``) so that pruning cannot change the
branch it takes.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import jaxprune as jp
  >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
  ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
  >>> graphdef, state = nnx.split(model)
  >>> x = jnp.ones((3, 4))
  >>> g = jp.graph.trace(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  >>> masks = jp.structured.masks(g, jp.structured.scores(g, state), 0.5)
  >>> small = jp.resize.compact_nnx(g, model, masks)
  >>> small.layers[0].out_features, small.layers[2].in_features
  (4, 4)
  >>> masked = nnx.merge(graphdef, jp.apply_masks(state, masks))
  >>> bool(jnp.allclose(small(x), masked(x), rtol=1e-5))
  True

References:
  Fang et al., "DepGraph: towards any structural pruning", CVPR 2023 (a
  pruned model must be rebuilt with its new sizes; here the sizes are read
  back from the compacted arrays).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxprune.core.tree import PyTree
from jaxprune.core.tree import path_str as _path_str
from jaxprune.structured import units as _structured

__all__ = ["compact_nnx", "equinox", "linen", "linen_sizes", "nnx"]


def _shape(x: Any) -> tuple:
    """The shape of an array, an NNX ``Variable`` or a boxed Linen param."""
    if hasattr(x, "unbox"):  # flax.linen.Partitioned and other axis metadata
        x = x.unbox()
    return tuple(int(n) for n in np.shape(x))


def _lookup(rules: dict, cls: type) -> Callable | None:
    """The rule of ``cls`` or of its nearest base class with one."""
    return next((rules[c] for c in cls.__mro__ if c in rules), None)


def _groups(name: str, groups: int, in_per_group: int, out: int, k_in: int,
            k_out: int) -> int:
    """The group count of a grouped convolution after compaction.

    ``jp.graph`` removes a depthwise channel (one input per group) with the
    outputs it feeds, so the group count follows the channels; in a grouped
    convolution it removes the same positions from every group, so the count
    stays.
    """
    if groups == 1:
        return 1
    if in_per_group == 1 and k_in == 1:
        per = out // groups
        if k_out % per:
            raise ValueError(f"resize: depthwise convolution {name!r} has {k_out} outputs, not "
                             f"a multiple of its {per} outputs per channel.")
        return k_out // per
    if k_out % groups:
        raise ValueError(f"resize: grouped convolution {name!r} ({groups} groups) has {k_out} "
                         "outputs after compaction, not a multiple of the group count: the "
                         "masks removed different outputs in different groups.")
    return groups


def _group_norm(name: str, channels: int, group_size: int) -> int:
    """The group count of a group norm with ``channels`` left (whole groups
    removed)."""
    if channels % group_size:
        raise ValueError(f"resize: group norm {name!r} has {channels} channels, not a multiple "
                         f"of its group size {group_size}: only whole groups can be removed.")
    return channels // group_size


# --------------------------------------------------------------------------
# Flax NNX


def _first(mod: Any, *names: str) -> tuple | None:
    """The shape of the first of ``names`` that ``mod`` holds (not None)."""
    for n in names:
        v = getattr(mod, n, None)
        if v is not None:
            return _shape(v)
    return None


def _nnx_linear(mod, name):
    k = _shape(mod.kernel)
    return {"in_features": k[-2], "out_features": k[-1]}


def _trailing(shape: tuple, like: tuple) -> tuple:
    """The last ``len(like)`` sizes: one layer's shape, also for a stack of
    layers (``nnx.vmap``) whose arrays have a leading layer axis."""
    return shape[len(shape) - len(like):]


def _nnx_linear_general(mod, name):
    k, no = _shape(mod.kernel), len(mod.out_features)
    return {"in_features": _trailing(k[:len(k) - no], mod.in_features),
            "out_features": k[len(k) - no:]}


def _nnx_einsum(mod, name):
    out = {"kernel_shape": _trailing(_shape(mod.kernel), mod.kernel_shape)}
    if mod.bias is not None:
        out["bias_shape"] = _trailing(_shape(mod.bias), mod.bias_shape)
    return out


def _nnx_conv(mod, name):
    k = _trailing(_shape(mod.kernel), mod.kernel_shape)
    g = _groups(name, mod.feature_group_count, mod.in_features // mod.feature_group_count,
                mod.out_features, k[-2], k[-1])
    if mod.mask is not None and _shape(mod.mask) != k:
        raise ValueError(f"resize.nnx: convolution {name!r} has a fixed mask of shape "
                         f"{_shape(mod.mask)} but its kernel is now {k}. Slice the mask like "
                         "the kernel, or build the layer without mask=.")
    return {"in_features": k[-2] * g, "out_features": k[-1], "feature_group_count": g,
            "kernel_shape": k}


def _nnx_conv_transpose(mod, name):
    k = _shape(mod.kernel)
    cin, cout = (k[-1], k[-2]) if mod.transpose_kernel else (k[-2], k[-1])
    return {"in_features": cin, "out_features": cout,
            "kernel_shape": _trailing(k, mod.kernel_shape)}


def _nnx_norm(mod, name):
    s = _first(mod, "scale", "bias", "mean")
    return {} if s is None else {"num_features": s[-1]}


def _nnx_group_norm(mod, name):
    s = _first(mod, "scale", "bias")
    if s is None or s[-1] == mod.num_groups * mod.group_size:
        return {}
    return {"num_groups": _group_norm(name, s[-1], mod.group_size)}


def _nnx_embed(mod, name):
    e = _shape(mod.embedding)
    return {"num_embeddings": e[-2], "features": e[-1]}


def _nnx_attention(mod, name):
    q, k, o = _shape(mod.query.kernel), _shape(mod.key.kernel), _shape(mod.out.kernel)
    return {"in_features": q[-3], "in_kv_features": k[-3], "num_heads": q[-2],
            "num_kv_heads": k[-2], "head_dim": q[-1], "qkv_features": q[-2] * q[-1],
            "out_features": o[-1]}


def _nnx_rules() -> dict:
    from flax import nnx as fx

    return {fx.Linear: _nnx_linear, fx.LinearGeneral: _nnx_linear_general,
            fx.Einsum: _nnx_einsum, fx.Conv: _nnx_conv, fx.ConvTranspose: _nnx_conv_transpose,
            fx.BatchNorm: _nnx_norm, fx.LayerNorm: _nnx_norm, fx.RMSNorm: _nnx_norm,
            fx.GroupNorm: _nnx_group_norm, fx.Embed: _nnx_embed,
            fx.MultiHeadAttention: _nnx_attention}


def nnx(graphdef_or_model: Any, state: PyTree) -> Any:
    """An NNX model of a compacted state, with its layers' sizes updated.

    Merges ``state`` into the graph definition and sets the size attributes
    of the standard layers from their arrays:

    * ``nnx.Linear``: ``in_features``, ``out_features``;
      ``nnx.LinearGeneral``: ``in_features``, ``out_features`` (tuples);
      ``nnx.Einsum``: ``kernel_shape``, ``bias_shape``;
    * ``nnx.Conv``: ``in_features``, ``out_features``,
      ``feature_group_count`` (a depthwise convolution keeps one input per
      group, a grouped one its group count) and ``kernel_shape``;
      ``nnx.ConvTranspose``: ``in_features``, ``out_features``,
      ``kernel_shape``;
    * ``nnx.BatchNorm``, ``nnx.LayerNorm``, ``nnx.RMSNorm``:
      ``num_features``; ``nnx.GroupNorm``: ``num_groups`` (whole groups
      removed; its group size stays);
    * ``nnx.Embed``: ``num_embeddings``, ``features``;
    * ``nnx.MultiHeadAttention``: ``num_heads``, ``num_kv_heads``,
      ``head_dim``, ``qkv_features``, ``in_features``, ``in_kv_features``,
      ``out_features`` (its projections are resized as ``LinearGeneral``).
      ``head_dim`` is the query's; call ``init_cache`` again for decoding.

    Subclasses of these get the same updates; other modules are left as
    they are. Runs under ``jax.jit`` (only shapes are read).

    Args:
      graphdef_or_model: an ``nnx.GraphDef`` (from ``nnx.split``), or a model
        whose graph definition is used.
      state: the compacted state (``jp.structured.compact`` of the full
        ``nnx.split`` state).

    Returns:
      A new model.

    Raises:
      TypeError: ``graphdef_or_model`` is neither an NNX graph definition
        nor an NNX module.
      ValueError: sizes that a layer cannot take (a grouped convolution or a
        group norm cut unevenly, a convolution with a fixed ``mask``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxprune as jp
      >>> graphdef, state = nnx.split(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
      >>> state["kernel"].set_value(state["kernel"][...][:, :3])
      >>> state["bias"].set_value(state["bias"][...][:3])
      >>> layer = jp.resize.nnx(graphdef, state)
      >>> layer.out_features, layer(jnp.ones((2, 4))).shape
      (3, (2, 3))
    """
    from flax import nnx as fx

    if isinstance(graphdef_or_model, fx.GraphDef):
        graphdef = graphdef_or_model
    elif isinstance(graphdef_or_model, fx.Module):
        graphdef = fx.graphdef(graphdef_or_model)
    else:
        raise TypeError(
            f"resize.nnx: expected an nnx.GraphDef or an nnx.Module, got "
            f"{type(graphdef_or_model).__name__}. Use jp.resize.equinox for Equinox modules "
            "and jp.resize.linen for Flax Linen.")
    model = fx.merge(graphdef, state)
    rules = _nnx_rules()
    for path, mod in fx.iter_modules(model):
        rule = _lookup(rules, type(mod))
        if rule is not None:
            for attr, value in rule(mod, "/".join(map(str, path))).items():
                setattr(mod, attr, value)
    return model


def compact_nnx(graph: Any, model: Any, masks: PyTree) -> Any:
    """An NNX model with the masked units removed and its sizes updated.

    ``nnx.split`` → :func:`jaxprune.structured.compact` → :func:`nnx`.

    Args:
      graph: from ``jp.graph.trace(lambda s, *a: nnx.merge(graphdef, s)(*a),
        state, ...)`` on the full state ``nnx.split(model)[1]``.
      model: the NNX model (not modified).
      masks: structured masks for that state (``jp.structured.masks``).

    Returns:
      A new, smaller model computing what the masked model computes.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxprune as jp
      >>> model = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Conv(8, 2, (3, 3), rngs=nnx.Rngs(1)))
      >>> graphdef, state = nnx.split(model)
      >>> x = jnp.ones((1, 5, 5, 3))
      >>> g = jp.graph.trace(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
      >>> masks = jp.structured.masks(g, jp.structured.scores(g, state), 0.75)
      >>> small = jp.resize.compact_nnx(g, model, masks)
      >>> small.layers[0].kernel.shape, small.layers[2].in_features
      ((3, 3, 3, 2), 2)
    """
    from flax import nnx as fx

    graphdef, state = fx.split(model)
    return nnx(graphdef, _structured.compact(graph, state, masks))


# --------------------------------------------------------------------------
# Equinox


def _eqx_linear(m, name):
    w = _shape(m.weight)
    return {"in_features": m.in_features if m.in_features == "scalar" else w[-1],
            "out_features": m.out_features if m.out_features == "scalar" else w[-2]}


def _eqx_conv(m, name):
    w, n = _shape(m.weight), m.num_spatial_dims
    k_out, k_in = w[-n - 2], w[-n - 1]
    g = _groups(name, m.groups, m.in_channels // m.groups, m.out_channels, k_in, k_out)
    return {"in_channels": k_in * g, "out_channels": k_out, "groups": g}


def _eqx_layer_norm(m, name):
    s = _first(m, "weight", "bias")
    return {} if s is None else {"shape": s}


def _eqx_group_norm(m, name):
    s = _first(m, "weight", "bias")
    if s is None or m.channels is None or s[0] == m.channels:
        return {}
    return {"channels": s[0], "groups": _group_norm(name, s[0], m.channels // m.groups)}


def _eqx_batch_norm(m, name):
    s = _first(m, "weight", "bias")
    return {} if s is None else {"input_size": s[0]}


def _eqx_embedding(m, name):
    w = _shape(m.weight)
    return {"num_embeddings": w[-2], "embedding_size": w[-1]}


def _eqx_attention(m, name):
    q, k = _shape(m.query_proj.weight), _shape(m.key_proj.weight)
    v, o = _shape(m.value_proj.weight), _shape(m.output_proj.weight)
    heads = q[-2] // m.qk_size
    if q[-2] % m.qk_size or k[-2] != q[-2] or v[-2] % heads:
        raise ValueError(
            f"resize.equinox: MultiheadAttention {name!r}: projections of sizes query "
            f"{q[-2]}, key {k[-2]}, value {v[-2]} are not whole heads of "
            f"qk_size={m.qk_size}. jp.graph removes whole heads of an Equinox attention; "
            "these arrays were cut otherwise.")
    return {"num_heads": heads, "query_size": q[-1], "key_size": k[-1], "value_size": v[-1],
            "output_size": o[-2], "vo_size": v[-2] // heads}


def _eqx_mlp(m, name):
    first, last = m.layers[0], m.layers[-1]
    out = {"in_size": _eqx_linear(first, name)["in_features"],
           "out_size": _eqx_linear(last, name)["out_features"]}
    widths = {_shape(layer.weight)[-2] for layer in m.layers[:-1]}
    if m.depth and len(widths) == 1:
        out["width_size"] = widths.pop()
    return out


def _eqx_rules() -> dict:
    import equinox as eqx

    nn = eqx.nn
    return {nn.Linear: _eqx_linear, nn.Conv: _eqx_conv, nn.ConvTranspose: _eqx_conv,
            nn.LayerNorm: _eqx_layer_norm, nn.RMSNorm: _eqx_layer_norm,
            nn.GroupNorm: _eqx_group_norm, nn.BatchNorm: _eqx_batch_norm,
            nn.Embedding: _eqx_embedding, nn.MultiheadAttention: _eqx_attention,
            nn.MLP: _eqx_mlp}


def equinox(module: Any) -> Any:
    """A copy of an Equinox module with the size fields of its layers updated.

    ``eqx.tree_at`` cannot set static fields, so every module of the tree is
    copied and its fields set on the copy, from the inside out:

    * ``eqx.nn.Linear``: ``in_features``, ``out_features`` (``"scalar"``
      stays);
    * ``eqx.nn.Conv`` (``Conv1d/2d/3d``) and ``eqx.nn.ConvTranspose``:
      ``in_channels``, ``out_channels``, ``groups`` (a depthwise convolution
      keeps one input per group, a grouped one its group count);
    * ``eqx.nn.LayerNorm``, ``eqx.nn.RMSNorm``: ``shape``;
      ``eqx.nn.GroupNorm``: ``channels``, ``groups`` (whole groups removed);
      ``eqx.nn.BatchNorm``: ``input_size`` (with affine parameters);
    * ``eqx.nn.Embedding``: ``num_embeddings``, ``embedding_size``;
    * ``eqx.nn.MultiheadAttention``: ``num_heads`` (whole heads removed:
      ``qk_size`` stays), ``query_size``, ``key_size``, ``value_size``,
      ``output_size``, ``vo_size``;
    * ``eqx.nn.MLP``: ``in_size``, ``out_size``, and ``width_size`` if the
      hidden layers still have one width.

    Other modules are copied as they are. The module passed in is not
    changed. Runs under ``eqx.filter_jit`` (only shapes are read).

    Args:
      module: an Equinox module holding compacted arrays (the result of
        ``jp.structured.compact`` on a graph traced with the module as
        ``variables``).

    Returns:
      The module with updated size fields.

    Raises:
      TypeError: ``module`` is not an Equinox module.
      ValueError: sizes a layer cannot take (a grouped convolution, a group
        norm or attention heads cut unevenly).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import equinox as eqx
      >>> import jaxprune as jp
      >>> mlp = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.key(0))
      >>> x = jnp.ones((3, 4))
      >>> f = lambda m, x: jax.vmap(m)(x)
      >>> g = jp.graph.trace(f, mlp, x)
      >>> masks = jp.structured.masks(g, jp.structured.scores(g, mlp), 0.5)
      >>> small = jp.resize.equinox(jp.structured.compact(g, mlp, masks))
      >>> small.width_size, small.layers[1].in_features, f(small, x).shape
      (4, 4, (3, 2))
    """
    import equinox as eqx

    if not isinstance(module, eqx.Module):
        raise TypeError(f"resize.equinox: expected an eqx.Module, got {type(module).__name__}. "
                        "Use jp.resize.nnx for Flax NNX and jp.resize.linen for Flax Linen.")
    return _eqx_resize(module, "", _eqx_rules(), eqx.Module)


def _eqx_resize(node: Any, path: str, rules: dict, base: type) -> Any:
    """A copy of ``node``: its submodules resized first, then itself."""
    def fix(p, x):
        if not isinstance(x, base):
            return x
        return _eqx_resize(x, "/".join(filter(None, (path, _path_str(p)))), rules, base)

    new = copy.copy(node)
    for f in dataclasses.fields(node):
        if not f.metadata.get("static", False) and f.name in node.__dict__:
            value = jax.tree_util.tree_map_with_path(
                fix, {f.name: node.__dict__[f.name]}, is_leaf=lambda x: isinstance(x, base))
            object.__setattr__(new, f.name, value[f.name])
    rule = _lookup(rules, type(node))
    for attr, value in (rule(new, path or type(node).__name__) if rule else {}).items():
        object.__setattr__(new, attr, value)
    return new


# --------------------------------------------------------------------------
# Flax Linen


def _ln_dense(mod, params, args):
    return {"features": _shape(params["kernel"])[-1]}


def _ln_dense_general(mod, params, args):
    k = _shape(params["kernel"])
    if isinstance(mod.features, int):
        return {"features": k[-1]}
    return {"features": k[len(k) - len(mod.features):]}


def _ln_conv(mod, params, args):
    k = _shape(params["kernel"])
    out = {"features": k[-1]}
    if args and hasattr(args[0], "shape"):  # the inputs (only __call__ has them)
        out["feature_group_count"] = int(args[0].shape[-1]) // k[-2]
    return out


def _ln_conv_transpose(mod, params, args):
    return {"features": _shape(params["kernel"])[-2 if mod.transpose_kernel else -1]}


def _ln_embed(mod, params, args):
    e = _shape(params["embedding"])
    return {"num_embeddings": e[-2], "features": e[-1]}


def _ln_attention(mod, params, args):
    q, o = _shape(params["query"]["kernel"]), _shape(params["out"]["kernel"])
    return {"num_heads": q[-2], "qkv_features": q[-2] * q[-1], "out_features": o[-1]}


def _linen_rules() -> dict:
    import flax.linen as ln

    return {ln.Dense: _ln_dense, ln.DenseGeneral: _ln_dense_general, ln.Conv: _ln_conv,
            ln.ConvTranspose: _ln_conv_transpose, ln.Embed: _ln_embed,
            ln.MultiHeadDotProductAttention: _ln_attention}


def _linen_intercept(rules: dict) -> Callable:
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        rule = _lookup(rules, type(mod))
        if rule is not None and context.method_name in ("setup", "__call__"):
            params = mod.variables.get("params") if mod.scope is not None else None
            if params:  # none yet during init
                inputs = args or tuple(kwargs[k] for k in ("inputs",) if k in kwargs)
                for attr, value in _linen_updates(rule, mod, params, inputs).items():
                    object.__setattr__(mod, attr, value)
        return next_fun(*args, **kwargs)

    return intercept


def _linen_updates(rule: Callable, mod: Any, params: Mapping, inputs: tuple) -> dict:
    try:
        return rule(mod, params, inputs)
    except KeyError:  # not the standard parameter layout (e.g. a custom kernel name)
        return {}


@contextlib.contextmanager
def linen() -> Iterator[None]:
    """A context in which standard Linen layers read their sizes from their params.

    Linen rebuilds modules from their attributes at every ``apply`` and
    raises ``ScopeParamShapeError`` when a stored parameter does not have
    the shape the attributes give. Within the context, a method interceptor
    (``flax.linen.intercept_methods``) sets, before ``setup`` and
    ``__call__`` of a bound module that has parameters:

    * ``nn.Dense``: ``features``; ``nn.DenseGeneral``: ``features`` (an int
      or a tuple, as it was);
    * ``nn.Conv``: ``features`` and ``feature_group_count`` (input channels
      over the kernel's input axis); ``nn.ConvTranspose``: ``features``;
    * ``nn.Embed``: ``num_embeddings``, ``features``;
    * ``nn.MultiHeadDotProductAttention`` (and its subclasses
      ``MultiHeadAttention``, ``SelfAttention``): ``num_heads``,
      ``qkv_features``, ``out_features`` (its projections are resized as
      ``DenseGeneral``).

    Norms (``nn.BatchNorm``, ``nn.LayerNorm``...) read their sizes from their
    inputs and need nothing. The model object itself is not changed (the
    interceptor sets the attributes of the copies that ``apply`` binds).
    Functions are resized when they are traced: call ``jax.jit`` functions
    for the first time (or with new shapes) inside the context; what they
    compiled keeps working outside it.

    Yields:
      Nothing; use it as ``with jp.resize.linen(): ...``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxprune as jp
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((3, 4))
      >>> variables = model.init(jax.random.key(0), x)
      >>> g = jp.graph.trace(model.apply, variables, x)
      >>> masks = jp.structured.masks(g, jp.structured.scores(g, variables), 0.5)
      >>> small = jp.structured.compact(g, variables, masks)
      >>> with jp.resize.linen():
      ...     y = jax.jit(model.apply)(small, x)
      >>> bool(jnp.allclose(y, model.apply(jp.apply_masks(variables, masks), x), rtol=1e-5))
      True
    """
    import flax.linen as ln

    with ln.intercept_methods(_linen_intercept(_linen_rules())):
        yield


def linen_sizes(variables: Mapping) -> dict:
    """The sizes of Linen layers read from their (compacted) parameters.

    Reads the parameter layout of each module path (Linen stores no module
    types with the variables):

    * a ``kernel`` (``nn.Dense``, ``nn.Conv``, ``nn.DenseGeneral`` with one
      output axis, ``nn.ConvTranspose``): ``{"features": kernel.shape[-1]}``;
    * an ``embedding`` (``nn.Embed``): ``{"num_embeddings", "features"}``;
    * ``query``, ``key``, ``value`` and ``out`` kernels of rank 3 (attention):
      ``{"num_heads", "qkv_features", "out_features"}`` for the attention
      (its projections are not listed: the attention builds them).

    Norms are not listed: Linen norms read their sizes from their inputs.
    Nor is a convolution's ``feature_group_count``: the parameters do not
    hold the input channel count (for a depthwise convolution with one
    output per channel it equals ``features``); :func:`linen` sets it.
    To rebuild a model, give it its sizes as attributes and build it from
    this dict (below); or run the unchanged model inside :func:`linen`.

    Args:
      variables: Linen variables (``{"params": ..., "batch_stats": ...}``)
        or their ``"params"``.

    Returns:
      ``{module path: {attribute: size}}``, paths ``"/"``-joined (e.g.
      ``"Block_0/Conv_1"``).

    Raises:
      TypeError: ``variables`` is not a mapping.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxprune as jp
      >>> class CNN(nn.Module):
      ...     widths: tuple = (8, 16)
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = nn.relu(nn.Conv(self.widths[0], (3, 3), name="c0")(x))
      ...         x = nn.BatchNorm(use_running_average=True, name="bn")(x)
      ...         x = nn.relu(nn.Conv(self.widths[1], (3, 3), name="c1")(x))
      ...         return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))
      >>> x = jnp.ones((2, 6, 6, 3))
      >>> v = CNN().init(jax.random.key(0), x)
      >>> g = jp.graph.trace(CNN().apply, v, x)
      >>> masks = jp.structured.masks(g, jp.structured.scores(g, v), 0.5, groups=[0])
      >>> small = jp.structured.compact(g, v, masks)
      >>> sizes = jp.resize.linen_sizes(small)
      >>> sizes["c0"], sizes["c1"], sizes["head"]
      ({'features': 4}, {'features': 16}, {'features': 2})
      >>> rebuilt = CNN(widths=(sizes["c0"]["features"], sizes["c1"]["features"]))
      >>> y = rebuilt.apply(small, x)
      >>> bool(jnp.allclose(y, CNN().apply(jp.apply_masks(v, masks), x), rtol=1e-5))
      True
    """
    if not isinstance(variables, Mapping):
        raise TypeError(f"resize.linen_sizes: expected Linen variables (a mapping), got "
                        f"{type(variables).__name__}.")
    params = variables.get("params", variables)
    out: dict = {}
    _linen_walk(params, (), out)
    return out


def _linen_walk(node: Mapping, path: tuple, out: dict) -> None:
    sizes = _linen_layout(node)
    if sizes:
        out["/".join(path)] = sizes
    if sizes and "num_heads" in sizes:
        return
    for k, v in node.items():
        if isinstance(v, Mapping):
            _linen_walk(v, (*path, str(k)), out)


def _linen_layout(node: Mapping) -> dict:
    proj = [node.get(k) for k in ("query", "key", "value", "out")]
    if all(isinstance(p, Mapping) and "kernel" in p and len(_shape(p["kernel"])) == 3
           for p in proj):
        return _ln_attention(None, node, ())
    if "kernel" in node and not isinstance(node["kernel"], Mapping):
        return {"features": _shape(node["kernel"])[-1]}
    if "embedding" in node and not isinstance(node["embedding"], Mapping):
        return _ln_embed(None, node, ())
    return {}

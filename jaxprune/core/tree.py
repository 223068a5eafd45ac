"""Key paths and leaf selection (``where=``) for any pytree.

Every function in jaxprune addresses leaves by their key path
(:func:`jax.tree_util.tree_flatten_with_path`), joined with ``"/"``, so the
same code works on dicts, lists, tuples, NamedTuples, Flax Linen variables,
Flax NNX ``State``, Equinox modules and any registered pytree.

The ``where=`` argument accepted everywhere in the library picks the leaves a
function acts on:

* ``None`` (default): :func:`is_kernel`, the weights of dense and conv layers
  by the rule below.
* a string: a regular expression searched (:func:`re.search`) in the path.
* a callable ``(path: str, leaf) -> bool`` (two positional parameters).
* a callable ``params -> bool tree`` (one positional parameter), the
  convention of ``optax.masked``.
* a prefix tree of Python bools (``True`` selects the whole subtree).

A callable is told apart by its signature: exactly one positional parameter
is the optax form, exactly two required ones the ``(path, leaf)`` form;
anything that could be called both ways is an error. Leaves that are not
arrays (an Equinox module's activation functions, strings) and typed PRNG
keys (``nnx.Rngs`` state) are never selected, whatever ``where=`` says; they
pass through every function untouched.

The default rule (:func:`is_kernel`). A leaf is a kernel if and only if

1. it is an array of a floating dtype (for masks, also ``bool``);
2. at least two of its axes have length > 1 (so a bias ``(C,)``, an Equinox
   conv bias ``(C, 1, 1)`` or a Dense kernel ``(d, 1)`` is not a kernel);
3. its last path component is not, ignoring case, one of
   :data:`NON_KERNEL_NAMES` (``bias``, ``b``, ``scale``, ``gamma``, ``beta``,
   ``offset``, ``shift``, ``mean``, ``var``, ``embedding``, ``count``, ...);
4. no component of its path names an embedding, a normalisation module or a
   non-parameter collection: none contains ``embed`` or ``norm``, none is
   an embedding name (``emb``, ``pos``, ``pe``, ``wte``, ``wpe``, ``tok_emb*``,
   ``pos_emb*``, ``*_emb``), none matches ``^(ln|bn|gn)(_?\\w{0,3})?$`` (``ln_f``,
   ``bn1``, ``gn``), none is ``batch_stats``, ``cache`` or
   ``intermediates``.

So on stacked (scan-over-layers) or replicated (``pmap``) parameters, whose
biases and norm parameters are ``(L, d)``, rule 3 still excludes them by
name. The rule is a heuristic on names and shapes: a kernel named like a norm
parameter is missed, and a parameter that is not a kernel but has a kernel's
name and shape is selected. Check what it selects with :func:`selected` (or
``jp.summary(params)`` before training), and pass ``where=`` where it is
wrong. The model graph (``where=graph.kernels``, :func:`jaxprune.graph.trace`)
reads roles from the computation itself and is the precise way.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxprune import tree
  >>> params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
  ...           "norm": {"scale": jnp.ones((3, 4))}}
  >>> tree.paths(params)
  ['dense/bias', 'dense/kernel', 'norm/scale']
  >>> tree.selected(params)
  ['dense/kernel']
  >>> tree.flags(params, where="bias")
  [True, False, False]
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _deprecation

PyTree = Any  # the one alias: any pytree (jaxprune.tree.PyTree everywhere)
Where = Union[None, str, Callable[..., Any], PyTree]

__all__ = [
    "NON_KERNEL_NAMES",
    "PyTree",
    "Where",
    "flags",
    "flatten",
    "is_array",
    "is_float",
    "is_kernel",
    "is_key",
    "path_str",
    "paths",
    "selected",
    "unflatten",
]

NON_KERNEL_NAMES = frozenset({
    "b", "bias", "biases", "scale", "gamma", "beta", "offset", "shift",
    "mean", "var", "variance", "running_mean", "running_var", "moving_mean",
    "moving_variance", "num_batches_tracked", "embedding", "embeddings",
    "count", "step", "cached_key", "cached_value", "cache_index",
})
"""Last path components (lower case) that never name a kernel."""

_NON_PARAM_COLLECTIONS = frozenset({"batch_stats", "cache", "intermediates"})
_NORM_MODULE = re.compile(r"^(ln|bn|gn)(_?\w{0,3})?$")


# --------------------------------------------------------------------------
# Paths


def path_str(path: Sequence[Any]) -> str:
    """Joins a key path into a ``"/"``-separated string.

    The components are those of ``jax.tree_util.keystr(path, simple=True,
    separator="/")``. A trailing ``.value`` attribute (how Flax NNX
    ``Variable`` exposes its array) is dropped, so an NNX kernel reads
    ``"layer/kernel"`` just as it does in Linen.

    Example:
      >>> import jax
      >>> path_str((jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(0)))
      'a/0'
    """
    path = tuple(path)
    if (len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey)
            and path[-1].name == "value"):
        path = path[:-1]
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """Returns ``(paths, leaves, treedef)`` of a pytree (``None`` is no leaf)."""
    pl, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in pl], [x for _, x in pl], treedef


def unflatten(treedef: Any, leaves: Sequence[Any]) -> PyTree:
    """Inverse of :func:`flatten`."""
    return jax.tree_util.tree_unflatten(treedef, list(leaves))


def paths(tree: PyTree) -> list[str]:
    """The ``"/"``-joined key path of every leaf, in pytree order."""
    return flatten(tree)[0]


def natural_key(path: str) -> tuple:
    """A sort key that orders numbers inside paths by value (``Block_2``
    before ``Block_10``)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


# --------------------------------------------------------------------------
# Leaf predicates


def is_array(x: Any) -> bool:
    """Whether a leaf is an array: a JAX or NumPy array or scalar (or a
    ``jax.ShapeDtypeStruct``), as ``eqx.is_array`` decides. Functions,
    strings, Python numbers and other objects that Equinox modules hold as
    leaves are not."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def is_key(x: Any) -> bool:
    """Whether ``x`` is an array of typed PRNG keys (``jax.random.key``, the
    key leaves of ``nnx.Rngs``). Keys are state, never weights: every
    function passes them through untouched (raw ``uint32`` key data is an
    integer array and passes through as such)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def is_float(x: Any) -> bool:
    """Whether ``x`` is an array (or scalar) of a floating dtype."""
    return is_array(x) and jnp.issubdtype(_dtype(x), jnp.floating)


_EMBEDDING_NAME = re.compile(r"^(emb|embs|wte|wpe|pos|pe|tok_?emb\w*|pos_?emb\w*|\w+_emb)$")


def _names_non_kernel(component: str) -> bool:
    c = component.lower()
    return ("embed" in c or "norm" in c or bool(_EMBEDDING_NAME.match(c))
            or c in _NON_PARAM_COLLECTIONS or bool(_NORM_MODULE.match(c)))


def is_kernel(path: str, leaf: Any) -> bool:
    """The default ``where=``: whether a leaf is a dense or conv kernel.

    The rule (a heuristic on dtype, shape and names; see the module
    docstring): a floating (or bool) array with at least two axes longer than
    1, whose last path component is not in :data:`NON_KERNEL_NAMES` and no
    path component of which names an embedding, a normalisation module or a
    non-parameter collection.

    Args:
      path: the leaf's ``"/"``-joined key path.
      leaf: the leaf.

    Returns:
      A Python bool.

    Example:
      >>> import jax.numpy as jnp
      >>> is_kernel("Dense_0/kernel", jnp.ones((3, 4)))
      True
      >>> is_kernel("Dense_0/bias", jnp.ones((3, 4)))  # a stacked bias
      False
      >>> is_kernel("conv/weight", jnp.ones((8, 1, 1)))  # an Equinox conv bias shape
      False
      >>> is_kernel("LayerNorm_0/kernel", jnp.ones((3, 4)))
      False
    """
    if not is_array(leaf):
        return False
    dtype = _dtype(leaf)
    if not (jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.bool_):
        return False
    if sum(d > 1 for d in _shape(leaf)) < 2:
        return False
    parts = path.split("/")
    if parts[-1].lower() in NON_KERNEL_NAMES:
        return False
    return not any(_names_non_kernel(p) for p in parts)


# --------------------------------------------------------------------------
# where=


def flags(tree: PyTree, where: Where = None, *, what: str = "where") -> list[bool]:
    """Which leaves of ``tree`` a ``where=`` argument selects, in pytree order.

    Args:
      tree: any pytree.
      where: ``None`` (:func:`is_kernel`), a regex string, a callable
        ``(path, leaf) -> bool``, a callable ``params -> bool tree`` or a
        prefix tree of bools (see the module docstring).
      what: the argument name used in error messages.

    Returns:
      A list of Python bools, one per leaf; ``False`` for every leaf that is
      not an array and every PRNG key (:func:`is_key`).

    Raises:
      ValueError: if a regex or a callable selects no leaf at all, a prefix
        tree does not match ``tree``, or a callable's signature fits both
        callable forms.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
      >>> flags(p), flags(p, "b"), flags(p, lambda path, x: x.ndim == 1)
      ([False, True], [True, False], [True, False])
      >>> flags(p, lambda params: jax.tree.map(lambda x: x.ndim == 1, params))
      [True, False]
    """
    names, leaves, _ = flatten(tree)
    # A callable that is itself a pytree node (e.g. an Equinox module used as
    # a bool filter tree) is a prefix tree, not a function.
    is_fn = callable(where) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(where))
    if where is None:
        sel = [is_kernel(p, x) for p, x in zip(names, leaves)]
    elif isinstance(where, str):
        sel = _regex_flags(names, where, what)
    elif is_fn:
        if _callable_form(where, what) == "tree":
            sel = _prefix_flags(where(tree), tree, what)
        else:
            sel = [is_array(x) and bool(where(p, x)) for p, x in zip(names, leaves)]
    else:
        sel = _prefix_flags(where, tree, what)
    sel = [bool(s) and is_array(x) and not is_key(x) for s, x in zip(sel, leaves)]
    if is_fn and any(is_array(x) for x in leaves) and not any(sel):
        raise ValueError(
            f"{what}={where!r} selects no leaf. The leaf paths are: {_some(names)}."
        )
    return sel


def selected(tree: PyTree, where: Where = None) -> list[str]:
    """The paths of the leaves that ``where=`` selects, in pytree order.

    Use it to see what a transform will prune before training.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"embed": {"embedding": jnp.ones((10, 4))},
      ...           "mlp": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
      >>> selected(params)
      ['mlp/kernel']
    """
    return [p for p, s in zip(paths(tree), flags(tree, where, what="where")) if s]


def _some(names: Sequence[str]) -> str:
    return f"{list(names[:20])}{' ...' if len(names) > 20 else ''}"


def _regex_flags(names: Sequence[str], where: str, what: str) -> list[bool]:
    try:
        pattern = re.compile(where)
    except re.error as e:
        raise ValueError(f"{what}={where!r} is not a valid regular expression: {e}") from e
    sel = [bool(pattern.search(p)) for p in names]
    if names and not any(sel):
        raise ValueError(
            f"{what}={where!r} matches no leaf. The leaf paths are: {_some(names)}. "
            "Fix the regular expression (it is searched with re.search)."
        )
    return sel


def _callable_form(fn: Callable[..., Any], what: str) -> str:
    """``"tree"`` for ``params -> bool tree``, ``"path_leaf"`` for
    ``(path, leaf) -> bool``, from the signature."""
    fix = (f"Give {what}= exactly two positional parameters, (path, leaf) -> bool, or "
           "exactly one, params -> bool tree (as optax.masked takes).")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise ValueError(
            f"{what}={fn!r}: cannot read its signature, so it is unclear whether it is a "
            f"(path, leaf) predicate or an optax-style params -> bool tree. {fix} "
            "For example wrap it: lambda path, leaf: fn(path, leaf)."
        ) from None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in sig.parameters.values() if p.kind in kinds]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    varargs = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())
    most = float("inf") if varargs else len(positional)
    if len(required) == 1 and most == 1:
        return "tree"
    if len(required) == 2:
        return "path_leaf"
    raise ValueError(
        f"{what}={fn!r} has the signature {sig}: it takes {len(required)} required and up "
        f"to {most} positional arguments, so it is unclear whether it is a (path, leaf) "
        f"predicate or an optax-style params -> bool tree. {fix}"
    )


def _as_flag(flag: Any, what: str) -> bool:
    if isinstance(flag, (bool, np.bool_)):
        return bool(flag)
    if (isinstance(flag, (np.ndarray, jax.Array)) and flag.ndim == 0
            and flag.dtype == np.bool_ and not isinstance(flag, jax.core.Tracer)):
        return bool(flag)
    raise TypeError(
        f"{what} prefix tree must hold Python bools, got {type(flag).__name__} ({flag!r})."
    )


def _prefix_flags(prefix: PyTree, tree: PyTree, what: str) -> list[bool]:
    full = _broadcast(prefix, tree, f"{what} is neither None, a regex string, a callable "
                      "nor a bool prefix tree of the parameters")
    return [_as_flag(f, what) for f in full]


def _broadcast(prefix: PyTree, tree: PyTree, message: str) -> list[Any]:
    """The leaves of ``prefix`` broadcast to ``tree`` (:func:`jax.tree.broadcast`);
    a ``ValueError`` saying ``message`` and why when it is not a prefix."""
    try:
        return jax.tree_util.tree_leaves(jax.tree.broadcast(prefix, tree))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{message}: {e}") from e


select = _deprecation.alias(flags, "jaxprune.tree.select", "jaxprune.tree.flags")


# --------------------------------------------------------------------------
# Shared helpers of the package


def check_same_structure(a: PyTree, b: PyTree, a_name: str, b_name: str) -> None:
    """Raises ``ValueError`` unless ``a`` and ``b`` have the same leaf paths.

    Trees match if their structures are equal, or their leaf paths are,
    whatever containers hold them (an NNX State of Param vs. one of
    OptVariable, a pure dict vs. a State), or if ``b`` lacks only leaves of
    ``a`` that are not arrays (``None`` where ``a`` holds an activation
    function, as ``eqx.filter_grad`` returns).
    """
    sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if sa == sb:
        return
    pa, la, _ = flatten(a)
    pb = paths(b)
    if pa == pb or [p for p, x in zip(pa, la) if is_array(x)] == pb:
        return
    only_a, only_b = sorted(set(pa) - set(pb))[:5], sorted(set(pb) - set(pa))[:5]
    raise ValueError(
        f"{a_name} and {b_name} have different tree structures. Leaves only in "
        f"{a_name}: {only_a}; only in {b_name}: {only_b}. Build {b_name} from the "
        f"same pytree as {a_name} (e.g. scores = jp.scores.magnitude(params))."
        + ("" if (only_a or only_b) else f" Structures: {sa} vs {sb}.")
    )


def leaves_like(tree: PyTree, other: PyTree) -> list[Any]:
    """The leaves of ``other`` aligned with the leaves of ``tree`` (``None``
    where ``other`` has no leaf for a non-array leaf of ``tree``). Call
    :func:`check_same_structure` first."""
    treedef = jax.tree_util.tree_structure(tree)
    try:
        return treedef.flatten_up_to(other)
    except (ValueError, TypeError):
        leaves = jax.tree_util.tree_leaves(other)
        if len(leaves) == treedef.num_leaves:
            return leaves
        it = iter(leaves)
        return [next(it) if is_array(x) else None for x in jax.tree_util.tree_leaves(tree)]


class Rest(NamedTuple):
    """What :func:`split_arrays` takes out of a tree besides its arrays:
    the structure and the other leaves, ``((index, leaf), ...)``. Hashable
    when those leaves are (functions, strings, numbers), so it can be a
    static argument of ``jax.jit``."""

    treedef: Any
    leaves: tuple


def split_arrays(tree: PyTree) -> tuple[list, Rest]:
    """The array leaves of ``tree`` (what ``jax.jit`` can take) and the rest
    (:class:`Rest`: Equinox activation functions, strings, Python numbers),
    as ``eqx.partition(tree, eqx.is_array)`` splits a module.
    :func:`merge_arrays` puts them back together."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays = [x for x in leaves if is_array(x)]
    rest = tuple((i, x) for i, x in enumerate(leaves) if not is_array(x))
    return arrays, Rest(treedef, rest)


def merge_arrays(rest: Rest, arrays: Sequence[Any]) -> PyTree:
    """The tree :func:`split_arrays` split, with ``arrays`` for its arrays."""
    static, it = dict(rest.leaves), iter(arrays)
    return jax.tree_util.tree_unflatten(
        rest.treedef, [static[i] if i in static else next(it)
                       for i in range(rest.treedef.num_leaves)])


def broadcast_values(value: Any, tree: PyTree, what: str) -> list[Any]:
    """One value per leaf of ``tree``: ``value`` itself if it is a number (or
    a 0-d array), else ``value`` as a prefix tree of ``tree`` broadcast to
    its leaves (:func:`jax.tree.broadcast`)."""
    if isinstance(value, (int, float, np.number)) or (
        hasattr(value, "shape") and np.ndim(value) == 0
    ):
        return [value] * jax.tree_util.tree_structure(tree).num_leaves
    return _broadcast(value, tree, f"{what} must be a number or a tree (or prefix tree) of "
                      "numbers matching the scores; it does not match")


# Types whose instances layers= accepts besides where=-style selections, with
# the function giving each path's layer count (None: not a stack). The graph
# registers ModelGraph (jaxprune/graph/__init__.py): tree never imports it.
_LAYER_SOURCES: dict[type, Callable[[Any, Sequence[str]], list[Any]]] = {}


def register_layer_source(cls: type, counts: Callable[[Any, Sequence[str]], list[Any]]) -> None:
    """Lets ``layers=`` take instances of ``cls``: ``counts(obj, paths)`` gives
    the layer count of every path (``None`` for leaves that are not stacks)."""
    _LAYER_SOURCES[cls] = counts


def stacked_axes(tree: PyTree, layers: Any, layer_axis: Any = 0, sel: Sequence[bool] | None = None,
                 what: str = "layers") -> list[int | None]:
    """The layer axis of every leaf of ``tree`` that ``layers=`` marks as a
    stack of layers, ``None`` for the others (and for all when ``layers`` is
    ``None``).

    ``layers`` is a ``where=``-style selection (regex, callable, bool prefix
    tree) or a model graph (:func:`jaxprune.graph.trace`: the leaves it saw
    read inside a ``scan``, whose layer counts are checked against the
    shapes; ``tree`` may be a subtree of the traced variables, such as
    Linen's ``params``). Only leaves in ``sel`` (the leaves a function prunes) are
    considered; ``layer_axis`` (an int, default 0) is the layer axis of each.

    Raises:
      TypeError: ``layer_axis`` is not an int.
      ValueError: a marked leaf has fewer than two axes, ``layer_axis`` is out
        of its range, the graph's layer count differs from the leaf's length
        along ``layer_axis``, or ``layers`` marks none of the leaves in ``sel``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"blocks": {"w": jnp.ones((4, 8, 8))}, "out": jnp.ones((8, 2))}
      >>> stacked_axes(p, "blocks"), stacked_axes(p, None)
      ([0, None], [None, None])
    """
    names, leaves, _ = flatten(tree)
    if layers is None:
        return [None] * len(leaves)
    if isinstance(layer_axis, bool) or not isinstance(layer_axis, (int, np.integer)):
        raise TypeError(
            f"{what}: layer_axis must be an int (the axis of a stacked leaf that indexes its "
            f"layers), got {layer_axis!r} ({type(layer_axis).__name__}). Use 0 for "
            "nnx.scan / nn.scan stacks, or e.g. 1 for MaxText's param_scan_axis=1.")
    sel = [True] * len(leaves) if sel is None else list(sel)
    counts: list[Any] = [None] * len(leaves)
    given = f"layers={layers!r}"
    source = next((f for cls, f in _LAYER_SOURCES.items() if isinstance(layers, cls)), None)
    if source is not None:  # a model graph
        given = "layers=graph (its leaves read inside a scan)"
        counts = source(layers, names)
        marked = [c is not None for c in counts]
    else:
        marked = flags(tree, layers, what=f"{what}: layers")
    out: list[int | None] = []
    for p, x, s, m, c in zip(names, leaves, sel, marked, counts):
        if not (s and m):
            out.append(None)
            continue
        shape = tuple(np.shape(x))
        if len(shape) < 2:
            raise ValueError(
                f"{what}: layers= marks leaf {p!r} of shape {shape} as a stack of layers, but "
                "a stacked leaf needs a layer axis and at least one more axis. Exclude it "
                "from layers= (or from where=).")
        if not -len(shape) <= layer_axis < len(shape):
            raise ValueError(
                f"{what}: layer_axis={layer_axis} is out of range for the stacked leaf {p!r} "
                f"of shape {shape}; expected an axis in [{-len(shape)}, {len(shape)}): the "
                "one indexing its layers (0 for nnx.scan / nn.scan stacks, 1 for MaxText's "
                "param_scan_axis=1). Fix layer_axis=, or exclude the leaf from layers=.")
        ax = int(layer_axis) % len(shape)
        if c is not None and shape[ax] != c:
            raise ValueError(
                f"{what}: the graph reads leaf {p!r} of shape {shape} inside a scan of {c} "
                f"layers, but its axis {ax} (layer_axis={layer_axis}) has length {shape[ax]}. "
                "Pass the layer_axis= of length "
                f"{c} (a scan over layers slices axis 0 of what it is given).")
        out.append(ax)
    if any(sel) and not any(a is not None for a in out):
        raise ValueError(
            f"{what}: {given} marks none of the leaves being pruned as a stack of "
            f"layers (pruned leaves: {_some([p for p, s in zip(names, sel) if s])}). Pass a "
            "regex, callable or bool tree that selects the stacked kernels (e.g. "
            "layers='layers/' or layers=graph), or layers=None.")
    return out

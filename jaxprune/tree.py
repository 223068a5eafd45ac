"""Key paths and leaf selection for any pytree.

Every function in jaxprune addresses leaves by their key path
(:func:`jax.tree_util.tree_flatten_with_path`), joined with ``"/"``, so the
same code works on dicts, lists, tuples, NamedTuples, Flax Linen variables,
Flax NNX ``State`` and any registered pytree (an Equinox-style module).

The ``where=`` argument accepted everywhere in the library picks the leaves a
function acts on:

* ``None`` (default): floating (or, for masks, bool) leaves with ``ndim >= 2``
  (kernels, not biases).
* a string: a regular expression searched (:func:`re.search`) in the path.
* a callable ``(path: str, leaf) -> bool``.
* a prefix tree of Python bools (``True`` selects the whole subtree).

Example:
  >>> import jax.numpy as jnp
  >>> from jaxprune import tree
  >>> params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
  >>> tree.paths(params)
  ['dense/bias', 'dense/kernel']
  >>> tree.select(params, where="bias")
  [True, False]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Where = Union[None, str, Callable[[str, Any], bool], PyTree]

__all__ = [
    "Where",
    "flatten",
    "is_float",
    "path_str",
    "paths",
    "select",
    "unflatten",
]


def _key_str(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(path: Sequence[Any]) -> str:
    """Joins a key path into a ``"/"``-separated string.

    A trailing ``.value`` attribute (how Flax NNX ``Variable`` exposes its
    array) is dropped, so an NNX kernel reads ``"layer/kernel"`` just as it
    does in Linen.

    Example:
      >>> import jax
      >>> path_str((jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(0)))
      'a/0'
    """
    parts = [_key_str(k) for k in path]
    if (
        len(path) > 1
        and isinstance(path[-1], jax.tree_util.GetAttrKey)
        and path[-1].name == "value"
    ):
        parts = parts[:-1]
    return "/".join(parts)


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


def is_float(x: Any) -> bool:
    """Whether ``x`` is an array (or scalar) of a floating dtype."""
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _default_where(path: str, leaf: Any) -> bool:
    del path
    return np.ndim(leaf) >= 2 and (is_float(leaf) or jnp.result_type(leaf) == jnp.bool_)


def select(tree: PyTree, where: Where = None, *, what: str = "where") -> list[bool]:
    """Which leaves of ``tree`` a ``where=`` argument selects, in pytree order.

    Args:
      tree: any pytree.
      where: ``None``, a regex string, a callable ``(path, leaf) -> bool`` or a
        prefix tree of bools (see the module docstring).
      what: the argument name used in error messages.

    Returns:
      A list of Python bools, one per leaf.

    Raises:
      ValueError: if a regex or a callable selects no leaf at all, or a prefix
        tree does not match ``tree``.
    """
    names, leaves, _ = flatten(tree)
    if where is None:
        return [_default_where(p, x) for p, x in zip(names, leaves)]
    if isinstance(where, str):
        try:
            pattern = re.compile(where)
        except re.error as e:
            raise ValueError(f"{what}={where!r} is not a valid regular expression: {e}") from e
        sel = [bool(pattern.search(p)) for p in names]
        if leaves and not any(sel):
            raise ValueError(
                f"{what}={where!r} matches no leaf. The leaf paths are: "
                f"{names[:20]}{' ...' if len(names) > 20 else ''}. "
                "Fix the regular expression (it is searched with re.search)."
            )
        return sel
    # A callable that is itself a pytree node (e.g. an Equinox module used as a
    # bool filter tree) is a prefix tree, not a function.
    if callable(where) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(where)):
        sel = [bool(where(p, x)) for p, x in zip(names, leaves)]
        if leaves and not any(sel):
            raise ValueError(
                f"{what}={where!r} selects no leaf. The leaf paths are: "
                f"{names[:20]}{' ...' if len(names) > 20 else ''}."
            )
        return sel
    # A prefix tree of bools.
    try:
        prefix_leaves, prefix_def = jax.tree_util.tree_flatten(where)
        subtrees = prefix_def.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{what} is neither None, a regex string, a callable nor a bool "
            f"prefix tree of the parameters: {e}"
        ) from e
    sel: list[bool] = []
    for flag, sub in zip(prefix_leaves, subtrees):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(
                f"{what} prefix tree must hold Python bools, got {type(flag).__name__} "
                f"({flag!r})."
            )
        sel.extend([bool(flag)] * len(jax.tree_util.tree_leaves(sub)))
    return sel

"""Deprecated aliases: old names that still work and warn with the new name.

Every renamed public name of jaxprune stays importable under its old name
for a while; calling it emits a :class:`DeprecationWarning` that says what to
use instead. ``CHANGELOG.md`` lists every rename.

Example:
  >>> import warnings
  >>> def new(x):
  ...     return x + 1
  >>> old = alias(new, "mod.old", "mod.new")
  >>> with warnings.catch_warnings(record=True) as w:
  ...     warnings.simplefilter("always")
  ...     old(1), str(w[0].message)
  (2, 'mod.old is deprecated; use mod.new instead.')
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["alias", "warn"]


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    """Emits the :class:`DeprecationWarning` of a renamed name."""
    warnings.warn(f"{old} is deprecated; use {new} instead.", DeprecationWarning,
                  stacklevel=stacklevel)


def alias(fn: Callable[..., Any], old: str, new: str) -> Callable[..., Any]:
    """``fn`` under an old name: same behaviour, plus a deprecation warning.

    Args:
      fn: the function under its new name.
      old: the old name, as users spelled it (e.g. ``"jaxprune.ste"``).
      new: the new name, as users should spell it.

    Returns:
      A wrapper of ``fn`` that warns on every call.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warn(old, new)
        return fn(*args, **kwargs)

    wrapper.__doc__ = f"Deprecated alias of :func:`{new}` (was ``{old}``)."
    return wrapper


def public_module(name: str) -> str:
    """The public path of a module: ``jaxprune.core.masks`` -> ``jaxprune.masks``
    (the folders are the layout; public module paths are flat)."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "jaxprune" and parts[1] in _FOLDERS:
        if parts[2] in _FACES:
            return "jaxprune." + parts[1]
        if not parts[2].startswith("_") and parts[2] not in _INTERNAL:
            return "jaxprune." + parts[2]
    return name


_FOLDERS = ("core", "train", "structured", "oneshot", "budgets", "compress")
_FACES = ("units", "pruners")  # the code behind jaxprune.structured / jaxprune.oneshot
_INTERNAL = ("base", "along", "cost")  # package modules without a flat public path


def keyword_only(*old: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: options made keyword-only still work by position, warning.

    The decorated function's signature is the new one (keyword-only
    ``old``); a call that passes more positional arguments than it takes
    maps the extra ones, in order, onto ``old`` and warns.

    Args:
      old: the options that used to follow the positional parameters, in
        their old order.

    Returns:
      The decorator.

    Example:
      >>> import warnings
      >>> @keyword_only("where")
      ... def f(x, *, where=None):
      ...     return x, where
      >>> with warnings.catch_warnings(record=True) as w:
      ...     warnings.simplefilter("always")
      ...     f(1, "a"), str(w[0].message).replace("jp._deprecation.", "")
      ((1, 'a'), 'f(..., where) by position is deprecated; use f(..., where=) instead.')
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = inspect.signature(fn).parameters.values()
        n = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        name = f"{public_module(fn.__module__)}.{fn.__qualname__}".replace("jaxprune.", "jp.", 1)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if len(args) > n:
                extra = args[n:]
                if len(extra) > len(old):
                    raise TypeError(f"{name} takes {n} positional arguments (and formerly "
                                    f"{', '.join(old)}), got {len(args)}.")
                names = old[:len(extra)]
                for k in names:
                    if k in kwargs:
                        raise TypeError(f"{name} got multiple values for {k!r}.")
                warn(f"{name}(..., {', '.join(names)}) by position",
                     f"{name}(..., {'=, '.join(names)}=)")
                kwargs.update(zip(names, extra))
                args = args[:n]
            return fn(*args, **kwargs)

        return wrapper

    return decorate

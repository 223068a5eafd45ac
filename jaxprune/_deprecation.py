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

"""The public API as data: every name in ``jp.__all__`` and in the
``__all__`` of every public submodule, with its kind and, for callables,
its parameters (name, kind, default). ``test_api.py`` compares it with the
snapshot in ``api_snapshot.json``; ``python tests/api.py --write`` rewrites
the snapshot (only for a change CHANGELOG.md lists).

Annotations are left out (they name the module a type lives in, which a
move of files changes without changing the API); defaults are written by
name where their repr has an address."""

from __future__ import annotations

import importlib
import inspect
import json
import pathlib
import sys
import types

SNAPSHOT = pathlib.Path(__file__).resolve().parent / "api_snapshot.json"


def _default(value) -> str:
    if value is inspect.Parameter.empty:
        return ""
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return f"<{value.__qualname__}>"
    text = repr(value)
    return f"<{type(value).__qualname__}>" if " at 0x" in text else text


def _signature(obj) -> list[str] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [f"{p.kind.name}:{p.name}={_default(p.default)}" for p in sig.parameters.values()]


def describe(obj) -> dict:
    """Kind and parameters of one public name."""
    if isinstance(obj, types.ModuleType):
        return {"kind": "module"}
    if inspect.isclass(obj):
        fields = getattr(obj, "_fields", None)
        if fields is not None:
            return {"kind": "namedtuple", "fields": list(fields)}
        return {"kind": "class", "params": _signature(obj)}
    if callable(obj):
        return {"kind": "callable", "params": _signature(obj)}
    return {"kind": type(obj).__name__}


def _public_modules(root) -> list[str]:
    """``jaxprune`` and every module reachable through public ``__all__``
    names (``jp.graph``, ``jp.graph.rules``, ...)."""
    seen, todo = [], [root.__name__]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            value = getattr(module, attr)
            if isinstance(value, types.ModuleType) and value.__name__.startswith("jaxprune"):
                todo.append(f"{name}.{attr}")
            # a module hidden by a function of its name (jaxprune.search)
            hidden = sys.modules.get(f"{name}.{attr}")
            if type(hidden) is types.ModuleType and not isinstance(value, types.ModuleType):
                todo.append(f"{name}.{attr}")
    return sorted(seen)


def snapshot() -> dict:
    """``{module: {name: description}}`` of the public API, by the public
    path (``jaxprune.masks``), whatever file defines it."""
    import jaxprune

    out = {}
    for name in _public_modules(jaxprune):
        module = sys.modules.get(name) or importlib.import_module(name)
        out[name] = {a: describe(getattr(module, a)) for a in sorted(module.__all__)}
    return out


if __name__ == "__main__":
    if "--write" in sys.argv:
        SNAPSHOT.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
    else:
        print(json.dumps(snapshot(), indent=1, sort_keys=True))


def text(desc: dict | None) -> str | None:
    """One line for a description: ``callable(a, b=1, *, c=None)``."""
    if desc is None:
        return None
    if "fields" in desc:
        return f"{desc['kind']}({', '.join(desc['fields'])})"
    if desc.get("params") is None:
        return desc["kind"]
    parts, star = [], False
    for p in desc["params"]:
        kind, rest = p.split(":", 1)
        name, default = rest.split("=", 1)
        if kind == "KEYWORD_ONLY" and not star:
            parts.append("*")
            star = True
        if kind == "VAR_POSITIONAL":
            parts.append(f"*{name}")
            star = True
        elif kind == "VAR_KEYWORD":
            parts.append(f"**{name}")
        else:
            parts.append(f"{name}={default}" if default else name)
        if kind == "POSITIONAL_ONLY" and (p is desc["params"][-1] or not
                                          desc["params"][desc["params"].index(p) + 1]
                                          .startswith("POSITIONAL_ONLY")):
            parts.append("/")
    return f"{desc['kind']}({', '.join(parts)})"


def diff(old: dict, new: dict) -> dict[str, str | None]:
    """``{"module.name": new text}`` for every name added, removed (``None``)
    or changed between two snapshots."""
    out = {}
    for module in sorted(set(old) | set(new)):
        a, b = old.get(module, {}), new.get(module, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                out[f"{module}.{name}"] = text(b.get(name))
    return out

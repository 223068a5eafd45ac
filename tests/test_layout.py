"""The import rules of docs/DESIGN.md ("Layout"), checked on the source: no
module uses another module's private (``_``) names, and private modules are
used only inside their own folder."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxprune"

# Known exceptions (none left); each entry is "importer -> name". Do not
# add to it.
KNOWN: set[str] = set()


def module_name(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> set[str]:
    """``importer -> name`` for every private name ``path`` takes from another
    module, and every private module it imports from outside its folder."""
    me, tree = module_name(path, package), ast.parse(path.read_text())
    folder = me.rsplit(".", 1)[0] if path.name != "__init__.py" else me
    aliases, out = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxprune"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                aliases[a.asname or a.name] = full
                owner, _, leaf = full.rpartition(".")
                if leaf.startswith("_") and not leaf.startswith("__") and owner != me:
                    inside = owner == folder or folder.startswith(owner + ".")
                    if not (inside and _is_module(full, package)):  # a private module of my folder
                        out.add(f"{me} -> {full}")
                for i, part in enumerate(full.split(".")[:-1]):
                    if part.startswith("_") and ".".join(full.split(".")[:i]) not in (folder, me):
                        if not me.startswith(".".join(full.split(".")[:i]) + "."):
                            out.add(f"{me} -> {full}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            full = aliases.get(node.value.id)
            if full and full != me and _is_module(full, package):
                out.add(f"{me} -> {full}.{node.attr}")
    return out


def _is_module(full: str, package: pathlib.Path) -> bool:
    rel = pathlib.Path(*full.split(".")[1:])
    return (package / rel).with_suffix(".py").exists() or (package / rel / "__init__.py").exists()


def test_no_module_uses_another_modules_private_names():
    found = set().union(*(violations(p) for p in sorted(PACKAGE.rglob("*.py"))))
    new = sorted(found - KNOWN)
    assert not new, ("private names used across modules (make them public in their module, "
                     f"outside its __all__, see docs/DESIGN.md): {new}")


def test_the_check_sees_private_imports(tmp_path):
    package = tmp_path / "jaxprune"
    package.mkdir()
    for name in ("select.py", "masks.py"):
        (package / name).write_text((PACKAGE / "core" / name).read_text())
    (package / "masks.py").write_text("from jaxprune.select import _hidden\n"
                                      "from jaxprune import select\nselect._other(1)\n")
    assert violations(package / "masks.py", package) == {
        "jaxprune.masks -> jaxprune.select._hidden", "jaxprune.masks -> jaxprune.select._other"}

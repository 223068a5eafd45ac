"""The README's test command prints pytest's result line ("N passed"):
``pyproject.toml``'s addopts already pass one ``-q``; a second would give
``-qq``, which drops it."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _quiet(args: list[str]) -> int:
    return sum(a.count("q") for a in args if re.fullmatch(r"-q+", a)) + args.count("--quiet")


def test_test_commands_print_the_pass_count():
    found = re.search(r'^addopts = "([^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    addopts = found.group(1).split()
    commands = [line for text in ((ROOT / "README.md").read_text(),
                                  (ROOT / ".ci" / "run").read_text())
                for line in text.splitlines() if "python -m pytest" in line]
    assert len(commands) >= 2
    for line in commands:
        args = line.split("python -m pytest", 1)[1].split()
        assert _quiet(addopts) + _quiet(args) == 1, line


def test_readme_does_not_promise_the_graph_later():
    text = (ROOT / "README.md").read_text()
    assert "coming next" not in text and "jp.graph.trace" in text

"""The public API is the contract: names and signatures are compared with
the snapshot taken before the "one house" change (``api_snapshot.json``),
and every difference must be one listed here and in CHANGELOG.md."""

import json
import pathlib

import api

CHANGELOG = (pathlib.Path(__file__).resolve().parent.parent / "CHANGELOG.md").read_text()

# "module.name": what it is now (api.text), None where it left the __all__s.
CHANGES: dict[str, str | None] = {
}


def test_api_differs_from_snapshot_only_by_listed_changes():
    old = json.loads(api.SNAPSHOT.read_text())
    found = api.diff(old, api.snapshot())
    unlisted = {k: v for k, v in found.items() if k not in CHANGES or CHANGES[k] != v}
    missing = sorted(set(CHANGES) - set(found))
    assert not unlisted, f"API changes not listed in CHANGES (test_api.py): {unlisted}"
    assert not missing, f"listed changes that did not happen: {missing}"


def test_every_change_is_in_the_changelog():
    for key in CHANGES:
        short = key.removeprefix("jaxprune.")
        assert f"`{short}" in CHANGELOG or f"jp.{short}" in CHANGELOG, \
            f"{key} changed but CHANGELOG.md does not name `{short}`"


def test_diff_sees_every_kind_of_change():
    old = {"m": {"f": api.describe(lambda a, b=1: 0), "g": {"kind": "module"}}}
    new = {"m": {"f": api.describe(lambda a, *, b=1: 0), "h": {"kind": "module"}}}
    assert api.diff(old, new) == {"m.f": "callable(a, *, b=1)", "m.g": None, "m.h": "module"}
    assert api.diff(old, old) == {}

"""The public API is the contract: names and signatures are compared with
the snapshot taken before the "one house" change (``api_snapshot.json``),
and every difference must be one listed here and in CHANGELOG.md."""

import json
import pathlib

import api

CHANGELOG = (pathlib.Path(__file__).resolve().parent.parent / "CHANGELOG.md").read_text()

# "module.name": what it is now (api.text), None where it left the __all__s.
CHANGES: dict[str, str | None] = {
    'jaxprune.agents': 'module',
    'jaxprune.deprecation': None,
    'jaxprune.search': (
        "callable(metric_fn, params, sparsity, *, graph=None, granularity='leaf', "
        "cost='params', agent='es', iterations=30, population=16, max_sparsity=0.8, "
        "higher_is_better=False, where=None, groups=None, scores=None, seed=0, "
        "batch_size=None, options=None)"
    ),
    'jaxprune.snip': (
        "callable(loss_fn, params, batch, sparsity, *, allocation='global', where=None, "
        "layers=None, layer_axis=0)"
    ),
    'jaxprune.sparsity_of': 'callable(tree, *, where=None)',
    'jaxprune.summary': 'callable(tree, *, where=None, layers=None, layer_axis=0)',
    'jaxprune.transform_base': None,
    'jaxprune.agents.AGENTS': 'tuple',
    'jaxprune.agents.SearchResult': (
        'namedtuple(budget, kept, metric, curve, mean, cost, evaluations, seconds, agent)'
    ),
    'jaxprune.agents.search': (
        "callable(metric_fn, params, sparsity, *, graph=None, granularity='leaf', "
        "cost='params', agent='es', iterations=30, population=16, max_sparsity=0.8, "
        "higher_is_better=False, where=None, groups=None, scores=None, seed=0, "
        "batch_size=None, options=None)"
    ),
    'jaxprune.allocation.Allocation': 'namedtuple(name, sparsities, masks, units)',
    'jaxprune.allocation.REGISTRY': 'dict',
    'jaxprune.allocation.register': 'callable(allocation)',
    'jaxprune.tree.is_key': 'callable(x)',
    'jaxprune.allocation.compute_masks': None,
    'jaxprune.allocation.erk': (
        'callable(params, sparsity, *, where=None, power=1.0, layers=None, layer_axis=0)'
    ),
    'jaxprune.allocation.from_sensitivity': "callable(curves, sparsity=None, *, cost='params')",
    'jaxprune.allocation.global_budget': (
        "callable(graph, scores, sparsity, *, cost='params', groups=None, normalize=True)"
    ),
    'jaxprune.allocation.masks': (
        "callable(scores, sparsity, *, allocation='uniform', where=None, params=None, "
        "step=None, layers=None, layer_axis=0)"
    ),
    'jaxprune.allocation.owl': 'callable(stats, *, m=5.0, lam=0.08, blocks=None)',
    'jaxprune.allocation.per_leaf': None,
    'jaxprune.allocation.random_masks': (
        "callable(key, params, sparsity, *, allocation='uniform', where=None, "
        "layers=None, layer_axis=0)"
    ),
    'jaxprune.allocation.sparsities': (
        "callable(params, sparsity, *, allocation='uniform', where=None, step=None, "
        "layers=None, layer_axis=0)"
    ),
    'jaxprune.allocation.uniform_budget': (
        "callable(graph, sparsity, *, cost='params', groups=None)"
    ),
    'jaxprune.at_init.snip': (
        "callable(loss_fn, params, batch, sparsity, *, allocation='global', where=None, "
        "layers=None, layer_axis=0)"
    ),
    'jaxprune.dynamic.STEState': None,
    'jaxprune.dynamic.random_masks': None,
    'jaxprune.dynamic.ste': None,
    'jaxprune.dynamic.ste_training': None,
    'jaxprune.dynamic.straight_through': None,
    'jaxprune.graph.WEIGHT_ROLES': 'tuple',
    'jaxprune.graph.choose_groups': 'callable(graph, groups=None, *, what, empty_ok=False)',
    'jaxprune.lottery.random_mask': None,
    'jaxprune.masks.block': (
        "callable(scores, sparsity, *, block_shape=4, reduce='mean', where=None)"
    ),
    'jaxprune.masks.channels': (
        "callable(scores, sparsity, *, axis=-1, reduce='l1', where=None, norm=None)"
    ),
    'jaxprune.masks.global_topk': 'callable(scores, sparsity=None, *, where=None, keep=None)',
    'jaxprune.masks.n_of_m': 'callable(scores, *, n=2, m=4, axis=-2, where=None)',
    'jaxprune.masks.sparsity': None,
    'jaxprune.masks.sparsity_of': 'callable(tree, *, where=None)',
    'jaxprune.masks.summary': 'callable(tree, *, where=None, layers=None, layer_axis=0)',
    'jaxprune.masks.topk': (
        'callable(scores, sparsity=None, *, where=None, keep=None, axis=None, '
        'layers=None, layer_axis=0)'
    ),
    'jaxprune.sensitivity.adaptive': (
        'callable(metric_fn, *, levels=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, '
        '0.95), where=None, higher_is_better=False, batch_size=None)'
    ),
    'jaxprune.sensitivity.from_scores': (
        'callable(scores, params=None, *, levels=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, '
        '0.8, 0.9, 0.95), where=None, groups=None, graph=None)'
    ),
    'jaxprune.sensitivity.plot': 'callable(curves, *, ax=None, path=None)',
    'jaxprune.sensitivity.scan': (
        "callable(metric_fn, params, *, levels=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, "
        "0.9, 0.95), where=None, groups=None, granularity='leaf', graph=None, "
        "scores=None, higher_is_better=False, batch_size=None, max_bytes=1073741824)"
    ),
    'jaxprune.structured.UnitScore': 'namedtuple(pointwise, finish, needs, norm_scales)',
    'jaxprune.structured.register_score': 'callable(name, score)',
    'jaxprune.structured.score_names': 'callable()',
    'jaxprune.transforms.STEState': 'namedtuple(count, masks, score_state, key, inner_state)',
    'jaxprune.transforms.scheduled_masks': None,
    'jaxprune.transforms.ste_training': (
        "callable(inner, *, sparsity, update_every=1, score='magnitude', "
        "allocation='uniform', where=None, seed=0, layers=None, layer_axis=0)"
    ),
    'jaxprune.tree.PyTree': 'class(*args, **kwargs)',
    'jaxprune.tree.select': None,
    'jaxprune.transform_base.*': None,  # the module became internal
    'jaxprune.deprecation.*': None,  # the module became internal
    'jaxprune.search.*': None,  # the module is jaxprune.agents
}


def test_api_differs_from_snapshot_only_by_listed_changes():
    old = json.loads(api.SNAPSHOT.read_text())
    found = api.diff(old, api.snapshot())
    for key in [k for k in CHANGES if k.endswith(".*")]:  # a whole module left
        gone = [k for k, v in found.items() if k.startswith(key[:-1]) and v is None]
        assert gone, f"{key}: nothing of that module changed"
        found = {k: v for k, v in found.items() if k not in gone}
        found[key] = None
    unlisted = {k: v for k, v in found.items() if k not in CHANGES or CHANGES[k] != v}
    missing = sorted(set(CHANGES) - set(found))
    assert not unlisted, f"API changes not listed in CHANGES (test_api.py): {unlisted}"
    assert not missing, f"listed changes that did not happen: {missing}"


def test_every_change_is_in_the_changelog():
    """CHANGELOG.md names every changed name, or the module it moved with."""
    for key in CHANGES:
        parts = key.removeprefix("jaxprune.").removesuffix(".*").split(".")
        names = [".".join(parts)] + [".".join(parts[:i]) for i in range(1, len(parts))
                                     if "jaxprune." + ".".join(parts[:i]) in CHANGES]
        assert any(f"`{n}" in CHANGELOG or f"jp.{n}" in CHANGELOG for n in names), \
            f"{key} changed but CHANGELOG.md does not name `{names[0]}`"


def test_diff_sees_every_kind_of_change():
    old = {"m": {"f": api.describe(lambda a, b=1: 0), "g": {"kind": "module"}}}
    new = {"m": {"f": api.describe(lambda a, *, b=1: 0), "h": {"kind": "module"}}}
    assert api.diff(old, new) == {"m.f": "callable(a, *, b=1)", "m.g": None, "m.h": "module"}
    assert api.diff(old, old) == {}

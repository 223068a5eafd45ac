"""Runs the shared battery (tests/battery.py) on every pruning transform.

Append an ``Entry`` to ``FACTORIES`` for each new transform (see the
docstring of tests/battery.py for the fields).
"""

import optax
import pytest
from battery import CHECKS, Entry, mlp_graph

import jaxprune as jp


def keep_fixed(inner, *, params, sparsity):
    """``keep_masks`` last in a chain, with magnitude masks of ``params``."""
    masks = jp.masks.topk(jp.scores.magnitude(params), sparsity)
    return optax.chain(inner, jp.keep_masks(masks))


def structured_prune(inner, *, params, sparsity, update_every, score="l2"):
    return jp.structured.prune(inner, graph=mlp_graph(params), sparsity=sparsity,
                               update_every=update_every, score=score)


def l1_in_prune(inner, *, sparsity, strength):
    """The subgradient L1 regularizer inside the pruning wrapper."""
    return jp.prune(optax.chain(jp.regularizers.l1(strength), inner), sparsity=sparsity,
                    update_every=1)


def group_lasso_in_structured(inner, *, params, sparsity, strength):
    """Proximal group lasso last in the inner chain of ``structured.prune``."""
    g = mlp_graph(params)
    reg = jp.regularizers.group_lasso(g, strength, learning_rate=1e-2)
    return jp.structured.prune(optax.chain(inner, reg), graph=g, sparsity=sparsity,
                               update_every=2)


FACTORIES = [
    Entry(
        "prune_uniform_constant",
        jp.prune,
        dict(sparsity=0.75, update_every=1),
        0.75,
        "per_leaf",
        injectable=("sparsity",),
    ),
    Entry(
        "prune_global_schedule",
        jp.prune,
        dict(
            sparsity=optax.polynomial_schedule(0.0, 0.8, power=3, transition_steps=8),
            update_every=2,
            allocation="global",
        ),
        0.8,
        "global",
        steps=12,
    ),
    Entry(
        "prune_saliency_regrow",
        jp.prune,
        dict(sparsity=0.5, update_every=3, score="saliency", nested=False),
        0.5,
        "per_leaf",
        injectable=("sparsity", "update_every"),
    ),
    Entry(
        "prune_erk",
        jp.prune,
        dict(sparsity=0.6, update_every=4, allocation="erk"),
        0.6,
        "none",
    ),
    Entry(
        "lottery_ticket_global",
        jp.lottery_ticket,
        dict(rounds=2, steps_per_round=4, prune_rate=0.5),
        0.75,
        "global",
        steps=12,
    ),
    Entry(
        "set_training_uniform",
        jp.set_training,
        dict(sparsity=0.75, drop_fraction=0.3, update_every=3, allocation="uniform"),
        0.75,
        "per_leaf",
        injectable=("sparsity", "drop_fraction"),
    ),
    Entry(
        "rigl_uniform",
        jp.rigl,
        dict(sparsity=0.75, drop_fraction=0.5, update_every=2, end_step=10, allocation="uniform"),
        0.75,
        "per_leaf",
        injectable=("sparsity", "drop_fraction", "update_every"),
    ),
    Entry(
        "rigl_erk",
        jp.rigl,
        dict(sparsity=0.6, update_every=3),
        0.6,
        "none",
    ),
    Entry(
        "ste_magnitude",
        jp.ste_training,
        dict(sparsity=0.5, update_every=2),
        0.5,
        "per_leaf",
        injectable=("sparsity",),
        zero_pruned=False,
    ),
    Entry("keep_masks", keep_fixed, dict(sparsity=0.75), 0.75, "per_leaf", needs_params=True),
    Entry(
        "structured_prune",
        structured_prune,
        dict(sparsity=optax.linear_schedule(0.0, 0.5, 6), update_every=2),
        0.5,
        "per_leaf",  # half of the 16 hidden units: half of each kernel
        needs_params=True,
    ),
    Entry("structured_prune_taylor", structured_prune,
          dict(sparsity=0.25, update_every=1, score="taylor"), 0.25, "per_leaf",
          injectable=("sparsity",), needs_params=True),
    Entry("l1_in_prune", l1_in_prune, dict(sparsity=0.5, strength=1e-3), 0.5, "per_leaf",
          injectable=("sparsity", "strength")),
    Entry("group_lasso_in_structured_prune", group_lasso_in_structured,
          dict(sparsity=0.5, strength=1e-3), 0.5, "per_leaf", injectable=("strength",),
          needs_params=True),
]


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("entry", FACTORIES, ids=lambda e: e.name)
def test_battery(entry, check):
    CHECKS[check](entry)


def test_battery_checks_can_fail():
    """A transform that never trains (its inner optimizer has learning rate 0)
    fails the battery's training check."""
    frozen = Entry("frozen", lambda inner, **kw: jp.prune(optax.sgd(0.0), **kw),
                   dict(sparsity=0.5, update_every=1), 0.5)
    with pytest.raises(AssertionError, match="no training happened"):
        CHECKS["chain_adam"](frozen)

"""Runs the shared battery (tests/battery.py) on every pruning transform.

Append an ``Entry`` to ``FACTORIES`` for each new transform (see the
docstring of tests/battery.py for the fields).
"""

import optax
import pytest
from battery import CHECKS, Entry

import jaxprune as jp

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

"""Layer-aware budgets: how much to prune where.

``sensitivity`` (per-layer curves, activation and contribution scores via
``_activations``), ``agents`` (``jp.search``: RL / ES search of per-layer
rates), ``_budget`` (params and MAC cost models from the graph). The budget
solvers themselves are allocations (``jaxprune.allocation``). Public paths
are ``jaxprune.sensitivity`` and ``jaxprune.agents``.
"""

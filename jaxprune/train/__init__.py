"""Training-time pruning as optax gradient transformations.

``_base`` (what every transform shares: checks, the masked update step)
-> ``transforms`` (``prune``, ``ste_training``, ``keep_masks``),
``dynamic`` (SET, RigL), ``lottery`` (lottery tickets), ``at_init`` (SNIP),
``regularizers`` (L1, group lasso, slimming; on the model graph).
Public paths are ``jaxprune.transforms``, ``jaxprune.dynamic``,
``jaxprune.lottery``, ``jaxprune.at_init``, ``jaxprune.regularizers``.
"""

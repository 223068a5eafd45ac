"""Automated search of per-layer budgets: an agent proposes, the metric rewards.

:func:`search` looks for the per-layer sparsities (of a graph's channel
groups, or of leaves) that maximise a validation metric of the *pruned, not
fine-tuned* model under a parameter or FLOP budget, as AMC does (He et al.
2018). Every iteration proposes ``population`` candidate budgets, evaluates
them in one batched call (``jax.lax.map`` over ``vmap``-ed chunks, the same
evaluator as :func:`jaxprune.sensitivity.scan`) and updates the agent; the
whole iteration, agent included, is one jitted function.

Two agents:

* ``"ddpg"``: AMC's. The agent walks the layers; at layer ``t`` it sees
  ``(t / L, size, the layer's dense cost, cost removed so far, cost still
  removable after t, previous action, target)`` and outputs the layer's
  sparsity ``a_t`` in ``[0, max_sparsity]``, with truncated Gaussian
  exploration noise (decaying). The action is raised to the smallest value
  that still lets the later layers, pruned at ``max_sparsity``, meet the
  budget (AMC's action clipping). Every transition is stored with its
  episode's reward minus a moving-average baseline (as AMC does); the critic
  regresses it, the actor ascends the critic (deterministic policy gradient).
  Episodes run ``population`` at a time; a warm-up of random episodes comes
  first.
* ``"es"``: an evolution strategy over per-layer logits ``theta``: candidates
  ``theta + sigma eps`` (antithetic), each turned into sparsities
  ``max_sparsity * sigmoid(theta + sigma eps + tau)`` with the scalar ``tau``
  that meets the budget (bisection), updated with centred ranks and Adam
  (Salimans et al. 2017). It starts from the uniform budget.

Both finish every candidate the same way: counts rounded down (the budget is
met), then units added back layer by layer while the cost stays within the
budget (so it is met to within one unit's cost).

References:
  He et al., "AMC: AutoML for model compression and acceleration on mobile
  devices", ECCV 2018; Lillicrap et al., "Continuous control with deep
  reinforcement learning", ICLR 2016 (DDPG); Salimans et al., "Evolution
  strategies as a scalable alternative to reinforcement learning", 2017.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.budgets import cost as _budget
from jaxprune.budgets import sensitivity as _sens
from jaxprune.core.tree import PyTree

__all__ = ["AGENTS", "SearchResult", "search"]

AGENTS = ("ddpg", "es")


class SearchResult(NamedTuple):
    """What :func:`search` found.

    Attributes:
      budget: the best budget: ``{group name: sparsity}`` (group) or a tree
        of per-leaf sparsities (leaf), for :func:`jaxprune.structured.masks`
        or :func:`jaxprune.masks.topk`.
      kept: ``(L,)`` units or weights kept per layer in the best budget.
      metric: the metric of the best budget (pruned, not fine-tuned).
      curve: ``(iterations,)`` best metric found so far after each iteration.
      mean: ``(iterations,)`` mean metric of each iteration's candidates.
      cost: the fraction of the dense cost the best budget keeps.
      evaluations: candidates evaluated.
      seconds: wall time (compilation included).
      agent: ``"ddpg"`` or ``"es"``.
    """

    budget: Any
    kept: np.ndarray
    metric: float
    curve: np.ndarray
    mean: np.ndarray
    cost: float
    evaluations: int
    seconds: float
    agent: str


# --------------------------------------------------------------------------
# The environment: budgets, feasibility, counts


class _Env(NamedTuple):
    model: _budget.CostModel
    sizes: np.ndarray  # (L,) float
    kmin: np.ndarray  # (L,) least count per layer
    target: float
    amax: float

    def cost(self, k):
        return self.model(k, xp=jnp)

    def counts(self, rates):
        """Counts for continuous ``rates``: rounded down (cost within budget),
        then filled back layer by layer while the budget allows."""
        k = jnp.maximum(jnp.floor(self.sizes * (1.0 - rates) + 1e-4), self.kmin)
        return self.fill(k)

    def fill(self, k):
        def layer(t, k):
            def bisect(_, lohi):
                lo, hi = lohi
                mid = jnp.floor((lo + hi + 1) / 2)
                ok = self.cost(k.at[t].set(mid)) <= self.target
                return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

            steps = int(np.ceil(np.log2(self.sizes.max() + 1))) + 1
            lo, _ = jax.lax.fori_loop(0, steps, bisect, (k[t], jnp.asarray(self.sizes)[t]))
            return k.at[t].set(lo)

        return jax.lax.fori_loop(0, len(self.sizes), layer, k)


def _bisect(fn: Callable, lo: float, hi: float, steps: int = 30) -> jax.Array:
    """The smallest ``x`` in ``[lo, hi]`` with ``fn(x)`` true (``fn`` monotone;
    ``hi`` if none)."""
    def body(_, lohi):
        a, b = lohi
        mid = (a + b) / 2
        ok = fn(mid)
        return jnp.where(ok, a, mid), jnp.where(ok, mid, b)

    return jax.lax.fori_loop(0, steps, body, (jnp.float32(lo), jnp.float32(hi)))[1]


# --------------------------------------------------------------------------
# DDPG (AMC)


def _mlp_init(key, sizes):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = jax.random.normal(jax.random.fold_in(key, i), (a, b)) * np.sqrt(1.0 / a)
        params.append((w, jnp.zeros(b)))
    return params


def _mlp(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


_FEATURES = 7


class _DDPGState(NamedTuple):
    actor: Any
    critic: Any
    actor_opt: Any
    critic_opt: Any
    buf_s: jax.Array  # (C, F)
    buf_a: jax.Array  # (C,)
    buf_r: jax.Array  # (C,)
    size: jax.Array
    ptr: jax.Array
    baseline: jax.Array
    sigma: jax.Array
    episode: jax.Array


def _ddpg(env: _Env, population: int, hidden: int = 64, capacity: int = 4096,
          warmup: int = 2, updates: int = 32, batch: int = 64, lr_actor: float = 1e-3,
          lr_critic: float = 2e-3, sigma0: float = 0.5, decay: float = 0.9) -> tuple:
    """``(init(key), propose(state, key) -> (rates, aux), learn(state, aux,
    rewards, key) -> state)`` of AMC's agent."""
    n_layers = len(env.sizes)
    cap = max(capacity, population * n_layers)
    a_opt, c_opt = optax.adam(lr_actor), optax.adam(lr_critic)
    unit = env.model.unit_costs(env.sizes)
    layer_cost = jnp.asarray(unit * env.sizes / env.model.dense, jnp.float32)
    size_f = jnp.asarray(env.sizes / env.sizes.max(), jnp.float32)
    full = jnp.asarray(env.sizes, jnp.float32)
    kmin = jnp.asarray(env.kmin, jnp.float32)
    at_max = jnp.asarray(np.maximum(np.floor(env.sizes * (1 - env.amax)), env.kmin), jnp.float32)

    def init(key):
        ka, kc = jax.random.split(key)
        actor = _mlp_init(ka, (_FEATURES, hidden, hidden, 1))
        critic = _mlp_init(kc, (_FEATURES + 1, hidden, hidden, 1))
        return _DDPGState(actor, critic, a_opt.init(actor), c_opt.init(critic),
                          jnp.zeros((cap, _FEATURES)), jnp.zeros(cap), jnp.zeros(cap),
                          jnp.int32(0), jnp.int32(0), jnp.float32(0), jnp.float32(sigma0),
                          jnp.int32(0))

    def features(t, k, prev):
        later = jnp.arange(n_layers) > t
        now = env.cost(jnp.where(jnp.arange(n_layers) >= t, full, k))
        hi = env.cost(jnp.where(later, full, k))
        lo = env.cost(jnp.where(later, at_max, k))
        return jnp.stack([t / n_layers, size_f[t], layer_cost[t],
                          (env.model.dense - now) / env.model.dense,
                          (hi - lo) / env.model.dense, prev,
                          jnp.float32(env.target / env.model.dense)])

    def least(t, k):
        """AMC's clipping: the least rate of layer t that keeps the budget
        reachable with the later layers at max_sparsity."""
        later = jnp.arange(n_layers) > t
        base = jnp.where(later, at_max, k)
        return _bisect(lambda a: env.cost(base.at[t].set(jnp.maximum(full[t] * (1 - a), kmin[t])))
                       <= env.target, 0.0, env.amax)

    def walk(actor, key, sigma, random):
        def step(carry, t):
            k, prev = carry
            s = features(t, k, prev)
            mu = jax.nn.sigmoid(_mlp(actor, s)[0]) * env.amax
            noise = sigma * jax.random.truncated_normal(jax.random.fold_in(key, t), -2.0, 2.0)
            a = jnp.where(random, jax.random.uniform(jax.random.fold_in(key, t + n_layers))
                          * env.amax, mu + noise)
            a = jnp.maximum(jnp.clip(a, 0.0, env.amax), least(t, k))
            return (k.at[t].set(jnp.maximum(full[t] * (1 - a), kmin[t])), a / env.amax), (s, a)

        (_, _), (states, actions) = jax.lax.scan(step, (full, jnp.float32(0)),
                                                 jnp.arange(n_layers))
        return actions, states

    def propose(state, key):
        keys = jax.random.split(key, population)
        random = state.episode < warmup
        rates, states = jax.vmap(walk, in_axes=(None, 0, None, None))(
            state.actor, keys, state.sigma, random)
        return rates, (states, rates)

    def learn(state, aux, rewards, key):
        states, actions = aux
        n = population * n_layers
        idx = (state.ptr + jnp.arange(n)) % cap
        r = jnp.repeat(rewards, n_layers)
        baseline = jnp.where(state.episode == 0, rewards.mean(),
                             0.9 * state.baseline + 0.1 * rewards.mean())
        st = state._replace(buf_s=state.buf_s.at[idx].set(states.reshape(n, -1)),
                            buf_a=state.buf_a.at[idx].set(actions.reshape(n) / env.amax),
                            buf_r=state.buf_r.at[idx].set(r), ptr=(state.ptr + n) % cap,
                            size=jnp.minimum(state.size + n, cap), baseline=baseline)

        def update(st, k):
            j = jax.random.randint(k, (batch,), 0, st.size)
            s, a, rr = st.buf_s[j], st.buf_a[j], st.buf_r[j] - st.baseline

            def c_loss(c):
                q = _mlp(c, jnp.concatenate([s, a[:, None]], 1))[:, 0]
                return jnp.mean((q - rr) ** 2)

            def a_loss(actor):
                mu = jax.nn.sigmoid(jax.vmap(lambda x: _mlp(actor, x))(s))
                return -jnp.mean(_mlp(st.critic, jnp.concatenate([s, mu], 1)))

            gc, ga = jax.grad(c_loss)(st.critic), jax.grad(a_loss)(st.actor)
            uc, co = c_opt.update(gc, st.critic_opt, st.critic)
            ua, ao = a_opt.update(ga, st.actor_opt, st.actor)
            return st._replace(critic=optax.apply_updates(st.critic, uc), critic_opt=co,
                               actor=optax.apply_updates(st.actor, ua), actor_opt=ao), None

        st, _ = jax.lax.scan(update, st, jax.random.split(key, updates))
        sigma = jnp.where(state.episode < warmup, state.sigma, state.sigma * decay)
        return st._replace(sigma=sigma, episode=state.episode + 1)

    return init, propose, learn


# --------------------------------------------------------------------------
# Evolution strategy


class _ESState(NamedTuple):
    theta: jax.Array
    opt: Any


def _es(env: _Env, population: int, sigma: float = 0.5, lr: float = 0.1) -> tuple:
    """``(init, propose, learn)`` of the evolution strategy."""
    n_layers = len(env.sizes)
    opt = optax.adam(lr)
    half = max(population // 2, 1)

    def rates_of(z):
        def meets(tau):
            k = jnp.maximum(env.sizes * (1 - env.amax * jax.nn.sigmoid(z + tau)), env.kmin)
            return env.cost(k) <= env.target

        return env.amax * jax.nn.sigmoid(z + _bisect(meets, -20.0, 20.0))

    def init(key):
        del key
        theta = jnp.zeros(n_layers)
        return _ESState(theta, opt.init(theta))

    def propose(state, key):
        eps = jax.random.normal(key, (half, n_layers))
        eps = jnp.concatenate([eps, -eps, jnp.zeros((population - 2 * half, n_layers))])
        return jax.vmap(rates_of)(state.theta + sigma * eps), eps

    def learn(state, eps, rewards, key):
        del key
        ranks = jnp.argsort(jnp.argsort(rewards)).astype(jnp.float32)
        w = ranks / jnp.maximum(rewards.shape[0] - 1, 1) - 0.5
        grad = -(w[:, None] * eps).sum(0) / (rewards.shape[0] * sigma)
        u, o = opt.update(grad, state.opt, state.theta)
        return _ESState(optax.apply_updates(state.theta, u), o)

    return init, propose, learn


# --------------------------------------------------------------------------
# search


def search(metric_fn: Callable[[PyTree], Any], params: PyTree, sparsity: float, *,
           graph: Any = None, granularity: str = "leaf", cost: str = "params",
           agent: str = "es", iterations: int = 30, population: int = 16,
           max_sparsity: float = 0.8, higher_is_better: bool = False, where: Any = None,
           groups: Any = None, scores: Any = None, seed: int = 0, batch_size: int | None = None,
           options: dict | None = None) -> SearchResult:
    """Searches per-layer sparsities that maximise a metric under a cost budget.

    Each candidate budget removes ``sparsity`` of the dense cost (to within
    one unit's cost); its reward is ``metric_fn`` of the masked parameters
    (units or weights ranked as in :func:`jaxprune.sensitivity.scan`), not
    fine-tuned. ``iterations x population`` candidates are evaluated,
    ``population`` per batched call.

    Args:
      metric_fn: ``params -> scalar`` on a validation batch (pure JAX).
      params: the parameters (for ``"group"``, the variables the graph traced).
      sparsity: the fraction of the dense cost to remove.
      graph: the model graph (required for ``"group"`` and for ``cost="flops"``).
      granularity: ``"leaf"`` (unstructured, the default everywhere) or
        ``"group"`` (structured, AMC's setting).
      cost: ``"params"`` (the default everywhere) or ``"flops"`` (AMC's).
      agent: ``"es"`` (default; see the module docstring for why) or
        ``"ddpg"`` (AMC's agent).
      iterations: agent updates.
      population: candidates per iteration.
      max_sparsity: no layer is pruned beyond this.
      higher_is_better: ``True`` for accuracy-like metrics; ``False`` (the
        default everywhere) for losses.
      where: which leaves (leaf granularity; as in
        :func:`jaxprune.sensitivity.scan`).
      groups: which groups (group granularity; as in ``scan``).
      scores: what ranks the weights or units (as in ``scan``).
      seed: PRNG seed.
      batch_size: candidates vmapped at once (default: as many as fit in
        1 GiB, at most ``population``).
      options: agent hyperparameters (DDPG: ``hidden``, ``warmup``,
        ``updates``, ``batch``, ``lr_actor``, ``lr_critic``, ``sigma0``,
        ``decay``; ES: ``sigma``, ``lr``).

    Returns:
      A :class:`SearchResult`.

    Raises:
      ValueError: an unknown agent, or a budget that ``max_sparsity`` cannot meet.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxprune as jp
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> params = {"a": jax.random.normal(k1, (4, 16)), "c": jax.random.normal(k2, (16, 3))}
      >>> x = jnp.ones((8, 4))
      >>> loss = lambda p: jnp.mean((jnp.tanh(x @ p["a"]) @ p["c"] - 1.0) ** 2)
      >>> res = jp.search(loss, params, 0.5, iterations=3, population=8)
      >>> len(res.curve), sorted(res.budget), int(res.kept.sum())
      (3, ['a', 'c'], 56)

    References:
      He et al., "AMC: AutoML for model compression and acceleration on
      mobile devices", ECCV 2018.
    """
    t0 = time.perf_counter()
    if agent not in AGENTS:
        raise ValueError(f"search: agent must be one of {AGENTS}, got {agent!r}.")
    if not 0.0 < float(max_sparsity) < 1.0:
        raise ValueError(f"search: max_sparsity must be in (0, 1), got {max_sparsity!r}.")
    layers = _sens.layers_of(params, granularity=granularity, graph=graph, scores=scores,
                             where=where, groups=groups, what="search")
    _sens.check_metric(metric_fn, params)
    env = _environment(layers, params, graph, sparsity, cost, max_sparsity)
    make = _ddpg if agent == "ddpg" else _es
    init, propose, learn = make(env, population, **(options or {}))
    b = batch_size or _sens.batch_size_for(metric_fn, params, population)
    evaluate = _sens.evaluator(metric_fn, layers, int(b))
    sign = 1.0 if higher_is_better else -1.0

    @jax.jit
    def iteration(state, params, key):
        k1, k2 = jax.random.split(key)
        rates, aux = propose(state, k1)
        kept = jax.vmap(env.counts)(rates)
        metric = evaluate(params, kept.astype(jnp.int32))
        return learn(state, aux, sign * metric, k2), kept, metric

    return _loop(iteration, init, env, layers, params, seed, iterations, sign, agent, t0)


def _environment(layers, params, graph, sparsity, cost, max_sparsity) -> _Env:
    _budget.check_kind(cost)
    if layers.granularity == "group":
        model = _budget.graph_model(graph, [graph.groups[i] for i in layers.index], cost)
        kmin = np.ones(len(layers.sizes))
    else:
        models = _sens.cost_models(layers, params, graph)
        if cost not in models:
            raise ValueError("search: cost='flops' with leaf granularity needs graph= (the "
                             "MACs of each kernel).")
        model, kmin = models[cost], np.zeros(len(layers.sizes))
    sizes = layers.sizes.astype(np.float64)
    at_max = np.maximum(np.floor(sizes * (1 - max_sparsity)), kmin)
    target = (1.0 - float(sparsity)) * model.dense
    if model(at_max) > target:
        raise ValueError(
            f"search: the budget cannot be met: removing {sparsity} of the {cost} leaves "
            f"{target:,.0f}, but every layer at max_sparsity={max_sparsity} still keeps "
            f"{model(at_max):,.0f}. Raise max_sparsity or lower the sparsity.")
    return _Env(model, sizes, kmin, target, float(max_sparsity))


def _loop(iteration, init, env, layers, params, seed, iterations, sign, agent, t0):
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    state = init(sub)
    best, best_kept, curve, mean, n = -np.inf, None, [], [], 0
    for i in range(iterations):
        state, kept, metric = iteration(state, params, jax.random.fold_in(key, i))
        reward = sign * np.asarray(metric, np.float64)
        n += len(reward)
        j = int(np.argmax(reward))
        if reward[j] > best:
            best, best_kept = float(reward[j]), np.asarray(kept[j]).astype(np.int64)
        curve.append(sign * best)
        mean.append(float(sign * reward.mean()))
    return SearchResult(_budget_of(layers, best_kept), best_kept, sign * best, np.array(curve),
                        np.array(mean), float(env.model(best_kept) / env.model.dense), n,
                        time.perf_counter() - t0, agent)


def _budget_of(layers, kept: np.ndarray) -> Any:
    rates = [(int(n) - int(k)) / int(n) for n, k in zip(layers.sizes, kept)]
    if layers.granularity == "group":
        return dict(zip(layers.names, rates))
    out: list = [0.0] * layers.treedef.num_leaves
    for i, r in zip(layers.index, rates):
        out[i] = r
    return jax.tree_util.tree_unflatten(layers.treedef, out)

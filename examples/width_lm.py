"""Width pruning of a small language model: heads, MLP neurons, hidden size.

Structured (Minitron-style) width pruning of the byte-level GPT of
``examples/prune_lm.py`` (the same trained checkpoint, or the same training
if none is saved): whole attention heads, SwiGLU neurons, or channels of the
residual stream are removed with ``jp.structured`` and the model is
compacted. Reported per setting, on the validation set of ``prune_lm.py``:

* ``masked``: perplexity per byte of the masked model (no retraining);
* ``compacted``: the compacted model's perplexity. For heads and MLP
  neurons it equals ``masked`` (the test of compaction). For the hidden
  size it does not: RMSNorm averages over ``d'`` kept channels instead of
  ``d``, which scales every normalised activation by ``sqrt(d / d')``
  (the graph marks this group "changes its statistics");
* ``rescaled`` (hidden size only): the compacted model with every RMSNorm
  scale multiplied by ``sqrt(d / d')``, which gives back the masked model's
  function exactly up to the norm's ``eps``;
* ``recovered``: the compacted model after ``--recovery-steps`` of training
  (AdamW), against the dense model trained for the same steps (``dense +
  recovery``), so that recovery is not just more training;
* parameters and MACs kept (MACs from the graph of the compacted model) and
  the compacted model's forward time against dense (interleaved medians).

Run:
  python examples/width_lm.py --json docs/width_lm.json --plot docs/width_lm.png
  python examples/width_lm.py --quick    # tiny model (~1 min)

References:
  Muralidharan et al., "Compact language models via pruning and knowledge
  distillation" (Minitron), 2024; Michel et al., "Are sixteen heads really
  better than one?", NeurIPS 2019; Fang et al., DepGraph, CVPR 2023.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp

HERE = pathlib.Path(__file__).resolve().parent


def _prune_lm():
    """examples/prune_lm.py as a module (model, data, checkpoint helpers)."""
    name = "example_prune_lm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "prune_lm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


LM = _prune_lm()

# name: {unit kind: fraction removed}; "hidden" is the residual stream.
SETTINGS = {
    "heads 50%": {"heads": 0.5},
    "MLP 50%": {"mlp": 0.5},
    "heads + MLP 50%": {"heads": 0.5, "mlp": 0.5},
    "hidden 12.5%": {"hidden": 0.125},
    "hidden 25%": {"hidden": 0.25},
}
QUICK_SETTINGS = ("heads 50%", "MLP 50%", "hidden 25%")


# --------------------------------------------------------------------------
# Pruning


def group_kinds(graph) -> dict:
    """Prunable groups by kind: ``heads``, ``mlp`` (SwiGLU neurons),
    ``hidden`` (the residual stream, traced with ``allow_reductions``)."""
    out: dict = {"heads": [], "mlp": [], "hidden": []}
    for g in graph.groups:
        if not g.prunable:
            continue
        paths = {m.path.rsplit("/", 1)[-1] for m in g.members}
        if g.kind == "heads":
            out["heads"].append(g.index)
        elif {"wg", "wu", "wd"} >= paths:
            out["mlp"].append(g.index)
        elif "emb" in paths:
            out["hidden"].append(g.index)
    return out


def width_masks(graph, params, setting: dict):
    """Structured masks removing the setting's fraction of each unit kind
    (L2 unit scores, the same count in every layer)."""
    kinds = group_kinds(graph)
    rates = {i: s for kind, s in setting.items() for i in kinds[kind]}
    missing = [k for k in setting if not kinds[k]]
    if missing:
        raise ValueError(f"no prunable group of kind {missing} in the graph")
    scores = jp.structured.scores(graph, params)
    return jp.structured.masks(graph, scores, rates, groups=list(rates))


def compacted_config(cfg, small) -> object:
    """The config whose ``heads`` matches the compacted query kernel."""
    head_dim = cfg.d // cfg.heads
    heads = small["blocks"][0]["wq"].shape[1] // head_dim
    return dataclasses.replace(cfg, heads=heads)


def rescale_norms(small, d: int) -> dict:
    """RMSNorm scales times ``sqrt(d / d')``: ``rsqrt(S / d) = sqrt(d / d')
    rsqrt(S / d')`` for the sum of squares ``S`` of the kept channels, so
    the compacted model then normalises as the masked one did (``eps``
    aside)."""
    d_new = small["emb"].shape[1]
    f = math.sqrt(d / d_new)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * f if jax.tree_util.keystr(p).endswith(("'ln1']", "'ln2']", "'lnf']"))
        else x, small)


def n_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------
# Recovery training and timing


def recover(cfg, params, data: np.ndarray, steps: int, seed: int, lr: float) -> dict:
    """``steps`` of AdamW (constant lr after a short warm-up) on ``params``."""
    if steps == 0:
        return params
    apply = LM.make_apply(cfg)
    sched = optax.linear_schedule(0.0, lr, max(1, steps // 10))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.95))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, seqs):
        grads = jax.grad(lambda p: LM.loss_fn(apply, p, seqs))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        params, opt = step(params, opt, jnp.asarray(LM.windows(data, cfg.batch, cfg.ctx + 1, rng)))
    return params


def interleaved_ms(fns: dict, reps: int) -> dict:
    """Median and spread (min, max) of ms per call, the variants alternated."""
    for f in fns.values():
        f()
    times: dict = {k: [] for k in fns}
    for r in range(reps):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: dict(median=float(np.median(v)), min=float(np.min(v)), max=float(np.max(v)))
            for k, v in times.items()}


# --------------------------------------------------------------------------
# The study


def load_model(args):
    cfg = LM.QUICK if args.quick else LM.FULL
    steps = args.train_steps if args.train_steps is not None else (60 if args.quick else 1000)
    train_data, train_hash = LM.read_files(LM.TRAIN_FILES[: cfg.train_files])
    val_data, val_hash = LM.read_files(LM.VAL_FILES)
    corpus = LM.digest({**train_hash, **val_hash})
    ckpt = LM.checkpoint_path(pathlib.Path(args.results), cfg, steps, args.seed, corpus)
    if ckpt.exists():
        params, info = LM.load(ckpt, cfg)
        print(f"loaded {ckpt} (trained {info['steps']} steps)")
    else:
        params, info = LM.train(cfg, train_data, steps, args.seed, not args.no_progress)
        LM.save(ckpt, params, info)
        print(f"trained {steps} steps in {info['train_seconds']:.0f} s, saved {ckpt}")
    val = LM.windows(val_data, cfg.val, cfg.ctx + 1)
    return cfg, params, train_data, val, corpus


def run_setting(name, cfg, params, graphs, train_data, val, x, args) -> dict:
    setting = SETTINGS[name]
    graph = graphs["hidden" if "hidden" in setting else "plain"]
    apply = LM.make_apply(cfg)
    masks = width_masks(graph, params, setting)
    masked = jp.apply_masks(params, masks)
    small = jp.structured.compact(graph, params, masks)
    cfg_s = compacted_config(cfg, small)
    apply_s = LM.make_apply(cfg_s)
    row = dict(setting=setting, heads=cfg_s.heads, d=int(small["emb"].shape[1]),
               mlp=int(small["blocks"][0]["wg"].shape[1]),
               params=n_params(small), params_frac=n_params(small) / n_params(params),
               macs=int(jp.graph.trace(apply_s, small, x).macs),
               masked=LM.evaluate(apply, masked, val), compacted=LM.evaluate(apply_s, small, val))
    tuned = small
    if "hidden" in setting:
        tuned = rescale_norms(small, cfg.d)
        row["rescaled"] = LM.evaluate(apply_s, tuned, val)
    row["recovered"] = LM.evaluate(apply_s, recover(cfg_s, tuned, train_data, args.recovery_steps,
                                                    args.seed + 7, args.recovery_lr), val)
    f_dense, f_small = jax.jit(apply), jax.jit(apply_s)
    row["ms"] = interleaved_ms({"dense": lambda: jax.block_until_ready(f_dense(params, x)),
                                "compacted": lambda: jax.block_until_ready(f_small(small, x))},
                               args.reps)
    row["speedup"] = row["ms"]["dense"]["median"] / row["ms"]["compacted"]["median"]
    return row


def run(args) -> dict:
    cfg, params, train_data, val, corpus = load_model(args)
    apply = LM.make_apply(cfg)
    x = jnp.asarray(LM.windows(train_data, cfg.batch, cfg.ctx, np.random.default_rng(3)))
    graphs = dict(plain=jp.graph.trace(apply, params, x),
                  hidden=jp.graph.trace(apply, params, x, allow_reductions=True))
    dense_ppl = LM.evaluate(apply, params, val)
    dense_rec = LM.evaluate(apply, recover(cfg, params, train_data, args.recovery_steps,
                                           args.seed + 7, args.recovery_lr), val)
    res = dict(config=dataclasses.asdict(cfg), corpus_digest=corpus,
               recovery_steps=args.recovery_steps, recovery_lr=args.recovery_lr,
               dense=dict(ppl=dense_ppl, recovered=dense_rec, params=n_params(params),
                          macs=int(graphs["plain"].macs)), results={})
    print(f"dense: ppl {dense_ppl:.3f}, after {args.recovery_steps} more steps {dense_rec:.3f}; "
          f"{res['dense']['params']:,} params")
    names = QUICK_SETTINGS if args.quick else tuple(SETTINGS)
    for name in LM._bar(names, "settings", not args.no_progress):
        row = run_setting(name, cfg, params, graphs, train_data, val, x, args)
        res["results"][name] = row
        extra = f", rescaled {row['rescaled']:.3f}" if "rescaled" in row else ""
        print(f"{name:>16}: params {row['params_frac']:.1%}, MACs "
              f"{row['macs'] / res['dense']['macs']:.1%}, ppl masked {row['masked']:.3f}, "
              f"compacted {row['compacted']:.3f}{extra}, recovered {row['recovered']:.3f}; "
              f"{row['speedup']:.2f}x faster", flush=True)
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["results"])
    cols = ("masked", "compacted", "rescaled", "recovered")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(names))
    for k, c in enumerate(cols):
        vals = [res["results"][n].get(c, np.nan) for n in names]
        ax.bar(x + (k - 1.5) * 0.2, vals, 0.2, label=c)
    ax.axhline(res["dense"]["ppl"], color="k", lw=1, ls="--", label="dense")
    ax.axhline(res["dense"]["recovered"], color="g", lw=1, ls=":", label="dense + recovery")
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    ax.set_ylabel("validation perplexity per byte")
    ax.set_title(f"Width pruning of a byte-level LM (recovery: {res['recovery_steps']} steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, three settings (CI)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="training steps of the model (default 1000; 60 with --quick)")
    ap.add_argument("--recovery-steps", type=int, default=None,
                    help="training steps after pruning (default 100; 5 with --quick)")
    ap.add_argument("--recovery-lr", type=float, default=1e-4,
                    help="peak learning rate of recovery (the end of the model's cosine schedule)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per variant")
    ap.add_argument("--results", default=os.path.join("results", "prune_lm"),
                    help="folder of the trained checkpoints (shared with prune_lm.py)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, help="write a bar chart here (png)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = ap.parse_args(argv)
    if args.recovery_steps is None:
        args.recovery_steps = 5 if args.quick else 100
    if args.reps is None:
        args.reps = 5 if args.quick else 21
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.plot:
        plot(res, args.plot)
    return res


if __name__ == "__main__":
    main()

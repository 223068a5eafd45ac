"""The compression pipeline, measured stage by stage: prune, distill,
quantize, export.

Two models go through the same stages:

* the MNIST-1D CNN of ``examples/structured.py`` (plain JAX, BatchNorm);
* the byte-level language model of ``examples/prune_lm.py`` (a smaller
  configuration, trained here and cached under ``--results``).

=================  ==========================================================
dense              the trained float32 model
structured 50%     ``jp.structured.prune`` to 50% of the units (CNN: every
                   prunable group; LM: the SwiGLU neurons) while fine-tuning
                   ``--finetune`` steps with plain cross-entropy, then
                   ``jp.structured.compact``
 + distill         the same, same steps, same schedule, with
                   ``jp.distill.loss`` (the dense model as teacher)
 + int8 PTQ        ``jp.quant.quantize`` (qwix, per output channel int8) of
                   the distilled compact model's kernels
 + int8 QAT        ``--qat`` more steps of distillation through
                   ``jp.quant.fake_quant``, then the same int8 quantization
 exported          the QAT model through ``jp.export`` (StableHLO; LiteRT
                   int8 where available)
=================  ==========================================================

Per stage: accuracy (CNN) or validation perplexity per byte (LM),
parameters, MACs (``graph.macs``), the bytes of the written file (an
uncompressed ``.npz`` of the arrays: int8 kernels with their float32
scales; ``deflate`` = ``np.savez_compressed``), and the latency of a
jitted forward pass on XLA:CPU (int8 rows dequantize inside the call),
all stages timed side by side in one process (round-robin blocks, median).

For the LM there is also the one-shot study (no retraining) at 2:4:
SparseGPT alone, then int8 (or int4) by rounding (RTN), by SparseGPT with
quantization in its OBS loop (``sparsegpt(quantize=jp.quant.column_quantizer)``,
the reference's ``--wbits``), and by qwix's GPTQ on the pruned kernels
(then re-masked, since GPTQ's updates fill the zeros). Every quantized
tree is checked: pruned weights are exactly zero.

Run:
  python examples/compress.py --json docs/compress.json --plot docs/compress.png
  python examples/compress.py --quick      # CI-sized

References:
  Hinton et al., "Distilling the knowledge in a neural network", 2015;
  Han et al., "Deep compression", ICLR 2016; Frantar & Alistarh,
  "SparseGPT", ICML 2023; Frantar et al., "GPTQ", ICLR 2023.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prune_lm as lm  # noqa: E402
import structured as cnn  # noqa: E402

LM_FULL = lm.Config(d=128, layers=2, heads=4, ctx=64, hidden=256, batch=16, train_files=20,
                    calib=32, calib_batch=16, val=256, blocksize=64)
LM_QUICK = lm.Config(d=32, layers=1, heads=2, ctx=32, hidden=32, batch=8, train_files=4,
                     calib=8, calib_batch=8, val=16, blocksize=32)


# --------------------------------------------------------------------------
# Measuring


def file_bytes(tree, directory: str, name: str) -> tuple[int, int]:
    """Bytes of the tree written as ``.npz`` (QArray leaves as their integer
    values and float scales), uncompressed and deflated."""
    import qwix

    arrays = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, qwix.QArray))
    for path, leaf in flat:
        key = jax.tree_util.keystr(path)
        if isinstance(leaf, qwix.QArray):
            arrays[key + ".q"] = np.asarray(leaf.qvalue)
            arrays[key + ".scale"] = np.asarray(leaf.scale)
        else:
            arrays[key] = np.asarray(leaf)
    out = []
    for save, suffix in ((np.savez, ".npz"), (np.savez_compressed, ".deflate.npz")):
        path = os.path.join(directory, name.replace(" ", "_") + suffix)
        save(path, **arrays)
        out.append(os.path.getsize(path))
    return out[0], out[1]


def time_fns(fns: dict, reps: int, block_s: float) -> dict:
    """Median wall-clock ms per call of each ``name: (fn, args)``, timed
    round-robin in blocks (each block ~``block_s`` seconds)."""
    for f, a in fns.values():
        for _ in range(2):
            jax.block_until_ready(f(*a))
    names = list(fns)
    out = {n: [] for n in names}
    f, a = fns[names[0]]
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(f(*a))
    inner = max(1, int(round(block_s / ((time.perf_counter() - t0) / 3))))
    for rep in range(reps):
        for n in (names if rep % 2 == 0 else names[::-1]):
            f, a = fns[n]
            t0 = time.perf_counter()
            for _ in range(inner):
                jax.block_until_ready(f(*a))
            out[n].append(1e3 * (time.perf_counter() - t0) / inner)
    return {n: float(np.median(v)) for n, v in out.items()}


def zeros_kept(before, after) -> bool:
    """Every exact zero of ``before`` is an exact zero of the float ``after``."""
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        b, a = np.asarray(b), np.asarray(a)
        if np.any((b == 0) & (a != 0)):
            return False
    return True


def export_stage(apply_fn, variables, example, calibration, directory: str, quantize: str,
                 metric) -> dict:
    """``jp.export``: the StableHLO file and the LiteRT file (``quantize``),
    their bytes, the LiteRT model's ``metric(model)`` and its latency (one
    thread, the example's batch)."""
    out = {"litert_quantize": quantize}
    for name, blob in (("stablehlo", lambda: jp.export.stablehlo(apply_fn, variables, example)),
                       ("litert", lambda: jp.export.litert(apply_fn, variables, example,
                                                           quantize=quantize,
                                                           calibration=calibration))):
        path = os.path.join(directory, f"model.{name}")
        data = blob()
        with open(path, "wb") as f:
            f.write(data)
        out[f"{name}_bytes"] = jp.export.file_bytes(path)
    model = jp.export.LiteRTModel(path, num_threads=1)
    x = np.asarray(example)
    times = []
    for _ in range(22):
        t0 = time.perf_counter()
        model(x)
        times.append(1e3 * (time.perf_counter() - t0))
    out["litert_ms"] = float(np.median(times[2:]))
    out["litert_metric"] = metric(model)
    return out


# --------------------------------------------------------------------------
# The CNN


def cnn_finetune(data, cfg, teacher, start, *, steps, alpha, graph=None, qat=False, seed=0,
                 desc="", progress=True):
    """Fine-tunes ``start``: ``jp.structured.prune`` to 50% when ``graph``
    is given; the loss is ``jp.distill.loss`` (``alpha=0``: plain
    cross-entropy); ``qat`` fake-quantizes the kernels in the forward pass."""
    from tqdm import tqdm

    x, y = data["x"], data["y"]
    adam = optax.adam(optax.cosine_decay_schedule(cfg.finetune_lr, steps))
    tx = adam
    if graph is not None:
        every = max(1, steps // 20)
        ramp = max(every, (int(0.6 * steps) // every) * every)
        tx = jp.structured.prune(adam, graph=graph, sparsity=cnn.cubic(0.5, ramp), score="l2",
                                 update_every=every)

    def loss(params, stats, xb, yb):
        p = jp.quant.fake_quant(params, "int8") if qat else params
        logits, batch = cnn.forward({"params": p, "stats": stats}, xb, train=True)
        t = cnn.apply(teacher, xb)
        return jp.distill.loss(logits, t, yb, temperature=cfg.temperature, alpha=alpha), batch

    @jax.jit
    def step(params, stats, state, idx):
        (_, batch), g = jax.value_and_grad(loss, has_aux=True)(params, stats, x[idx], y[idx])
        u, state = tx.update(g, state, params)
        stats = jax.tree.map(lambda r, b: cnn.MOMENTUM * r + (1 - cnn.MOMENTUM) * b, stats, batch)
        return optax.apply_updates(params, u), stats, state

    params, stats = start["params"], start["stats"]
    state = tx.init(params)
    idx = np.random.default_rng(seed).integers(0, x.shape[0], (steps, cfg.batch))
    for i in tqdm(range(steps), desc=desc, disable=not progress, leave=False, file=sys.stderr):
        params, stats, state = step(params, stats, state, jnp.asarray(idx[i]))
    return {"params": params, "stats": stats}, state


def run_cnn(cfg, progress: bool, tmp: str) -> dict:
    """Every seed (dense training included); the table gives accuracy as
    mean +- std over seeds, the rest from seed ``--seed`` (sizes do not
    depend on the seed), latency as the median over seeds."""
    data = cnn.load_data()
    per_seed = [cnn_seed(cfg, data, cfg.seed + i, progress, tmp, export=i == 0)
                for i in range(cfg.seeds)]
    rows = []
    for j, r in enumerate(per_seed[0]["rows"]):
        if r["stage"] == "exported":
            rows.append(r)
            continue
        accs = [p["rows"][j]["acc"] for p in per_seed]
        rows.append(dict(r, acc=float(np.mean(accs)), acc_std=float(np.std(accs)), accs=accs,
                         xla_ms=float(np.median([p["rows"][j]["xla_ms"] for p in per_seed]))))
    return dict(rows=rows, per_seed=per_seed,
                zeros_kept=all(p["zeros_kept"] for p in per_seed))


def cnn_seed(cfg, data, seed: int, progress: bool, tmp: str, export: bool) -> dict:
    xt, yt = data["x_test"], data["y_test"]
    xlat = xt[: cfg.latency_batch]
    variables = cnn.init(jax.random.key(seed), cfg.widths, hidden=cfg.hidden)
    graph = jp.graph.trace(cnn.apply, variables, xlat)
    trainer = cnn.Trainer(data, argparse.Namespace(
        steps=cfg.steps, finetune=cfg.finetune, lr=cfg.lr, finetune_lr=cfg.finetune_lr,
        batch=cfg.batch, update_every=max(1, cfg.finetune // 20)), graph)
    dense, _ = trainer.run("dense", variables, cfg.steps, seed, progress=progress,
                           desc="cnn dense")
    models, fns = {"dense": dense}, {}
    tuned = {}
    for name, alpha in (("structured 50%", 0.0), ("structured 50% + distill", cfg.alpha)):
        t, state = cnn_finetune(data, cfg, dense, dense, steps=cfg.finetune, alpha=alpha,
                                graph=graph, seed=1000 * seed + 1, desc=f"cnn {name}",
                                progress=progress)
        masks = jp.get_masks(state)
        tuned[name] = (t, masks)
        models[name] = jp.structured.compact(graph, t, masks)
    small = models["structured 50% + distill"]
    qat, _ = cnn_finetune(data, cfg, dense, small, steps=cfg.qat, alpha=cfg.alpha, qat=True,
                          seed=1000 * seed + 2, desc="cnn int8 QAT", progress=progress)
    quantized = {"+ int8 PTQ": jp.quant.quantize(small, "int8"),
                 "+ int8 QAT": jp.quant.quantize(qat, "int8")}
    rows = []
    fwd = jax.jit(cnn.apply)
    deq = jax.jit(lambda q, x: cnn.apply(jp.quant.dequantize(q), x))
    for name, v in {**models, **quantized}.items():
        is_q = name in quantized
        floats = jp.quant.dequantize(v) if is_q else v
        g = jp.graph.trace(cnn.apply, floats, xlat)
        nbytes, deflate = file_bytes(v, tmp, "cnn " + name)
        rows.append(dict(stage=name, acc=cnn.accuracy(floats, xt, yt),
                         params=cnn.count(floats["params"]), macs=int(g.macs), bytes=nbytes,
                         deflate_bytes=deflate))
        fns[name] = (deq if is_q else fwd, (v, xlat))
    t, masks = tuned["structured 50% + distill"]
    # Zeros: the masked (uncompacted) weights' zeros survive int8 quantization.
    zeros = zeros_kept(jp.apply_masks(t["params"], masks),
                       jp.quant.dequantize(jp.quant.quantize(t["params"], "int8", masks=masks)))
    lat = time_fns(fns, cfg.reps, cfg.block_s)
    for r in rows:
        r["xla_ms"] = lat[r["stage"]]
    b = xlat.shape[0]
    calib = [np.asarray(data["x"][i:i + b]) for i in range(0, 4 * b, b)]

    def litert_acc(model):
        n = (xt.shape[0] // b) * b
        pred = [np.argmax(model(np.asarray(xt[i:i + b])), -1) for i in range(0, n, b)]
        return float(np.mean(np.concatenate(pred) == np.asarray(yt[:n])))

    exp = export_stage(cnn.apply, qat, np.asarray(xlat), calib, tmp, "int8",
                       litert_acc) if export else {}
    rows.append(dict(stage="exported", **exp))
    return dict(rows=rows, zeros_kept=zeros, latency_batch=int(cfg.latency_batch))


# --------------------------------------------------------------------------
# The language model


def lm_model(cfg, progress: bool):
    lcfg = LM_QUICK if cfg.quick else LM_FULL
    train_data, th = lm.read_files(lm.TRAIN_FILES[: lcfg.train_files])
    val_data, vh = lm.read_files(lm.VAL_FILES)
    corpus = lm.digest({**th, **vh})
    ckpt = lm.checkpoint_path(pathlib.Path(cfg.results), lcfg, cfg.lm_steps, cfg.seed, corpus)
    if ckpt.exists():
        params, info = lm.load(ckpt, lcfg)
    else:
        params, info = lm.train(lcfg, train_data, cfg.lm_steps, cfg.seed, progress)
        lm.save(ckpt, params, info)
    rng = np.random.default_rng(cfg.seed + 1)
    calib = [jnp.asarray(b) for b in np.split(lm.windows(train_data, lcfg.calib, lcfg.ctx, rng),
                                               lcfg.calib // lcfg.calib_batch)]
    val = lm.windows(val_data, lcfg.val, lcfg.ctx + 1)
    return lcfg, params, info, train_data, calib, val


def lm_finetune(lcfg, cfg, apply, teacher, start, train_data, *, steps, alpha, graph=None,
                qat=False, masks=None, desc="", progress=True):
    """As :func:`cnn_finetune`, for the LM: next-byte distillation;
    ``masks`` are held by ``jp.keep_masks``."""
    adam = optax.adam(optax.cosine_decay_schedule(cfg.lm_finetune_lr, steps))
    tx = adam if masks is None else optax.chain(adam, jp.keep_masks(masks))
    if graph is not None:
        every = max(1, steps // 20)
        ramp = max(every, (int(0.6 * steps) // every) * every)
        mlp = {i: cnn.cubic(0.5, ramp) for i, g in enumerate(graph.groups)
               if g.prunable and g.kind == "channels"}  # the SwiGLU neurons
        tx = jp.structured.prune(adam, graph=graph, sparsity=mlp, score="l2",
                                 update_every=every)

    def loss(params, seqs):
        p = jp.quant.fake_quant(params, "int8") if qat else params
        logits = apply(p, seqs[:, :-1])
        t = apply(teacher, seqs[:, :-1])
        return jp.distill.loss(logits, t, seqs[:, 1:], temperature=cfg.lm_temperature,
                               alpha=alpha)

    @jax.jit
    def step(params, state, seqs):
        g = jax.grad(loss)(params, seqs)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    params, state = start, tx.init(start)
    rng = np.random.default_rng(cfg.seed + 7)
    for _ in lm._bar(range(steps), desc, progress):
        params, state = step(params, state,
                             jnp.asarray(lm.windows(train_data, lcfg.batch, lcfg.ctx + 1, rng)))
    return params, state


def run_lm(cfg, progress: bool, tmp: str) -> dict:
    lcfg, dense, info, train_data, calib, val = lm_model(cfg, progress)
    apply = lm.make_apply(lcfg)
    tokens = calib[0][:1]
    graph = jp.graph.trace(apply, dense, tokens)
    models = {"dense": dense}
    for name, alpha in (("structured 50%", 0.0), ("structured 50% + distill", cfg.lm_alpha)):
        t, state = lm_finetune(lcfg, cfg, apply, dense, dense, train_data, steps=cfg.lm_finetune,
                               alpha=alpha, graph=graph, desc=f"lm {name}", progress=progress)
        models[name] = jp.structured.compact(graph, t, jp.get_masks(state))
    small = models["structured 50% + distill"]
    qat, _ = lm_finetune(lcfg, cfg, apply, dense, small, train_data, steps=cfg.lm_qat,
                         alpha=cfg.lm_alpha, qat=True, desc="lm int8 QAT", progress=progress)
    quantized = {"+ int8 PTQ": jp.quant.quantize(small, "int8"),
                 "+ int8 QAT": jp.quant.quantize(qat, "int8")}
    rows, fns = [], {}
    xlat = jnp.asarray(val[:8, :-1])
    fwd = jax.jit(apply)
    deq = jax.jit(lambda q, x: apply(jp.quant.dequantize(q), x))
    for name, v in {**models, **quantized}.items():
        is_q = name in quantized
        floats = jp.quant.dequantize(v) if is_q else v
        g = jp.graph.trace(apply, floats, tokens)
        nbytes, deflate = file_bytes(v, tmp, "lm " + name)
        rows.append(dict(stage=name, ppl=lm.evaluate(apply, floats, val),
                         params=cnn.count(floats), macs=int(g.macs), bytes=nbytes,
                         deflate_bytes=deflate))
        fns[name] = (deq if is_q else fwd, (v, xlat))
    lat = time_fns(fns, cfg.reps, cfg.block_s)
    for r in rows:
        r["xla_ms"] = lat[r["stage"]]
    b = xlat.shape[0]

    def litert_ppl(model):  # int8 weights, float activations (see jp.export.litert)
        n = (len(val) // b) * b
        nll = [optax.softmax_cross_entropy_with_integer_labels(
            jnp.asarray(model(val[i:i + b, :-1])), val[i:i + b, 1:]).mean()
            for i in range(0, n, b)]
        return float(np.exp(np.mean(nll)))

    exp = export_stage(apply, qat, np.asarray(xlat), None, tmp, "dynamic", litert_ppl)
    rows.append(dict(stage="exported", **exp))
    oneshot = lm_oneshot(lcfg, apply, dense, calib, val, tmp, cfg.qtypes)
    # 2:4, then int8 QAT with distillation from the dense model, masks held.
    sp, masks = jp.oneshot.sparsegpt(apply, dense, calib, n=2, m=4, blocksize=lcfg.blocksize,
                                     where=lm.WHERE)
    tuned, _ = lm_finetune(lcfg, cfg, apply, dense, sp, train_data, steps=cfg.lm_finetune,
                           alpha=cfg.lm_alpha, qat=True, masks=masks, desc="lm 2:4 QAT",
                           progress=progress)
    q = jp.quant.quantize(tuned, "int8", masks=masks, where=lm.WHERE)
    floats = jp.quant.dequantize(q)
    ppl = lm.evaluate(apply, floats, val)
    nbytes, deflate = file_bytes(q, tmp, "lm 2:4 qat")
    oneshot.append(dict(method=f"2:4 SparseGPT, then int8 QAT + distill ({cfg.lm_finetune} steps, "
                        "masks held)", ppl=ppl, rel=ppl / oneshot[0]["ppl"] - 1, bytes=nbytes,
                        deflate_bytes=deflate,
                        zeros_kept=zeros_kept(jp.apply_masks(sp, masks), floats),
                        sparsity=float(jp.sparsity_of(floats, where=lm.WHERE))))
    return dict(rows=rows, oneshot=oneshot, config=dataclasses.asdict(lcfg), train=info,
                unigram_ppl=lm.unigram_ppl(train_data, lm.read_files(lm.VAL_FILES)[0]))


def gptq(apply, params, masks, calib, qtype: str):
    """qwix's GPTQ on every pruned kernel (Hessian ``2 X^T X / n`` of its
    inputs in the pruned model, from ``jp.calibrate``), then the masks
    again: GPTQ's error updates write into pruned positions."""
    import qwix
    from qwix._src.core.qarray import HowToQuantize
    from qwix.contrib import gptq_core

    stats = jp.calibrate(apply, params, calib, where=lm.WHERE, gram=True)
    how = HowToQuantize(qtype=qtype, channelwise_axes=(0,), tiled_axes={},
                        calibration_method="absmax")

    @jax.jit  # one compile per kernel shape, not one per eager op of GPTQ's column loop
    def one(w, h):
        q = gptq_core.quantize_weight(w.T, h, how, blocksize=64)[0]  # (out, in) rows
        return qwix.dequantize(q).T

    paths, leaves, treedef = jp.tree.flatten(params)
    out = []
    for key, w in zip(paths, leaves):
        s = stats.get(key)
        out.append(w if s is None else one(w, 2.0 * s.gram / s.count))
    return jp.apply_masks(jp.tree.unflatten(treedef, out), masks)


def lm_oneshot(lcfg, apply, dense, calib, val, tmp: str, qtypes) -> list:
    """2:4 from the dense model, alone and with int8 / int4 three ways."""
    rows = []
    base = lm.evaluate(apply, dense, val)

    def row(name, params, masks=None, q=None):
        ppl = lm.evaluate(apply, params, val)
        nbytes, deflate = file_bytes(q if q is not None else params, tmp, "lm1 " + name)
        ok = True if masks is None else zeros_kept(jp.apply_masks(params, masks), params)
        rows.append(dict(method=name, ppl=ppl, rel=ppl / base - 1, bytes=nbytes,
                         deflate_bytes=deflate, zeros_kept=bool(ok),
                         sparsity=float(jp.sparsity_of(params, where=lm.WHERE))))

    row("dense", dense)
    sp, masks = jp.oneshot.sparsegpt(apply, dense, calib, n=2, m=4, blocksize=lcfg.blocksize,
                                     where=lm.WHERE)
    row("2:4 SparseGPT", sp, masks)
    for qt in qtypes:
        rtn = jp.quant.quantize(sp, qt, masks=masks, where=lm.WHERE)
        row(f"2:4 SparseGPT, then {qt} RTN", jp.quant.dequantize(rtn), masks, rtn)
        joint, jm = jp.oneshot.sparsegpt(apply, dense, calib, n=2, m=4,
                                         blocksize=lcfg.blocksize, where=lm.WHERE,
                                         quantize=jp.quant.column_quantizer(qt))
        row(f"2:4 SparseGPT with {qt} (joint)", joint, jm,
            jp.quant.quantize(joint, qt, masks=jm, where=lm.WHERE))
        g = gptq(apply, sp, masks, calib, qt)
        row(f"2:4 SparseGPT, then {qt} GPTQ (re-masked)", g, masks,
            jp.quant.quantize(g, qt, masks=masks, where=lm.WHERE))
    return rows


# --------------------------------------------------------------------------
# Output


def table(out: dict) -> str:
    lines = []
    for key, metric in (("cnn", "acc"), ("lm", "ppl")):
        if key not in out:
            continue
        res = out[key]
        dense = next(r for r in res["rows"] if r["stage"] == "dense")
        lines += [f"\n{key.upper()}: stage | {'accuracy %' if metric == 'acc' else 'ppl/byte'} | "
                  "params | MACs | file bytes (npz) | deflate | x smaller | XLA:CPU ms",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            if r["stage"] == "exported":
                if "litert_bytes" in r:
                    m = r["litert_metric"]
                    m = f"{100 * m:.2f}" if metric == "acc" else f"{m:.3f}"
                    lines.append(
                        f"| exported: LiteRT {r['litert_quantize']} | {m} | | | "
                        f"{r['litert_bytes']:,} | StableHLO {r['stablehlo_bytes']:,} | "
                        f"{dense['bytes'] / r['litert_bytes']:.1f} | "
                        f"{r['litert_ms']:.3f} (LiteRT, 1 thread) |")
                continue
            m = (f"{100 * r['acc']:.2f} ± {100 * r['acc_std']:.2f}" if metric == "acc"
                 else f"{r['ppl']:.3f}")
            lines.append(f"| {r['stage']} | {m} | {r['params']:,} | {r['macs']:,} | "
                         f"{r['bytes']:,} | {r['deflate_bytes']:,} | "
                         f"{dense['bytes'] / r['bytes']:.1f} | {r['xla_ms']:.3f} |")
        if key == "lm":
            lines += ["\nLM at 2:4 (one-shot; the last row fine-tuned): method | ppl/byte | vs dense | "
                      "bytes | deflate | zeros kept", "|---|---:|---:|---:|---:|---|"]
            for r in res["oneshot"]:
                lines.append(f"| {r['method']} | {r['ppl']:.3f} | {100 * r['rel']:+.2f}% | "
                             f"{r['bytes']:,} | {r['deflate_bytes']:,} | {r['zeros_kept']} |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("cnn", "lm") if k in out]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        metric = "acc" if key == "cnn" else "ppl"
        rows = [r for r in out[key]["rows"] if r["stage"] != "exported"]
        rows += [{"stage": f"LiteRT {r['litert_quantize']}", "bytes": r["litert_bytes"],
                  metric: r["litert_metric"]}
                 for r in out[key]["rows"] if "litert_bytes" in r]
        if key == "lm":
            rows += [dict(stage=r["method"], bytes=r["bytes"], ppl=r["ppl"])
                     for r in out[key]["oneshot"] if r["method"] != "dense"]
        for r in rows:
            y = 100 * r[metric] if metric == "acc" else r[metric]
            ax.scatter(r["bytes"] / 1024, y)
            ax.annotate(r["stage"], (r["bytes"] / 1024, y), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("file bytes (KiB; .npz, .tflite)")
        ax.set_ylabel("test accuracy (%)" if metric == "acc" else "validation ppl per byte")
        ax.set_title("MNIST-1D CNN" if key == "cnn" else "byte LM")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--models", default="cnn,lm", help="cnn, lm or both")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=None, help="CNN seeds (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="CNN dense steps (default 2000)")
    ap.add_argument("--finetune", type=int, default=None, help="CNN prune + fine-tune steps "
                    "(default 1000)")
    ap.add_argument("--qat", type=int, default=None, help="CNN QAT steps (default 300)")
    ap.add_argument("--widths", default=None, help="CNN conv widths (default 32,64,128)")
    ap.add_argument("--hidden", type=int, default=None, help="CNN dense units (default 256)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term")
    ap.add_argument("--lm-steps", type=int, default=None, help="LM training (default 600)")
    ap.add_argument("--lm-finetune", type=int, default=None, help="LM fine-tune (default 200)")
    ap.add_argument("--lm-qat", type=int, default=None, help="LM QAT steps (default 60)")
    ap.add_argument("--lm-finetune-lr", type=float, default=5e-4)
    ap.add_argument("--lm-temperature", type=float, default=1.0)
    ap.add_argument("--lm-alpha", type=float, default=1.0,
                    help="LM soft-term weight (1: logits only, as Minitron)")
    ap.add_argument("--qtypes", default=None, help="one-shot qtypes (default int8,int4)")
    ap.add_argument("--latency-batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=None, help="timed blocks (default 15)")
    ap.add_argument("--block-s", type=float, default=0.1)
    ap.add_argument("--results", default=os.path.join("results", "compress"),
                    help="folder of the trained LM checkpoints")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-progress", action="store_true")
    cfg = ap.parse_args(argv)
    q = cfg.quick
    cfg.models = [m for m in cfg.models.split(",") if m]
    cfg.seeds = cfg.seeds or (1 if q else 3)
    cfg.steps = cfg.steps or (100 if q else 2000)
    cfg.finetune = cfg.finetune or (40 if q else 1000)
    cfg.qat = cfg.qat or (10 if q else 300)
    cfg.widths = tuple(int(w) for w in (cfg.widths or ("8,16,16" if q else "32,64,128"))
                       .split(","))
    cfg.hidden = cfg.hidden or (16 if q else 256)
    cfg.lm_steps = cfg.lm_steps or (20 if q else 600)
    cfg.lm_finetune = cfg.lm_finetune or (10 if q else 200)
    cfg.lm_qat = cfg.lm_qat or (4 if q else 60)
    cfg.qtypes = (cfg.qtypes or ("int8" if q else "int8,int4")).split(",")
    cfg.reps = cfg.reps or (3 if q else 15)
    if q:
        cfg.block_s = min(cfg.block_s, 0.02)
        cfg.latency_batch = min(cfg.latency_batch, 64)
    return cfg


def main(argv=None) -> dict:
    cfg = parse(argv)
    t0, load0 = time.time(), os.getloadavg()[0]
    out = dict(config={k: v for k, v in vars(cfg).items()}, device=str(jax.devices()[0]),
               jax=jax.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        if "cnn" in cfg.models:
            out["cnn"] = run_cnn(cfg, not cfg.no_progress, tmp)
        if "lm" in cfg.models:
            out["lm"] = run_lm(cfg, not cfg.no_progress, tmp)
    out["wall_time_s"] = time.time() - t0
    out["load_average"] = [load0, os.getloadavg()[0]]
    print(table(out))
    print(f"wall time {out['wall_time_s']:.0f} s, load average {out['load_average']}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    if cfg.plot:
        plot(out, cfg.plot)
    return out


if __name__ == "__main__":
    main()

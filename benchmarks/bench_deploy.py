"""Deploy benchmark: pruned models out of JAX, against Torch-Pruning in PyTorch.

ResNet-18 as in Flax's ImageNet example (Linen: 7x7 stride-2 stem,
BatchNorm, 3x3 stride-2 max pool, four stages of two basic blocks, 1x1
projections, mean pool, 1000-class Dense) on 32x32x3 inputs, batch 64, with
random weights and random BatchNorm scales, shifts and statistics, as a
trained model has (``--flax-init``: the example's initialisation, whose
zero scale of every block's last BatchNorm makes those convolutions fold to
all-zero weights, which no trained model has). At dense
and 30 / 50 / 70% of the channels of every prunable group removed
(``jp.structured`` L2 scores, ``round_to=8``, compacted), each model is
written by ``jp.export.report`` (orbax checkpoint, StableHLO, LiteRT float32,
LiteRT int8 full-integer calibrated on 4 random batches) and timed:

* ``jax.jit`` on XLA:CPU;
* the LiteRT interpreter (``ai_edge_litert``, XNNPACK, 2 threads), float
  and int8, loaded from the written files;
* PyTorch: torchvision's ResNet-18 (written here in plain torch) pruned by
  Torch-Pruning's ``MagnitudePruner`` (L2 importance, same ratio,
  ``round_to=8``, classifier kept), ``torch.set_num_threads(2)``,
  ``inference_mode``, ``OMP_WAIT_POLICY=PASSIVE`` unless set (see below).

All variants run in one process, round-robin (one block of ``--inner`` calls
of each variant at a time, ``--reps`` blocks); min and median ms per call
over blocks are reported. Round trips: the StableHLO file's outputs against
``jax.jit`` (exact), LiteRT float and int8 against it (max error over max
|output|).

The byte LM of ``examples/prune_lm.py`` (d 256, 4 layers, 4 heads, SwiGLU
512, context 128; random weights; batch 8 x 128 tokens): dense, 50% of
heads and MLP neurons (``jp.structured``, compacted), 2:4 on the block
kernels (``jp.masks.n_of_m``; LiteRT with the sparse encoding), and int8
(dynamic: int8 weights; full int8: calibrated), under ``jax.jit`` and
LiteRT.

Run:
  python benchmarks/bench_deploy.py --json docs/bench_deploy.json
  python benchmarks/bench_deploy.py --quick      # dense and 50% only, fewer reps
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp

ROOT = pathlib.Path(__file__).resolve().parent.parent
# PyTorch's OpenMP threads spin while they wait; on a loaded machine (more
# runnable threads than cores) that made its 2-thread ResNet-18 9-20x slower
# here (1605 vs 86 ms per call). Passive waiting is the fair setting there.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# --------------------------------------------------------------------------
# Models


def resnet18_linen(classes: int = 1000, flax_init: bool = False):
    """Flax's ImageNet-example ResNet-18 (Linen); ``flax_init``: the example's
    zero initial scale of every block's last BatchNorm."""
    import flax.linen as nn

    zero = nn.initializers.zeros_init() if flax_init else nn.initializers.ones_init()

    class ResNetBlock(nn.Module):
        filters: int
        strides: tuple = (1, 1)

        @nn.compact
        def __call__(self, x):
            norm = functools.partial(nn.BatchNorm, use_running_average=True)
            y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
            y = nn.relu(norm()(y))
            y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
            y = norm(scale_init=zero)(y)
            if x.shape != y.shape:
                x = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False,
                            name="conv_proj")(x)
                x = norm(name="norm_proj")(x)
            return nn.relu(x + y)

    class ResNet18(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                        name="conv_init")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn_init")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            for i in range(4):
                for j in range(2):
                    x = ResNetBlock(64 * 2 ** i, (2, 2) if i > 0 and j == 0 else (1, 1))(x)
            return nn.Dense(classes)(jnp.mean(x, axis=(1, 2)))

    return ResNet18()


def init_resnet(batch: int, seed: int = 0, flax_init: bool = False):
    model = resnet18_linen(flax_init=flax_init)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, 32, 32, 3))
    v = jax.jit(model.init)(jax.random.key(seed), x[:1])
    keys = iter(jax.random.split(jax.random.key(seed + 2), 256))

    def stat(path, a):  # random statistics, as a trained model has
        name = jax.tree_util.keystr(path)
        u = jax.random.uniform(next(keys), a.shape)
        if "var" in name or "scale" in name:
            return 0.5 + u
        return a + 0.1 * (u - 0.5) if a.ndim == 1 else a

    if not flax_init:
        v = jax.tree_util.tree_map_with_path(stat, v)
    return model.apply, v, x


def torch_resnet18(classes: int = 1000):
    """torchvision's resnet18 architecture in plain torch."""
    import torch.nn as tnn

    class Basic(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.relu = tnn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                                 tnn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = tnn.BatchNorm2d(64)
            self.relu = tnn.ReLU(inplace=True)
            self.maxpool = tnn.MaxPool2d(3, 2, 1)
            layers, cin = [], 64
            for i in range(4):
                cout = 64 * 2 ** i
                layers.append(tnn.Sequential(Basic(cin, cout, 2 if i else 1),
                                             Basic(cout, cout, 1)))
                cin = cout
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.avgpool = tnn.AdaptiveAvgPool2d(1)
            self.fc = tnn.Linear(512, classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet()


def torch_pruned(ratio: float, batch: int):
    import torch
    import torch_pruning as tp

    torch.manual_seed(0)
    model = torch_resnet18().eval()
    x = torch.randn(batch, 3, 32, 32)
    if ratio > 0:
        pruner = tp.pruner.MagnitudePruner(
            model, x[:1], importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, round_to=8, ignored_layers=[model.fc])
        pruner.step()
    n = sum(p.numel() for p in model.parameters())
    return model, x, n


def load_lm():
    spec = importlib.util.spec_from_file_location("example_prune_lm",
                                                  ROOT / "examples" / "prune_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------
# Timing


def interleave(variants: dict, reps: int, inner: int) -> dict:
    """Round-robin: ``inner`` calls of each variant per block, order reversed
    every other block; min / median ms per call over blocks."""
    for fn in variants.values():  # warm up
        fn()
        fn()
    ms = {k: [] for k in variants}
    names = list(variants)
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            for _ in range(inner):
                variants[k]()
            ms[k].append(1e3 * (time.perf_counter() - t) / inner)
    return {k: dict(min=float(np.min(v)), median=float(np.median(v))) for k, v in ms.items()}


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def jit_call(apply_fn, v, x):
    f = jax.jit(lambda x: apply_fn(v, x))
    return lambda: f(x).block_until_ready()


# --------------------------------------------------------------------------
# ResNet-18


def resnet_section(args, tmp: str) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    apply_fn, v, x = init_resnet(args.batch, flax_init=args.flax_init)
    g = jp.graph.trace(apply_fn, v, x[:1])
    scores = jp.structured.scores(g, v)
    calib = [jax.random.normal(jax.random.key(100 + i), x.shape) for i in range(4)]
    models, rows, variants = {}, {}, {}
    for s in args.sparsities:
        name = f"{int(round(100 * s))}%"
        small = v if s == 0 else jp.structured.compact(
            g, v, jp.structured.masks(g, scores, s, round_to=8))
        models[name] = (apply_fn, small)
    t = time.perf_counter()
    with jp.resize.linen():
        rep = jp.export.report(models, x, formats=["orbax", "stablehlo", "litert", "litert-int8"],
                               calibration=calib, directory=tmp)
        print(rep, flush=True)
        for name, (f, small) in models.items():
            want = jax.jit(lambda x, small=small: f(small, x))(x)
            paths = {r["format"]: r["path"] for r in rep.rows if r["model"] == name}
            with open(paths["stablehlo"], "rb") as fh:
                hlo = jax.export.deserialize(fh.read())
            lite = jp.export.LiteRTModel(paths["litert"], num_threads=args.threads)
            int8 = jp.export.LiteRTModel(paths["litert-int8"], num_threads=args.threads)
            row = {r["format"]: r["bytes"] for r in rep.rows if r["model"] == name}
            first = next(r for r in rep.rows if r["model"] == name)
            row.update(params=first["params"], macs=first["macs"],
                       stablehlo_exact=bool(np.array_equal(hlo.call(x), want)),
                       litert_err=rel_err(lite(x), want), int8_err=rel_err(int8(x), want))
            variants[f"jit {name}"] = jit_call(f, small, x)
            variants[f"jit {name}"]()  # compiled here, where Linen sizes follow the arrays
            variants[f"litert {name}"] = functools.partial(lite, x)
            variants[f"litert-int8 {name}"] = functools.partial(int8, x)
            ratio = float(name[:-1]) / 100
            tmodel, tx, tparams = torch_pruned(ratio, args.batch)
            row["torch_params"] = tparams

            def run_torch(m=tmodel, tx=tx):
                with torch.inference_mode():
                    m(tx)
            variants[f"torch {name}"] = run_torch
            rows[name] = row
    print(f"exported in {time.perf_counter() - t:.0f} s; timing...", flush=True)
    times = interleave(variants, args.reps, args.inner)
    return dict(rows=rows, times=times)


# --------------------------------------------------------------------------
# Byte LM


def lm_section(args) -> dict:
    lm = load_lm()
    cfg = lm.QUICK if args.quick else lm.FULL
    apply_fn = lm.make_apply(cfg)
    params = lm.init_params(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (args.lm_batch, cfg.ctx), 0, 256
                                ).astype(jnp.int32)
    g = jp.graph.trace(apply_fn, params, tokens)
    small = jp.structured.compact(g, params, jp.structured.masks(
        g, jp.structured.scores(g, params), 0.5))
    nm = jp.masks.n_of_m(jp.scores.magnitude(params), n=2, m=4, where=lm.WHERE)
    two_four = jp.apply_masks(params, nm)
    calib = [jax.random.randint(jax.random.key(50 + i), tokens.shape, 0, 256).astype(jnp.int32)
             for i in range(4)]
    cases = {"dense": (params, {}), "50% heads+MLP": (small, {}),
             "2:4 sparse": (two_four, dict(sparse=True)),
             "dense dynamic": (params, dict(quantize="dynamic")),
             "dense int8": (params, dict(quantize="int8", calibration=calib))}
    rows, variants = {}, {}
    for name, (p, kw) in cases.items():
        want = jax.jit(lambda t, p=p: apply_fn(p, t))(tokens)
        blob = jp.export.litert(apply_fn, p, tokens, **kw)
        model = jp.export.LiteRTModel(blob, num_threads=args.threads)
        rows[name] = dict(litert_bytes=len(blob), err=rel_err(model(tokens), want),
                          params=sum(int(np.size(a)) for a in jax.tree.leaves(p)),
                          nonzeros=sum(int(np.count_nonzero(a)) for a in jax.tree.leaves(p)))
        if not kw or kw.get("sparse"):
            variants[f"jit {name}"] = jit_call(apply_fn, p, tokens)
        variants[f"litert {name}"] = functools.partial(model, tokens)
        print(name, rows[name], flush=True)
    times = interleave(variants, args.reps, max(1, args.inner // 2))
    return dict(rows=rows, times=times, config=str(cfg))


# --------------------------------------------------------------------------


def print_resnet(res: dict) -> None:
    rows, times = res["rows"], res["times"]
    dense_file = rows["0%"]["litert"] if "0%" in rows else None
    print("\nResNet-18, batch 64, 32x32, ms per call min / median (2 threads)")
    print(f"{'':6} {'jax.jit':>15} {'LiteRT f32':>15} {'LiteRT int8':>15} {'torch+TP':>15} "
          f"{'TP / int8':>9} {'f32 MiB':>8} {'int8 MiB':>8} {'dense/int8':>10}")
    for name, r in rows.items():
        cell = {k: times[f"{k} {name}"] for k in ("jit", "litert", "litert-int8", "torch")}
        fmt = {k: f"{c['min']:.1f} / {c['median']:.1f}" for k, c in cell.items()}
        speed = cell["torch"]["median"] / cell["litert-int8"]["median"]
        small = dense_file / r["litert-int8"] if dense_file else float("nan")
        print(f"{name:6} {fmt['jit']:>15} {fmt['litert']:>15} {fmt['litert-int8']:>15} "
              f"{fmt['torch']:>15} {speed:>8.2f}x {r['litert'] / 2**20:>8.2f} "
              f"{r['litert-int8'] / 2**20:>8.2f} {small:>9.1f}x")
        print(f"       exact StableHLO {r['stablehlo_exact']}, LiteRT f32 err {r['litert_err']:.1e},"
              f" int8 err {r['int8_err']:.3f}, params {r['params']:,} (TP {r['torch_params']:,})")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lm-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--inner", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma list of sections: resnet,lm")
    ap.add_argument("--flax-init", action="store_true",
                    help="the Flax example's initial weights (zero scale of every block's last "
                         "BatchNorm, unit statistics) instead of random statistics")
    args = ap.parse_args(argv)
    args.sparsities = (0.0, 0.5) if args.quick else (0.0, 0.3, 0.5, 0.7)
    args.reps = args.reps or (3 if args.quick else 9)
    args.inner = args.inner or (2 if args.quick else 4)
    out = dict(argv=sys.argv[1:] if argv is None else argv, threads=args.threads,
               batch=args.batch, devices=str(jax.devices()),
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    with tempfile.TemporaryDirectory() as tmp:
        if "resnet" not in args.skip:
            out["resnet"] = resnet_section(args, tmp)
            print_resnet(out["resnet"])
    if "lm" not in args.skip:
        out["lm"] = lm_section(args)
        print("\nbyte LM, ms per call min / median")
        for k, t in out["lm"]["times"].items():
            print(f"  {k:28} {t['min']:8.2f} / {t['median']:8.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

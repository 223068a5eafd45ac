"""One-shot pruning of a small language model: magnitude, Wanda, SparseGPT, OWL.

Trains a byte-level GPT-style decoder (4 layers, d 256, 4 heads, context
128, SwiGLU MLP, RMSNorm, learned positions) on a fixed list of Python
standard-library source files (found through
``sysconfig.get_paths()["stdlib"]``; their sha256 hashes are printed and
saved; a held-out list of files is the validation set), then prunes its 28
block kernels without retraining and reports validation perplexity (per
byte):

=============  ==============================================================
dense          the trained model
magnitude      ``|W|``, per kernel (``jp.masks.topk``, or ``n_of_m`` along
               the inputs)
wanda          ``|W| * ||X||`` per output unit (``jp.oneshot.wanda`` on
               ``jp.calibrate`` statistics of the dense model)
sparsegpt      ``jp.oneshot.sparsegpt``: OBS reconstruction kernel by kernel
=============  ==============================================================

at 50% unstructured, 4:8, 2:4, and 60% and 70% with uniform per-kernel
budgets against OWL budgets (``jp.allocation.owl``, ``m=5, lam=0.08``). It
also times every method against one training step and one forward pass
over the calibration set, and counts the forward passes each one needs
(SparseGPT's in full-forward equivalents of MACs,
``jp.oneshot.capture_passes``).

The trained checkpoint is saved (npz) under ``--results`` and reused by
later runs with the same configuration; ``--train-steps`` sets the
training length.

Run:
  python examples/prune_lm.py --json docs/prune_lm.json --plot docs/prune_lm.png
  python examples/prune_lm.py --quick    # a tiny model, a few settings (~30 s)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxprune as jp

# Modules present (as these paths) in every CPython 3.10+ standard library.
TRAIN_FILES = (
    "argparse.py", "ast.py", "base64.py", "calendar.py", "cmd.py", "code.py", "codecs.py",
    "collections/__init__.py", "configparser.py", "contextlib.py", "copy.py",
    "dataclasses.py", "datetime.py", "difflib.py", "dis.py", "doctest.py", "enum.py",
    "ftplib.py", "functools.py", "gettext.py", "glob.py", "gzip.py", "hmac.py", "inspect.py",
    "ipaddress.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "logging/handlers.py", "mailbox.py", "numbers.py", "operator.py", "optparse.py",
    "pickle.py", "pydoc.py", "random.py", "shutil.py", "socket.py", "statistics.py",
    "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "threading.py", "tokenize.py",
    "trace.py", "traceback.py", "typing.py", "warnings.py", "weakref.py", "locale.py",
    "pdb.py", "http/client.py", "http/server.py", "urllib/parse.py", "urllib/request.py",
    "email/message.py", "email/utils.py", "unittest/case.py", "xml/dom/minidom.py",
    "asyncio/base_events.py", "asyncio/tasks.py", "concurrent/futures/_base.py",
    "importlib/__init__.py", "selectors.py", "sched.py", "plistlib.py", "platform.py",
)
VAL_FILES = ("csv.py", "fractions.py", "textwrap.py", "queue.py", "shlex.py", "bisect.py",
             "getopt.py", "uuid.py", "pprint.py", "smtplib.py", "heapq.py")
WHERE = r"^blocks/\d+/w"  # the 7 kernels of every block; embeddings and head stay dense


@dataclasses.dataclass(frozen=True)
class Config:
    d: int = 256
    layers: int = 4
    heads: int = 4
    ctx: int = 128
    hidden: int = 512
    batch: int = 16
    lr: float = 2e-3
    train_files: int = len(TRAIN_FILES)
    calib: int = 128  # calibration sequences (the references use 128)
    calib_batch: int = 16
    val: int = 384  # validation windows
    blocksize: int = 128


FULL = Config()
QUICK = Config(d=64, layers=2, heads=2, ctx=64, hidden=64, batch=8, train_files=6, calib=16,
               val=32, blocksize=32)  # square kernels: one kernel shape to compile
SETTINGS = {  # name: (sparsity, n, m, owl)
    "50%": (0.5, None, None, False), "4:8": (None, 4, 8, False), "2:4": (None, 2, 4, False),
    "60% uniform": (0.6, None, None, False), "60% OWL": (0.6, None, None, True),
    "70% uniform": (0.7, None, None, False), "70% OWL": (0.7, None, None, True),
}
QUICK_SETTINGS = ("50%", "2:4", "70% uniform", "70% OWL")
METHODS = ("magnitude", "wanda", "sparsegpt")


# --------------------------------------------------------------------------
# Data


def read_files(names) -> tuple[np.ndarray, dict]:
    """The files' bytes, concatenated, and their sha256 hashes."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts, hashes = [], {}
    for name in names:
        data = (root / name).read_bytes()
        hashes[name] = hashlib.sha256(data).hexdigest()
        parts.append(data)
    return np.frombuffer(b"\n".join(parts), np.uint8).astype(np.int32), hashes


def digest(hashes: dict) -> str:
    return hashlib.sha256("".join(f"{k}:{v}" for k, v in sorted(hashes.items())).encode()
                          ).hexdigest()[:16]


def windows(data: np.ndarray, n: int, length: int, rng=None) -> np.ndarray:
    """``n`` windows of ``length`` bytes: random starts, or evenly spaced."""
    if rng is None:
        starts = np.linspace(0, len(data) - length, n).astype(np.int64)
    else:
        starts = rng.integers(0, len(data) - length, n)
    return np.stack([data[s:s + length] for s in starts])


def unigram_ppl(train: np.ndarray, val: np.ndarray) -> float:
    counts = np.bincount(train, minlength=256) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[val].mean()))


# --------------------------------------------------------------------------
# Model


def rms(x, scale):
    return x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def init_params(key, cfg: Config) -> dict:
    keys = iter(jax.random.split(key, 8 * cfg.layers + 4))

    def normal(shape, scale):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    d, f, proj = cfg.d, cfg.hidden, (2 * cfg.layers) ** -0.5
    blocks = [dict(ln1=jnp.ones(d), wq=normal((d, d), d ** -0.5), wk=normal((d, d), d ** -0.5),
                   wv=normal((d, d), d ** -0.5), wo=normal((d, d), proj * d ** -0.5),
                   ln2=jnp.ones(d), wg=normal((d, f), d ** -0.5), wu=normal((d, f), d ** -0.5),
                   wd=normal((f, d), proj * f ** -0.5)) for _ in range(cfg.layers)]
    return dict(emb=normal((256, d), 0.02), pos=normal((cfg.ctx, d), 0.02), blocks=blocks,
                lnf=jnp.ones(d), head=normal((d, 256), d ** -0.5))


def make_apply(cfg: Config):
    def apply(params, tokens):
        b, t = tokens.shape
        x = params["emb"][tokens] + params["pos"][:t]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for blk in params["blocks"]:
            h = rms(x, blk["ln1"])
            q, k, v = ((h @ blk[w]).reshape(b, t, cfg.heads, -1) for w in ("wq", "wk", "wv"))
            att = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
            att = jax.nn.softmax(jnp.where(causal, att, -1e30), -1)
            x = x + jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, -1) @ blk["wo"]
            h = rms(x, blk["ln2"])
            x = x + (jax.nn.silu(h @ blk["wg"]) * (h @ blk["wu"])) @ blk["wd"]
        return rms(x, params["lnf"]) @ params["head"]

    return apply


def loss_fn(apply, params, seqs):
    logits = apply(params, seqs[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]).mean()


# --------------------------------------------------------------------------
# Training (or loading the checkpoint)


def train(cfg: Config, data: np.ndarray, steps: int, seed: int, progress: bool):
    apply = make_apply(cfg)
    params = init_params(jax.random.key(seed), cfg)
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(100, steps // 10 + 1),
                                               max(steps, 2), cfg.lr * 0.05)
    decay = jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(sched, b2=0.95, weight_decay=0.1, mask=decay))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, seqs):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(apply, p, seqs))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(seed)
    losses, times = [], []
    bar = _bar(range(steps), "train", progress)
    for i in bar:
        seqs = jnp.asarray(windows(data, cfg.batch, cfg.ctx + 1, rng))
        t0 = time.perf_counter()
        params, opt, loss = step(params, opt, seqs)
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if progress and i % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    step_time = float(np.median(times[1:])) if len(times) > 1 else times[0]
    return params, dict(steps=steps, final_loss=float(np.mean(losses[-50:])),
                        train_seconds=float(sum(times)), step_seconds=step_time)


def step_seconds(cfg: Config, params, data: np.ndarray, reps: int = 3) -> float:
    """Median wall time of one jitted training step (Adam), measured warm."""
    apply = make_apply(cfg)
    tx = optax.adamw(1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, seqs):
        grads = jax.grad(lambda p: loss_fn(apply, p, seqs))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    seqs = jnp.asarray(windows(data, cfg.batch, cfg.ctx + 1, np.random.default_rng(1)))
    jax.block_until_ready(step(params, opt, seqs))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, opt, seqs))
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


TRAINING = ("d", "layers", "heads", "ctx", "hidden", "batch", "lr", "train_files")


def checkpoint_path(results: pathlib.Path, cfg: Config, steps: int, seed: int,
                    corpus: str) -> pathlib.Path:
    what = [{k: getattr(cfg, k) for k in TRAINING}, steps, seed, corpus]
    tag = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:12]
    return results / f"lm_{tag}.npz"


def save(path: pathlib.Path, params, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    paths, leaves, _ = jp.tree.flatten(params)
    np.savez(path, **{p: np.asarray(x) for p, x in zip(paths, leaves)},
             __info__=np.array(json.dumps(info)))


def load(path: pathlib.Path, cfg: Config):
    like = init_params(jax.random.key(0), cfg)
    paths, _, treedef = jp.tree.flatten(like)
    with np.load(path) as z:
        leaves = [jnp.asarray(z[p]) for p in paths]
        info = json.loads(str(z["__info__"]))
    return jp.tree.unflatten(treedef, leaves), info


# --------------------------------------------------------------------------
# Evaluation and pruning


def evaluate(apply, params, val: np.ndarray, batch: int = 32) -> float:
    """Per-byte perplexity over the validation windows."""
    f = _jitted_loss(apply)
    total = 0.0
    for i in range(0, len(val), batch):
        chunk = val[i:i + batch]
        total += float(f(params, jnp.asarray(chunk))) * len(chunk)
    return float(np.exp(total / len(val)))


_LOSSES: dict = {}


def _jitted_loss(apply):
    if apply not in _LOSSES:
        _LOSSES[apply] = jax.jit(lambda p, s: loss_fn(apply, p, s))
    return _LOSSES[apply]


def prune(method: str, setting: str, apply, params, stats, owl, calib: list, cfg: Config):
    """``(pruned params, seconds)`` of one method at one setting."""
    sparsity, n, m, use_owl = SETTINGS[setting]
    alloc = owl if use_owl else None
    t0 = time.perf_counter()
    if method == "magnitude":
        budget = alloc(params, sparsity) if use_owl else sparsity
        new = jp.apply_masks(params, magnitude_masks(params, budget, n, m))
    elif method == "wanda":
        masks = jp.oneshot.wanda(params, stats, sparsity, n=n, m=m, allocation=alloc)
        new = jp.apply_masks(params, masks)
    else:
        new, masks = jp.oneshot.sparsegpt(apply, params, calib, sparsity, n=n, m=m,
                                          blocksize=cfg.blocksize, where=WHERE, allocation=alloc)
    jax.block_until_ready(new)
    return new, time.perf_counter() - t0


@functools.partial(jax.jit, static_argnums=(2, 3))
def magnitude_masks(params, sparsity, n, m):
    """Layer-wise magnitude: per kernel (one comparison group, axis=(-2, -1)),
    or n of every m inputs."""
    scores = jp.scores.magnitude(params)
    if n:
        return jp.masks.n_of_m(scores, n=n, m=m, axis=-2, where=WHERE)
    return jp.masks.topk(scores, sparsity, where=WHERE, axis=(-2, -1))


def capture_cost(apply, params, calib: list) -> float:
    """SparseGPT's captures in full-forward equivalents (MACs), printed
    beside the general path's (one pass from the inputs per input point)."""
    points = len(jp.oneshot.input_points(apply, params, calib[0], where=WHERE))
    cached = jp.oneshot.capture_passes(apply, params, calib, where=WHERE)
    general = jp.oneshot.capture_passes(apply, params, calib, where=WHERE, cached=False)
    print(f"sparsegpt captures: {points} input points, {cached:.2f} full-forward equivalents "
          f"from cached activations ({general:.2f} with one pass per point)")
    return cached


def forward_seconds(apply, params, calib: list) -> float:
    """One jitted forward pass over the calibration set, warm."""
    f = jax.jit(apply)
    jax.block_until_ready([f(params, b) for b in calib])
    t0 = time.perf_counter()
    jax.block_until_ready([f(params, b) for b in calib])
    return time.perf_counter() - t0


def _bar(it, desc: str, progress: bool):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False)


# --------------------------------------------------------------------------
# Main


def run(args) -> dict:
    cfg = QUICK if args.quick else FULL
    steps = args.train_steps if args.train_steps is not None else (60 if args.quick else 1000)
    settings = QUICK_SETTINGS if args.quick else tuple(SETTINGS)
    progress = not args.no_progress
    train_data, train_hash = read_files(TRAIN_FILES[: cfg.train_files])
    val_data, val_hash = read_files(VAL_FILES)
    corpus = digest({**train_hash, **val_hash})
    print(f"corpus: {len(train_data):,} train bytes ({cfg.train_files} files), "
          f"{len(val_data):,} validation bytes ({len(VAL_FILES)} files), digest {corpus}")
    ckpt = checkpoint_path(pathlib.Path(args.results), cfg, steps, args.seed, corpus)
    if ckpt.exists():
        params, info = load(ckpt, cfg)
        print(f"loaded {ckpt} (trained {info['steps']} steps, loss {info['final_loss']:.3f})")
    else:
        params, info = train(cfg, train_data, steps, args.seed, progress)
        save(ckpt, params, info)
        print(f"trained {steps} steps in {info['train_seconds']:.0f} s, saved {ckpt}")
    apply = make_apply(cfg)
    rng = np.random.default_rng(args.seed + 1)
    calib = [jnp.asarray(b) for b in np.split(windows(train_data, cfg.calib, cfg.ctx, rng),
                                               cfg.calib // cfg.calib_batch)]
    val = windows(val_data, cfg.val, cfg.ctx + 1)
    t_step = step_seconds(cfg, params, train_data)
    t_fwd = forward_seconds(apply, params, calib)
    res = dict(config=dataclasses.asdict(cfg), train=info, seed=args.seed,
               python=sysconfig.get_python_version(), corpus_digest=corpus,
               files=dict(train=train_hash, validation=val_hash),
               unigram_ppl=unigram_ppl(train_data, val_data[:]),
               step_seconds=t_step, forward_seconds=t_fwd)
    res["dense_ppl"] = evaluate(apply, params, val)
    print(f"unigram ppl {res['unigram_ppl']:.2f}, dense ppl {res['dense_ppl']:.3f}; one "
          f"training step {t_step:.3f} s, one forward pass over the calibration set "
          f"({cfg.calib} x {cfg.ctx}) {t_fwd:.3f} s")
    t0 = time.perf_counter()
    stats = jp.calibrate(apply, params, calib, where=WHERE)
    jax.block_until_ready(stats)
    t_cal = time.perf_counter() - t0
    passes = dict(magnitude=0, wanda=1, sparsegpt=round(capture_cost(apply, params, calib), 2))
    res.update(calibrate_seconds=t_cal, passes=passes, results={})
    owl = jp.allocation.owl(stats)  # m=5, lam=0.08: the reference LLaMA-7B script
    for method in _bar(METHODS, "methods", progress):
        res["results"][method] = {}
        for setting in settings:
            new, secs = prune(method, setting, apply, params, stats, owl, calib, cfg)
            if method == "wanda":
                secs += t_cal
            ppl = evaluate(apply, new, val)
            sp = jp.sparsity_of(new, where=WHERE)
            res["results"][method][setting] = dict(ppl=ppl, seconds=secs, sparsity=sp)
            print(f"{method:>10} {setting:>12}: ppl {ppl:9.3f}  sparsity {sp:.3f}  "
                  f"{secs:7.2f} s = {secs / t_step:7.1f} training steps = "
                  f"{secs / t_fwd:7.1f} forward passes ({passes[method]} needed)")
    res["warm_seconds"] = warm_seconds(apply, params, stats, owl, calib, cfg)
    res["outliers"] = outliers(params, stats, owl)
    if not args.quick:
        res["ablations"] = ablations(apply, params, stats, val)
    print_table(res, settings)
    return res


def warm_seconds(apply, params, stats, owl, calib, cfg) -> dict:
    """Each method at 50% once more, everything compiled (Wanda with its
    calibration pass, which is then warm too)."""
    out = {}
    for method in METHODS:
        t0 = time.perf_counter()
        if method == "wanda":
            jax.block_until_ready(jp.calibrate(apply, params, calib, where=WHERE))
        out[method] = prune(method, "50%", apply, params, stats, owl, calib, cfg)[1] + (
            time.perf_counter() - t0 if method == "wanda" else 0.0)
    print("warm, at 50%: " + ", ".join(f"{k} {v:.2f} s" for k, v in out.items()))
    return out


def outliers(params, stats, owl) -> dict:
    """Why OWL moves budgets where it does: per block, the share of Wanda
    scores above 5x the block mean and the budget at 70%; per kernel, the
    largest input-feature RMS over the median one."""
    budgets = owl(params, 0.7)
    flat = dict(zip(jp.tree.paths(params), jax.tree.leaves(budgets)))
    scores = dict(zip(jp.tree.paths(params), jax.tree.leaves(jp.scores.wanda(params, stats))))
    blocks: dict = {}
    for p in stats:
        blocks.setdefault(p.rsplit("/", 1)[0], []).append(np.asarray(scores[p]).ravel())
    ratio = {b: float(np.mean(np.concatenate(v) > 5 * np.concatenate(v).mean()))
             for b, v in blocks.items()}
    rms = {p: float(np.sqrt(st.sumsq).max() / np.median(np.sqrt(st.sumsq)))
           for p, st in stats.items()}
    owl70 = {b: float(flat[b + "/wq"]) for b in blocks}
    print("outlier ratio per block: " + ", ".join(f"{b} {100 * r:.2f}% -> {owl70[b]:.3f}"
                                                  for b, r in ratio.items()))
    return dict(ratio=ratio, owl_70=owl70, feature_rms_max_over_median=rms)


def ablations(apply, params, stats, val) -> dict:
    """Comparison groups: Wanda per kernel and magnitude per output unit."""
    out = {}
    for s in (0.5, 0.7):
        wanda = jp.masks.topk(jp.scores.wanda(params, stats), s, where=WHERE, axis=(-2, -1))
        mag = jp.masks.topk(jp.scores.magnitude(params), s, where=WHERE, axis=-2)
        out[f"{s:.0%}"] = {"wanda per kernel": evaluate(apply, jp.apply_masks(params, wanda), val),
                           "magnitude per output unit": evaluate(
                               apply, jp.apply_masks(params, mag), val)}
        print(f"ablation {s:.0%}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[f"{s:.0%}"].items()))
    return out


def print_table(res: dict, settings) -> None:
    print(f"\nvalidation perplexity per byte (dense {res['dense_ppl']:.3f}, unigram "
          f"{res['unigram_ppl']:.2f})")
    print(f"{'method':>10} " + " ".join(f"{s:>12}" for s in settings))
    for method, row in res["results"].items():
        print(f"{method:>10} " + " ".join(f"{row[s]['ppl']:12.3f}" for s in settings))


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(next(iter(res["results"].values())))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(settings))
    for k, (method, row) in enumerate(res["results"].items()):
        ax.bar(x + (k - 1) * 0.27, [row[s]["ppl"] for s in settings], 0.27, label=method)
    ax.axhline(res["dense_ppl"], color="k", lw=1, ls="--", label="dense")
    ax.axhline(res["unigram_ppl"], color="r", lw=1, ls=":", label="unigram")
    ax.set_yscale("log")
    ax.set_xticks(x, settings)
    ax.set_ylabel("validation perplexity per byte")
    ax.set_title("One-shot pruning of a byte-level LM (no retraining)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few settings (CI)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="training steps (default 1000; 60 with --quick)")
    ap.add_argument("--results", default=os.path.join("results", "prune_lm"),
                    help="folder of the trained checkpoints")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, help="write a bar chart here (png)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = ap.parse_args(argv)
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.plot:
        plot(res, args.plot)
    return res


if __name__ == "__main__":
    main()

"""One-shot (post-training) pruning from activations: Wanda and SparseGPT.

Both prune a trained model without retraining, from a few calibration
batches:

* :func:`wanda` scores ``|W_ij| * ||X_j||_2`` (:func:`jaxprune.scores.wanda`)
  from :func:`jaxprune.calibrate` statistics and keeps the best weights of
  every output unit (per layer of a stacked kernel), or the best ``n`` of
  every ``m`` consecutive inputs. One forward pass over the calibration set.
* :func:`sparsegpt` prunes kernel by kernel, in the order the model reads
  them, and updates the remaining weights of each kernel to reconstruct its
  outputs (optimal brain surgeon on the inputs' Gram matrix), each kernel
  seeing inputs that already passed through the pruned kernels before it.
  Its captures resume from cached activations (:func:`capture_passes`
  gives their cost in forward passes).

Per-kernel budgets come from ``sparsity`` (a number or a per-leaf tree) or
an ``allocation`` callable ``(params, sparsity) -> per-leaf tree`` such as
:func:`jaxprune.allocation.owl`; a stacked kernel may get one sparsity per
layer.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxprune as jp
  >>> p = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
  >>> f = lambda p, x: x @ p["w"]
  >>> xs = [jax.random.normal(jax.random.key(1), (16, 8))]
  >>> masks = jp.oneshot.wanda(p, jp.calibrate(f, p, xs), sparsity=0.5)
  >>> masks["w"].sum(axis=0).tolist()            # 4 of 8 inputs kept per output unit
  [4, 4, 4, 4]
  >>> new, masks = jp.oneshot.sparsegpt(f, p, xs, n=2, m=4)
  >>> float(jp.sparsity_of(new)), masks["w"].reshape(2, 4, 4).sum(axis=1).tolist()
  (0.5, [[2, 2, 2, 2], [2, 2, 2, 2]])

References:
  Sun et al., "A simple and effective pruning approach for large language
  models" (Wanda), ICLR 2024; Frantar & Alistarh, "SparseGPT: massive
  language models can be accurately pruned in one-shot", ICML 2023;
  Hassibi & Stork, "Second order derivatives for network pruning: optimal
  brain surgeon", NeurIPS 1992.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.core import masks as _masks
from jaxprune.core import scores as _scores
from jaxprune.core import tree as _tree
from jaxprune.core.along import keep_counts, select_along
from jaxprune.core.tree import PyTree
from jaxprune.graph import sites as _sites
from jaxprune.oneshot import calibration as _cal

__all__ = ["capture_passes", "input_points", "sparsegpt", "wanda"]


# --------------------------------------------------------------------------
# Arguments


def _pattern(sparsity: Any, n: Any, m: Any, fn: str) -> tuple[int, int] | None:
    """``(n, m)`` for N:M, ``None`` for a sparsity; raises on a bad mix."""
    if n is None and m is None:
        if sparsity is None:
            raise ValueError(f"{fn}: pass sparsity= (e.g. 0.5) or n= and m= (e.g. n=2, m=4).")
        return None
    if sparsity is not None:
        raise ValueError(f"{fn}: pass either sparsity= or n= and m=, not both "
                         f"(got sparsity={sparsity!r}, n={n!r}, m={m!r}).")
    if not (isinstance(m, (int, np.integer)) and m >= 1):
        raise ValueError(f"{fn}: m must be a positive int, got m={m!r}.")
    if not (isinstance(n, (int, np.integer)) and 0 <= n <= m):
        raise ValueError(f"{fn}: n must be an int in [0, m={m}] (the weights kept in every "
                         f"group of m), got n={n!r}.")
    return int(n), int(m)


def _budgets(params: PyTree, chosen: Iterable[str], sparsity: Any, allocation: Any) -> dict:
    """``{path: sparsity}`` for the chosen leaves (a number, or one per layer)."""
    if allocation is not None and allocation != "uniform":
        if not callable(allocation):
            raise TypeError(f"allocation must be 'uniform' or a callable (params, sparsity) "
                            f"-> per-leaf tree (e.g. jp.allocation.owl(stats)); got "
                            f"{allocation!r}.")
        sparsity = allocation(params, sparsity)
    paths, leaves, _ = _tree.flatten(params)
    if np.ndim(sparsity) == 0 and not isinstance(sparsity, (dict, list, tuple)):
        values = [sparsity] * len(paths)
    else:
        try:
            prefix, pdef = jax.tree_util.tree_flatten(sparsity)
            subs = pdef.flatten_up_to(params)
        except (ValueError, TypeError) as e:
            raise ValueError("sparsity must be a number or a (prefix) tree of numbers "
                             f"matching params: {e}") from None
        values = [v for v, sub in zip(prefix, subs) for _ in jax.tree_util.tree_leaves(sub)]
    chosen = set(chosen)
    out = {}
    for p, v in zip(paths, values):
        if p in chosen:
            _masks.check_sparsity(v, "sparsity", p)
            out[p] = v
    return out


# --------------------------------------------------------------------------
# Wanda


def wanda(params: PyTree, stats: dict, sparsity: Any = None, *, n: int | None = None,
          m: int | None = None, allocation: Any = None) -> PyTree:
    """Wanda masks: keep the largest ``|W_ij| * ||X_j||_2`` of every output unit.

    Every output unit of a calibrated kernel (a column of a Dense ``(in,
    out)`` kernel, one per layer of a stacked kernel) keeps exactly
    ``round(d_in * (1 - s))`` of its ``d_in`` inputs; with ``n`` and ``m``
    every group of ``m`` consecutive inputs (along the kernel's last input
    axis) of every unit keeps ``n``. Ties go to the lower input index.

    Args:
      params: the parameters.
      stats: ``{path: InputStats}`` from :func:`jaxprune.calibrate` (the
        kernels pruned are those calibrated).
      sparsity: fraction of zeros: a number, or a per-leaf (prefix) tree
        whose entries may be one value per layer of a stacked kernel.
      n, m: N:M sparsity instead of ``sparsity`` (e.g. ``n=2, m=4``).
      allocation: ``"uniform"`` (default) or a callable ``(params,
        sparsity) -> per-leaf tree`` such as :func:`jaxprune.allocation.owl`.

    Returns:
      A mask tree: bool arrays for the calibrated kernels, scalar ``True``
      elsewhere.

    Raises:
      ValueError: on stats that do not match ``params``, both or neither of
        ``sparsity`` and ``n``/``m``, ``n > m``, or an ``m`` that does not
        divide a kernel's input axis.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"w": jnp.array([[1.0, 1.0], [2.0, 0.5]])}
      >>> st = jp.calibrate(lambda p, x: x @ p["w"], p, [jnp.array([[3.0, 1.0]])])
      >>> jp.oneshot.wanda(p, st, sparsity=0.5)["w"].tolist()
      [[True, True], [False, False]]

    References:
      Sun et al., "A simple and effective pruning approach for large language
      models", ICLR 2024.
    """
    nm = _pattern(sparsity, n, m, "wanda")
    paths, leaves, treedef = _tree.flatten(params)
    _scores.check_stats(paths, leaves, stats)
    budgets = {} if nm else _budgets(params, stats, sparsity, allocation)
    out = []
    for p, w in zip(paths, leaves):
        if p not in stats:
            out.append(jnp.ones((), jnp.bool_))
            continue
        st = stats[p]
        lead = 1 if st.layers else 0
        axes = tuple(a + lead for a in st.in_axes)
        expand = st.feature_shape
        if nm:
            _check_group(p, st.shape, axes[-1], nm[1])
            keep = None
        else:
            s = budgets[p]
            if st.layers and np.ndim(s) == 1:  # one budget per layer
                s = jnp.reshape(s, (-1,) + (1,) * len(st.out_axes))
            gshape = tuple(st.shape[a] for a in range(len(st.shape)) if a not in axes)
            keep = keep_counts(int(np.prod([st.shape[a] for a in axes])), s, gshape)
        out.append(_wanda_leaf(w, st.sumsq, keep, axes=axes, nm=nm, expand=expand))
    return _tree.unflatten(treedef, out)


def _check_group(path: str, shape: tuple, axis: int, m: int) -> None:
    if shape[axis] % m:
        raise ValueError(
            f"wanda: kernel {path!r} has shape {shape}; its input axis {axis} has length "
            f"{shape[axis]}, which does not divide into groups of m={m}. Use an m that "
            "divides it, or leave the kernel out of the calibration (where=).")


@functools.partial(jax.jit, static_argnames=("axes", "nm", "expand"))
def _wanda_leaf(w, sumsq, keep, *, axes: tuple, nm, expand: tuple) -> jax.Array:
    """The Wanda mask of one kernel (compiled once per shape)."""
    score = jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(sumsq.astype(jnp.float32)).reshape(expand)
    if nm:
        return _masks.nm_leaf(score, nm[0], nm[1], axes[-1], "")
    return select_along(score, axes, keep)


# --------------------------------------------------------------------------
# SparseGPT: one kernel


def _cholesky_factors(h: jax.Array, damp: Any) -> tuple[jax.Array, jax.Array]:
    """``(U, dead)``: the upper Cholesky factor of the damped ``H^-1`` and the
    inputs that never fire (``diag(H) == 0``; their diagonal set to 1)."""
    d = h.shape[0]
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(d, dtype=h.dtype)
    low = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((low, True), jnp.eye(d, dtype=h.dtype))
    return jnp.linalg.cholesky((hinv + hinv.T) / 2).T, dead


def _column(i, w1, err1, u1, keep, qcol=None):
    """Prunes (and with ``qcol`` quantizes) column ``i`` of the block and
    spreads its error over the later columns."""
    w = w1[:, i]
    q = jnp.where(keep, w, 0.0)
    if qcol is not None:
        q = qcol(q)
    e = (w - q) / u1[i, i]
    w1 = (w1 - e[:, None] * u1[i][None, :]).at[:, i].set(q)
    return w1, err1.at[:, i].set(e)


def _block(w, mask, u, i1, width: int, keep, nm, qcol=None):
    """One block of ``width`` columns from column ``i1`` (traced or static)."""
    rows = w.shape[0]
    w1 = lax.dynamic_slice_in_dim(w, i1, width, 1)
    u1 = lax.dynamic_slice(u, (i1, i1), (width, width))
    diag = jnp.diagonal(u1)
    err1 = jnp.zeros_like(w1)
    if nm is None:
        keep1 = select_along(w1 * w1 / (diag * diag)[None, :], (0, 1), keep)

        def col(i, c):
            return _column(i, *c, u1, keep1[:, i], qcol)

        w1, err1 = lax.fori_loop(0, width, col, (w1, err1))
    else:
        n, m = nm

        def group(g, c):
            w1, err1, keep1 = c
            cols = lax.dynamic_slice_in_dim(w1, g * m, m, 1)
            dg = lax.dynamic_slice_in_dim(diag, g * m, m)
            kg = select_along(cols * cols / (dg * dg)[None, :], 1, n)
            for c in range(m):
                w1, err1 = _column(g * m + c, w1, err1, u1, kg[:, c], qcol)
            return w1, err1, lax.dynamic_update_slice(keep1, kg, (0, g * m))

        w1, err1, keep1 = lax.fori_loop(0, width // m, group,
                                        (w1, err1, jnp.ones((rows, width), bool)))
    urows = lax.dynamic_slice_in_dim(u, i1, width, 0)
    later = jnp.arange(w.shape[1]) >= i1 + width
    upd = jnp.matmul(err1, urows, precision=lax.Precision.HIGHEST)  # no TF32 on GPUs
    w = w - jnp.where(later[None, :], upd, 0.0)  # lazy update of later blocks
    w = lax.dynamic_update_slice_in_dim(w, w1, i1, 1)
    return w, lax.dynamic_update_slice_in_dim(mask, keep1, i1, 1)


@functools.partial(jax.jit, static_argnames=("blocksize", "nm", "quantize"))
def _obs(w, h, keep, damp, *, blocksize: int, nm, quantize=None):
    """SparseGPT on ``w`` ``(outputs, inputs)`` with ``h = 2 X^T X / rows``:
    returns the pruned and updated ``w``, its keep mask, and whether the
    Cholesky factorisations were finite. ``keep`` holds the kept count of
    each block of ``blocksize`` input columns (unused with ``nm``)."""
    dtype = w.dtype
    w, h = w.astype(jnp.float32), h.astype(jnp.float32)
    u, dead = _cholesky_factors(h, damp)
    w = jnp.where(dead[None, :], 0.0, w)
    qcol = None if quantize is None else quantize(w)
    mask = jnp.ones(w.shape, bool)
    cols = w.shape[1]
    full = cols // blocksize

    def body(b, c):
        return _block(*c, u, b * blocksize, blocksize, keep[b], nm, qcol)

    if full:
        w, mask = lax.fori_loop(0, full, body, (w, mask))
    if cols % blocksize:
        w, mask = _block(w, mask, u, full * blocksize, cols % blocksize, keep[full], nm, qcol)
    return w.astype(dtype), mask, jnp.all(jnp.isfinite(u))


def _block_keeps(rows: int, cols: int, blocksize: int, s: Any) -> np.ndarray:
    widths = [blocksize] * (cols // blocksize) + ([cols % blocksize] if cols % blocksize else [])
    return np.array([_select_keep(rows * wd, s) for wd in widths] or [0], np.int32)


def _select_keep(n: int, s: Any) -> int:
    return int(np.clip(np.round(n * (1.0 - float(s))), 0, n))


def _as_matrix(w: jax.Array, in_axes: tuple) -> tuple[jax.Array, Callable]:
    """``w`` as ``(outputs, inputs)`` (inputs row-major over ``in_axes``) and
    the inverse map."""
    out_axes = tuple(a for a in range(w.ndim) if a not in in_axes)
    perm = in_axes + out_axes
    moved = jnp.transpose(w, perm)
    d_in = int(np.prod([w.shape[a] for a in in_axes]))
    mat = moved.reshape(d_in, -1).T

    def back(x):
        return jnp.transpose(x.T.reshape(moved.shape), np.argsort(perm))

    return mat, back


# --------------------------------------------------------------------------
# SparseGPT: the schedule over kernels


def _schedule(plan) -> list[tuple[tuple[int, ...], Any, int | None]]:
    """``[(kernels, scan key, layer)]``: the input points in the order the
    model reads them; points inside a layer scan once per layer."""
    pts = _cal.points(plan)
    members: dict = {}
    for leaf, p in sorted(pts.items()):
        members.setdefault(p, []).append(leaf)
    first = {}
    for s in plan.sites:
        first.setdefault(pts[s.leaf], s)
    out, done, scans = [], set(), set()
    for s in plan.sites:
        p = pts[s.leaf]
        if p in done:
            continue
        if not s.scans:
            out.append((tuple(members[p]), None, None))
            done.add(p)
            continue
        scan = s.scans[0]
        if scan in scans:
            continue
        scans.add(scan)
        body = [q for q in dict.fromkeys(pts[t.leaf] for t in plan.sites)
                if first[q].scans[:1] == (scan,)]
        for layer in range(plan.scan_lengths[scan]):
            out.extend((tuple(members[q]), scan, layer) for q in body)
        done.update(body)
    return out


class _Capture:
    """Jitted Gram captures of one input point, each a pass over the model
    from its inputs (the general path), cached per batch shape."""

    def __init__(self, model):
        self.model = model

    def __call__(self, leaves: tuple, scan: Any, layer: int | None, batches: list,
                 arrays: list, run: bool = True) -> dict:
        if not run:
            return None
        base = self.model.plan(batches[0])
        stack = _cal.stacks(base).get(scan)
        acc = None
        for b in batches:
            plan = self.model.plan(b)
            target = None if stack is None else {v: k for k, v in _cal.stacks(plan).items()}[stack]
            if acc is None:
                acc = self._zeros(plan, leaves)
            acc = plan.step(leaves, True, target)(acc, arrays, jax.tree_util.tree_leaves(b),
                                                  jnp.int32(0 if layer is None else layer))
        return acc

    @staticmethod
    def _zeros(plan, leaves) -> dict:
        out = {}
        for j in leaves:
            s = plan.leaf_site(j)
            d = int(np.prod(s.in_shape))
            out[j] = {"sumsq": jnp.zeros(s.in_shape, jnp.float32),
                      "count": jnp.zeros((), jnp.int32),
                      "gram": jnp.zeros((d, d), jnp.float32)}
        return out


class _Cached:
    """SparseGPT's captures from cached activations (all batches of one shape).

    The top level of the model is cut (:class:`jaxprune.graph.sites.Pieces`):
    the activations live at the cut are kept per batch, and a capture runs
    only the equations from the cut to its point, then moves the cut up to
    where its kernels are first read (a cut is kept only while no kernel
    still to be pruned is read before it). A layer ``scan`` at the top level
    is run layer by layer from its cached input: each point of a layer on
    that layer's input, then the layer once more (pruned) for the next
    layer's input. Each equation thus runs about twice in all, as in the
    reference implementation; the values are those of the general path
    (one full pass per point), up to float rounding.

    With ``run=False`` nothing is computed: only ``macs`` is counted.
    """

    def __init__(self, model, batches: list, schedule: list, run: bool = True):
        plan = model.plan(batches[0])
        self.plan, self.pieces, self.run = plan, plan.pieces, run
        self.originals = batches
        self.cached = all(model.plan(b) is plan for b in batches)
        self.batches = [jax.tree_util.tree_leaves(b) for b in batches]
        starts = [self.pieces.start(leaves) for leaves, _, _ in schedule]
        self.allowed = [min(starts[i:]) for i in range(len(starts))] + [len(self.pieces.eqns)]
        self.c, self.cache = 0, [{} for _ in batches]
        self.block = None
        self.macs = 0
        self.general = _Capture(model)

    def __call__(self, i: int, leaves: tuple, scan: Any, layer: int | None, arrays: list):
        if not self.cached:
            return self._general(leaves, scan, layer, arrays)
        if self.block is not None and (scan != self.block["scan"] or layer < self.block["at"]):
            self._finish(i, arrays)
        if scan is not None and self.block is None:
            self._enter(i, scan, arrays)
        if scan is None:
            return self._point(i, leaves, arrays)
        if self.block is None:
            return self._general(leaves, scan, layer, arrays)
        while self.block["at"] < layer:
            self._propagate(arrays)
        return self._layer(leaves, arrays)

    def _general(self, leaves: tuple, scan: Any, layer: int | None, arrays: list) -> dict:
        """One pass from the model's inputs (the cut is left alone: it
        stays valid, see :meth:`_valid`)."""
        chosen = [t for t in self.plan.sites if t.leaf in set(leaves)]
        self.macs += self.pieces.macs(0, len(self.pieces.eqns), chosen, [])
        return self.general(leaves, scan, layer, self.originals, arrays, self.run)

    def _valid(self, i: int) -> None:
        """Drops the cache if a kernel still to be pruned is read before the cut."""
        if self.c > self.allowed[i]:
            self.c, self.cache = 0, [{} for _ in self.cache]

    def _advance(self, e: int, leaves: tuple, arrays: list, new_c: int) -> dict:
        """Runs equations ``c`` to ``e`` (taps of ``leaves``), moving the cut to ``new_c``."""
        pieces = self.pieces
        keep = tuple(v for v in pieces.live(new_c) if pieces.defined[v] >= self.c)
        chosen = [t for t in self.plan.sites if t.leaf in set(leaves)]
        self.macs += pieces.macs(self.c, e, chosen, list(keep))
        acc = None
        if self.run:
            step = self.plan.piece_step(leaves, self.c, e, keep)
            live, later = pieces.live(self.c), pieces.live(new_c)
            new_cache = []
            for b, cache in zip(self.batches, self.cache):
                taps, kept = step(arrays, b, [cache[v] for v in live])
                acc = taps if acc is None else _sites.add_taps(acc, taps)
                merged = {**cache, **dict(zip(keep, kept))}
                new_cache.append({v: merged[v] for v in later})
            self.cache = new_cache
        self.c = new_c
        return acc

    def _point(self, i: int, leaves: tuple, arrays: list) -> dict:
        chosen = [t for t in self.plan.sites if t.leaf in set(leaves)]
        e = self.pieces.stop(chosen)
        taps = self._advance(e, leaves, arrays, max(self.c, min(self.allowed[i], e)))
        self._valid(i + 1)
        return taps

    def _enter(self, i: int, scan: Any, arrays: list) -> None:
        idx = self.pieces.index.get(scan[0]) if len(scan) == 1 else None
        info = None if idx is None else self.pieces.layer_scan(idx)
        if info is None or not self.c <= idx <= self.allowed[i]:
            return
        self._advance(idx, (), arrays, idx)
        self.block = {"scan": scan, "idx": idx, "info": info, "at": 0, "carry": None,
                      "ys": [[] for _ in self.batches]}

    def _layer_run(self, leaves: tuple, arrays: list) -> list:
        blk = self.block
        chosen = [t for t in self.plan.sites if t.leaf in set(leaves)]
        self.macs += self.pieces.layer_macs(blk["idx"], chosen)
        if not self.run:
            return []
        step = self.plan.layer_step(leaves, blk["idx"], blk["carry"] is None)
        live = self.pieces.live(blk["idx"])
        out = []
        for k, (b, cache) in enumerate(zip(self.batches, self.cache)):
            carry = None if blk["carry"] is None else blk["carry"][k]
            out.append(step(arrays, b, [cache[v] for v in live], carry, jnp.int32(blk["at"])))
        return out

    def _layer(self, leaves: tuple, arrays: list) -> dict:
        acc = None
        for _, taps in self._layer_run(leaves, arrays):
            acc = taps if acc is None else _sites.add_taps(acc, taps)
        return acc

    def _propagate(self, arrays: list) -> None:
        blk = self.block
        nk = blk["info"].num_carry
        outs = self._layer_run((), arrays)
        if self.run:
            blk["carry"] = [o[:nk] for o, _ in outs]
            for ys, (o, _) in zip(blk["ys"], outs):
                ys.append(o[nk:])
        blk["at"] += 1

    def _finish(self, i: int, arrays: list) -> None:
        """The scan's outputs from its last layer; the cut moves past it if allowed."""
        blk, self.block = self.block, None
        info = blk["info"]
        while blk["at"] < info.length:
            self.block = blk
            self._propagate(arrays)
            self.block = None
        after = blk["idx"] + 1
        if after > self.allowed[i]:
            self._valid(i)
            return
        if self.run:
            new = []
            for k, cache in enumerate(self.cache):
                stacked = [jnp.stack(y) for y in zip(*blk["ys"][k])]
                vals = {**cache, **dict(zip(info.outvars, list(blk["carry"][k]) + stacked))}
                new.append({v: vals[v] for v in self.pieces.live(after)})
            self.cache = new
        self.c = after


def sparsegpt(apply_fn: Callable, params: PyTree, batches: Iterable, sparsity: Any = None, *,
              n: int | None = None, m: int | None = None, blocksize: int = 128,
              damp: float = 0.01, where: Any = None, allocation: Any = None,
              cached: bool = True,
              quantize: Callable | None = None) -> tuple[PyTree, PyTree]:
    """SparseGPT: prune every kernel and reconstruct its outputs from its inputs.

    For each kernel ``W`` (as ``(outputs, inputs)``), with ``X`` its inputs
    over the calibration set (``rows`` of them):

    * ``H = 2 X^T X / rows``; inputs that never fire (``H_jj = 0``) get
      ``H_jj = 1`` and their weights are zeroed; then ``H += damp *
      mean(diag H) * I``;
    * ``U`` is the upper Cholesky factor of ``H^-1``;
    * for each block of ``blocksize`` input columns (all outputs together)
      the mask keeps exactly ``round(outputs * width * (1 - s))`` weights
      with the largest ``w^2 / U_jj^2`` (ties to the lower index; the
      reference's ``<=`` threshold may prune extra weights on ties), or, with
      ``n`` and ``m``, the ``n`` largest of every ``m`` consecutive columns
      of each row, chosen when the group is reached;
    * with ``quantize``, each column's kept weights are also rounded,
      ``q = quantize(W)(where(keep, w, 0))`` (joint pruning and
      quantization, the reference's ``--wbits``);
    * column by column, the pruned weights' error ``(w - q) / U_jj`` is
      spread over the later columns of the block (``w -= err * U_j,:``),
      and over the later blocks at the end of each block (lazy updates).

    Kernels are processed in the order the model reads them; each one's
    ``X`` is captured through the already pruned kernels before it.
    Kernels reading the same input (q, k and v; gate and up) share a
    capture. When all batches have one shape, the activations at a cut of
    the model's top level are cached per batch, so a capture runs only from
    the cut to its point, and a top-level layer ``scan`` runs layer by
    layer from its cached input: about two passes in all, as the reference
    implementation (:func:`capture_passes` counts them). Otherwise each
    capture is one forward pass from the inputs (stopped, by dead-code
    elimination, where its input is read). Both give the same values up to
    float rounding. The per-kernel step is jitted once per kernel shape.

    Args:
      apply_fn: ``(params, batch) -> outputs`` (see :func:`jaxprune.calibrate`).
      params: the trained parameters.
      batches: calibration batches (iterated once per input point).
      sparsity: fraction of zeros: a number, or a per-leaf (prefix) tree
        (one value per layer allowed for stacked kernels).
      n, m: N:M sparsity along the inputs instead (``m`` must divide
        ``blocksize`` and each kernel's input count).
      blocksize: input columns per block of lazy updates.
      damp: dampening, relative to the mean diagonal of ``H``.
      where: the kernels to prune (``None``: the graph's kernels).
      allocation: ``"uniform"`` or a callable ``(params, sparsity) ->
        per-leaf tree`` (e.g. :func:`jaxprune.allocation.owl`).
      cached: capture from cached activations where the model allows it;
        ``False``: one pass from the inputs per point (the general path,
        for comparison).
      quantize: ``None``, or ``W -> (column -> column)`` called once per
        kernel on its ``(outputs, inputs)`` matrix, returning the fake
        quantizer of its columns (zero must map to zero), e.g.
        :func:`jaxprune.quant.column_quantizer`; hashable (it is a static
        argument of the jitted step).

    Returns:
      ``(params, masks)``: the pruned, updated parameters (pruned weights
      exactly zero, dtypes kept) and their masks (scalar ``True`` for the
      leaves not pruned).

    Raises:
      ValueError: for bad ``sparsity``/``n``/``m``/``blocksize``, kernels
        the graph cannot see, or a Cholesky failure (raise ``damp``).
      TypeError: for non-floating kernels or inputs, or a ``quantize`` that is not callable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"w": jax.random.normal(jax.random.key(0), (16, 4))}
      >>> xs = [jax.random.normal(jax.random.key(1), (64, 16))]
      >>> new, masks = jp.oneshot.sparsegpt(lambda p, x: x @ p["w"], p, xs, 0.5, blocksize=8)
      >>> int(masks["w"].sum()), float(jp.sparsity_of(new))
      (32, 0.5)

    References:
      Frantar & Alistarh, "SparseGPT: massive language models can be
      accurately pruned in one-shot", ICML 2023 (``sparsegpt.py`` of
      IST-DASLab/sparsegpt); Frantar et al., "GPTQ", ICLR 2023 (lazy batch
      updates).
    """
    nm = _pattern(sparsity, n, m, "sparsegpt")
    if not (isinstance(blocksize, (int, np.integer)) and blocksize >= 1):
        raise ValueError(f"sparsegpt: blocksize must be a positive int, got {blocksize!r}.")
    if nm and blocksize % nm[1]:
        raise ValueError(f"sparsegpt: blocksize={blocksize} must be a multiple of m={nm[1]}.")
    if quantize is not None and not callable(quantize):
        raise TypeError(f"sparsegpt: quantize must be None or a callable W -> (column -> column) "
                        f"such as jp.quant.column_quantizer('int8'), got {quantize!r}.")
    batches = list(batches)
    if not batches:
        raise ValueError("sparsegpt: batches is empty; pass at least one calibration batch.")
    model = _cal.model(apply_fn, params, batches[0], where)
    plan = model.plan(batches[0])
    paths = plan.paths
    budgets = {} if nm else _budgets(params, [paths[j] for j in plan.leaves()], sparsity,
                                     allocation)
    _check_nm(plan, nm)
    arrays = model.arrays_of(params)
    masks = {j: np.ones(plan.shapes[j], bool) for j in plan.leaves()}
    schedule = _schedule(plan)
    capture = _Cached(model, batches, schedule)
    capture.cached = capture.cached and cached
    for i, (leaves, scan, layer) in enumerate(schedule):
        taps = capture(i, leaves, scan, layer, arrays)
        for j in leaves:
            s = budgets.get(paths[j])
            if s is not None and layer is not None and np.ndim(s):
                s = np.asarray(s)[layer]
            arrays[j], mk = _prune_kernel(plan, j, arrays[j], layer, taps[j], s, nm,
                                          blocksize, damp, quantize)
            if layer is None:
                masks[j] = mk
            else:
                masks[j][layer] = mk
    out_masks = [jnp.ones((), jnp.bool_)] * len(model.array_idx)
    for j, mk in masks.items():
        out_masks[j] = jnp.asarray(mk)
    return model.rebuild(arrays), _mask_tree(model, out_masks)


def input_points(apply_fn: Callable, params: PyTree, batch: Any, *,
                 where: Any = None) -> list[tuple[tuple[str, ...], int | None]]:
    """The captures :func:`sparsegpt` makes, in order: one forward pass over
    the calibration set each.

    Returns:
      ``[(kernel paths, layer)]``: the kernels sharing each input point (q, k
      and v together) and, inside a layer scan, the layer (else ``None``).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {"q": jnp.ones((4, 4)), "k": jnp.ones((4, 4)), "o": jnp.ones((4, 4))}
      >>> f = lambda p, x: ((x @ p["q"]) * (x @ p["k"])) @ p["o"]
      >>> jp.oneshot.input_points(f, p, jnp.ones((2, 4)))
      [(('k', 'q'), None), (('o',), None)]
    """
    plan = _cal.model(apply_fn, params, batch, where).plan(batch)
    return [(tuple(plan.paths[j] for j in leaves), layer)
            for leaves, _, layer in _schedule(plan)]


def capture_passes(apply_fn: Callable, params: PyTree, batches: Iterable, *,
                   where: Any = None, cached: bool = True) -> float:
    """The cost of :func:`sparsegpt`'s captures, in full forward passes.

    ``passes = (MACs the captures run) / (MACs of one forward pass)``, both
    per batch, counting the ``dot_general`` and convolution equations each
    capture needs after dead-code elimination (the statistics themselves
    are not counted). Nothing runs: the captures are planned as
    :func:`sparsegpt` plans them.

    Args:
      apply_fn, params, batches, where: as for :func:`sparsegpt`.
      cached: ``False``: the cost of the general path instead (one pass from
        the model's inputs per input point).

    Returns:
      the number of full-forward equivalents (a float).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> p = {f"w{i}": jnp.ones((4, 4)) for i in range(4)}
      >>> f = lambda p, x: x @ p["w0"] @ p["w1"] @ p["w2"] @ p["w3"]
      >>> xs = [jnp.ones((2, 4))]
      >>> jp.oneshot.capture_passes(f, p, xs), jp.oneshot.capture_passes(f, p, xs, cached=False)
      (0.75, 1.5)
    """
    batches = list(batches)
    if not batches:
        raise ValueError("capture_passes: batches is empty; pass at least one batch.")
    model = _cal.model(apply_fn, params, batches[0], where)
    plan = model.plan(batches[0])
    schedule = _schedule(plan)
    capture = _Cached(model, batches, schedule, run=False)
    capture.cached = capture.cached and cached
    arrays = model.arrays_of(params)
    for i, (leaves, scan, layer) in enumerate(schedule):
        capture(i, leaves, scan, layer, arrays)
    return capture.macs / max(_sites.macs(plan.closed.jaxpr), 1)


def _mask_tree(model: _cal.Model, arrays: list) -> PyTree:
    full = [jnp.ones((), jnp.bool_)] * len(model.leaves)
    for i, x in zip(model.array_idx, arrays):
        full[i] = x
    return _tree.unflatten(model.treedef, full)


def _check_nm(plan, nm) -> None:
    if nm is None:
        return
    for j in plan.leaves():
        d = int(np.prod(plan.leaf_site(j).in_shape))
        if d % nm[1]:
            raise ValueError(
                f"sparsegpt: kernel {plan.paths[j]!r} has {d} inputs, which do not divide "
                f"into groups of m={nm[1]}. Use an m that divides it or exclude it with where=.")


def _prune_kernel(plan, j: int, leaf, layer, tap: dict, s, nm, blocksize: int, damp: float,
                  quantize=None):
    site = plan.leaf_site(j)
    w = leaf if layer is None else leaf[layer]
    count = int(tap["count"])
    if count == 0:
        raise ValueError(f"sparsegpt: kernel {plan.paths[j]!r} saw no calibration rows.")
    mat, back = _as_matrix(jnp.asarray(w), site.in_axes)
    h = 2.0 * tap["gram"] / count
    keep = _block_keeps(mat.shape[0], mat.shape[1], blocksize, 0.0 if nm else s)
    new, mk, ok = _obs(mat, h, jnp.asarray(keep), jnp.float32(damp), blocksize=blocksize, nm=nm,
                       quantize=quantize)
    if not bool(ok):
        raise ValueError(
            f"sparsegpt: the Cholesky factorisation failed for kernel {plan.paths[j]!r} "
            f"(H is not positive definite after damp={damp}). Raise damp, e.g. damp=0.1.")
    new, mk = back(new), np.asarray(back(mk))
    if layer is None:
        return new, mk
    return leaf.at[layer].set(new), mk

"""Straightforward numpy versions of Wanda and SparseGPT (float64), for tests.

Written from the papers and the reference code (locuslab/wanda,
IST-DASLab/sparsegpt ``sparsegpt.py``), with jaxprune's selection rule:
exact counts, largest scores kept, ties to the lower (row-major) index.
Kernels are Flax-style ``(in, out)``; the SparseGPT loop works on ``W =
kernel.T`` ``(out, in)`` as the reference does.
"""

from __future__ import annotations

import numpy as np


def keep_largest(scores: np.ndarray, k: int) -> np.ndarray:
    """Mask keeping the ``k`` largest entries (ties: lower flat index first)."""
    flat = scores.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))
    keep = np.zeros(flat.size, bool)
    keep[order[:k]] = True
    return keep.reshape(scores.shape)


def count(n: int, s: float) -> int:
    return int(np.clip(np.round(n * (1.0 - s)), 0, n))


def wanda(kernel: np.ndarray, x: np.ndarray, sparsity=None, n=None, m=None) -> np.ndarray:
    """Wanda mask of an ``(in, out)`` kernel for inputs ``x`` ``(rows, in)``."""
    score = np.abs(kernel) * np.sqrt((x.astype(np.float64) ** 2).sum(0))[:, None]
    mask = np.zeros(kernel.shape, bool)
    for j in range(kernel.shape[1]):
        if n is None:
            mask[:, j] = keep_largest(score[:, j], count(kernel.shape[0], sparsity))
        else:
            for g in range(0, kernel.shape[0], m):
                mask[g:g + m, j] = keep_largest(score[g:g + m, j], n)
    return mask


def magnitude(kernel: np.ndarray, sparsity: float) -> np.ndarray:
    """Layer-wise magnitude mask (one group per kernel)."""
    return keep_largest(np.abs(kernel), count(kernel.size, sparsity))


def sparsegpt(kernel: np.ndarray, x: np.ndarray, sparsity=None, n=None, m=None,
              blocksize: int = 128, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT on an ``(in, out)`` kernel: ``(new kernel, keep mask)``."""
    w = kernel.T.astype(np.float64).copy()
    rows, cols = w.shape
    x = x.astype(np.float64)
    h = 2.0 * x.T @ x / x.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(cols)
    hinv = np.linalg.inv(h)
    u = np.linalg.cholesky((hinv + hinv.T) / 2).T  # upper: U^T U = H^-1
    mask = np.ones_like(w, bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].copy(), u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        d = np.diag(u1)
        keep1 = np.ones_like(w1, bool)
        if n is None:
            keep1 = keep_largest(w1 ** 2 / d[None, :] ** 2, count(w1.size, sparsity))
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                tmp = w1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2
                keep1[:, i:i + m] = np.stack([keep_largest(r, n) for r in tmp])
            q = np.where(keep1[:, i], w1[:, i], 0.0)
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        mask[:, i1:i2] = keep1
    return w.T, mask.T

"""Sizes from files: every artifact written, then measured on disk."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxprune import graph as graph_lib
from jaxprune.core import tree as tree_lib
from jaxprune.export import _check, _litert, _stablehlo

FORMATS = ("orbax", "stablehlo", "litert", "litert-float16", "litert-dynamic", "litert-int8",
           "litert-sparse", "litert-dynamic-sparse", "litert-int8-sparse")
_LITERT = re.compile(r"litert(?:-(float16|dynamic|int8))?(-sparse)?")


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a file, or of every file under a directory."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"file_bytes: {path!r} is neither a file nor a directory.")
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


class Report(NamedTuple):
    """Artifacts and their sizes: one row per (model, format).

    Attributes:
      rows: dicts with ``model``, ``format``, ``bytes`` (on disk), ``path``
        (``None`` when written to a temporary directory), ``params`` (entries
        of every array leaf of the variables, running statistics included),
        ``nonzeros`` and ``macs`` (per call, from :func:`jaxprune.graph.trace`;
        ``None`` with ``macs=False``).
    """

    rows: tuple

    def bytes(self, model: str, format: str) -> int:
        """The size of one artifact."""
        for row in self.rows:
            if row["model"] == model and row["format"] == format:
                return row["bytes"]
        have = sorted({(r["model"], r["format"]) for r in self.rows})
        raise KeyError(f"Report.bytes: no artifact ({model!r}, {format!r}); have {have}.")

    def table(self) -> str:
        """A text table; ``smaller`` is the first row's bytes over each row's."""
        ref = self.rows[0]["bytes"] if self.rows else 1
        head = f"{'model':<20} {'format':<22} {'MiB':>9} {'smaller':>8} {'params':>11} " \
               f"{'nonzeros':>11} {'MACs':>14}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            macs = "" if r["macs"] is None else f"{r['macs']:,}"
            lines.append(f"{r['model']:<20} {r['format']:<22} {r['bytes'] / 2**20:>9.3f} "
                         f"{ref / r['bytes']:>7.1f}x {r['params']:>11,} {r['nonzeros']:>11,} "
                         f"{macs:>14}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _check_formats(formats: Iterable[str], calibration: Any) -> tuple[str, ...]:
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"report: format {f!r} is not one of {FORMATS}.")
        if "int8" in f and calibration is None:
            raise ValueError(f"report: format {f!r} needs calibration=batches (what "
                             "jp.export.litert(quantize='int8') takes).")
    return formats


def _write(fmt: str, path: str, apply_fn: Callable, variables: Any, args: tuple,
           calibration: Any) -> str:
    if fmt == "orbax":
        ocp = _litert.require("orbax.checkpoint", "jp.export.report (format 'orbax')")
        names, leaves, _ = tree_lib.flatten(variables)
        arrays = {n: np.asarray(x) for n, x in zip(names, leaves) if tree_lib.is_array(x)}
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.abspath(path), arrays)
        ckpt.wait_until_finished()
        return path
    if fmt == "stablehlo":
        blob = _stablehlo.stablehlo(apply_fn, variables, *args)
    else:
        quantize, sparse = _LITERT.fullmatch(fmt).groups()
        blob = _litert.litert(apply_fn, variables, *args, quantize=quantize, sparse=bool(sparse),
                              calibration=calibration if quantize == "int8" else None)
    with open(path, "wb") as f:
        f.write(blob)
    return path


def _counts(apply_fn: Callable, variables: Any, args: tuple, macs: bool) -> dict:
    arrays = [np.asarray(x) for x in tree_lib.flatten(variables)[1] if tree_lib.is_array(x)]
    count = graph_lib.trace(apply_fn, variables, *args).macs if macs else None
    return dict(params=sum(int(a.size) for a in arrays),
                nonzeros=sum(int(np.count_nonzero(a)) for a in arrays), macs=count)


def report(models: Mapping[str, tuple[Callable, Any]], *example_args: Any,
           formats: Iterable[str] = ("orbax", "stablehlo", "litert"),
           calibration: Iterable | None = None, directory: str | os.PathLike | None = None,
           macs: bool = True) -> Report:
    """Writes every model in every format and measures the files.

    For each ``name: (apply_fn, variables)`` and format: ``"orbax"`` (an
    orbax ``StandardCheckpointer`` directory of the variables' arrays, by
    key path), ``"stablehlo"`` (:func:`stablehlo`), ``"litert"`` (float32),
    ``"litert-float16"``, ``"litert-dynamic"``, ``"litert-int8"`` and the
    ``-sparse`` variants (:func:`litert` with ``quantize=`` and
    ``sparse=True``). Sizes are bytes on disk (:func:`file_bytes`), never
    estimated from shapes.

    Args:
      models: ``{name: (apply_fn, variables)}``, e.g. the dense and the
        compacted model; the first row of the table is the reference of its
        ``smaller`` column.
      *example_args: inputs every model is exported for.
      formats: formats from :data:`FORMATS`.
      calibration: batches for the ``int8`` formats (see :func:`litert`).
      directory: where to keep the files (``<directory>/<model>/<format>``);
        ``None``: a temporary directory, deleted afterwards.
      macs: whether to count MACs (:func:`jaxprune.graph.trace`).

    Returns:
      A :class:`Report`; ``print`` it for the table.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxprune as jp
      >>> f = lambda v, x: x @ v["w"]
      >>> w = jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)
      >>> dense, small = {"w": w}, {"w": w[:, :16]}             # e.g. compacted
      >>> rep = jp.export.report({"dense": (f, dense), "small": (f, small)}, jnp.ones((1, 64)),
      ...                        formats=["stablehlo"])
      >>> [(r["model"], r["params"], r["macs"]) for r in rep.rows]
      [('dense', 4096, 4096), ('small', 1024, 1024)]
      >>> rep.bytes("dense", "stablehlo") > 4 * 4096 > rep.bytes("small", "stablehlo") > 4 * 1024
      True
    """
    formats = _check_formats(formats, calibration)
    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"report: models must be a non-empty mapping {{name: (apply_fn, "
                        f"variables)}}, got {type(models).__name__}.")
    calibration = None if calibration is None else list(calibration)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fspath(directory) if directory is not None else tmp
        rows = []
        for name, pair in models.items():
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"report: models[{name!r}] must be (apply_fn, variables), got "
                                f"{type(pair).__name__}.")
            apply_fn, variables = pair
            _check.check_model("report", apply_fn, example_args)
            counts = _counts(apply_fn, variables, example_args, macs)
            os.makedirs(os.path.join(root, name), exist_ok=True)
            for fmt in formats:
                path = _write(fmt, os.path.join(root, name, fmt), apply_fn, variables,
                              example_args, calibration)
                rows.append(dict(model=name, format=fmt, bytes=file_bytes(path),
                                 path=path if directory is not None else None, **counts))
    return Report(tuple(rows))

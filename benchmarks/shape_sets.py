"""The fixed suite of real-model shape sets that bench_select and bench_compile sweep.

Each set is a list of kernel shapes of about 16M weights (ResNet-50 and
GPT-2 are a little larger, as noted). Real kernels rarely have power-of-two
last axes (1000-class heads, vocabularies of 50257 or 32000, 11008-wide
MLPs), so the suite is built from them; the power-of-two set is only the
reference the old benchmark measured.

* ``resnet50``: every convolution kernel of ResNet-50 (HWIO) and the
  ``(2048, 1000)`` head: 25.5M weights.
* ``bert-base``: two encoder layers of BERT-base (Q, K, V, O ``768x768``,
  FFN ``768x3072`` and ``3072x768``) and the pooler: 14.8M.
* ``gpt2-small``: one GPT-2 small block (``c_attn 768x2304``, ``c_proj``,
  ``c_fc 768x3072``, ``3072x768``) and the 50257-token head with a third of
  its 768 rows, ``(256, 50257)``: 19.9M.
* ``llama-7b/4``: one LLaMA-7B layer with every width divided by 4
  (``d = 1024``, MLP ``2752``) and a head of ``32000 / 8`` tokens: 16.7M.
* ``odd-squares``: four square kernels of odd sides near 2000.
* ``no-32``: four kernels whose last axes are not multiples of 32, the
  shapes issue 18 measured (2000x2000, 2048x2000, 4096x1000, 1999x2001).
* ``pow2``: four ``2048 x 2048`` kernels (the reference).
* ``check-*``: four kernels each of ``(1024, 1024)``, ``(1000, 1000)``,
  ``(1023, 1025)`` and ``(4096, 250)`` (4M weights a set).

``quick(shapes)`` scales a set down for a smoke test (every axis of 256 or
more divided by 8, at most 6 kernels).
"""

from __future__ import annotations


def resnet50() -> list[tuple[int, ...]]:
    """ResNet-50's convolution kernels (HWIO) and its 1000-class head."""
    shapes = [(7, 7, 3, 64)]
    cin = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(1, 1, cin, planes), (3, 3, planes, planes), (1, 1, planes, 4 * planes)]
            if b == 0:
                shapes.append((1, 1, cin, 4 * planes))  # the projection shortcut
            cin = 4 * planes
    return shapes + [(2048, 1000)]


def _bert_layer(d: int = 768, ff: int = 3072) -> list[tuple[int, ...]]:
    return [(d, d)] * 4 + [(d, ff), (ff, d)]


SETS: dict[str, list[tuple[int, ...]]] = {
    "resnet50": resnet50(),
    "bert-base": _bert_layer() * 2 + [(768, 768)],
    "gpt2-small": [(768, 2304), (768, 768), (768, 3072), (3072, 768), (256, 50257)],
    "llama-7b/4": [(1024, 1024)] * 4 + [(1024, 2752)] * 2 + [(2752, 1024), (1024, 4000)],
    "odd-squares": [(1999, 1999), (2001, 2001), (2003, 2003), (1997, 1997)],
    "no-32": [(2000, 2000), (2048, 2000), (4096, 1000), (1999, 2001)],
    "pow2": [(2048, 2048)] * 4,
    "check-1024x1024": [(1024, 1024)] * 4,
    "check-1000x1000": [(1000, 1000)] * 4,
    "check-1023x1025": [(1023, 1025)] * 4,
    "check-4096x250": [(4096, 250)] * 4,
}


def quick(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """A small version of a set for ``--quick`` smoke runs."""
    small = [tuple(d // 8 if d >= 256 else d for d in s) for s in shapes]
    return small[:6]


def size(shapes: list[tuple[int, ...]]) -> int:
    """The number of weights of a set."""
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total

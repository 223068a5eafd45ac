"""Compression beside pruning, with the masks kept: ``quant`` (qwix QAT and
PTQ, extra ``quant``) and ``distill`` (knowledge distillation losses).
Public paths are ``jaxprune.quant`` and ``jaxprune.distill``.
"""

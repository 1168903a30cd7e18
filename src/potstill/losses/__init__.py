"""Distillation losses: pure functions, one file per family (formula and paper in each docstring)."""

from potstill.losses.forward_kl import dense_forward_kl, sparse_forward_kl

__all__ = ["dense_forward_kl", "sparse_forward_kl"]

"""potstill: distill a large teacher language model into a small student, and keep the receipts."""

__version__ = "0.1.0"

"""The train stage: ledger examples (``examples``) -> student, on accelerate (``loop``), with the
teacher/student tokenizer match (``tokenizer_match``), output heads (``heads``) and checkpoints
(``checkpoint``)."""

from potstill.train.loop import check_outputs, train

__all__ = ["check_outputs", "train"]

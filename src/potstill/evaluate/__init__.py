"""The eval stage: student against teacher on held-out prompts (``run``), with the judge
(``judge``) and answer verifiers (``verifiers``)."""

from potstill.evaluate.run import evaluate

__all__ = ["evaluate"]

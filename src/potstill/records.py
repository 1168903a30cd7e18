"""What a model is asked and what it answers: the records the teacher backends, the ledger, eval,
the judge and serve all pass around."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    """One completion to ask for. ``request_hash`` is its idempotency key in the ledger."""

    request_hash: str
    messages: list[dict]
    sample_index: int
    seed: int


@dataclass
class Completion:
    request_hash: str
    text: str
    token_ids: list[int] | np.ndarray | None  # generated ids, ending with EOS when finish_reason == "stop"
    topk_ids: np.ndarray | None  # (T, k) int32: the teacher's k most likely ids at each generated position
    topk_logprobs: np.ndarray | None  # (T, k) float32 log-probabilities at temperature 1, descending
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)
    prompt_tokens: int | None  # None: not known (an imported completion)
    seed: int | None
    seconds: float | None  # wall time of the batch this completion came in, divided by its size
    completion_tokens: int | None = None  # as the endpoint counted them, when token_ids are unknown
    token_logprobs: np.ndarray | None = None  # (T,) float32: each generated id's log-probability at temperature 1


def greedy_params(max_new_tokens: int) -> dict:
    """The sampling params of every greedy answer (eval's models and HTTP teacher, the judge). For an
    HTTP teacher they are part of the request hashes, so they are written once, here."""
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "top_logprobs": 0, "seed": 0}

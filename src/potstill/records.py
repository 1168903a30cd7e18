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
    token_logprobs: np.ndarray | None = None  # (T,) float32: each generated token's log-probability at temperature 1
    # An endpoint's tokens as raw bytes (OpenAI's ``bytes``; a token may end inside a UTF-8
    # character): the generated tokens join to ``text`` (+ a stop string's tokens, when one ended
    # it); the top-k in ``topk_logprobs``' order. None where ids are kept instead (token_ids).
    token_bytes: list[bytes] | None = None  # (T,)
    topk_bytes: list[list[bytes]] | None = None  # (T, k)


class TokenBytes:
    """Tokens' raw bytes, (T,) strings or (T, k), as the ledger stores them: one blob of N
    (uint32), N lengths (uint16) and the N strings joined, all little-endian (``pack``). Held as
    that blob, so a ledger's examples in memory cost what they take on disk; reading a row builds
    its ``bytes`` objects. ``len`` is T; ``tokens[t]`` is a token's bytes, or a row of k;
    ``tolist()`` is every row."""

    def __init__(self, blob: bytes, k: int | None = None):
        n = int.from_bytes(blob[:4], "little")
        self.blob, self.start = blob, 4 + 2 * n
        self.lengths = np.frombuffer(blob, "<u2", n, 4)  # (N,) a view of the blob
        if len(blob) != self.start + int(self.lengths.sum(dtype=np.int64)) or (k and n % k):
            raise ValueError(f"token bytes blob of {len(blob)} bytes does not hold {n} strings (k = {k})")
        self.shape = (n,) if k is None else (n // k, k)

    @staticmethod
    def pack(strings: list[bytes]) -> bytes:
        """Byte strings (each under 64 KiB) -> the blob ``TokenBytes`` reads."""
        lengths = np.array([len(s) for s in strings], np.int64)
        if lengths.size and lengths.max() > 0xFFFF:
            raise ValueError(f"a token of {lengths.max()} bytes: more than 65,535 cannot be stored")
        return len(strings).to_bytes(4, "little") + lengths.astype("<u2").tobytes() + b"".join(strings)

    def __len__(self) -> int:
        return self.shape[0]

    def _strings(self, first: int, count: int) -> list[bytes]:
        ends = self.start + np.cumsum(self.lengths[:first + count], dtype=np.int64)
        starts = ends - self.lengths[:first + count]
        return [self.blob[a:b] for a, b in zip(starts[first:].tolist(), ends[first:].tolist())]

    def __getitem__(self, t: int) -> bytes | list[bytes]:
        if not -len(self) <= t < len(self):
            raise IndexError(f"position {t} of {len(self)}")
        t %= len(self)
        if len(self.shape) == 1:
            return self._strings(t, 1)[0]
        k = self.shape[1]
        return self._strings(t * k, k)

    def tolist(self) -> list[bytes] | list[list[bytes]]:
        flat = self._strings(0, int(np.prod(self.shape)))
        if len(self.shape) == 1:
            return flat
        k = self.shape[1]
        return [flat[i:i + k] for i in range(0, len(flat), k)]

    def __iter__(self):
        return iter(self.tolist())

    def __eq__(self, other) -> bool:
        if isinstance(other, TokenBytes):
            other = other.tolist()
        return isinstance(other, list) and self.tolist() == other

    def __repr__(self) -> str:
        return f"TokenBytes(shape={self.shape})"


def greedy_params(max_new_tokens: int) -> dict:
    """The sampling params of every greedy answer (eval's models and HTTP teacher, the judge). For an
    HTTP teacher they are part of the request hashes, so they are written once, here."""
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "top_logprobs": 0, "seed": 0}

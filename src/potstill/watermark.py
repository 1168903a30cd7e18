"""A keyed green-list watermark for teachers you host (Kirchenbauer et al. 2023, arXiv:2301.10226).

At each step a keyed hash of the previous ``context`` token ids picks a share ``gamma`` of the
vocabulary (the green list), and green logits get ``+delta`` before sampling. Text written with the
key holds more green tokens than the ``gamma`` share that text written without it holds; the
exact binomial test in :mod:`potstill.audit.stats` measures by how much.

Green lists are computed on the CPU with unsigned 64-bit integer arithmetic (keyed BLAKE2b of the
context, then splitmix64 of each token id), never with a device's random generator, so the same key
gives the same lists on CPU, CUDA or MPS, and on any torch version (the Kirchenbauer reference code
seeds ``torch.Generator(device)``, whose streams differ between CPU and CUDA).

Token id ``v`` is green after context ``c`` when ``splitmix64(seed(key, c) xor v) / 2**64 < gamma``:
each (context, token) pair is green with probability ``gamma`` over keys, independently of every
other pair, which is what makes the binomial null exact once repeated pairs are counted once.

The key never leaves this object: what is recorded anywhere is :meth:`Watermark.describe`, which
holds a key id (a hash of the key) and gamma, delta and the context width.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from potstill.errors import PotstillError

SCHEME = "potstill-kgw-v1"  # changes whenever green lists would change for the same key
MIN_KEY_BYTES = 16

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on a uint64 array (wraps modulo 2**64, as numpy's unsigned types do)."""
    x = x + _GOLD
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def key_id(key: bytes) -> str:
    """A public name for a key: a hash that cannot be turned back into the key."""
    return "sha256:" + hashlib.sha256(b"potstill watermark key id\0" + key).hexdigest()[:16]


class Watermark:
    """A green-list watermark with one key; also a transformers logits processor.

    ``gamma``: share of the vocabulary that is green (0 < gamma < 1); ``delta``: logit bonus of green
    tokens (0 turns generation back to the plain model, detection still works); ``context``: how many
    previous token ids seed the green list (1 = the previous token)."""

    def __init__(self, key: bytes, gamma: float = 0.25, delta: float = 2.0, context: int = 1, cache: int = 4096):
        if len(key) < MIN_KEY_BYTES:
            raise PotstillError(f"a watermark key needs at least {MIN_KEY_BYTES} bytes, this one has {len(key)}; "
                                f"make one with: python -c \"import secrets; print(secrets.token_hex(32))\" > KEYFILE")
        if not 0 < gamma < 1:
            raise PotstillError(f"watermark gamma must be between 0 and 1 (exclusive), not {gamma}")
        if delta < 0:
            raise PotstillError(f"watermark delta must be >= 0, not {delta}")
        if context < 1:
            raise PotstillError(f"watermark context must be >= 1 token, not {context}")
        # BLAKE2b keys are at most 64 bytes: any key file is hashed to 32
        self._key = hashlib.sha256(key).digest()
        self.key_id = key_id(key)
        self.gamma, self.delta, self.context = float(gamma), float(delta), int(context)
        self._threshold = np.uint64(min(int(self.gamma * 2.0**64), 2**64 - 1))
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache

    def __repr__(self) -> str:  # never the key
        return (f"Watermark(key_id={self.key_id!r}, gamma={self.gamma}, delta={self.delta}, "
                f"context={self.context})")

    def describe(self) -> dict:
        """What provenance records: everything but the key."""
        return {"scheme": SCHEME, "key_id": self.key_id, "gamma": self.gamma, "delta": self.delta,
                "context": self.context}

    def seed(self, context: tuple[int, ...]) -> np.uint64:
        data = struct.pack(f"<{len(context)}q", *context)
        return np.uint64(int.from_bytes(hashlib.blake2b(data, key=self._key, digest_size=8).digest(), "little"))

    def green_mask(self, context: tuple[int, ...], vocab_size: int) -> np.ndarray:
        """(vocab_size,) bool: the green list after ``context`` (its last ``self.context`` ids)."""
        context = tuple(context[-self.context:])
        cached = self._cache.get((context, vocab_size))
        if cached is not None:
            self._cache.move_to_end((context, vocab_size))
            return cached
        mask = splitmix64(self.seed(context) ^ np.arange(vocab_size, dtype=np.uint64)) < self._threshold
        self._cache[(context, vocab_size)] = mask
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return mask

    def is_green(self, context: tuple[int, ...], token: int) -> bool:
        context = tuple(context[-self.context:])
        return bool(splitmix64(self.seed(context) ^ np.array([token], dtype=np.uint64))[0] < self._threshold)

    def count_green(self, pairs) -> int:
        """How many (context, token) ``pairs`` are green, as ``is_green`` says pair by pair: one
        keyed hash per distinct context, then splitmix64 over every token at once (an audit scores
        10**5 pairs against each of several keys)."""
        seeds: dict[tuple[int, ...], np.uint64] = {}
        seed_of = np.empty(len(pairs), dtype=np.uint64)
        tokens = np.empty(len(pairs), dtype=np.uint64)
        for i, (context, token) in enumerate(pairs):
            context = tuple(context[-self.context:])
            seed = seeds.get(context)
            if seed is None:
                seed = seeds[context] = self.seed(context)
            seed_of[i], tokens[i] = seed, token
        return int((splitmix64(seed_of ^ tokens) < self._threshold).sum())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Logits processor: ``scores`` (B, V) after ``input_ids`` (B, L) get +delta on each row's green list."""
        rows = input_ids[:, -self.context:].tolist()
        masks = np.stack([self.green_mask(tuple(r), scores.shape[-1]) for r in rows])  # (B, V)
        bonus = torch.from_numpy(masks).to(device=scores.device, dtype=scores.dtype) * self.delta
        return scores + bonus


def read_key(path: str | Path) -> bytes:
    """The key file's bytes (surrounding whitespace removed, so an editor's newline does not change the key)."""
    path = Path(path)
    try:
        key = path.read_bytes().strip()
    except OSError as e:
        raise PotstillError(f"watermark key file {path} could not be read: {e.strerror or e}") from None
    if len(key) < MIN_KEY_BYTES:
        raise PotstillError(f"watermark key file {path} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}; make one "
                            f"with: python -c \"import secrets; print(secrets.token_hex(32))\" > {path}")
    return key


def load_watermark(path: str | Path, gamma: float = 0.25, delta: float = 2.0, context: int = 1) -> Watermark:
    return Watermark(read_key(path), gamma=gamma, delta=delta, context=context)


def scored_pairs(sequences: list[list[int]], context: int, starts: list[int] | None = None,
                 skip: set[int] = frozenset()) -> list[tuple[tuple[int, ...], int]]:
    """The (context window, token) pairs of token id sequences, in order, repeats included.

    ``starts[i]``: the first position of sequence i that is scored (e.g. the prompt's length, so the
    prompt supplies context but is not scored); positions with fewer than ``context`` ids before
    them are never scored. Tokens in ``skip`` (EOS, padding) are not scored."""
    pairs = []
    for i, seq in enumerate(sequences):
        first = max(context, starts[i] if starts else 0)
        for t in range(first, len(seq)):
            if seq[t] not in skip:
                pairs.append((tuple(seq[t - context:t]), seq[t]))
    return pairs

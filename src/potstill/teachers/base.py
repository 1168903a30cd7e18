"""What every teacher backend takes and returns."""

from __future__ import annotations

from typing import Protocol

from potstill.records import Completion, Request


class Teacher(Protocol):
    def describe(self) -> dict:
        """Provenance: id, backend, weights or endpoint, tokenizer and chat-template hashes, terms."""

    def complete(self, requests: list[Request], params: dict) -> list[Completion]:
        """Answer ``requests`` with the sampling ``params`` of the recipe's generation section."""

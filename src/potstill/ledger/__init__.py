"""The ledger: one SQLite file holding every request, teacher answer and attempt, keyed so a
rerun asks only for what is missing (``store``), and the merge of ledgers (``merge``)."""

from potstill.ledger.merge import merge_ledgers
from potstill.ledger.store import (SCHEMA_VERSION, Attempt, Example, Ledger, completion_problem, exclusive,
                                   request_hash, requests_for, teacher_key)

__all__ = ["SCHEMA_VERSION", "Attempt", "Example", "Ledger", "completion_problem", "exclusive", "merge_ledgers",
           "request_hash", "requests_for", "teacher_key"]

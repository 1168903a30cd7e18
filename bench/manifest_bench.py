"""Time to build and to verify the Merkle manifest, and its size, on a ledger of synthetic rows.

    python bench/manifest_bench.py --rows 100000      # prints a markdown table, per million rows

Each row is like the quickstart's: a 40-character prompt, a 12-token completion with its token ids
and the teacher's top-20 ids and logprobs (1,488 bytes of blobs). Rows are written straight into a
ledger (one transaction); build = reading them back, hashing each into a leaf and building the tree
(``ledger_leaves`` + ``merkle_root``, what train does); verify = what `potstill verify` does with
the ledger (leaves again, compared row by row with manifest.merkle, plus the root of manifest.merkle).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from potstill.ledger import Ledger
from potstill.receipts import manifest


def synthetic_ledger(path: Path, rows: int, k: int = 20, tokens: int = 12) -> list[str]:
    rng = np.random.default_rng(0)
    desc = {"id": "synthetic", "backend": "imported", "source_sha256": "0" * 64, "format": "jsonl"}
    hashes = []
    with Ledger(path) as ledger:
        key = ledger.register_teacher(desc)
        session = ledger.start_session(None)
        db = ledger.db
        with db:
            db.execute("BEGIN")
            for i in range(rows):
                p = f"{i:064x}"
                h = f"{(i * 2654435761) % 2**256:064x}"
                db.execute("INSERT INTO prompts VALUES (?, ?, '{}', NULL)",
                           (p, json.dumps([{"role": "user", "content": f"prompt number {i:>10} of the bench"}])))
                db.execute("INSERT INTO requests VALUES (?, ?, ?, '{}', 0, 'done', NULL, 't', 't')", (h, p, key))
                ids = rng.integers(0, 32000, (tokens, k), dtype="<i4")
                db.execute("INSERT INTO completions (request_hash, session_id, text, token_ids, top_k, topk_ids, "
                           "topk_logprobs, finish_reason, prompt_tokens, completion_tokens, seed, seconds, created_at) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           (h, session, "a completion of twelve", ids[:, 0].tobytes(), k, ids.tobytes(),
                            rng.normal(-3, 1, (tokens, k)).astype("<f2").tobytes(), "stop", 10, tokens, 0, 0.1, "t"))
                hashes.append(h)
    return hashes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        hashes = synthetic_ledger(tmp / "ledger.sqlite", args.rows)
        made = time.perf_counter() - t
        with Ledger(tmp / "ledger.sqlite") as ledger:
            key = next(iter(ledger.teachers()))
            t = time.perf_counter()
            rows = manifest.ledger_leaves(ledger, hashes, {key: "allowed"})
            root = manifest.write(tmp, rows)
            build = time.perf_counter() - t
            t = time.perf_counter()
            stored = manifest.read(tmp)
            assert manifest.merkle_root([leaf for _, leaf in stored]).hex() == root
            now = dict(manifest.ledger_leaves(ledger, [h for h, _ in stored], {key: "allowed"}))
            assert all(now[h] == leaf for h, leaf in stored)
            verify = time.perf_counter() - t
        size = (tmp / manifest.MANIFEST).stat().st_size
    per_m = 1_000_000 / args.rows
    print(f"| rows | write synthetic ledger | build manifest | verify | manifest.merkle |\n|---:|---:|---:|---:|---:|\n"
          f"| {args.rows:,} | {made:.1f} s | {build:.1f} s | {verify:.1f} s | {size / 2**20:.1f} MiB |\n"
          f"| per million (scaled) | - | {build * per_m:.0f} s | {verify * per_m:.0f} s | {size * per_m / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()

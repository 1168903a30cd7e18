"""Token bytes in the ledger: stored and read back exactly (a character split between tokens
included), in the compact blobs the schema documents; the content hash of rows without them
unchanged; a ledger written before the columns opens, reads and merges."""

import hashlib
import re
import shutil
import sqlite3

import numpy as np
import pytest

from helpers import plan
from potstill.ledger import Ledger, merge_ledgers
from potstill.ledger.store import completion_problem
from potstill.prompts import Prompt
from potstill.records import Completion, TokenBytes

TEACHER = {"id": "fake", "backend": "openai", "endpoint": "http://x/v1", "model": "m", "api": "chat",
           "token_ids": False}
PARAMS = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 3, "seed": 0}
PROMPTS = [Prompt((("user", f"say {i}"),), {"id": f"p{i}"}, f"p.jsonl:{i + 1}") for i in range(6)]
ADDED = ("token_bytes", "topk_bytes", "token_logprobs")


def split(text: str) -> list[bytes]:
    raw = text.encode()
    return [raw[i:i + 3] for i in range(0, len(raw), 3)]  # 🙂 (4 bytes) lands across two tokens


def bytes_completion(h: str, text: str | None = None) -> Completion:
    text = text or f"{h[:3]} 🙂 é"
    tokens = split(text)
    top = [[t, b"", b"\xff" + t] for t in tokens]  # an empty alternative (a special token) and a non-UTF-8 one
    lps = np.tile(np.float32([-0.25, -2.0, -3.5]), (len(tokens), 1))
    return Completion(h, text, None, None, lps, "stop", 4, 0, 0.01, completion_tokens=99,
                      token_logprobs=np.linspace(-0.5, -6, len(tokens)).astype(np.float32), token_bytes=tokens,
                      topk_bytes=top)


def ids_completion(h: str) -> Completion:
    rng = np.random.default_rng(int(h[:8], 16))
    T = 2 + int(h[8], 16) % 5
    lps = -np.sort(rng.random((T, 3)), 1).astype(np.float32)
    return Completion(h, f"answer {h[:6]}", rng.integers(0, 50, T).tolist(), rng.integers(0, 50, (T, 3)).astype(np.int32),
                      lps, "stop", 4, 0, 0.01)


def fill(path, make, prompts=PROMPTS) -> list[str]:
    with Ledger(path) as ledger:
        key = ledger.register_teacher(TEACHER)
        todo = [r.request_hash for r in plan(ledger, key, prompts, PARAMS)]
        assert ledger.record(ledger.start_session("recipe"), [make(h) for h in todo]) == len(todo)
    return todo


def test_token_bytes_blobs_round_trip():
    strings = [b"ab", b"", b"\xf0\x9f", b"x" * 0xFFFF]
    flat = TokenBytes(TokenBytes.pack(strings))
    assert flat.tolist() == strings and list(flat) == strings and len(flat) == 4 and flat.shape == (4,)
    assert flat[2] == b"\xf0\x9f" and flat[-1] == strings[-1] and flat == strings
    grid = TokenBytes(TokenBytes.pack(strings), k=2)
    assert grid.shape == (2, 2) and grid.tolist() == [strings[:2], strings[2:]] and grid[1] == strings[2:]
    assert not grid.lengths.flags.writeable  # a view of the blob, not a copy
    assert len(TokenBytes.pack([b"abc", b"d"])) == 4 + 2 * 2 + 4  # N, a uint16 length each, the bytes
    assert TokenBytes(TokenBytes.pack([]), k=3).tolist() == []
    with pytest.raises(ValueError, match="65,535"):
        TokenBytes.pack([b"x" * 0x10000])
    with pytest.raises(ValueError, match="does not hold"):
        TokenBytes(TokenBytes.pack(strings)[:-1])
    with pytest.raises(IndexError):
        flat[4]


def test_bytes_rows_are_read_back_exactly(tmp_path):
    hashes = fill(tmp_path / "l.sqlite", bytes_completion)
    with Ledger(tmp_path / "l.sqlite") as ledger:
        examples = {ex.request_hash: ex for ex in ledger.examples()}
        row = ledger.db.execute("SELECT top_k, completion_tokens, length(token_bytes), length(token_logprobs) "
                                "FROM completions WHERE request_hash=?", (hashes[0],)).fetchone()
    for h in hashes:
        want, ex = bytes_completion(h), examples[h]
        assert ex.token_bytes == want.token_bytes and ex.topk_bytes == want.topk_bytes
        assert b"".join(ex.token_bytes) == ex.text.encode() and ex.token_ids is None and ex.topk_ids is None
        assert ex.token_logprobs.dtype == np.float16 and not ex.token_logprobs.flags.writeable
        assert (ex.token_logprobs == want.token_logprobs.astype(np.float16)).all()
        assert (ex.topk_logprobs == want.topk_logprobs.astype(np.float16)).all() and ex.topk_bytes.shape == (len(want.token_bytes), 3)
    T = len(bytes_completion(hashes[0]).token_bytes)
    assert row == (3, T, 4 + 2 * T + len(bytes_completion(hashes[0]).text.encode()), 2 * T)  # T positions, not usage


@pytest.mark.parametrize("edit, problem", [
    (dict(topk_bytes=[[b"a", b"b", b"c"]]), r"topk_bytes rows \(1\) do not match completion tokens"),
    (dict(token_logprobs=np.float32([np.nan] * 5)), "non-finite or positive logprob in the teacher's generated"),
    (dict(token_logprobs=np.float32([-1.0] * 4)), r"token_logprobs rows \(4\) do not match"),
    (dict(topk_bytes=[[b"a", b"b"]] * 5), "topk_bytes rows are not the 3 entries of topk_logprobs"),
    (dict(token_bytes=[b"x" * 0x10000] * 5), "at most 65,535 bytes"),
])
def test_completions_the_blobs_cannot_hold_are_problems(edit, problem):
    c = bytes_completion("ab" * 32, "0123456789abcde")  # 5 tokens
    assert completion_problem(c) is None
    for name, value in edit.items():
        setattr(c, name, value)
    assert completion_problem(c) and re.search(problem, completion_problem(c))


def old_content_sha256(ledger: Ledger) -> str:
    """content_sha256 as potstill computed it before token bytes (at commit 430d875)."""
    h = hashlib.sha256()
    for row in ledger.db.execute("SELECT c.request_hash, r.prompt_sha256, c.text, c.token_ids, c.topk_ids, "
                                 "c.topk_logprobs FROM completions c JOIN requests r USING (request_hash) "
                                 "ORDER BY c.request_hash"):
        for field in row:
            h.update(b"\x00" if field is None else (field.encode() if isinstance(field, str) else field))
            h.update(b"\x1f")
    return h.hexdigest()


def without_added_columns(src, dst):
    """A copy of ``src`` as a potstill from before token bytes wrote it."""
    shutil.copy(src, dst)
    with sqlite3.connect(dst) as db:
        for column in ADDED:
            db.execute(f"ALTER TABLE completions DROP COLUMN {column}")
    db.close()


def test_the_content_hash_names_bytes_and_keeps_older_rows_hashes(tmp_path):
    fill(tmp_path / "ids.sqlite", ids_completion)
    fill(tmp_path / "bytes.sqlite", bytes_completion)
    fill(tmp_path / "other.sqlite", lambda h: Completion(**{**bytes_completion(h).__dict__, "topk_bytes": [
        [t, b"", b"\xfe"] for t in bytes_completion(h).token_bytes]}))
    with Ledger(tmp_path / "ids.sqlite") as ids, Ledger(tmp_path / "bytes.sqlite") as a, \
            Ledger(tmp_path / "other.sqlite") as b:
        assert ids.content_sha256() == old_content_sha256(ids)  # rows without bytes: the hash they always had
        assert a.content_sha256() != old_content_sha256(a)
        assert a.content_sha256() != b.content_sha256()  # only topk_bytes differ


def test_a_ledger_from_before_token_bytes_opens_reads_and_merges(tmp_path):
    ids_done = fill(tmp_path / "new-ids.sqlite", ids_completion)
    without_added_columns(tmp_path / "new-ids.sqlite", tmp_path / "old.sqlite")
    old_bytes = (tmp_path / "old.sqlite").read_bytes()
    with sqlite3.connect(tmp_path / "old.sqlite") as db:
        assert not set(ADDED) & {r[1] for r in db.execute("PRAGMA table_info(completions)")}
    db.close()
    shutil.copy(tmp_path / "old.sqlite", tmp_path / "old-opened.sqlite")
    with Ledger(tmp_path / "old-opened.sqlite") as ledger, Ledger(tmp_path / "new-ids.sqlite") as new:
        assert set(ADDED) <= {r[1] for r in ledger.db.execute("PRAGMA table_info(completions)")}
        examples = list(ledger.examples())
        assert len(examples) == len(ids_done) and all(ex.token_bytes is ex.topk_bytes is ex.token_logprobs is None
                                                      for ex in examples)
        assert ledger.content_sha256() == new.content_sha256() == old_content_sha256(new)

    more = [Prompt((("user", f"more {i}"),), {"id": f"m{i}"}, f"m.jsonl:{i + 1}") for i in range(4)]
    bytes_done = fill(tmp_path / "bytes.sqlite", bytes_completion, more)
    # the old ledger as an input (read, never written) and as the output (upgraded in place)
    counts = merge_ledgers(tmp_path / "out.sqlite", [tmp_path / "old.sqlite", tmp_path / "bytes.sqlite"])
    assert counts["completions"] == len(ids_done) + len(bytes_done) and counts["conflicts"] == 0
    assert (tmp_path / "old.sqlite").read_bytes() == old_bytes
    assert merge_ledgers(tmp_path / "out.sqlite", [tmp_path / "old.sqlite"])["duplicates"] == len(ids_done)
    merge_ledgers(tmp_path / "old.sqlite", [tmp_path / "bytes.sqlite"])
    for path in ("out.sqlite", "old.sqlite"):
        with Ledger(tmp_path / path) as out, Ledger(tmp_path / "bytes.sqlite") as b:
            got = {ex.request_hash: ex for ex in out.examples()}
            assert set(got) == set(ids_done) | set(bytes_done)
            for h in bytes_done:
                want = bytes_completion(h)
                assert got[h].token_bytes == want.token_bytes and got[h].topk_bytes == want.topk_bytes
                assert (got[h].token_logprobs == want.token_logprobs.astype(np.float16)).all()
            assert all(got[h].token_bytes is None and got[h].token_ids is not None for h in ids_done)
            assert out.content_sha256(bytes_done) == b.content_sha256()


def test_merge_counts_a_row_that_differs_only_in_its_bytes_as_a_conflict(tmp_path):
    fill(tmp_path / "a.sqlite", bytes_completion)
    fill(tmp_path / "b.sqlite", lambda h: Completion(**{**bytes_completion(h).__dict__,
                                                       "token_logprobs": np.full(len(bytes_completion(h).token_bytes), -1, np.float32)}))
    merge_ledgers(tmp_path / "out.sqlite", [tmp_path / "a.sqlite"])
    counts = merge_ledgers(tmp_path / "out.sqlite", [tmp_path / "b.sqlite"])
    assert counts["conflicts"] == counts["duplicates"] == len(PROMPTS) and counts["completions"] == 0

"""Combine ledgers (e.g. the shards of `potstill generate --shard i/n`) into one, without duplicates.

Each input is attached read-only and copied with INSERT ... SELECT in one transaction, so a merge
is fast and a crash leaves ``out`` as it was before that input. What is kept:

- teachers, prompts: unioned by key;
- requests: unioned by request hash; a request is ``done`` exactly when ``out`` holds its
  completion, and a ``failed`` one wins over ``pending`` (its error says why);
- completions: the first one stored for a hash is kept; an input holding the same completion is a
  duplicate, one holding a different completion a conflict (counted, not stored);
- sessions: copied with new ids (the completions and attempts that name them are remapped); a
  session already in ``out`` (same start time, recipe and versions) is not copied again;
- attempts: copied unless ``out`` has one with the same request, endpoint and send time;
- batches, batch_requests: unioned by key; a batch collected in any input is collected in ``out``,
  and ids an input recorded (file, batch) fill those ``out`` lacks.

So merging the same input twice adds nothing. An input written before a column was added
(``ledger.store.ADDED_COLUMNS``: session endings, token bytes) is merged with that column null.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from potstill.errors import PotstillError
from potstill.ledger.store import ADDED_COLUMNS, SCHEMA_VERSION, Ledger, exclusive

TABLES = ("meta", "teachers", "prompts", "sessions", "requests", "completions", "attempts", "batches",
          "batch_requests")
COMPLETION_COLUMNS = ("text", "token_ids", "top_k", "topk_ids", "topk_logprobs", "finish_reason", "prompt_tokens",
                      "completion_tokens", "seed", "seconds", "created_at", "token_bytes", "topk_bytes",
                      "token_logprobs")
ATTEMPT_COLUMNS = ("request_hash", "endpoint", "sent_at", "seconds", "outcome", "http_status", "error",
                   "prompt_tokens", "completion_tokens", "cost")
SAME_SESSION = "m.started_at = s.started_at AND m.recipe_sha256 IS s.recipe_sha256 AND m.versions = s.versions"
CONTENT = ("text", "token_ids", "top_k", "topk_ids", "topk_logprobs", "finish_reason", "token_bytes", "topk_bytes",
           "token_logprobs")


def merge_ledgers(out: str | Path, inputs: list[str | Path]) -> dict:
    """Merge ``inputs`` into ``out`` (created if missing). Returns counts: inputs, requests and
    completions added, duplicates (completions ``out`` already held), conflicts (a different
    completion for a hash ``out`` already held: the first is kept), sessions, attempts, batches added."""
    out, inputs = Path(out), [Path(p) for p in inputs]
    if not inputs:
        raise PotstillError("merge: no input ledgers given")
    for p in inputs:
        if out.exists() and p.exists() and p.resolve() == out.resolve():
            raise PotstillError(f"{p}: is the output ledger; merge it into a new file instead")
    with exclusive(out), tempfile.TemporaryDirectory() as scratch:
        if out.exists() and out.stat().st_size:
            _check(out)  # never let Ledger() add its tables to some other SQLite file
        Ledger(out).close()  # creates out, or upgrades a version 1 ledger in place
        sources = [_source(p, Path(scratch) / f"{i}.sqlite") for i, p in enumerate(inputs)]  # all checked first
        db = sqlite3.connect(out.resolve().as_uri(), uri=True, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=FULL")
            counts = {"inputs": len(inputs), "requests": 0, "completions": 0, "duplicates": 0, "conflicts": 0,
                      "sessions": 0, "attempts": 0, "batches": 0}
            for p, source in zip(inputs, sources):
                db.execute("ATTACH DATABASE ? AS src", (source.resolve().as_uri() + "?mode=ro",))
                try:
                    db.execute("BEGIN IMMEDIATE")
                    for k, v in _merge_one(db).items():
                        counts[k] += v
                    db.execute("COMMIT")
                except sqlite3.Error as e:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise PotstillError(f"{p}: could not be merged ({e}); {out} is as it was before this input") from None
                finally:
                    db.execute("DETACH src")
            check = db.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise PotstillError(f"{out}: integrity check failed after the merge ({check})")
        finally:
            db.close()
    return counts


def _check(path: Path) -> None:
    """Refuse, in one line, a file that is not a potstill ledger; upgrade a version 1 output in
    place first (it only gains empty tables)."""
    if _version(path) == "1":
        Ledger(path).close()
    _version(path, strict=True)


def _version(path: Path, strict: bool = False) -> str | None:
    try:
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() \
                if "meta" in names else None
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise PotstillError(f"{path}: not a potstill ledger ({e})") from None
    if not strict:
        return version[0] if version else None
    if version is None or not set(TABLES) <= names:
        missing = ", ".join(sorted(set(TABLES) - names)) or "schema_version"
        raise PotstillError(f"{path}: not a potstill ledger (no {missing})")
    if version[0] != SCHEMA_VERSION:
        raise PotstillError(f"{path}: ledger schema {version[0]}; this potstill merges schema {SCHEMA_VERSION} "
                            f"(a newer potstill wrote it?)")
    return version[0]


def _source(path: Path, scratch: Path) -> Path:
    """The file to attach for an input, checked; a version 1 input is upgraded in a copy at
    ``scratch``, never in place (it may sit on read-only storage, or belong to someone else)."""
    if not path.is_file():
        raise PotstillError(f"input ledger {path} not found")
    if _version(path) == "1":
        src = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        dst = sqlite3.connect(scratch)
        src.backup(dst)  # includes what is still in the input's WAL
        src.close()
        dst.close()
        Ledger(scratch).close()
        path = scratch
    _version(path, strict=True)
    return path


def _source_columns(db: sqlite3.Connection, table: str, columns: tuple[str, ...], prefix: str = "") -> list[str]:
    """What to select for ``columns`` of the input's ``table``: the column, or NULL for one added
    since the input was written (``ADDED_COLUMNS``; ``out`` has them all)."""
    have = {r[1] for r in db.execute(f"PRAGMA src.table_info({table})")}
    added = {c for t, c, _ in ADDED_COLUMNS if t == table}
    return [f"{prefix}{c}" if c in have or c not in added else "NULL" for c in columns]


def _merge_one(db: sqlite3.Connection) -> dict:
    """Copy the attached ``src`` into main; the caller holds the transaction."""
    n = {}
    db.execute("INSERT OR IGNORE INTO main.teachers (teacher_key, description) "
               "SELECT teacher_key, description FROM src.teachers")
    db.execute("INSERT OR IGNORE INTO main.prompts (prompt_sha256, messages, meta, source) "
               "SELECT prompt_sha256, messages, meta, source FROM src.prompts")
    # 'done' is set below from the completions main ends up holding, never copied on its own
    n["requests"] = db.execute(
        "INSERT OR IGNORE INTO main.requests (request_hash, prompt_sha256, teacher_key, params, sample_index, status,"
        " error, created_at, updated_at) SELECT request_hash, prompt_sha256, teacher_key, params, sample_index,"
        " CASE status WHEN 'done' THEN 'pending' ELSE status END, error, created_at, updated_at"
        " FROM src.requests ORDER BY rowid").rowcount
    db.execute("UPDATE main.requests AS m SET status = 'failed', error = s.error, updated_at = s.updated_at "
               "FROM src.requests AS s WHERE m.request_hash = s.request_hash AND m.status = 'pending' "
               "AND s.status = 'failed'")

    # sessions: new ids in main, mapped from the input's
    ended, stopped = _source_columns(db, "sessions", ("ended_at", "stopped"))
    db.execute(f"INSERT INTO main.sessions (started_at, recipe_sha256, versions, ended_at, stopped) "
               f"SELECT DISTINCT started_at, recipe_sha256, versions, {ended}, {stopped} FROM src.sessions s "
               f"WHERE NOT EXISTS (SELECT 1 FROM main.sessions m WHERE {SAME_SESSION}) ORDER BY session_id")
    n["sessions"] = db.execute("SELECT changes()").fetchone()[0]
    db.execute("CREATE TEMP TABLE session_map (old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
    db.execute(f"INSERT INTO temp.session_map SELECT s.session_id, "
               f"(SELECT min(m.session_id) FROM main.sessions m WHERE {SAME_SESSION}) FROM src.sessions s")

    # completions: count what main already holds before copying the rest
    columns = dict(zip(COMPLETION_COLUMNS, _source_columns(db, "completions", COMPLETION_COLUMNS, "s.")))
    same = " AND ".join(f"m.{c} IS {columns[c]}" for c in CONTENT)
    n["duplicates"], n["conflicts"] = db.execute(
        f"SELECT count(*), ifnull(sum(NOT ({same})), 0) "
        f"FROM src.completions s JOIN main.completions m USING (request_hash)").fetchone()
    db.execute("CREATE TEMP TABLE new_completions (request_hash TEXT PRIMARY KEY)")
    db.execute("INSERT INTO temp.new_completions SELECT request_hash FROM src.completions s "
               "WHERE NOT EXISTS (SELECT 1 FROM main.completions m WHERE m.request_hash = s.request_hash)")
    cols = ", ".join(COMPLETION_COLUMNS)
    n["completions"] = db.execute(
        f"INSERT INTO main.completions (request_hash, session_id, {cols}) "
        f"SELECT s.request_hash, sm.new, {', '.join(columns.values())} "
        f"FROM src.completions s JOIN temp.new_completions USING (request_hash) "
        f"JOIN temp.session_map sm ON sm.old = s.session_id ORDER BY s.request_hash").rowcount
    db.execute("UPDATE main.requests AS m SET status = 'done', error = NULL, updated_at = s.updated_at "
               "FROM src.requests AS s WHERE m.request_hash = s.request_hash AND m.status != 'done' "
               "AND m.request_hash IN (SELECT request_hash FROM temp.new_completions)")

    cols = ", ".join(ATTEMPT_COLUMNS)
    n["attempts"] = db.execute(
        f"INSERT INTO main.attempts (session_id, {cols}) "
        f"SELECT sm.new, {', '.join('a.' + c for c in ATTEMPT_COLUMNS)} "
        f"FROM src.attempts a JOIN temp.session_map sm ON sm.old = a.session_id "
        f"WHERE NOT EXISTS (SELECT 1 FROM main.attempts b WHERE b.request_hash = a.request_hash "
        f"AND b.endpoint = a.endpoint AND b.sent_at = a.sent_at) ORDER BY a.attempt_id").rowcount
    n["batches"] = db.execute(
        "INSERT OR IGNORE INTO main.batches (local_id, teacher_key, batch_id, input_file_id, status, error, created_at,"
        " updated_at) SELECT local_id, teacher_key, batch_id, input_file_id, status, error, created_at, updated_at"
        " FROM src.batches").rowcount
    db.execute("UPDATE main.batches AS m SET status = 'collected', error = s.error, updated_at = s.updated_at "
               "FROM src.batches AS s WHERE m.local_id = s.local_id AND s.status = 'collected' "
               "AND m.status != 'collected'")  # as a done request wins: its answers are in the ledger
    # what an input learnt of a batch (its file and batch ids) fills what out does not know yet,
    # so a rerun polls that batch instead of looking it up by its tag
    db.execute("UPDATE main.batches AS m SET batch_id = coalesce(m.batch_id, s.batch_id), "
               "input_file_id = coalesce(m.input_file_id, s.input_file_id), "
               "status = CASE WHEN m.status = 'prepared' THEN s.status ELSE m.status END "
               "FROM src.batches AS s WHERE m.local_id = s.local_id AND m.status != 'collected' "
               "AND (m.batch_id IS NULL OR m.input_file_id IS NULL)")
    db.execute("INSERT OR IGNORE INTO main.batch_requests (local_id, request_hash) "
               "SELECT local_id, request_hash FROM src.batch_requests")
    if db.execute("SELECT 1 FROM src.sqlite_master WHERE type='table' AND name='plans'").fetchone():
        # a shard's plan is the whole recipe's: every shard of one recipe holds the same one
        db.execute("INSERT OR IGNORE INTO main.plans (plan_key, teacher_key, prompt_limit, request_hashes, created_at) "
                   "SELECT plan_key, teacher_key, prompt_limit, request_hashes, created_at FROM src.plans")
    db.execute("DROP TABLE temp.session_map")
    db.execute("DROP TABLE temp.new_completions")
    return n

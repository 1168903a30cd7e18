"""Ledger round trip, resume after a crash, and that a rerun sends nothing already done."""

import json
import sqlite3

import numpy as np
import pytest

from potstill.errors import PotstillError
from potstill.generate import generate
from potstill.teachers.backends import make_teacher
from potstill.ledger import Ledger
from potstill.prompts import load_prompts
from potstill.recipe import load_recipe
from potstill.records import Completion

from helpers import QUICKSTART, plan, tiny_overrides


class Counting:
    """The real local teacher, counting what is sent; optionally dying after some batches."""

    def __init__(self, teacher, die_after: int | None = None):
        self.teacher, self.die_after, self.sent, self.batches = teacher, die_after, [], 0

    def describe(self):
        return self.teacher.describe()

    def complete(self, requests, params):
        if self.die_after is not None and self.batches >= self.die_after:
            raise KeyboardInterrupt("killed")
        self.batches += 1
        self.sent += [r.request_hash for r in requests]
        return self.teacher.complete(requests, params)


@pytest.fixture(scope="module")
def teacher():
    return make_teacher(load_recipe(QUICKSTART / "recipe.yaml"))


def recipe_in(tmp_path, n=40):
    return load_recipe(QUICKSTART / "recipe.yaml", tiny_overrides(tmp_path / "run", n) + ["generation.batch_size=16"])


def test_round_trip_keeps_text_ids_logprobs_and_provenance(tmp_path, teacher):
    recipe = recipe_in(tmp_path, 20)
    counts = generate(recipe, Counting(teacher))
    assert counts["sent"] == counts["done"] == 20 and counts["failed"] == 0
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        examples = list(ledger.examples())
        (desc,) = ledger.teachers().values()
        assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert ledger.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        session = ledger.db.execute("SELECT recipe_sha256, versions FROM sessions").fetchone()
        params = json.loads(ledger.db.execute("SELECT params FROM requests LIMIT 1").fetchone()[0])
        bytes_per_token = ledger.bytes_per_token()
    assert desc["id"] == "potstill/quickstart-teacher" and len(desc["weights_sha256"]) == 64
    assert desc["tokenizer_sha256"] and desc["chat_template_sha256"] and desc["terms_family"] == "apache-2.0"
    assert session[0] == recipe.sha256() and json.loads(session[1])["potstill"]
    assert params == {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 20, "seed": 0}
    assert bytes_per_token == 4 + 20 * (4 + 2)  # int32 token id + k int32 ids + k float16 logprobs
    tok = teacher.tokenizer
    for ex in examples:
        assert ex.topk_ids.shape == ex.topk_logprobs.shape == (len(ex.token_ids), 20)
        assert tok.decode(ex.token_ids, skip_special_tokens=True) == ex.text
        # read as stored, no float32 copy per row (bench/ledger_memory.py: 212 -> 140 MiB); batches widen
        assert ex.topk_logprobs.dtype == np.float16 and not ex.topk_logprobs.flags.writeable
        assert (np.diff(ex.topk_logprobs, axis=1) <= 0).all()  # descending
        assert np.exp(ex.topk_logprobs).sum(1).max() <= 1.0 + 1e-2
        assert ex.meta["skill"] and ex.meta["id"].startswith("train-")


def test_rerun_sends_nothing_and_a_killed_run_resumes(tmp_path, teacher):
    recipe = recipe_in(tmp_path, 40)
    first = Counting(teacher, die_after=1)
    with pytest.raises(KeyboardInterrupt):
        generate(recipe, first)
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        assert ledger.counts() == {"pending": 24, "done": 16, "failed": 0}  # the batch before the kill is kept
    second = Counting(teacher)
    counts = generate(recipe, second)
    assert counts["done"] == 40 and len(second.sent) == 24
    assert not set(first.sent) & set(second.sent)  # nothing done was sent again
    third = Counting(teacher)
    assert generate(recipe, third)["sent"] == 0 and third.sent == []
    # a new sampling parameter is a new request: the old answers stay, new ones are asked for
    hot = load_recipe(QUICKSTART / "recipe.yaml", tiny_overrides(tmp_path / "run", 40) + ["generation.temperature=2.0"])
    assert generate(hot, Counting(teacher))["sent"] == 40


def test_non_finite_logprobs_are_flagged_not_stored(tmp_path, teacher):
    recipe = recipe_in(tmp_path, 2)
    with Ledger(tmp_path / "l.sqlite") as ledger:
        key = ledger.register_teacher(teacher.describe())
        requests = plan(ledger, key, load_prompts(recipe.prompts.path, 2), {"seed": 0})
        session = ledger.start_session(None)
        bad = Completion(requests[0].request_hash, "x", [5], np.array([[5]]), np.array([[np.nan]]), "stop", 3, 0, 0.1)
        good = Completion(requests[1].request_hash, "y", [6], np.array([[6]]), np.array([[-0.1]]), "stop", 3, 0, 0.1)
        assert ledger.record(session, [bad, good]) == 1
        assert ledger.counts() == {"pending": 0, "done": 1, "failed": 1}
        error = ledger.db.execute("SELECT error FROM requests WHERE status='failed'").fetchone()[0]
        assert "non-finite" in error
        # a failed request is asked for again on the next plan
        again = plan(ledger, key, load_prompts(recipe.prompts.path, 2), {"seed": 0})
        assert [r.request_hash for r in again] == [requests[0].request_hash]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "add 1 2"}\n{"prompt": "add 1\n', "p.jsonl:2: not valid JSON"),
    ('{"prompt": "add 1 2"}\n[1, 2]\n', "p.jsonl:2: each line must be a JSON object"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}\n', "p.jsonl:1: \"messages\" must be"),
    ('{"text": "hi"}\n', "p.jsonl:1: needs a non-empty string \"prompt\""),
    ('\n\n', "p.jsonl: no prompts"),
])
def test_bad_prompt_files_name_the_line_and_write_nothing(tmp_path, teacher, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    recipe = load_recipe(QUICKSTART / "recipe.yaml", [f"output_dir={tmp_path / 'run'}", f"prompts.path={tmp_path / 'p.jsonl'}"])
    with pytest.raises(PotstillError, match=message):
        generate(recipe, Counting(teacher))
    assert not (tmp_path / "run" / "ledger.sqlite").exists()


def test_overlong_line_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "' + b"a" * (2 << 20) + b'"}\n')
    with pytest.raises(PotstillError, match="p.jsonl:1: line longer than"):
        load_prompts(path)


def test_a_file_that_is_not_a_ledger(tmp_path):
    (tmp_path / "ledger.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(PotstillError, match="not a usable potstill ledger"):
        Ledger(tmp_path / "ledger.sqlite")


def test_a_ledger_from_before_session_endings_is_upgraded_in_place(tmp_path):
    """Sessions gained ended_at and stopped (why a run stopped early): a ledger written before
    them gets both, null, when opened, and keeps every session it had."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the sessions table as ledgers had it before
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '2');
            CREATE TABLE sessions (session_id INTEGER PRIMARY KEY, started_at TEXT NOT NULL, recipe_sha256 TEXT,
                                   versions TEXT NOT NULL);
            INSERT INTO sessions VALUES (1, '2025-01-01T00:00:00.000+00:00', 'ab', '{}');""")
    db.close()
    with Ledger(path) as ledger:
        assert ledger.sessions() == [{"session_id": 1, "started_at": "2025-01-01T00:00:00.000+00:00",
                                      "ended_at": None, "stopped": None}]
        session = ledger.start_session("cd")
        ledger.end_session(session, "budget reached: teacher.budget.max_requests=3 (spent 3 sends)")
    with Ledger(path) as ledger:  # opened again: nothing added twice, nothing lost
        old, new = ledger.sessions()
        assert old["ended_at"] is None and new["ended_at"] and new["stopped"].startswith("budget reached")

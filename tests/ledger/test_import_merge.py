"""Importing completions someone already has, and merging ledgers (shards) into one.

Invariants checked: an import is idempotent and its request hashes are what `imported_requests`
computes without a ledger; top-k lists survive the round trip (up to float16); a bad row stops the
import naming file:line and field, with nothing written; shards merged equal the single ledger
holding everything (same content hash), without duplicates, and merging again adds nothing.
"""

import json
import sqlite3

import numpy as np
import pytest

from potstill.errors import PotstillError
from potstill.teachers.imported import LOGPROBS_DROPPED, import_file, imported_requests
from potstill.ledger import Attempt, Ledger, requests_for, teacher_key
from potstill.ledger.merge import merge_ledgers
from potstill.prompts import Prompt
from potstill.records import Completion

from helpers import done_hashes, plan


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def stored_requests(ledger, key):
    return {r[0] for r in ledger.db.execute("SELECT request_hash FROM requests WHERE teacher_key=?", (key,))}


def topk_row(rng, T, k, vocab=50):
    """A teacher's top-k at T positions: (T,) chosen ids, (T, k) ids and logprobs, descending."""
    logits = rng.normal(size=(T, vocab)) * 3
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-lp, axis=1)[:, :k]
    return ids[:, 0].copy(), ids, np.take_along_axis(lp, ids, 1)


def chat_completion(contents, model="gpt-4o-mini-2024-07-18", finish="stop", logprobs=None, refusal=None):
    choices = [{"index": i, "message": {"role": "assistant", "content": c, "refusal": refusal if c is None else None},
                "logprobs": logprobs, "finish_reason": finish} for i, c in enumerate(contents)]
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model, "choices": choices,
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}


# -- import -----------------------------------------------------------------------------------


def test_openai_finetuning_lines_import_once_and_hash_like_imported_requests(tmp_path, monkeypatch):
    import potstill.teachers.imported as importers

    monkeypatch.setattr(importers, "CHUNK_ROWS", 2)  # repeated messages across transactions
    user = {"role": "user", "content": "add 1 2"}
    path = write_jsonl(tmp_path / "ft.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, user, {"role": "assistant", "content": "3"}]},
        {"messages": [user, {"role": "assistant", "content": "3"}], "id": "a"},
        {"messages": [user, {"role": "assistant", "content": [{"type": "text", "text": "thr"}, {"type": "text", "text": "ee"}]}]},
        {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                      {"role": "assistant", "content": "a cat"}]},
    ])
    desc, hashes = imported_requests(path, teacher_id="gpt-ft", terms_family="openai-terms")
    assert desc["backend"] == "imported" and desc["format"] == "openai_chat" and desc["source"] == "ft.jsonl"
    assert desc["id"] == "gpt-ft" and len(desc["source_sha256"]) == 64 and desc["terms_family"] == "openai-terms"
    assert "logprobs" not in desc
    assert len(hashes) == len(set(hashes)) == 4  # the image line has no prompt the ledger can hold
    with Ledger(tmp_path / "l.sqlite") as ledger:
        first = import_file(ledger, path, teacher_id="gpt-ft", terms_family="openai-terms")
        assert {k: first[k] for k in ("read", "new", "already", "skipped")} == {"read": 5, "new": 3, "already": 0,
                                                                                "skipped": 2}
        assert set(first["skipped_reasons"]) == {"tool calls are not supported", "non-text content (image_url)"}
        assert first["skipped_reasons"]["tool calls are not supported"]["first"] == f"{path}:4"
        again = import_file(ledger, path, format="openai_chat", teacher_id="gpt-ft", terms_family="openai-terms")
        assert {k: again[k] for k in ("read", "new", "already", "skipped")} == {"read": 5, "new": 0, "already": 3,
                                                                                "skipped": 2}
        assert ledger.teachers() == {first["teacher_key"]: desc}
        assert stored_requests(ledger, first["teacher_key"]) == set(hashes)
        assert ledger.counts() == {"pending": 0, "done": 3, "failed": 1}
        assert list(ledger.failures().values()) == [f"{path}:4: tool calls are not supported"]
        examples = {e.request_hash: e for e in ledger.examples(hashes)}
    assert [examples[h].text for h in hashes if h in examples] == ["3", "3", "three"]
    # the same messages twice are two samples of one prompt (sample index 0, 1)
    assert examples[hashes[1]].messages == examples[hashes[2]].messages == [user]
    assert examples[hashes[1]].meta == {"id": "a"} and examples[hashes[0]].token_ids is None


def test_openai_request_response_and_batch_lines(tmp_path):
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "capital of France?"}]
    paris = list(b"Paris")  # both choices carry these logprobs: they spell the first choice's text, not the second's
    logprobs = {"content": [{"token": "Paris", "logprob": -0.01, "bytes": paris,
                             "top_logprobs": [{"token": "Paris", "logprob": -0.01, "bytes": paris}]}], "refusal": None}
    batch_ok = {"status_code": 200, "request_id": "r1", "body": chat_completion(["4"])}
    batch_429 = {"status_code": 429, "request_id": "r2", "body": {"error": {"message": "rate limited"}}}
    path = write_jsonl(tmp_path / "stored.jsonl", [
        {"request": {"model": "gpt-4o-mini", "messages": msgs, "logprobs": True, "top_logprobs": 1,
                     "metadata": {"task": "geo"}},
         "response": chat_completion(["Paris", "Paris."], logprobs=logprobs)},
        {"id": "batch_req_1", "custom_id": "q-2", "messages": [{"role": "user", "content": "2+2"}], "response": batch_ok,
         "error": None},
        {"custom_id": "q-3", "request": {"custom_id": "q-3", "method": "POST", "url": "/v1/chat/completions",
                                         "body": {"messages": [{"role": "user", "content": "3+3"}]}},
         "response": batch_429, "error": None},
        {"messages": [{"role": "user", "content": "how to pick a lock"}], "response": chat_completion([None], refusal="no")},
        {"messages": [{"role": "user", "content": "something"}], "response": chat_completion(["..."], finish="content_filter")},
    ])
    with Ledger(tmp_path / "l.sqlite") as ledger:
        counts = import_file(ledger, path)
        desc, hashes = imported_requests(path)
        assert counts["teacher_key"] in ledger.teachers() and ledger.teachers()[counts["teacher_key"]] == desc
        examples = list(ledger.examples(hashes))
        failures = ledger.failures()
        completion_tokens = dict(ledger.db.execute("SELECT text, completion_tokens FROM completions"))
    assert "logprobs" not in desc and desc["models"] == ["gpt-4o-mini-2024-07-18"]  # kept, as bytes
    assert desc["format"] == "openai_chat"
    assert {k: counts[k] for k in ("read", "new", "already", "skipped")} == {"read": 6, "new": 2, "already": 0,
                                                                             "skipped": 4}
    assert sorted(e.text for e in examples) == ["4", "Paris"]  # two choices: two samples of one prompt
    [paris] = [e for e in examples if e.text.startswith("Paris")]
    assert paris.messages[0] == {"role": "system", "content": "be brief"}
    assert paris.meta["metadata"] == {"task": "geo"} and paris.meta["request"]["model"] == "gpt-4o-mini"
    assert all(e.token_ids is None and e.topk_ids is None for e in examples)
    # the logprobs as the HTTP teacher keeps them: raw bytes, the chosen token's logprob, k alternatives
    assert paris.token_bytes.tolist() == [b"Paris"] and paris.topk_bytes.tolist() == [[b"Paris"]]
    assert paris.token_logprobs.tolist() == pytest.approx([-0.01], abs=1e-4) and paris.topk_logprobs.shape == (1, 1)
    assert completion_tokens == {"Paris": 1, "4": 4}  # counted from logprobs, else from usage
    reasons = sorted(r.split(": ", 1)[1] for r in failures.values())
    assert reasons[:3] == ["HTTP 429: rate limited", "refusal", "response.choices[1].logprobs: position 0: the "
                           "tokens' bytes differ from the text's UTF-8 at byte 5 (5 bytes of tokens, 6 of text)"]
    assert reasons[3] == "unknown finish_reason 'content_filter'"


def test_openai_logprobs_without_alternatives_are_dropped_and_the_description_says_so(tmp_path):
    logprobs = {"content": [{"token": "4", "logprob": -0.1, "bytes": [52], "top_logprobs": []}]}
    path = write_jsonl(tmp_path / "lp.jsonl", [{"messages": [{"role": "user", "content": "2+2"}],
                                                "response": chat_completion(["4"], logprobs=logprobs)}])
    with Ledger(tmp_path / "l.sqlite") as ledger:
        assert import_file(ledger, path)["new"] == 1
        [example] = ledger.examples()
    assert imported_requests(path)[0]["logprobs"] == LOGPROBS_DROPPED
    assert example.text == "4" and example.token_bytes is None and example.topk_logprobs is None


def test_batch_output_without_messages_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "out.jsonl", [{"id": "batch_req_1", "custom_id": "q-1", "error": None, "response": {
        "status_code": 200, "request_id": "r", "body": chat_completion(["4"])}}])
    with pytest.raises(PotstillError, match=r"out.jsonl:1: no request messages .* custom_id"):
        imported_requests(path)


def generic_rows(n=6, k=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids, topk_ids, topk_lps = topk_row(rng, 3 + i, k)
        row = {"prompt": f"add {i} {i + 1}", "response": f"{2 * i + 1}", "token_ids": ids.tolist(),
               "topk_ids": topk_ids.tolist(), "topk_logprobs": topk_lps.tolist(), "id": f"p{i}", "skill": "add"}
        if i == 1:
            row["finish_reason"] = "length"
        rows.append(row)
    rows.append({"messages": [{"role": "user", "content": "no logits here"}], "response": "ok", "id": "plain"})
    return rows


def check_topk_round_trip(examples, rows):
    by_text = {e.text: e for e in examples}
    assert len(by_text) == len(rows)
    for row in rows:
        e = by_text[row["response"]]
        assert e.meta["id"] == row["id"] and e.finish_reason == row.get("finish_reason", "stop")
        if "token_ids" not in row:
            assert e.token_ids is None and e.topk_ids is None
            continue
        np.testing.assert_array_equal(e.token_ids, row["token_ids"])
        np.testing.assert_array_equal(e.topk_ids, row["topk_ids"])
        # stored as float16: equal to the input rounded once
        np.testing.assert_array_equal(e.topk_logprobs, np.float16(row["topk_logprobs"]).astype(np.float32))
        assert (np.diff(e.topk_logprobs, axis=1) <= 0).all()


def test_generic_jsonl_top_k_round_trip(tmp_path):
    rows = generic_rows()
    shuffled = json.loads(json.dumps(rows[0]))  # the same completion, top-k given ascending: stored descending
    shuffled.update(prompt="again", response="again", id="asc", topk_ids=[r[::-1] for r in rows[0]["topk_ids"]],
                    topk_logprobs=[r[::-1] for r in rows[0]["topk_logprobs"]])
    path = write_jsonl(tmp_path / "kd.jsonl", [*rows, shuffled])
    with Ledger(tmp_path / "l.sqlite") as ledger:
        counts = import_file(ledger, path)
        desc, hashes = imported_requests(path)
        assert counts["new"] == len(rows) + 1 and counts["skipped"] == 0 and desc["format"] == "jsonl"
        assert stored_requests(ledger, counts["teacher_key"]) == set(hashes) == done_hashes(ledger)
        examples = list(ledger.examples(hashes))
    check_topk_round_trip([e for e in examples if e.text != "again"], rows)
    again = next(e for e in examples if e.text == "again")
    np.testing.assert_array_equal(again.topk_ids, rows[0]["topk_ids"])


def test_parquet_top_k_round_trip_in_record_batches(tmp_path, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    import potstill.teachers.imported as importers

    monkeypatch.setattr(importers, "PARQUET_BATCH_ROWS", 2)  # several record batches
    monkeypatch.setattr(importers, "CHUNK_ROWS", 3)  # several transactions
    rows = generic_rows(9)
    keys = {k: None for row in rows for k in row}  # every row has every column; null = absent
    table = pa.Table.from_pylist([{**keys, **row} for row in rows])
    pq.write_table(table, tmp_path / "kd.parquet")
    pq.write_table(table, tmp_path / "kd.data", row_group_size=4)  # no extension: found by its magic bytes
    with Ledger(tmp_path / "l.sqlite") as ledger:
        counts = import_file(ledger, tmp_path / "kd.parquet")
        desc, hashes = imported_requests(tmp_path / "kd.parquet", format="parquet")
        assert counts["new"] == len(rows) and desc["format"] == "parquet" and desc["source"] == "kd.parquet"
        assert stored_requests(ledger, counts["teacher_key"]) == set(hashes)
        check_topk_round_trip(list(ledger.examples(hashes)), rows)
        assert import_file(ledger, tmp_path / "kd.parquet")["already"] == len(rows)
    assert imported_requests(tmp_path / "kd.data")[0]["format"] == "parquet"


def test_invalid_completions_are_skipped_with_a_reason_never_stored(tmp_path):
    rows = generic_rows(2)
    rows[0]["topk_logprobs"][1][0] = float("nan")
    rows[1]["topk_logprobs"][0][0] = 0.5  # a positive logprob: logits, not logprobs
    path = write_jsonl(tmp_path / "kd.jsonl", rows)
    with Ledger(tmp_path / "l.sqlite") as ledger:
        counts = import_file(ledger, path)
        assert counts["new"] == 1 and counts["skipped"] == 2
        assert list(counts["skipped_reasons"]) == ["non-finite or positive logprob in the teacher's top-k"]
        assert [e.text for e in ledger.examples()] == ["ok"]
        assert ledger.counts()["failed"] == 2


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": "b"'], r"kd.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "c"}'], r"kd.jsonl:2: no \"response\""),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "c", "response": 5}'], r"kd.jsonl:2: \"response\" must be a string"),
    (['{"prompt": "a", "response": "b", "token_ids": ["x"]}'], r"kd.jsonl:1: \"token_ids\" must be a list of integers"),
    (['{"prompt": "a", "response": "b", "token_ids": [1, 2], "topk_ids": [[1], [2, 3]], "topk_logprobs": [[0], [0, 0]]}'],
     r"kd.jsonl:1: \"topk_ids\" must be a list of equal-length lists"),
    (['{"prompt": "a", "response": "b", "token_ids": [1, 2], "topk_ids": [[1], [2]], "topk_logprobs": [[-1]]}'],
     r"kd.jsonl:1: \"topk_ids\" \(2, 1\) and \"topk_logprobs\" \(1, 1\) must both be \(T, k\) with T = 2"),
    (['{"prompt": "a", "response": "b", "topk_ids": [[1]], "topk_logprobs": [[-1]]}'], r"kd.jsonl:1: .* with \"token_ids\""),
    (['{"prompt": "", "response": "b"}'], r"kd.jsonl:1: needs a non-empty string \"prompt\""),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
      '{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}'],
     r"kd.jsonl:2: messages\[0\].role 'robot'"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
      '{"messages": [{"role": "user", "content": "a"}]}'], r"kd.jsonl:2: the last of \"messages\" must be the assistant"),
    (['{"request": {"messages": [{"role": "user", "content": "a"}]}, "response": {"choices": []}}'],
     r"kd.jsonl:1: \"response\" must be a chat.completion object"),
    (['{"text": "a"}'], r"kd.jsonl:1: cannot tell the format"),
    (['', ''], r"kd.jsonl: no rows to import"),
])
def test_bad_rows_name_file_line_and_field_and_write_nothing(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "kd.jsonl", lines)
    with Ledger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(PotstillError, match=message):
            import_file(ledger, path)
        assert ledger.teachers() == {} and sum(ledger.counts().values()) == 0
    with pytest.raises(PotstillError, match=message):
        imported_requests(path)


def test_bad_parquet_names_the_column_or_row(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "text": "b"}]), tmp_path / "a.parquet")
    with pytest.raises(PotstillError, match=r"a.parquet: needs a \"response\" column"):
        imported_requests(tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}]),
                   tmp_path / "b.parquet")
    with pytest.raises(PotstillError, match=r"b.parquet row 2: no \"response\""):
        imported_requests(tmp_path / "b.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "response": "b", "token_ids": [1, 2], "topk_ids": [[1], [2]],
                                          "topk_logprobs": [[-1.0], [-1.0]]},
                                         {"prompt": "c", "response": "d", "token_ids": [1, 2], "topk_ids": [[1], [2, 3]],
                                          "topk_logprobs": [[-1.0], [-1.0, -2.0]]}]), tmp_path / "ragged.parquet")
    with pytest.raises(PotstillError, match=r"ragged.parquet row 2: \"topk_ids\" must be a list of equal-length lists"):
        imported_requests(tmp_path / "ragged.parquet")
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(PotstillError, match=r"c.parquet: not a readable Parquet file"):
        imported_requests(tmp_path / "c.parquet")


# -- merge ------------------------------------------------------------------------------------

TEACHER = {"id": "fake-teacher", "backend": "local", "weights_sha256": "0" * 64, "terms_family": "apache-2.0"}
PARAMS = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 4, "seed": 0}
PROMPTS = [Prompt((("user", f"add {i} {i + 1}"),), {"id": f"p{i}"}, f"p.jsonl:{i + 1}") for i in range(24)]
SAMPLES = 2


def fake_completion(h: str, text: str | None = None) -> Completion:
    rng = np.random.default_rng(int(h[:8], 16))
    ids, topk_ids, topk_lps = topk_row(rng, 2 + int(h[8], 16) % 5, 4)
    return Completion(h, text or f"answer {h[:6]}", ids.tolist(), topk_ids.astype(np.int32),
                      topk_lps.astype(np.float32), "stop", 4, 0, 0.01)


def fill(path, shard=None, fail=(), text=None, batch=None) -> list[str]:
    """A ledger holding the (shard's) requests of PROMPTS, each done with a fake completion, except
    ``fail`` (marked failed); one attempt per request and one batch. Returns the done hashes."""
    with Ledger(path) as ledger:
        key = ledger.register_teacher(TEACHER)
        todo = [r.request_hash for r in plan(ledger, key, PROMPTS, PARAMS, SAMPLES, shard)]
        session = ledger.start_session("recipe-sha")
        done = [h for h in todo if h not in fail]
        attempts = [Attempt(h, "http://teacher", f"2025-01-01T00:00:{i:02d}", 0.1, "ok", 200, None, 4, 3, 0.001)
                    for i, h in enumerate(todo)]
        ledger.record(session, [fake_completion(h, text) for h in done], {h: "HTTP 500" for h in todo if h in fail},
                      attempts)
        ledger.add_batch(f"batch-{batch or path.stem}", key, todo)
    return done


def test_shards_merge_into_the_ledger_holding_everything(tmp_path):
    key = teacher_key(TEACHER)
    every = [h for h, _, _ in requests_for(key, PROMPTS, PARAMS, SAMPLES)]
    fail = {every[5]}
    fill(tmp_path / "single.sqlite", fail=fail)
    n = 3
    shards = [tmp_path / f"ledger-shard-{i}-of-{n}.sqlite" for i in range(n)]
    shard_done = [fill(p, (i, n), fail=fail) for i, p in enumerate(shards)]
    for i, done in enumerate(shard_done):  # a partition of the requests
        assert set(done) == {h for h, _, _ in requests_for(key, PROMPTS, PARAMS, SAMPLES, (i, n))} - fail
    assert sum(len(d) for d in shard_done) == len(every) - 1 and all(shard_done)

    counts = merge_ledgers(tmp_path / "out.sqlite", shards)
    assert counts == {"inputs": 3, "requests": len(every), "completions": len(every) - 1, "duplicates": 0,
                      "conflicts": 0, "sessions": 3, "attempts": len(every), "batches": 3}
    with Ledger(tmp_path / "out.sqlite") as out, Ledger(tmp_path / "single.sqlite") as single:
        assert out.content_sha256(every) == single.content_sha256(every) == single.content_sha256()
        assert out.counts() == single.counts() == {"pending": 0, "done": len(every) - 1, "failed": 1}
        assert out.failures() == single.failures()
        assert out.spend(key) == pytest.approx(single.spend(key))
        assert out.teachers() == single.teachers()
        db = out.db
        assert db.execute("SELECT count(*), count(DISTINCT request_hash) FROM completions").fetchone() == (
            len(every) - 1, len(every) - 1)
        assert db.execute("SELECT count(*) FROM prompts").fetchone()[0] == len(PROMPTS)
        assert db.execute("SELECT count(*) FROM batch_requests").fetchone()[0] == len(every)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        # every completion and attempt names a session of out (remapped from the shard's)
        assert db.execute("SELECT count(*) FROM completions WHERE session_id NOT IN (SELECT session_id FROM sessions)"
                          ).fetchone()[0] == 0
        before = out.content_sha256()

    again = merge_ledgers(tmp_path / "out.sqlite", [*shards, shards[0]])
    assert again == {"inputs": 4, "requests": 0, "completions": 0, "duplicates": len(every) - 1 + len(shard_done[0]),
                     "conflicts": 0, "sessions": 0, "attempts": 0, "batches": 0}
    # and a shard merged into the single ledger (which holds it already) adds nothing either
    assert merge_ledgers(tmp_path / "single.sqlite", shards[:1])["completions"] == 0
    with Ledger(tmp_path / "out.sqlite") as out:
        assert out.content_sha256() == before
        assert out.db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 3


def test_merge_keeps_the_first_completion_and_a_done_request_wins(tmp_path):
    every = [h for h, _, _ in requests_for(teacher_key(TEACHER), PROMPTS, PARAMS, SAMPLES)]
    fill(tmp_path / "failed.sqlite", fail=set(every[:4]))
    fill(tmp_path / "a.sqlite")
    fill(tmp_path / "b.sqlite", text="a different answer", batch="a")

    counts = merge_ledgers(tmp_path / "out.sqlite", [tmp_path / "failed.sqlite", tmp_path / "a.sqlite"])
    assert counts["completions"] == len(every) and counts["duplicates"] == len(every) - 4
    with Ledger(tmp_path / "b.sqlite") as b:
        b.update_batch("batch-a", status="collected")  # the same job, collected in b's copy
    counts = merge_ledgers(tmp_path / "out.sqlite", [tmp_path / "b.sqlite"])
    assert counts["conflicts"] == counts["duplicates"] == len(every) and counts["completions"] == 0
    with Ledger(tmp_path / "out.sqlite") as out, Ledger(tmp_path / "a.sqlite") as a:
        assert out.counts() == {"pending": 0, "done": len(every), "failed": 0}
        assert out.content_sha256() == a.content_sha256()  # the first completions kept
        assert dict(out.db.execute("SELECT local_id, status FROM batches")) == {
            "batch-failed": "prepared", "batch-a": "collected"}


def test_merge_refuses_what_is_not_a_ledger_of_this_schema(tmp_path):
    fill(tmp_path / "good.sqlite")
    fill(tmp_path / "old.sqlite")
    with sqlite3.connect(tmp_path / "old.sqlite") as db:
        db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    (tmp_path / "text.sqlite").write_text("hello")
    with sqlite3.connect(tmp_path / "other.sqlite") as db:
        db.execute("CREATE TABLE t (x)")
    out = tmp_path / "out.sqlite"
    for bad, message in [("old.sqlite", r"old.sqlite: ledger schema 3; this potstill merges schema 2"),
                         ("text.sqlite", r"text.sqlite: not a potstill ledger"),
                         ("other.sqlite", r"other.sqlite: not a potstill ledger \(no attempts, batch_requests"),
                         ("missing.sqlite", r"input ledger .*missing.sqlite not found")]:
        with pytest.raises(PotstillError, match=message):
            merge_ledgers(out, [tmp_path / "good.sqlite", tmp_path / bad])
    with Ledger(out) as ledger:
        assert sum(ledger.counts().values()) == 0  # refused before anything was merged
    with pytest.raises(PotstillError, match=r"other.sqlite: not a potstill ledger"):
        merge_ledgers(tmp_path / "other.sqlite", [tmp_path / "good.sqlite"])
    with pytest.raises(PotstillError, match=r"is the output ledger"):
        merge_ledgers(out, [out])


def test_a_version_1_ledger_is_upgraded_and_merged(tmp_path):
    fill(tmp_path / "new.sqlite")
    fill(tmp_path / "v1.sqlite")
    with sqlite3.connect(tmp_path / "v1.sqlite") as db:  # what potstill 0.1 wrote: no attempts or batches
        db.executescript("DROP TABLE attempts; DROP TABLE batch_requests; DROP TABLE batches; "
                         "UPDATE meta SET value='1' WHERE key='schema_version'")
    import shutil

    shutil.copy(tmp_path / "v1.sqlite", tmp_path / "v1-input.sqlite")
    before = (tmp_path / "v1-input.sqlite").read_bytes()
    merge_ledgers(tmp_path / "out.sqlite", [tmp_path / "v1-input.sqlite"])  # as an input: read, never written
    assert (tmp_path / "v1-input.sqlite").read_bytes() == before
    merge_ledgers(tmp_path / "v1.sqlite", [tmp_path / "new.sqlite"])  # as the output: upgraded
    with Ledger(tmp_path / "out.sqlite") as ledger:
        assert ledger.counts()["done"] > 0


def test_a_recipe_with_an_imported_teacher_trains_a_student(tmp_path):
    """teacher.backend=imported: `generate` imports the file, `train` reads exactly its rows, and the
    student's card names the imported teacher."""
    from helpers import QUICKSTART, TEACHER, tiny_overrides
    from potstill.generate import generate, recipe_requests
    from potstill.recipe import load_recipe
    from potstill.train import train

    rows = [json.loads(line) for line in (QUICKSTART / "prompts" / "train.jsonl").open()][:40]
    data = write_jsonl(tmp_path / "answers.jsonl", [{"prompt": r["prompt"], "response": r["answer"], "skill": r["skill"]}
                                                    for r in rows] + ['{"prompt": "x", "response": "y", "finish_reason": "tool_calls"}'])
    recipe = load_recipe(QUICKSTART / "recipe.yaml", [
        *tiny_overrides(tmp_path / "run"), "prompts=null", "teacher.backend=imported", f"teacher.data={data}",
        "teacher.id=someone-else", "teacher.terms_family=cc-by-4.0", f"student.tokenizer={TEACHER}",
        "teacher.terms_declared=cc-by-4.0 permits this use",
        "train.objective=sft", "baseline=null"])
    counts = generate(recipe)
    assert counts["imported"]["new"] == 40 and counts["imported"]["skipped"] == 1
    assert generate(recipe)["imported"]["new"] == 0
    desc, hashes = recipe_requests(recipe)
    assert desc["backend"] == "imported" and len(hashes) == 41
    student = train(recipe, recipe.train)
    card = (student / "README.md").read_text()
    assert "someone-else" in card and "cc-by-4.0" in card
    info = json.loads((student / "potstill.json").read_text())
    assert info["examples"] == 40  # the skipped tool-call row is not trained on


def test_one_top_k_width_per_file(tmp_path):
    rows = [{"prompt": "a", "response": "x", "token_ids": [5], "topk_ids": [[5]], "topk_logprobs": [[-0.1]]},
            {"prompt": "b", "response": "y", "token_ids": [3], "topk_ids": [[3, 1, 2]],
             "topk_logprobs": [[-0.1, -2.0, -3.0]]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with Ledger(tmp_path / "l.sqlite") as ledger, pytest.raises(PotstillError, match=r"mixed.jsonl:2: .* one k per file"):
        import_file(ledger, path)


def test_a_prompt_repeated_many_times_is_planned_once_per_row(tmp_path, monkeypatch):
    """Each row plans its own request: re-planning a prompt's earlier samples made imports quadratic."""
    planned = []
    real = Ledger.add_requests
    monkeypatch.setattr(Ledger, "add_requests", lambda self, key, items, params: planned.append(len(items)) or
                        real(self, key, items, params))
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Write a story.", "response": f"story {i}"}
                                                 for i in range(300)])
    with Ledger(tmp_path / "l.sqlite") as ledger:
        assert import_file(ledger, path)["new"] == 300
    assert sum(planned) == 300


def test_merge_carries_what_an_input_learnt_of_a_batch(tmp_path):
    fill(tmp_path / "a.sqlite")
    with Ledger(tmp_path / "a.sqlite") as ledger:
        key = next(iter(ledger.teachers()))
        ledger.add_batch("local-1", key, [])
    merge_ledgers(tmp_path / "out.sqlite", [tmp_path / "a.sqlite"])  # out: the batch as prepared
    with Ledger(tmp_path / "a.sqlite") as ledger:  # later, the shard created it
        ledger.update_batch("local-1", input_file_id="file-9", batch_id="batch_9", status="in_progress")
    merge_ledgers(tmp_path / "out.sqlite", [tmp_path / "a.sqlite"])
    with Ledger(tmp_path / "out.sqlite") as ledger:
        (row,) = [b for b in ledger.open_batches(key) if b["local_id"] == "local-1"]
    assert (row["batch_id"], row["input_file_id"], row["status"]) == ("batch_9", "file-9", "in_progress")


def test_import_refuses_ids_outside_the_teachers_tokenizer(tmp_path, capsys):
    """With the tokenizer known (--tokenizer, or teacher.tokenizer in a recipe) an id past it stops
    the import naming file:line, before anything is written; ids inside it import as before."""
    from helpers import TEACHER
    from potstill.cli import main

    rows = generic_rows(n=3)  # ids drawn from 50, the quickstart tokenizer has 41
    for row in rows[:3]:
        row["token_ids"] = [i % 41 for i in row["token_ids"]]
        row["topk_ids"] = [[i % 41 for i in r] for r in row["topk_ids"]]
    rows[2]["topk_ids"][1][0] = 45
    path = write_jsonl(tmp_path / "kd.jsonl", rows)
    ledger = tmp_path / "l.sqlite"
    assert main(["import", str(path), str(ledger), "--tokenizer", str(TEACHER)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: \"topk_ids\" holds id 45, outside the teacher tokenizer's 41 ids" in err
    assert len(err.strip().splitlines()) == 1
    with Ledger(ledger) as l:
        assert l.counts() == {"pending": 0, "done": 0, "failed": 0}
    assert main(["import", str(path), str(ledger)]) == 0  # without a tokenizer nothing can be checked


def test_a_failed_batch_line_gives_the_same_reason_imported_or_collected(tmp_path):
    """An error line and a non-200 line of a Batch output file: the importer records the reason the
    Batch backend gives when it collects the same lines."""
    from potstill.teachers.openai.batch import read_line

    lines = [{"custom_id": "a", "response": None, "error": {"code": "batch_expired", "message": "not run"}},
             {"custom_id": "b", "response": {"status_code": 429, "body": {"error": {"message": "slow down"}}},
              "error": None}]
    path = write_jsonl(tmp_path / "out.jsonl", [{**line, "messages": [{"role": "user", "content": f"add {i} 2"}]}
                                               for i, line in enumerate(lines)])
    with Ledger(tmp_path / "l.sqlite") as ledger:
        import_file(ledger, path, format="openai_chat")
        imported = sorted(r.split(": ", 1)[1] for r in ledger.failures().values())  # after "file:line: "
    collected = sorted(read_line(line, None, {}, None, 0.0)[1] for line in lines)
    assert collected == ["HTTP 429: slow down", "batch line error batch_expired: not run"]
    assert imported == collected


def test_an_imported_line_over_the_cap_is_refused_unread(tmp_path, monkeypatch):
    import potstill.teachers.imported

    monkeypatch.setattr(potstill.teachers.imported, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "x" * (2 << 20)}) + "\n")
    with Ledger(tmp_path / "l.sqlite") as ledger, pytest.raises(
            PotstillError, match="big.jsonl:1: line longer than 1 MiB; split the file or drop the top-k lists"):
        import_file(ledger, path, format="jsonl")

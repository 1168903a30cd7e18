"""HTTP teachers against a loopback endpoint with injected faults: the official openai client,
one retry layer, Retry-After, budgets, clean stops, the in-flight window, and SIGKILL + resume."""

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import QUICKSTART, ROOT, free_port
from mock_endpoint import VOCAB, Faults, MockEndpoint, request_shas
from potstill.teachers.openai.dispatch import retry_after
from potstill.errors import PotstillError
from potstill.generate import generate, recipe_requests, sampling_params
from potstill.ledger import Ledger
from potstill.recipe import load_recipe

CANARY = "sk-canary-0123456789abcdef"


@pytest.fixture
def mock():
    endpoints = []

    def start(latency=0.0, **faults):
        m = MockEndpoint(latency, Faults(**faults)).start_in_thread()
        endpoints.append(m)
        return m

    yield start
    for m in endpoints:
        m.stop_thread()


def http_recipe(out: Path, endpoints, n: int = 40, *extra: str):
    urls = ",".join(m.url for m in endpoints)
    return load_recipe(QUICKSTART / "recipe.yaml", [
        f"output_dir={out}", f"prompts.limit={n}", "teacher.backend=openai", "teacher.model=mock",
        f"teacher.endpoints=[{urls}]", "teacher.concurrency=8", "generation.top_logprobs=5", *extra])


def test_clean_run_stores_every_answer_once(mock, tmp_path):
    m = mock(latency=0.02)
    recipe = http_recipe(tmp_path, [m], 40, "generation.samples_per_prompt=2")
    counts = generate(recipe)
    assert counts["done"] == 80 and counts["failed"] == 0
    assert len(m.log) == 80 and len({sha for _, sha, _ in m.log}) == 80  # two samples, two distinct bodies
    assert set(request_shas(recipe)) == {sha for _, sha, _ in m.log}
    assert counts["spend"]["requests"] == 80
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        (desc,) = ledger.teachers().values()
        assert desc["backend"] == "openai" and desc["model"] == "mock" and desc["endpoint"] == m.url
        ex = next(ledger.examples())
        assert ex.text and ex.token_ids is None and ex.topk_ids is None  # token strings: bytes, no ids
        assert b"".join(ex.token_bytes) == ex.text.encode() and ex.topk_bytes.shape == (len(ex.token_bytes), 5)
    again = generate(recipe)
    assert again["sent"] == 0 and len(m.log) == 80  # done keys are never re-sent


def test_token_ids_give_topk_rows(mock, tmp_path):
    m = mock()
    recipe = http_recipe(tmp_path, [m], 8, "teacher.token_ids=true")
    generate(recipe)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        for ex in ledger.examples():
            assert ex.topk_ids.shape == (len(ex.token_ids), 5)
            assert list(ex.token_ids) == [ord(ch) % VOCAB for ch in ex.text]
            assert (ex.topk_ids[:, 0] == ex.token_ids).all()
            assert ex.token_bytes is None and ex.topk_bytes is None  # ids, as before; and the chosen logprobs
            assert ex.token_logprobs.shape == (len(ex.token_ids),) and (ex.token_logprobs == np.float16(-0.1)).all()
            assert (ex.topk_logprobs[:, :-1] >= ex.topk_logprobs[:, 1:]).all()


@pytest.mark.slow  # seconds of real retries, deadlines or processes: the full suite runs it
def test_rate_limits_are_waited_out(mock, tmp_path):
    m = mock(rate_limit=0.3, retry_after="ms:200")
    recipe = http_recipe(tmp_path, [m], 60)
    counts = generate(recipe)
    assert counts["done"] == 60
    attempts = {}
    for _, sha, _ in m.log:
        attempts[sha] = attempts.get(sha, 0) + 1
    assert max(attempts.values()) <= 6
    # every retry of a body came no sooner than Retry-After after the 429 that asked for it
    last_429 = {}
    for t, sha, what in m.log:
        if sha in last_429:
            assert t - last_429.pop(sha) >= 0.2 - 0.005
        if what == "rate_limit":
            last_429[sha] = t


@pytest.mark.slow
def test_transient_faults_cost_few_extra_attempts(mock, tmp_path):
    # 400 prompts: the expected 1.11 sends per prompt is then 4 standard errors under the bound
    # (the faults are drawn per body, and bodies carry seeds that depend on the mock's port)
    m = mock(server_error=0.04, reset=0.03, truncated=0.03)
    recipe = http_recipe(tmp_path, [m], 400)
    counts = generate(recipe)
    assert counts["done"] == 400 and counts["failed"] == 0
    assert len(m.log) <= 115 * 400 // 100


@pytest.mark.slow  # seconds of real retries, deadlines or processes: the full suite runs it
def test_malformed_bodies_are_never_stored(mock, tmp_path):
    # sticky: some bodies are bad at every attempt (so some requests fail for good), and the others
    # never, so the run is not stopped by five bad first answers in a row (test_a_broken_endpoint_...)
    m = mock(nan=0.15, invalid_json=0.1, sticky=True)
    recipe = http_recipe(tmp_path, [m], 30, "teacher.token_ids=true")
    counts = generate(recipe)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        failures = ledger.failures()
        import numpy as np

        for ex in ledger.examples():
            assert np.isfinite(ex.topk_logprobs).all()
    assert counts["done"] + counts["failed"] == 30 and counts["failed"] == len(failures) > 0
    assert all("malformed" in reason for reason in failures.values())
    attempts = {}
    for _, sha, _ in m.log:
        attempts[sha] = attempts.get(sha, 0) + 1
    assert max(attempts.values()) <= 3  # a malformed body is retried at most twice


def test_fatal_error_stops_cleanly_and_never_leaks_the_key(mock, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("CANARY_KEY", CANARY)
    m = mock(fatal={"401": 0.05})
    recipe = http_recipe(tmp_path, [m], 200, "teacher.api_key_env=CANARY_KEY")
    with pytest.raises(PotstillError, match="HTTP 401") as err:
        generate(recipe)
    assert CANARY[:8] not in str(err.value) and "provided: ***" in str(err.value)  # the masked echo too
    first = next(i for i, (_, _, what) in enumerate(m.log) if what == "401")
    assert len(m.log) - first - 1 <= 8  # at most the window was in flight after the first 401
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.counts()["pending"] > 0  # the rest waits for a rerun
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert CANARY[:8].encode() not in path.read_bytes(), path
    out, errs = capfd.readouterr()
    assert CANARY[:8] not in out + errs


def test_unset_key_variable_is_one_clear_error(mock, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    recipe = http_recipe(tmp_path, [mock()], 4, "teacher.api_key_env=NO_SUCH_KEY")
    with pytest.raises(PotstillError, match="NO_SUCH_KEY, which is not set"):
        generate(recipe)


def test_long_retry_after_stops_instead_of_hammering(mock, tmp_path):
    m = mock(rate_limit=1.0, retry_after="3600")
    recipe = http_recipe(tmp_path, [m], 20)
    with pytest.raises(PotstillError, match="asks to wait 3600 s"):
        generate(recipe)
    attempts = {}
    for _, sha, _ in m.log:
        attempts[sha] = attempts.get(sha, 0) + 1
    assert max(attempts.values()) == 1  # no immediate retries
    assert len(m.log) <= 8


def test_budget_stops_before_the_limit_and_holds_across_runs(mock, tmp_path):
    m = mock()
    recipe = http_recipe(tmp_path, [m], 50, "teacher.budget.max_requests=20")
    with pytest.raises(PotstillError, match="max_requests=20"):
        generate(recipe)
    assert len(m.log) == 20
    with pytest.raises(PotstillError, match="max_requests=20"):
        generate(recipe)  # the budget counts the ledger's sends, not this run's
    assert len(m.log) == 20
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.counts()["done"] == 20 and ledger.spend()["requests"] == 20


def test_cost_budget_uses_prices(mock, tmp_path):
    m = mock()
    # each answer costs about (prompt + completion) tokens x $1,000 / 1M = ~$0.02
    recipe = http_recipe(tmp_path, [m], 50, "teacher.prices.prompt=1000", "teacher.prices.completion=1000",
                         "teacher.budget.max_cost=0.5")
    with pytest.raises(PotstillError, match="max_cost"):
        generate(recipe)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        spend = ledger.spend()
    assert 0 < spend["cost"] <= 0.5
    assert spend["cost"] == pytest.approx((spend["prompt_tokens"] + spend["completion_tokens"]) * 1000 / 1e6)


def test_fleet_dispatch_prefers_the_least_loaded(mock, tmp_path):
    fast, slow = mock(latency=0.01), mock(latency=0.3)
    recipe = http_recipe(tmp_path, [fast, slow], 120, "teacher.concurrency=4")
    assert generate(recipe)["done"] == 120
    assert len(slow.log) > 0 and len(fast.log) > 3 * len(slow.log)
    assert fast.max_in_flight <= 8 and slow.max_in_flight <= 8


def test_window_bounds_what_is_in_flight(mock, tmp_path):
    m = mock(latency=0.05)
    generate(http_recipe(tmp_path, [m], 64, "teacher.concurrency=6"))
    assert m.max_in_flight == 6


def test_shards_partition_the_requests(mock, tmp_path):
    m = mock()
    recipe = http_recipe(tmp_path, [m], 60)
    seen = []
    for i in range(3):
        generate(recipe, shard=(i, 3))
        with Ledger(tmp_path / f"ledger-shard-{i}-of-3.sqlite") as ledger:
            seen += [ex.request_hash for ex in ledger.examples()]
    assert sorted(seen) == sorted(recipe_requests(recipe)[1]) and len(m.log) == 60


@pytest.mark.parametrize("value,expected", [("2", 2.0), ("0.5", None), ("garbage", None), ("", None), ("1e9", None),
                                            ("inf", None), ("nan", None), ("-5", None), (" 7 ", 7.0)])
def test_retry_after_parsing(value, expected):
    assert retry_after({"retry-after": value}) == expected


def test_retry_after_ms_wins_and_dates_parse():
    import email.utils

    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after({"retry-after": date}) <= 30


@pytest.mark.slow
def test_sigkill_and_resume_lose_nothing_and_resend_only_the_window(mock, tmp_path):
    """Kill the generate process at random moments; each rerun sends only what was not done."""
    m = mock(latency=0.03)
    window = 8
    n = 400
    recipe = http_recipe(tmp_path, [m], n)
    by_sha = request_shas(recipe)
    args = [sys.executable, "-m", "potstill.cli", "generate", str(QUICKSTART / "recipe.yaml"),
            f"output_dir={tmp_path}", f"prompts.limit={n}", "teacher.backend=openai", "teacher.model=mock",
            f"teacher.endpoints=[{m.url}]", f"teacher.concurrency={window}", "generation.top_logprobs=5"]
    env = {**os.environ, "POTSTILL_QUIET": "1", "PYTHONPATH": str(ROOT / "src")}
    rng = random.Random(0)
    ledger_path = tmp_path / "ledger.sqlite"

    def done() -> set[str]:
        if not ledger_path.exists():
            return set()
        with sqlite3.connect(ledger_path) as db:
            return {r[0] for r in db.execute("SELECT request_hash FROM completions")}

    kills = 0
    while kills < 3:
        before = len(m.log)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while len(m.log) == before and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.05, 0.6))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        done_at_kill = done()
        sent_before = {sha for _, sha, _ in m.log}
        mark = len(m.log)
        # the rerun: nothing done is sent again; what is re-sent was in flight (at most the window)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while len(m.log) - mark < 3 * window and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resent = [sha for _, sha, _ in m.log[mark:] if sha in sent_before]
        assert not any(by_sha[sha] in done_at_kill for sha in resent)
        assert len(set(resent)) <= window
    final = subprocess.run(args, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert done() == set(by_sha.values())
    with sqlite3.connect(ledger_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # a key is sent again only if it was not done when the process died
    assert len(m.log) - n <= window * 2 * kills


@pytest.mark.slow
def test_eval_without_teacher_weights_asks_the_endpoint_once(mock, tmp_path):
    """An API teacher (no teacher.path): eval gets its held-out answers over HTTP into
    eval-ledger.sqlite, leaves out what needs its weights, and a rerun pays for nothing."""
    from helpers import TEACHER, tiny_overrides
    from potstill.evaluate import evaluate
    from potstill.report import write_report
    from potstill.train import train

    m = mock()
    recipe = load_recipe(QUICKSTART / "recipe.yaml", [
        *tiny_overrides(tmp_path, 24, 16), "teacher.backend=openai", "teacher.model=mock", "teacher.path=null",
        f"teacher.endpoints=[{m.url}]", "generation.top_logprobs=0", "train.objective=sft",
        f"student.tokenizer={TEACHER}", "baseline=null"])
    generate(recipe)
    train(recipe, recipe.train)
    sent = len(m.log)
    report = evaluate(recipe)
    assert len(m.log) - sent == 16
    teacher, student = report["models"]["teacher"], report["models"]["student"]
    # the mock answers each prompt reversed (never right on this task)
    assert all(s["answer"] and s["prompt"][::-1].startswith(s["answer"]) for s in teacher["samples"])  # up to max tokens
    assert teacher["accuracy"] == 0.0 and teacher["agreement"] == 1.0 and teacher["parameters"] is None
    assert "kl_per_token" not in student and 0.0 <= student["agreement"] <= 1.0 and student["parameters"] > 0
    evaluate(recipe)
    assert len(m.log) - sent == 16  # answered once, kept in the eval ledger
    assert write_report(tmp_path).is_file()


def test_stop_strings_reach_the_endpoint_and_only_when_set(mock, tmp_path):
    m = mock()
    plain = http_recipe(tmp_path / "a", [m], 6)
    stopped = http_recipe(tmp_path / "b", [m], 6, "generation.stop=[' ']")
    assert "stop" not in sampling_params(plain)  # old ledgers keep their request hashes
    assert recipe_requests(plain)[1] != recipe_requests(stopped)[1]
    generate(stopped)
    with Ledger(tmp_path / "b" / "ledger.sqlite") as ledger:
        assert all(" " not in ex.text and ex.finish_reason == "stop" for ex in ledger.examples())
    local = load_recipe(QUICKSTART / "recipe.yaml", [f"output_dir={tmp_path / 'c'}", "generation.stop=[x]"])
    with pytest.raises(PotstillError, match="generation.stop is sent to HTTP teachers"):
        generate(local)


def test_a_refused_request_fails_alone_and_a_refused_run_stops(mock, tmp_path):
    m = mock(fatal={"400": 0.05})
    counts = generate(http_recipe(tmp_path / "a", [m], 100))
    assert counts["failed"] == sum(what == "400" for _, _, what in m.log) > 0  # each 400'd request fails, once
    assert counts["done"] + counts["failed"] == 100
    bad = mock(fatal={"400": 1.0})
    with pytest.raises(PotstillError, match="5 requests in a row refused"):
        generate(http_recipe(tmp_path / "b", [bad], 100))
    assert len(bad.log) <= 5 + 8  # then only what was in flight


def test_an_unreachable_endpoint_stops_the_run(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = load_recipe(QUICKSTART / "recipe.yaml", [
        f"output_dir={tmp_path}", "prompts.limit=200", "teacher.backend=openai", "teacher.model=mock",
        f"teacher.endpoints=[http://127.0.0.1:{port}/v1]", "teacher.concurrency=8"])
    with pytest.raises(PotstillError, match="unreachable"):
        generate(recipe)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.counts()["pending"] >= 190 and ledger.spend()["requests"] < 40


def test_a_failing_ledger_stops_the_run_instead_of_hanging(mock, tmp_path, monkeypatch):
    from potstill.ledger import Ledger as L

    record, calls = L.record, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database is locked")
        return record(self, *args, **kwargs)

    monkeypatch.setattr(L, "record", flaky)
    with pytest.raises(PotstillError, match="could not record answers.*database is locked"):
        generate(http_recipe(tmp_path, [mock(latency=0.01)], 60))


def test_an_unexpected_body_shape_is_malformed_not_a_hang(mock, tmp_path, monkeypatch):
    m = mock()
    monkeypatch.setattr(MockEndpoint, "completion", staticmethod(
        lambda body, nan=False, rule=None: {"choices": [{"message": {"content": "x"}, "finish_reason": "stop",
                                              "logprobs": {"content": [{"token": None, "top_logprobs": 3}]}}],
                                 "usage": [1]}))
    with pytest.raises(PotstillError, match=r"could not be stored.*unexpected response shape"):
        generate(http_recipe(tmp_path, [m], 40, "teacher.token_ids=true"))
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.counts()["done"] == 0
    assert len(m.log) < 5 + 8 * 2  # five first answers, then what was in flight and its retries


def test_rate_limited_senders_do_not_overrun_the_budget(mock, tmp_path):
    m = mock(latency=0.5)
    recipe = http_recipe(tmp_path, [m], 20, "teacher.budget.max_requests=3", "teacher.requests_per_minute=600")
    with pytest.raises(PotstillError, match="max_requests=3"):
        generate(recipe)
    assert len(m.log) == 3


def test_legacy_completions_keep_the_k_likeliest():
    from potstill.records import Request
    from potstill.teachers.openai.wire import parse_response

    recipe = load_recipe(QUICKSTART / "recipe.yaml", ["teacher.backend=openai", "teacher.model=m",
                                                      "teacher.endpoints=[http://x/v1]", "teacher.api=completions",
                                                      "teacher.token_ids=true"])
    # vLLM's legacy shape: the sampled token (id 7, unlikely) comes first, then the top 2
    data = {"choices": [{"text": "a", "finish_reason": "length", "logprobs": {
        "tokens": ["token_id:7"], "token_logprobs": [-3.0],
        "top_logprobs": [{"token_id:7": -3.0, "token_id:1": -0.2, "token_id:2": -1.9}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    c = parse_response(Request("ab" * 32, [{"role": "user", "content": "q"}], 0, 0), data,
                       {"top_logprobs": 2, "max_new_tokens": 1}, recipe.teacher, 0.0, (3, 1))
    assert c.token_ids == [7] and c.topk_ids.tolist() == [[1, 2]]


def test_provenance_edits_keep_the_request_keys(mock, tmp_path):
    """Editing what does not change an answer (id, terms, a tokenizer a chat endpoint never sees)
    must not orphan answers already paid for."""
    m = mock()
    base = ["teacher.path=null"]
    first = http_recipe(tmp_path, [m], 10, *base)
    generate(first)
    edited = http_recipe(tmp_path, [m], 10, *base, "teacher.id=renamed", "teacher.terms_url=https://example.com/terms",
                         "teacher.revision=2024-07", f"teacher.tokenizer={QUICKSTART / 'teacher'}")
    assert recipe_requests(edited)[1] == recipe_requests(first)[1]
    assert generate(edited)["sent"] == 0 and len(m.log) == 10
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        (desc,) = ledger.teachers().values()
    assert desc["id"] == "renamed"  # the newest provenance is kept
    other = http_recipe(tmp_path / "b", [m], 10, *base, "teacher.model=another")
    assert set(recipe_requests(other)[1]).isdisjoint(recipe_requests(first)[1])


def test_train_leaves_out_requests_that_failed_for_good(mock, tmp_path, capsys):
    from potstill.train import train

    m = mock(fatal={"400": 0.1})
    recipe = http_recipe(tmp_path, [m], 40, "train.objective=sft", "train.epochs=1", "train.batch_size=8")
    counts = generate(recipe)
    assert counts["failed"] > 0
    student = train(recipe, recipe.train)
    assert f"{counts['failed']} of 40 requests failed in generate" in capsys.readouterr().out
    assert json.loads((student / "potstill.json").read_text())["examples"] == counts["done"]


def test_two_generates_on_one_ledger_are_refused(mock, tmp_path):
    from potstill.ledger import exclusive

    recipe = http_recipe(tmp_path, [mock()], 4)
    with exclusive(tmp_path / "ledger.sqlite"):  # as another process would hold it
        with pytest.raises(PotstillError, match="another potstill process is generating"):
            generate(recipe)
    assert generate(recipe)["done"] == 4


# -- issue 10: never hang, never leak a key, never store a wrong row, never overspend ---------------


@pytest.mark.slow  # seconds of real retries, deadlines or processes: the full suite runs it
def test_an_attempt_has_one_deadline_even_for_a_trickling_body(mock, tmp_path):
    m = mock(trickle=1.0, trickle_seconds=0.05)  # ~700-byte bodies: 35 s each at a byte per 0.05 s
    recipe = http_recipe(tmp_path, [m], 4, "teacher.timeout=1", "teacher.max_attempts=2")
    start = time.monotonic()
    counts = generate(recipe)
    assert time.monotonic() - start < 12
    assert counts["done"] == 0 and counts["failed"] == 4
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        rows = db.execute("SELECT seconds, outcome, error FROM attempts").fetchall()
    assert len(rows) == 8 and all(s < 1.5 and o == "retry" and e.startswith("timeout") for s, o, e in rows)


def test_an_endpoint_that_never_answers_stops_the_run(mock, tmp_path):
    m = mock(timeout=1.0, timeout_seconds=60)
    recipe = http_recipe(tmp_path, [m], 16, "teacher.timeout=1", "teacher.concurrency=16")
    with pytest.raises(PotstillError, match="unreachable: the first send of 5 requests.*raise teacher.timeout"):
        generate(recipe)
    assert len(m.log) <= 16  # once each (was 96: six attempts each, and rc 0)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.counts()["pending"] == 16


def test_an_endpoint_that_ignores_logprobs_stops_the_run(mock, tmp_path):
    m = mock(no_logprobs=1.0)
    recipe = http_recipe(tmp_path, [m], 20, "teacher.token_ids=true")
    with pytest.raises(PotstillError, match="5 requests in a row could not be stored.*the response has none"):
        generate(recipe)
    assert len(m.log) <= 8  # the window's first sends (was 60: three each)


def test_an_endpoint_that_answers_503_forever_stops_the_run(mock, tmp_path):
    """Every request would use all its attempts (backoff included) and fail: after five in a row
    with no answer between, the run stops and says why; what was not sent stays pending."""
    m = mock(server_error=1.0)
    recipe = http_recipe(tmp_path, [m], 40, "teacher.max_attempts=2", "teacher.concurrency=4")
    with pytest.raises(PotstillError, match=r"5 requests in a row used all 2 attempts, the last on HTTP 5\d\d.*"
                                            r"overloaded or down"):
        generate(recipe)
    assert len(m.log) <= 2 * (5 + 4)  # the five, and what was in flight beside them (was 80: 40 x 2)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.counts()["pending"] >= 40 - 9


def test_generate_exits_1_and_says_why_requests_failed(mock, tmp_path, capsys):
    from potstill.cli import main

    m = mock(fatal={"400": 0.1}, sticky=True)
    args = ["generate", str(QUICKSTART / "recipe.yaml"), f"output_dir={tmp_path}", "prompts.limit=40",
            "teacher.backend=openai", "teacher.model=mock", f"teacher.endpoints=[{m.url}]"]
    assert main(args) == 1
    err = capsys.readouterr().err
    failed = sum(what == "400" for _, _, what in m.log)
    assert failed > 0 and f"{failed} requests failed for good" in err and f"{failed} x HTTP 400: bad request" in err
    good = mock()
    assert main([*args[:-1], f"output_dir={tmp_path / 'b'}", f"teacher.endpoints=[{good.url}]"]) == 0


@pytest.mark.slow
def test_run_goes_on_without_failed_requests_and_exits_1(mock, tmp_path, capsys):
    """`potstill run` trains on what it has (as train says), then exits 1 with one line, as
    `potstill generate` does: a script must not take a run with holes for a whole one."""
    from potstill.cli import main

    from helpers import tiny_overrides

    m = mock(fatal={"400": 0.2}, sticky=True)
    args = ["run", str(QUICKSTART / "recipe.yaml"), *tiny_overrides(tmp_path, 32, 16), "teacher.backend=openai",
            "teacher.model=mock", f"teacher.endpoints=[{m.url}]", "train.objective=sft", "baseline=null"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "requests failed for good" in err and "run: finished without the requests that failed" in err
    assert (tmp_path / "student" / "model.safetensors").is_file() and (tmp_path / "report.html").is_file()


def test_the_endpoints_own_reason_is_kept_from_fastapi_detail(mock, tmp_path):
    m = mock(detail=1.0)
    with pytest.raises(PotstillError, match=r"HTTP 422: Server is pinned to 'mock-7b'; requested 'mock'"):
        generate(http_recipe(tmp_path, [m], 20))
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert all("Server is pinned to" in r for r in ledger.failures().values())


def test_fastapi_validation_detail_is_read():
    import httpx
    import openai

    from potstill.teachers.openai.dispatch import classify

    request = httpx.Request("POST", "http://x/v1/chat/completions")
    body = {"detail": [{"loc": ["body", "max_tokens"], "msg": "Input should be a valid integer", "type": "int"}]}
    exc = openai.UnprocessableEntityError("422", response=httpx.Response(422, json=body, request=request), body=body)
    assert classify(exc)[2] == "HTTP 422: body.max_tokens: Input should be a valid integer"


def test_logit_kd_from_an_endpoint_without_ids_and_the_refusal_when_it_returned_no_logprobs(mock, tmp_path):
    """The endpoint's top-k as token bytes (no ids, no teacher tokenizer) trains the student by logit
    KD across tokenizers; a ledger whose HTTP answers hold no logprobs (an endpoint that returned
    none, an older potstill) is refused in one line saying so."""
    import sqlite3

    from potstill.train import train

    recipe = http_recipe(tmp_path, [mock()], 8, "train.objective=kd", "train.batch_size=4", "baseline=null",
                         "train.epochs=1", "train.log_every=1")
    generate(recipe)
    train(recipe, recipe.train)
    rows = [json.loads(line) for line in (tmp_path / "logs" / "student.jsonl").open()]
    assert rows and all(r["kd"] > 0 for r in rows)
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        db.execute("UPDATE completions SET topk_ids=NULL, topk_logprobs=NULL, topk_bytes=NULL, token_bytes=NULL")
    with pytest.raises(PotstillError, match="the HTTP teacher's answers hold none .the endpoint returned no logprobs"):
        train(recipe, recipe.train)


def test_a_key_of_any_shape_never_leaks(mock, tmp_path, monkeypatch, capfd):
    key = "s4CANARYq7Lm2Zx9Vb3Nc8Kd1Rt6Wy5HdEzz"
    monkeypatch.setenv("ODD_KEY", key)
    m = mock(fatal={"401": 0.2})
    recipe = http_recipe(tmp_path, [m], 60, "teacher.api_key_env=ODD_KEY")
    with pytest.raises(PotstillError, match="HTTP 401") as err:
        generate(recipe)
    grams = {key[i:i + 8] for i in range(len(key) - 7)}
    out, errs = capfd.readouterr()
    for text in (str(err.value), out, errs):
        assert not any(g in text for g in grams), text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "ledger.sqlite" for p in files)
    for path in files:
        data = path.read_bytes()
        assert not any(g.encode() in data for g in grams), path
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        assert db.execute("SELECT count(*) FROM attempts WHERE error LIKE '%provided: ***%'").fetchone()[0] > 0


def test_token_ids_outside_the_tokenizer_are_malformed(mock, tmp_path):
    m = mock(bad_id=0.2, sticky=True)
    counts = generate(http_recipe(tmp_path, [m], 30, "teacher.token_ids=true"))
    assert counts["failed"] == sum(what == "bad_id" for _, _, what in m.log) // 3 > 0  # three sends each
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert all(ex.topk_ids.max() < VOCAB and ex.token_ids.max() < VOCAB for ex in ledger.examples())
        assert all("outside the teacher tokenizer's 41 tokens" in r for r in ledger.failures().values())


@pytest.mark.parametrize("claim", [10**30, 10**9, -10**6])
def test_usage_claims_are_clamped_and_recorded(mock, tmp_path, claim):
    m = mock(usage={"prompt_tokens": claim, "completion_tokens": claim, "total_tokens": 2 * claim})
    recipe = http_recipe(tmp_path, [m], 12, "teacher.prices.prompt=1000", "teacher.prices.completion=1000")
    counts = generate(recipe)
    assert counts["done"] == 12  # no good answer lost to a bad number
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        rows = db.execute("SELECT prompt_tokens, completion_tokens, cost, usage_claimed FROM attempts").fetchall()
    max_new = recipe.generation.max_new_tokens
    for prompt, completion, cost, claimed in rows:
        assert 0 < prompt < 1000 and 0 <= completion <= max_new and 0 < cost
        assert json.loads(claimed) == {"prompt_tokens": claim, "completion_tokens": claim}


def test_honest_usage_is_counted_as_claimed(mock, tmp_path):
    generate(http_recipe(tmp_path, [mock()], 8))
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        assert db.execute("SELECT count(*) FROM attempts WHERE usage_claimed IS NULL").fetchone()[0] == 8


def test_unparseable_bodies_count_the_estimate(mock, tmp_path):
    m = mock(invalid_json=0.3, truncated=0.2, sticky=True)
    recipe = http_recipe(tmp_path, [m], 30, "teacher.prices.prompt=1000", "teacher.prices.completion=1000",
                         "teacher.max_attempts=2")
    generate(recipe)
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        bad = db.execute("SELECT completion_tokens, cost FROM attempts WHERE outcome != 'ok'").fetchall()
    # max_new_tokens: the worst case (was 0 tokens, $0)
    assert bad and all(c == recipe.generation.max_new_tokens and cost > 0 for c, cost in bad)


@pytest.mark.slow
def test_sends_in_flight_at_a_kill_count_against_the_budget(mock, tmp_path):
    """SIGKILL while sends are in flight, twice: every send was in the ledger before it left, so
    the reruns' budget counts it and the endpoint never receives more than max_requests."""
    m = mock(latency=30)
    args = [sys.executable, "-m", "potstill.cli", "generate", str(QUICKSTART / "recipe.yaml"),
            f"output_dir={tmp_path}", "prompts.limit=40", "teacher.backend=openai", "teacher.model=mock",
            f"teacher.endpoints=[{m.url}]", "teacher.concurrency=8", "teacher.budget.max_requests=12",
            "teacher.timeout=60"]
    env = {**os.environ, "POTSTILL_QUIET": "1", "PYTHONPATH": str(ROOT / "src")}
    for expect in (8, 12):
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(m.log) < expect and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(m.log) == expect
    final = subprocess.run(args, env=env, capture_output=True, text=True)
    assert final.returncode == 2 and "max_requests=12" in final.stderr
    assert len(m.log) == 12
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.spend()["requests"] == 12


@pytest.mark.slow
def test_a_retry_after_that_is_not_rfc_9110_backs_off_normally(mock, tmp_path):
    m = mock(rate_limit=0.3, retry_after="1e9")
    assert generate(http_recipe(tmp_path, [m], 20))["done"] == 20  # was: "asks to wait 1000000000 s", every run


def test_one_row_sqlite_cannot_hold_fails_alone(mock, tmp_path, monkeypatch):
    """A value SQLite cannot store (here a seed past 64 bits) fails its request with the reason;
    the good answers committed with it are kept (they were all lost, and the run stopped)."""
    import potstill.teachers.openai.dispatch as dispatch

    real, bad = dispatch.parse_response, []

    def one_unstorable(*args, **kwargs):
        completion = real(*args, **kwargs)
        if not bad:
            bad.append(completion.request_hash)
            completion.seed = 10**30
        return completion

    monkeypatch.setattr(dispatch, "parse_response", one_unstorable)
    counts = generate(http_recipe(tmp_path, [mock(latency=0.05)], 24))
    assert counts["done"] == 23 and counts["failed"] == 1
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.failures()[bad[0]].startswith("could not be stored: OverflowError")


def test_text_that_is_not_unicode_is_malformed():
    from potstill.records import Request
    from potstill.teachers.openai.wire import Malformed, parse_response

    recipe = load_recipe(QUICKSTART / "recipe.yaml", ["teacher.backend=openai", "teacher.model=m",
                                                      "teacher.endpoints=[http://x/v1]"])
    data = json.loads('{"choices": [{"message": {"content": "a\\ud800"}, "finish_reason": "stop"}]}')
    with pytest.raises(Malformed, match="not valid Unicode"):
        parse_response(Request("ab" * 32, [{"role": "user", "content": "q"}], 0, 0), data,
                       {"top_logprobs": 0, "max_new_tokens": 4}, recipe.teacher, 0.0, (1, 1))


def test_the_retry_rules_as_a_table():
    """decide(): what follows one attempt, from its classification alone (the rules in dispatch's docstring)."""
    from potstill.teachers.openai.dispatch import BACKOFF_CAP, Next, decide

    rule = dict(attempt=0, malformed=0, max_attempts=6, max_retry_wait=120.0, jitter=0.0)
    assert decide("ok", 200, None, None, **rule) == Next()
    assert decide("fatal", 401, "HTTP 401", None, **rule) == Next(fail="HTTP 401", stop="HTTP 401 (not retried)")
    assert decide("bad_request", 400, "HTTP 400", None, **rule) == Next(fail="HTTP 400 (not retried)")
    assert decide("retry", 500, "HTTP 500", None, **rule) == Next(retry_in=0.5)  # backoff 0.5 * 2^0
    assert decide("retry", 500, "HTTP 500", None, **{**rule, "attempt": 3, "jitter": 0.2}).retry_in == pytest.approx(4.8)
    assert decide("unreachable", None, "timeout", None, **{**rule, "attempt": 4}).retry_in == 8.0
    assert decide("retry", 503, "x", None, **{**rule, "attempt": 4, "max_attempts": 50}).retry_in == 8.0
    assert decide("retry", 503, "x", None, **{**rule, "attempt": 9, "max_attempts": 50}).retry_in == BACKOFF_CAP
    # a 429 that says how long pauses the whole endpoint; a 503 that says so only waits
    assert decide("retry", 429, "HTTP 429", 7.0, **rule) == Next(retry_in=7.0, pause=True)
    assert decide("retry", 503, "HTTP 503", 7.0, **rule) == Next(retry_in=7.0)
    # a wait longer than teacher.max_retry_wait stops the run; the request stays pending (no fail)
    stop = decide("retry", 429, "HTTP 429", 3600.0, **rule)
    assert stop.fail is None and stop.retry_in is None and "asks to wait 3600 s" in stop.stop
    # the last attempt, or one malformed body too many, fails the request
    assert decide("retry", 500, "HTTP 500", None, **{**rule, "attempt": 5}) == \
        Next(fail="gave up after 6 attempts: HTTP 500")
    assert decide("malformed", 200, "bad", None, **{**rule, "malformed": 3}).fail == "gave up after 1 attempts: bad"
    assert decide("malformed", 200, "bad", None, **{**rule, "malformed": 2}).retry_in == 0.5


@pytest.mark.slow
def test_rate_limit_buckets_pace_requests_and_tokens():
    """teacher.requests_per_minute / tokens_per_minute: a burst of one second's worth, then the rate."""
    from potstill.teachers.openai.dispatch import TokenBucket

    async def paced(bucket, units, n):
        start = time.monotonic()
        for _ in range(n):
            await bucket.take(units)
        return time.monotonic() - start

    assert asyncio.run(paced(TokenBucket(None), 1, 1000)) < 0.1  # no limit: no wait
    # 600 requests a minute = 10 a second: a burst of 10, then 10 more take about one second
    assert 0.8 < asyncio.run(paced(TokenBucket(600), 1, 20)) < 1.6
    # 6,000 tokens a minute = 100 a second: five sends of 50 tokens after a burst of 100 take ~1.5 s
    assert 1.2 < asyncio.run(paced(TokenBucket(6000), 50, 5)) < 2.2
    # a send bigger than the bucket waits for a full bucket, then leaves it in debt
    big = TokenBucket(6000)
    assert 2.3 < asyncio.run(paced(big, 250, 2)) < 3.4 and big.level < 0  # the second waits (100 + 150) / 100 s


# -- issue 20: HTTP teachers against an independent fault injector ------------------------------------


def closed_port() -> int:
    return free_port()  # bound, never listening: the kernel refuses every connection


def test_a_connection_never_made_is_not_charged(tmp_path):
    """A refused connection, sent by the installed openai client to a real closed port: nothing left,
    so nothing is counted, and a rerun adds nothing to the spend (was: 8 rows of ~$3.6e-5 a run:
    openai 3 raises from httpx2.ConnectError, which the check for httpx.ConnectError missed)."""
    args = [f"output_dir={tmp_path}", "prompts.limit=40", "teacher.backend=openai", "teacher.model=mock",
            f"teacher.endpoints=[http://127.0.0.1:{closed_port()}/v1]", "teacher.concurrency=8",
            "teacher.prices.prompt=1000", "teacher.prices.completion=1000"]
    for _ in range(2):
        with pytest.raises(PotstillError, match=r"unreachable.*connection error: ConnectError.*is it up"):
            generate(load_recipe(QUICKSTART / "recipe.yaml", args))
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        rows = db.execute("SELECT prompt_tokens, completion_tokens, cost, outcome FROM attempts").fetchall()
    assert len(rows) >= 10 and all(r == (0, 0, 0.0, "retry") for r in rows), rows


def test_a_connect_timeout_is_not_charged(tmp_path):
    """A listener whose accept queue is full drops new connections' SYNs (Linux): the connect times
    out (the client's ConnectTimeout, before teacher.timeout's deadline), nothing left, nothing is
    counted."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(3):  # fill the accept queue; nobody accepts
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(server.getsockname())
        fillers.append(f)
    try:
        recipe = load_recipe(QUICKSTART / "recipe.yaml", [
            f"output_dir={tmp_path}", "prompts.limit=16", "teacher.backend=openai", "teacher.model=mock",
            f"teacher.endpoints=[http://127.0.0.1:{server.getsockname()[1]}/v1]", "teacher.concurrency=8",
            "teacher.timeout=1", "teacher.prices.prompt=1000", "teacher.prices.completion=1000"])
        with pytest.raises(PotstillError, match=r"unreachable.*ConnectTimeout"):
            generate(recipe)
    finally:
        for s in (*fillers, server):
            s.close()
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        rows = db.execute("SELECT prompt_tokens, completion_tokens, cost FROM attempts").fetchall()
    assert rows and all(r == (0, 0, 0.0) for r in rows), rows


@pytest.mark.slow
def test_an_endpoint_that_answers_most_requests_is_not_down(mock, tmp_path):
    """20 % of bodies trickle past the deadline. Those slow failures pile up in the window and time
    out together, while the other requests are answered all along: one invocation finishes every
    request (was: "unreachable" after 18 of 64, three invocations to finish)."""
    # seed 5: 8 of the first 14 bodies trickle, so the whole window is slow bodies early on
    m = mock(trickle=0.2, trickle_seconds=0.05, seed=5)
    recipe = http_recipe(tmp_path, [m], 64, "teacher.timeout=1", "teacher.concurrency=8")
    counts = generate(recipe)
    assert counts["done"] == 64 and counts["failed"] == 0
    assert sum(what == "trickle" for _, _, what in m.log) >= 8  # the faults did happen



def test_no_answer_means_none_at_all_not_slow_failures_among_answers():
    """The stop rules for an endpoint that does not answer, fed attempt by attempt: failures that
    were out while answers came never stop the run, in any order and any number; a stretch with no
    answer at all does, after five first sends, twenty sends or five requests' last attempts."""
    from potstill.teachers.openai.dispatch import MAX_UNREACHABLE, SAME_FAILURE, Streaks

    rng = random.Random(0)
    for _ in range(200):
        streaks, t = Streaks(6), 0.0
        assert streaks.see("ok", None, first=True, sent=0.0, now=t) is None
        answered = t
        for _ in range(200):
            t += rng.uniform(0.001, 0.05)
            if rng.random() < 0.2:
                assert streaks.see("ok", None, first=rng.random() < 0.5, sent=t - 0.01, now=t) is None
                answered = t
                continue
            # a failure sent before the last answer came: a timeout, a reset, a refusal, a 503
            sent = answered - rng.uniform(1e-6, 3.0)
            reason = rng.choice(["timeout: no whole answer within teacher.timeout", "connection error: ReadError",
                                 "connection error: ConnectError", "HTTP 503"])
            kind = "retry" if reason.startswith("HTTP") else "unreachable"
            assert streaks.see(kind, reason, first=rng.random() < 0.5, sent=sent, now=t) is None
            assert rng.random() < 0.7 or streaks.gave_up(reason, sent=sent) is None
    timeout = "timeout: no whole answer within teacher.timeout"
    # nothing answered yet: five first sends without an answer say it is not up (a wrong URL, a host down)
    streaks = Streaks(6)
    why = [streaks.see("unreachable", timeout, first=True, sent=0.0, now=1.0 + i) for i in range(SAME_FAILURE)]
    assert why[:-1] == [None] * (SAME_FAILURE - 1) and "the first send of 5 requests in a row got no answer" in why[-1]
    # once it has answered: a window of slow first sends after the answers is not enough (at 20 %
    # slow bodies, five in a row come once in 3,000); twenty sends in a row with no answer are
    streaks = Streaks(6)
    streaks.see("ok", None, first=True, sent=0.0, now=1.0)
    why = [streaks.see("unreachable", timeout, first=i < 8, sent=2.0 + i, now=5.0 + i) for i in range(MAX_UNREACHABLE)]
    assert why[:-1] == [None] * (MAX_UNREACHABLE - 1) and f"{MAX_UNREACHABLE} sends in a row with no answer" in why[-1]
    streaks = Streaks(2)
    streaks.see("ok", None, first=True, sent=0.0, now=1.0)
    why = [streaks.gave_up("HTTP 503", sent=2.0 + i) for i in range(SAME_FAILURE)]
    assert why[-2] is None and "5 requests in a row used all 2 attempts" in why[-1]
    # an answer starts every count again
    streaks.see("ok", None, first=True, sent=9.0, now=9.5)
    assert streaks.gave_up("HTTP 503", sent=10.0) is None and streaks.gave_ups == 1


@pytest.mark.parametrize("concurrency", [8, 32])
def test_inflated_usage_never_passes_max_cost(mock, tmp_path, concurrency):
    """Every answer claims 10^9 tokens: each is counted at the most the clamp allows, and each send
    reserved that much, so the ledger's spend never passes max_cost (was: $0.003184 at concurrency
    8 and $0.003244 at 32 for max_cost 0.003)."""
    m = mock(latency=0.02, usage={"prompt_tokens": 10**9, "completion_tokens": 10**9, "total_tokens": 2 * 10**9})
    recipe = http_recipe(tmp_path, [m], 200, f"teacher.concurrency={concurrency}", "teacher.prices.prompt=1",
                         "teacher.prices.completion=1", "teacher.budget.max_cost=0.003")
    with pytest.raises(PotstillError, match="max_cost=0.003") as stop:
        generate(recipe)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        spend = ledger.spend()
    assert 0.002 < spend["cost"] <= 0.003  # every answer counted at the most the clamp allows
    said = re.search(r"spent \$([\d.]+)", str(stop.value))
    assert said and float(said[1]) <= 0.003, stop.value  # the stop line never shows more than the budget
    with pytest.raises(PotstillError, match="max_cost"):  # and a rerun sends nothing past it
        generate(recipe)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.spend()["cost"] <= 0.003


def test_why_a_run_stopped_is_kept_in_its_session(mock, tmp_path):
    """Printed and stored: each generate session records when it ended and why it stopped early
    (a budget, an endpoint that is down), or that it finished; merge keeps it."""
    from potstill.ledger.merge import merge_ledgers

    m = mock()
    recipe = http_recipe(tmp_path, [m], 30, "teacher.budget.max_requests=10")
    with pytest.raises(PotstillError, match="max_requests=10") as stop:
        generate(recipe)
    finished = http_recipe(tmp_path / "b", [m], 4)
    generate(finished)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        (session,) = ledger.sessions()
    assert session["ended_at"] >= session["started_at"]
    assert session["stopped"].startswith("budget reached: teacher.budget.max_requests=10")
    assert session["stopped"] in str(stop.value)
    with Ledger(tmp_path / "b" / "ledger.sqlite") as ledger:
        (done,) = ledger.sessions()
    assert done["ended_at"] and done["stopped"] is None
    down = load_recipe(QUICKSTART / "recipe.yaml", [
        f"output_dir={tmp_path / 'c'}", "prompts.limit=16", "teacher.backend=openai", "teacher.model=mock",
        f"teacher.endpoints=[http://127.0.0.1:{closed_port()}/v1]"])
    with pytest.raises(PotstillError, match="unreachable"):
        generate(down)
    with Ledger(tmp_path / "c" / "ledger.sqlite") as ledger:
        assert "unreachable" in ledger.sessions()[0]["stopped"]
    merge_ledgers(tmp_path / "merged.sqlite", [tmp_path / "ledger.sqlite", tmp_path / "c" / "ledger.sqlite"])
    with Ledger(tmp_path / "merged.sqlite") as ledger:
        stops = [s["stopped"] for s in ledger.sessions()]
    assert len(stops) == 2 and stops[0].startswith("budget reached") and "unreachable" in stops[1]

"""The Batch API path against a fake OpenAI server on loopback, through the official client:
every request answered exactly once, shuffled output joined on custom_id, error lines failed with
their reason, expired batches resumed, no duplicate batch after a crash, budgets, API errors."""

import email
import email.policy
import json
import random
import socket
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest

pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import potstill.teachers.openai.batch  # noqa: E402
from potstill.errors import PotstillError  # noqa: E402
from potstill.generate import generate  # noqa: E402
from potstill.ledger import Ledger  # noqa: E402
from potstill.recipe import load_recipe  # noqa: E402

from helpers import QUICKSTART  # noqa: E402

KEY = "sk-test-potstill-0123456789abcdef"
USAGE = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
PRICES = (2.0, 8.0)  # USD per million prompt / completion tokens, online list prices


class Fake:
    """The Batch API's state: files, batches, and what reached it. A batch is in_progress at its
    first poll and finishes at its ``polls``-th: all lines answered (``mode`` complete), half of
    them (expire), or rejected at validation (fail). The output file is shuffled; every 20th line
    the server answers (3, 23, ...) errs, alternately as a 400 and as a line error."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.polls_of: Counter = Counter()
        self.creates = self.lists = 0
        self.mode, self.polls, self.errors = "complete", 2, True
        self.create_error: tuple[int, dict] | None = None  # answered to every create
        self.lose_create_answers = 0  # creates that make the batch but answer 500
        self.answered = 0  # lines answered so far, over all batches

    def input_lines(self, batch: dict) -> list[dict]:
        return [json.loads(line) for line in self.files[batch["input_file_id"]].splitlines()]

    def finish(self, b: dict) -> None:
        lines = self.input_lines(b)
        if self.mode == "fail":
            b.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                {"code": "model_not_found", "line": 1, "message": "The model fake does not exist"}]})
            return
        answer = lines if self.mode == "complete" else lines[:len(lines) // 2]
        out, err = [], []
        for line in answer:
            h = line["custom_id"]
            n, self.answered = self.answered, self.answered + 1
            if self.errors and n % 20 == 3 and n // 20 % 2 == 0:
                err.append({"id": f"req-{n}", "custom_id": h, "error": None, "response": {
                    "status_code": 400, "request_id": f"r{n}",
                    "body": {"error": {"message": "fake: prompt rejected", "type": "invalid_request_error"}}}})
            elif self.errors and n % 20 == 3:
                err.append({"id": f"req-{n}", "custom_id": h, "response": None,
                            "error": {"code": "server_error", "message": "fake: line failed"}})
            else:
                out.append({"id": f"req-{n}", "custom_id": h, "error": None, "response": {
                    "status_code": 200, "request_id": f"r{n}", "body": completion(h, line["body"])}})
        if self.mode == "expire_as_errors":  # as OpenAI reports what an expired batch never ran
            err += [{"id": f"req-x{i}", "custom_id": line["custom_id"], "response": None,
                     "error": {"code": "batch_expired", "message": "This request could not be executed before the "
                               "completion window expired."}} for i, line in enumerate(lines[len(lines) // 2:])]
        random.Random(len(lines)).shuffle(out)
        b["output_file_id"] = self.store(out) if out else None
        b["error_file_id"] = self.store(err) if err else None
        done = "completed" if self.mode == "complete" else "expired"  # expire, expire_as_errors
        b.update(status=done, **{f"{done}_at": int(time.time())},
                 request_counts={"total": len(lines), "completed": len(out), "failed": len(err)})

    def store(self, rows: list[dict]) -> str:
        fid = f"file-{len(self.files)}"
        self.files[fid] = "".join(json.dumps(r) + "\n" for r in rows).encode()
        return fid

    def sent(self) -> Counter:
        """custom_id -> how many batch input files carried it."""
        return Counter(line["custom_id"] for b in self.batches.values() for line in self.input_lines(b))


def completion(custom_id: str, body: dict) -> dict:
    """A chat completion naming its request, so a join on the wrong line shows; top-k as
    ``token_id:N`` when the body asks for ids."""
    choice = {"index": 0, "finish_reason": "stop",
              "message": {"role": "assistant", "content": f"answer {custom_id[:8]}"}}
    if body.get("logprobs"):
        k = body["top_logprobs"]
        tok = (lambda i: f"token_id:{i}") if body.get("return_tokens_as_token_ids") else str
        choice["logprobs"] = {"content": [
            {"token": tok(t), "logprob": -0.1, "top_logprobs": [{"token": tok(t + j), "logprob": -0.1 - j}
                                                                 for j in range(k)]} for t in (5, 6, 7)]}
    return {"id": "chatcmpl-fake", "object": "chat.completion", "model": body["model"], "choices": [choice],
            "usage": USAGE}


def make_app(holder):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI()

    def public(b: dict) -> dict:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    @app.middleware("http")
    async def auth(request, call_next):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "no key"}}, 401)
        return await call_next(request)

    @app.post("/v1/files")
    async def upload(request: Request):
        fake = holder.fake
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        form = email.message_from_bytes(head + await request.body(), policy=email.policy.HTTP)
        parts = {p.get_param("name", header="content-disposition"): p for p in form.iter_parts()}
        assert parts["purpose"].get_payload(decode=True) == b"batch"
        fid = f"file-{len(fake.files)}"
        fake.files[fid] = parts["file"].get_payload(decode=True)
        return {"id": fid, "object": "file", "bytes": len(fake.files[fid]), "created_at": int(time.time()),
                "filename": parts["file"].get_filename(), "purpose": "batch", "status": "processed"}

    @app.get("/v1/files/{fid}/content")
    async def content(fid: str):
        return Response(holder.fake.files[fid], media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create(request: Request):
        fake = holder.fake
        if fake.create_error:
            return JSONResponse(fake.create_error[1], fake.create_error[0])
        data = await request.json()
        assert data["completion_window"] == "24h" and data["input_file_id"] in fake.files
        fake.creates += 1
        bid = f"batch_{fake.creates}"
        fake.batches[bid] = {"id": bid, "object": "batch", "endpoint": data["endpoint"], "errors": None,
                             "input_file_id": data["input_file_id"], "completion_window": "24h",
                             "status": "validating", "output_file_id": None, "error_file_id": None,
                             "created_at": int(time.time()) - 60, "metadata": data.get("metadata"),
                             "request_counts": {"total": 0, "completed": 0, "failed": 0}}
        if fake.lose_create_answers:
            fake.lose_create_answers -= 1
            return JSONResponse({"error": {"message": "upstream reset"}}, 500)
        return fake.batches[bid]

    @app.get("/v1/batches/{bid}")
    async def retrieve(bid: str):
        fake = holder.fake
        b = fake.batches[bid]
        fake.polls_of[bid] += 1
        if b["status"] in ("validating", "in_progress"):
            if fake.polls_of[bid] >= fake.polls:
                fake.finish(b)
            else:
                b["status"] = "in_progress"
        return public(b)

    @app.get("/v1/batches")
    async def listing():
        holder.fake.lists += 1
        data = [public(b) for b in reversed(holder.fake.batches.values())]
        return {"object": "list", "data": data, "has_more": False,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    return app


@pytest.fixture(scope="module")
def server():
    holder = SimpleNamespace(fake=None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(make_app(holder), log_level="warning", log_config=None))  # see test_serve.running
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield holder, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    srv.should_exit = True
    thread.join(5)


@pytest.fixture
def fake(server, monkeypatch):
    holder, url = server
    holder.fake = Fake()
    holder.fake.url = url
    monkeypatch.setenv("POTSTILL_TEST_KEY", KEY)
    return holder.fake


def recipe(tmp_path, fake, *extra):
    return load_recipe(QUICKSTART / "recipe.yaml", [
        f"output_dir={tmp_path / 'run'}", "prompts.limit=40", "teacher.backend=openai_batch", "teacher.model=fake",
        f"teacher.endpoints=[{fake.url}]", "teacher.api_key_env=POTSTILL_TEST_KEY", "teacher.batch_poll_seconds=0.05",
        f"teacher.prices.prompt={PRICES[0]}", f"teacher.prices.completion={PRICES[1]}", "generation.top_logprobs=0",
        *extra])


def ledger_of(r) -> Ledger:
    return Ledger(r.run_dir / "ledger.sqlite")


def test_every_request_is_answered_once_and_joined_on_its_custom_id(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(potstill.teachers.openai.batch, "MAX_LINES", 16)  # 40 requests -> batches of 16, 16, 8
    r = recipe(tmp_path, fake)
    counts = generate(r)
    sent = fake.sent()
    assert len(sent) == 40 and set(sent.values()) == {1}  # each custom_id in exactly one batch
    assert fake.creates == 3 and [len(fake.input_lines(b)) for b in fake.batches.values()] == [16, 16, 8]
    assert counts["done"] + counts["failed"] == 40 and counts["failed"] == 2 and counts["pending"] == 0
    line = fake.input_lines(fake.batches["batch_1"])[0]
    assert line["method"] == "POST" and line["url"] == "/v1/chat/completions" and line["body"]["model"] == "fake"
    assert "potstill_local_id" in fake.batches["batch_1"]["metadata"]
    with ledger_of(r) as ledger:
        examples = list(ledger.examples())
        assert all(e.text == f"answer {e.request_hash[:8]}" for e in examples)  # shuffled output, right join
        reasons = sorted(ledger.failures().values())
        attempts = ledger.db.execute("SELECT request_hash, outcome, http_status, cost FROM attempts").fetchall()
        batches = ledger.db.execute("SELECT batch_id, status FROM batches ORDER BY batch_id").fetchall()
        spend = ledger.spend()
    assert len(examples) == 38 and reasons[0].startswith("HTTP 400: fake: prompt rejected")
    assert "server_error: fake: line failed" in reasons[1]
    assert len(attempts) == 40 and len({a[0] for a in attempts}) == 40
    assert Counter(a[1] for a in attempts) == {"ok": 38, "failed": 2}
    assert batches == [("batch_1", "collected"), ("batch_2", "collected"), ("batch_3", "collected")]
    # the Batch API bills half the list price
    line_cost = (USAGE["prompt_tokens"] * PRICES[0] + USAGE["completion_tokens"] * PRICES[1]) / 1e6 * 0.5
    assert spend["cost"] == pytest.approx(38 * line_cost) and spend["requests"] == 40

    fake.errors = False
    again = generate(r)  # only the two failed requests are batched again
    assert again["sent"] == 2 and again["done"] == 40 and again["failed"] == 0 and fake.creates == 4


@pytest.mark.parametrize("mode", ["expire", "expire_as_errors"])
def test_expired_batch_keeps_the_rest_pending_and_a_rerun_finishes_them(tmp_path, fake, mode):
    r = recipe(tmp_path, fake)
    fake.mode = mode
    with pytest.raises(PotstillError, match="20 requests were not answered"):
        generate(r)
    with ledger_of(r) as ledger:
        assert ledger.counts() == {"pending": 20, "done": 19, "failed": 1}
        assert ledger.open_batches(ledger.db.execute("SELECT teacher_key FROM teachers").fetchone()[0]) == []
        not_done = {h for (h,) in ledger.db.execute("SELECT request_hash FROM requests WHERE status != 'done'")}
    fake.mode, fake.errors = "complete", False
    counts = generate(r)
    assert counts["done"] == 40 and counts["pending"] == counts["failed"] == 0
    assert {line["custom_id"] for line in fake.input_lines(fake.batches["batch_2"])} == not_done


def crash_once(monkeypatch, when):
    """Make the ledger's next ``update_batch`` matching ``when`` raise, as a killed process would."""
    real = Ledger.update_batch
    state = {"armed": True}

    def update_batch(self, local_id, **fields):
        if state["armed"] and when(fields):
            state["armed"] = False
            raise KeyboardInterrupt("killed")
        return real(self, local_id, **fields)

    monkeypatch.setattr(Ledger, "update_batch", update_batch)


def test_a_crash_between_create_and_recording_the_id_creates_no_second_batch(tmp_path, fake, monkeypatch):
    r = recipe(tmp_path, fake)
    crash_once(monkeypatch, lambda fields: "batch_id" in fields)
    with pytest.raises(KeyboardInterrupt):
        generate(r)
    with ledger_of(r) as ledger:
        (row,) = ledger.db.execute("SELECT batch_id, input_file_id, status FROM batches").fetchall()
    assert row[0] is None and row[1] == "file-0" and row[2] == "prepared" and fake.creates == 1
    counts = generate(r)
    assert fake.creates == 1 and fake.lists == 1 and len(fake.files) == 3  # input, output, errors: no re-upload
    assert counts["done"] + counts["failed"] == 40 and counts["pending"] == 0
    with ledger_of(r) as ledger:
        assert ledger.db.execute("SELECT batch_id, status FROM batches").fetchall() == [("batch_1", "collected")]


def test_a_lost_create_answer_is_found_by_its_tag_not_created_again(tmp_path, fake):
    fake.lose_create_answers = 1
    counts = generate(recipe(tmp_path, fake))
    assert fake.creates == 1 and fake.lists == 1 and counts["pending"] == 0


def crash_while_in_progress(r, fake, monkeypatch) -> None:
    """Run ``r`` until its batch is in progress at the API, then die as a killed process would."""
    fake.polls = 3
    crash_once(monkeypatch, lambda fields: fields.get("status") == "in_progress")
    with pytest.raises(KeyboardInterrupt):
        generate(r)


def test_resume_polls_the_batch_in_progress_and_creates_none(tmp_path, fake, monkeypatch):
    r = recipe(tmp_path, fake)
    crash_while_in_progress(r, fake, monkeypatch)
    assert fake.creates == 1 and fake.polls_of["batch_1"] == 1
    counts = generate(r)
    assert fake.creates == 1 and fake.polls_of["batch_1"] == 3 and fake.lists == 0
    assert counts["done"] + counts["failed"] == 40 and counts["pending"] == 0 and set(fake.sent().values()) == {1}


def test_a_batch_collected_by_a_run_with_fewer_prompts_keeps_every_paid_answer(tmp_path, fake, monkeypatch):
    r = recipe(tmp_path, fake)
    crash_while_in_progress(r, fake, monkeypatch)
    fewer = recipe(tmp_path, fake, "prompts.limit=10")  # the user cut the prompt set after the crash
    generate(fewer)
    with ledger_of(r) as ledger:
        counts = ledger.counts()
    assert counts["done"] + counts["failed"] == 40  # the batch's 40 answers, not only the 10 asked now
    assert generate(r)["sent"] == counts["failed"]  # only the failed lines are batched again, no answer


def test_budget_shrinks_the_batch_then_stops_before_creating(tmp_path, fake):
    r = recipe(tmp_path, fake, "teacher.budget.max_requests=25")
    with pytest.raises(PotstillError, match=r"max_requests=25 leaves room for 25 of 40"):
        generate(r)
    assert len(fake.sent()) == 25
    with ledger_of(r) as ledger:
        assert ledger.spend()["requests"] == 25 and ledger.counts()["pending"] == 15
    with pytest.raises(PotstillError, match=r"leaves room for 0 of"):
        generate(r)
    assert fake.creates == 1


def test_inflated_usage_never_passes_max_cost_in_a_batch(tmp_path, fake, monkeypatch):
    """Every line claims 10^9 tokens: the batch was shrunk to what fits at the most the clamp can
    count per line, so the collected spend stays within max_cost (was: shrunk at the prompt
    estimate, then counted past it)."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "USAGE", {"prompt_tokens": 10**9, "completion_tokens": 10**9,
                                                          "total_tokens": 2 * 10**9})
    fake.errors = False
    r = recipe(tmp_path, fake, "teacher.budget.max_cost=0.003")
    with pytest.raises(PotstillError, match=r"max_cost=0.003 leaves room for \d+ of 40"):
        generate(r)
    with ledger_of(r) as ledger:
        spend = ledger.spend()
    assert 0 < spend["requests"] < 40 and 0.002 < spend["cost"] <= 0.003  # was: all 40, $0.0036


@pytest.mark.parametrize("status, error, shown", [
    (401, {"error": {"message": f"Incorrect API key provided: {KEY}", "code": "invalid_api_key"}}, "HTTP 401"),
    (429, {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}},
     "insufficient_quota"),
    (400, {"error": {"message": "endpoint not supported"}}, "HTTP 400"),
])
def test_api_errors_stop_with_one_line_without_the_key_and_resume_without_reupload(tmp_path, fake, status, error,
                                                                                      shown):
    r = recipe(tmp_path, fake)
    fake.create_error = (status, error)
    with pytest.raises(PotstillError) as e:
        generate(r)
    message = str(e.value)
    assert shown in message and KEY not in message and "sk-test" not in message and "\n" not in message
    fake.create_error = None
    assert generate(r)["pending"] == 0
    # the recorded input file is used, not uploaded again; the lookup by tag finds nothing, so one create
    assert fake.creates == 1 and fake.batches["batch_1"]["input_file_id"] == "file-0" and fake.lists == 1
    assert sum(b'"method":"POST"' in f for f in fake.files.values()) == 1


def test_a_batch_failing_validation_stops_with_the_apis_message(tmp_path, fake):
    r = recipe(tmp_path, fake)
    fake.mode = "fail"
    with pytest.raises(PotstillError, match="failed validation: line 1: model_not_found: The model fake does not"):
        generate(r)
    with ledger_of(r) as ledger:
        assert ledger.counts()["pending"] == 40
        assert ledger.db.execute("SELECT status FROM batches").fetchall() == [("collected",)]


def test_token_ids_and_top_k_come_through_a_batch(tmp_path, fake):
    r = recipe(tmp_path, fake, "prompts.limit=8", "generation.top_logprobs=5", "teacher.token_ids=true")
    fake.errors = False
    assert generate(r)["done"] == 8
    body = fake.input_lines(fake.batches["batch_1"])[0]["body"]
    assert body["return_tokens_as_token_ids"] is True and body["top_logprobs"] == 5
    with ledger_of(r) as ledger:
        for e in ledger.examples():
            assert list(e.token_ids) == [5, 6, 7] and e.topk_ids.shape == (3, 5)
            assert (e.topk_ids[:, 0] == [5, 6, 7]).all() and e.topk_logprobs[0, 0] == pytest.approx(-0.1, abs=1e-3)


def test_a_crash_part_way_through_collecting_stores_each_answer_once(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(potstill.teachers.openai.batch, "COLLECT_CHUNK", 7)  # 40 lines -> 6 transactions
    r = recipe(tmp_path, fake)
    real, calls = Ledger.record, []

    def record(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "record", record)
    with pytest.raises(KeyboardInterrupt):
        generate(r)
    with ledger_of(r) as ledger:
        assert ledger.counts()["done"] + ledger.counts()["failed"] == 14  # two chunks stored
    counts = generate(r)
    assert counts["done"] + counts["failed"] == 40 and fake.creates == 1
    with ledger_of(r) as ledger:
        attempts = ledger.db.execute("SELECT count(*), count(DISTINCT request_hash) FROM attempts").fetchone()
    # each answer's attempt row once; a failed line met again is retried in the rerun's collection
    assert attempts[1] == 40 and attempts[0] <= 40 + counts["failed"]

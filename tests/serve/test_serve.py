"""`potstill serve`: the bundled teacher over HTTP, read by the official openai client, answers as
LocalModel does (ids, top-k, logprobs), scores text as a plain forward pass does, and batches."""

import asyncio
import json
import threading
import time
from itertools import accumulate

import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from potstill.errors import PotstillError
import potstill.serve.batcher as potstill_serve
from potstill.serve import bind, build_app
from potstill.records import Request
from potstill.hf import LocalModel

from helpers import QUICKSTART, TEACHER, running

PROMPTS = [json.loads(line)["prompt"] for line in (QUICKSTART / "prompts" / "heldout.jsonl").open()][:16]
GREEDY = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 12, "top_logprobs": 5}
IDS = {"return_tokens_as_token_ids": True}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server():
    """A real uvicorn server on a free loopback port, in a thread; yields (app, base url)."""
    yield from running(build_app(TEACHER, model_name="teacher", batch_wait_ms=20))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def teacher():
    return LocalModel(TEACHER)


@pytest.fixture(scope="module")
def local(teacher):
    """LocalModel's greedy completions of PROMPTS, in one batch as `potstill generate` sends them."""
    requests = [Request(str(i), [{"role": "user", "content": p}], 0, 0) for i, p in enumerate(PROMPTS)]
    return teacher.complete(requests, GREEDY)


def chat(client, prompt, **kw):
    return client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": prompt}], **kw)


def ids_of(entries):
    return [int(e.token.removeprefix("token_id:")) for e in entries]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["teacher"]
    assert httpx.get(server[1].removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_chat_greedy_is_what_local_teacher_gives(client, teacher):
    """One request alone is one batch of one row, the same generate call as LocalModel's: equal to the bit."""
    eos = teacher.tokenizer.eos_token_id
    for i, prompt in enumerate(PROMPTS[:8]):
        [ref] = teacher.complete([Request(str(i), [{"role": "user", "content": prompt}], 0, 0)], GREEDY)
        out = chat(client, prompt, temperature=0, max_tokens=12, logprobs=True, top_logprobs=5, extra_body=IDS)
        choice = out.choices[0]
        entries = choice.logprobs.content
        assert choice.message.content == ref.text and choice.finish_reason == ref.finish_reason
        assert ids_of(entries) == ref.token_ids  # EOS included when the model stopped on it
        assert ref.finish_reason != "stop" or (ids_of(entries)[-1] == eos and choice.message.content == ref.text)
        for t, e in enumerate(entries):
            assert ids_of(e.top_logprobs) == ref.topk_ids[t].tolist()
            assert [x.logprob for x in e.top_logprobs] == ref.topk_logprobs[t].tolist()
            assert e.logprob == ref.topk_logprobs[t, 0]  # greedy: the top-1
        assert out.usage.completion_tokens == len(ref.token_ids) and out.usage.prompt_tokens == ref.prompt_tokens


def test_completions_take_raw_text_and_give_legacy_logprobs(client, local):
    templated = f"<|user|>{PROMPTS[0]}<|assistant|>"  # the chat template written out: no template here
    out = client.completions.create(model="teacher", prompt=templated, max_tokens=12, temperature=0, logprobs=3)
    choice = out.choices[0]
    assert choice.text == local[0].text
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and lp.text_offset == [0, *accumulate(map(len, lp.tokens[:-1]))]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens == len(local[0].token_ids)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen == pytest.approx(max(top.values()), abs=1e-5)


def test_echo_with_max_tokens_0_scores_the_text_as_a_forward_pass_does(client):
    model = AutoModelForCausalLM.from_pretrained(TEACHER)
    tok = AutoTokenizer.from_pretrained(TEACHER)
    texts = [f"<|user|>{p}<|assistant|>" for p in PROMPTS[:3]]
    out = client.completions.create(model="teacher", prompt=texts, max_tokens=0, echo=True, logprobs=2,
                                    extra_body={"prompt_logprobs": 2, **IDS})
    assert out.usage.completion_tokens == 0 and len(out.choices) == 3
    for text, choice in zip(texts, out.choices):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)  # (L - 1, V)
        want = ref.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        lp = choice.logprobs
        assert [int(t.removeprefix("token_id:")) for t in lp.tokens] == ids
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
        assert choice.finish_reason == "length"
        vllm = choice.model_extra["prompt_logprobs"]
        assert vllm[0] is None and len(vllm) == len(ids)
        for t, row in enumerate(vllm[1:]):
            assert row[str(ids[t + 1])]["logprob"] == pytest.approx(want[t], abs=1e-5)
            assert {int(i) for i in row} >= set(ref[t].topk(2).indices.tolist())
    plain = client.completions.create(model="teacher", prompt=texts[0], max_tokens=0, echo=True, logprobs=0)
    assert plain.choices[0].text == texts[0]


def test_a_one_token_prompt_scores_to_nothing_not_a_500(client):
    """As OpenAI and vLLM answer it: the first prompt token has no context, so its logprob is null."""
    out = client.completions.create(model="teacher", prompt=[5], max_tokens=0, echo=True, logprobs=3,
                                    extra_body={"prompt_logprobs": 2, **IDS})
    lp = out.choices[0].logprobs
    assert lp.tokens == ["token_id:5"] and lp.token_logprobs == [None] and lp.top_logprobs == [None]
    assert lp.text_offset == [0] and out.choices[0].model_extra["prompt_logprobs"] == [None]
    assert out.usage.prompt_tokens == 1 and out.usage.completion_tokens == 0
    generated = client.completions.create(model="teacher", prompt=[5], max_tokens=2, temperature=0,
                                          extra_body={"prompt_logprobs": 1})
    assert generated.choices[0].model_extra["prompt_logprobs"] == [None] and generated.usage.completion_tokens == 2


def test_stream_concatenates_to_the_answer(client):
    whole = chat(client, PROMPTS[1], temperature=0, max_tokens=12, logprobs=True)
    chunks = list(chat(client, PROMPTS[1], temperature=0, max_tokens=12, logprobs=True, stream=True,
                       stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert content == whole.choices[0].message.content
    assert [e.logprob for e in entries] == [e.logprob for e in whole.choices[0].logprobs.content]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    legacy = "".join(c.choices[0].text for c in client.completions.create(
        model="teacher", prompt=f"<|user|>{PROMPTS[1]}<|assistant|>", max_tokens=12, temperature=0, stream=True))
    assert legacy == whole.choices[0].message.content


def test_n_seed_and_stop(client, local):
    greedy = chat(client, PROMPTS[0], temperature=0, max_tokens=12, n=2)
    assert [c.message.content for c in greedy.choices] == [local[0].text] * 2 and [c.index for c in greedy.choices] == [0, 1]
    sampled = [[c.message.content for c in chat(client, PROMPTS[2], temperature=1.5, max_tokens=12, n=4, seed=s).choices]
               for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2] and len(set(sampled[0])) > 1
    text = local[0].text
    stop = text[len(text) // 2]
    cut = chat(client, PROMPTS[0], temperature=0, max_tokens=12, stop=[stop, "never"], logprobs=True, extra_body=IDS)
    choice = cut.choices[0]
    assert choice.message.content == text[:text.index(stop)] and choice.finish_reason == "stop"
    assert ids_of(choice.logprobs.content) == local[0].token_ids[:text.index(stop) + 1]  # through the stop's token
    assert cut.usage.completion_tokens == text.index(stop) + 1


def test_bad_requests_are_openai_errors_without_tracebacks(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, PROMPTS[0], logprobs=True, top_logprobs=21)
    assert "top_logprobs" in e.value.body["message"] and e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        chat(client, PROMPTS[0], max_tokens=1000)
    for bad in ({"n": 0}, {"extra_body": {"tools": [{"type": "function", "function": {"name": "f"}}]}},
                {"extra_body": {"top_k": 5}}, {"extra_body": {"repetition_penalty": 1.2}}):
        with pytest.raises(openai.BadRequestError):
            chat(client, PROMPTS[0], **bad)
    for messages in ([{"role": "bogus", "content": "hi"}],
                     [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                             "function": {"name": "f", "arguments": "{}"}}]},
                      {"role": "tool", "content": "42", "tool_call_id": "1"}]):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="teacher", messages=messages)
    # null means the default, as the official client sends it for None
    r = httpx.post(server[1] + "/chat/completions", json={"model": "teacher", "temperature": None, "n": None,
                   "logprobs": None, "stream": None, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    for body in (b"{not json", b"[1, 2]", b'{"model": "teacher", "messages": [{"role": "user", "content": 5}]}',
                 b"[" * 100_000, b'{"model": "te\xffacher"}', b"",
                 b'{"model": "teacher", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}'):
        for headers in ({}, {"content-type": "application/json"}):
            r = httpx.post(server[1] + "/chat/completions", content=body, headers=headers)
            assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["param"] in (None, "messages")  # OpenAI's param: a string or null
            assert "Traceback" not in r.text
    r = httpx.post(server[1] + "/chat/completions", content=b"{not json", headers=JSON)
    assert r.json()["error"]["param"] is None and "not valid JSON" in r.json()["error"]["message"]
    ok = json.dumps({"model": "teacher", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
    for headers in ({}, {"content-type": "text/plain"}):  # as FastAPI: a web page may send text/plain unasked (CSRF)
        r = httpx.post(server[1] + "/chat/completions", content=ok, headers=headers)
        assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
    assert httpx.post(server[1] + "/chat/completions", content=ok, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
    with pytest.raises(PotstillError, match="pick another --port"):
        bind("127.0.0.1", int(server[1].split(":")[-1].removesuffix("/v1")))


def test_concurrent_requests_are_batched_and_answer_as_alone(server, client, local):
    app, url = server

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(
                model="teacher", messages=[{"role": "user", "content": p}], temperature=0, max_tokens=12,
                logprobs=True, top_logprobs=5, extra_body=IDS) for p in PROMPTS))

    before = app.state.batcher.batches
    answers = asyncio.run(ask_all())
    assert app.state.batcher.batches - before < len(PROMPTS)
    for out, ref in zip(answers, local):
        entries = out.choices[0].logprobs.content
        assert out.choices[0].message.content == ref.text and ids_of(entries) == ref.token_ids
        assert [ids_of(e.top_logprobs) for e in entries] == ref.topk_ids.tolist()
        # batches of other sizes and paddings than LocalModel's: equal up to float32 rounding
        got = [x.logprob for e in entries for x in e.top_logprobs]
        assert got == pytest.approx(ref.topk_logprobs.ravel().tolist(), rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_requests_of_clients_that_went_away_are_not_run():
    """A client that times out (and would retry) leaves no work behind in a batch not yet started."""
    serving = running(build_app(TEACHER, model_name="teacher", batch_wait_ms=1500))
    app, url = next(serving)
    impatient = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=0.3)
    for p in PROMPTS[:3]:
        with pytest.raises(openai.APITimeoutError):
            chat(impatient, p, temperature=0, max_tokens=4)
    time.sleep(2.0)  # past the batch wait: the batch would have run by now
    assert app.state.batcher.batches == 0
    assert chat(openai.OpenAI(base_url=url, api_key="unused", max_retries=0), PROMPTS[0], temperature=0,
                max_tokens=4).choices[0].message.content is not None
    assert app.state.batcher.batches == 1
    next(serving, None)  # shut it down


def test_seeded_sampled_requests_are_batched_too(server):
    """potstill sends a seed with every request: sampled ones must still share batches."""
    app, url = server

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(
                model="teacher", messages=[{"role": "user", "content": p}], temperature=1.0, max_tokens=12,
                seed=1000 + i) for i, p in enumerate(PROMPTS)))

    before = app.state.batcher.batches
    assert all(a.choices[0].message.content is not None for a in asyncio.run(ask_all()))
    assert app.state.batcher.batches - before < len(PROMPTS)


@pytest.mark.slow
def test_served_teacher_distills_like_the_local_one(server, tmp_path):
    """The bundled teacher behind `potstill serve` as an HTTP teacher: the ledger holds the same
    ids and top-k as the local backend's, and the KD students trained from either match."""
    import numpy as np

    from helpers import tiny_overrides
    from potstill.generate import generate
    from potstill.ledger import Ledger
    from potstill.recipe import load_recipe
    from potstill.train import train

    common = ["generation.temperature=0", "generation.top_logprobs=20"]
    local = load_recipe(QUICKSTART / "recipe.yaml", [*tiny_overrides(tmp_path / "local", 48), *common])
    http = load_recipe(QUICKSTART / "recipe.yaml", [
        *tiny_overrides(tmp_path / "http", 48), *common, "teacher.backend=openai", "teacher.model=teacher",
        f"teacher.endpoints=[{server[1]}]", "teacher.token_ids=true", "teacher.concurrency=16"])
    for recipe in (local, http):
        assert generate(recipe)["done"] == 48
    with Ledger(tmp_path / "local" / "ledger.sqlite") as a, Ledger(tmp_path / "http" / "ledger.sqlite") as b:
        pairs = list(zip(a.examples(), b.examples()))
        assert [d["backend"] for d in b.teachers().values()] == ["openai"]
    assert len(pairs) == 48
    for x, y in pairs:
        assert x.messages == y.messages and x.text == y.text and x.finish_reason == y.finish_reason
        assert (x.token_ids == y.token_ids).all() and (x.topk_ids == y.topk_ids).all()
        assert np.abs(x.topk_logprobs - y.topk_logprobs).max() < 2e-2  # float16 steps near -10; batches differ in padding
    students = [train(recipe, recipe.train) for recipe in (local, http)]
    from safetensors.torch import load_file

    wa, wb = (load_file(str(s / "model.safetensors")) for s in students)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3
    logs = [[json.loads(line) for line in (s.parent / "logs" / "student.jsonl").read_text().splitlines()]
            for s in students]
    steps = [[r["loss"] for r in log if "loss" in r] for log in logs]
    assert steps[0] and np.allclose(steps[0], steps[1], rtol=1e-3)


def test_prompt_scores_are_the_same_chunked(server, monkeypatch):
    import potstill.serve.batcher

    served = server[0].state.served
    ids = served.tokenizer(PROMPTS[0] + " " + PROMPTS[1])["input_ids"]
    whole = potstill.serve.batcher.score_prompt(served, ids, 5)
    monkeypatch.setattr(potstill.serve.batcher, "SCORE_CHUNK", 3)
    chunked = potstill.serve.batcher.score_prompt(served, ids, 5)
    for field in ("logprobs", "ranks", "top_ids", "top_logprobs"):
        assert (getattr(whole, field) == getattr(chunked, field)).all()
    assert len(whole.logprobs) == len(ids) - 1


@pytest.fixture(scope="module")
def keyed():
    """A server that wants the API key "s3cret"; yields (app, base url)."""
    yield from running(build_app(TEACHER, model_name="teacher", api_key="s3cret"))


def test_api_key_is_checked_on_every_route_as_openai_does(keyed):
    app, url = keyed
    ok = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
    assert chat(ok, PROMPTS[0], temperature=0, max_tokens=2).choices[0].message.content is not None
    for key in ("wrong", "s3cre", "s3cret2"):
        with pytest.raises(openai.AuthenticationError) as e:
            chat(openai.OpenAI(base_url=url, api_key=key, max_retries=0), PROMPTS[0], max_tokens=2)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    for path in ("/health", "/v1/models", "/nowhere"):
        r = httpx.get(url.removesuffix("/v1") + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["param"] is None
    assert httpx.get(url + "/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_the_auth_scheme_is_case_insensitive(keyed):
    """RFC 7235: "bearer" is the scheme "Bearer" in any case, and one or more spaces end it; the key
    itself is compared exactly."""
    url = keyed[1]
    for header in ("bearer s3cret", "BEARER s3cret", "bEaReR s3cret", "Bearer  s3cret"):
        assert httpx.get(url + "/models", headers={"Authorization": header}).status_code == 200, header
    for header in ("Basic s3cret", "bearer S3CRET", "bearer s3cre", "Bearers3cret", "s3cret", "bearer", ""):
        r = httpx.get(url + "/models", headers={"Authorization": header})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", header


def test_one_request_cannot_knock_the_server_over():
    """Bodies over the cap are refused unread (with a length or chunked), texts that cannot fit the
    context are refused by length before they are tokenized, and prompts x n is one batch at most."""
    serving = running(build_app(TEACHER, model_name="teacher", max_body_mb=1))
    app, url = next(serving)
    served = app.state.served
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    huge = "x" * (3 << 20)
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, huge, max_tokens=1)
    assert e.value.status_code == 413 and e.value.code == "request_too_large"

    def chunks():  # no content-length: counted as it arrives
        yield b'{"model": "teacher", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}]}'

    r = httpx.post(url + "/chat/completions", content=chunks(), headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    too_long = "x" * (served.context * served.longest_token + 1)  # under the body cap, over what the context holds
    for ask in (lambda: chat(client, too_long, max_tokens=1),
                lambda: client.completions.create(model="teacher", prompt=["hi", too_long], max_tokens=1)):
        with pytest.raises(openai.BadRequestError) as e:
            ask()
        assert e.value.code == "context_length_exceeded" and "characters" in e.value.body["message"]
    assert time.monotonic() - start < 10
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="teacher", prompt=["hi"] * 17, n=2, max_tokens=1)
    assert "max batch size" in e.value.body["message"]
    assert len(client.completions.create(model="teacher", prompt=["hi"] * 16, n=2, max_tokens=1).choices) == 32
    next(serving, None)


def test_a_lone_surrogate_is_a_400_naming_its_field(server):
    """JSON can escape half of a UTF-16 pair ("\\ud800"), which is no character and which a tokenizer
    cannot encode: the client's mistake, so a 400 naming where it is (a 5xx would be retried), whether
    escaped or sent as its UTF-8-style bytes. A whole pair is an ordinary character."""
    url = server[1]
    chat_body = '{"model": "teacher", "max_tokens": 1, "messages": [{"role": "user", "content": %s}]}'
    completion_body = '{"model": "teacher", "max_tokens": 1, "prompt": %s}'
    for path, body, value, where in (
            ("/chat/completions", chat_body, '"a\\ud800b"', "messages[0].content"),
            ("/chat/completions", chat_body, '"\\udfff"', "messages[0].content"),
            ("/chat/completions", chat_body, '[{"type": "text", "text": "a\\udc00"}]', "messages[0].content[0].text"),
            ("/completions", completion_body, '"a\\ud800"', "prompt"),
            ("/completions", completion_body, '["hi", "\\ud800\\ud800"]', "prompt[1]")):
        for raw in ((body % value).encode(), (body % value).encode().replace(b"\\ud800", b"\xed\xa0\x80")):
            r = httpx.post(url + path, content=raw, headers=JSON)
            assert r.status_code == 400, (raw, r.text)
            error = r.json()["error"]
            assert error["param"] == where.split("[")[0] and error["type"] == "invalid_request_error"
            assert f"{where}: " in error["message"] and "lone surrogate" in error["message"], error
    paired = (chat_body % '"a\\ud83d\\ude00b"').encode()  # U+1F600, escaped as JSON escapes it
    assert httpx.post(url + "/chat/completions", content=paired, headers=JSON).status_code == 200


def test_message_and_prompt_counts_are_refused_before_they_are_validated():
    """Bodies under the size cap can still hold 100,000s of tiny messages (once 400 MiB and 4 s of
    the event loop for 15 MB) or of token ids: counted in the parsed JSON, before any pydantic object,
    template or tokenizer, and refused in one line naming the limit."""
    serving = running(build_app(TEACHER, model_name="teacher", max_messages=64))
    app, url = next(serving)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    many = json.dumps({"model": "teacher", "max_tokens": 1, "messages": [{"role": "user", "content": ""}] * 100_000})
    start = time.monotonic()
    r = httpx.post(url + "/chat/completions", content=many, headers=JSON, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "array_above_max_length" and error["param"] == "messages"
    assert "100,000 messages" in error["message"] and "--max-messages" in error["message"]
    with pytest.raises(openai.BadRequestError) as e:  # content parts count as messages do
        client.chat.completions.create(model="teacher", max_tokens=1, messages=[
            {"role": "user", "content": [{"type": "text", "text": ""}] * 40}] * 2)
    assert "80 content parts" in e.value.body["message"] and "--max-messages" in e.value.body["message"]
    for prompt in ([1] * 1_000_000, [[1] * 65]):  # ids: the context (64) bounds them before they are validated
        r = httpx.post(url + "/completions", content=json.dumps({"model": "teacher", "prompt": prompt, "max_tokens": 0}),
                       headers=JSON, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "tokens" in r.json()["error"]["message"]
    assert time.monotonic() - start < 5  # the old server took ~3 s for the 100,000 messages alone
    assert len(client.chat.completions.create(model="teacher", max_tokens=1, messages=[
        {"role": "user", "content": "hi"}] * 16).choices) == 1
    next(serving, None)


def test_a_large_body_is_prepared_aside_while_small_ones_are_answered(server, monkeypatch):
    """Bodies are parsed, validated and tokenized off the event loop, those over 1 MiB one at a time
    and apart from the smaller ones. While a large body's prompt is being tokenized (held here, so
    that "meanwhile" does not depend on the machine's speed), /health answers, a small chat request
    is answered, and a second large body waits its turn (the old server had every request wait
    behind the one prompt being tokenized)."""
    import concurrent.futures

    import potstill.serve.app as serve_app

    app, url = server
    entered, release = [], threading.Event()
    tokenize = serve_app.completion_prompts

    def held(served, prompt):
        if prompt in ("large 1", "large 2"):
            entered.append(prompt)
            release.wait(30)
        return tokenize(served, prompt)

    monkeypatch.setattr(serve_app, "completion_prompts", held)
    served, arrived = app.state.served, []
    prepare = served.prepare

    async def counted(fn, raw):
        arrived.append(len(raw))
        return await prepare(fn, raw)

    monkeypatch.setattr(served, "prepare", counted)
    # allowed: 1.2 MB under the 16 MB cap, the rest of it in a field the server ignores
    large = [json.dumps({"model": "teacher", "prompt": f"large {i}", "max_tokens": 1, "padding": "x" * 1_200_000})
             for i in (1, 2)]
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=10)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(httpx.post, url + "/completions", content=large[0], headers=JSON, timeout=60)
            deadline = time.monotonic() + 10
            while not entered and time.monotonic() < deadline:
                time.sleep(0.01)
            assert entered == ["large 1"]
            second = pool.submit(httpx.post, url + "/completions", content=large[1], headers=JSON, timeout=60)
            sent = time.monotonic()
            assert httpx.get(url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
            assert chat(client, PROMPTS[0], temperature=0, max_tokens=2).choices[0].message.content is not None
            assert time.monotonic() - sent < 5  # a few ms alone; generous for a busy machine
            while sum(n > 1 << 20 for n in arrived) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # time enough for the second large body to start, were it not waiting
            assert entered == ["large 1"] and not first.done() and not second.done()
        finally:
            release.set()
        assert first.result().status_code == second.result().status_code == 200
    assert entered == ["large 1", "large 2"]


@pytest.mark.slow
def test_serve_checks_its_port_before_loading_and_warns_when_exposed(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cli = [sys.executable, "-m", "potstill.cli", "serve"]
    done = subprocess.run([*cli, str(tmp_path / "no-model"), "--port", "87112"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2 and "--port: '87112' is not a port" in done.stderr and "no-model" not in done.stderr
    done = subprocess.run([*cli, str(TEACHER), "--api-key-env", "POTSTILL_TEST_UNSET_KEY"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 2 and "POTSTILL_TEST_UNSET_KEY" in done.stderr and "Traceback" not in done.stderr
    proc = subprocess.Popen([*cli, str(TEACHER), "--host", "0.0.0.0", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "potstill serve: teacher at http://0.0.0.0:" in proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "without an API key" in err


def test_a_padded_vocabulary_is_never_served_nor_scored(tmp_path):
    """A Qwen-style model with logit rows past its tokenizer: sampled answers, prompt scores and
    their top-k stay on the tokenizer's ids, and a prompt id in the padding is refused."""
    from helpers import tiny_teacher

    folder = tiny_teacher(tmp_path / "padded", "qwen2", padding_rows=64)
    serving = running(build_app(folder, model_name="padded"))
    app, url = next(serving)
    served = app.state.served
    n_tok = len(served.tokenizer)
    ids = served.tokenizer(PROMPTS[0])["input_ids"]
    s = potstill_serve.score_prompt(served, ids, 5)
    assert (s.top_ids < n_tok).all()
    # the padding rows hold twice a real logit: over all rows, the chosen tokens would look unlikely
    with torch.no_grad():
        full = served.model(input_ids=torch.tensor([ids])).logits[0, :-1, :n_tok].float().log_softmax(-1)
    assert np.allclose(s.logprobs, full.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy(), atol=1e-5)
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    out = c.completions.create(model="padded", prompt=ids, max_tokens=8, temperature=1.0, seed=3, logprobs=5,
                               extra_body=IDS)
    assert all(int(t.removeprefix("token_id:")) < n_tok for t in out.choices[0].logprobs.tokens)
    with pytest.raises(openai.BadRequestError, match="outside the model's vocabulary"):
        c.completions.create(model="padded", prompt=[n_tok + 3], max_tokens=1)
    next(serving, None)


def test_serve_options_are_one_spec_checked_before_the_port_and_the_model(capsys):
    """The `serve` flags fill one ServeSpec, with the same defaults, and a bad value is one line
    (exit 2) before anything is bound or loaded: the port given is taken, and the folder does not exist."""
    import dataclasses

    from potstill.cli import build_parser, main
    from potstill.serve import ServeSpec

    args = build_parser().parse_args(["serve", "folder"])
    for f in dataclasses.fields(ServeSpec):
        if f.name not in ("device", "api_key", "watermark"):  # device: "auto" is resolved; the last two have other flags
            assert getattr(args, f.name) == f.default, f.name
    taken = bind("127.0.0.1", 0)
    port = str(taken.getsockname()[1])
    try:
        for flags, said in ((["--batch-wait-ms", "-1"], "batch wait must be 0 ms or more"),
                            (["--max-batch-size", "0"], "max batch size must be at least 1"),
                            (["--max-body-mb", "0"], "max body size must be more than 0 MB"),
                            (["--max-messages", "0"], "max messages must be at least 1"),
                            (["--api-key", " "], "the API key is empty")):
            assert main(["serve", "no-such-folder", "--port", port, *flags]) == 2
            err = capsys.readouterr().err
            assert said in err and "cannot listen" not in err and "no-such-folder" not in err, err
    finally:
        taken.close()
    with pytest.raises(PotstillError, match="dtype 'int8'"):
        ServeSpec(dtype="int8")

"""What the ledger keeps from an endpoint that names tokens by their strings (OpenAI): each
generated token's raw bytes and logprob and the top-k's bytes and logprobs, exactly, a character
split between tokens included; and every body that cannot be kept so is malformed, with its
reason, never stored."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import QUICKSTART
from mock_endpoint import MockEndpoint
from potstill.generate import generate
from potstill.ledger import Ledger
from potstill.recipe import load_recipe
from potstill.records import Request
from potstill.teachers.openai.wire import Malformed, parse_response, request_body

K = 5
SMILE = " café 🙂"  # é is 2 bytes, 🙂 4: two-byte tokens split the emoji over three tokens


def chunks(text: str) -> list[bytes]:
    """The mock's tokens: two bytes of UTF-8 each, whatever the characters."""
    raw = text.encode()
    return [raw[i:i + 2] for i in range(0, len(raw), 2)]


def spelled(b: bytes) -> str:
    """A token's string as OpenAI writes one that is not text on its own."""
    try:
        return b.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class OpenAILike(MockEndpoint):
    """Answers as OpenAI's chat API does: tokens named by strings, with their ``bytes`` (or null
    ones, ``send_bytes=False``), no ids; the k alternatives are the token itself and "~1", "~2",
    ... ``spoil`` edits each answer's ``logprobs.content``."""

    def __init__(self, spoil=None, send_bytes=True):
        super().__init__(rule=lambda prompt: prompt[::-1][:8] + SMILE)
        self.spoil, self.send_bytes = spoil, send_bytes

    def completion(self, body, nan=False, rule=None):
        answer = MockEndpoint.completion({**body, "logprobs": False}, rule=rule)  # the text, finish and usage
        k = body.get("top_logprobs") or 0

        def entry(b: bytes, lp: float) -> dict:
            return {"token": spelled(b), "logprob": lp, "bytes": list(b) if self.send_bytes else None}

        content = [{**entry(b, -0.1), "top_logprobs": [entry(b, -0.1), *(entry(f"~{j}".encode(), -1.0 - j)
                                                                           for j in range(1, k))]}
                   for b in chunks(answer["choices"][0]["message"]["content"])]
        if self.spoil:
            self.spoil(content)
        answer["choices"][0]["logprobs"] = {"content": content} if body.get("logprobs") else None
        return answer


@pytest.fixture
def endpoint():
    started = []

    def start(**kw):
        started.append(OpenAILike(**kw).start_in_thread())
        return started[-1]

    yield start
    for m in started:
        m.stop_thread()


def recipe_for(out: Path, m, n: int, *extra: str):
    return load_recipe(QUICKSTART / "recipe.yaml", [
        f"output_dir={out}", f"prompts.limit={n}", "teacher.backend=openai", "teacher.model=mock",
        f"teacher.endpoints=[{m.url}]", "teacher.concurrency=4", f"generation.top_logprobs={K}",
        "generation.max_new_tokens=32", *extra])


@pytest.mark.parametrize("send_bytes", [True, False])
def test_bytes_and_logprobs_are_kept_exactly(endpoint, tmp_path, send_bytes):
    """Without bytes, a token's string is read as OpenAI's legacy API spells it (``bytes:\\xf0``)."""
    counts = generate(recipe_for(tmp_path, endpoint(send_bytes=send_bytes), 6))
    assert counts["done"] == 6 and counts["failed"] == 0
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        examples = list(ledger.examples())
        assert ledger.bytes_per_token() > 0
    for ex in examples:
        assert ex.text.endswith(SMILE) and ex.token_ids is None and ex.topk_ids is None
        tokens = ex.token_bytes.tolist()
        assert tokens == chunks(ex.text) and b"".join(tokens) == ex.text.encode()
        assert b"\xf0\x9f\x99\x82" in b"".join(tokens) and "🙂".encode() not in tokens  # split over tokens
        assert any(spelled(b).startswith("bytes:") for b in tokens)  # a token that is no text on its own
        assert ex.topk_bytes.shape == (len(tokens), K)
        assert ex.topk_bytes.tolist() == [[b, b"~1", b"~2", b"~3", b"~4"] for b in tokens]
        assert ex.topk_bytes[len(tokens) - 1][0] == tokens[-1]
        assert ex.token_logprobs.dtype == np.float16 and not ex.token_logprobs.flags.writeable
        assert ex.token_logprobs.tolist() == [np.float16(-0.1)] * len(tokens)
        assert ex.topk_logprobs.tolist() == [[np.float16(x) for x in (-0.1, -2, -3, -4, -5)]] * len(tokens)


def spoil(position: int, field: str, value, alternative: int | None = None):
    def edit(content):
        entry = content[position] if alternative is None else content[position]["top_logprobs"][alternative]
        entry[field] = value
    return edit


MALFORMED = {
    "bytes not the text": (spoil(1, "bytes", list(b"zz")), r"position 1: the tokens' bytes differ from the text's "
                                                           r"UTF-8 at byte 2"),
    "fewer alternatives": (lambda c: c[2]["top_logprobs"].pop(), r"position 2: 4 top_logprobs, asked for 5"),
    "an alternative twice": (spoil(0, "bytes", list(b"~1"), 2), r"position 0: top_logprobs hold b'~1' twice"),
    "NaN": (spoil(0, "logprob", float("nan"), 3), r"position 0 top_logprobs\[3\]: logprob nan is not a log-prob"),
    "+inf": (spoil(3, "logprob", float("inf")), r"position 3: logprob inf is not a log-probability"),
    "-inf": (spoil(0, "logprob", float("-inf"), 4), r"position 0 top_logprobs\[4\]: logprob -inf is not"),
    "-9999": (spoil(1, "logprob", -9999.0, 4), r"position 1 top_logprobs\[4\]: logprob -9999.0 is not"),
    "below -9999": (spoil(1, "logprob", -1e5), r"position 1: logprob -100000.0 is not"),
    "positive": (spoil(0, "logprob", 0.5), r"position 0: logprob 0.5 is not a log-probability"),
    "a byte over 255": (spoil(2, "bytes", [99, 256]), r"position 2: bytes \[99, 256\] are not byte values"),
    "a byte not an int": (spoil(2, "bytes", [99.0]), r"position 2: bytes \[99.0\] are not byte values"),
    "bytes not a list": (spoil(0, "bytes", "ab", 1), r"position 0 top_logprobs\[1\]: bytes ab are not byte values"),
    "an empty token": (spoil(0, "bytes", []), r"position 0: the token has no bytes, and is not the last"),
    "more than max tokens": (lambda c: c.extend(c[:1] * 40), r"logprob positions, more than max tokens \(32\)"),
}


@pytest.mark.parametrize("case", MALFORMED)
@pytest.mark.slow  # seconds of real retries, deadlines or processes: the full suite runs it
def test_each_malformed_body_fails_with_its_reason_and_is_never_stored(endpoint, tmp_path, case):
    edit, reason = MALFORMED[case]
    m = endpoint(spoil=edit)
    counts = generate(recipe_for(tmp_path, m, 3))
    assert counts["done"] == 0 and counts["failed"] == 3
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        failures = ledger.failures()
        assert list(ledger.examples()) == [] and ledger.counts()["done"] == 0
        outcomes = ledger.db.execute("SELECT outcome, http_status, error FROM attempts").fetchall()
    assert len(failures) == 3
    for why in failures.values():
        assert why.startswith("gave up after 3 attempts: malformed response: "), why
        assert re.search(reason, why), why
    assert len(outcomes) == 9 and {o[:2] for o in outcomes} == {("retry", 200)}  # retried twice, then failed
    assert len(m.log) == 9


def teacher(*extra: str):
    return load_recipe(QUICKSTART / "recipe.yaml", ["teacher.backend=openai", "teacher.model=m",
                                                    "teacher.endpoints=[http://x/v1]", *extra]).teacher


REQUEST = Request("ab" * 32, [{"role": "user", "content": "q"}], 0, 0)


def test_top_k_asks_for_logprobs_with_or_without_ids():
    params = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 5, "seed": 0}
    chat = request_body(REQUEST, params, teacher(), None)
    assert chat["logprobs"] is True and chat["top_logprobs"] == 5 and "return_tokens_as_token_ids" not in chat
    assert request_body(REQUEST, {**params, "top_logprobs": 50}, teacher(), None)["top_logprobs"] == 20  # OpenAI's cap
    plain = request_body(REQUEST, {**params, "top_logprobs": 0}, teacher(), None)
    assert "logprobs" not in plain and "top_logprobs" not in plain
    ids = teacher("teacher.token_ids=true", f"teacher.tokenizer={QUICKSTART / 'teacher'}")
    assert request_body(REQUEST, params, ids, None) == {  # as it always was
        "model": "m", "temperature": 1.0, "top_p": 1.0, "seed": request_body(REQUEST, params, ids, None)["seed"],
        "n": 1, "messages": REQUEST.messages, "max_completion_tokens": 8, "logprobs": True, "top_logprobs": 5,
        "return_tokens_as_token_ids": True}


def test_legacy_completions_without_bytes_read_strings_and_byte_escapes():
    """The legacy API has no bytes: a token is its string's UTF-8, or the bytes ``bytes:\\x..`` spells."""
    data = {"choices": [{"text": "a🙂", "finish_reason": "stop", "logprobs": {
        "tokens": ["a", "bytes:\\xf0\\x9f", "bytes:\\x99\\x82"], "token_logprobs": [-0.5, -0.25, -3.0],
        "top_logprobs": [{"a": -0.5, "b": -1.5}, {"bytes:\\xf0\\x9f": -0.25, "é": -2.0},
                         {"x": -0.125, "bytes:\\x99\\x82": -3.0, "y": -4.0}]}}]}
    c = parse_response(REQUEST, data, {"top_logprobs": 2, "max_new_tokens": 3}, teacher("teacher.api=completions"),
                       0.0, (3, 3))
    assert c.token_bytes == [b"a", b"\xf0\x9f", b"\x99\x82"] and c.token_ids is None
    assert c.topk_bytes == [[b"a", b"b"], [b"\xf0\x9f", "é".encode()], [b"x", b"\x99\x82"]]
    assert c.token_logprobs.tolist() == [-0.5, -0.25, -3.0]  # the sampled token, outside the top-2 at position 2
    assert c.topk_logprobs.tolist() == [[-0.5, -1.5], [-0.25, -2.0], [-0.125, -3.0]]
    data["choices"][0]["logprobs"]["token_logprobs"] = None
    with pytest.raises(Malformed, match=r"position 0: logprob None is not a log-probability"):
        parse_response(REQUEST, data, {"top_logprobs": 2, "max_new_tokens": 3}, teacher("teacher.api=completions"),
                       0.0, (3, 3))


def test_a_stop_string_the_endpoint_cut_off_may_follow_the_text():
    """vLLM returns the tokens through the stop string and cuts the text before it."""
    def body(text, tokens, finish="stop"):
        content = [{"token": t, "logprob": -0.5, "bytes": list(t.encode()),
                    "top_logprobs": [{"token": t, "logprob": -0.5, "bytes": list(t.encode())}]} for t in tokens]
        return {"choices": [{"message": {"content": text}, "finish_reason": finish, "logprobs": {"content": content}}]}

    params = {"top_logprobs": 1, "max_new_tokens": 8, "stop": ["\n\n"]}
    c = parse_response(REQUEST, body("ab.", ["a", "b.\n\n"]), params, teacher(), 0.0, (1, 2))
    assert c.token_bytes == [b"a", b"b.\n\n"] and c.text == "ab."
    for text, tokens, finish in [("ab", ["a", "b", "c"], "stop"), ("ab", ["a", "b\n\n"], "length")]:
        with pytest.raises(Malformed, match="bytes differ from the text"):
            parse_response(REQUEST, body(text, tokens, finish), params, teacher(), 0.0, (1, 2))


def test_token_ids_keep_ids_and_now_the_chosen_logprobs():
    data = {"choices": [{"message": {"content": "ab"}, "finish_reason": "length", "logprobs": {"content": [
        {"token": f"token_id:{i}", "logprob": lp, "bytes": list(f"token_id:{i}".encode()), "top_logprobs": [
            {"token": f"token_id:{j}", "logprob": -0.1 * (1 + n), "bytes": None} for n, j in enumerate((i, 9))]}
        for i, lp in ((5, -0.1), (6, -0.2))]}}]}
    ids = teacher("teacher.token_ids=true", f"teacher.tokenizer={QUICKSTART / 'teacher'}")
    c = parse_response(REQUEST, data, {"top_logprobs": 2, "max_new_tokens": 2}, ids, 0.0, (1, 2), vocab=41)
    assert c.token_ids == [5, 6] and c.topk_ids.tolist() == [[5, 9], [6, 9]]
    assert c.token_bytes is None and c.topk_bytes is None  # the bytes of "token_id:5" say nothing
    assert c.token_logprobs.tolist() == pytest.approx([-0.1, -0.2])
    data["choices"][0]["logprobs"]["content"][1]["top_logprobs"][1]["token"] = "token_id:6"
    with pytest.raises(Malformed, match=r"position 1: top_logprobs hold 6 twice"):
        parse_response(REQUEST, data, {"top_logprobs": 2, "max_new_tokens": 2}, ids, 0.0, (1, 2), vocab=41)


def test_a_body_the_mock_sends_is_what_openai_documents():
    """The mock's shape, checked against the official client's types: what OpenAI sends."""
    from openai.types.chat import ChatCompletion

    answer = OpenAILike().completion({"messages": [{"role": "user", "content": "hello there"}], "logprobs": True,
                                      "top_logprobs": K, "max_completion_tokens": 32})
    parsed = ChatCompletion.model_validate(json.loads(json.dumps(answer)))
    assert [bytes(e.bytes) for e in parsed.choices[0].logprobs.content] == chunks(parsed.choices[0].message.content)

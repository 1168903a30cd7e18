"""`potstill quickstart --student-tokenizer bpe`: the student has its own byte-level BPE, the bundled
teacher is served by `potstill serve` and asked as OpenAI is (bytes and top-20 logprobs, no ids),
the KD student trains on that top-20 mapped onto its tokens and the SFT baseline on the text; the
server is stopped however the run ends, and a rerun resends nothing."""

import json
import socket
import urllib.request

import pytest
from transformers import AutoTokenizer

from potstill.align import encode_with_offsets, token_bytes
from potstill.cli import main
from potstill.errors import PotstillError
from potstill.ledger import Ledger
from potstill.prompts import load_prompts
from potstill.quickstart_cross import BPE_TOKENS, HOST, MODEL_NAME, pick_port, train_bpe

from helpers import QUICKSTART, TEACHER, tiny_overrides


def tiny(out) -> list[str]:
    return [o for o in tiny_overrides(out, n_prompts=48, n_eval=24) if not o.startswith("output_dir")]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def test_a_rerun_gets_the_earlier_port_back_while_connections_the_server_closed_linger(tmp_path):
    record = tmp_path / "served-teacher.json"
    port = pick_port(record)
    with socket.socket() as server:  # the earlier server: it closes its side first, leaving TIME_WAIT on its port
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((HOST, port))
        server.listen()
        client = socket.create_connection((HOST, port))
        accepted, _ = server.accept()
        accepted.close()
    try:
        assert pick_port(record) == port
        with socket.socket() as other:  # a port another process listens on is not taken over
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            other.bind((HOST, port))
            other.listen()
            assert pick_port(record) != port
    finally:
        client.close()


def test_the_bpe_is_trained_on_the_prompts_the_same_each_time_and_spells_any_text(tmp_path):
    texts = [p.messages[0][1] for p in load_prompts(QUICKSTART / "prompts" / "train.jsonl")]
    a, b = train_bpe(texts, TEACHER, tmp_path / "a"), train_bpe(texts, TEACHER, tmp_path / "b")
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()  # seeds share one tokenizer
    tok = AutoTokenizer.from_pretrained(a)
    assert len(tok) == BPE_TOKENS and tok.eos_token == "<|end|>" and tok.pad_token == "<pad>"
    teacher = AutoTokenizer.from_pretrained(TEACHER)
    chat = [{"role": "user", "content": "sort 78368"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        teacher.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert len(tok("36788")["input_ids"]) < 5  # digit pairs merged: the student's tokens are not the teacher's characters
    pieces = token_bytes(tok)
    for text in ("36788", "shuffle aqp", "café 🙂 ok"):  # any byte: every answer of any teacher maps onto it
        ids, offsets = encode_with_offsets(tok, text, pieces)
        assert b"".join(pieces[i] for i in ids) == text.encode() and offsets[-1][1] == len(text.encode())


@pytest.mark.slow
def test_quickstart_with_a_bpe_student_asks_the_served_teacher_as_openai_and_trains_across_tokenizers(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--student-tokenizer", "bpe", "--out", str(out), *tiny(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    port = json.loads((out / "served-teacher.json").read_text())["port"]
    assert f"served by `potstill serve` at http://{HOST}:{port}/v1" in printed
    assert "logit KD across tokenizers (potstill.align)" in printed and "│ baseline │" in printed
    assert not listening(port)  # stopped at the end
    with Ledger(out / "ledger.sqlite") as ledger:
        [teacher] = ledger.teachers().values()
        examples = list(ledger.examples())
    assert teacher["backend"] == "openai" and teacher["token_ids"] is False and teacher["model"] == MODEL_NAME
    assert teacher["endpoint"] == f"http://{HOST}:{port}/v1" and len(examples) == 48
    for ex in examples:  # as OpenAI answers: bytes and logprobs, no ids
        assert ex.token_ids is None and ex.topk_ids is None
        assert b"".join(ex.token_bytes.tolist()).startswith(ex.text.encode())
        assert ex.topk_bytes.shape == (len(ex.token_bytes), 20) and ex.token_logprobs is not None
    bpe = AutoTokenizer.from_pretrained(out / "student-tokenizer")
    for name, objective in (("student", "kd"), ("baseline", "sft")):
        info = json.loads((out / name / "potstill.json").read_text())
        assert info["tokenizers"] == "different" and info["objective"] == objective
        assert AutoTokenizer.from_pretrained(out / name).get_vocab() == bpe.get_vocab()
    models = json.loads((out / "eval.json").read_text())["models"]
    assert models["teacher"]["accuracy"] > 0 and models["student"]["kl_per_token"] is None  # n/a across tokenizers

    # a rerun serves on the same port, so the ledger's answers (keyed by the endpoint) are reused
    assert main(["quickstart", "--student-tokenizer", "bpe", "--out", str(out), *tiny(out)]) == 0
    again = capsys.readouterr().out
    assert "generate: sent 0" in again, again
    assert "train: student is up to date, kept" in again and "train: baseline is up to date, kept" in again
    assert not listening(port)


@pytest.mark.slow  # seconds of real retries, deadlines or processes: the full suite runs it
def test_the_server_is_stopped_when_the_run_fails(tmp_path, capsys, monkeypatch):
    import potstill.pipeline

    seen = {}

    def fails(recipe, **kw):
        [url] = recipe.teacher.endpoints
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as r:
            seen["status"] = r.status
        seen["port"] = int(url.rsplit(":", 1)[1].split("/")[0])
        raise PotstillError("stopped here")

    monkeypatch.setattr(potstill.pipeline, "run_all", fails)
    out = tmp_path / "qs"
    assert main(["quickstart", "--student-tokenizer", "bpe", "--out", str(out), *tiny(out)]) == 2
    assert "stopped here" in capsys.readouterr().err
    assert seen["status"] == 200 and not listening(seen["port"])

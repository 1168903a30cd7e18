"""`potstill serve` answers logprobs in OpenAI's shape for a byte-level BPE model: each entry's
``bytes`` are the token's raw bytes (part of a UTF-8 character for a token that ends inside one,
never the replacement character), read by the official openai client; and potstill's own HTTP
teacher, without token ids, keeps them in the ledger exactly."""

import json

import numpy as np
import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from helpers import QUICKSTART, running
from potstill.hf import prompt_ids
from potstill.records import Request
from potstill.serve import build_app
from potstill.serve.formats import piece_bytes, token_pieces
from potstill.teachers.openai.wire import parse_response

ANSWER = "café 🙂 ok"  # é and 🙂 are single bytes in this vocabulary: 2 and 4 tokens
TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def smiling(tmp_path_factory):
    """A tiny llama with a byte-level BPE (no merges across é or 🙂), overfit to answer "smile" with
    ANSWER and EOS."""
    folder = tmp_path_factory.mktemp("smiling")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the cat sat on the mat", "hello world", "sort these numbers"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<|user|>", "<|assistant|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<pad>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = TEMPLATE
    prompt = prompt_ids(tok, [{"role": "user", "content": "smile"}])  # as serve templates it
    answer = tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False))
    x = torch.tensor([prompt + answer])
    labels = torch.where(torch.arange(x.shape[1]) < len(prompt), -100, x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # a tiny model overfits one sequence in some 50 steps
        loss = model(input_ids=x, labels=labels).loss
        if loss.item() < 0.01:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(smiling):
    yield from running(build_app(smiling, model_name="smiling", batch_wait_ms=5))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0)


def own(tokenizer, i: int) -> bytes:
    """A byte-level BPE token's bytes, from its spelling in GPT-2's byte alphabet."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes({c: b for b, c in bytes_to_unicode().items()}[c] for c in tokenizer.convert_ids_to_tokens(i))


def ask(client, **kw):
    kw = {"temperature": 0, "max_tokens": 16, "logprobs": True, "top_logprobs": 5, **kw}
    return client.chat.completions.create(model="smiling", messages=[{"role": "user", "content": "smile"}], **kw)


def test_chat_bytes_are_each_tokens_raw_bytes(server, client):
    tokenizer = server[0].state.served.tokenizer
    plain, ids = ask(client), ask(client, extra_body={"return_tokens_as_token_ids": True})
    choice = plain.choices[0]
    entries, named = choice.logprobs.content, ids.choices[0].logprobs.content
    assert choice.message.content == ANSWER and choice.finish_reason == "stop"
    chosen = [int(e.token.removeprefix("token_id:")) for e in named]
    assert chosen[-1] == tokenizer.eos_token_id and entries[-1].bytes == [] and entries[-1].token == ""
    assert [bytes(e.bytes) for e in entries[:-1]] == [own(tokenizer, i) for i in chosen[:-1]]
    assert b"".join(bytes(e.bytes) for e in entries) == ANSWER.encode()
    assert "".join(e.token for e in entries) == ANSWER  # token strings: each token's share of the text, as before
    partial = [bytes(e.bytes) for e in entries if e.token == ""][:-1]  # no text of their own
    assert b"\xf0" in partial and all(b.decode("utf-8", "replace") == "\ufffd" for b in partial)
    for e, n in zip(entries, named):
        top_ids = [int(t.token.removeprefix("token_id:")) for t in n.top_logprobs]
        special = set(tokenizer.all_special_ids)
        assert [bytes(t.bytes) for t in e.top_logprobs] == [b"" if j in special else own(tokenizer, j) for j in top_ids]
        assert all(b"\xef\xbf\xbd" not in bytes(t.bytes) for t in e.top_logprobs)  # never the replacement character


def test_legacy_tokens_spell_partial_bytes_as_openai_does(server, client):
    """The legacy format has no bytes: a token that is no text on its own reads ``bytes:\\xf0``, and
    potstill's HTTP teacher reads the same bytes back from either format."""
    out = client.completions.create(model="smiling", prompt="<|user|>smile<|assistant|>", temperature=0,
                                    max_tokens=16, logprobs=3)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == ANSWER and "bytes:\\xf0" in lp.tokens and "bytes:\\xc3" in lp.tokens
    assert lp.text_offset[-1] == len(ANSWER)  # offsets count characters of the text, as before
    params = {"top_logprobs": 3, "max_new_tokens": 16}
    spec = type("Spec", (), {"api": "completions", "token_ids": False})
    legacy = parse_response(Request("ab" * 32, [], 0, 0), out.model_dump(), params, spec, 0.0, (1, 1))
    spec.api = "chat"
    chat = parse_response(Request("ab" * 32, [], 0, 0), ask(client, top_logprobs=3).model_dump(), params, spec,
                          0.0, (1, 1))
    assert legacy.token_bytes == chat.token_bytes and b"".join(chat.token_bytes) == ANSWER.encode()


def test_bytes_that_are_no_character_fall_back_to_the_text(server):
    """A lone continuation byte decodes to U+FFFD in the text; its entry's bytes are that text's, so
    the bytes still join to the text."""
    served = server[0].state.served
    tok = served.tokenizer
    ids = [tok.convert_tokens_to_ids(c) for c in ("a", "\u0124", "b")]  # "\u0124" spells byte 0x82 alone
    pieces = token_pieces(tok, ids, skip_special=True)
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == "a\ufffdb" and b"".join(piece_bytes(served, ids, pieces, True)) == text.encode()
    cafe = tok(ANSWER, add_special_tokens=False)["input_ids"]
    raw = piece_bytes(served, cafe, token_pieces(tok, cafe, skip_special=True), True)
    assert raw == [own(tok, i) for i in cafe] and b"".join(raw) == ANSWER.encode()


def test_an_http_teacher_without_ids_keeps_the_bytes(server, client, smiling, tmp_path):
    from potstill.generate import generate
    from potstill.ledger import Ledger
    from potstill.recipe import load_recipe

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "s0", "prompt": "smile"}) + "\n")
    recipe = load_recipe(QUICKSTART / "recipe.yaml", [
        f"output_dir={tmp_path / 'run'}", f"prompts.path={prompts}", "teacher.backend=openai",
        "teacher.model=smiling", f"teacher.path={smiling}", f"teacher.endpoints=[{server[1]}]",
        "generation.temperature=0", "generation.top_logprobs=5", "generation.max_new_tokens=16"])
    assert generate(recipe)["done"] == 1
    with Ledger(tmp_path / "run" / "ledger.sqlite") as ledger:
        [ex] = ledger.examples()
    entries = ask(client).choices[0].logprobs.content
    assert ex.text == ANSWER and ex.token_ids is None and ex.topk_ids is None
    assert ex.token_bytes.tolist() == [bytes(e.bytes) for e in entries]
    assert ex.topk_bytes.tolist() == [[bytes(t.bytes) for t in e.top_logprobs] for e in entries]
    # float16 as stored: steps of 2^-8 near -1, 2^-5 near -8
    assert np.abs(ex.token_logprobs - np.array([e.logprob for e in entries])).max() < 2e-3
    assert np.abs(ex.topk_logprobs - np.array([[t.logprob for t in e.top_logprobs] for e in entries])).max() < 2e-2

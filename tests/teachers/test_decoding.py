"""Decoding follows what the recipe states: not a folder's generation_config.json, never a padding
row of the vocabulary, never a folder's own Python code."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from potstill.errors import PotstillError
from potstill.ledger import teacher_key
from potstill.records import Request
from potstill.hf import LocalModel, load_model_dir

from helpers import TEACHER, tiny_teacher

PARAMS = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 5, "seed": 0}


def ask(teacher: LocalModel, n: int = 32, params: dict = PARAMS):
    requests = [Request(f"{i:064x}", [{"role": "user", "content": f"add {i} {i + 1}"}], 0, 0) for i in range(n)]
    return teacher.complete(requests, params)


def repeats(ids: list[int]) -> bool:
    return len(set(ids)) < len(ids)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_folders_generation_config_changes_nothing_unless_the_recipe_opts_in(tmp_path, model_type):
    plain = LocalModel(tiny_teacher(tmp_path / "plain", model_type))
    shipped = tiny_teacher(tmp_path / "shipped", model_type,
                           generation={"repetition_penalty": 1.05, "no_repeat_ngram_size": 1, "do_sample": False,
                                       "temperature": 0.1, "top_k": 3, "max_new_tokens": 2})
    expected = ask(plain)
    assert sum(repeats(c.token_ids) for c in expected) >= 8  # a random model repeats itself
    got = ask(LocalModel(shipped))
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert LocalModel(shipped).describe().get("generation_config") is None

    opted = LocalModel(shipped, use_generation_config=True)
    assert opted.describe()["generation_config"] == {"no_repeat_ngram_size": 1, "repetition_penalty": 1.05, "top_k": 3}
    assert teacher_key(opted.describe()) != teacher_key(LocalModel(shipped).describe())
    applied = ask(opted)
    assert not any(repeats(c.token_ids) for c in applied)  # the folder's n-gram ban, opted in
    assert {len(c.token_ids) for c in applied} != {2}  # generation.max_new_tokens still rules


def test_opting_out_keeps_the_teacher_key_it_always_had():
    desc = LocalModel(TEACHER).describe()
    assert "generation_config" not in desc and "code_sha256" not in desc
    identity = {"backend": "local", **{k: desc[k] for k in ("weights_sha256", "tokenizer_sha256",
                                                              "chat_template_sha256", "dtype")}}
    import hashlib

    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    assert teacher_key(desc) == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_padding_rows_are_never_sampled_nor_cached(tmp_path, model_type, temperature):
    teacher = LocalModel(tiny_teacher(tmp_path / "t", model_type, padding_rows=64))
    n_tok = len(teacher.tokenizer)
    assert teacher.model.get_output_embeddings().weight.shape[0] == n_tok + 64
    out = ask(teacher, 16, {**PARAMS, "temperature": temperature})
    assert all(max(c.token_ids) < n_tok for c in out)
    assert all(c.topk_ids.max() < n_tok for c in out)
    # the cached distribution is the one sampled from: over the tokenizer's ids, summing to <= 1
    mass = torch.tensor(out[0].topk_logprobs).exp().sum(-1)
    assert (mass <= 1.0 + 1e-3).all()


def test_a_folder_with_its_own_code_is_refused_and_the_code_never_runs(tmp_path, monkeypatch):
    folder = tiny_teacher(tmp_path / "custom", "llama")
    marker = tmp_path / "ran"
    (folder / "configuration_marker.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\nclass MarkerConfig(LlamaConfig):\n    model_type = 'marker'\n")
    (folder / "modeling_marker.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\nclass MarkerModel(LlamaForCausalLM):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="marker", auto_map={"AutoConfig": "configuration_marker.MarkerConfig",
                                                 "AutoModelForCausalLM": "modeling_marker.MarkerModel"})
    (folder / "config.json").write_text(json.dumps(config))
    asked = []
    # a user at a terminal who answers transformers' "[y/N]" with y
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(PotstillError, match=r"custom.*own Python code.*teacher.trust_remote_code") as err:
        load_model_dir(folder, "teacher")
    assert "\n" not in str(err.value)
    with pytest.raises(PotstillError, match="trust_remote_code"):
        LocalModel(folder)
    assert not marker.exists() and not asked


def test_training_data_with_an_id_outside_the_tokenizer_names_the_ledger_row(tmp_path):
    """A ledger written before padding rows were masked (or an import without a tokenizer) holds ids
    the student's embedding does not have: one clear error, not an IndexError mid-training."""
    import numpy as np

    from potstill.train.examples import build_examples
    from potstill.ledger import Ledger, requests_for
    from potstill.prompts import Prompt
    from potstill.records import Completion

    tok = AutoTokenizer.from_pretrained(TEACHER)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        key = ledger.register_teacher({"backend": "local", "weights_sha256": "w"})
        prompts = [Prompt((("user", f"add {i} 1"),)) for i in range(2)]
        params = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 2, "seed": 0}
        planned = requests_for(key, prompts, params)
        ledger.add_requests(key, planned, params)
        bad = planned[1][0]
        ledger.record(ledger.start_session(None), [
            Completion(h, "x", np.array(ids, np.int32), np.array([[i, 0] for i in ids], np.int32),
                       np.full((len(ids), 2), -1.0, np.float32), "length", 3, 0, 0.0)
            for h, ids in ((planned[0][0], [5, 6]), (bad, [5, len(tok) + 7]))])
        examples = list(ledger.examples())
    assert len(build_examples([e for e in examples if e.request_hash != bad], tok, same_tokenizer=True)) == 1
    with pytest.raises(PotstillError, match=rf"ledger request {bad}: token_ids holds id {len(tok) + 7}, outside "
                                            rf"the tokenizer's {len(tok)} ids"):
        build_examples(examples, tok, same_tokenizer=True)


def test_on_policy_samples_ignore_a_student_checkpoints_generation_config(tmp_path):
    from potstill.train.examples import TrainExample
    from potstill.train.loop import sample_from_student

    tok = AutoTokenizer.from_pretrained(TEACHER)
    plain = load_model_dir(tiny_teacher(tmp_path / "plain", "llama"))[0]
    shipped = load_model_dir(tiny_teacher(tmp_path / "shipped", "llama", generation={"no_repeat_ngram_size": 1}))[0]
    assert shipped.generation_config.no_repeat_ngram_size == 1
    batch = [TrainExample(tok(f"add {i} 1")["input_ids"], len(tok(f"add {i} 1")["input_ids"]), None, None)
             for i in range(16)]
    samples = []
    for model in (plain, shipped):
        torch.manual_seed(0)
        samples.append([ex.input_ids for ex in sample_from_student(model, batch, tok.pad_token_id, tok.eos_token_id, 12)])
    assert samples[0] == samples[1]
    assert any(repeats(ids[ex.n_prompt:]) for ids, ex in zip(samples[0], batch))

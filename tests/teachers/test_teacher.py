"""The bundled teacher and its task: loads as a Hugging Face model, and is as good as its card says."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from potstill.tasks import skillmix
from potstill.evaluate.run import greedy
from potstill.prompts import load_prompts
from potstill.hf import LocalModel

from helpers import QUICKSTART, TEACHER


def test_teacher_folder_is_hugging_face_format_and_small():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (TEACHER / name).is_file(), name
    assert sum(f.stat().st_size for f in TEACHER.iterdir()) <= 25 * 2**20
    model = AutoModelForCausalLM.from_pretrained(TEACHER)
    tok = AutoTokenizer.from_pretrained(TEACHER)
    assert 1_000_000 <= model.num_parameters() <= 5_000_000
    text = tok.apply_chat_template([{"role": "user", "content": "add 1 2"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>add 1 2<|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) == len("add 1 2") + 2


def test_teacher_beats_90_percent_on_a_held_out_sample():
    prompts = load_prompts(QUICKSTART / "prompts" / "heldout.jsonl")
    sample = random.Random(0).sample(prompts, 300)
    completions, _ = greedy(LocalModel(TEACHER), sample, max_new_tokens=12, batch_size=150)
    right = [skillmix.verify(p.text, c.text) for p, c in zip(sample, completions)]
    assert sum(right) / len(right) >= 0.90


def test_model_card_states_the_measured_accuracy():
    card = (TEACHER / "README.md").read_text()
    info = json.loads((TEACHER / "training.json").read_text())
    for skill in skillmix.SKILLS:
        assert f"| {skill} | {info['heldout_accuracy'][skill]:.1%} |" in card


def test_generator_is_seeded_and_the_verifier_checks_every_skill():
    assert skillmix.generate(50, seed=3) == skillmix.generate(50, seed=3)
    for ex in skillmix.generate(600, seed=4):
        assert skillmix.verify(ex["prompt"], ex["answer"]), ex
        assert not skillmix.verify(ex["prompt"], ex["answer"] + "1")
    assert skillmix.verify("shuffle abc", "cab") and not skillmix.verify("shuffle abc", "cca")
    assert not skillmix.verify("add 1", "1") and not skillmix.verify("dance 1 2", "3")


def test_committed_prompt_sets_are_what_the_generator_makes():
    heldout = [json.loads(line) for line in (QUICKSTART / "prompts" / "heldout.jsonl").open()]
    train = [json.loads(line) for line in (QUICKSTART / "prompts" / "train.jsonl").open()]
    assert [{k: v for k, v in ex.items() if k != "id"} for ex in heldout] == skillmix.generate(1200, seed=1234)
    assert len(train) == 8000 and not {ex["prompt"] for ex in train} & {ex["prompt"] for ex in heldout}


def test_generation_with_logprobs_reads_the_device_a_fixed_number_of_times(monkeypatch):
    """Top-k logprobs (and each token's own) are gathered on the device and brought to the host once
    at the end, however many rows and steps: not a sync per row or per step. The numbers equal a
    plain log-softmax of the logits generate returns."""
    from host_reads import HostReads
    from potstill.hf import generate_ids, load_model_dir

    model, tok = load_model_dir(TEACHER)
    counts = []
    for batch, new in ((3, 4), (9, 7)):
        rows = [tok(f"add {i} {i + 1}")["input_ids"] for i in range(batch)]
        params = {"max_new_tokens": new, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 5}
        with HostReads(monkeypatch) as reads:
            out = generate_ids(model, tok, rows, params, 0, [str(i) for i in range(batch)], token_logprobs=True)
        monkeypatch.undo()
        counts.append(len(reads.sites))
    assert counts[0] == counts[1] <= 4, reads.sites  # top-k values, ids, each token's logprob, the ids
    params = {**params, "max_new_tokens": new}
    config = {"output_logits": True, "return_dict_in_generate": True}
    from potstill.hf import folder_defaults_off, left_pad, stated_config

    ids, att = left_pad(rows, tok.pad_token_id)
    torch.manual_seed(0)
    with folder_defaults_off(model), torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=att, generation_config=stated_config(params, tok, len(tok)),
                             **config)
    logprobs = torch.stack(ref.logits, 1)[..., :len(tok)].log_softmax(-1)  # (B, T, V)
    for i, c in enumerate(out):
        n = len(c.token_ids)
        assert c.token_ids == ref.sequences[i, ids.shape[1]:ids.shape[1] + n].tolist()
        top, top_ids = logprobs[i, :n].topk(5, -1)
        assert (c.topk_ids == top_ids.numpy()).all() and (c.topk_logprobs == top.numpy()).all()
        assert (c.token_logprobs == logprobs[i, :n].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0].numpy()).all()

"""The bundled teacher and its task: loads as a Hugging Face model, and is as good as its card says."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from potstill.tasks import skillmix
from potstill.evaluate.run import greedy
from potstill.prompts import load_prompts
from potstill.teachers.local import LocalTeacher

from conftest import QUICKSTART, TEACHER


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
    completions, _ = greedy(LocalTeacher(TEACHER), sample, max_new_tokens=12, batch_size=150)
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

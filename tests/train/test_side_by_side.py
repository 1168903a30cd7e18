"""Student and baseline trained at once, one process each: same models as one at a time, and failures surface."""

import multiprocessing
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from potstill.errors import PotstillError
from potstill.generate import generate
from potstill.pipeline import students
from potstill.recipe import load_recipe
from potstill.train import train
from potstill.train import side_by_side as sbs

from helpers import QUICKSTART, tiny_overrides

RECIPE = QUICKSTART / "recipe.yaml"


@pytest.fixture(scope="module")
def ledger_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sbs") / "gen"
    generate(load_recipe(RECIPE, tiny_overrides(out, n_prompts=32)))
    return out


def _recipe(ledger_dir, out, *extra):
    out.mkdir(parents=True)
    shutil.copy(ledger_dir / "ledger.sqlite", out / "ledger.sqlite")
    return load_recipe(RECIPE, [*tiny_overrides(out, n_prompts=32), *extra])


@pytest.mark.slow
def test_side_by_side_trains_the_same_models_as_one_at_a_time(ledger_dir, tmp_path, capfd):
    together = _recipe(ledger_dir, tmp_path / "together")
    hf_logging.disable_progress_bar()  # as the CLI does: the children must follow
    try:
        sbs.train_side_by_side(together, students(together), None, threads=1)
    finally:
        hf_logging.enable_progress_bar()
    out, err = capfd.readouterr()  # the children's file descriptors too
    assert "train student: terms:" in out  # the children's lines reach the parent
    assert "Writing model shards" not in err
    alone = _recipe(ledger_dir, tmp_path / "alone")
    torch.set_num_threads(1)  # what each child ran with
    for name, spec in students(alone):
        train(alone, spec, name)
    for name in ("student", "baseline"):
        a = load_file(together.run_dir / name / "model.safetensors")
        b = load_file(alone.run_dir / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(*(load_file(together.run_dir / n / "model.safetensors")["model.norm.weight"]
                             for n in ("student", "baseline")))


@pytest.mark.slow
def test_a_refusal_in_a_child_is_raised_here_and_no_child_is_left(ledger_dir, tmp_path):
    recipe = _recipe(ledger_dir, tmp_path / "run", "teacher.terms_family=openai-api")
    from potstill.pipeline import planned

    planned(recipe)  # as `potstill train` and `run` do first: another teacher section is another plan
    with pytest.raises(PotstillError, match="openai-api"):
        sbs.train_side_by_side(recipe, students(recipe), None, threads=1)
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_a_child_killed_mid_training_is_one_clear_error(ledger_dir, tmp_path, monkeypatch):
    recipe = _recipe(ledger_dir, tmp_path / "run")
    monkeypatch.setenv("POTSTILL_CRASH_AT", "step-1")  # both children SIGKILL themselves after their first step
    with pytest.raises(PotstillError, match=r"stopped without a word \(exit code -9\)"):
        sbs.train_side_by_side(recipe, students(recipe), None, threads=1)
    assert not multiprocessing.active_children()


def test_who_trains_side_by_side(tmp_path, monkeypatch):
    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}"])
    both = students(recipe)
    monkeypatch.setattr(sbs, "cpu_cores", lambda: 2)
    assert sbs.side_by_side_threads(recipe, both) == 1
    assert sbs.side_by_side_threads(recipe, both[:1]) == 0  # one student: all cores to it
    monkeypatch.setattr(sbs, "cpu_cores", lambda: 9)
    assert sbs.side_by_side_threads(recipe, both) == 4
    monkeypatch.setattr(sbs, "cpu_cores", lambda: 1)
    assert sbs.side_by_side_threads(recipe, both) == 0
    monkeypatch.setattr(sbs, "cpu_cores", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under `accelerate launch` the processes are already there
    assert sbs.side_by_side_threads(recipe, both) == 0


def test_a_childs_lines_reach_the_parent_whole_and_the_last_one_too():
    import queue

    events = queue.Queue()
    lines = sbs._Lines("student", events)
    lines.write("one\ntw")
    lines.write("o\nthree")
    lines.close()
    assert [events.get_nowait()[2] for _ in range(events.qsize())] == ["one", "two", "three"]


def test_on_a_machine_with_a_gpu_per_student_each_trains_on_its_own(tmp_path, monkeypatch):
    """No GPU here: the decision and the child's recipe are checked; the children's training is the
    CPU path above (the device is the only difference)."""
    import torch

    recipe = load_recipe(RECIPE, [f"output_dir={tmp_path}"])
    both = students(recipe)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("potstill.devices.resolve_device", lambda name, key="device": "cuda")
    assert sbs.side_by_side_gpus(recipe, both) == ["cuda:0", "cuda:1"]
    assert sbs.side_by_side_gpus(recipe, both[:1]) == []  # one student: nothing to share
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert sbs.side_by_side_gpus(recipe, both) == []  # they would take turns on the one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "8")  # under `accelerate launch` the processes are already there
    assert sbs.side_by_side_gpus(recipe, both) == []
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr("potstill.devices.resolve_device", lambda name, key="device": "cuda:0" if "0" in name else
                        "cuda")
    pinned = load_recipe(RECIPE, [f"output_dir={tmp_path}", "train.device=cuda:0"])
    assert sbs.side_by_side_gpus(pinned, students(pinned)) == []  # a chosen GPU is respected
    moved = sbs.on_device(recipe, "cuda:1")
    assert moved.train.device == "cuda:1" and recipe.train.device is None
    assert moved.train.model_dump(exclude={"device"}) == recipe.train.model_dump(exclude={"device"})

"""Training-engine invariants: accumulation and process swaps, chunked = unchunked, exact resume
after a real SIGKILL (also during a save), the NaN guard, online / on-policy teachers, LoRA."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from potstill.train import checkpoint
from potstill.cli import main
from potstill.errors import PotstillError
from potstill.generate import generate
from potstill.recipe import load_recipe
from potstill.train import train

from helpers import QUICKSTART, tiny_overrides

RECIPE = QUICKSTART / "recipe.yaml"
POTSTILL = str(Path(sys.executable).parent / "potstill")


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    """One small generated ledger, copied into each test's run directory."""
    out = tmp_path_factory.mktemp("ledger") / "run"
    generate(load_recipe(RECIPE, tiny_overrides(out)))
    return out / "ledger.sqlite"


def overrides(run: Path, *extra: str) -> list[str]:
    return tiny_overrides(run) + ["baseline=null", "train.epochs=2", *extra]


def run_dir(tmp_path, ledger, name="run") -> Path:
    d = tmp_path / name
    d.mkdir()
    shutil.copy(ledger, d / "ledger.sqlite")
    return d


def weights(run: Path, name="student") -> dict:
    return load_file(run / name / "model.safetensors")


def assert_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


def trained(tmp_path, ledger, name, *extra) -> dict:
    d = run_dir(tmp_path, ledger, name)
    recipe = load_recipe(RECIPE, overrides(d, *extra))
    train(recipe, recipe.train)
    return weights(d)


def curve(run: Path) -> list[tuple[float, float]]:
    return [(r["loss"], r["grad_norm"]) for r in map(json.loads, (run / "logs" / "student.jsonl").open())]


def assert_same_training(run_a: Path, run_b: Path, rtol: float = 1e-5, atol: float = 1e-4, norm_rtol: float | None = None):
    """Same loss and gradient norm at every step, and the same final weights. Weights get a looser
    bound: Adam divides by sqrt(v), so a parameter whose gradient is ~1e-9 turns float rounding
    (a different summation order) into a visible step; the per-step loss shows the update is equal."""
    a, b = curve(run_a), curve(run_b)
    assert len(a) == len(b) == 8
    for (loss_a, norm_a), (loss_b, norm_b) in zip(a, b):
        assert loss_b == pytest.approx(loss_a, rel=rtol) and norm_b == pytest.approx(norm_a, rel=norm_rtol or rtol)
    assert_close(weights(run_a), weights(run_b), atol)


@pytest.mark.slow
def test_batch_times_accumulation_swaps_give_the_same_update(tmp_path, ledger):
    trained(tmp_path, ledger, "whole", "train.log_every=1")
    trained(tmp_path, ledger, "acc", "train.log_every=1", "train.micro_batch_size=4")
    trained(tmp_path, ledger, "uneven", "train.log_every=1", "train.micro_batch_size=6")  # 6 + 6 + 4 rows
    assert_same_training(tmp_path / "whole", tmp_path / "acc")
    assert_same_training(tmp_path / "whole", tmp_path / "uneven")


def test_chunked_loss_trains_the_same_model(tmp_path, ledger):
    trained(tmp_path, ledger, "plain", "train.log_every=1")
    trained(tmp_path, ledger, "chunked", "train.log_every=1", "train.chunk_size=7")
    assert_same_training(tmp_path / "plain", tmp_path / "chunked")


def test_auto_chunk_is_recorded_and_the_student_stays_current(tmp_path, ledger):
    """chunk_size auto: the chunk used (1024 on the CPU) goes into potstill.json beside the training
    section as asked, so the pipeline still sees the student as trained from this recipe."""
    from potstill.pipeline import student_is_current

    d = run_dir(tmp_path, ledger, "auto")
    recipe = load_recipe(RECIPE, overrides(d, "train.chunk_size=auto", "train.epochs=1"))
    train(recipe, recipe.train)
    info = json.loads((d / "student" / "potstill.json").read_text())
    assert info["chunk_size"] == 1024 and info["train"]["chunk_size"] == "auto"
    assert student_is_current(recipe, "student", recipe.train, info["ledger_sha256"])


@pytest.mark.parametrize("extra", [[], ["train.teacher_signal=online", "train.chunk_size=16"]])
def test_a_step_waits_for_the_device_once_a_micro_batch_and_once_at_its_end(tmp_path, ledger, monkeypatch, extra):
    """A GPU runs ahead of the host only between sync points: one a micro-batch (how many completion
    tokens it has), and one a step (its loss and gradient norm, for the log and the NaN guard)."""
    from host_reads import HostReads
    from potstill.train.loop import setup, train_step

    d = run_dir(tmp_path, ledger)
    for micro in (16, 4):
        recipe = load_recipe(RECIPE, overrides(d, f"train.micro_batch_size={micro}", *extra))
        s = setup(recipe, recipe.train, "student")
        train_step(s, 0)
        with HostReads(monkeypatch) as reads:
            row = train_step(s, 1)
        monkeypatch.undo()
        # Plan.batch reads the sample order off the host's own generator: no device involved
        sites = [site for site in reads.sites if ":batch:" not in site]
        assert "loss" in row and len(sites) == 16 // micro + 1, sites


def test_host_reads_count_potstill_s_code_only_wherever_the_libraries_live(tmp_path, monkeypatch):
    """A library installed under a folder named potstill (a checkout called potstill with its .venv)
    is still a library: its reads are not ours, whatever its path says."""
    import importlib.util

    from host_reads import HostReads

    lib = tmp_path / "potstill" / ".venv" / "site-packages" / "somelib.py"
    lib.parent.mkdir(parents=True)
    lib.write_text("def read(t):\n    return t.sum().item()\n")
    spec = importlib.util.spec_from_file_location("somelib", lib)
    somelib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(somelib)
    with HostReads(monkeypatch) as reads:
        somelib.read(torch.ones(3))
    monkeypatch.undo()
    assert reads.sites == []


@pytest.mark.slow
def test_two_processes_equal_one_with_twice_the_accumulation(tmp_path, ledger):
    trained(tmp_path, ledger, "one", "train.log_every=1", "train.micro_batch_size=8")
    d = run_dir(tmp_path, ledger, "two")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", POTSTILL, "train", str(RECIPE),
           *overrides(d, "train.log_every=1")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((d / "student" / "potstill.json").read_text())
    assert info["processes"] == 2 and info["distributed"] == {"type": "MULTI_CPU", "processes": 2, "backend": "gloo"}
    assert json.loads((tmp_path / "one" / "student" / "potstill.json").read_text())["distributed"]["type"] == "NO"
    assert_same_training(tmp_path / "one", d)
    # the main process speaks for both: each status line once
    lines = [line for line in done.stdout.splitlines() if line.startswith("train")]
    assert sum("train: wrote" in line for line in lines) == 1 and sum("terms:" in line for line in lines) >= 1
    assert len(lines) == len(set(lines)), done.stdout


def run_killed(d: Path, crash_at: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "POTSTILL_CRASH_AT": crash_at}
    return subprocess.run([POTSTILL, "train", str(RECIPE), *overrides(d, "train.checkpoint_every=2", *extra)],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ledger) -> dict:
    """The weights of the run every killed-and-resumed one must end with."""
    return trained(tmp_path_factory.mktemp("uninterrupted"), ledger, "ref", "train.checkpoint_every=2")


@pytest.mark.parametrize("crash_at, resumes_from", [
    ("step-5", 4),             # between checkpoints
    ("save-4-weights", 2),     # during a save: the half-written step-4 is ignored
    ("save-4-marker", 2),      # everything written but the COMPLETE marker
    ("save-4-renamed", 4),     # saved, before the old one is pruned
])
@pytest.mark.slow
def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path, ledger, uninterrupted, crash_at, resumes_from):
    d = run_dir(tmp_path, ledger, "killed")
    killed = run_killed(d, crash_at)
    assert killed.returncode == -9  # a real SIGKILL
    assert not (d / "student").exists()
    assert checkpoint.latest(d / "checkpoints" / "student").name == f"step-{resumes_from}"
    resumed = run_killed(d, "never")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    info = json.loads((d / "student" / "potstill.json").read_text())
    assert info["resumed_from"] == resumes_from
    assert_close(uninterrupted, weights(d), 1e-6)
    steps = [json.loads(line)["step"] for line in (d / "logs" / "student.jsonl").open()]
    assert steps == list(range(1, 9))  # the log has each step once


@pytest.mark.slow
def test_tampered_checkpoint_is_refused_and_keep_last_prunes(tmp_path, ledger):
    d = run_dir(tmp_path, ledger)
    assert run_killed(d, "step-7").returncode == -9
    kept = sorted(p.name for p in (d / "checkpoints" / "student").iterdir())
    assert kept == ["step-4", "step-6"]  # keep_checkpoints=2
    blob = d / "checkpoints" / "student" / "step-6" / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    done = run_killed(d, "never")
    assert done.returncode == 2 and "step-6: model.safetensors does not match its manifest" in done.stderr
    assert run_killed(d, "never", "train.resume=false").returncode == 0
    # checkpoints of other settings are not resumed from: the run starts over
    assert run_killed(d, "step-7", "train.lr=0.002").returncode == -9
    again = run_killed(d, "never", "train.lr=0.001")
    assert again.returncode == 0 and "holds checkpoints of other settings or data; starting over" in again.stdout
    assert json.loads((d / "student" / "potstill.json").read_text())["resumed_from"] == 0


def test_non_finite_steps_are_skipped_then_abort(tmp_path, ledger, monkeypatch):
    import potstill.train.loop as engine

    real = engine.loss_sums
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, *rest = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), *rest) if calls["n"] in poison else (loss, *rest)

    monkeypatch.setattr(engine, "loss_sums", poisoned)
    d = run_dir(tmp_path, ledger)
    recipe = load_recipe(RECIPE, overrides(d, "train.log_every=1"))
    poison = {2}
    train(recipe, recipe.train)
    rows = [json.loads(line) for line in (d / "logs" / "student.jsonl").open()]
    assert rows[1] == {"step": 2, "skipped": "non-finite loss or gradient"} and len(rows) == 8
    assert all(torch.isfinite(w).all() for w in weights(d).values())
    calls["n"], poison = 0, {3, 4, 5}
    with pytest.raises(PotstillError, match="3 non-finite steps in a row"):
        train(recipe, recipe.train)


def test_a_tiny_model_overfits_one_batch(tmp_path, ledger):
    d = run_dir(tmp_path, ledger)
    recipe = load_recipe(RECIPE, tiny_overrides(d, n_prompts=16) + [
        "baseline=null", "train.epochs=150", "train.lr=0.01", "train.kd_ratio=0.0", "train.log_every=150"])
    train(recipe, recipe.train)
    last = json.loads((d / "logs" / "student.jsonl").read_text().splitlines()[-1])
    assert last["ce"] < 0.05


@pytest.mark.parametrize("extra", [
    ["train.teacher_signal=online", "train.chunk_size=5", "train.loss=jsd", "train.beta=0.3"],
    ["train.teacher_signal=on_policy", "train.lmbda=0.5", "train.loss=reverse_kl"],
])
def test_online_and_on_policy_teachers(tmp_path, ledger, extra):
    d = run_dir(tmp_path, ledger)
    recipe = load_recipe(RECIPE, overrides(d, "train.log_every=1", *extra))
    train(recipe, recipe.train)
    rows = [json.loads(line) for line in (d / "logs" / "student.jsonl").open()]
    assert all(r["kd"] > 0 and r["loss"] == r["loss"] for r in rows)
    if "on_policy" in extra[0]:
        assert 0 < sum(r["on_policy"] for r in rows) < len(rows)


@pytest.mark.slow
def test_bf16_changes_the_arithmetic_within_bf16_rounding(tmp_path, ledger):
    """train.mixed_precision=bf16 runs the forward pass under bf16 autocast: the first step's loss
    (same weights, same batch) differs from float32's, by about bf16's rounding (8 mantissa bits)."""
    first = {}
    for precision in ("no", "bf16"):
        d = run_dir(tmp_path, ledger, precision)
        recipe = load_recipe(RECIPE, overrides(d, "train.log_every=1", f"train.mixed_precision='{precision}'"))
        train(recipe, recipe.train)
        assert json.loads((d / "student" / "potstill.json").read_text())["mixed_precision"] == precision
        first[precision] = json.loads((d / "logs" / "student.jsonl").open().readline())
    for term in ("loss", "ce", "kd"):
        fp32, bf16 = first["no"][term], first["bf16"][term]
        assert fp32 != bf16 and abs(bf16 - fp32) < 2e-2 * abs(fp32), (term, fp32, bf16)


@pytest.mark.parametrize("signal", ["cached", "online"])
def test_a_padded_student_learns_only_on_the_shared_rows(tmp_path, ledger, signal):
    """A student with 48 logit rows and the teacher's 41-token tokenizer (Qwen-style padding): CE and
    KD, from the ledger's top-k or the online teacher's 41 rows, are over the 41 shared rows, so the
    7 padding rows of the (tied) embedding and head get no gradient: without weight decay they end
    where they started, while the shared rows learn."""
    from potstill.train.loop import load_student, load_student_tokenizer

    d = run_dir(tmp_path, ledger)
    recipe = load_recipe(RECIPE, overrides(d, "train.log_every=1", f"train.teacher_signal={signal}",
                                          "student.config.vocab_size=48", "train.weight_decay=0", "train.kd_ratio=0.5"))
    torch.manual_seed(recipe.train.seed)  # as train seeds the fresh student
    start = load_student(recipe, load_student_tokenizer(recipe)).get_input_embeddings().weight.detach()
    train(recipe, recipe.train)
    rows = [json.loads(line) for line in (d / "logs" / "student.jsonl").open()]
    assert all(r["kd"] > 0 for r in rows)
    end = weights(d)["model.embed_tokens.weight"]  # (48, H), tied to the head
    assert end.shape[0] == 48 and torch.equal(end[41:], start[41:])
    assert (end[:41] - start[:41]).abs().max() > 1e-3


def test_an_sft_baseline_ignores_the_on_policy_signal(tmp_path, ledger):
    """The baseline inherits the training section but none of its KD-only fields: an on-policy KD
    student's SFT baseline samples nothing and has no teacher to score samples."""
    from potstill.pipeline import baseline_spec

    d = run_dir(tmp_path, ledger)
    recipe = load_recipe(RECIPE, tiny_overrides(d) + ["train.epochs=2", "train.log_every=1",
                                                      "train.teacher_signal=on_policy", "train.lmbda=1.0"])
    spec = baseline_spec(recipe)
    assert spec.objective == "sft" and spec.teacher_signal == "cached"
    train(recipe, spec, "baseline")
    rows = [json.loads(line) for line in (d / "logs" / "baseline.jsonl").open()]
    assert len(rows) == 8 and not any(r["on_policy"] for r in rows) and all(r["kd"] is None for r in rows)


@pytest.mark.slow
def test_online_equals_cached_when_the_cache_holds_the_whole_vocabulary(tmp_path, ledger):
    """k = V: the top-k cache is the full distribution, so both signals train the same student, up
    to the float16 rounding of the cached logprobs (about 1e-3 relative)."""
    big = tmp_path / "big"
    generate(load_recipe(RECIPE, tiny_overrides(big) + ["generation.top_logprobs=41"]))
    args = ("generation.top_logprobs=41", "train.temperature=2.0", "train.log_every=1")
    trained(tmp_path, big / "ledger.sqlite", "cached", *args)
    trained(tmp_path, big / "ledger.sqlite", "online", *args, "train.teacher_signal=online")
    # the per-step losses and gradient norms carry the check; Adam turns the 1e-3 target rounding
    # into parameter differences of the order of lr (3e-3) per step, so weights are only bounded loosely.
    # The gradient is p_student - p_teacher: where the two are close, the float16 rounding of the
    # teacher's side is a larger share of it (measured up to 0.4 % in one step, loss within 4e-5)
    assert_same_training(tmp_path / "cached", tmp_path / "online", rtol=3e-3, atol=3e-2, norm_rtol=1e-2)


def test_lora_trains_adapters_and_exports_merged_weights(tmp_path, ledger):
    pytest.importorskip("peft")
    d = run_dir(tmp_path, ledger)
    recipe = load_recipe(RECIPE, overrides(d, "train.lora={r: 4, alpha: 8}"))
    train(recipe, recipe.train)
    w = weights(d)
    assert not any("lora" in k for k in w)
    assert sum(v.numel() for k, v in w.items() if k != "lm_head.weight") == 153_600


def test_doctor_and_logit_kd_across_tokenizers(tmp_path, ledger, capsys):
    teacher = str(QUICKSTART / "teacher")
    assert main(["doctor", teacher, teacher]) == 0
    assert "tokenizers: identical" in capsys.readouterr().out
    from transformers import AutoConfig, AutoTokenizer

    padded = tmp_path / "padded"
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.save_pretrained(padded)
    config = AutoConfig.from_pretrained(teacher)
    config.vocab_size = 48
    config.save_pretrained(padded)
    assert main(["doctor", teacher, str(padded)]) == 0
    out = capsys.readouterr().out
    assert "tokenizers: padded" in out and "41 shared rows" in out
    other = tmp_path / "other"
    vocab = json.loads((QUICKSTART / "teacher" / "tokenizer.json").read_text())
    swap = vocab["model"]["vocab"]
    swap["a"], swap["b"] = swap["b"], swap["a"]
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    for f in ("tokenizer_config.json", "config.json"):
        shutil.copy(QUICKSTART / "teacher" / f, other / f)
    assert main(["doctor", teacher, str(other)]) == 0
    out = capsys.readouterr().out
    assert "tokenizers: different" in out and "2 of the teacher's 41 tokens have another id" in out
    # from the cache, the top-k is mapped onto the student's tokens; online, the teacher re-reads the text
    args = ["train", str(RECIPE), *overrides(run_dir(tmp_path, ledger)), f"student.tokenizer={other}"]
    assert main(args) == 0
    assert "logit KD across tokenizers (potstill.align)" in capsys.readouterr().out
    args = ["train", str(RECIPE), *overrides(run_dir(tmp_path, ledger, "online")), f"student.tokenizer={other}"]
    assert main([*args, "train.teacher_signal=online"]) == 0
    assert "the teacher re-reading each step's text: " in capsys.readouterr().out


GPT2_STUDENT = "student.config={model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 64}"


@pytest.mark.parametrize("student", [[], [GPT2_STUDENT]], ids=["llama", "gpt2"])
def test_lora_adapts_every_linear_layer_by_default(tmp_path, ledger, student):
    pytest.importorskip("peft")
    from potstill.train.loop import linear_names, load_student, load_student_tokenizer

    d = run_dir(tmp_path, ledger)
    args = overrides(d, "train.lora={r: 4}", *student)
    assert main(["train", str(RECIPE), *args]) == 0
    recipe = load_recipe(RECIPE, args)
    torch.manual_seed(recipe.train.seed)  # the student train() started from
    start = load_student(recipe, load_student_tokenizer(recipe))
    names = linear_names(start)
    assert names == (["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"] if not student
                     else ["c_attn", "c_fc", "c_proj"])
    before, after = start.state_dict(), weights(d)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == {k for k in after if k.rsplit(".", 2)[-2] in names and k.endswith(".weight")}


def test_lora_target_modules_that_match_nothing_list_the_linear_layers(tmp_path, ledger, capsys):
    pytest.importorskip("peft")
    d = run_dir(tmp_path, ledger)
    assert main(["train", str(RECIPE), *overrides(d, "train.lora={target_modules: [q_proj, v_proj]}", GPT2_STUDENT)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.lora.target_modules" in err and "['c_attn', 'c_fc', 'c_proj']" in err
    assert not (d / "student").exists()


@pytest.mark.slow
def test_train_never_deletes_what_potstill_did_not_write(tmp_path, ledger, capsys):
    d = run_dir(tmp_path, ledger)
    args = ["train", str(RECIPE), *tiny_overrides(d), "train.epochs=2"]  # with the baseline
    planted = {d / "student" / "important.txt": "keep me", d / "checkpoints" / "student" / "notes.txt": "mine",
               d / "baseline" / "data.csv": "a,b\n1,2\n"}
    for path, text in planted.items():
        path.parent.mkdir(parents=True)
        path.write_text(text)
    for path in planted:  # refused one at a time, naming the file; nothing deleted, nothing trained
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path} was not written by potstill" in err
        assert all(p.read_text() == t for p, t in planted.items() if p.exists())
        assert not (d / "logs").exists() and not (d / "student" / "model.safetensors").exists()
        shutil.move(path, tmp_path / path.name)
    assert main(args) == 0
    # a folder potstill wrote is replaced, unless someone added a file to it
    assert main(args) == 0
    (d / "student" / "important.txt").write_text("keep me")
    assert main(args) == 2 and (d / "student" / "important.txt").read_text() == "keep me"


class _Payload:
    """A pickle that makes a folder when unpickled: proof that a checkpoint was (not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("planted", ["optimizer.safetensors", "optimizer.pt"])
@pytest.mark.slow
def test_a_checkpoint_never_loads_a_pickle(tmp_path, ledger, capsys, planted):
    import pickle

    d = run_dir(tmp_path, ledger)
    assert run_killed(d, "step-5").returncode == -9
    step = d / "checkpoints" / "student" / "step-4"
    marker = tmp_path / "unpickled"
    if planted == "optimizer.pt":  # the format of older versions: a pickle, with a manifest that matches
        for name in ("optimizer.safetensors", "optimizer.json"):
            (step / name).unlink(missing_ok=True)
    (step / planted).write_bytes(pickle.dumps({"state": _Payload(marker)}))
    manifest = {p.name: {"sha256": checkpoint.file_sha256(p, remember=False), "bytes": p.stat().st_size}
                for p in sorted(step.iterdir()) if p.name not in ("manifest.json", "COMPLETE")}
    (step / "manifest.json").write_text(json.dumps(manifest))
    checkpoint.verify(step)
    assert main(["train", str(RECIPE), *overrides(d, "train.checkpoint_every=2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint {step}" in err and "weights_only" not in err
    assert not marker.exists() and not (d / "student").exists()
    assert (step / planted).read_bytes() == pickle.dumps({"state": _Payload(marker)})


def test_on_policy_samples_are_as_long_as_train_says_else_as_generation(tmp_path, ledger):
    from potstill.train.loop import setup

    d = run_dir(tmp_path, ledger)
    for extra, longest in (([], 12), (["train.on_policy_max_new_tokens=3"], 3)):  # generation.max_new_tokens: 12
        recipe = load_recipe(RECIPE, overrides(d, "train.teacher_signal=on_policy", *extra))
        assert recipe.generation.max_new_tokens == 12
        assert setup(recipe, recipe.train, "student").on_policy_max_new_tokens == longest


MIXTRAL_STUDENT = ("student.config={model_type: mixtral, hidden_size: 32, intermediate_size: 32, num_hidden_layers: 2, "
                   "num_attention_heads: 2, num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, "
                   "max_position_embeddings: 64, output_router_logits: true, router_aux_loss_coef: 0.05}")


def test_a_moe_student_logs_and_trains_on_its_router_loss(tmp_path, ledger):
    """A Mixtral student that asks for its router loss: each step's loss is 0.5 CE + 0.5 KD plus
    router_aux_loss_coef * router, and the router term is logged beside them."""
    d = run_dir(tmp_path, ledger)
    assert main(["train", str(RECIPE), *overrides(d, "train.epochs=1", "train.kd_ratio=0.5", MIXTRAL_STUDENT)]) == 0
    rows = [json.loads(line) for line in (d / "logs" / "student.jsonl").read_text().splitlines()]
    assert rows and all(r["router"] > 0 for r in rows)
    for r in rows:
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"] + 0.05 * r["router"], rel=1e-5)

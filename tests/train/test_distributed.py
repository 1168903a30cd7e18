"""Past one process: a launch that would not distribute as it says is refused before any work,
through real ``accelerate launch`` subprocesses on this CPU machine (gloo)."""

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

from potstill.generate import generate
from potstill.recipe import load_recipe
from potstill.train import checkpoint

from helpers import QUICKSTART, ROOT, TEACHER, free_port, tiny_overrides

pytestmark = pytest.mark.slow  # every test launches processes

RECIPE = QUICKSTART / "recipe.yaml"
POTSTILL = str(Path(sys.executable).parent / "potstill")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
FSDP2 = (ROOT / "examples" / "accelerate" / "fsdp2.yaml").read_text()  # the documented config, 2 processes
# a launch on a device with no collective backend (MPS): accelerate then says NO in every process
AS_IF_MPS = """\
import sys, torch
torch.backends.mps.is_available = lambda: True
from potstill.cli import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    out = tmp_path_factory.mktemp("ledger") / "run"
    generate(load_recipe(RECIPE, tiny_overrides(out)))
    return out / "ledger.sqlite"


def run_dir(tmp_path, ledger, name="run") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "ledger.sqlite").write_bytes(ledger.read_bytes())
    return d


def launch(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_refused(done: subprocess.CompletedProcess, d: Path, before: str, says: str) -> None:
    """Both processes exit 2 (the launcher reports it), the main one says why in one line, and
    nothing was written: no student, no checkpoints, no log, the ledger (terms gate) untouched."""
    assert done.returncode != 0, done.stdout[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("potstill: error:")]
    assert len(errors) == 1 and says in errors[0], done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr or "exit status 2" in done.stderr, done.stderr[-3000:]
    assert sorted(p.name for p in d.iterdir()) == ["ledger.sqlite"]
    assert hashlib.sha256((d / "ledger.sqlite").read_bytes()).hexdigest() == before
    assert "Traceback" not in done.stderr.split("potstill: error:")[0]


def ledger_sha(d: Path) -> str:
    return hashlib.sha256((d / "ledger.sqlite").read_bytes()).hexdigest()


def train_args(d: Path) -> list[str]:
    return ["train", str(RECIPE), *tiny_overrides(d), "baseline=null"]


def test_an_fsdp_launch_accelerate_does_not_shard_is_refused(tmp_path, ledger):
    """accelerate turns FSDP on only on an accelerator: on CPUs it ran DDP (or, with cpu=False,
    two whole students writing one folder) and said nothing."""
    d, config = run_dir(tmp_path, ledger), tmp_path / "fsdp.yaml"
    config.write_text(FSDP2)
    before = ledger_sha(d)
    done = launch("--config_file", str(config), POTSTILL, *train_args(d))
    assert_refused(done, d, before, "asks for FSDP (ACCELERATE_USE_FSDP) but accelerate runs MULTI_CPU")


def test_processes_without_a_process_group_are_refused(tmp_path, ledger):
    d, script = run_dir(tmp_path, ledger), tmp_path / "as_if_mps.py"
    script.write_text(AS_IF_MPS)
    before = ledger_sha(d)
    done = launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", str(script), *train_args(d), "device=mps")
    assert_refused(done, d, before, "started 2 processes but accelerate's distributed type is NO")


def test_a_deepspeed_launch_is_refused_naming_what_to_use(tmp_path, ledger):
    """accelerate launch --use_deepspeed sets ACCELERATE_USE_DEEPSPEED (and needs deepspeed
    installed, which it is not here); the processes it starts see that variable."""
    d = run_dir(tmp_path, ledger)
    before = ledger_sha(d)
    done = launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", POTSTILL, *train_args(d), env={"ACCELERATE_USE_DEEPSPEED": "true"})
    assert_refused(done, d, before, "asks for DeepSpeed")
    assert "FSDP2" in done.stderr and "DDP" in done.stderr


# FSDP2 on CPUs. accelerate turns FSDP on only on an accelerator; POTSTILL_TEST_FSDP_ON_CPU makes
# potstill's Accelerator take the path it takes on GPUs (accelerate's FSDP plugin from the launch's
# FSDP_* variables, accelerator.prepare -> fully_shard per decoder layer) over a CPU gloo mesh.
# TORCH_DISTRIBUTED_DEBUG=DETAIL checks, before each collective, that every process calls the same
# one with the same shapes: a sharded model's forwards must run in lockstep in all processes.
FSDP_ON_CPU = {"POTSTILL_TEST_FSDP_ON_CPU": "1", "TORCH_DISTRIBUTED_DEBUG": "DETAIL"}


def train_one(d: Path, *extra: str) -> None:
    """The same training in one process, each step in two micro-batches as the two processes split it."""
    from potstill.train import train

    recipe = load_recipe(RECIPE, [*tiny_overrides(d), "baseline=null", "train.epochs=2", "train.micro_batch_size=8", *extra])
    train(recipe, recipe.train)


def alongside(launched, work):
    """``launched()`` (a launch) in a thread while this process runs ``work()``: most of a launch is
    its processes starting, which leaves the CPUs to the work. Both results."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(launched)
        done = work()
        return future.result(), done


def fsdp_launch(tmp_path: Path, d: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP2)
    return launch("--config_file", str(config), POTSTILL, *train_args(d), "train.epochs=2", *extra,
                  env={**FSDP_ON_CPU, **(env or {})})


def rows(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "logs" / "student.jsonl").open()]


def assert_same(one: Path, two: Path, tol: float = 1e-5, weights_tol: float = 1e-4) -> None:
    """Loss, CE, KD and gradient norm within 1e-5 at every step; the weights within 1e-4, as for DDP
    (test_train_engine.assert_same_training): Adam divides by sqrt(v), so a gradient of ~1e-9 turns
    a different summation order into a visible step (measured here: 1.6e-5 after 8 steps)."""
    a, b = rows(one), rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=tol, abs=tol), (key, ra, rb)
    wa, wb = load_file(one / "student" / "model.safetensors"), load_file(two / "student" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= weights_tol, worst


@pytest.mark.parametrize("signal", [
    [],                                                                     # cached top-k KD
    ["train.teacher_signal=online"],                                        # the online teacher, sharded
    ["train.lora={r: 4, alpha: 8}"],                                        # LoRA: merged from the gathered state
    ["train.lora={r: 4, alpha: 8}", "train.chunk_size=5",                   # GPT-2: Conv1D adapters, tied head,
     "student.config={model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 64, resid_pdrop: 0, "
     "embd_pdrop: 0, attn_pdrop: 0}"],  # chunked: its frozen head; no dropout: its masks differ by process
], ids=["cached", "online", "lora", "lora-gpt2-chunked"])
def test_fsdp2_two_processes_equal_one(tmp_path, ledger, signal):
    """(The chunked loss with the sharded teacher: test_fsdp2_a_bfloat16_teacher_sharded_equals_one_process.)"""
    one, d = run_dir(tmp_path, ledger, "one"), run_dir(tmp_path, ledger, "two")
    done, _ = alongside(lambda: fsdp_launch(tmp_path, d, *signal), lambda: train_one(one, *signal))
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((d / "student" / "potstill.json").read_text())
    online = any("teacher_signal" in x for x in signal)
    assert info["distributed"] == {"type": "FSDP", "processes": 2, "backend": "gloo",
                                   **({"online_teacher": "sharded"} if online else {})}
    if online:  # each process holds half the teacher's layers, and its embedding and head whole
        said = [line for line in done.stdout.splitlines() if "the online teacher (" in line]
        assert said == ["train student: the online teacher (1,779,072 parameters) sharded over 2 processes by decoder "
                        "layer: each holds 893,568 (its share of the layers; the embedding, final norm and head whole)"]
    # the export is a plain Hugging Face folder, written once, by the main process
    plain = "GPT2LMHeadModel" if any("gpt2" in x for x in signal) else "LlamaForCausalLM"
    assert json.loads((d / "student" / "config.json").read_text())["architectures"] == [plain]
    assert sum("train: wrote" in line for line in done.stdout.splitlines()) == 1
    assert_same(tmp_path / "one", d)


def test_fsdp2_a_bfloat16_teacher_sharded_equals_one_process(tmp_path):
    """The teacher in bfloat16: its shards gathered as bfloat16, its forward and its gathered head
    (the chunked loss, both models' heads gathered) as whole."""
    extra = ["train.teacher_signal=online", "teacher.dtype=bfloat16", "train.chunk_size=5", "train.loss=jsd"]
    generate(load_recipe(RECIPE, [*tiny_overrides(tmp_path / "ledger"), extra[1]]))
    one, two = (run_dir(tmp_path, tmp_path / "ledger" / "ledger.sqlite", n) for n in ("one", "two"))
    done, _ = alongside(lambda: fsdp_launch(tmp_path, two, *extra), lambda: train_one(one, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "student" / "potstill.json").read_text())["distributed"]["online_teacher"] == "sharded"
    assert_same(one, two)


@pytest.mark.parametrize("extra", [[], ["train.lora={r: 4, alpha: 8}"]], ids=["full", "lora"])
def test_fsdp2_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, ledger, extra):
    """Both ranks SIGKILL themselves after step 5 (checkpoints every 2 steps); the same launch again
    resumes from step 4's sharded-then-gathered checkpoint and ends where one process ends."""
    one, d = run_dir(tmp_path, ledger, "one"), run_dir(tmp_path, ledger, "two")
    killed, _ = alongside(lambda: fsdp_launch(tmp_path, d, "train.checkpoint_every=2", *extra,
                                              env={"POTSTILL_CRASH_AT": "step-5"}),
                          lambda: train_one(one, "train.checkpoint_every=2", *extra))
    assert killed.returncode != 0 and not (d / "student").exists()
    assert checkpoint.latest(d / "checkpoints" / "student").name == "step-4"
    resumed = fsdp_launch(tmp_path, d, "train.checkpoint_every=2", *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((d / "student" / "potstill.json").read_text())
    assert info["resumed_from"] == 4 and info["distributed"]["type"] == "FSDP"
    assert_same(tmp_path / "one", d)  # the log holds each step once, as one process logged it


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """The quickstart's 512-token byte-level BPE, a student tokenizer other than the teacher's."""
    from potstill.prompts import load_prompts
    from potstill.quickstart_cross import train_bpe

    texts = [p.messages[0][1] for p in load_prompts(QUICKSTART / "prompts" / "train.jsonl")]
    return train_bpe(texts, TEACHER, tmp_path_factory.mktemp("bpe"))


@pytest.mark.parametrize("student", ["trained", "other-tokenizer"])
def test_fsdp2_on_policy_equals_ddp(tmp_path, ledger, bpe, student):
    """On-policy KD under FSDP2, student and teacher sharded. Each process seeds its own sampling, so
    two processes cannot equal one; DDP's two processes (teacher whole in each) draw the same samples.
    "trained": the quickstart teacher as the student, whose samples end at different lengths in each
    process, so the sharded student must keep sampling in lockstep. "other-tokenizer": the sharded
    teacher re-reads each sample (and, lmbda 0.5, each off-policy step's ledger text) in its own tokens
    (cross_online), every process in the same forward."""
    extra = ["train.teacher_signal=on_policy", "train.lmbda=0.5", "train.loss=jsd", "train.chunk_size=16",
             *([f"student.path={TEACHER}", "student.config=null"] if student == "trained" else [f"student.tokenizer={bpe}"])]
    ddp, d = run_dir(tmp_path, ledger, "ddp"), run_dir(tmp_path, ledger, "two")
    done, ddp_done = alongside(lambda: fsdp_launch(tmp_path, d, *extra), lambda: launch(
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
        "no", "--main_process_port", str(free_port()), POTSTILL, *train_args(ddp), "train.epochs=2", *extra))
    assert ddp_done.returncode == 0, ddp_done.stderr[-3000:]
    ddp_stdout = ddp_done.stdout
    assert json.loads((ddp / "student" / "potstill.json").read_text())["distributed"]["online_teacher"] == "whole"
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((d / "student" / "potstill.json").read_text())["distributed"] == {
        "type": "FSDP", "processes": 2, "backend": "gloo", "online_teacher": "sharded"}
    assert any(r.get("on_policy") for r in rows(d)) and not all(r.get("on_policy") for r in rows(d))
    assert_same(ddp, d)
    if student == "other-tokenizer":  # what the mapping counted, summed over the processes in both
        summary = [[line for line in out.splitlines() if "the teacher re-reading each step's text" in line]
                   for out in (ddp_stdout, done.stdout)]
        assert summary[0] == summary[1] and len(summary[0]) == 1, summary


def test_shard_teacher_keeps_every_architectures_logits_and_head():
    """Llama, a tied and padded Qwen2, a soft-capped Gemma 2, GPT-2 (Conv1D, transformer.h), Phi (a
    head bias) and a Mixtral MoE teacher, sharded over 2 processes: the same logits as whole, the
    chunked loss's head rebuilt from the gathered root, and each process holding less than all."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(Path(__file__).parent / "shard_archs.py")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISTRIBUTED_DEBUG": "DETAIL"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 6
    for name, r in results.items():
        assert r["logits"] <= 1e-6 and r["head"] <= 1e-5, (name, r)
        assert r["total"] / 2 < r["held"] < r["total"], (name, r)

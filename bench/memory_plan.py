"""Memory you can plan (issue 24 item 6): what a training step holds, as formulas, checked on the CPU.

    python bench/memory_plan.py                    # the check: each configuration in a fresh process; markdown
    python bench/memory_plan.py --only NAME ...    # some of them
    python bench/memory_plan.py --table            # the 80 GB planning table, from the formulas alone
    python bench/memory_plan.py --smoke            # the smallest mode (seconds): tiny configurations
    python bench/memory_plan.py --one NAME         # one measurement (used by the above), prints JSON

``predict`` is the model docs/memory.md writes out: every term by name, in bytes, grouped by when
it is alive (the whole step; the forward and the start of the backward; the end of the backward;
the optimizer step). The peak is what is held throughout plus the largest phase.

``measure`` runs real steps through potstill's own ``train_step`` (accelerate, ``loss_sums``, the
chunked or dense loss, AdamW, DDP or FSDP2 under ``accelerate launch``) on random Llama students
(and an online teacher) built from configs, after a tiny warm-up run of the same kind that pages
in the code. Peak = the process's VmHWM, reset just before the models are built, minus its RSS
then. glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to
the system and RSS follows the tensors alive, as the CUDA caching allocator's peak would.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
STEPS = 3  # step 0 makes AdamW's state; steps 1 and 2 run with it
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "POTSTILL_QUIET": "1"}


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: RMSNorm, GQA attention with RoPE, SwiGLU MLP, untied head unless ``tied``."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def kv(self) -> int:  # width of k and v: kv_heads x head_dim
        return self.kv_heads * self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv, self.intermediate
        return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms

    @property
    def params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    @property
    def linear_params(self) -> int:
        """Parameters of the linear layers, output head included: what autocast casts to bf16."""
        return self.layers * (self.layer_params - 2 * self.hidden) + self.vocab * self.hidden

    def lora_params(self, r: int) -> int:
        """all-linear adapters (the head excluded): r x (in + out) for q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv, self.intermediate
        return self.layers * r * (9 * h + 2 * kv + 3 * i)

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=8192,
                           tie_word_embeddings=self.tied, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Run:
    """One training configuration: the student, the optional online teacher and how the step runs."""

    student: Shape
    batch: int  # sequences per micro-batch per process
    seq: int  # tokens per sequence
    prompt: int = 8  # of them prompt (no loss): N = batch x (seq - prompt) rows reach the loss
    teacher: Shape | None = None  # online teacher (teacher_signal=online); None: cached top-k
    teacher_dtype: str = "float32"
    precision: str = "no"  # train.mixed_precision: no | bf16
    lora: int = 0  # LoRA rank; 0 = full fine-tuning
    chunk: int = 0  # train.chunk_size; 0 = dense loss
    kd_ratio: float = 0.5
    k: int = 20  # top-k per cached token
    launch: str = "one"  # one | ddp | fsdp2
    world: int = 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def rows(self) -> int:
        return self.batch * (self.seq - self.prompt)


@dataclass
class Prediction:
    held: dict = field(default_factory=dict)  # alive the whole step
    phases: dict = field(default_factory=dict)  # phase -> {term: bytes}; the peak takes the largest phase

    def phase_total(self, name: str) -> float:
        return sum(self.phases[name].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> float:
        return sum(self.held.values()) + self.phase_total(self.peak_phase)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def activation_bytes_per_token(s: Shape, bf16: bool, lora: int = 0, bf16_params: bool = False) -> float:
    """What autograd keeps per token of the micro-batch, gradient checkpointing off (HF Llama, SDPA).

    Per layer, float32: input norm (its input x, the normalized x, their product with the weight:
    3h), the RoPE'd q and k and v and the attention output, saved by SDPA (2h + 2kv; RoPE's products
    with cos and sin keep nothing, as cos and sin need no gradient; o_proj reads SDPA's output in
    place), post-attention norm (3h), the MLP's gate, SiLU, up and product (4i): (8h + 2kv + 4i) x 4
    bytes, plus 4 bytes per head (SDPA's logsumexp) and 2 x 4 (the norms' rsqrt). bf16 autocast: the
    residual stream and the norms stay float32 (the embedding is float32: 2 x 8h), every linear
    layer saves its own bf16 copy of its input (q, k, v one each: 6h; gate, up: 4h), SDPA its bf16
    q, k, v and output (4h + 4kv), the MLP is bf16 (8i): 30h + 4kv + 8i bytes. After the last layer:
    the final norm's input, normalized x and output (12h). LoRA: + 4r per adapted linear.
    ``bf16_params`` (FSDP2 with bf16 mixed precision: the gathered weights are bf16, so is the
    embedding's output and the residual stream): each norm keeps its float32 copy of x and its bf16
    output (6h), the linears share one bf16 input (q, k, v: 2h; gate, up: 2h): 20h + 4kv + 8i
    (read from the code, not measured: FSDP2 with bf16 does not run on the CPU here).
    """
    h, kv, i = s.hidden, s.kv, s.intermediate
    if bf16_params:
        per_layer = 20 * h + 4 * kv + 8 * i
    else:
        per_layer = (30 * h + 4 * kv + 8 * i) if bf16 else 4 * (8 * h + 2 * kv + 4 * i)
    per_layer += 4 * s.heads + 8 + (7 * 4 * lora if lora else 0)
    return s.layers * per_layer + 12 * h


def loss_terms(run: Run) -> dict:
    """The loss's working memory (forward phase): chunked (potstill.devices.chunk_bytes_per_row's
    rows, the head's gradient and its kept copy) or dense (the (B*L, V) logits and the (N, V) copies)."""
    n, v, h = run.rows, run.student.vocab, run.student.hidden
    bf16 = run.precision == "bf16"
    fsdp_bf16 = bf16 and run.launch == "fsdp2"  # FSDP2's param_dtype bf16: the gathered head is bf16
    cb = 2 if bf16 else 4  # the (chunk, V) logits' compute dtype
    terms = {}
    if run.teacher is None and run.kd_ratio:
        terms["top-k targets"] = 12 * run.k * (run.tokens + n)
    if run.chunk:
        rows = min(run.chunk, n)
        if run.teacher is None:  # at the chunk's backward: 3 saved (c, V) float32 tensors + 3 gradients
            terms["chunk working memory"] = rows * v * 24
        else:  # potstill.devices.chunk_bytes_per_row: both logits, their gradient, six float32 copies
            terms["chunk working memory"] = rows * v * (3 * cb + 6 * 4)
        # the head's float32 gradient, accumulated, + one chunk's (or, at the end, its scaled copy); under
        # autocast also the chunk's bf16 gradient before its cast. LoRA: the head is frozen, no gradient
        # (since 2026-12-07; before, computed and dropped)
        if not run.lora:
            terms["head gradient"] = v * h * (
                2 * (2 if fsdp_bf16 else 4) + (2 if bf16 and not fsdp_bf16 else 0))
        terms["hidden rows"] = 3 * n * h * 4
        if bf16 and not fsdp_bf16:  # the head's bf16 cast: autocast caches one for every chunk (a trained
            # head: one leaf for all chunks since 2026-12-07; before, a new leaf and a cached cast per chunk),
            # a frozen head's is cast again for each chunk and freed with it
            terms["bf16 cast of the head"] = v * h * 2
    else:
        terms["logits"] = run.tokens * v * 4
        if bf16:
            terms["bf16 logits"] = run.tokens * v * 2
        copies = 1 + (run.kd_ratio < 1)  # the rows' copy; CE's log-softmax (kd_ratio 1: CE without a graph)
        if run.teacher is None and run.kd_ratio:
            copies += 3  # sparse: logits / T, the scattered copy, a logsumexp's exp
        elif run.kd_ratio:
            copies += 6  # dense: both log-softmaxes, the student's clamp, kl_div's exp, difference, product
        terms[f"loss: {copies} (N, V) copies"] = copies * n * v * 4
    if run.teacher is not None:
        terms.update(teacher_token_terms(run))
    return terms


def teacher_token_terms(run: Run) -> dict:
    """The online teacher's targets alive while the student runs: loss_sums keeps the completion rows
    of its forward's last hidden state (chunked) or logits (dense), copies; the whole output is dropped."""
    t, n = run.teacher, run.rows
    tb = DTYPE_BYTES[run.teacher_dtype]
    if run.chunk:  # the last hidden state's rows, in the teacher's dtype
        return {"teacher hidden rows": n * t.hidden * tb}
    lb = 2 if (run.precision == "bf16" or tb == 2) else 4  # its head under autocast gives bf16 logits
    return {"teacher logit rows": n * t.vocab * lb}


def predict(run: Run, device: str = "cpu") -> Prediction:
    """Every term, in bytes, per process. ``device`` cuda: AdamW runs foreach (one more 4 B/param
    temporary, sqrt(v)); on the CPU it runs tensor by tensor."""
    s, w = run.student, (run.world if run.launch == "fsdp2" else 1)
    bf16 = run.precision == "bf16"
    trained = s.lora_params(run.lora) if run.lora else s.params
    p = Prediction()
    p.held["weights"] = 4 * s.params / w
    if run.lora:
        p.held["LoRA adapters"] = 4 * trained / w  # FSDP2 shards them with their layers
    p.held["AdamW m, v"] = 8 * trained / w
    if run.launch == "ddp" and run.world > 1:
        p.held["DDP buckets"] = 4 * trained
    if run.teacher is not None:
        p.held.update(teacher_held(run))
    # DDP: the gradients are views into its all-reduce buckets (gradient_as_bucket_view, since
    # 2026-12-07; before, a second copy of every gradient)
    grads = {} if run.launch == "ddp" and run.world > 1 else {"gradients": 4 * trained / w}
    cast = {}
    if bf16 and run.launch != "fsdp2":
        cast["bf16 weight copies"] = 2 * s.linear_params
    fsdp = {phase: fsdp_terms(run, phase) if run.launch == "fsdp2" else {} for phase in ("forward", "backward")}
    act = {"activations": activation_bytes_per_token(s, bf16, run.lora, bf16 and run.launch == "fsdp2") * run.tokens}
    p.phases["forward + loss"] = {**cast, **fsdp["forward"], **act, **loss_terms(run)}
    p.phases["end of backward"] = {**grads, **cast, **fsdp["backward"]}
    largest = max(s.vocab * s.hidden, s.hidden * s.intermediate) if not run.lora else 0
    temp = 4 * trained / w if device == "cuda" else 2 * 4 * largest  # foreach sqrt(v) vs one tensor's
    p.phases["optimizer step"] = {**grads, "AdamW temporary": temp}
    if run.teacher is not None:
        p.phases["teacher forward"] = teacher_forward_terms(run, device)
    return p


def teacher_sharded(run: Run) -> bool:
    return run.teacher is not None and run.launch == "fsdp2" and run.world > 1


def teacher_held(run: Run) -> dict:
    """The online teacher's weights, frozen, in teacher.dtype: whole in every process, or under
    FSDP2 over several processes sharded (distributed.shard_teacher): 1/W of every parameter, and
    its root (embedding, final norm, head) also whole, gathered at its first forward and kept."""
    t, tb = run.teacher, DTYPE_BYTES[run.teacher_dtype]
    if not teacher_sharded(run):
        return {"teacher weights": tb * t.params}
    return {"teacher weights": tb * t.params / run.world,
            "teacher root, gathered": tb * (t.params - t.layers * t.layer_params)}


def teacher_forward_terms(run: Run, device: str) -> dict:
    """Alive during the teacher's forward, before the student's (no gradient exists yet): its output
    (every layer's hidden state for the chunked loss, else its (B, L, V) logits) and, sharded, a
    decoder layer being gathered: FSDP2's all-gather output (the whole layer, flat; this process's
    shard is copied into its own slice of it) and the layer's unsharded parameters it is copied
    into, 2 layers. gloo (the CPU) gathers through a buffer of its own, one more layer (a 64 MiB
    all_gather_into_tensor over gloo, measured alone: +97 MiB, the output's 32 MiB untouched half
    included); NCCL gathers in place, but on CUDA the next layer's gather overlaps this one's
    compute: 4 layers there (read from FSDP2's code, not measured)."""
    t, tb = run.teacher, DTYPE_BYTES[run.teacher_dtype]
    if run.chunk:
        out = {"teacher hidden states": (t.layers + 1) * run.tokens * t.hidden * tb}
    else:
        out = {"teacher logits": run.tokens * t.vocab * (2 if run.precision == "bf16" or tb == 2 else 4)}
    if teacher_sharded(run):
        out["FSDP2 gathered teacher layers"] = (4 if device == "cuda" else 3) * t.layer_params * tb
    return out


def fsdp_terms(run: Run, phase: str) -> dict:
    """FSDP2 (accelerate: fully_shard per decoder layer, the embedding on its own, the final norm and
    head together with reshard_after_forward False): the unsharded pieces one process holds at once,
    in the parameter dtype (bf16 under MixedPrecisionPolicy(param_dtype=bf16), which accelerate sets
    for mixed_precision bf16). The head, gathered from forward to backward. In the forward, a layer
    being gathered: 3 layers, the all-gather output, the unsharded parameters it is copied into and
    gloo's own buffer (as for the sharded teacher, ``teacher_forward_terms``; on CUDA, NCCL gathers
    in place, but the layer running and the next one's gather are 3 as well). In the backward, a
    layer's gathered parameters, the previous layer's (prefetched by FSDP2's pre_backward) and its
    own unsharded gradient; LoRA: the frozen layer takes no gradient (its adapters' is small)."""
    s = run.student
    pb = 2 if run.precision == "bf16" else 4
    layers = 3 if phase == "forward" or not run.lora else 2
    return {"FSDP2 gathered head": s.vocab * s.hidden * pb, "FSDP2 gathered layers": s.layer_params * layers * pb}


# ---------------------------------------------------------------- measurement


def status_mib(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def build(run: Run, world: int, accelerator=None):
    """potstill's Setup for ``run`` (what train.setup builds from a recipe and a ledger), on the CPU;
    ``accelerator``: the warm-up's (the test-only FSDP2-on-CPU state allows one per process)."""
    import torch
    from transformers import LlamaForCausalLM

    from potstill.recipe import LoraSpec, TrainSpec
    from potstill.train.heads import model_heads
    from potstill.train.distributed import shard_teacher
    from potstill.train.loop import Plan, Setup, add_lora, make_accelerator, sharded
    from potstill.train.tokenizer_match import Compat

    spec = TrainSpec(kd_ratio=run.kd_ratio, chunk_size=run.chunk, compile="off", mixed_precision=run.precision,
                     teacher_signal="online" if run.teacher else "cached", batch_size=run.batch * world,
                     micro_batch_size=run.batch, epochs=STEPS, lr=1e-4, grad_clip=1.0,
                     lora=LoraSpec(r=run.lora) if run.lora else None)
    if accelerator is None:
        accelerator, _ = make_accelerator("cpu", spec)
    mixed_precision = accelerator.mixed_precision
    torch.manual_seed(0)
    model = LlamaForCausalLM(run.student.config())
    teacher = None
    if run.teacher is not None:  # potstill loads it in teacher.dtype, frozen, in eval mode
        teacher = LlamaForCausalLM._from_config(run.teacher.config(), dtype=getattr(torch, run.teacher_dtype))
        teacher.requires_grad_(False).eval()
    if run.lora:
        model = add_lora(model, spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr,
                                  weight_decay=spec.weight_decay)
    # bf16: potstill's setup checks the heads after accelerate wraps the forward in autocast and copies
    # its bf16 logits to float32, against a float32 tolerance, and refuses every chunk_size > 0 (a bug,
    # reported with this benchmark); here they are checked before, on the float32 forward
    heads = model_heads(model, teacher) if run.chunk and run.precision == "bf16" else None
    model, optimizer = accelerator.prepare(model, optimizer)
    if teacher is not None and sharded(accelerator):  # as train.online_teacher does
        shard_teacher(teacher, model)
    if run.chunk and heads is None:
        heads = model_heads(model, teacher)  # as train.setup does
    data = examples(run, world)
    return Setup(spec=spec, accelerator=accelerator, model=model, optimizer=optimizer, tokenizer=None, teacher=teacher,
                 compat=Compat("identical", run.student.vocab, True), heads=heads, data=data,
                 plan=Plan(len(data), spec, accelerator.num_processes), pad_id=0, on_policy_max_new_tokens=1,
                 mixed_precision=mixed_precision, compile=False, ledger_sha="", teachers=[], signature={},
                 ckpt_root=Path(tempfile.gettempdir()), start=0)


def examples(run: Run, world: int) -> list:
    """batch x world sequences of random ids, each with the teacher's top-k for its completion."""
    import numpy as np

    from potstill.train.examples import TrainExample

    rng = np.random.default_rng(0)
    n_completion = run.seq - run.prompt
    out = []
    for _ in range(run.batch * world):
        ids = rng.integers(3, run.student.vocab, run.seq).tolist()
        topk = rng.integers(3, run.student.vocab, (n_completion, run.k)).astype(np.int32)
        lp = -np.sort(rng.random((n_completion, run.k)).astype(np.float32) * 5, 1)
        out.append(TrainExample(ids, run.prompt, topk, lp))
    return out


def tiny(run: Run) -> Run:
    """The same kind of run at a few thousand parameters: the warm-up that pages the code in."""
    small = Shape(64, 1, 128, 2, 2, 256)
    return replace(run, student=small, teacher=small if run.teacher else None, batch=1, seq=24, prompt=4,
                   chunk=min(run.chunk, 8), lora=min(run.lora, 4))


def measure(run: Run) -> dict:
    import torch

    from potstill.train.loop import train_step

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    warm = build(tiny(run), world)
    for step in range(2):
        train_step(warm, step)
    accelerator = warm.accelerator
    accelerator.free_memory()  # drops its references to the warm-up's model and optimizer
    del warm
    gc.collect()
    base = status_mib("VmRSS")
    reset_peak()
    began = time.perf_counter()
    s = build(run, world, accelerator)
    built = status_mib("VmRSS") - base
    # the steps' peak: building a sharded teacher holds it whole first, which a GPU's host memory
    # holds, not the GPU; every other run builds less than its steps then hold
    reset_peak()
    for step in range(STEPS):
        row = train_step(s, step)
        assert "skipped" not in row, row
    return {"peak_mib": status_mib("VmHWM") - base, "built_mib": built, "after_mib": status_mib("VmRSS") - base,
            "seconds": round(time.perf_counter() - began, 1), "loss": row["loss"],
            "rank": int(os.environ.get("RANK", "0")), "distributed": s.accelerator.distributed_type.value}


# ---------------------------------------------------------------- configurations

WIDE = Shape(1024, 4, 4096, 16, 16, 4096)  # 75.5M parameters, small vocabulary: the per-parameter terms
SMALL = Shape(256, 2, 1024, 4, 4, 4096)  # 3.7M: a student beside a large teacher
LONG = Shape(256, 4, 1024, 4, 4, 512)  # 3.4M, long sequences: the per-token activations
HEAD = Shape(64, 1, 256, 1, 1, 32000)  # the logits dominate
BIG_V = Shape(64, 1, 256, 1, 1, 151936)
WIDE_HEAD = Shape(1024, 1, 1024, 16, 16, 32000)
SHORT = {"batch": 1, "seq": 64, "chunk": 64}
CHECKS = {
    "full, float32": Run(WIDE, **SHORT),
    "full, bf16": Run(WIDE, **SHORT, precision="bf16"),
    "LoRA r=8, float32": Run(WIDE, **SHORT, lora=8),
    "LoRA r=8, bf16": Run(WIDE, **SHORT, lora=8, precision="bf16"),
    "online teacher, float32": Run(SMALL, **SHORT, teacher=Shape(1024, 8, 4096, 16, 16, 4096)),
    "online teacher, bfloat16 weights": Run(SMALL, **SHORT, teacher=Shape(1024, 8, 4096, 16, 16, 4096),
                                            teacher_dtype="bfloat16"),
    "activations, float32": Run(LONG, batch=4, seq=2048, chunk=1024),
    "activations, bf16": Run(LONG, batch=4, seq=2048, chunk=1024, precision="bf16"),
    "dense loss, cached": Run(HEAD, batch=2, seq=1024),
    "dense loss, online": Run(HEAD, batch=1, seq=1024, teacher=HEAD),
    "chunked loss, cached": Run(BIG_V, batch=2, seq=1024, chunk=256),
    "chunked loss, online": Run(BIG_V, batch=2, seq=1024, chunk=256, teacher=BIG_V),
    "chunked loss, cached, bf16": Run(BIG_V, batch=2, seq=1024, chunk=256, precision="bf16"),
    "chunked loss, bf16, 16 chunks": Run(WIDE_HEAD, batch=1, seq=520, chunk=32, precision="bf16"),
    "DDP, 2 processes": Run(WIDE, **SHORT, launch="ddp", world=2),
    "FSDP2, 2 processes": Run(WIDE, **SHORT, launch="fsdp2", world=2),
    "LoRA r=8, FSDP2, 2 processes": Run(WIDE, **SHORT, lora=8, launch="fsdp2", world=2),
    "online teacher, FSDP2, 2 processes": Run(SMALL, **SHORT, teacher=Shape(1024, 8, 4096, 16, 16, 4096),
                                              launch="fsdp2", world=2),
}
TINY = Shape(128, 2, 512, 2, 2, 2048)
SMOKE = {
    "smoke: chunked, bf16, LoRA": Run(TINY, batch=2, seq=64, chunk=32, precision="bf16", lora=4),
    "smoke: dense, online": Run(TINY, batch=2, seq=64, teacher=TINY),
    "smoke: FSDP2, 2 processes": Run(TINY, batch=1, seq=32, chunk=16, launch="fsdp2", world=2),
    "smoke: FSDP2, online teacher": Run(TINY, batch=1, seq=32, chunk=16, launch="fsdp2", world=2, teacher=TINY),
}
RUNS = {**CHECKS, **SMOKE}

FSDP2_CONFIG = ROOT / "examples" / "accelerate" / "fsdp2.yaml"  # the documented config; num_processes set per run


def run_one(name: str) -> list[dict]:
    """``name`` in fresh processes (one, or an accelerate launch of ``world``): each process's result."""
    run = RUNS[name]
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [__file__, "--one", name, "--result", tmp]
        if run.launch == "one":
            cmd = [sys.executable, *cmd]
        elif run.launch == "ddp":  # DDP over gloo, as `accelerate launch --multi_gpu` gives on CPUs
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(run.world), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *cmd]
        else:  # FSDP2 over a gloo CPU mesh: the path the tests take (POTSTILL_TEST_FSDP_ON_CPU)
            config = Path(tmp) / "fsdp.yaml"
            config.write_text(FSDP2_CONFIG.read_text().replace("num_processes: 2", f"num_processes: {run.world}"))
            env["POTSTILL_TEST_FSDP_ON_CPU"] = "1"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return sorted((json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")), key=lambda r: r["rank"])


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def check_table(names: list[str]) -> bool:
    """Predicted against measured peak per process, each configuration in fresh processes; True when
    every ratio is within 20 %."""
    print(versions())
    print("\n| configuration | student params | micro-batch B x L | predicted peak MiB | largest terms (MiB) "
          "| measured peak MiB | measured / predicted |")
    print("|---|---:|---:|---:|---|---:|---:|")
    ok = True
    for name in names:
        run, pred = RUNS[name], predict(RUNS[name])
        results = run_one(name)
        measured = max(r["peak_mib"] for r in results)
        ratio = measured * 2**20 / pred.peak
        ok &= abs(ratio - 1) <= 0.2
        terms = {**pred.held, **pred.phases[pred.peak_phase]}
        top = ", ".join(f"{k} {mib(v)}" for k, v in sorted(terms.items(), key=lambda kv: -kv[1])[:3])
        each = " / ".join(f"{r['peak_mib']:,.0f}" for r in results)
        print(f"| {name} | {run.student.params / 1e6:.1f}M | {run.batch} x {run.seq} | {mib(pred.peak)} "
              f"| {pred.peak_phase}: {top} | {each} | {ratio:.2f} |", flush=True)
        print(json.dumps({"name": name, "results": results, "predicted_mib": pred.peak / 2**20}), file=sys.stderr)
    return ok


def versions() -> str:
    import platform

    names = ("torch", "transformers", "accelerate", "peft")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                            check=False).stdout.strip()
    return (", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)
            + f", Python {platform.python_version()}, potstill {commit or 'unknown'}, 1 thread a process, CPU")


# ---------------------------------------------------------------- the 80 GB plan

GPU_BYTES = 80 * GiB  # an "80 GB" card (an H100 SXM shows 81,559 MiB)
HEADROOM = 0.9  # plan to 90 %: the CUDA context, NCCL buffers, the allocator's fragmentation, the backward's own working set
PLAN = {"batch": 1, "seq": 2048, "prompt": 256, "k": 20}  # one sequence of 2,048 tokens per micro-batch, 1,792 trained


def llama(layers: int) -> Shape:
    """Llama 3's proportions at any depth: hidden 128 x layers, MLP 3.5 x hidden, head_dim 128,
    8 KV heads, vocabulary 128,256, untied (32 layers: Llama-3-8B's shape, 8.03B parameters)."""
    h = 128 * layers
    return Shape(h, layers, round(3.5 * h / 256) * 256, layers, min(8, layers), 128256)


def largest(fields: dict, vary: str = "student", beside: Shape | None = None,
            budget: float = HEADROOM * GPU_BYTES) -> tuple[int, Prediction] | None:
    """The deepest ``llama(n)`` student (or, ``vary`` teacher, teacher beside the ``beside``
    student) whose run with ``fields`` fits ``budget`` on a CUDA device."""
    best = None
    for n in range(1, 161):
        run = Run(llama(n), teacher=beside, **fields) if vary == "student" else Run(beside, teacher=llama(n), **fields)
        pred = predict(run, "cuda")
        if pred.peak > budget:
            break
        best = (n, pred)
    return best


def cell(found: tuple[int, Prediction] | None, what=lambda s: s) -> str:
    if found is None:
        return "none"
    n, pred = found
    shape = what(llama(n))
    return f"{shape.params / 1e9:.2f}B ({n} layers, h {shape.hidden}; {pred.peak / GiB:.0f} GiB)"


STUDENT_MODES = {  # name -> Run fields (student and teacher filled in by the search)
    "full, float32": {"precision": "no"},
    "full, bf16": {"precision": "bf16"},
    "LoRA r=8, float32": {"precision": "no", "lora": 8},
    "LoRA r=8, bf16": {"precision": "bf16", "lora": 8},
}


def plan_tables() -> str:
    """Largest students (cached teacher signal) and teachers (online), one GPU and a node of eight."""
    budget = HEADROOM * GPU_BYTES
    out = [(f"budget {budget / GiB:.0f} GiB of an 80 GiB card ({HEADROOM:.0%}); micro-batch {PLAN['batch']} x "
            f"{PLAN['seq']} tokens ({PLAN['seq'] - PLAN['prompt']} trained); family llama(n): hidden 128n, "
            f"MLP 3.5 x hidden, 8 KV heads, V 128,256, untied; CUDA (AdamW foreach)"), "",
           "Largest student, cached teacher signal (no teacher in memory):", "",
           "| mode | loss | one GPU (one process) | node of 8, DDP | node of 8, FSDP2 |", "|---|---|---|---|---|"]
    for name, fields in STUDENT_MODES.items():
        for chunk in (1024, 0):
            run = {**PLAN, **fields, "chunk": chunk}
            one, ddp = largest(run), largest({**run, "launch": "ddp", "world": 8})
            fsdp = cell(largest({**run, "launch": "fsdp2", "world": 8}))
            out.append(f"| {name} | {'chunked 1,024' if chunk else 'dense'} | {cell(one)} | {cell(ddp)} | {fsdp} |")
    return "\n".join(out + ["", teachers_table()])


def teachers_table() -> str:
    out = ["Online teacher (whole in one process; under FSDP2 sharded by decoder layer, its embedding and head whole "
           "in each process), chunked loss 1,024:", "",
           ("| mode | teacher dtype | largest teacher beside a llama(16) student "
            "| largest student beside a llama(32) teacher (8.03B) |"), "|---|---|---|---|"]
    for name, fields in STUDENT_MODES.items():
        for tdtype in ("bfloat16", "float32"):
            for launch, world in (("one", 1), ("fsdp2", 8)):
                run = {**PLAN, **fields, "chunk": 1024, "teacher_dtype": tdtype, "launch": launch, "world": world}
                teacher = largest(run, "teacher", llama(16))
                student = largest(run, "student", llama(32))
                where = "one GPU" if launch == "one" else "FSDP2 x 8"
                out.append(f"| {name}, {where} | {tdtype} | {cell(teacher)} | {cell(student)} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="+", choices=list(CHECKS), metavar="NAME", help="configurations to check")
    p.add_argument("--table", action="store_true", help="the 80 GB planning table (formulas only)")
    p.add_argument("--smoke", action="store_true", help="tiny configurations, seconds: the script runs")
    args = p.parse_args()
    if args.one:
        result = measure(RUNS[args.one])
        (args.result / f"rank{result['rank']}.json").write_text(json.dumps(result))
        return
    if args.table:
        print(plan_tables())
        return
    ok = check_table(list(SMOKE) if args.smoke else args.only or list(CHECKS))
    if not args.smoke:
        print(f"\nevery configuration within 20 %: {'yes' if ok else 'NO'}")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

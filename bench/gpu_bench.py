"""The GPU tables of issue 14 in one process: the KD loss alone, the full training step, and the
local teacher's generation with top-k logprobs; potstill against TRL's chunked divergence and Liger's
fused linear JSD on the same inputs.

    python bench/gpu_bench.py [--peak-tflops 989] [--tables loss step generate]   # one H100/H200
    python bench/gpu_bench.py --tiny                                              # CPU, seconds: the script works
    python bench/gpu_bench.py --tiny --tables generate --teacher examples/quickstart/teacher

TRL and Liger come from the bench-gpu extra (pip install -e '.[bench-gpu]'); an arm whose library
is missing, or that runs out of memory, is printed as skipped with the reason, and the rest go on;
an arm or a table that fails otherwise is printed the same way, and the script exits 1 at the end.

Models are built from configs (no downloads), Qwen2-shaped, V = 151,936: student 0.5B (24 layers,
hidden 896, tied embeddings), teachers 1.5B (28 layers, hidden 1536) and 7B (28 layers, hidden
3584), bf16 on CUDA (the student in float32 under bf16 autocast, AdamW), float32 on the CPU.
Every arm: 2 warm-ups, then the median of 5 timed repetitions (CUDA-synchronised); peak =
torch.cuda.max_memory_allocated during the timed repetitions above the memory allocated before
the arm's warm-ups (so optimizer state and gradients count, compile-time scratch does not).
Compiled arms use torch.compile (inductor) through ``chunked_kd_loss(compile=True)``, as
``train.compile: auto`` does on CUDA.

Expected run time on one H200 (from issue 14's figures; the compile times are estimates, and
inductor's on-disk cache makes a second run faster):
- loss table: 12 uncompiled arms x 7 reps x <= 130 ms = 11 s; 2 compiled arms, one inductor
  compile each (~20 s) = 40 s; TRL and Liger Triton JIT ~10 s each: ~75 s;
- step table: models from configs ~15 s (7B ~10 s); per arm 7 steps x 0.2-0.6 s = 2-4 s, 10 arms
  = 40 s; compiled arms (online x 2 teachers, cached, SFT) each compile twice (a full chunk and
  the shorter last one, whose row count is then dynamic), ~8 x 15 s = 120 s: ~175 s;
- generation table: 1.5B teacher, batch 64, 128 new tokens, 3 + 3 interleaved runs of ~4 s = 25 s;
- in all about 4.6 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from potstill.devices import pick_chunk_size  # noqa: E402
from potstill.losses import kd_loss  # noqa: E402
from potstill.losses.chunked import Head, chunked_kd_loss  # noqa: E402

QWEN2 = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32_768,
             hidden_act="silu", pad_token_id=0, eos_token_id=3, bos_token_id=None, use_sliding_window=False)
FULL = {
    "vocab": 151_936, "rows": 8192, "k": 20, "batch": 8, "seq": 1024, "prompt": 256,
    "gen_batch": 64, "gen_prompt": 64, "gen_new": 128, "warmup": 2, "reps": 5,
    "student": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, tie_word_embeddings=True),
    "teachers": {
        "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, tie_word_embeddings=True),
        "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, tie_word_embeddings=False),
    },
    "chunks": (1024, 4096), "compiled_chunk": 1024, "step_chunk": 4096,
}
TINY = {
    "vocab": 1000, "rows": 256, "k": 20, "batch": 2, "seq": 64, "prompt": 16,
    "gen_batch": 8, "gen_prompt": 8, "gen_new": 8, "warmup": 1, "reps": 1,
    "student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True),
    "teachers": {"tiny": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False)},
    "chunks": (64, 128), "compiled_chunk": 128, "step_chunk": 32,  # whole chunks only: one trace each
}


@dataclass
class Bench:
    device: torch.device
    shapes: dict
    compile: bool | str  # True: inductor; "eager": dynamo's tracer only (--tiny on CPU)
    rows: dict[str, list] = field(default_factory=dict)  # table -> rows of cells
    failed: list[str] = field(default_factory=list)  # arms that raised (not a missing library, not out of memory)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cuda else torch.float32

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def measure(self, fn, warmup: int | None = None, reps: int | None = None) -> tuple[float, float | None]:
        """Median seconds of ``reps`` calls after ``warmup``, and peak GiB above the level before."""
        warmup = self.shapes["warmup"] if warmup is None else warmup
        reps = self.shapes["reps"] if reps is None else reps
        self.sync()
        base = torch.cuda.memory_allocated() if self.cuda else 0
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if self.cuda else None
        return statistics.median(times), peak

    def arm(self, table: str, name: str, run) -> None:
        """Run one arm; an arm that cannot run (library missing, out of memory) is a row saying why."""
        try:
            self.rows.setdefault(table, []).append([name, *run()])
        except (ImportError, torch.OutOfMemoryError) as e:
            self.skip(table, name, f"{type(e).__name__}: {first_line(e)}")
        except Exception as e:  # noqa: BLE001 - a GPU session is short: one broken arm must not cost the rest
            traceback.print_exc()
            self.skip(table, name, f"failed, {type(e).__name__}: {first_line(e)}")
            self.failed.append(name)
        finally:
            if self.cuda:
                torch.cuda.empty_cache()

    def skip(self, table: str, name: str, why: str) -> None:
        print(f"skipped {name}: {why}", flush=True)
        self.rows.setdefault(table, []).append([name, f"skipped ({why})"])


def first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:120]


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


# ---------------------------------------------------------------- the KD loss alone

def loss_table(b: Bench) -> None:
    """Forward KL, forward + backward, on (N, H) hidden states and (V, H) heads."""
    s, dev, dt = b.shapes, b.device, b.dtype
    v, n = s["vocab"], s["rows"]
    h_s, h_t = s["student"]["hidden_size"], next(iter(s["teachers"].values()))["hidden_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(n, h_s, generator=g)).to(dev, dt).requires_grad_(True)
    weight = (torch.randn(v, h_s, generator=g) * h_s**-0.5).to(dev, dt).requires_grad_(True)
    t_hidden = torch.randn(n, h_t, generator=g).to(dev, dt)
    t_weight = (torch.randn(v, h_t, generator=g) * 2 * h_t**-0.5).to(dev, dt)
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    with torch.no_grad():  # the cached arms' targets: the same teacher's top-k, a chunk of rows at a time
        tops = [(t_hidden[i:i + 1024] @ t_weight.T).float().log_softmax(-1).topk(s["k"], -1) for i in range(0, n, 1024)]
        topk_lp, topk_ids = torch.cat([t[0] for t in tops]), torch.cat([t[1] for t in tops])
        del tops

    values = {}  # each arm's last loss: the same objective gives the same number (bf16 aside)

    def backward(loss):
        loss.backward()
        values["last"] = loss.detach()
        hidden.grad = weight.grad = None

    def measured(fn):
        def run():
            seconds, peak = b.measure(fn)
            return [seconds, peak, float(values["last"])]
        return run

    def dense():
        logits = hidden @ weight.T  # (N, V)
        with torch.no_grad():
            teacher = t_hidden @ t_weight.T
        backward(kd_loss("forward_kl", logits, teacher_logits=teacher))

    def chunked(chunk, compile, cached):
        teacher = ({"topk_ids": topk_ids, "topk_logprobs": topk_lp} if cached else
                   {"teacher_hidden": t_hidden, "teacher_head": Head(t_weight)})
        return lambda: backward(chunked_kd_loss(hidden, Head(weight), labels, kd_ratio=1.0, chunk_size=chunk,
                                                compile=compile, **teacher)[0])

    b.arm("loss", "potstill dense (`kd_loss` on full logits)", measured(dense))
    for cached in (False, True):
        what = f"cached top-{s['k']}" if cached else "online teacher"
        for chunk in s["chunks"]:
            b.arm("loss", f"potstill `chunked_kd_loss`, {what}, chunk {chunk}",
                  measured(chunked(chunk, False, cached)))
        c = s["compiled_chunk"]
        b.arm("loss", f"potstill `chunked_kd_loss` compiled ({b.compile if b.compile is not True else 'inductor'}), "
                      f"{what}, chunk {c}", measured(chunked(c, b.compile, cached)))

    def trl():
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        # beta 0: forward KL(teacher || student), per token; TRL's trainer then averages over tokens
        return measured(lambda: backward(ChunkedDivergenceFunction.apply(
            hidden, weight, None, t_hidden, t_weight, None, 0.0, 1.0)[0].mean()))()

    def liger():
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0)  # beta 0: forward KL
        return measured(lambda: backward(jsd(hidden, weight, t_hidden, t_weight, None)))()

    b.arm("loss", "TRL `ChunkedDivergenceFunction` (beta 0)", trl)
    b.arm("loss", "Liger `LigerFusedLinearJSD` (beta 0)", liger)


# ---------------------------------------------------------------- the training step

def build(b: Bench, fields: dict, seed: int, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{**QWEN2, **fields, "vocab_size": b.shapes["vocab"]})
    torch.manual_seed(seed)
    with torch.device(b.device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def step_batch(b: Bench) -> dict:
    """(B, L) random tokens; the first ``prompt`` carry no loss; top-k targets at the position of the
    token they predict, as ``collate`` lays them out."""
    s, g = b.shapes, torch.Generator(device="cpu").manual_seed(1)
    v, bsz, seq, k = s["vocab"], s["batch"], s["seq"], s["k"]
    ids = torch.randint(4, v, (bsz, seq), generator=g)
    labels = ids.clone()
    labels[:, :s["prompt"]] = -100
    stride = v // k  # k distinct ids a row
    topk_ids = (torch.randint(0, v, (bsz, seq, 1), generator=g) + torch.arange(k) * stride) % v
    topk_lp = torch.randn(bsz, seq, k + 1, generator=g).mul(3).log_softmax(-1)[..., :k].sort(-1, descending=True)[0]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "topk_ids": topk_ids, "topk_logprobs": topk_lp}
    return {key: t.to(b.device) for key, t in batch.items()}


def step_table(b: Bench, peak_flops: float) -> None:
    from potstill.recipe import TrainSpec
    from potstill.train.heads import model_heads
    from potstill.train.loop import loss_sums
    from potstill.train.tokenizer_match import Compat

    s = b.shapes
    batch = step_batch(b)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    compat = Compat("identical", s["vocab"], True)
    student_params = {}

    def potstill_step(teacher, spec: TrainSpec, compile):
        def run():
            student = build(b, s["student"], 0, torch.float32)
            optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
            heads = model_heads(student, teacher) if spec.chunk_size else None

            def step():
                with b.autocast():
                    loss, *_ = loss_sums(student, batch, spec, compat, teacher, heads=heads, compile=compile)
                    (loss / tokens).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return row(b.measure(step))
        return run

    def hidden_step(teacher, loss_of):
        """TRL's and Liger's losses in the same loop: (N, H) hidden states and the heads' weights."""
        def run():
            fn = loss_of()  # import first: a missing library skips before building anything
            student = build(b, s["student"], 0, torch.float32)
            optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
            mask = batch["labels"][:, 1:] != -100

            def step():
                with b.autocast():
                    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  output_hidden_states=True, logits_to_keep=1)
                    with torch.no_grad():
                        t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        output_hidden_states=True, logits_to_keep=1)
                    hs = out.hidden_states[-1][:, :-1][mask]  # (N, H_s)
                    ht = t_out.hidden_states[-1][:, :-1][mask]  # (N, H_t)
                    w = student.get_output_embeddings().weight
                    loss = fn(hs, w.to(hs.dtype), ht, teacher.get_output_embeddings().weight.to(ht.dtype))
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return row(b.measure(step))
        return run

    def trl():
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        return lambda hs, w, ht, wt: ChunkedDivergenceFunction.apply(hs, w, None, ht, wt, None, 0.0, 1.0)[0].mean()

    def liger():
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0)
        return lambda hs, w, ht, wt: jsd(hs, w, ht, wt, None)

    def row(measured):
        seconds, peak = measured
        flops = 6 * student_params["n"] * tokens / seconds  # student forward + backward, 6 N per token
        return [f"{tokens / seconds:,.0f}", gib(peak), f"{100 * flops / peak_flops:.0f} %"]

    kd = dict(objective="kd", loss="forward_kl", kd_ratio=1.0, temperature=1.0)
    chunk = s["step_chunk"]
    probe = build(b, s["student"], 0, torch.float32)
    student_params["n"] = sum(p.numel() for p in probe.parameters())
    # what train.chunk_size=auto picks here, with the student on the device (its optimizer state comes later)
    auto = pick_chunk_size(torch.cuda.mem_get_info()[0], s["vocab"], s["student"]["hidden_size"], 2) if b.cuda else None
    del probe
    if b.cuda:
        torch.cuda.empty_cache()
    b.rows["step-notes"] = [f"{tokens:,} trained tokens a step ({s['batch']} x {s['seq']}, the first {s['prompt']} "
                            f"of each row prompt); train.chunk_size=auto would pick {auto or 'n/a (CPU: 1024)'} "
                            f"with the student alone on the device; share of peak = 6 x "
                            f"{student_params['n'] / 1e6:,.1f}M student params x tokens/s / peak"]
    for label, spec, compile in (
            (f"potstill cached top-{s['k']}, chunk {chunk}, compiled (no teacher forward)",
             TrainSpec(**kd, teacher_signal="cached", chunk_size=chunk), b.compile),
            (f"potstill SFT, chunk {chunk}, compiled", TrainSpec(objective="sft", chunk_size=chunk), b.compile)):
        b.arm("step", label, potstill_step(None, spec, compile))
    for name, fields in s["teachers"].items():
        teacher = None
        try:
            teacher = build(b, fields, 2, b.dtype).eval().requires_grad_(False)
        except torch.OutOfMemoryError as e:
            b.skip("step", f"{name} teacher", f"OutOfMemoryError: {first_line(e)}")
            continue
        online = TrainSpec(**kd, teacher_signal="online")
        for label, spec, compile in (
                ("potstill online, dense", online, False),
                (f"potstill online, chunk {chunk}", online.model_copy(update={"chunk_size": chunk}), False),
                (f"potstill online, chunk {chunk}, compiled", online.model_copy(update={"chunk_size": chunk}),
                 b.compile)):
            b.arm("step", f"{label} ({name} teacher)", potstill_step(teacher, spec, compile))
        b.arm("step", f"TRL chunked divergence ({name} teacher)", hidden_step(teacher, trl))
        b.arm("step", f"Liger fused linear JSD ({name} teacher)", hidden_step(teacher, liger))
        del teacher
        if b.cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- generation with top-k logprobs

def word_tokenizer(vocab: int):
    """A word-level tokenizer of ``vocab`` ids (w4, w5, ...), so config-built models can generate."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(len(specials), vocab)])}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|end|>", unk_token="<pad>")


def generation_table(b: Bench, teacher_dir: Path | None, rounds: int = 3) -> None:
    """Plain ``generate`` against potstill's ``generate_ids`` with top_logprobs=20, interleaved, the
    same prompts, seed and new tokens; tokens/s = batch x new tokens / seconds."""
    from potstill.hf import folder_defaults_off, generate_ids, load_model_dir, stated_config

    s = b.shapes
    if teacher_dir is not None:
        model, tok = load_model_dir(teacher_dir, "teacher", device=str(b.device))
        name = teacher_dir.name
    else:
        fields = s["teachers"].get("1.5B") or next(iter(s["teachers"].values()))
        model, tok = build(b, fields, 2, b.dtype).eval(), word_tokenizer(s["vocab"])
        name = f"Qwen2-shaped {'1.5B' if '1.5B' in s['teachers'] else 'tiny'} from config"
    g = torch.Generator(device="cpu").manual_seed(3)
    lo = 4 if teacher_dir is None else 0
    rows = torch.randint(lo, len(tok), (s["gen_batch"], s["gen_prompt"]), generator=g).tolist()
    params = {"max_new_tokens": s["gen_new"], "temperature": 1.0, "top_p": 1.0, "top_logprobs": s["k"]}
    hashes = [f"h{i}" for i in range(len(rows))]
    config = stated_config(params, tok, model.get_output_embeddings().weight.shape[0])
    ids = torch.tensor(rows, device=b.device)
    plain_t, ours_t, new_tokens = [], [], []

    def plain():  # the same decoding as ours: the folder's generation_config.json set aside
        torch.manual_seed(0)
        with folder_defaults_off(model):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new_tokens.append(out.shape[1] - ids.shape[1])

    def ours():
        generate_ids(model, tok, rows, params, 0, hashes)

    with torch.no_grad():
        plain(), ours()  # warm-up
        for _ in range(rounds):  # interleaved: a machine whose load drifts affects both alike
            for fn, times in ((plain, plain_t), (ours, ours_t)):
                b.sync()
                start = time.perf_counter()
                fn()
                b.sync()
                times.append(time.perf_counter() - start)
    steps = max(new_tokens)
    plain_s, ours_s = statistics.median(plain_t), statistics.median(ours_t)
    total = len(rows) * steps
    b.rows["generate"] = [[f"plain `generate` ({name})", f"{total / plain_s:,.0f}", "1.00"],
                          [f"potstill `generate_ids`, top_logprobs={s['k']} ({name})", f"{total / ours_s:,.0f}",
                           f"{plain_s / ours_s:.2f}"]]
    b.rows["generate-notes"] = [f"batch {len(rows)}, {s['gen_prompt']} prompt tokens, {steps} new tokens, sampling "
                                f"at temperature 1; median of {rounds} interleaved runs after one warm-up each"]


# ---------------------------------------------------------------- output

def versions() -> list[str]:
    out = []
    for dist in ("torch", "transformers", "trl", "liger-kernel", "triton"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} not installed")
    return out


def machine(b: Bench) -> str:
    if not b.cuda:
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name()
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return f"{name}, driver {driver or 'unknown'}, CUDA {torch.version.cuda}"


def git_hash() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def measured_peak_flops(b: Bench) -> float:
    """FLOP/s of a large matmul in the training dtype: the card's practical peak (bf16 on CUDA)."""
    n = 8192 if b.cuda else 512
    x = torch.randn(n, n, device=b.device, dtype=b.dtype)
    seconds, _ = b.measure(lambda: x @ x, warmup=3, reps=10)
    return 2 * n**3 / seconds


def table(header: list[str], rows: list[list[str]]) -> str:
    width = len(header)
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (width - 1) + "|"]
    for r in rows:
        cells = r if len(r) == width else [r[0], r[1]] + [""] * (width - 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (seconds): checks the script runs")
    p.add_argument("--tables", nargs="+", choices=("loss", "step", "generate"), default=["loss", "step", "generate"])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's bf16 peak for the 'share of peak' column (default: measured with a matmul)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="generation table: a local model folder instead of the config-built teacher")
    p.add_argument("--device", default=None, help="default: cuda if available (not with --tiny), else cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    # --tiny on the CPU: dynamo's tracer without code generation, so the compiled path runs in seconds
    b = Bench(device, TINY if args.tiny else FULL, True if device.type == "cuda" else "eager")
    # every arm is a new compile spec (teacher width, dtype, signal); without room they would fall back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    began = time.perf_counter()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak_flops(b)
    s = b.shapes
    t_hidden = next(iter(s["teachers"].values()))["hidden_size"]
    parts = [f"machine: {machine(b)}", "versions: " + ", ".join(versions()) + f", potstill {git_hash()}",
             f"peak: {peak / 1e12:,.4g} TFLOP/s ({'given' if args.peak_tflops else f'measured, {b.dtype} matmul'})"]

    def say(*text: str) -> None:  # each table as soon as it is measured: a run cut short keeps what it has
        parts.extend(text)
        print("\n".join(text), flush=True)

    say(*parts)
    tables = {"loss": lambda: loss_table(b), "step": lambda: step_table(b, peak),
              "generate": lambda: generation_table(b, args.teacher)}
    failed = []
    for name in args.tables:
        try:
            tables[name]()
        except Exception:  # noqa: BLE001 - its setup failed (out of memory, a library): the other tables still run
            traceback.print_exc()
            failed.append(name)
        if name == "loss" and "loss" in b.rows:
            say(f"\nKD loss alone (forward KL, fwd + bwd; student hidden {s['student']['hidden_size']}, teacher "
                f"hidden {t_hidden}, V = {s['vocab']:,}, N = {s['rows']:,} tokens, {b.dtype}; median of "
                f"{s['reps']} after {s['warmup']} warm-ups):\n",
                table(["arm", "time (ms)", "peak (GiB)", "loss"],
                      [[r[0], f"{1000 * r[1]:.1f}", gib(r[2]), f"{r[3]:.5f}"] if len(r) == 4 else r
                       for r in b.rows["loss"]]))
        if name == "step" and "step" in b.rows:
            say(f"\nFull training step ({b.rows['step-notes'][0]}):\n",
                table(["arm", "tokens/s", "peak (GiB)", "share of peak"], b.rows["step"]))
        if name == "generate" and "generate" in b.rows:
            say(f"\nGeneration with top-k logprobs ({b.rows['generate-notes'][0]}):\n",
                table(["arm", "tokens/s", "vs plain"], b.rows["generate"]))
    say(f"\n{time.perf_counter() - began:.0f} s in all")
    if failed or b.failed:  # after every table that could run: a broken arm is an error, not a shorter printout
        sys.exit(f"failed (tracebacks above): {', '.join([*(f'the {t} table' for t in failed), *b.failed])}")
    return "\n".join(parts)


if __name__ == "__main__":
    main()

"""potstill's training step against TRL's GKDTrainer: same models, data, order and objective.

    python bench/trl_compare.py setup DIR [--vocab V] [--tiny]  # models, tokenizer, dataset, batches
    python bench/trl_compare.py trl DIR [--tag T] [--threads 2]                # GKDTrainer, lambda=0, beta=0
    python bench/trl_compare.py potstill DIR [--chunk N] [--tag T] [--threads 2]   # replaying TRL's batches
    python bench/trl_compare.py table DIR [--by wall|cpu]       # markdown table of what was measured

Objective: forward KL(teacher || student) at temperature 1 on the completion tokens, per-token
mean, teacher online (full vocabulary): GKD with lmbda = 0 (no student samples), beta = 0,
seq_kd off; potstill with train.teacher_signal=online, loss=forward_kl, kd_ratio=1, T=1. Both
use AdamW (lr 1e-4 constant, no weight decay), gradient clipping at 1.0, float32, 2 threads
(``--threads``). potstill's output heads are checked once before the first step, as training does.

The TRL run saves every batch its data loader produced (a rerun checks it produced the same
ones); the potstill run trains on exactly those batches in that order, from the same initial
weights. Without a TRL run (no trl installed) potstill trains on the batches ``setup`` made from
the same dataset in file order, and the table says so. Models: Llama student 2 layers d=128,
teacher 4 layers d=256, random init; sequences of 64 prompt + 192 completion tokens, 12 steps
(``--tiny``: 16 + 32 tokens, 4 steps, for a smoke test; the arms read the shapes from DIR).

Each run writes ARM[-TAG].json with its step times (wall clock and the process's CPU time), exact
losses, peak memory, the sha256 of its batches and the library versions; a potstill arm is named by
the commit it imported (another checkout's src on PYTHONPATH measures that one, if it has
potstill.train.loop, .heads and .tokenizer_match). Repeat runs with --tag r1,
r2, ... in alternating order: the table gives each arm's median over runs and the ratio to TRL of
runs with the same tag, and refuses to print when two arms' losses on the same batches differ (by
1e-5 relative at step 0, 1e-4 at any step). Tokens/s is the median over the steps after the first two, per wall-clock
second (``--by wall``, as trained) or per CPU-second of the process (``--by cpu``): on a machine
shared with other jobs, one thread's CPU time is its work alone, while wall time and several
threads' CPU time (they spin waiting for each other) grow with the load.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCH, WARMUP = 4, 2
SHAPES = {"prompt": 63, "completion": 190, "steps": 12}  # words; the template adds 1 + 2 tokens
TINY = {"prompt": 15, "completion": 30, "steps": 4}
KEYS = ("input_ids", "attention_mask", "labels")


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def versions(*extra: str) -> dict:
    """The libraries an arm ran on, and the commit of the potstill it imported (a worktree of another
    commit on PYTHONPATH names that one)."""
    out = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "accelerate", *extra)}
    if "potstill" in sys.modules:
        src = Path(sys.modules["potstill"].__file__).parent
        git = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True).stdout.strip()
        out["potstill"] = (git.stdout.strip() or "unknown") + ("+changes" if dirty else "")
    return out


def batches_sha256(batches: list[dict]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in KEYS:
            h.update(b[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def save_batches(path: Path, batches: list[dict]) -> None:
    from safetensors.torch import save_file

    save_file({f"{k}.{i}": b[k].contiguous() for i, b in enumerate(batches) for k in KEYS}, path)


def load_batches(path: Path) -> list[dict]:
    from safetensors.torch import load_file

    saved = load_file(path)
    return [{k: saved[f"{k}.{i}"] for k in KEYS} for i in range(len(saved) // len(KEYS))]


def shapes(out: Path) -> dict:
    return json.loads((out / "setup.json").read_text())


def setup(out: Path, vocab: int, tiny: bool) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    s = {**(TINY if tiny else SHAPES), "vocab": vocab}
    (out / "setup.json").write_text(json.dumps(s))
    specials = ["<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|end|>", unk_token="<pad>",
                                  additional_special_tokens=specials[1:3])
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
                         "{% else %}<|assistant|> {{ m['content'] }} <|end|>{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    for name, layers, width in (("student", 2, 128), ("teacher", 4, 256)):
        torch.manual_seed(1 if name == "student" else 2)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=width * 4, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
            pad_token_id=0, eos_token_id=3, bos_token_id=None))
        model.save_pretrained(out / name, safe_serialization=True)
        tok.save_pretrained(out / name)
    rng = random.Random(0)
    rows = []
    with (out / "data.jsonl").open("w") as f:
        for _ in range(BATCH * (s["steps"] + 4)):
            say = lambda n: " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(n))  # noqa: E731
            rows.append([{"role": "user", "content": say(s["prompt"])},
                         {"role": "assistant", "content": say(s["completion"])}])
            f.write(json.dumps({"messages": rows[-1]}) + "\n")
    # the batches a run without TRL trains on: the dataset in file order, tokenized as TRL's ChatML
    # collator does (prompt = the template up to the assistant's turn, labels -100 there); every row
    # has the same length, so no padding
    batches = []
    for i in range(s["steps"]):
        ids, labels = [], []
        for messages in rows[i * BATCH:(i + 1) * BATCH]:
            full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
            n_prompt = len(tok(tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False),
                               add_special_tokens=False)["input_ids"])
            ids.append(full)
            labels.append([-100] * n_prompt + full[n_prompt:])
        ids = torch.tensor(ids)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(labels)})
    save_batches(out / "batches.safetensors", batches)


def run_trl(out: Path, tag: str, threads: int) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(out / "student")
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher")
    data = load_dataset("json", data_files=str(out / "data.jsonl"), split="train")
    steps = shapes(out)["steps"]
    args = GKDConfig(output_dir=str(out / "trl-out"), per_device_train_batch_size=BATCH, max_steps=steps,
                     learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                     lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, logging_steps=1, report_to="none",
                     save_strategy="no", use_cpu=True, max_length=512, dataloader_num_workers=0, seed=0,
                     disable_dropout=True, bf16=False, fp16=False)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok)
    batches, times, cpu = [], [], []
    collate = trainer.data_collator

    def recording_collator(features):
        batch = collate(features)
        batches.append({k: batch[k].clone() for k in KEYS})
        return batch

    trainer.data_collator = recording_collator
    trainer.train_dataset = data

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    trainer.add_callback(Clock())
    losses = []
    step = trainer.training_step

    def recording_step(*a, **k):  # the logged losses are rounded; keep the exact ones
        loss = step(*a, **k)
        losses.append(loss.item())
        return loss

    trainer.training_step = recording_step
    base = rss_gb()
    trainer.train()
    batches = batches[:steps]
    path = out / "trl_batches.safetensors"
    if path.is_file() and batches_sha256(load_batches(path)) != batches_sha256(batches):
        sys.exit(f"TRL's data loader produced other batches than in {path}: the runs are not comparable")
    save_batches(path, batches)
    trained = int(sum((b["labels"][:, 1:] != -100).sum() for b in batches)) / steps
    write_arm(out, "trl", tag, {
        "arm": f"TRL {importlib.metadata.version('trl')} GKDTrainer", "losses": losses, "step_seconds": times,
        "step_cpu_seconds": cpu, "threads": threads, "tokens_per_step": trained, "peak_gb": rss_gb() - base, "batches_sha256": batches_sha256(batches),
        "batches": "TRL's data loader", "versions": versions("trl")})


def run_potstill(out: Path, chunk: int, tag: str, threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from potstill.recipe import TrainSpec
    from potstill.train.heads import model_heads
    from potstill.train.loop import loss_sums
    from potstill.train.tokenizer_match import Compat

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher").requires_grad_(False).eval()
    student.train()
    spec = TrainSpec(objective="kd", loss="forward_kl", kd_ratio=1.0, temperature=1.0, teacher_signal="online",
                     chunk_size=chunk)
    compat = Compat("identical", student.config.vocab_size, True)
    heads = model_heads(student, teacher) if chunk else None  # checked once, as the training loop's setup does
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    trl_batches = out / "trl_batches.safetensors"
    batches = load_batches(trl_batches if trl_batches.is_file() else out / "batches.safetensors")
    losses, times, cpu = [], [], []
    base = rss_gb()
    for batch in batches:
        start, start_cpu = time.perf_counter(), time.process_time()
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss, *_ = loss_sums(student, batch, spec, compat, teacher, heads=heads)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        losses.append(loss.item() / n)
    v = versions()  # the commit names the arm: another one's src on PYTHONPATH measures that potstill
    write_arm(out, f"potstill-{v['potstill']}-{f'chunk{chunk}' if chunk else 'dense'}", tag, {
        "arm": f"potstill {v['potstill']} ({f'chunked, {chunk} tokens' if chunk else 'dense logits'})",
        "losses": losses, "step_seconds": times, "step_cpu_seconds": cpu, "threads": threads, "tokens_per_step": n,
        "peak_gb": rss_gb() - base, "batches_sha256": batches_sha256(batches),
        "batches": "TRL's data loader" if trl_batches.is_file() else "setup's (no TRL run)", "versions": v})


def write_arm(out: Path, name: str, tag: str, record: dict) -> None:
    record["tag"] = tag
    (out / f"{name}{'-' + tag if tag else ''}.json").write_text(json.dumps(record, indent=2))


def table(out: Path, by: str) -> None:
    runs = [json.loads(p.read_text()) for p in sorted([*out.glob("trl*.json"), *out.glob("potstill*.json")])]
    if not runs:
        sys.exit(f"no runs in {out}: run the trl and potstill arms first")
    for r in runs:  # the same objective on the same batches: the losses must agree before any timing means anything
        ref = next(x for x in runs if x["batches_sha256"] == r["batches_sha256"])
        worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(r["losses"], ref["losses"]))
        if abs(r["losses"][0] - ref["losses"][0]) > 1e-5 * max(1.0, abs(ref["losses"][0])) or worst > 1e-4:
            sys.exit(f"losses differ: {r['arm']} {r['losses'][0]} (step 0) vs {ref['arm']} {ref['losses'][0]}; "
                     f"largest relative difference over the steps {worst:.2g}")
    key = {"wall": "step_seconds", "cpu": "step_cpu_seconds"}[by]

    def tokens_per_s(run: dict) -> float:
        return run["tokens_per_step"] / statistics.median(run[key][WARMUP:])

    arms: dict[str, list[dict]] = {}
    for r in runs:
        arms.setdefault(r["arm"], []).append(r)
    trl = next((runs for name, runs in arms.items() if name.startswith("TRL")), None)
    trl_by_tag = {r["tag"]: tokens_per_s(r) for r in trl or []}
    n_runs = max(len(v) for v in arms.values())
    unit = "trained tokens/s" if by == "wall" else "trained tokens per CPU-second"
    print(f"| arm | step-0 loss | last loss | {unit}{' (median of runs)' if n_runs > 1 else ''} | "
          f"vs TRL | peak memory (GiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rs in arms.items():
        speeds = [tokens_per_s(r) for r in rs]
        speed = f"{statistics.median(speeds):,.0f}" + (
            f" ({min(speeds):,.0f}-{max(speeds):,.0f})" if len(rs) > 1 else "")
        ratios = [tokens_per_s(r) / trl_by_tag[r["tag"]] for r in rs if r["tag"] in trl_by_tag]
        vs = "-" if not ratios else f"{statistics.median(ratios):.2f}x" + (
            f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")
        peak = statistics.median(r["peak_gb"] for r in rs)
        print(f"| {name} | {rs[0]['losses'][0]:.8f} | {rs[0]['losses'][-1]:.8f} | {speed} | {vs} | {peak:.2f} |")
    print()
    for name, rs in arms.items():
        v = rs[0]["versions"]
        print(f"- {name}: {len(rs)} run(s), {rs[0]['threads']} thread(s), batches: {rs[0]['batches']}; "
              + ", ".join(f"{k} {v[k]}" for k in v))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["setup", "trl", "potstill", "table"])
    p.add_argument("dir", type=Path)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tiny", action="store_true", help="setup: tiny shapes, 4 steps (a smoke test: seconds)")
    p.add_argument("--chunk", type=int, default=0, help="potstill: tokens a chunk (0: dense logits)")
    p.add_argument("--tag", default="", help="trl, potstill: a name for this run (r1, r2, ...): repeats are kept")
    p.add_argument("--threads", type=int, default=2, help="trl, potstill: torch threads")
    p.add_argument("--by", choices=["wall", "cpu"], default="wall", help="table: tokens per wall-clock or CPU second")
    args = p.parse_args()
    {"setup": lambda: setup(args.dir, args.vocab, args.tiny), "trl": lambda: run_trl(args.dir, args.tag, args.threads),
     "potstill": lambda: run_potstill(args.dir, args.chunk, args.tag, args.threads),
     "table": lambda: table(args.dir, args.by)}[args.what]()


if __name__ == "__main__":
    main()

"""potstill's training step against TRL's GKDTrainer: same models, data, order and objective.

    python bench/trl_compare.py setup DIR [--vocab V]       # models, tokenizer, dataset (main venv)
    TRLVENV/bin/python bench/trl_compare.py trl DIR         # GKDTrainer, lambda=0, beta=0 (TRL's venv)
    python bench/trl_compare.py potstill DIR [--chunk N]    # potstill, replaying TRL's batches
    python bench/trl_compare.py table DIR                   # markdown table of what was measured

Objective: forward KL(teacher || student) at temperature 1 on the completion tokens, per-token
mean, teacher online (full vocabulary): GKD with lmbda = 0 (no student samples), beta = 0,
seq_kd off; potstill with train.teacher_signal=online, loss=forward_kl, kd_ratio=1, T=1. Both
use AdamW (lr 1e-4 constant, no weight decay), gradient clipping at 1.0, float32, 2 threads.

The TRL run saves every batch its data loader produced; the potstill run trains on exactly
those batches in that order, from the same initial weights. The step-0 losses must agree to
1e-5 (checked) before the timings mean anything. Models: Llama student 2 layers d=128,
teacher 4 layers d=256, random init; sequences of 64 prompt + 192 completion tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

PROMPT, COMPLETION, BATCH, STEPS, WARMUP = 63, 190, 4, 12, 2


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def setup(out: Path, vocab: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
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
    with (out / "data.jsonl").open("w") as f:
        for _ in range(BATCH * (STEPS + 4)):
            say = lambda n: " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(n))  # noqa: E731
            f.write(json.dumps({"messages": [{"role": "user", "content": say(PROMPT)},
                                             {"role": "assistant", "content": say(COMPLETION)}]}) + "\n")


def run_trl(out: Path) -> None:
    import torch
    import trl
    from datasets import load_dataset
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(out / "student")
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher")
    data = load_dataset("json", data_files=str(out / "data.jsonl"), split="train")
    args = GKDConfig(output_dir=str(out / "trl-out"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                     learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                     lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, logging_steps=1, report_to="none",
                     save_strategy="no", use_cpu=True, max_length=512, dataloader_num_workers=0, seed=0,
                     disable_dropout=True, bf16=False, fp16=False)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok)
    batches, times = [], []
    collate = trainer.data_collator

    def recording_collator(features):
        batch = collate(features)
        batches.append({k: batch[k].clone() for k in ("input_ids", "attention_mask", "labels")})
        return batch

    trainer.data_collator = recording_collator
    trainer.train_dataset = data

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

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
    tensors = {f"{k}.{i}": v for i, b in enumerate(batches[:STEPS]) for k, v in b.items()}
    save_file(tensors, out / "trl_batches.safetensors")
    trained = int(sum((b["labels"][:, 1:] != -100).sum() for b in batches[:STEPS])) / STEPS
    (out / "trl.json").write_text(json.dumps({
        "arm": f"TRL {trl.__version__} GKDTrainer", "losses": losses, "step_seconds": times,
        "tokens_per_step": trained, "peak_gb": rss_gb() - base}, indent=2))


def run_potstill(out: Path, chunk: int) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from potstill.train.tokenizer_match import Compat
    from potstill.recipe import TrainSpec
    from potstill.train.loop import loss_sums

    torch.set_num_threads(2)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher").requires_grad_(False).eval()
    student.train()
    spec = TrainSpec(objective="kd", loss="forward_kl", kd_ratio=1.0, temperature=1.0, teacher_signal="online",
                     chunk_size=chunk)
    compat = Compat("identical", student.config.vocab_size, True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
    saved = load_file(out / "trl_batches.safetensors")
    losses, times = [], []
    base = rss_gb()
    for i in range(STEPS):
        batch = {k: saved[f"{k}.{i}"] for k in ("input_ids", "attention_mask", "labels")}
        start = time.perf_counter()
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss, *_ = loss_sums(student, batch, spec, compat, teacher)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item() / n)
    name = f"potstill-chunk{chunk}" if chunk else "potstill"
    (out / f"{name}.json").write_text(json.dumps({
        "arm": f"potstill ({'chunked, ' + str(chunk) + ' tokens' if chunk else 'dense logits'})", "losses": losses,
        "step_seconds": times, "tokens_per_step": n, "peak_gb": rss_gb() - base}, indent=2))


def table(out: Path) -> None:
    arms = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    trl_arm = next(a for a in arms if a["arm"].startswith("TRL"))
    print("| arm | step-0 loss | last loss | trained tokens/s | vs TRL | peak memory (GiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    speed = {}
    for a in arms:
        speed[a["arm"]] = a["tokens_per_step"] / statistics.median(a["step_seconds"][WARMUP:])
    for a in arms:
        print(f"| {a['arm']} | {a['losses'][0]:.8f} | {a['losses'][-1]:.8f} | {speed[a['arm']]:,.0f} | "
              f"{speed[a['arm']] / speed[trl_arm['arm']]:.2f}x | {a['peak_gb']:.2f} |")
    for a in arms:
        if abs(a["losses"][0] - trl_arm["losses"][0]) > 1e-5 * max(1.0, abs(trl_arm["losses"][0])):
            sys.exit(f"step-0 losses differ: {a['arm']} {a['losses'][0]} vs TRL {trl_arm['losses'][0]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["setup", "trl", "potstill", "table"])
    p.add_argument("dir", type=Path)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk", type=int, default=0)
    args = p.parse_args()
    {"setup": lambda: setup(args.dir, args.vocab), "trl": lambda: run_trl(args.dir),
     "potstill": lambda: run_potstill(args.dir, args.chunk), "table": lambda: table(args.dir)}[args.what]()


if __name__ == "__main__":
    main()

"""Memory and speed of the KD loss and of a full training step: dense vs chunked, cached vs online.

    python bench/train_bench.py                 # every arm, each in a fresh process; prints markdown
    python bench/train_bench.py --one ARM V N   # one measurement (used by the above), prints JSON
    python bench/train_bench.py --vocab 512 --tokens 256 --arms loss-dense loss-chunked step-online   # seconds

Arms:
  loss-dense       logits = hidden @ W.T for all N tokens, then top-k forward KL + CE, backward
  loss-chunked     potstill.losses.chunked (256 tokens a chunk), same loss and gradients
  step-dense       a full training step of a 2-layer, d=128 Llama student (forward, loss, backward,
                   AdamW) on cached top-k targets, through potstill.train.loss_sums
  step-chunked     the same with train.chunk_size=256
  step-online      step-chunked, but the targets come from a 4-layer, d=256 teacher's forward pass
                   each step (full vocabulary, chunked), instead of the ledger's top-k
  step-online-large  the same with an 8-layer, d=512 teacher (about 10x the student's parameters)

N = B*T trained tokens per step (B = N / 256 sequences of 256 tokens for the step arms). Peak
memory is the rise of ru_maxrss over the level after setup (models and inputs built), so it is
what the step itself needs. Tokens/s is the median of 5 timed steps after 2 warm-ups. Every
number comes from a fresh process: ru_maxrss never goes down. An arm that fails is printed with
the reason and the script exits 1 after the table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

ARMS = ("loss-dense", "loss-chunked", "step-dense", "step-chunked", "step-online", "step-online-large")
SKIP_ABOVE_GB = 16.0  # the machine has 24 GiB: a dense arm predicted above this is not run
CHUNK = 256  # tokens per chunk: 256 x V fp32 logits is 33 MB at V = 32k, 156 MB at V = 152k


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def predicted_dense_gb(v: int, n: int) -> float:
    """About ten fp32 (N, V) tensors live at once in the dense loss and its backward."""
    return 10 * n * v * 4 / 2**30


def measure(arm: str, v: int, n: int, threads: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    k, h = 20, 128
    if arm.startswith("loss"):
        from potstill.losses import kd_loss
        from potstill.losses.chunked import chunked_kd_loss
        import torch.nn.functional as F

        hidden = torch.randn(n, h, requires_grad=True)
        weight = (torch.randn(v, h) * 0.02).requires_grad_(True)
        labels = torch.randint(0, v, (n,))
        # k distinct ids per row, spread over the vocabulary, without building an (N, V) tensor
        topk_ids = torch.arange(k) * (v // k) + torch.randint(0, v // k, (n, 1))
        topk_lp = (torch.randn(n, k) * 2).log_softmax(-1).sort(-1, descending=True).values

        def step():
            if arm == "loss-dense":
                logits = hidden @ weight.T  # (N, V)
                loss = 0.5 * kd_loss("forward_kl", logits, topk_ids=topk_ids, topk_logprobs=topk_lp) + \
                    0.5 * F.cross_entropy(logits, labels)
            else:
                loss, _, _ = chunked_kd_loss(hidden, weight, labels, topk_ids=topk_ids, topk_logprobs=topk_lp,
                                             kd_ratio=0.5, chunk_size=CHUNK)
            loss.backward()
            hidden.grad = weight.grad = None
            return loss.item()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from potstill.train.tokenizer_match import Compat
        from potstill.recipe import TrainSpec
        from potstill.train.heads import model_heads
        from potstill.train.loop import loss_sums

        seq = 256
        b = n // seq
        def llama(layers, width):
            return LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=width, intermediate_size=width * 4,
                                                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                                max_position_embeddings=seq, tie_word_embeddings=False))
        student = llama(2, 128)
        teacher = None
        if arm.startswith("step-online"):
            teacher = (llama(8, 512) if arm.endswith("large") else llama(4, 256)).requires_grad_(False).eval()
        spec = TrainSpec(kd_ratio=0.5, chunk_size=0 if arm == "step-dense" else CHUNK,
                         teacher_signal="online" if teacher is not None else "cached")
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        input_ids = torch.randint(0, v, (b, seq))
        labels = input_ids.clone()
        labels[:, : seq // 4] = -100  # a prompt of 64 tokens, 192 completion tokens per row
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                 "topk_ids": torch.arange(k) * (v // k) + torch.randint(0, v // k, (b, seq, 1)),
                 "topk_logprobs": torch.randn(b, seq, k).log_softmax(-1).sort(-1, descending=True).values}
        compat = Compat("identical", v, True)
        heads = model_heads(student, teacher) if spec.chunk_size else None  # once, as the training loop's setup
        n = int((labels[:, 1:] != -100).sum())  # trained tokens

        def step():
            loss, *_ = loss_sums(student, batch, spec, compat, teacher, heads=heads)
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item() / n

    base = rss_gb()
    times = []
    for i in range(7):
        start = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"arm": arm, "V": v, "N": n, "tokens_per_s": n / statistics.median(times),
            "peak_gb": rss_gb() - base, "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=3, metavar=("ARM", "V", "N"))
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--threads", type=int, default=2, help="torch threads (the development machine's 2 cores)")
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]), args.threads)))
        return
    rows, failed = [], []
    for v in args.vocab:
        for n in args.tokens:
            for arm in args.arms:
                if arm.endswith("dense") and predicted_dense_gb(v, n) > SKIP_ABOVE_GB:
                    rows.append({"arm": arm, "V": v, "N": n, "skipped": f"~{predicted_dense_gb(v, n):.0f} GB predicted"})
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", arm, str(v), str(n), "--threads",
                                      str(args.threads)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    rows.append({"arm": arm, "V": v, "N": n, "skipped": f"failed: {out.stderr.strip().splitlines()[-1]}"})
                    failed.append(f"{arm} V={v} N={n}")
                else:
                    rows.append(json.loads(out.stdout))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("torch", "transformers", "accelerate"))
          + f", {args.threads} threads\n")
    print("| arm | V | B*T | tokens/s | peak memory (GiB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['arm']} | {r['V']:,} | {r['N']:,} | not run: {r['skipped']} | |")
        else:
            print(f"| {r['arm']} | {r['V']:,} | {r['N']:,} | {r['tokens_per_s']:,.0f} | {r['peak_gb']:.2f} |")
    if failed:
        sys.exit(f"{len(failed)} arm(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

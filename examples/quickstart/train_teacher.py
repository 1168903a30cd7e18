"""Train the bundled quickstart teacher: a small Llama on the skill mix (potstill.tasks.skillmix).

    python examples/quickstart/train_teacher.py            # writes examples/quickstart/teacher/

Seeded and reproducible on CPU (same torch version, same thread count). Every step draws a
fresh batch from the task generator, skipping the held-out prompts
(examples/quickstart/prompts/heldout.jsonl), so the held-out accuracy in the model card is
measured on prompts the teacher never saw. Takes about 25 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from potstill.tasks import skillmix

HERE = Path(__file__).resolve().parent
SPECIALS = ["<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character of the task alphabet, plus specials."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(skillmix.ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|end|>", unk_token="<pad>",
        additional_special_tokens=SPECIALS[1:3],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def encode(tok, example: dict) -> tuple[list[int], list[int]]:
    """Token ids of prompt+answer and labels (-100 on the prompt, the answer and <|end|> kept)."""
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": example["prompt"]}], add_generation_prompt=True, tokenize=True,
        return_dict=False,
    )
    answer_ids = tok(example["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def batch(tok, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = [encode(tok, ex) for ex in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


@torch.no_grad()
def accuracy(model, tok, examples: list[dict], batch_size: int = 256) -> dict[str, float]:
    """Greedy exact-match accuracy per skill (any valid answer counts for shuffle)."""
    model.eval()
    tok.padding_side = "left"
    right: dict[str, list[bool]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = [
            tok.apply_chat_template([{"role": "user", "content": ex["prompt"]}], add_generation_prompt=True, tokenize=False)
            for ex in chunk
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for ex, ans in zip(chunk, answers):
            right.setdefault(ex["skill"], []).append(skillmix.verify(ex["prompt"], ans))
    model.train()
    per_skill = {s: sum(v) / len(v) for s, v in sorted(right.items())}
    per_skill["all"] = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
    return per_skill


def portable_tokenizer_config(out: Path) -> None:
    """Also put the chat template inside tokenizer_config.json, and name the tokenizer class that
    transformers 4.x knows, so that older transformers load the same tokenizer and template."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = SPECIALS[1:3]
    path.write_text(json.dumps(config, indent=2) + "\n")


def write_card(out: Path) -> None:
    """The teacher's model card (README.md), from the figures training.json recorded."""
    info = json.loads((out / "training.json").read_text())
    acc = info["heldout_accuracy"]
    rows = "\n".join(f"| {s} | {acc[s]:.1%} |" for s in skillmix.SKILLS)
    weak = [s for s in skillmix.SKILLS if acc[s] < 0.9]
    limits = (f"\n**Weak skills**: {', '.join(f'{s} ({acc[s]:.0%})' for s in weak)}. Its wrong answers are "
              "still fluent (right length and format), so a student distilled from it inherits them; "
              "eval scores every model against the task's verifier, not against the teacher.\n") if weak else ""
    (out / "README.md").write_text(f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [potstill, quickstart, toy]
---

# potstill quickstart teacher

A {info['parameters']:,}-parameter Llama-architecture model (4 layers, hidden size 192, tied
embeddings, character-level tokenizer of {info['vocab_size']} tokens) trained from scratch on the
procedurally generated skill mix in `potstill.tasks.skillmix`: addition, multiplication, reversing,
sorting, counting, and shuffling (a skill with many valid answers). It exists so that the
quickstart can show distillation end to end on a laptop CPU; it knows nothing else.

## Held-out accuracy

Greedy decoding on the {info['heldout_prompts']:,} prompts of `examples/quickstart/prompts/heldout.jsonl`,
none of which was seen in training. An answer counts when `potstill.tasks.skillmix.verify` accepts it
(any permutation of the letters, for shuffle).

| skill | accuracy |
|---|---|
{rows}
| **all** | **{acc['all']:.1%}** |
{limits}
## Recipe

`python examples/quickstart/train_teacher.py` (seed {info['seed']}): AdamW (lr {info['lr']}, betas 0.9/0.98,
weight decay 0.01), 100 warmup steps then cosine decay, {info['steps']:,} steps of {info['batch_size']}
freshly generated examples each ({info['steps'] * info['batch_size']:,} examples), loss on the answer
tokens only. {info['minutes']} minutes on {info['threads']} CPU threads with torch {info['torch']}.

Prompt format: the chat template turns a user message into `<|user|>add 12 34<|assistant|>`;
the answer ends with `<|end|>`.
""")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "teacher")
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--card-only", action="store_true", help="only rewrite README.md from training.json")
    args = p.parse_args()
    if args.card_only:
        portable_tokenizer_config(args.out)
        return write_card(args.out)

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    tok = build_tokenizer()
    heldout = [json.loads(line) for line in (HERE / "prompts" / "heldout.jsonl").open()]
    excluded = {ex["prompt"] for ex in heldout}
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 32,
        max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: {n_params:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    examples = (ex for ex in skillmix.stream(args.seed + 1) if ex["prompt"] not in excluded)
    start = time.time()
    for step in range(1, args.steps + 1):
        input_ids, labels, mask = batch(tok, [next(examples) for _ in range(args.batch_size)])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            print("held-out (500):", accuracy(model, tok, heldout[:500]), flush=True)
    minutes = (time.time() - start) / 60

    final = accuracy(model, tok, heldout)
    print("held-out (all):", final)
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=12, do_sample=False
    )
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    portable_tokenizer_config(args.out)
    AutoModelForCausalLM.from_pretrained(args.out)  # the saved teacher must load
    (args.out / "training.json").write_text(json.dumps({
        "parameters": n_params, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "minutes": round(minutes, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "vocab_size": len(tok),
        "heldout_accuracy": final, "heldout_prompts": len(heldout),
    }, indent=2) + "\n")
    write_card(args.out)


if __name__ == "__main__":
    main()

"""Train a student on the ledger: SFT on the teacher's text, or top-k logit KD mixed with CE.

    loss = kd_ratio * KD(teacher top-k || student) + (1 - kd_ratio) * CE(teacher tokens)

Both terms are means over completion tokens (the prompt carries no loss). The loop is plain
torch on accelerate, so the same code runs on one CPU or under ``accelerate launch``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from potstill.data import build_examples, collate
from potstill.errors import PotstillError
from potstill.generate import recipe_requests
from potstill.ledger import Ledger
from potstill.losses import kd_loss
from potstill.progress import progress
from potstill.recipe import Recipe, TrainSpec
from potstill.teachers.local import load_model_dir, tokenizer_sha256


def load_student(recipe: Recipe, tokenizer):
    """A fresh student from ``student.config`` (seeded) or the checkpoint at ``student.path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = recipe.student
    if spec.path is not None:
        model, _ = load_model_dir(spec.path, "student")
        model.train()
        return model
    fields = dict(spec.config)
    model_type = fields.pop("model_type")
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    try:
        config = AutoConfig.for_model(model_type, **fields)
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise PotstillError(f"student.config could not build a model: {str(e).splitlines()[0]}") from None


def load_student_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    path = recipe.student.tokenizer or recipe.student.path or recipe.teacher.path
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PotstillError(f"student tokenizer {path} could not be loaded: {str(e).splitlines()[0]}") from None


def loss_terms(model, batch: dict, spec: TrainSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(loss, ce, kd, n_tokens) for one batch; every term a mean over its completion tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, L-1, V)
    labels = batch["labels"][:, 1:]  # (B, L-1): the token each position predicts
    mask = labels != -100
    student = logits[mask]  # (N, V), N completion tokens
    ce = F.cross_entropy(student.float(), labels[mask], reduction="sum") / max(student.shape[0], 1)
    if spec.objective == "sft":
        return ce, ce, None, student.shape[0]
    kd = kd_loss(spec.loss, student, topk_ids=batch["topk_ids"][:, 1:][mask],
                 topk_logprobs=batch["topk_logprobs"][:, 1:][mask], temperature=spec.temperature,
                 beta=spec.beta, alpha=spec.alpha)
    return spec.kd_ratio * kd + (1 - spec.kd_ratio) * ce, ce, kd, student.shape[0]


def lr_at(step: int, total: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress_ = (step - spec.warmup_steps) / max(total - spec.warmup_steps, 1)
    return spec.lr * 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))


def train(recipe: Recipe, spec: TrainSpec, name: str = "student") -> Path:
    """Train one student on the run's ledger and write it to ``<run>/<name>/`` (HF format)."""
    run = recipe.run_dir
    ledger_path = run / "ledger.sqlite"
    if not ledger_path.is_file():
        raise PotstillError(f"{ledger_path} not found: run `potstill generate` first")
    teacher_desc, hashes = recipe_requests(recipe)
    with Ledger(ledger_path) as ledger:
        examples = list(ledger.examples(hashes))
        ledger_sha = ledger.content_sha256(hashes)
    if len(examples) < len(hashes):
        raise PotstillError(f"{len(hashes) - len(examples)} of the recipe's {len(hashes)} requests have no completion "
                            f"in {ledger_path}: run `potstill generate` first")

    tokenizer = load_student_tokenizer(recipe)
    same = teacher_desc["tokenizer_sha256"] == tokenizer_sha256(tokenizer)
    if spec.objective == "kd" and not same:
        raise PotstillError(
            "logit KD needs the student to share the teacher's tokenizer, and it does not; "
            "use sequence-level KD instead (train.objective=sft)"
        )
    if spec.objective == "kd" and any(ex.topk_ids is None for ex in examples):
        raise PotstillError("logit KD needs top-k logprobs in the ledger; generate with generation.top_logprobs > 0")
    data = build_examples(examples, tokenizer, same_tokenizer=same)

    torch.manual_seed(spec.seed)
    model = load_student(recipe, tokenizer)
    accelerator = Accelerator(cpu=recipe.teacher.device == "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    steps_per_epoch = math.ceil(len(data) / spec.batch_size)
    total = steps_per_epoch * spec.epochs
    log_dir = run / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.jsonl"
    start = time.perf_counter()
    step = 0
    model.train()
    with log_path.open("w") as log, progress(f"train {name}", total) as advance:
        for epoch in range(spec.epochs):
            # the order is a function of (seed, epoch) alone, so a rerun sees the same batches
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(spec.seed * 1000 + epoch))
            for i in range(steps_per_epoch):
                batch = collate([data[j] for j in order[i * spec.batch_size:(i + 1) * spec.batch_size]], pad_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, spec)
                loss, ce, kd, n_tokens = loss_terms(model, batch, spec)
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), spec.grad_clip if spec.grad_clip else float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                advance(1)
                if step % spec.log_every == 0 or step == total:
                    log.write(json.dumps({
                        "step": step, "epoch": epoch, "loss": loss.item(), "ce": ce.item(),
                        "kd": None if kd is None else kd.item(), "grad_norm": float(grad_norm),
                        "lr": optimizer.param_groups[0]["lr"], "tokens": n_tokens,
                        "seconds": round(time.perf_counter() - start, 3),
                    }) + "\n")
    seconds = time.perf_counter() - start

    # write to a temporary folder, then rename: a half-written student never looks finished
    out = run / name
    tmp = run / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = accelerator.unwrap_model(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "name": name, "objective": spec.objective, "train": spec.model_dump(), "recipe_sha256": recipe.sha256(),
        "student": recipe.student.model_dump(), "ledger_sha256": ledger_sha, "examples": len(data), "steps": step, "seconds": round(seconds, 2),
        "parameters": n_params, "teachers": [teacher_desc],
    }
    (tmp / "potstill.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out

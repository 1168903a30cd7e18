"""Train a student on the ledger: SFT on the teacher's text, or logit KD mixed with CE.

    loss = kd_ratio * KD(teacher || student) + (1 - kd_ratio) * CE(teacher tokens)

Both terms are means over the completion tokens of an optimizer step (the prompt carries no
loss), however the step is split into micro-batches and processes. The loop is plain torch on
accelerate, so the same code runs on one CPU or under ``accelerate launch`` (DDP).

Steps are numbered globally. Step s uses examples ``order(seed, epoch)[i*B:(i+1)*B]`` (drop-last),
so the sample order is a function of the recipe alone: a resumed run sees the same batches.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from potstill.devices import resolve_chunk_size, resolve_compile, resolve_mixed_precision
from potstill.errors import PotstillError
from potstill.hf import folder_defaults_off, left_pad, load_model_dir, load_tokenizer_dir, tokenizer_sha256
from potstill.ledger import Ledger, teacher_key
from potstill.ledger.plans import recipe_plan
from potstill.losses import kd_loss
from potstill.losses.chunked import Head, chunked_kd_loss
from potstill.progress import progress
from potstill.provenance import weights_sha256
from potstill.receipts import manifest, spdx
from potstill.receipts.terms.export import gate_training, model_name, write_obligation_files
from potstill.recipe import Recipe, TrainSpec
from potstill.train import checkpoint
from potstill.train.distributed import check_launch, describe, fsdp_on_cpu, shard_teacher
from potstill.train.cross_online import OnlineCross
from potstill.train.examples import CrossTokenizer, TrainExample, build_examples, collate
from potstill.train.heads import current, model_heads
from potstill.train.tokenizer_match import Compat, check_tokenizers, ledger_samples

MAX_BAD_STEPS = 3  # consecutive non-finite steps before the run stops


def load_student(recipe: Recipe, tokenizer):
    """A fresh student from ``student.config`` (seeded) or the checkpoint at ``student.path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = recipe.student
    if spec.path is not None:
        model, _ = load_model_dir(spec.path, "student")
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
    path = recipe.student.tokenizer or recipe.student.path or recipe.teacher.tokenizer_dir
    if path is None:
        raise PotstillError("the student needs a tokenizer: set student.tokenizer (the HTTP teacher has none here)")
    return load_tokenizer_dir(path, "student tokenizer")


def linear_names(model) -> list[str]:
    """Leaf names of the model's linear layers (Linear, and GPT-2's Conv1D), output head excluded:
    the names train.lora.target_modules can take."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head})


def add_lora(model, spec: TrainSpec):
    try:
        import peft
    except ImportError:
        raise PotstillError("train.lora needs peft: pip install 'potstill[lora]'") from None
    targets = spec.lora.target_modules
    names = linear_names(model)  # before get_peft_model, which wraps the layers in place
    if targets != "all-linear" and not set(targets) & set(names):
        raise PotstillError(f"train.lora.target_modules {targets} match no layer of this {model.config.model_type} "
                            f"student; its linear layers are {names} (or use all-linear)")
    config = peft.LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself, and says so
            warnings.filterwarnings("ignore", message="fan_in_fan_out")
            return peft.get_peft_model(model, config)
    except ValueError as e:
        raise PotstillError(f"train.lora: {str(e).splitlines()[0]}") from None


def loss_sums(model, batch: dict, spec: TrainSpec, compat: Compat, teacher=None, on_policy: bool = False,
              heads: dict[str, Head] | None = None, compile: bool = False):
    """(loss, ce, kd, router) summed over the completion tokens of one micro-batch; only loss has a grad.

    Cached signal: sparse KD against the ledger's top-k. Online signal: dense KD against the
    teacher's full distribution. On-policy batches (student samples) train on KD alone: CE on
    the student's own samples would only reinforce them. With ``spec.chunk_size`` the logits are
    built from hidden states by ``heads["student"]`` (and ``heads["teacher"]``), checked once
    against the models' own logits by ``output_head``; found here when not given; ``compile`` as in
    ``chunked_kd_loss``.

    A mixture-of-experts student whose config asks for its router loss (``output_router_logits``)
    returns the load-balancing ``aux_loss`` (a mean over the micro-batch's tokens); it is added as
    Hugging Face adds it, ``router_aux_loss_coef * aux_loss``, weighted by the micro-batch's
    completion tokens like every other term, and returned (unweighted) as ``router``.
    """
    if spec.chunk_size and heads is None:
        heads = model_heads(model, teacher)
    # The completion positions t (their token, at t + 1, carries the loss) as flat indices b * L + t
    # into (B, L, ...) tensors, found once: nonzero is the micro-batch's one host sync (it sizes every
    # tensor below), and indexing by them, unlike a boolean mask, syncs no more.
    has_loss = F.pad(batch["labels"][:, 1:] != -100, (0, 1))  # (B, L): position t predicts a completion token
    rows = has_loss.flatten().nonzero()[:, 0]  # (N,)
    n = rows.numel()

    def at(x, shift: int = 0):  # (B, L, ...) -> (N, ...) at the completion positions (+ shift)
        return x.flatten(0, 1)[rows + shift]

    labels = at(batch["labels"], 1)  # (N,): the token each completion position predicts
    kd_ratio = 1.0 if on_policy else (spec.kd_ratio if spec.objective == "kd" else 0.0)
    targets = {}
    if kd_ratio and teacher is not None:
        with torch.no_grad():
            t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=spec.chunk_size > 0, logits_to_keep=1 if spec.chunk_size else 0)
        if spec.chunk_size:
            targets = {"teacher_hidden": at(t_out.hidden_states[-1]),  # a sharded teacher's: gathered
                       "teacher_head": current(heads["teacher"], teacher, "teacher").rows(compat.shared_vocab)}
        else:
            targets = {"teacher_logits": at(t_out.logits)[:, :compat.shared_vocab]}
        del t_out  # its (B, L, V) logits, or every layer's hidden states: the targets above are copies of rows
    elif kd_ratio:
        targets = {"topk_ids": at(batch["topk_ids"], 1), "topk_logprobs": at(batch["topk_logprobs"], 1)}
    kd_args = dict(name=spec.loss, temperature=spec.temperature, beta=spec.beta, alpha=spec.alpha)
    # the logit rows teacher and student share; another tokenizer shares none, and then there is
    # no KD (refused before training) and CE runs over the student's whole vocabulary
    vocab = compat.shared_vocab if compat.same_ids else None

    if spec.chunk_size:  # never builds the (N, V) logits
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, logits_to_keep=1)
        hidden = at(out.hidden_states[-1])  # (N, H)
        head = current(heads["student"], model)  # after the forward: under FSDP2 the gathered head
        loss, ce, kd = chunked_kd_loss(hidden, head.rows(vocab), labels, kd_ratio=kd_ratio, chunk_size=spec.chunk_size,
                                       compile=compile, **kd_args, **targets)
        router = _router_loss(model, out)
        return (loss + router_coef(model) * router) * n, ce * n, kd * n, router.detach() * n
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    student = at(out.logits)[:, :vocab].float()  # (N, V_shared)
    if kd_ratio == 1.0:  # CE is only logged: no graph, no (N, V) log-softmax kept for backward
        with torch.no_grad():
            ce = (student.logsumexp(-1) - student.gather(-1, labels[:, None])[:, 0]).sum()
    else:
        ce = F.cross_entropy(student, labels, reduction="sum")
    kd = kd_loss(spec.loss, student, reduction="sum", **{k: v for k, v in kd_args.items() if k != "name"},
                 **targets) if kd_ratio else torch.zeros_like(ce)
    router = _router_loss(model, out) * n
    return kd_ratio * kd + (1 - kd_ratio) * ce + router_coef(model) * router, ce.detach(), kd.detach(), router.detach()


def router_coef(model) -> float:
    """The weight of a mixture-of-experts student's router loss, 0 when its config does not ask for
    one (``output_router_logits``): Hugging Face's ``router_aux_loss_coef``."""
    config = _unwrap(model).config
    if not getattr(config, "output_router_logits", False):
        return 0.0
    coef = getattr(config, "router_aux_loss_coef", None)
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not math.isfinite(coef) or coef < 0:
        raise PotstillError(f"student.config: output_router_logits is true but router_aux_loss_coef is {coef!r}; "
                            f"set student.config.router_aux_loss_coef to a number >= 0 (Mixtral's default: 0.001)")
    return float(coef)


def _router_loss(model, out) -> torch.Tensor:
    """The student's load-balancing loss for this forward (a 0-d tensor; 0 when it has none)."""
    aux = getattr(out, "aux_loss", None) if router_coef(model) else None
    return aux.float() if isinstance(aux, torch.Tensor) else out.logits.new_zeros((), dtype=torch.float32)


def lr_at(step: int, total: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    done = (step - spec.warmup_steps) / max(total - spec.warmup_steps, 1)
    return spec.lr * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _unwrap(model):
    return getattr(model, "module", model)


class Plan:
    """Which examples each step, process and micro-batch sees: a function of the recipe alone."""

    def __init__(self, n_examples: int, spec: TrainSpec, world: int):
        if n_examples < spec.batch_size:
            raise PotstillError(f"train.batch_size is {spec.batch_size} but there are only {n_examples} examples")
        if spec.batch_size % world:
            raise PotstillError(f"train.batch_size ({spec.batch_size}) must be a multiple of the {world} processes")
        self.n, self.spec, self.world = n_examples, spec, world
        self.steps_per_epoch = n_examples // spec.batch_size  # drop-last: every process gets a full share
        self.total = self.steps_per_epoch * spec.epochs

    def batch(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.spec.seed * 1000 + epoch))
        return order[i * self.spec.batch_size:(i + 1) * self.spec.batch_size].tolist()

    def micro_batches(self, ids: list[int], rank: int) -> list[list[int]]:
        mine = ids[rank::self.world]
        size = self.spec.micro_batch_size or len(mine)
        return [mine[j:j + size] for j in range(0, len(mine), size)]


@torch.no_grad()
def sample_from_student(model, batch: list[TrainExample], pad_id: int, eos_id: int, max_new_tokens: int,
                        sharded: bool = False) -> list[TrainExample]:
    """Replace each example's completion with one sampled from the student (temperature 1).
    ``sharded``: the student is sharded over several processes (FSDP2), so every forward gathers
    weights from all of them, and a process whose samples have all ended keeps stepping until every
    process's have (``synced_gpus``); otherwise the processes' gathers would pair up wrongly, or
    wait forever. transformers also finds fully_shard's modules by a marker attribute; said here so
    that no such detail decides it."""
    prompts = [ex.input_ids[:ex.n_prompt] for ex in batch]
    ids, att = left_pad(prompts, pad_id)
    width = ids.shape[1]
    m = _unwrap(model)
    was_training = m.training
    m.eval()
    with folder_defaults_off(m):  # a student checkpoint's generation_config.json changes nothing
        out = m.generate(input_ids=ids.to(m.device), attention_mask=att.to(m.device), do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                         synced_gpus=sharded)
    m.train(was_training)
    samples = []
    for ex, p, row in zip(batch, prompts, out[:, width:].cpu().tolist(), strict=True):
        if eos_id in row:
            row = row[:row.index(eos_id) + 1]
        samples.append(TrainExample(p + (row or [eos_id]), len(p), None, None, teacher_prompt=ex.teacher_prompt))
    return samples


OVERFLOW = "fp16 gradient overflow"  # a skipped step that is the scaler's business, not a bad step
NOTHING = "no token to train on: every sampled completion was cut"  # on-policy across tokenizers, not a bad step


def ledger_examples(recipe: Recipe, name: str, accept_terms_risk: str | None = None) -> tuple[list, str, dict, dict]:
    """The recipe's examples in the ledger (``train.data`` ledger: all its done rows, every
    teacher's), the ledger's content hash over them, each teacher's description (teacher key ->
    description: the recipe's for its own) and their terms (checked against ``recipe.use``: a
    refusal stops here unless ``accept_terms_risk`` gives a reason, kept in the ledger and the
    card); refused when generate has not finished, or recorded no plan for this recipe."""
    ledger_path = recipe.run_dir / "ledger.sqlite"
    if not ledger_path.is_file():
        raise PotstillError(f"{ledger_path} not found: run `potstill generate` first")
    with Ledger(ledger_path) as ledger:
        teacher_desc, hashes = recipe_plan(ledger, recipe)  # what generate planned: read, never planned again
        if recipe.train.data == "ledger":  # a merged ledger: every teacher's done rows, the failed ones aside
            examples = list(ledger.examples())
            hashes, failed = [ex.request_hash for ex in examples], 0
        else:
            examples = list(ledger.examples(hashes))
            failed = ledger.failed_count(hashes)
        ledger_sha = ledger.content_sha256(hashes)
        descriptions = {**ledger.teachers(), teacher_key(teacher_desc): teacher_desc}
        terms = gate_training(ledger, examples, {teacher_key(teacher_desc): teacher_desc}, use=recipe.use,
                              declared=recipe.teacher.terms_declared, accept_risk=accept_terms_risk, student=name)
    # requests that failed for good (a refused prompt, an imported refusal) are left out, and said so;
    # requests never answered mean generate has not finished
    if len(examples) + failed < len(hashes):
        raise PotstillError(f"{len(hashes) - len(examples) - failed} of the recipe's {len(hashes)} requests have no "
                            f"completion in {ledger_path}: run `potstill generate` first")
    if failed:
        print(f"train {name}: {failed} of {len(hashes)} requests failed in generate (reasons in the ledger's "
              f"requests.error); training on the other {len(examples)}")
    return examples, ledger_sha, descriptions, terms


def teacher_shares(examples: list, data: list[TrainExample], descriptions: dict[str, dict]) -> list[dict]:
    """Each teacher with rows in ``examples`` (ledger rows; ``data``: the same, tokenized), its
    description with its share of the examples and of the completion tokens trained on."""
    rows, tokens = Counter(), Counter()
    for ex, d in zip(examples, data, strict=True):
        rows[ex.teacher_key] += 1
        tokens[ex.teacher_key] += d.n_completion
    n, t = sum(rows.values()) or 1, sum(tokens.values()) or 1
    return [{**descriptions.get(k, {"id": k[:12]}), "share_of_examples": rows[k] / n, "share_of_tokens": tokens[k] / t}
            for k in sorted(rows)]


@dataclass
class Setup:
    """What one student's training holds between steps: built by ``setup``, read by ``train_step``
    and ``export``."""

    spec: TrainSpec  # chunk_size resolved: auto is a number here
    accelerator: Accelerator
    model: torch.nn.Module  # prepared by accelerate (wrapped under DDP)
    optimizer: torch.optim.Optimizer
    tokenizer: object
    teacher: torch.nn.Module | None  # online and on-policy KD: the teacher's weights, frozen
    compat: Compat
    heads: dict[str, Head] | None  # chunk_size > 0: the output heads the loss rebuilds logits from
    data: list[TrainExample]
    plan: Plan
    pad_id: int
    on_policy_max_new_tokens: int
    mixed_precision: str
    compile: bool  # the chunked loss's step through torch.compile (train.compile, resolved for the device)
    ledger_sha: str
    teachers: list[dict]  # each teacher's description, share_of_examples and share_of_tokens
    signature: dict  # what a checkpoint must match to be resumed
    ckpt_root: Path
    start: int  # the first step to run: 0, or the step of the checkpoint resumed
    terms: dict | None = None  # the terms gate's record (potstill.json "terms")
    request_hashes: list[str] | None = None  # the ledger rows trained on: the Merkle manifest's rows
    # the distributed type, process count and backend that ran (distributed.describe), and where an
    # online teacher was: "whole" in every process, or "sharded" over them
    distributed: dict | None = None
    cross: OnlineCross | None = None  # online KD from a teacher of another tokenizer (then teacher is None)


def setup(recipe: Recipe, spec: TrainSpec, name: str, accept_terms_risk: str | None = None) -> Setup:
    """Ledger examples (after the terms gate), accelerate, student, tokenizer match, optional online
    teacher, LoRA, optimizer, and the checkpoint to resume from when one matches."""
    device = recipe.device_for("train")
    check_launch(device)  # before the terms gate writes to the ledger: a launch that would not distribute is refused
    examples, ledger_sha, descriptions, terms = ledger_examples(recipe, name, accept_terms_risk)
    refuse_missing_topk(recipe, spec, examples)
    accelerator, mixed_precision = make_accelerator(device, spec)
    torch.manual_seed(spec.seed)
    tokenizer = load_student_tokenizer(recipe)
    model = load_student(recipe, tokenizer)
    compat, data = training_data(recipe, spec, name, examples, descriptions, tokenizer, model.config.vocab_size,
                                 accelerator.is_main_process)
    if spec.lora is not None:
        model = add_lora(model, spec)
    if accelerator.is_main_process:  # a size nobody meant shows before the first step, not after the last
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"train {name}: a {model.config.model_type} student of {total:,} parameters"
              + (f", {trained:,} of them trained (LoRA)" if trained != total else ""))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr,
                                  weight_decay=spec.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher, cross = online_teacher(recipe, spec, accelerator, model, name), None
    distributed = describe(accelerator.state)
    if teacher is not None:
        distributed["online_teacher"] = "sharded" if sharded(accelerator) else "whole"
    if teacher is not None and compat.kind == "different":  # it re-reads the student's text in its own tokens
        cross = OnlineCross.build(teacher, load_tokenizer_dir(recipe.teacher.tokenizer_dir, "teacher tokenizer"),
                                  tokenizer, recipe.generation.top_logprobs, lockstep=sharded(accelerator))
        cross.prepare(data, examples, tokenizer)
        teacher = None  # the targets come from ``cross``: the loss reads them as cached ones
    # an online teacher's dense logits, or sparse targets (the cache; a teacher of another tokenizer's)
    asked, spec = spec, with_chunk_size(spec, model, device, mixed_precision, dense_teacher=teacher is not None)
    signature = {"examples": len(data), "ledger_sha256": ledger_sha, "train": asked.model_dump(exclude={"resume"}),
                 "processes": accelerator.num_processes}
    if accelerator.is_fsdp2:  # its checkpoints key the optimizer's state by parameter name
        signature["fsdp"] = 2
    ckpt_root = recipe.run_dir / "checkpoints" / name
    return Setup(
        spec=spec, accelerator=accelerator, model=model, optimizer=optimizer, tokenizer=tokenizer, teacher=teacher,
        cross=cross, compat=compat,  # the heads are checked before any step
        heads=model_heads(model, teacher, half=mixed_precision in ("bf16", "fp16")) if spec.chunk_size else None,
        data=data, plan=Plan(len(data), spec, accelerator.num_processes),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        on_policy_max_new_tokens=spec.on_policy_max_new_tokens or recipe.generation.max_new_tokens,
        mixed_precision=mixed_precision, compile=bool(spec.chunk_size) and resolve_compile(spec.compile, device),
        ledger_sha=ledger_sha, teachers=teacher_shares(examples, data, descriptions), signature=signature,
        ckpt_root=ckpt_root, start=resume_step(ckpt_root, signature, spec, model, optimizer, accelerator, name),
        terms=terms, request_hashes=[ex.request_hash for ex in examples], distributed=distributed)


def sharded(accelerator) -> bool:
    """Whether models are sharded over several processes here (FSDP2), so that each forward gathers
    weights from every process and all must run it together."""
    return accelerator.is_fsdp2 and accelerator.num_processes > 1


def online_teacher(recipe: Recipe, spec: TrainSpec, accelerator, student, name: str) -> torch.nn.Module | None:
    """The online teacher (online and on-policy KD), frozen; None for the cached signal.

    One process, or DDP: whole on every process's device. Sharded (FSDP2 over several processes,
    after the student is): sharded as the student is (``distributed.shard_teacher``), and the
    processes of a machine load it in turn, so that its host memory holds one whole copy at a time
    (each process's copy leaves it as the shards reach the device)."""
    if not (spec.objective == "kd" and spec.teacher_signal != "cached"):
        return None

    def load():  # teacher.path: checked when the recipe loaded
        model, _ = load_model_dir(recipe.teacher.path, "teacher", recipe.teacher.dtype,
                                  trust_remote_code=recipe.teacher.trust_remote_code)
        return model.requires_grad_(False)

    if not sharded(accelerator):
        return load().to(accelerator.device)
    teacher, held = None, 0
    # a process that fails here exits, and the launcher stops the others waiting in the barrier
    for turn in range(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))):
        if accelerator.local_process_index == turn:
            teacher = load()
            held = shard_teacher(teacher, student)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        total = sum(p.numel() for p in teacher.parameters())
        print(f"train {name}: the online teacher ({total:,} parameters) sharded over {accelerator.num_processes} "
              f"processes by decoder layer: each holds {held:,} (its share of the layers; the embedding, final norm and "
              f"head whole)")
    return teacher


def training_data(recipe: Recipe, spec: TrainSpec, name: str, examples: list, descriptions: dict[str, dict],
                  tokenizer, vocab_rows: int, say: bool) -> tuple[Compat, list[TrainExample]]:
    """The student's tokens and targets for ``examples``, and how its tokenizer compares with the
    recipe teacher's. Logit KD from the cache works across tokenizers: a row whose ids are not the
    student's (another tokenizer; in a merged ledger, another teacher's) gets targets mapped onto
    the student's tokens (potstill.align); online and on-policy KD from a teacher of another
    tokenizer map its targets every step (``OnlineCross``, set up by ``setup``)."""
    cached_kd = spec.objective == "kd" and spec.teacher_signal == "cached"
    compat = check_tokenizers(recipe.teacher.tokenizer_dir, tokenizer, vocab_rows, samples=ledger_samples(examples))
    same: bool | set[str] = compat.same_ids
    if recipe.train.data == "ledger":  # several teachers: the rows whose teacher reads text as the student does
        student_sha = tokenizer_sha256(tokenizer)
        same = {k for k, d in descriptions.items() if d.get("tokenizer_sha256") == student_sha}
        if compat.same_ids:
            same.add(recipe_teacher_key(recipe))
    # rows whose ids are not the student's: another tokenizer, or an endpoint's bytes without ids
    mapped = any(ex.token_ids is None or not (ex.teacher_key in same if isinstance(same, set) else same)
                 for ex in examples)
    cross = cross_tokenizer(recipe, tokenizer, descriptions) if cached_kd and mapped else None
    data = build_examples(examples, tokenizer, same_tokenizer=same, cross=cross)
    if cross is not None and say:
        c = cross.counts
        print(f"train {name}: logit KD across tokenizers (potstill.align): {c['positions']:,} student tokens, "
              f"{c['exact'] / max(c['positions'], 1):.0%} cut where the teacher's tokens are cut; "
              f"{c['unmappable']:,} teacher alternatives no student token starts (their mass in the tail)"
              + (f"; {c['rows_text_differs']:,} rows whose tokens do not spell their text, trained on the text"
                 if c["rows_text_differs"] else "")
              + (f"; {c['rows_without_topk']:,} rows of a teacher whose tokenizer is unknown here, trained on the "
                 f"text" if c["rows_without_topk"] else "")
              + (f"; {c['rows_student_cannot_spell']:,} rows with bytes the student's tokenizer cannot spell, trained "
                 f"on the text, {c['positions_excluded']:,} unknown tokens in them excluded"
                 if c["rows_student_cannot_spell"] else ""))
    return compat, data


def recipe_teacher_key(recipe: Recipe) -> str:
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        return teacher_key(recipe_plan(ledger, recipe)[0])


def cross_tokenizer(recipe: Recipe, tokenizer, descriptions: dict[str, dict]) -> CrossTokenizer:
    """What cached logit KD needs across tokenizers: the student's token bytes, and each teacher's
    (to read rows of its ids) whose tokenizer is here: the recipe teacher's tokenizer folder, another
    teacher's model folder as its description names it."""
    folders = {k: d["path"] for k, d in descriptions.items() if d.get("backend") == "local" and d.get("path")}
    if recipe.teacher.tokenizer_dir:
        folders[recipe_teacher_key(recipe)] = recipe.teacher.tokenizer_dir
    teachers = {k: load_tokenizer_dir(f, "teacher tokenizer") for k, f in folders.items() if Path(f).is_dir()}
    return CrossTokenizer.build(tokenizer, teachers, max(recipe.generation.top_logprobs, 1))


def refuse_missing_topk(recipe: Recipe, spec: TrainSpec, examples: list) -> None:
    """Logit KD from the cache needs every example's top-k: one line saying how to get it."""
    if spec.objective == "kd" and spec.teacher_signal == "cached" and any(
            ex.topk_ids is None and ex.topk_bytes is None for ex in examples):
        raise PotstillError("logit KD from the cache needs top-k logprobs in the ledger; " + (
            "the HTTP teacher's answers hold none (the endpoint returned no logprobs, or they were generated before "
            "potstill asked HTTP teachers for them): generate into a new ledger with generation.top_logprobs > 0 "
            "from an endpoint that returns logprobs (OpenAI, vLLM; or ids: teacher.token_ids=true)"
            if recipe.teacher.http else "generate with generation.top_logprobs > 0")
            + ", or use train.teacher_signal=online")


def make_accelerator(device: str, spec: TrainSpec) -> tuple[Accelerator, str]:
    """This student's Accelerator and its mixed precision ("no", "bf16" or "fp16")."""
    # accelerate keeps one state per process; a second student (the baseline) in the same process may
    # ask for another mixed precision, so forget the previous setting but keep the process group
    AcceleratorState._reset_state(reset_partial_state=False)
    mixed_precision = resolve_mixed_precision(spec.mixed_precision, device)
    if device.startswith("cuda:"):  # one process on a chosen GPU; under `accelerate launch` each rank has its own
        torch.cuda.set_device(int(device.partition(":")[2]))
    # DDP: each gradient a view into its all-reduce bucket, not a second copy of every gradient
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision, kwargs_handlers=[ddp])
    fsdp_on_cpu(accelerator)  # tests only: the GPUs' FSDP2 path over gloo (distributed.FSDP_ON_CPU)
    return accelerator, mixed_precision


def with_chunk_size(spec: TrainSpec, model, device: str, mixed_precision: str, dense_teacher: bool) -> TrainSpec:
    """``spec`` with chunk_size auto resolved: the chunk that fits the memory left with the student
    and the teacher on the device (CHUNK_SHARE leaves room for activations and the optimizer's state,
    made at the first step), for a loss against a dense teacher's logits or sparse targets. The steps
    and potstill.json see the number, the resume signature what was asked."""
    head_weight = _unwrap(model).get_output_embeddings().weight
    v, h = head_weight.shape
    dtype_bytes = 2 if mixed_precision in ("bf16", "fp16") else head_weight.element_size()
    return spec.model_copy(update={"chunk_size": resolve_chunk_size(spec.chunk_size, device, v, h, dtype_bytes,
                                                                    dense_teacher)})


def resume_step(ckpt_root: Path, signature: dict, spec: TrainSpec, model, optimizer, accelerator, name: str) -> int:
    """The step to start from: a resumed checkpoint's whose signature matches, else 0 (and the
    checkpoints of other settings or data are cleared)."""
    found = checkpoint.latest(ckpt_root) if spec.resume else None
    if found is not None and json.loads((found / "trainer.json").read_text())["signature"] == signature:
        start = checkpoint.load_checkpoint(found, _unwrap(model), optimizer, fsdp=accelerator.is_fsdp2)["step"]
        print(f"train {name}: resuming from {found}")
        return start
    if found is not None:
        print(f"train {name}: {ckpt_root} holds checkpoints of other settings or data; starting over")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.clear(ckpt_root)
    return 0


def train_step(s: Setup, step: int) -> dict:
    """One optimizer step (global number ``step``); returns its log row, with ``skipped`` set when
    the loss or gradient was not finite and nothing was learned."""
    spec, acc, model, optimizer = s.spec, s.accelerator, s.model, s.optimizer
    ids = s.plan.batch(step)
    n_tokens = sum(s.data[i].n_completion for i in ids)  # all processes together
    on_policy = (spec.objective == "kd" and spec.teacher_signal == "on_policy"
                 and random.Random(spec.seed * 7919 + step).random() < spec.lmbda)
    torch.manual_seed(spec.seed * 1_000_003 + step * 1009 + acc.process_index)  # dropout, sampling
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, s.plan.total, spec)
    micro = [[s.data[i] for i in chunk] for chunk in s.plan.micro_batches(ids, acc.process_index)]
    if on_policy:  # completions sampled from the student; their tokens are counted afresh
        micro = [sample_from_student(model, batch, s.pad_id, s.tokenizer.eos_token_id, s.on_policy_max_new_tokens,
                                     sharded(acc)) for batch in micro]
        if s.cross is not None:  # cut where the sampled bytes stop being text the teacher can read
            micro = [s.cross.from_samples(batch) for batch in micro]
        mine = sum(ex.n_completion for batch in micro for ex in batch)
        n_tokens = int(acc.reduce(torch.tensor(mine, device=acc.device), "sum"))
        if not n_tokens:  # every process sees the same sum, so all skip
            return {"step": step + 1, "skipped": NOTHING}
    if s.cross is not None:  # the teacher's targets, mapped onto the student's tokens
        micro = [s.cross.targets(batch, acc.device) for batch in micro]
    sums = torch.zeros(4, device=acc.device)  # (loss, ce, kd, router) per token of the step; on the device: no sync
    for j, batch in enumerate(micro):
        tensors = {k: v.to(acc.device) for k, v in collate(batch, s.pad_id).items()}
        sync = contextlib.nullcontext() if j == len(micro) - 1 else acc.no_sync(model)
        with sync, acc.autocast():
            loss, ce, kd, router = loss_sums(model, tensors, spec, s.compat, s.teacher, on_policy, s.heads, s.compile)
            # a sum over this micro-batch's tokens / all tokens of the step; DDP averages the
            # gradients over processes, so multiply by their number to get a plain sum
            acc.backward(loss * acc.num_processes / n_tokens)
        sums += torch.stack([loss.detach().float(), ce.float(), kd.float(), router.float()]) / n_tokens
    grad_norm = acc.clip_grad_norm_(model.parameters(), spec.grad_clip or float("inf"))
    sums = acc.reduce(sums, "sum")  # per-token means of the step
    # the step's one read of the device (sync point): loss, CE, KD and the gradient norm together
    norm = torch.as_tensor(grad_norm, dtype=sums.dtype, device=sums.device).reshape(1)
    loss, ce, kd, router, norm = torch.cat([sums, norm]).tolist()
    loss_ok = all(map(math.isfinite, (loss, ce, kd)))
    if not (loss_ok and math.isfinite(norm)):
        if acc.scaler is not None:  # fp16: the scaler skips this step itself and lowers its scale
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"step": step + 1, "skipped": OVERFLOW if loss_ok and acc.scaler is not None
                else "non-finite loss or gradient"}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "epoch": step // s.plan.steps_per_epoch, "loss": loss, "ce": ce,
            "kd": kd if spec.objective == "kd" else None, "grad_norm": norm,
            "lr": optimizer.param_groups[0]["lr"], "on_policy": on_policy,
            **({"router": router} if router_coef(model) else {})}


def train(recipe: Recipe, spec: TrainSpec, name: str = "student", accept_terms_risk: str | None = None) -> Path:
    """Train one student on the run's ledger and write it to ``<run>/<name>/`` (HF format).
    Every teacher's terms are checked against ``recipe.use`` first; ``accept_terms_risk`` (a reason,
    kept in the ledger and the card) trains past a refusal."""
    run = recipe.run_dir
    check_outputs(run, name)
    s = setup(recipe, spec, name, accept_terms_risk)
    acc, plan = s.accelerator, s.plan
    log_path = run / "logs" / f"{name}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = contextlib.nullcontext()
    if acc.is_main_process:  # only the main process reads and rewrites the log
        kept = [line for line in (log_path.read_text().splitlines() if s.start and log_path.exists() else [])
                if json.loads(line)["step"] <= s.start]
        log = open(log_path, "w")
    began, bad = time.perf_counter(), 0
    s.model.train()
    with log, progress(f"train {name}", plan.total - s.start) as advance:
        if acc.is_main_process:
            log.write("".join(line + "\n" for line in kept))
        for step in range(s.start, plan.total):
            row = train_step(s, step)
            advance(1)
            done = row["step"]
            if "skipped" in row:
                bad = 0 if row["skipped"] in (OVERFLOW, NOTHING) else bad + 1
                if acc.is_main_process:
                    log.write(json.dumps(row) + "\n")
                if bad >= MAX_BAD_STEPS:
                    raise PotstillError(f"{bad} non-finite steps in a row (last: step {done}); lower train.lr, "
                                        f"use train.mixed_precision=no, or check the ledger's logprobs")
                continue
            bad = 0
            checkpoint.crash_point(f"step-{done}")
            if acc.is_main_process and (done % spec.log_every == 0 or done == plan.total):
                log.write(json.dumps({**row, "seconds": round(time.perf_counter() - began, 3)}) + "\n")
                log.flush()
            if spec.checkpoint_every and done % spec.checkpoint_every == 0 and done < plan.total:
                # FSDP2: every process gathers (a collective), the main one writes
                gathered = checkpoint.gathered_state(s.model, s.optimizer) if acc.is_fsdp2 else None
                if acc.is_main_process:
                    checkpoint.save_checkpoint(s.ckpt_root, done, _unwrap(s.model), s.optimizer,
                                               {"signature": s.signature}, spec.keep_checkpoints, gathered)
                acc.wait_for_everyone()
    if s.cross is not None:
        s.cross.add_up(lambda t: acc.reduce(t.to(acc.device), "sum").cpu())  # every process's steps
        if acc.is_main_process:
            print(f"train {name}: logit KD across tokenizers, the teacher re-reading each step's text: "
                  f"{s.cross.summary()}")
    export(s, recipe, name, time.perf_counter() - began)
    return run / name


def export(s: Setup, recipe: Recipe, name: str, seconds: float) -> None:
    """The trained student, its potstill.json (what made it) and its model card, to ``<run>/<name>/``."""
    acc = s.accelerator
    acc.wait_for_everyone()
    # FSDP2: the full weights, gathered into the main process's CPU memory (a collective)
    full = acc.get_state_dict(s.model) if acc.is_fsdp2 else None
    if acc.is_main_process:
        tokens = sum(ex.n_completion for ex in s.data)
        info = {
            "name": name, "objective": s.spec.objective,
            # the training section as the recipe asked (chunk_size auto stays auto: the pipeline compares
            # it with the recipe); the chunk used beside it
            "train": {**s.spec.model_dump(), **s.signature["train"]}, "chunk_size": s.spec.chunk_size,
            "student": recipe.student.model_dump(), "recipe_sha256": recipe.sha256(), "ledger_sha256": s.ledger_sha,
            "examples": len(s.data), "steps": s.plan.total, "resumed_from": s.start, "seconds": round(seconds, 2),
            "processes": acc.num_processes, "distributed": s.distributed, "threads": torch.get_num_threads(), "device": str(acc.device),
            "mixed_precision": s.mixed_precision,
            "compile": s.compile, "tokenizers": s.compat.kind, "teachers": s.teachers, "license": recipe.student.license,
            "completion_tokens": tokens, "terms": s.terms, "model_name": model_name(name, s.terms),
        }
        with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:  # the rows trained on, hashed into the manifest
            rows = manifest.ledger_leaves(ledger, s.request_hashes,
                                          {t["teacher_key"]: t["verdict"] for t in s.terms["teachers"]})
        save_student(_unwrap(s.model), s.tokenizer, recipe.run_dir / name, info, rows, full)
    acc.wait_for_everyone()


def _plain(model, state_dict: dict):
    """A plain copy of an FSDP2 ``model`` holding ``state_dict`` (full tensors), LoRA adapters merged.
    fully_shard swaps a model's class for an FSDP subclass (FSDPLlamaForCausalLM) whose parameters are
    shards, and merging adapters into shards would need every process; so the copy is built from the
    wrapped class on the meta device (no memory), wrapped by peft as the student was, given the
    gathered tensors, and merged here, in the one process that writes."""
    from torch.distributed.fsdp import FSDPModule

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    config = copy.deepcopy(base.config)  # peft's wrapper edits the config it is given: not the student's
    tied = getattr(config, "tie_word_embeddings", False)
    with torch.device("meta"):
        plain = cls(config)
        if hasattr(model, "peft_config"):
            import peft

            plain = peft.get_peft_model(plain, copy.deepcopy(model.peft_config["default"]))
    plain.load_state_dict(state_dict, strict=False, assign=True)
    if hasattr(plain, "merge_and_unload"):
        plain = plain.merge_and_unload()
    plain.config = copy.deepcopy(base.config)
    out_emb, in_emb = plain.get_output_embeddings(), plain.get_input_embeddings()
    if tied and out_emb is not None:  # tie_weights leaves tensors given by assign apart
        out_emb.weight = in_emb.weight
    plain.generation_config = base.generation_config
    left = [n for n, p in plain.named_parameters() if p.is_meta]
    if left:  # a key the gathered state did not have: never write a folder without its weights
        raise PotstillError(f"FSDP export: the gathered state has no {left[0]} ({len(left)} such parameters)")
    return plain


def check_outputs(run: Path, name: str) -> None:
    """Refuse, before any work, to replace ``<run>/<name>`` or clear ``<run>/checkpoints/<name>``
    when they hold anything potstill did not write there."""
    out = run / name
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise PotstillError(f"{out} is not a folder potstill wrote, and train would replace it: move it elsewhere")
    if out.is_dir() and any(out.iterdir()):
        try:
            listed = json.loads((out / "potstill.json").read_text()).get("files")
            # an older potstill listed no files: then its potstill.json is the only mark
            ours = set(listed) | {"potstill.json", "README.md"} if listed else None
        except (OSError, ValueError, AttributeError):  # no potstill.json: none of it is ours
            ours = set()
        for p in sorted(out.iterdir()):
            if p.is_symlink() or not p.is_file() or (ours is not None and p.name not in ours):
                raise PotstillError(f"{p} was not written by potstill, and train would delete it with {out}: "
                                    f"move it elsewhere; nothing was deleted")
    if (f := checkpoint.foreign(run / "checkpoints" / name)) is not None:
        raise PotstillError(f"{f} was not written by potstill, and train would delete it with "
                            f"{run / 'checkpoints' / name}: move it elsewhere; nothing was deleted")


def save_student(model, tokenizer, out: Path, info: dict, manifest_rows: list[tuple[str, bytes]] | None = None,
                 state_dict: dict | None = None) -> None:
    """Write to a temporary folder, then rename: a half-written student never looks finished.
    potstill.json lists the files, so that only a folder of these is ever replaced (check_outputs).
    ``manifest_rows`` (request hash, leaf) of the rows trained on become manifest.merkle; its root and
    the weights' hash go into potstill.json and the card."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is not None:  # FSDP2: the gathered weights, as the model's own class, adapters merged
        model = _plain(model, state_dict)
    elif hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters into the weights
        model = model.merge_and_unload()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_obligation_files(tmp, info.get("terms"), info.get("license"))
        info["weights_sha256"] = weights_sha256(tmp)
        if manifest_rows is not None:
            info["manifest_merkle_root"] = manifest.write(tmp, manifest_rows)
            info["manifest_rows"] = len(manifest_rows)
        spdx.write(tmp, info)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        info["files"] = sorted({p.name for p in tmp.iterdir()} | {"potstill.json", "README.md"})
        manifest.seal(tmp, info)  # potstill.json with every file's sha256, the card, the card's sha256
    except BaseException:  # a full disk, an interrupt: leave no half-written student behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)

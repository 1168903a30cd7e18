"""A local Hugging Face causal LM as the teacher: batched generation with top-k logprobs."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from potstill.errors import PotstillError
from potstill.provenance import text_sha256, weights_sha256
from potstill.teachers.base import Completion, Request

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_dir(path: str | Path, what: str = "model", dtype: str = "float32", device: str = "cpu"):
    """Load a local HF model + tokenizer, or raise one clear error saying what is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise PotstillError(f"{what} directory {path} not found")
    if not (path / "config.json").is_file():
        raise PotstillError(f"{what} directory {path} has no config.json: not a Hugging Face model folder")
    if not list(path.glob("*.safetensors")):
        raise PotstillError(f"{what} directory {path} has no *.safetensors weights (potstill loads safetensors only)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True).to(device)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise PotstillError(f"{what} directory {path} could not be loaded: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: equal hashes mean the same token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    return hashlib.sha256(json.dumps([vocab, special], sort_keys=True).encode()).hexdigest()


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` with the chat template and the assistant turn opened."""
    if tokenizer.chat_template:
        from jinja2 import TemplateError

        try:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
        except TemplateError as e:  # also the sandbox's SecurityError: a template reaching outside its data
            raise PotstillError(f"{tokenizer.name_or_path}: its chat template failed ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); fix chat_template.jinja or the "
                                f"chat_template in tokenizer_config.json") from None
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text)["input_ids"]


def describe_local(path: Path, tokenizer, *, id: str | None, revision: str | None, terms_family: str,
                   dtype: str, terms_url: str | None = None) -> dict:
    """A local teacher's provenance: needs its tokenizer and weight files, not its weights loaded."""
    return {
        "id": id or path.name,
        "backend": "local",
        "path": str(path),
        "revision": revision,
        "weights_sha256": weights_sha256(path),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "chat_template_sha256": text_sha256(tokenizer.chat_template),
        "dtype": dtype,
        "terms_family": terms_family,
        "terms_url": terms_url,
    }


@torch.no_grad()
def generate_ids(model, tokenizer, rows: list[list[int]], params: dict, seed: int, hashes: list[str],
                 token_logprobs: bool = False) -> list[Completion]:
    """Generate for prompts given as token ids, left-padded into one batch, after ``torch.manual_seed(seed)``.

    Logprobs are the model's own distribution (temperature 1, before sampling filters), whatever the
    sampling temperature. ``token_logprobs`` also returns each generated id's logprob in that
    distribution. LocalTeacher and ``potstill serve`` both generate here, so that a teacher served
    over HTTP gives the same ids and logprobs as the local backend.
    """
    tok = tokenizer
    start = time.perf_counter()
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention[i, width - len(ids):] = 1
    torch.manual_seed(seed)
    greedy = params["temperature"] == 0
    out = model.generate(
        input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
        max_new_tokens=params["max_new_tokens"], do_sample=not greedy,
        temperature=None if greedy else params["temperature"], top_p=None if greedy else params["top_p"],
        top_k=None, pad_token_id=pad, eos_token_id=tok.eos_token_id,
        output_logits=bool(k := params["top_logprobs"]) or token_logprobs, return_dict_in_generate=True,
    )
    generated = out.sequences[:, width:].cpu()  # (B, T)
    if k or token_logprobs:
        # a step at a time: never a (B, T, V) float32 copy of the logits, only (B, V) at once
        tops, chosen_steps = [], []
        for t, step in enumerate(out.logits):  # (B, V) raw logits at T=1
            logprobs = step.float().log_softmax(-1)
            if k:
                # only ids the tokenizer knows: a model's padding rows (vocab_size > len(tokenizer))
                # never enter the cache, so every cached id exists in a student of the same tokenizer
                real = logprobs[:, :len(tok)]
                tops.append(real.topk(min(k, real.shape[-1]), dim=-1))
            if token_logprobs:
                chosen_steps.append(logprobs.gather(-1, generated[:, t:t + 1].to(logprobs.device))[:, 0])
        if k:
            top_lp = torch.stack([v for v, _ in tops], dim=1)  # (B, T, k)
            top_ids = torch.stack([i for _, i in tops], dim=1)
        if token_logprobs:
            chosen = torch.stack(chosen_steps, dim=1).cpu()  # (B, T)
    seconds = (time.perf_counter() - start) / len(rows)
    completions = []
    for i, (h, prompt) in enumerate(zip(hashes, rows)):
        ids = generated[i].tolist()
        finish = "length"
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id) + 1]
            finish = "stop"
        n = len(ids)
        completions.append(Completion(
            request_hash=h,
            text=tok.decode(ids, skip_special_tokens=True),
            token_ids=ids,
            topk_ids=top_ids[i, :n].cpu().numpy().astype(np.int32) if k else None,
            topk_logprobs=top_lp[i, :n].cpu().numpy() if k else None,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            seed=seed,
            seconds=seconds,
            token_logprobs=chosen[i, :n].numpy() if token_logprobs else None,
        ))
    return completions


class LocalTeacher:
    def __init__(self, path: str | Path, *, id: str | None = None, revision: str | None = None,
                 terms_family: str = "unknown", terms_url: str | None = None, dtype: str = "float32",
                 device: str = "cpu"):
        self.path = Path(path)
        self.model, self.tokenizer = load_model_dir(self.path, "teacher", dtype, device)
        self.info = describe_local(self.path, self.tokenizer, id=id, revision=revision, terms_family=terms_family,
                                   dtype=dtype, terms_url=terms_url)

    def describe(self) -> dict:
        return dict(self.info)

    def complete(self, requests: list[Request], params: dict) -> list[Completion]:
        """Generate for a batch of requests (left-padded); see :func:`generate_ids`."""
        rows = [prompt_ids(self.tokenizer, r.messages) for r in requests]
        # One seed per batch, derived from its first request: the same batch samples the same text.
        seed = int(hashlib.sha256((requests[0].request_hash + str(params.get("seed", 0))).encode()).hexdigest()[:8], 16)
        return generate_ids(self.model, self.tokenizer, rows, params, seed, [r.request_hash for r in requests])


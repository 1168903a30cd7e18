"""Hugging Face model folders, for every stage: loading (safetensors only, no folder code unless
trusted), the provenance of a folder, prompt encoding through the chat template, left padding, and
batched generation with top-k logprobs.

Not a teacher backend: the local teacher (``teachers.backends``), the students, the judge, eval,
serve and audit all load and run models through this module."""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from potstill.errors import PotstillError
from potstill.provenance import text_sha256, weights_sha256
from potstill.records import Completion, Request

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_dir(path: str | Path, what: str = "model", dtype: str = "float32", device: str = "cpu",
                   trust_remote_code: bool = False):
    """Load a local HF model + tokenizer, or raise one clear error saying what is missing.

    A folder's own Python code (``auto_map`` in its config) runs only with ``trust_remote_code``;
    without it such a folder is refused, never run and never asked about on a terminal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(path, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     dtype=DTYPES[dtype], use_safetensors=True).to(device)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        if not trust_remote_code and has_remote_code(path):
            raise PotstillError(f"{what} directory {path} needs its own Python code (auto_map in its config), which "
                                f"potstill does not run unless told to (teacher.trust_remote_code: true, after "
                                f"reading that code)") from None
        raise PotstillError(f"{what} directory {path} could not be loaded: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """A Hugging Face model folder with safetensors weights, or one clear error saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise PotstillError(f"{what} directory {path} not found")
    if not (path / "config.json").is_file():
        raise PotstillError(f"{what} directory {path} has no config.json: not a Hugging Face model folder")
    if not list(path.glob("*.safetensors")):
        raise PotstillError(f"{what} directory {path} has no *.safetensors weights (potstill loads safetensors only)")
    return path


def load_tokenizer_dir(path: str | Path, what: str = "tokenizer", trust_remote_code: bool = False):
    """A tokenizer folder's tokenizer, or one clear error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PotstillError(f"{what} {path} could not be loaded: {str(e).splitlines()[0]}") from None


def has_remote_code(path: Path) -> bool:
    """Whether the folder's config or tokenizer config names classes in its own .py files."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads((path / name).read_text(encoding="utf-8")):
                return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def code_sha256(path: Path) -> str:
    """Hash of the folder's .py files: with trust_remote_code, they decide the answers too."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# Settings a request states (or that name special tokens): a folder's generation_config.json never
# overrides these, even when the recipe opts in to the folder's other settings.
STATED = {"max_new_tokens", "max_length", "min_length", "do_sample", "temperature", "top_p", "pad_token_id",
          "eos_token_id", "bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
          "return_dict_in_generate", "output_logits", "output_scores", "output_attentions", "output_hidden_states",
          "num_return_sequences", "use_cache", "cache_implementation"}


def folder_generation_settings(path: Path) -> dict:
    """What the folder's generation_config.json adds to decoding beyond the stated settings
    (repetition_penalty, no_repeat_ngram_size, top_k, ...): applied, and recorded in the teacher's
    description, only when the recipe opts in (teacher.use_generation_config)."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").is_file():
        return {}
    try:
        # the JSON alone: nothing in a folder is run to read its generation settings
        config = GenerationConfig.from_dict(json.loads((path / "generation_config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise PotstillError(f"{path / 'generation_config.json'} could not be read: {str(e).splitlines()[0]}") from None
    return {k: v for k, v in sorted(config.to_diff_dict().items()) if k not in STATED}


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
                   dtype: str, terms_url: str | None = None, use_generation_config: bool = False,
                   trust_remote_code: bool = False, watermark: dict | None = None) -> dict:
    """A local teacher's provenance: needs its tokenizer and weight files, not its weights loaded.
    The opt-ins (the folder's generation settings, its own code) appear only when taken, and then
    key the requests (``ledger.IDENTITY``)."""
    desc = {
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
    if use_generation_config:
        desc["generation_config"] = folder_generation_settings(path)
    if trust_remote_code:
        desc["code_sha256"] = code_sha256(path)
    if watermark:
        desc["watermark"] = watermark  # Watermark.describe(): the key id, never the key
    return desc


def stated_config(params: dict, tokenizer, logit_rows: int, settings: dict | None = None):
    """The GenerationConfig of one call: exactly ``params`` (plus the folder's ``settings`` when the
    recipe opted in), and ids outside the tokenizer suppressed, so a model's padding rows
    (vocab_size > len(tokenizer)) are never sampled, greedy or not."""
    from transformers import GenerationConfig

    greedy = params["temperature"] == 0
    extra = dict(settings or {})
    padding = list(range(len(tokenizer), logit_rows))
    suppress = sorted(set(extra.pop("suppress_tokens", None) or []) | set(padding)) or None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(**{
        "top_k": 0,  # no top-k filter unless the folder's settings (opted in) name one
        **extra,
        "max_new_tokens": params["max_new_tokens"], "do_sample": not greedy,
        "temperature": 1.0 if greedy else params["temperature"], "top_p": 1.0 if greedy else params["top_p"],
        "suppress_tokens": suppress, "pad_token_id": pad, "eos_token_id": tokenizer.eos_token_id,
    })


@contextmanager
def folder_defaults_off(model):
    """generate() fills every setting a call leaves unset from ``model.generation_config`` (the
    folder's generation_config.json: repetition penalties, n-gram bans, ...). Within this block the
    model's defaults are transformers' global ones, so a call decodes with what it states."""
    from transformers import GenerationConfig

    folder_config, model.generation_config = model.generation_config, GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = folder_config


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of token ids as one (B, W) batch padded on the left, so every row's generation starts
    at column W; returns (input_ids, attention_mask)."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention[i, width - len(ids):] = 1
    return input_ids, attention


@torch.no_grad()
def generate_ids(model, tokenizer, rows: list[list[int]], params: dict, seed: int, hashes: list[str],
                 token_logprobs: bool = False, settings: dict | None = None, watermark=None) -> list[Completion]:
    """Generate for prompts given as token ids, left-padded into one batch, after ``torch.manual_seed(seed)``.

    Decoding follows ``params`` alone (see :func:`stated_config`): the model folder's
    generation_config.json adds nothing (repetition penalties, n-gram bans, top-k, ...) unless its
    ``settings`` are passed, which the caller then records. A ``watermark``
    (:class:`potstill.audit.Watermark`) adds its green-list bonus to every step's logits, and the
    logprobs are then of that watermarked distribution, the one sampled from: they give away
    neither the key nor the unwatermarked distribution. Logprobs are the model's own
    distribution over the tokenizer's ids (temperature 1, before sampling filters), whatever the
    sampling temperature. ``token_logprobs`` also returns each generated id's logprob in that
    distribution. LocalModel and ``potstill serve`` both generate here, so that a teacher served
    over HTTP gives the same ids and logprobs as the local backend.
    """
    tok = tokenizer
    start = time.perf_counter()
    input_ids, attention = left_pad(rows, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    width = input_ids.shape[1]
    k = params["top_logprobs"]
    config = stated_config(params, tok, model.get_output_embeddings().weight.shape[0], settings)
    config.output_logits, config.return_dict_in_generate = bool(k) or token_logprobs, True
    torch.manual_seed(seed)
    with folder_defaults_off(model):
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                             generation_config=config, logits_processor=[watermark] if watermark else None)
    generated = out.sequences[:, width:]  # (B, T), on the model's device
    if k or token_logprobs:
        # a step at a time, on the device: never a (B, T, V) copy of the logits, only (B, V) at once;
        # only ids the tokenizer knows: a model's padding rows (vocab_size > len(tokenizer)) are never
        # sampled, so they are not in the distribution either, and every cached id exists in a
        # student of the same tokenizer
        top_lp, top_ids, chosen = [], [], []
        for t, step in enumerate(out.logits):  # (B, V) raw logits at T=1, float32
            if watermark:
                step = watermark(out.sequences[:, :width + t], step)
            logprobs = step[:, :len(tok)].float().log_softmax(-1)  # (B, len(tokenizer))
            if k:
                values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # (B, k)
                top_lp.append(values)
                top_ids.append(ids)
            if token_logprobs:  # the generated ids are on the device already: no transfer a step
                chosen.append(logprobs.gather(-1, generated[:, t:t + 1])[:, 0])
        # one transfer each to the host, at the end (the rows below are numpy views)
        if k:
            top_lp = torch.stack(top_lp, dim=1).cpu().numpy()  # (B, T, k)
            top_ids = torch.stack(top_ids, dim=1).cpu().numpy().astype(np.int32)
        if token_logprobs:
            chosen = torch.stack(chosen, dim=1).cpu().numpy()  # (B, T)
    generated = generated.tolist()
    seconds = (time.perf_counter() - start) / len(rows)
    completions = []
    for i, (h, prompt) in enumerate(zip(hashes, rows)):
        ids = generated[i]
        finish = "length"
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id) + 1]
            finish = "stop"
        n = len(ids)
        completions.append(Completion(
            request_hash=h,
            text=tok.decode(ids, skip_special_tokens=True),
            token_ids=ids,
            topk_ids=top_ids[i, :n] if k else None,
            topk_logprobs=top_lp[i, :n] if k else None,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            seed=seed,
            seconds=seconds,
            token_logprobs=chosen[i, :n] if token_logprobs else None,
        ))
    return completions


class LocalModel:
    """A local model folder that answers ``Request``s: the local teacher, an eval student, a local
    judge. ``describe()`` is its provenance (terms fields only matter when it is a teacher)."""

    def __init__(self, path: str | Path, *, id: str | None = None, revision: str | None = None,
                 terms_family: str = "unknown", terms_url: str | None = None, dtype: str = "float32",
                 device: str = "cpu", use_generation_config: bool = False, trust_remote_code: bool = False,
                 watermark=None):
        self.path = Path(path)
        self.watermark = watermark
        self.model, self.tokenizer = load_model_dir(self.path, "teacher", dtype, device, trust_remote_code)
        self.info = describe_local(self.path, self.tokenizer, id=id, revision=revision, terms_family=terms_family,
                                   dtype=dtype, terms_url=terms_url, use_generation_config=use_generation_config,
                                   trust_remote_code=trust_remote_code,
                                   watermark=watermark.describe() if watermark else None)
        self.settings = self.info.get("generation_config")  # None unless opted in

    def describe(self) -> dict:
        return dict(self.info)

    def complete(self, requests: list[Request], params: dict) -> list[Completion]:
        """Generate for a batch of requests (left-padded); see :func:`generate_ids`."""
        rows = [prompt_ids(self.tokenizer, r.messages) for r in requests]
        # One seed per batch, derived from its first request: the same batch samples the same text.
        seed = int(hashlib.sha256((requests[0].request_hash + str(params.get("seed", 0))).encode()).hexdigest()[:8], 16)
        return generate_ids(self.model, self.tokenizer, rows, params, seed, [r.request_hash for r in requests],
                            settings=self.settings, watermark=self.watermark)


"""The recipe: one YAML file, one typed schema per section, dotted ``key=value`` overrides.

Relative paths of inputs (teacher, prompts, student checkpoint) are resolved against the folder
of the recipe file, so a recipe travels with its data; ``output_dir`` is relative to the current
directory. Unknown keys, wrong types and values out of range are rejected with one line naming the
key (``student.config`` keys too: those its model_type's config class does not read); so are input
paths that do not exist and an ``output_dir`` that cannot be written, before any stage starts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from potstill.devices import DEVICE_PATTERN, resolve_device
from potstill.errors import PotstillError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_name(value: str | None) -> str | None:
    """An environment variable's NAME; never echo the value: a key pasted here must not reach a log."""
    if value is not None and not ENV_NAME.match(value):
        raise ValueError("must be the NAME of an environment variable (letters, digits, _), e.g. OPENAI_API_KEY, "
                         "never the key itself: export the key in that variable")
    return value


class PricesSpec(Section):
    """What the endpoint charges, in USD per million tokens: the cost budget is counted from these."""

    prompt: float = Field(0.0, ge=0.0)
    completion: float = Field(0.0, ge=0.0)


class BudgetSpec(Section):
    """Stop generating (cleanly, spend recorded) before the ledger's totals for this teacher pass a
    limit. Each ledger counts its own: a shard's, and eval's held-out answers (eval-ledger.sqlite)."""

    max_requests: int | None = Field(None, ge=1)  # HTTP sends, retries included
    max_tokens: int | None = Field(None, ge=1)  # prompt + completion tokens the endpoint reported
    max_cost: float | None = Field(None, gt=0.0)  # USD, from teacher.prices


class WatermarkSpec(Section):
    """A green-list watermark on a local teacher's sampling (docs/audit.md). Only a key id (a hash of
    the key) and these numbers are recorded; the key itself stays in its file."""

    key_file: str  # the secret key (at least 16 bytes); one key per dataset release
    gamma: float = Field(0.25, gt=0.0, lt=1.0)  # share of the vocabulary that is green at each step
    delta: float = Field(2.0, ge=0.0)  # logit bonus of green tokens: higher = easier to detect, more distortion
    context: int = Field(1, ge=1, le=8)  # previous token ids that seed each green list


class HTTPSettings(Section):
    """How an OpenAI-compatible endpoint is asked: the same keys under ``teacher`` (an HTTP teacher)
    and ``eval.judge`` (a judge behind an endpoint), declared once here."""

    model: str | None = None  # the model name the endpoint serves, e.g. gpt-4o-mini
    endpoints: list[str] = []  # base URLs, e.g. [https://api.openai.com/v1]; several = a fleet (least-loaded)
    api_key_env: str | None = None  # NAME of the environment variable holding the key; keys never go in recipes
    concurrency: int = Field(16, ge=1, le=4096)  # the in-flight window is concurrency x endpoints
    requests_per_minute: float | None = Field(None, gt=0.0)  # over all endpoints
    tokens_per_minute: float | None = Field(None, gt=0.0)  # prompt estimate + max tokens, as providers count
    timeout: float = Field(120.0, gt=0.0)  # seconds per attempt
    max_attempts: int = Field(6, ge=1, le=100)  # per request, first send included
    max_retry_wait: float = Field(120.0, ge=0.0)  # a Retry-After longer than this stops the run (rerun later)
    prices: PricesSpec = PricesSpec()
    budget: BudgetSpec = BudgetSpec()

    _api_key_env = field_validator("api_key_env")(_env_name)


# what an endpoint's teacher cannot do without, and what to put there
_ENDPOINT_REQUIRED = {"model": " (the name the endpoint serves)", "endpoints": ", e.g. [https://api.openai.com/v1]"}


class TeacherSpec(HTTPSettings):
    # local: a Hugging Face model directory run with transformers; openai: any OpenAI-compatible
    # endpoint (OpenAI, vLLM, llama.cpp, Ollama, `potstill serve`); openai_batch: OpenAI's Batch API;
    # imported: completions someone already has (a JSONL or Parquet file at teacher.data)
    backend: Literal["local", "openai", "openai_batch", "imported"] = "local"
    path: str | None = None  # local: the model directory; otherwise optional local weights (eval, online KD)
    data: str | None = None  # imported: the file (OpenAI chat JSONL, or JSONL / Parquet of prompt + response)
    format: Literal["auto", "openai_chat", "jsonl", "parquet"] = "auto"  # imported: how to read teacher.data
    id: str | None = None  # name recorded in provenance and the model card; default: folder or model name
    revision: str | None = None  # e.g. a git commit or hub revision, recorded as given
    terms_family: str = "unknown"  # licence / terms family of the teacher's outputs, e.g. apache-2.0
    terms_url: str | None = None  # where those terms are written, for the student's model card
    # why these outputs may train the student when the terms registry says "review" (allowed only
    # under a condition potstill cannot check) or "unknown"; printed in the model card
    terms_declared: str | None = Field(None, min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = Field(None, pattern=DEVICE_PATTERN)  # generate's device; default: the top-level device
    # local: also apply the folder's generation_config.json settings beyond generation.* (repetition
    # penalty, n-gram bans, top_k, ...); recorded in the teacher's description, so requests change key
    use_generation_config: bool = False
    # run the folder's own Python code (auto_map in its config); read that code first. Recorded
    # (with a hash of the folder's .py files) in the teacher's description
    trust_remote_code: bool = False
    watermark: WatermarkSpec | None = None  # local: watermark the teacher's samples and logprobs
    # -- HTTP backends: HTTPSettings (model, endpoints, api_key_env, limits, prices, budget), and --------
    # chat: /chat/completions; completions: /completions with the chat template applied here (the
    # token ids when teacher.tokenizer is known, else the messages' text joined by newlines)
    api: Literal["chat", "completions"] = "chat"
    tokenizer: str | None = None  # the teacher's tokenizer folder: token ids, logit KD; default: path
    token_ids: bool = False  # ask for ids (vLLM / potstill serve `return_tokens_as_token_ids`); needed for logit KD
    batch_poll_seconds: float = Field(30.0, gt=0.0)  # openai_batch: seconds between status polls

    # the fields each backend cannot do without (a new backend: its name in `backend` and a line here)
    REQUIRED: ClassVar[dict[str, dict[str, str]]] = {
        "local": {"path": " (a Hugging Face model folder)"},
        "openai": _ENDPOINT_REQUIRED,
        "openai_batch": _ENDPOINT_REQUIRED,
        "imported": {"data": " (the file of completions)"},
    }

    @field_validator("terms_declared")
    @classmethod
    def _declares_something(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():  # a blank declaration would satisfy a review verdict, saying nothing
            raise ValueError("blank: say why the teacher's terms allow this use, or leave it out")
        return v

    @model_validator(mode="after")
    def _backend_fields(self) -> TeacherSpec:
        if self.watermark is not None and self.backend != "local":
            raise ValueError("teacher.watermark needs backend local (watermark a hosted teacher with "
                             "`potstill serve --watermark-key-file`)")
        for name, what in self.REQUIRED[self.backend].items():
            if not getattr(self, name):
                raise ValueError(f"teacher.{name} is required for backend {self.backend}{what}")
        if self.backend == "openai_batch" and len(self.endpoints) != 1:
            raise ValueError("teacher.endpoints: the Batch API takes exactly one endpoint")
        if self.http and self.token_ids and not self.tokenizer_dir:
            raise ValueError("teacher.token_ids needs teacher.tokenizer (or teacher.path): the folder of the "
                             "tokenizer the endpoint uses")
        return self

    @property
    def tokenizer_dir(self) -> str | None:
        """Where the teacher's tokenizer lives locally, if anywhere."""
        return self.tokenizer or self.path

    @property
    def http(self) -> bool:
        return self.backend in ("openai", "openai_batch")


class PromptsSpec(Section):
    path: str  # JSONL: one object per line with "prompt" (text) or "messages" (chat); other keys kept
    limit: int | None = Field(None, ge=1)  # use only the first N prompts


class GenerationSpec(Section):
    max_new_tokens: int = Field(64, ge=1, le=32768)
    temperature: float = Field(1.0, ge=0.0, le=10.0)  # 0 = greedy decoding
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_logprobs: int = Field(20, ge=0, le=1000)  # teacher top-k logprobs kept per generated token
    samples_per_prompt: int = Field(1, ge=1, le=1000)  # each sample is its own request (own key and seed), not `n`
    stop: list[str] = Field([], max_length=4)  # HTTP teachers: stop strings sent to the endpoint (local: EOS only)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    # a prompt longer than the teacher's context (max_position_embeddings - max_new_tokens; local
    # teachers, and HTTP teachers with a known tokenizer): error = stop naming its file:line; skip =
    # leave it out (generate says how many)
    long_prompts: Literal["error", "skip"] = "error"


# student.config fields that are counts or sizes, whatever the architecture: each a positive integer
_SIZE_FIELD = re.compile(r"^(n_\w+|num_\w+|\w+_size|\w+_dim|max_position_embeddings)$")


class StudentSpec(Section):
    config: dict[str, Any] | None = None  # HF config fields for a randomly initialised student; needs model_type
    path: str | None = None  # or a local HF checkpoint to start from
    tokenizer: str | None = None  # tokenizer directory; default: the teacher's
    license: str | None = None  # the student's licence in its model card (SPDX id); default "other"
    base_model: str | None = None  # hub id or name of the model student.path holds, for the model card

    @field_validator("config")
    @classmethod
    def _sizes(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, value in (config or {}).items():
            if _SIZE_FIELD.match(key) and value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{key} must be a positive integer (got {value!r})")
        return config

    @model_validator(mode="after")
    def _one_source(self) -> StudentSpec:
        if (self.config is None) == (self.path is None):
            raise ValueError("give exactly one of student.config (random init) or student.path (checkpoint)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("student.config needs model_type (e.g. llama)")
        return self


class LoraSpec(Section):
    """Train low-rank adapters instead of every weight (needs the peft extra); merged on export."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # leaf names of the linear layers to adapt (e.g. [q_proj, v_proj]; GPT-2: [c_attn]), or
    # all-linear: every linear layer but the output head, whatever the architecture calls them
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


class TrainSpec(Section):
    objective: Literal["kd", "sft"] = "kd"  # kd: kd_ratio * KD + (1 - kd_ratio) * CE; sft: CE on teacher text
    # KD divergence, a name in potstill.losses.LOSSES: forward_kl, reverse_kl, jsd, skew_kl,
    # skew_reverse_kl, tvd (formulas: src/potstill/losses/); over the teacher's top-k + tail when cached
    loss: str = "forward_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0)  # jsd: 0 = forward KL, 1 = reverse KL (GKD)
    alpha: float = Field(0.1, ge=0.0, lt=1.0)  # skew_kl / skew_reverse_kl mixing weight (DistiLLM); 1 = no signal
    kd_ratio: float = Field(0.5, ge=0.0, le=1.0)  # weight of the KD term against cross-entropy
    temperature: float = Field(1.0, gt=0.0, le=10.0)  # softens teacher and student alike; KD term x T^2
    # where the teacher's distribution comes from: cached = top-k in the ledger; online = a forward
    # pass of the local teacher each step (full vocabulary); on_policy = online, and with
    # probability lmbda a step's completions are sampled from the student first (GKD)
    teacher_signal: Literal["cached", "online", "on_policy"] = "cached"
    lmbda: float = Field(0.5, ge=0.0, le=1.0)  # on_policy: fraction of steps on student samples
    # on_policy: the longest student sample, in tokens; default: generation.max_new_tokens
    on_policy_max_new_tokens: int | None = Field(None, ge=1)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)  # examples per optimizer step, over all processes
    micro_batch_size: int | None = Field(None, ge=1)  # examples per forward pass per process; default: all
    # > 0: loss computed from hidden states this many tokens at a time; auto: the chunk that fits a
    # quarter of the GPU's free memory (potstill.devices.pick_chunk_size), 1024 off CUDA
    chunk_size: int | Literal["auto"] = 0
    # with chunk_size > 0: run each chunk's step through torch.compile; auto = on for CUDA, off elsewhere
    compile: Literal["auto", "on", "off"] = "auto"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 = no clipping
    # auto: bf16 on a CUDA GPU that supports it, else no
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    device: str | None = Field(None, pattern=DEVICE_PATTERN)  # default: the top-level device
    seed: int = Field(0, ge=0, le=2**32 - 1)  # derived per-step seeds (seed x 1,000,003 + ...) stay in 64 bits
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0)  # steps between checkpoints; 0 = none
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = True  # continue from the newest complete checkpoint of this student, if any
    lora: LoraSpec | None = None
    # the rows the student trains on. recipe: those the recipe's teacher answered for its prompts;
    # ledger: every done row of the run's ledger, whichever teacher answered it (a merged ledger of
    # several teachers trains one student; their shares go into the card). Text only (objective sft):
    # each teacher's top-k is in its own vocabulary
    data: Literal["recipe", "ledger"] = "recipe"


    @field_validator("loss", mode="before")
    @classmethod
    def _known_loss(cls, value: Any) -> Any:
        from potstill.losses import LOSSES

        if not (isinstance(value, str) and value in LOSSES):
            *names, last = (repr(name) for name in LOSSES)
            raise ValueError(f"Input should be {', '.join(names)} or {last}")  # the words of a Literal's error
        return value

    @field_validator("chunk_size", mode="before")
    @classmethod
    def _chunk(cls, value: Any) -> Any:
        if value != "auto" and (type(value) is not int or value < 0):
            raise ValueError("a number of tokens (0 = no chunking) or auto")
        return value

    @model_validator(mode="after")
    def _signal_needs_kd(self) -> TrainSpec:
        # SFT reads no teacher distribution: an online or on-policy signal would be plain SFT, silently
        if self.objective == "sft" and self.teacher_signal != "cached":
            raise ValueError(f"train.teacher_signal {self.teacher_signal} needs train.objective kd: objective sft "
                             f"trains on the teacher's text alone, and would run plain SFT; set train.objective=kd, "
                             f"or leave train.teacher_signal out")
        if self.data == "ledger" and self.objective == "kd" and self.teacher_signal != "cached":
            raise ValueError(f"train.data ledger trains on every teacher's rows, and the {self.teacher_signal} "
                             f"teacher is one of them: use train.teacher_signal=cached (each row's top-k, mapped "
                             f"onto the student's tokens where its tokenizer differs), or train.data=recipe")
        return self


class BaselineSpec(Section):
    """A second student trained like the first but for what is named here (default: SFT only)."""

    objective: Literal["kd", "sft"] = "sft"
    kd_ratio: float | None = Field(None, ge=0.0, le=1.0)
    temperature: float | None = Field(None, gt=0.0, le=10.0)

    @model_validator(mode="after")
    def _kd_fields_need_kd(self) -> BaselineSpec:
        for name in ("kd_ratio", "temperature"):  # read by the KD term alone: an SFT baseline would ignore them
            if self.objective == "sft" and getattr(self, name) is not None:
                raise ValueError(f"baseline.{name} is read by a KD baseline only, and baseline.objective is sft: "
                                 f"set baseline.objective: kd, or leave baseline.{name} out")
        return self


class JudgeSpec(HTTPSettings):
    """A model that follows instructions judges each student's answers against the teacher's,
    pairwise (prompt: potstill/evaluate/judge.py): a local folder, or an OpenAI-compatible endpoint
    asked as an HTTP teacher is (retries, limits, budget; replies kept in judge-ledger.sqlite)."""

    backend: Literal["local", "openai"] = "local"
    path: str | None = None  # local: the model folder
    max_new_tokens: int = Field(16, ge=1)
    # -- openai: HTTPSettings, as teacher.* (model, endpoints, api_key_env, limits, prices, budget) ----

    @model_validator(mode="after")
    def _backend_fields(self) -> JudgeSpec:
        if self.backend == "local":
            if self.model or self.endpoints:
                raise ValueError("eval.judge.model / endpoints are for a judge behind an endpoint: set "
                                 "eval.judge.backend: openai")
            if not self.path:
                raise ValueError("eval.judge.path is required for backend local (a model folder that follows "
                                 "instructions), or set eval.judge.backend: openai with model and endpoints")
        else:
            if self.path:
                raise ValueError("eval.judge.path is for a local judge; backend openai sends to eval.judge.endpoints")
            if not (self.model and self.endpoints):
                raise ValueError("eval.judge.model and eval.judge.endpoints are required for backend openai "
                                 "(the name the endpoint serves, and its base URLs)")
        return self

    def as_teacher(self) -> TeacherSpec:
        """An HTTP judge as the teacher spec the HTTP backend sends with (chat API, no token ids)."""
        return TeacherSpec(backend="openai", id=f"judge:{self.model}",
                           **{f: getattr(self, f) for f in HTTPSettings.model_fields})


class LmEvalSpec(Section):
    """Also score every model with lm-evaluation-harness tasks (needs the lm_eval extra)."""

    tasks: list[str]  # task names, built in or defined by YAML files under include_path
    include_path: str | None = None  # folder of extra task YAML files
    limit: int | None = Field(None, ge=1)  # examples per task


class EvalSpec(Section):
    prompts: str  # JSONL held-out prompts; "answer" is the reference for exact match
    limit: int | None = Field(None, ge=1)
    # how an answer is checked: exact (equals "answer"), or a verifier installed under the
    # potstill.verifiers entry points, e.g. skillmix (any valid answer of the quickstart task)
    verifier: str = "exact"
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1)
    device: str | None = Field(None, pattern=DEVICE_PATTERN)  # every model and the judge; default: top-level
    judge: JudgeSpec | None = None  # judge win rate of each student against the teacher (a folder or an endpoint)
    lm_eval: LmEvalSpec | None = None


    @model_validator(mode="after")
    def _verifier_exists(self) -> EvalSpec:
        from potstill.verifiers import not_installed

        if why := not_installed(self.verifier):
            raise ValueError(why)
        return self


class Recipe(Section):
    name: str = "run"
    output_dir: str = "runs/run"  # relative to the current directory
    # where every stage runs unless its section names another: auto (CUDA, else MPS, else CPU),
    # cpu, mps, cuda or cuda:N
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    # what the student is for: research, internal, commercial or competing (with the teacher's
    # provider). train checks the teacher's terms against it (`potstill terms list`); a record-
    # keeping aid, not legal advice
    use: Literal["research", "internal", "commercial", "competing"] = "research"
    teacher: TeacherSpec
    prompts: PromptsSpec | None = None  # required, except for an imported teacher (its file holds the prompts)
    generation: GenerationSpec = GenerationSpec()
    student: StudentSpec
    train: TrainSpec = TrainSpec()
    baseline: BaselineSpec | None = None
    eval: EvalSpec

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.prompts is None and self.teacher.backend != "imported":
            raise ValueError("prompts is required (prompts.path: a JSONL file of prompts)")
        if self.train.objective == "kd" and self.train.teacher_signal != "cached" and self.teacher.path is None:
            raise ValueError(f"train.teacher_signal {self.train.teacher_signal} runs the teacher locally at every step, "
                             f"and teacher.path is not set: set teacher.path to its weights, or use "
                             f"train.teacher_signal=cached")
        if self.generation.stop and self.teacher.token_ids:
            raise ValueError("generation.stop with teacher.token_ids: the endpoint returns ids through the stop "
                             "string and no end-of-sequence token, which would teach the student to write the stop "
                             "string; use one or the other")
        return self

    def device_for(self, section: Literal["teacher", "train", "eval"]) -> str:
        """The device a section's stage runs on (generate: teacher), ``auto`` resolved."""
        own = getattr(self, section).device
        return resolve_device(own, f"{section}.device") if own else resolve_device(self.device)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    def teacher_id(self) -> str:
        if self.teacher.id:
            return self.teacher.id
        t = self.teacher
        return {"local": lambda: Path(t.path).name, "imported": lambda: Path(t.data).stem}.get(t.backend, lambda: t.model)()


class RecipeYAMLError(yaml.YAMLError):
    def __init__(self, line: int, problem: str):
        self.line, self.problem = line, problem


class RecipeLoader(yaml.SafeLoader):
    """Safe YAML that refuses aliases (``*name``: a 1.4 KB file of nested aliases expands to
    gigabytes once validated and hashed) and keys given twice in one mapping (the last one would
    win silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RecipeYAMLError(event.start_mark.line + 1, f"YAML aliases (*{event.anchor}) are not allowed in a "
                                                             f"recipe; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in first:
                raise RecipeYAMLError(key_node.start_mark.line + 1, f"key {key} given twice (first on line "
                                                                    f"{first[key]}): keep one")
            first.setdefault(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        for sub in getattr(field.annotation, "__args__", ()) + (field.annotation,):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                keys += _known_keys(sub, prefix + name + ".")
    return keys


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else None
        if node is None:
            raise PotstillError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=3`` -> ("train.epochs", 3); the value is read as YAML (null, numbers, lists)."""
    if "=" not in text:
        raise PotstillError(f"override {text!r} is not key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=RecipeLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


# the recipe's input paths and what each names: resolved against the recipe's folder, must exist
INPUTS = {"teacher.path": "teacher directory", "teacher.tokenizer": "teacher tokenizer directory",
          "teacher.data": "file of completions", "prompts.path": "prompt file", "student.path": "student directory",
          "student.tokenizer": "student tokenizer directory", "eval.prompts": "held-out prompt file",
          "eval.judge.path": "judge directory", "teacher.watermark.key_file": "watermark key file", "eval.lm_eval.include_path": "lm-eval task folder"}


def _relative_paths(data: dict, base: Path) -> None:
    """Resolve input paths against the recipe's folder (absolute paths are kept)."""
    for where, key in (dotted.rsplit(".", 1) for dotted in INPUTS):
        node = data
        for part in where.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            node[key] = str((base / value).resolve())


def _explain(error: ValidationError, source: str) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, _known_keys(Recipe), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            lines.append(f"{source}: unknown key {loc}{hint}")
        elif err["type"] == "missing":
            lines.append(f"{source}: {loc} is required")
        else:
            secret = loc.endswith("api_key_env")  # not a variable's name: maybe the key itself, never echoed
            shown = "input" in err and not isinstance(err["input"], dict) and not secret
            got = f" (got {err['input']!r})" if shown else ""
            lines.append(f"{source}: {loc or 'recipe'}: {msg}{got}")
    return "\n".join(lines)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every user mistake is a PotstillError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise PotstillError(f"recipe {path} not found; give the path of a YAML recipe, e.g. examples/quickstart/recipe.yaml")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=RecipeLoader)
    except RecipeYAMLError as e:
        raise PotstillError(f"{path} line {e.line}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PotstillError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise PotstillError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise PotstillError(f"{path}: a recipe is a YAML mapping of sections (teacher, prompts, student, ...)")
    for text in overrides:
        key, value = parse_override(text)
        if key not in _known_keys(Recipe) and not key.startswith("student.config."):
            close = difflib.get_close_matches(key, _known_keys(Recipe), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise PotstillError(f"override {key}: unknown key{hint}")
        _set_dotted(data, key, value)
    _relative_paths(data, path.resolve().parent)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise PotstillError(_explain(e, str(path))) from None
    _check_paths(recipe, str(path))
    if recipe.student.config is not None:
        from potstill.student_config import check_student_config

        check_student_config(recipe.student.config, str(path))
    return recipe


def _check_paths(recipe: Recipe, source: str) -> None:
    """Inputs exist and output_dir can be written, before any stage reads or writes: one line naming the key."""
    for dotted, what in INPUTS.items():
        node = recipe
        for part in dotted.split("."):
            node = getattr(node, part, None)
        if isinstance(node, str) and node and not Path(node).exists():
            raise PotstillError(f"{source}: {dotted}: {what} {node} not found (relative paths start at the "
                                f"recipe's folder)")
    out = Path(recipe.output_dir)
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PotstillError(f"{source}: output_dir: {existing} is a file, not a folder; choose another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PotstillError(f"{source}: output_dir: {existing} is not writable; choose another output_dir")


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.model_dump(), sort_keys=False), encoding="utf-8")

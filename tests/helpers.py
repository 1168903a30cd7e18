"""What several test modules share: the repository's paths, the quickstart cut to seconds, ledger
shortcuts, a served app on loopback, a tiny random teacher and a run folder for the report.

Importable from any test folder (pyproject's ``pythonpath = ["tests"]``): ``from helpers import ...``.
Fixtures and hooks stay in conftest.py."""

import json
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
TEACHER = QUICKSTART / "teacher"


def tiny_overrides(out: Path, n_prompts: int = 64, n_eval: int = 48) -> list[str]:
    """The quickstart recipe cut down to seconds: few prompts, one short epoch."""
    return [f"output_dir={out}", f"prompts.limit={n_prompts}", f"eval.limit={n_eval}", "train.epochs=1",
            "train.batch_size=16", "train.warmup_steps=0", "generation.batch_size=64", "train.log_every=1"]


def plan(ledger, teacher_key: str, prompts: list, params: dict, samples_per_prompt: int = 1, shard=None) -> list:
    """Record the requests for ``prompts`` (idempotent) and return those not yet done, as generate does."""
    from potstill.ledger import requests_for

    return ledger.add_requests(teacher_key, requests_for(teacher_key, prompts, params, samples_per_prompt, shard),
                               params)


def done_hashes(ledger) -> set[str]:
    return {r[0] for r in ledger.db.execute("SELECT request_hash FROM completions")}


# a served app on loopback (serve, audit)

def running(app):
    import threading
    import time

    import uvicorn

    from potstill.serve import bind

    sock = bind("127.0.0.1", 0)
    # log_config=None: uvicorn would otherwise re-run logging.dictConfig, which closes every handler
    # in the process (absl's, imported by rouge_score, then closes pytest's captured stderr)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield app, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    uv.should_exit = True
    thread.join(10)


# a tiny random teacher (teachers, serve)

TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=16),
}


def tiny_teacher(folder: Path, model_type: str, padding_rows: int = 0, generation: dict | None = None) -> Path:
    """A random model of ``model_type`` with the quickstart tokenizer, ``padding_rows`` logit rows
    past the tokenizer (as Qwen pads its vocabulary), and ``generation`` as its generation_config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok) + padding_rows, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                  tie_word_embeddings=False, **TINY[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if padding_rows:  # padding rows with twice the logit of a real token: they would win if sampled
        with torch.no_grad():
            head = model.get_output_embeddings().weight  # (V, H)
            head[len(tok):] = 2.0 * head[torch.arange(padding_rows) % len(tok)]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    gen = folder / "generation_config.json"
    if generation is None:
        gen.unlink(missing_ok=True)
    else:
        gen.write_text(json.dumps({"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **generation}))
    return folder


# a run folder for the report, and its page parsed (report, audit, terms, generate)

HOSTILE_TEACHER = {"id": "evil</td><script>alert(1)</script>\n# Injected heading", "backend": "local",
                   "revision": "main*bold*", "terms_family": "<img src=x onerror=alert(1)>",
                   "terms_url": "javascript:alert(1)//<b>x</b>"}


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Tags:
    p = Tags()
    p.feed(page)
    return p


def student_info(teacher: dict) -> dict:
    return {"name": "student", "objective": "kd", "parameters": 1000, "examples": 8, "steps": 2,
            "ledger_sha256": "ab" * 32, "recipe_sha256": "cd" * 32, "license": "apache-2.0", "student": {},
            "train": {"objective": "kd", "loss": "forward_kl", "teacher_signal": "cached", "temperature": 1.0,
                      "kd_ratio": 1.0, "batch_size": 4, "lr": 0.001, "seed": 0},
            "teachers": [teacher]}


def make_run(path, skill: str):
    """A run folder as eval and train leave it, cut to what the report reads."""
    model = {"accuracy": 0.5, "accuracy_ci95": [0.1, 0.9], "accuracy_by_category": {skill: 0.5, "add": 1.0},
             "rouge_l": 0.5, "agreement": 0.5, "kl_per_token": 0.1, "top1_agreement": 0.9, "parameters": 1000,
             "completion_lengths": [1, 2, 3], "samples": [{"prompt": "<b>p</b>", "answer": "<i>a</i>"}]}
    (path / "logs").mkdir(parents=True)
    (path / "student").mkdir()
    (path / "eval.json").write_text(json.dumps({"models": {"teacher": model, "student": model},
                                                "prompts": {"n": 2}, "provenance": {"note": "</pre><b>x</b>"}}))
    (path / "logs" / "student.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    (path / "student" / "potstill.json").write_text(json.dumps(student_info(HOSTILE_TEACHER)))
    return path


def free_port() -> int:
    """A loopback port free now: bound, then let go (never listening, so a connection to it is refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

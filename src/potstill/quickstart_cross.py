"""`potstill quickstart --student-tokenizer bpe`: the quickstart across tokenizers, as with an API teacher.

The student reads text with its own tokenizer, a byte-level BPE of ``BPE_TOKENS`` tokens trained
here on the recipe's training prompts (seconds), and the teacher is the bundled one behind
``potstill serve`` on a loopback port, asked as OpenAI is: each generated token's bytes and
logprob and its 20 likeliest alternatives as (bytes, logprob), no token ids
(``teacher.backend=openai``, ``teacher.token_ids=false``). The KD student learns from that top-20
mapped onto its own tokens (``potstill.align``, once per ledger row before the first step); the
SFT baseline, with the same tokenizer, from the text alone. Everything else is the quickstart's
recipe. The teacher's weights stay named (``teacher.path``), so eval scores it as the quickstart
does; only generate asks the server.

An HTTP teacher's requests are keyed by its endpoint, port included, so the run directory
remembers the port (``served-teacher.json``) and a rerun serves on it again and resends nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from potstill.errors import PotstillError

BPE_TOKENS = 512  # 256 bytes + 4 special tokens + 252 merges: digit pairs, common letter pairs, the skills' words
SPECIALS = ["<|end|>", "<pad>", "<|user|>", "<|assistant|>"]  # the bundled teacher's: its chat template reads them
MODEL_NAME = "quickstart-teacher"  # the model id the server answers to
HOST = "127.0.0.1"


def train_bpe(texts: list[str], teacher_dir: Path, out: Path, vocab_size: int = BPE_TOKENS) -> Path:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts``, with the teacher's special
    tokens and chat template, saved as a Hugging Face tokenizer folder ``out``. Any byte can be
    spelled (the 256 bytes are in the alphabet), so every teacher answer maps onto it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<pad>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = (teacher_dir / "chat_template.jinja").read_text()
    tok.save_pretrained(out)
    return out


def student_tokenizer(recipe, out: Path) -> Path:
    """``out``'s BPE, trained on the recipe's training prompts unless it is there already (a rerun
    keeps it, so the students it trained stay current)."""
    from potstill.prompts import load_prompts

    if (out / "tokenizer.json").is_file():
        return out
    prompts = load_prompts(recipe.prompts.path, recipe.prompts.limit)
    texts = [content for p in prompts for _, content in p.messages]
    return train_bpe(texts, Path(recipe.teacher.path), out)


def free(port: int) -> bool:
    """Whether a server could listen on HOST:port now. SO_REUSEADDR, as uvicorn binds: connections the
    earlier server closed linger in TIME_WAIT for a minute and do not stop it listening again."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port(record: Path) -> int:
    """The port of the run's earlier server when it is free (its answers are keyed by it), else any free one."""
    if record.is_file() and free(port := json.loads(record.read_text())["port"]):
        return port
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    if record.is_file():
        print(f"quickstart: port {json.loads(record.read_text())['port']} of the earlier server is taken; serving on "
              f"{port}, so the teacher is asked again (an HTTP teacher's answers are keyed by its endpoint)")
    record.write_text(json.dumps({"port": port}) + "\n")
    return port


@contextmanager
def served_teacher(teacher_dir: Path, port: int, log: Path, timeout: float = 120.0) -> Iterator[str]:
    """``potstill serve TEACHER`` on HOST:port in a process of its own (one torch thread: the client
    and two students share the machine's cores); yields its base URL once it answers /health, and
    stops it however the block ends."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "potstill.cli", "serve", str(teacher_dir), "--host", HOST, "--port", str(port),
           "--model-name", MODEL_NAME, "--device", "cpu", "--max-batch-size", "256", "--batch-wait-ms", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    try:
        url = f"http://{HOST}:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise PotstillError(f"potstill serve stopped before answering (exit {proc.returncode}); its output is in "
                                    f"{log}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PotstillError(f"potstill serve did not answer on {url} within {timeout:.0f} s; its output is in {log}")
            time.sleep(0.2)
        print(f"quickstart: the teacher is served by `potstill serve` at {url}/v1 (pid {proc.pid}; log {log})")
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def overrides(url: str, tokenizer: Path) -> list[str]:
    """The quickstart recipe's changes: the served teacher asked as OpenAI is, the student's own tokenizer."""
    return ["teacher.backend=openai", f"teacher.model={MODEL_NAME}", f"teacher.endpoints=[{url}]",
            "teacher.token_ids=false", "teacher.concurrency=256", "generation.top_logprobs=20",
            f"student.tokenizer={tokenizer}"]


def run_cross(recipe_path: Path, out: Path, user_overrides: list[str], generated) -> tuple[object, dict]:
    """Train the BPE, serve the teacher, and run every stage (``pipeline.run_all``) with the student's
    own tokenizer; the recipe and eval's report. ``user_overrides`` come last, so they win."""
    from potstill.pipeline import run_all
    from potstill.recipe import load_recipe

    missing = [name for name in ("fastapi", "uvicorn", "openai", "httpx") if importlib.util.find_spec(name) is None]
    if missing:
        raise PotstillError(f"quickstart --student-tokenizer bpe serves the teacher and asks it over HTTP, which needs "
                            f"{', '.join(missing)}: pip install 'potstill[http,serve]'")
    base = load_recipe(recipe_path, [f"output_dir={out}", *user_overrides])
    run = base.run_dir
    run.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = student_tokenizer(base, run / "student-tokenizer")
    print(f"quickstart: the student's tokenizer, a byte-level BPE of {BPE_TOKENS} tokens trained on the training "
          f"prompts: {tokenizer} ({time.perf_counter() - start:.1f} s)")
    port = pick_port(run / "served-teacher.json")
    with served_teacher(Path(base.teacher.path), port, run / "logs" / "serve.log") as url:
        recipe = load_recipe(recipe_path, [f"output_dir={out}", *overrides(url, tokenizer.resolve()), *user_overrides])
        report = run_all(recipe, generated=generated)
    return recipe, report

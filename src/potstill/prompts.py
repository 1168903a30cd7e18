"""Prompt sets: JSONL files, one prompt per line, normalised to chat messages.

Each line is a JSON object with either ``"prompt"`` (a string, sent as one user message) or
``"messages"`` (a list of {"role", "content"}). Every other key (id, skill, answer, ...) is kept
as metadata. Lines are read with a byte cap, so a hostile file cannot exhaust memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from potstill.errors import PotstillError

MAX_LINE_BYTES = 1 << 20  # 1 MiB: longer lines are refused, not read into memory whole
ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Prompt:
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...)
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    source: str = field(default="", compare=False)  # "file:line"

    @property
    def chat(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def text(self) -> str:
        """The last user message: what a one-turn task prompt is."""
        return [c for r, c in self.messages if r == "user"][-1]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.messages).encode()).hexdigest()


def parse_prompt(obj: object, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise PotstillError(f"{where}: each line must be a JSON object with \"prompt\" or \"messages\"")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs
        ):
            raise PotstillError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": system|user|assistant, \"content\": str}}")
        messages = tuple((m["role"], m["content"]) for m in msgs)
    elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        messages = (("user", obj["prompt"]),)
    else:
        raise PotstillError(f"{where}: needs a non-empty string \"prompt\" or a \"messages\" list")
    for _, content in messages:
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows "\ud800"; tokenizers and SQLite do not
            raise PotstillError(f"{where}: the text holds a lone surrogate escape (\\ud800-\\udfff without its "
                                f"pair), which is not Unicode; fix or remove that escape") from None
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    return Prompt(messages, meta, where)


def jsonl_objects(path: Path, max_line_bytes: int = MAX_LINE_BYTES, advice: str = "split or shorten it"
                  ) -> Iterator[tuple[str, object]]:
    """("file:line", parsed JSON) for each non-blank line. A line is read at most ``max_line_bytes``
    at a time, so a longer one is refused (with ``advice``) without being held whole in memory."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), start=1):
            where = f"{path}:{lineno}"
            if len(raw) > max_line_bytes:
                raise PotstillError(f"{where}: line longer than {max_line_bytes >> 20} MiB; {advice}")
            if not raw.strip():
                continue
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise PotstillError(f"{where}: not UTF-8") from None
            except json.JSONDecodeError as e:
                raise PotstillError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def load_prompts(path: str | Path, limit: int | None = None, need_user: bool = False) -> list[Prompt]:
    """Read a prompt file; duplicates (same messages) are kept once, in first-seen order.
    ``need_user``: every prompt must have a user message (eval checks answers to it: ``Prompt.text``)."""
    path = Path(path)
    if not path.is_file():
        raise PotstillError(f"prompt file {path} not found")
    prompts: list[Prompt] = []
    seen: set[tuple] = set()
    for where, obj in jsonl_objects(path):
        prompt = parse_prompt(obj, where)
        if need_user and not any(role == "user" for role, _ in prompt.messages):
            raise PotstillError(f"{where}: no user message; a held-out prompt needs the question as a user turn")
        if prompt.messages not in seen:
            seen.add(prompt.messages)
            prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise PotstillError(f"{path}: no prompts in the file")
    return prompts

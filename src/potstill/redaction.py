"""API keys: read from the environment variable a recipe names, and kept out of every message,
log, ledger and report (``redact``)."""

from __future__ import annotations

import os
import re

from potstill.errors import PotstillError


def api_key(spec, field: str = "teacher.api_key_env") -> str:
    """The key from the environment variable the recipe names (at ``field``); local servers need none."""
    if spec.api_key_env is None:
        return "none"
    key = os.environ.get(spec.api_key_env)
    if not key:
        raise PotstillError(f"{field} names {spec.api_key_env}, which is not set: export it first")
    return key


KEY_ECHO = 8  # characters: an echo sharing this many consecutive characters with the key is redacted
KEYISH = re.compile(r"[\w\-*.~+/=]")  # what a key, or a masked echo of one, is made of


def redact(text: str, key: str | None = None) -> str:
    """``text`` on one line without the API key or any echo of it: a run of key-like characters
    that shares ``KEY_ECHO`` consecutive characters with the key (a prefix, a suffix, a masked
    ``s4CANARY****dEzz``: error bodies such as OpenAI's 401 echo part of the key, whatever its
    shape), nor anything shaped like an OpenAI key (sk-...)."""
    text = " ".join(text.split())
    if key and key != "none":
        text = text.replace(key, "***")
        grams = {key[i:i + KEY_ECHO] for i in range(len(key) - KEY_ECHO + 1)}
        spans, i = [], 0
        while i <= len(text) - KEY_ECHO:
            if text[i:i + KEY_ECHO] not in grams:
                i += 1
                continue
            start, end = i, i + KEY_ECHO
            while start > 0 and KEYISH.match(text[start - 1]):
                start -= 1
            while end < len(text) and (KEYISH.match(text[end]) or text[end - KEY_ECHO + 1:end + 1] in grams):
                end += 1
            spans.append((start, end))
            i = end
        for start, end in reversed(spans):
            text = text[:start] + "***" + text[end:]
    return re.sub(r"\bsk-[\w*\-]{6,}", "sk-***", text)

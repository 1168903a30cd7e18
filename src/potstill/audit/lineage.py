"""Lineage without a watermark: does suspect S agree with candidate teacher T beyond what
unrelated reference models agree with T? (In the spirit of Model Provenance Testing, Nikolic et
al. 2025, arXiv:2502.00706.)

Every model answers the same probe prompts greedily. Per prompt, a model's **match rate** is the
share of token positions at which its answer has T's token (over the longer of the two answers,
tokenized with one tokenizer, T's by default). For each reference R an exact one-sided sign test
over prompts asks whether S matches T more often than R does (prompts where they tie are dropped).
S is flagged only if it beats *every* reference: the p-value is the largest of the per-reference
p-values (an intersection-union test, valid without any correction), so it is small only when no
reference explains S's agreement with T.

Under the null S is just one more model like the references (for each prompt, S and R are
exchangeable with respect to T), and the sign test's p-value is then exact. The references must
be truly unrelated to T (not distilled from it, not sharing its training data beyond what S
could); choose them as an expert would choose controls.

Identity probes ("which model are you?") are reported as counts of answers naming T, for S and
every reference: answers learned from web data confound them, so they carry no p-value.
"""

from __future__ import annotations

from pathlib import Path

from potstill.audit.stats import sign_test
from potstill.errors import PotstillError

IDENTITY_PROBES = [
    "Which model are you?",
    "What is your name?",
    "Who created you?",
    "Which company trained you?",
    "Are you ChatGPT, Claude, Gemini, Llama, Qwen or DeepSeek?",
    "Tell me about yourself in one sentence.",
]


class LocalModel:
    """A model folder answering greedily, with its own tokenizer and chat template."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from potstill.teachers.local import load_model_dir

        self.name = str(path)
        self.model, self.tokenizer = load_model_dir(path, "model", device=device)

    def answer(self, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
        from potstill.teachers.local import generate_ids, prompt_ids

        params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "top_logprobs": 0}
        rows = [prompt_ids(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        out = []
        for i in range(0, len(rows), batch_size):
            out += generate_ids(self.model, self.tokenizer, rows[i:i + batch_size], params, 0,
                                [""] * len(rows[i:i + batch_size]))
        return [c.text for c in out]


class EndpointModel:
    """A model behind an OpenAI-compatible endpoint (chat completions, temperature 0)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0):
        from openai import OpenAI

        self.name = f"{model}@{base_url}"
        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=3)

    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from openai import APIConnectionError, APIStatusError

        out = []
        for p in prompts:
            try:
                r = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": p}],
                                                        temperature=0.0, max_tokens=max_new_tokens)
            except APIStatusError as e:
                raise PotstillError(f"{self.name} refused the probe {p[:40]!r}: HTTP {e.status_code}: "
                                    f"{getattr(e, 'message', e)}") from None
            except APIConnectionError:
                raise PotstillError(f"{self.name} could not be reached: is the endpoint up?") from None
            out.append(r.choices[0].message.content or "")
        return out


def match_rates(teacher: list[str], other: list[str], tokenize) -> list[float]:
    """Per prompt: positions where ``other``'s tokens equal ``teacher``'s, over the longer answer."""
    rates = []
    for t, o in zip(teacher, other):
        a, b = tokenize(t), tokenize(o)
        longest = max(len(a), len(b))
        rates.append(sum(x == y for x, y in zip(a, b)) / longest if longest else 1.0)
    return rates


def lineage_test(teacher: list[str], suspect: list[str], references: dict[str, list[str]], tokenize) -> dict:
    """The sign tests of S against each reference, and their intersection-union p-value."""
    if not references:
        raise ValueError("the lineage test needs at least one reference model")
    s = match_rates(teacher, suspect, tokenize)
    rows = []
    for name, answers in references.items():
        r = match_rates(teacher, answers, tokenize)
        wins = sum(x > y for x, y in zip(s, r))
        losses = sum(x < y for x, y in zip(s, r))
        rows.append({"name": name, "match": sum(r) / len(r), "wins": wins, "losses": losses,
                     "p_value": sign_test(wins, losses)})
    return {"test": "lineage", "prompts": len(teacher), "suspect_match": sum(s) / len(s),
            "references": rows, "p_value": max(row["p_value"] for row in rows)}


def identity_counts(answers: dict[str, list[str]], names: list[str]) -> dict[str, int]:
    """How many identity answers of each model name one of ``names`` (case-insensitive)."""
    names = [n.lower() for n in names if n]
    return {model: sum(any(n in a.lower() for n in names) for a in texts) for model, texts in answers.items()}

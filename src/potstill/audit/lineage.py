"""Lineage without a watermark: does suspect S agree with candidate teacher T beyond what
unrelated reference models agree with T? (In the spirit of Model Provenance Testing, Nikolic et
al. 2025, arXiv:2502.00706.)

T answers the probe prompts greedily. Every other model gets one number per prompt, by one of three
statistics:

- **likelihood** (open weights): the log-probability the model gives T's answer after the prompt
  (teacher-forced, with the model's own tokenizer and chat template). A student distilled from T
  learned T's choices where many answers are right (which permutation, which phrasing), so it
  gives T's answers more probability than a model that learned the task elsewhere does.
- **kl** (open weights, the teacher's too, one tokenizer for all): minus the mean KL divergence
  from T's next-token distribution to the model's, over the positions of T's answer
  (teacher-forced). What forward-KL logit distillation minimises, so the most direct trace of it.
- **match** (also for endpoints): the model answers greedily too; its score is the share of token
  positions at which its answer has T's token (over the longer of the two answers, tokenized with
  one tokenizer, T's by default).

For each reference R an exact one-sided sign test over prompts asks whether S scores higher than
R more often than lower (ties are dropped). S is flagged only if it beats *every* reference: the
p-value is the largest of the per-reference p-values (an intersection-union test, valid without
any correction), so it is small only when no reference explains S's agreement with T.

Under the null S is just one more model like the references (for each prompt, S and R are
exchangeable with respect to T), and the sign test's p-value is then exact. The references must
be truly unrelated to T (not distilled from it, not sharing its training data beyond what S
could), and as good at the task as S: where agreeing with T is being right, a better model agrees
more. Probes where T's answer is one of many right ones carry the lineage evidence.

Identity probes ("which model are you?") are reported as counts of answers naming T, for S and
every reference: answers learned from web data confound them, so they carry no p-value.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

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
        from potstill.hf import load_model_dir

        self.name = str(path)
        self.model, self.tokenizer = load_model_dir(path, "model", device=device)

    def answer(self, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
        from potstill.hf import generate_ids, prompt_ids

        params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "top_logprobs": 0}
        rows = [prompt_ids(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        out = []
        for i in range(0, len(rows), batch_size):
            out += generate_ids(self.model, self.tokenizer, rows[i:i + batch_size], params, 0,
                                [""] * len(rows[i:i + batch_size]))
        return [c.text for c in out]

    def answer_logprobs(self, prompts: list[str], answers: list[str], batch_size: int = 16) -> list[float]:
        """Per prompt: the log-probability (nats) this model gives ``answers[i]`` after ``prompts[i]``,
        teacher-forced, with its own tokenizer and chat template (0 for an empty answer)."""
        tok = self.tokenizer
        ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
        return [float(logp.gather(1, torch.tensor(t, device=logp.device)[:, None]).sum()) if t else 0.0
                for t, logp in zip(ids, self.answer_views(prompts, ids, batch_size))]

    @torch.no_grad()
    def answer_views(self, prompts: list[str], answer_ids: list[list[int]], batch_size: int = 16):
        """Per prompt, in order: this model's next-token log-probabilities at each of the answer's
        ids, (len(ids), vocabulary) in float32, teacher-forced after the prompt in its own chat
        template. Rows are left-padded, so every answer ends at the last position and only the
        last (longest answer + 1) positions' logits are computed, not (batch, length, vocabulary).
        A padded vocabulary's extra rows (no token's) are left out."""
        import inspect

        from potstill.hf import prompt_ids

        vocab = len(self.tokenizer)
        accepts = inspect.signature(self.model.forward).parameters
        for i in range(0, len(prompts), batch_size):
            heads = [prompt_ids(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts[i:i + batch_size]]
            tails = answer_ids[i:i + batch_size]
            width = max(len(h) + len(t) for h, t in zip(heads, tails))
            keep = max(map(len, tails)) + 1
            ids = torch.zeros((len(heads), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (h, t) in enumerate(zip(heads, tails)):
                ids[r, width - len(h) - len(t):], mask[r, width - len(h) - len(t):] = torch.tensor(h + t), 1
            extra = {}
            if "position_ids" in accepts:  # left padding: positions count real tokens only (ALiBi models read the mask)
                extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(self.model.device)
            if "logits_to_keep" in accepts:
                extra["logits_to_keep"] = keep
            logits = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                **extra).logits[:, -keep:]
            for r, t in enumerate(tails):  # window position j predicts j + 1; the answer is the last len(t)
                yield logits[r, keep - len(t) - 1:keep - 1, :vocab].float().log_softmax(-1)


def kl_scores(teacher: LocalModel, other: LocalModel, prompts: list[str], answers: list[str],
              batch_size: int = 16) -> list[float]:
    """Per prompt: minus the mean KL(teacher || other) over the positions of the teacher's answer,
    both teacher-forced on the same ids, the teacher's tokenization of it (higher: closer to the
    teacher; 0 for an empty answer). Both must have the same vocabulary; each reads the prompt in
    its own chat template."""
    ids = [teacher.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    out = []
    views = zip(teacher.answer_views(prompts, ids, batch_size), other.answer_views(prompts, ids, batch_size))
    for t_ids, (t, o) in zip(ids, views):
        out.append(-float((t.exp() * (t - o)).sum(-1).mean()) if t_ids else 0.0)
    return out


ENDPOINT_TIMEOUT = 120.0  # seconds for one probe's whole answer (--timeout): teacher.timeout's default


class EndpointModel:
    """A model behind an OpenAI-compatible endpoint (chat completions), asked one probe at a time.

    A probe is one attempt with one deadline, ``timeout`` seconds for the whole answer (connect,
    headers and body), as ``teacher.timeout`` bounds a teacher's: the client's own timeout is per
    read, which a body trickled a byte at a time never trips. Nothing retries it behind the scenes
    (the client's retries are off): a probe that fails stops the audit with one line. Whatever the
    endpoint sends back is checked: a refusal, an unreachable host, a deadline passed or a body
    that is not a chat completion is one line (with the API key and any echo of it redacted),
    never a traceback. ``close`` when done."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = ENDPOINT_TIMEOUT):
        from potstill.teachers.openai.wire import make_client

        self.name = f"{model}@{base_url}"
        self.model, self.key, self.timeout = model, api_key, timeout
        self.client = make_client(base_url, api_key or "none", timeout)  # async, its own retries off
        self.loop = asyncio.new_event_loop()  # one for every probe: the client's connections stay open between them

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.client.close())
            self.loop.close()

    async def _create(self, messages: list[dict], temperature: float, max_tokens: int):
        async with asyncio.timeout(self.timeout):
            return await self.client.chat.completions.create(model=self.model, messages=messages,
                                                             temperature=temperature, max_tokens=max_tokens)

    def chat(self, messages: list[dict], temperature: float, max_tokens: int) -> str:
        """The text of the endpoint's answer to ``messages``."""
        from openai import APIConnectionError, APIError, APIStatusError, APITimeoutError

        from potstill.redaction import redact

        probe = repr(str(messages[-1].get("content", ""))[:40])
        try:
            r = self.loop.run_until_complete(self._create(messages, temperature, max_tokens))
        except (TimeoutError, APITimeoutError):  # the deadline, or the client's connect timer (half of it)
            raise PotstillError(f"{self.name} did not answer the probe {probe} within --timeout {self.timeout:g} s "
                                f"(one deadline for the whole answer: connect, headers and body): is it overloaded "
                                f"or down? Or raise --timeout") from None
        except APIStatusError as e:
            raise PotstillError(f"{self.name} refused the probe {probe}: HTTP {e.status_code}: "
                                f"{redact(str(getattr(e, 'message', e)), self.key)}") from None
        except APIConnectionError:
            raise PotstillError(f"{self.name} could not be reached: is the endpoint up?") from None
        except (APIError, ValueError) as e:  # a body that is not JSON, or not a completion's
            raise PotstillError(f"{self.name} answered the probe {probe} with a body that is not a chat completion "
                                f"({redact(type(e).__name__ + ': ' + str(e), self.key)[:200]})") from None
        choices = getattr(r, "choices", None)
        message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
        content = getattr(message, "content", None)
        if message is None or not isinstance(content, (str, type(None))):
            raise PotstillError(f"{self.name} answered the probe {probe} without a choice holding a message: not "
                                f"an OpenAI-compatible chat completion")
        return content or ""

    def answer(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers, one request per prompt."""
        return [self.chat([{"role": "user", "content": p}], 0.0, max_new_tokens) for p in prompts]


def match_rates(teacher: list[str], other: list[str], tokenize) -> list[float]:
    """Per prompt: positions where ``other``'s tokens equal ``teacher``'s, over the longer answer."""
    rates = []
    for t, o in zip(teacher, other):
        a, b = tokenize(t), tokenize(o)
        longest = max(len(a), len(b))
        rates.append(sum(x == y for x, y in zip(a, b)) / longest if longest else 1.0)
    return rates


def lineage_test(suspect: list[float], references: dict[str, list[float]], statistic: str = "match") -> dict:
    """The sign tests of S's per-prompt scores against each reference's (higher: closer to the
    teacher), and their intersection-union p-value."""
    if not references:
        raise ValueError("the lineage test needs at least one reference model")
    rows = []
    for name, r in references.items():
        wins = sum(x > y for x, y in zip(suspect, r))
        losses = sum(x < y for x, y in zip(suspect, r))
        rows.append({"name": name, "score": sum(r) / len(r), "wins": wins, "losses": losses,
                     "p_value": sign_test(wins, losses)})
    return {"test": "lineage", "statistic": statistic, "prompts": len(suspect),
            "suspect_score": sum(suspect) / len(suspect), "references": rows,
            "p_value": max(row["p_value"] for row in rows)}


def identity_counts(answers: dict[str, list[str]], names: list[str]) -> dict[str, int]:
    """How many identity answers of each model name one of ``names`` (case-insensitive)."""
    names = [n.lower() for n in names if n]
    return {model: sum(any(n in a.lower() for n in names) for a in texts) for model, texts in answers.items()}

"""Radioactivity (Sander et al., NeurIPS 2024, arXiv:2402.14904): was suspect S trained on text
watermarked with key K?

A student trained on watermarked text keeps a residual preference for the green tokens of the
keys it saw. Both modes collect (context, token) pairs *of the suspect's own choosing* and test
them against every key at once, each distinct pair once (:mod:`potstill.audit.stats`):

- **reading** (open weights): S reads texts you choose; at each position its most likely next
  token is paired with the text's previous ``context`` ids. Pairs that occur in the texts
  themselves are dropped: a model that merely predicts the text's own next token would otherwise
  inherit the text's green bias (which only makes the test conservative on watermarked texts).
- **sampling** (weights or only an OpenAI-compatible endpoint): S answers prompts; the pairs of
  its answers (the prompt's last ids give the first context) are scored.

Under the null (S never saw text watermarked with K) S's choices do not depend on K, so each key
gives an exact binomial p-value; several keys (one per dataset release) are Holm-corrected.
"""

from __future__ import annotations

import torch

from potstill.audit.stats import holm, score_pairs
from potstill.audit.watermark import Watermark, scored_pairs


@torch.no_grad()
def reading_pairs(model, sequences: list[list[int]], context: int, batch_size: int = 32,
                  skip: set[int] = frozenset(), vocab: int | None = None) -> list[tuple[tuple[int, ...], int]]:
    """The suspect's argmax next token after every prefix of ``sequences`` that has ``context`` ids,
    as (context window, predicted id) pairs, minus the pairs the texts contain. ``vocab``: ids the
    tokenizer knows (a padded vocabulary's extra rows are never predicted)."""
    own = set(scored_pairs(sequences, context))
    pairs = []
    for i in range(0, len(sequences), batch_size):
        rows = sequences[i:i + batch_size]
        width = max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(rows):  # right-padded: position t predicts t + 1 in every row
            ids[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits  # (B, T, V)
        predicted = logits[..., :vocab].argmax(-1).cpu().tolist()  # (B, T)
        for r, seq in enumerate(rows):
            for t in range(context - 1, len(seq)):
                pair = (tuple(seq[t + 1 - context:t + 1]), predicted[r][t])
                if pair[1] not in skip and pair not in own:
                    pairs.append(pair)
    return pairs


def sampling_pairs(prompts: list[list[int]], answers: list[list[int]], context: int,
                   skip: set[int] = frozenset()) -> list[tuple[tuple[int, ...], int]]:
    """(context window, token) pairs of the suspect's ``answers``, each after its prompt's ids."""
    return scored_pairs([p + a for p, a in zip(prompts, answers)], context, starts=[len(p) for p in prompts],
                        skip=skip)


def score_keys(pairs, watermarks: list[Watermark], mode: str | None = None) -> dict:
    """One exact p-value per key, Holm-adjusted across the keys; the pairs are shared by all keys.
    ``mode``: how a suspect's pairs were collected (reading, sampling); None for text."""
    contexts = {w.context for w in watermarks}
    if len(contexts) != 1:
        raise ValueError("keys tested together need one context width (the pairs depend on it)")
    scores = [score_pairs(pairs, w.is_green, w.gamma) for w in watermarks]
    adjusted = holm([s.p_value for s in scores])
    return {
        "test": "radioactivity" if mode else "watermark",
        **({"mode": mode} if mode else {}),
        "keys": [{**w.describe(), **s.as_dict(), "p_holm": a} for w, s, a in zip(watermarks, scores, adjusted)],
    }


def as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def local_samples(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 1.0,
                  seed: int = 0, batch_size: int = 64) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) of a local suspect answering ``prompts`` (texts as user turns, or messages)."""
    from potstill.teachers.local import generate_ids, prompt_ids

    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": 1.0, "top_logprobs": 0}
    rows = [prompt_ids(tokenizer, as_messages(p)) for p in prompts]
    answers = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        answers += [c.token_ids for c in generate_ids(model, tokenizer, batch, params, seed + i, [""] * len(batch))]
    return rows, answers


def endpoint_samples(base_url: str, model: str, tokenizer, prompts: list, max_new_tokens: int,
                     temperature: float = 1.0, api_key: str | None = None,
                     timeout: float = 120.0) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) of a suspect behind an OpenAI-compatible endpoint: its answers' text
    is tokenized with ``tokenizer``, the one the keys' green lists are over (the teacher's)."""
    from openai import OpenAI

    from potstill.teachers.local import prompt_ids

    client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=3)
    rows, answers = [], []
    for p in prompts:
        messages = as_messages(p)
        r = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                           max_tokens=max_new_tokens)
        rows.append(prompt_ids(tokenizer, messages))
        answers.append(tokenizer(r.choices[0].message.content or "", add_special_tokens=False)["input_ids"])
    return rows, answers

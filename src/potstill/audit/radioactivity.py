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

With the suspect's weights, either mode can score only the tokens S chose from a distribution of
at least ``min_entropy`` nats: where S is confident the watermark could not have moved its
teacher either, so those tokens are trials without signal (entropy filtering at detection, as in
Fernandez et al. 2025, arXiv:2512.16904, here on the suspect's own distribution).

Under the null (S never saw text watermarked with K) S's choices, and its entropies, do not
depend on K, so each key gives an exact binomial p-value; several keys (one per dataset release)
are Holm-corrected.
"""

from __future__ import annotations

import torch

from potstill.audit.stats import binomial_test, holm
from potstill.watermark import Watermark, scored_pairs


@torch.no_grad()
def next_token_view(model, sequences: list[list[int]], batch_size: int = 32,
                    vocab: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """The suspect's view of each sequence: after each prefix ``seq[:t + 1]``, its most likely next
    id and the entropy (nats) of its next-token distribution, both as lists of len(seq).
    ``vocab``: ids the tokenizer knows (a padded vocabulary's extra rows are left out)."""
    argmax, entropy = [], []
    for i in range(0, len(sequences), batch_size):
        rows = sequences[i:i + batch_size]
        width = max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(rows):  # right-padded: position t predicts t + 1 in every row
            ids[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits  # (B, T, V)
        for r, seq in enumerate(rows):  # a row at a time: a float32 copy of (T, V), never of (B, T, V)
            logp = logits[r, :len(seq), :vocab].float().log_softmax(-1)
            argmax.append(logp.argmax(-1).tolist())
            entropy.append((-(logp.exp() * logp).sum(-1)).tolist())  # nats
    return argmax, entropy


def reading_pairs(model, sequences: list[list[int]], context: int, batch_size: int = 32,
                  skip: set[int] = frozenset(), vocab: int | None = None,
                  min_entropy: float = 0.0) -> list[tuple[tuple[int, ...], int]]:
    """The suspect's argmax next token after every prefix of ``sequences`` that has ``context`` ids,
    as (context window, predicted id) pairs, minus the pairs the texts contain, and minus positions
    where the suspect's next-token entropy is below ``min_entropy`` nats (see :func:`sampling_pairs`)."""
    own = set(scored_pairs(sequences, context))
    predicted, entropy = next_token_view(model, sequences, batch_size, vocab)
    pairs = []
    for seq, best, ent in zip(sequences, predicted, entropy):
        for t in range(context - 1, len(seq)):
            pair = (tuple(seq[t + 1 - context:t + 1]), best[t])
            if pair[1] not in skip and pair not in own and ent[t] >= min_entropy:
                pairs.append(pair)
    return pairs


def sampling_pairs(prompts: list[list[int]], answers: list[list[int]], context: int,
                   skip: set[int] = frozenset(), entropy: list[list[float]] | None = None,
                   min_entropy: float = 0.0) -> list[tuple[tuple[int, ...], int]]:
    """(context window, token) pairs of the suspect's ``answers``, each after its prompt's ids.

    With ``entropy`` (:func:`next_token_view` of prompt + answer, from the suspect's weights), only
    tokens the suspect chose from a distribution of at least ``min_entropy`` nats are scored. Where
    a model is confident the watermark could not move its teacher either, so those tokens add
    trials without signal; the filter keeps the null exact because it reads the suspect alone,
    never a key."""
    pairs = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = p + a
        for t in range(max(context, len(p)), len(seq)):
            if seq[t] not in skip and (entropy is None or entropy[i][t - 1] >= min_entropy):
                pairs.append((tuple(seq[t - context:t]), seq[t]))
    return pairs


def score_keys(pairs, watermarks: list[Watermark], mode: str | None = None) -> dict:
    """One exact p-value per key, Holm-adjusted across the keys; the pairs are shared by all keys.
    ``mode``: how a suspect's pairs were collected (reading, sampling); None for text."""
    contexts = {w.context for w in watermarks}
    if len(contexts) != 1:
        raise ValueError("keys tested together need one context width (the pairs depend on it)")
    distinct = list(dict.fromkeys(pairs))  # each (context, token) pair once: see potstill.audit.stats
    scores = [binomial_test(w.count_green(distinct), len(distinct), w.gamma, repeats_dropped=len(pairs) - len(distinct))
              for w in watermarks]
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
    from potstill.hf import generate_ids, prompt_ids

    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": 1.0, "top_logprobs": 0}
    rows = [prompt_ids(tokenizer, as_messages(p)) for p in prompts]
    answers = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        answers += [c.token_ids for c in generate_ids(model, tokenizer, batch, params, seed + i, [""] * len(batch))]
    return rows, answers


def endpoint_samples(base_url: str, model: str, tokenizer, prompts: list, max_new_tokens: int,
                     temperature: float = 1.0, api_key: str | None = None,
                     timeout: float | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) of a suspect behind an OpenAI-compatible endpoint: its answers' text
    is tokenized with ``tokenizer``, the one the keys' green lists are over (the teacher's).
    ``timeout``: seconds for each probe's whole answer (``lineage.ENDPOINT_TIMEOUT`` if None)."""
    from potstill.audit.lineage import ENDPOINT_TIMEOUT, EndpointModel
    from potstill.hf import prompt_ids

    suspect = EndpointModel(base_url, model, api_key, ENDPOINT_TIMEOUT if timeout is None else timeout)
    rows, answers = [], []
    try:
        for p in prompts:
            messages = as_messages(p)
            text = suspect.chat(messages, temperature, max_new_tokens)
            rows.append(prompt_ids(tokenizer, messages))
            answers.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        suspect.close()
    return rows, answers

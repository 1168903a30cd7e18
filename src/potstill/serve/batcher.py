"""The served model and how requests reach it: requests with the same sampling settings are
gathered into one left-padded generate call (one batch at a time, in a worker thread), and prompts
are scored in one unpadded forward pass."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from potstill.hf import generate_ids
from potstill.records import Completion
from potstill.serve.schema import APIError

SCORE_CHUNK = 512  # prompt positions scored per step of echo / prompt_logprobs
LARGE_BODY = 1 << 20  # bytes: bodies over this are prepared one at a time, apart from the others


@dataclass
class Served:
    """The model a server answers with, and what requests are checked against."""

    model: Any
    tokenizer: Any
    name: str
    context: int | None  # max_position_embeddings: prompt + max_tokens must fit in it
    default_max_tokens: int | None  # generation_config.max_new_tokens
    vocab_size: int  # valid prompt token ids: those the tokenizer knows (never a padding row of the embedding)
    max_batch_size: int
    longest_token: int  # characters of the tokenizer's longest token: a text longer than context x this cannot fit
    exact_seeds: bool = False
    watermark: Any = None  # potstill.audit.Watermark on every generated token (prompt scoring is not watermarked)
    max_messages: int = 2048  # messages in a chat request, and content parts in all
    created: int = field(default_factory=lambda: int(time.time()))
    alone: dict = field(default_factory=dict)  # (id, skip_special) -> the token decoded by itself
    vocabulary: list | None = None  # every id's bytes (align.token_bytes), read when logprobs are first asked
    # Request bodies are parsed, checked, validated, templated and tokenized in these threads, off
    # the event loop: those up to LARGE_BODY bytes a few at once, larger ones one at a time, so a
    # large body never makes a small request wait and only one is held parsed at once (the JSON of
    # a body holding many small objects takes some 12 times its size).
    small_bodies: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4, "prepare"))
    large_bodies: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "prepare-large"))

    def check_length(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing, a text too long for the context whatever its tokens: a token
        is at most ``longest_token`` characters (tokenizing a 50 MB message took some 20 GB)."""
        if self.context is not None and chars > self.context * self.longest_token:
            raise APIError(f"the prompt is {chars:,} characters: more than the model's context ({self.context} "
                           f"tokens of at most {self.longest_token} characters) holds; shorten it", param,
                           "context_length_exceeded")

    def check_tokens(self, tokens: int, param: str, answer: int = 0) -> None:
        """Refuse a prompt of ``tokens`` that leaves less than ``answer`` tokens of the context."""
        if self.context is not None and tokens + answer > self.context:
            raise APIError(f"the prompt is {tokens:,} tokens and the model's context is {self.context:,}: "
                           "shorten the prompt", param, "context_length_exceeded")

    async def prepare(self, fn: Callable, raw: bytes):
        """``fn(self, raw)`` for a request body ``raw``, in the lane its size picks."""
        lane = self.large_bodies if len(raw) > LARGE_BODY else self.small_bodies
        return await asyncio.get_running_loop().run_in_executor(lane, fn, self, raw)

    def close(self) -> None:
        for lane in (self.small_bodies, self.large_bodies):
            lane.shutdown(wait=False, cancel_futures=True)


@dataclass
class Scores:
    """A prompt scored by the model: entry t is about prompt token t + 1 given tokens 0..t."""

    logprobs: np.ndarray  # (L - 1,) float32, temperature 1
    ranks: np.ndarray  # (L - 1,) int: 1 is the most likely token
    top_ids: np.ndarray  # (L - 1, k)
    top_logprobs: np.ndarray  # (L - 1, k) descending


@dataclass(eq=False)
class Job:
    """One prompt's rows (n copies) waiting for a batch; jobs with equal ``key`` can share one."""

    rows: list[list[int]]
    params: dict  # generate_ids params, plus token_logprobs
    key: tuple
    seed: int | None
    prompt_k: int | None  # score the prompt too, with this many top logprobs
    future: asyncio.Future | None = None
    arrived: float = 0.0


class Batcher:
    """Gathers compatible jobs for up to ``wait_s`` (or ``max_rows`` rows) and runs them as one
    batch in a worker thread, one batch at a time: the model serves one generate call at a time,
    and the event loop keeps accepting requests meanwhile."""

    def __init__(self, run_batch: Callable[[list[Job]], list], max_rows: int, wait_s: float):
        self.run_batch, self.max_rows, self.wait_s = run_batch, max_rows, wait_s
        self.pending: list[Job] = []
        self.arrived = asyncio.Event()
        self.batches = 0  # batches run so far

    async def submit(self, job: Job) -> list:
        job.future = asyncio.get_running_loop().create_future()
        job.arrived = time.monotonic()
        self.pending.append(job)
        self.arrived.set()
        return await job.future

    def _rows(self, key: tuple) -> int:
        return sum(len(j.rows) for j in self.pending if j.key == key)

    def _take(self) -> list[Job]:
        self.pending = [j for j in self.pending if not j.future.done()]  # clients that went away
        if not self.pending:
            return []
        batch, rows = [], 0
        for job in self.pending:
            if job.key == self.pending[0].key and (not batch or rows + len(job.rows) <= self.max_rows):
                batch.append(job)
                rows += len(job.rows)
        self.pending = [j for j in self.pending if j not in batch]
        return batch

    async def run(self) -> None:
        while True:
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            first = self.pending[0]
            while self._rows(first.key) < self.max_rows and (left := first.arrived + self.wait_s - time.monotonic()) > 0:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), left)
                except asyncio.TimeoutError:
                    pass
            batch = self._take()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.run_batch, batch)
            except Exception as e:  # the model failed (out of memory, ...): each waiting request gets a 500
                results = [e] * len(batch)
            self.batches += 1
            for job, result in zip(batch, results):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)


def run_batch(served: Served, jobs: list[Job]) -> list[list[tuple[Completion | None, Scores | None]]]:
    """Generate for all rows of ``jobs`` in one call, and score the prompts that asked for it.
    Per job, per row: (the completion or None when max_tokens is 0, the prompt's scores or None)."""
    params = dict(jobs[0].params)
    token_logprobs = params.pop("token_logprobs")
    rows = [r for job in jobs for r in job.rows]
    seeds = sorted(job.seed for job in jobs if job.seed is not None)
    seed = int(hashlib.sha256(repr(seeds).encode()).hexdigest()[:8], 16) if seeds else secrets.randbits(32)
    completions = [None] * len(rows)
    if params["max_new_tokens"]:
        completions = generate_ids(served.model, served.tokenizer, rows, params, seed, [""] * len(rows),
                                   token_logprobs=token_logprobs, watermark=served.watermark)
    out, i = [], 0
    for job in jobs:
        scores = None if job.prompt_k is None else score_prompt(served, job.rows[0], job.prompt_k)
        out.append([(c, scores) for c in completions[i:i + len(job.rows)]])
        i += len(job.rows)
    return out


@torch.no_grad()
def score_prompt(served: Served, ids: list[int], k: int) -> Scores:
    """Each prompt token's logprob given the tokens before it, its rank, and the top-k there
    (temperature 1, over the tokenizer's ids as LocalModel samples and caches: a model's padding
    rows are no tokens). One unpadded forward pass, so a score is what the model gives the text alone."""
    x = torch.tensor([ids], device=served.model.device)
    # the model's own logits (soft-capping, scaling and all), once; the float32 log-softmax, the
    # ranks and the top-k SCORE_CHUNK positions at a time, never an (L, V) float32 copy
    logits = served.model(input_ids=x).logits[0, :-1]  # (L - 1, V) in the model's dtype
    parts = []
    # at least one step: a one-token prompt has nothing to score, and gets empty (0, ...) arrays
    for s in range(0, max(logits.shape[0], 1), SCORE_CHUNK):
        lp = logits[s:s + SCORE_CHUNK, :served.vocab_size].float().log_softmax(-1)  # (chunk, V_tokenizer)
        chosen = lp.gather(-1, x[0, s + 1:s + 1 + lp.shape[0], None])[:, 0]
        ranks = (lp > chosen[:, None]).sum(-1) + 1
        top_lp, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        parts.append((chosen, ranks, top_ids, top_lp))
    chosen, ranks, top_ids, top_lp = (torch.cat(p).cpu().numpy() for p in zip(*parts))
    return Scores(chosen, ranks, top_ids, top_lp)


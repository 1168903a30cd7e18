"""Pairwise judging: another model says which of two answers to a prompt is better.

The judge is a local model folder (``LocalModel``, through its ``complete``) or an OpenAI-compatible
endpoint (:class:`HTTPJudge`), asked with ``JUDGE_PROMPT`` at temperature 0. Every pair is judged
twice, with the answers in both orders, so a judge that prefers a position gains nothing from it.
A verdict is parsed from the first non-empty line of the judge's reply (``parse_verdict``); a
reply that says neither A, B nor tie is counted as unparseable and left out of the win rate,
never guessed (as is a request to an endpoint judge that failed for good, counted as failed).

    win rate of X over Y = (votes for X + 0.5 * ties) / parsed votes
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from potstill.errors import PotstillError
from potstill.records import Request, greedy_params

JUDGE_PROMPT = """You are judging two answers to the same request. Decide which answer is better: more correct, \
more helpful, more to the point. Reply with one line: "A" if answer A is better, "B" if answer B is better, or \
"tie" if they are equally good.

[Request]
{prompt}

[Answer A]
{a}

[Answer B]
{b}

Verdict:"""

_VERDICT = re.compile(r"^\W*(?:verdict\W*)?(?:answer\s+)?(a|b|tie)\b", re.IGNORECASE)


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "tie" from the first non-empty line of the reply; None if it says none of them."""
    for line in reply.splitlines():
        if line.strip():
            m = _VERDICT.match(line.strip())
            if not m:
                return None
            word = m.group(1).lower()
            return "tie" if word == "tie" else word.upper()
    return None


@dataclass
class JudgeResult:
    wins: int  # votes for the candidate
    losses: int  # votes for the reference
    ties: int
    unparseable: int
    votes: list[float | None]  # per prompt and order: 1 win, 0 loss, 0.5 tie, None unparseable or failed
    failed: int = 0  # requests that got no reply at all (an endpoint judge's failures for good)

    @property
    def parsed(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float | None:
        return None if not self.parsed else (self.wins + 0.5 * self.ties) / self.parsed


def judge_pairs(judge, prompts: list[str], candidate: list[str], reference: list[str], *,
                max_new_tokens: int = 16, batch_size: int = 16) -> JudgeResult:
    """Judge ``candidate[i]`` against ``reference[i]`` for each prompt, in both orders."""
    requests, meaning = [], []
    for i, (p, c, r) in enumerate(zip(prompts, candidate, reference)):
        for cand_is_a in (True, False):
            a, b = (c, r) if cand_is_a else (r, c)
            text = JUDGE_PROMPT.format(prompt=p, a=a, b=b)
            requests.append(Request(f"judge-{i}-{int(cand_is_a)}", [{"role": "user", "content": text}], 0, 0))
            meaning.append(cand_is_a)
    params = greedy_params(max_new_tokens)
    replies = []
    for s in range(0, len(requests), batch_size):
        replies += [c.text for c in judge.complete(requests[s:s + batch_size], params)]
    votes: list[float | None] = []
    failed = 0
    for reply, cand_is_a in zip(replies, meaning):
        verdict = None if reply is None else parse_verdict(reply)
        failed += reply is None
        if verdict is None:
            votes.append(None)
        elif verdict == "tie":
            votes.append(0.5)
        else:
            votes.append(1.0 if (verdict == "A") == cand_is_a else 0.0)
    unparseable = votes.count(None) - failed
    return JudgeResult(votes.count(1.0), votes.count(0.0), votes.count(0.5), unparseable, votes, failed)


@dataclass
class Reply:
    text: str | None  # None: the request failed for good (no reply to parse)


class HTTPJudge:
    """A judge behind an OpenAI-compatible endpoint (``eval.judge.backend: openai``), asked as an
    HTTP teacher is (``potstill.teachers.backends.ask``: retries, rate and token limits, budget, the
    key kept out of every record) into ``judge-ledger.sqlite`` in the run folder. A request is
    keyed by its text, so a rerun that judges the same answers pays for none of them again, and
    the same pair asked twice is sent once. Requests that fail for good are left out of the win
    rate and counted (their reasons stay in the ledger)."""

    def __init__(self, recipe):
        from potstill.redaction import api_key
        from potstill.teachers.backends import HTTPBackend

        spec = recipe.eval.judge
        self.ledger_path = recipe.run_dir / "judge-ledger.sqlite"
        self.recipe_sha256 = recipe.sha256()
        self.backend = HTTPBackend(recipe.model_copy(update={"teacher": spec.as_teacher()}), label="judge")
        self.name = f"{spec.model} at {' '.join(spec.endpoints)}"
        api_key(self.backend.spec, "eval.judge.api_key_env")  # checked before any model is scored, not after

    def describe(self) -> dict:
        return self.backend.describe()

    def complete(self, requests: list[Request], params: dict) -> list[Reply]:
        from potstill.ledger import Ledger
        from potstill.prompts import Prompt
        from potstill.teachers.backends import ask

        prompts = [Prompt(tuple((m["role"], m["content"]) for m in r.messages)) for r in requests]
        with Ledger(self.ledger_path) as ledger:
            asked = ask(self.backend, ledger, prompts, params, self.recipe_sha256)
            if asked.stopped:  # the HTTP layer names teacher.* settings; the judge's are eval.judge.*
                why = asked.stopped.replace("teacher.", "eval.judge.")
                raise PotstillError(f"the judge ({self.name}) stopped: {why}; rerun eval to resume")
            replies = {ex.request_hash: ex.text for ex in ledger.examples(asked.hashes)}
        return [Reply(replies.get(h)) for h in asked.hashes]

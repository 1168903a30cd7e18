"""One budget for every way of paying a teacher: ``teacher.budget`` against what the ledger says
was spent (over all sessions) plus what is reserved (sends in flight, open batches).

A send is checked at its worst case (the most ``wire.counted_usage`` can count for it:
``wire.worst_case``), so a run stops before a limit, not after it, whatever usage an answer claims. The online dispatcher reserves the worst case while a send is in flight and
replaces it by what was billed; the Batch path counts the open batches' worst case as spent
until they are collected, at the Batch discount.
"""

from __future__ import annotations


def price(prices, prompt: float, completion: float, discount: float = 1.0) -> float:
    """USD for ``prompt`` + ``completion`` tokens at ``prices`` (USD per million tokens), times ``discount``."""
    return (prompt * prices.prompt + completion * prices.completion) / 1e6 * discount


class Budget:
    def __init__(self, limits, prices, spent: dict, discount: float = 1.0):
        """``limits``: a BudgetSpec (max_requests, max_tokens, max_cost); ``prices``: a PricesSpec in
        USD per million tokens; ``spent``: the ledger's totals (``Ledger.spend``)."""
        self.limits, self.prices, self.discount = limits, prices, discount
        self.requests = spent["requests"]
        self.prompt_tokens, self.completion_tokens = spent["prompt_tokens"], spent["completion_tokens"]
        self.cost = spent["cost"]
        self.reserved_tokens = self.reserved_cost = 0.0

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.completion_tokens

    @property
    def limited(self) -> bool:
        b = self.limits
        return b.max_requests is not None or b.max_tokens is not None or b.max_cost is not None

    def cost_of(self, prompt: float, completion: float) -> float:
        return price(self.prices, prompt, completion, self.discount)

    def over(self, prompt: float, completion: float) -> tuple[str, float, str] | None:
        """The limit one more send of this worst case would pass: (key, limit, what is spent and
        reserved so far, in words), or None when it fits."""
        b = self.limits
        if b.max_requests is not None and self.requests + 1 > b.max_requests:
            return "max_requests", b.max_requests, f"{self.requests} sends"
        tokens = self.tokens + self.reserved_tokens
        if b.max_tokens is not None and tokens + prompt + completion > b.max_tokens:
            return "max_tokens", b.max_tokens, f"{tokens:,.0f} tokens incl. in flight"
        cost = self.cost + self.reserved_cost
        # a billionth short of the limit: the ledger sums the same costs in another order, and a sum
        # that fills the budget exactly here may come out an ulp over it there
        if b.max_cost is not None and cost + self.cost_of(prompt, completion) > b.max_cost * (1 - 1e-9):
            return "max_cost", b.max_cost, f"${cost:.4f} incl. in flight"
        return None

    def reserve(self, prompt: float, completion: float) -> tuple[float, float]:
        """Count one send and hold its worst case until ``release``; returns what was held."""
        held = (prompt + completion, self.cost_of(prompt, completion))
        self.requests += 1
        self.reserved_tokens += held[0]
        self.reserved_cost += held[1]
        return held

    def release(self, held: tuple[float, float]) -> None:
        self.reserved_tokens -= held[0]
        self.reserved_cost -= held[1]

    def spend(self, prompt: float, completion: float) -> float:
        """Count what a send was billed (or its worst case, when unknown); returns its cost."""
        cost = self.cost_of(prompt, completion)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cost += cost
        return cost

"""Teachers behind OpenAI-compatible endpoints: the wire format (``wire``), sending with retries,
rate limits and budgets (``dispatch``), and OpenAI's Batch API (``batch``)."""

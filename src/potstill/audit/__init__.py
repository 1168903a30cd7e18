"""Audit: watermark a teacher you host, and test whether a suspect model learned from it.

- :mod:`~potstill.watermark`: the keyed green-list watermark (a logits processor) and key ids;
- :mod:`~potstill.audit.stats`: exact binomial tails, the each-pair-once rule, Holm;
- :mod:`~potstill.audit.radioactivity`: was a suspect trained on text watermarked with key K?
- :mod:`~potstill.audit.lineage`: does a suspect agree with a teacher beyond unrelated references?
- :mod:`~potstill.audit.power`: how many tokens a test needs.

Results are statistical evidence, not proof (see docs/audit.md for what each test can and cannot show).
"""

from potstill.audit.stats import Score, binom_sf, binomial_test, holm, log_binom_sf, score_pairs
from potstill.watermark import Watermark, key_id, load_watermark, read_key, scored_pairs

__all__ = ["Score", "Watermark", "binom_sf", "binomial_test", "holm", "key_id", "load_watermark", "log_binom_sf",
           "read_key", "score_pairs", "scored_pairs"]

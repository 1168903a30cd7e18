"""Measure the audit as a user would rely on it, on the bundled quickstart teacher.

    python bench/audit_bench.py [--out runs/bench-audit] [--heldout 600] [--null-keys 100]

1. Cost: the teacher's held-out accuracy (skillmix verifier, sampled at temperature 1) with and
   without the watermark (gamma 0.25, context 3, delta 4 and 8).
2. Text: the watermarked teacher's answers are flagged for key K and not for 9 other keys.
3. Null calibration: a suspect that never saw any key (the bundled teacher, unwatermarked)
   sampled once, tested against N fresh keys: Kolmogorov-Smirnov test of the p-values against
   Uniform(0,1) and the false-positive rate at alpha = 0.01 with its binomial 99% interval.
   (Keys vary, not trained students: each key is an independent null test on the same answers.)
4. The power planner's token counts for an assumed green rate of 0.33 at 100 % watermarked data.

Trained students (shares of watermarked data, 30 trained null students, lineage with trained
references): bench/audit_students.py.

Prints markdown tables for docs/benchmarks.md. Everything runs on CPU with tiny models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
QS = ROOT / "examples" / "quickstart"
sys.path.insert(0, str(ROOT / "src"))

from potstill.audit.power import plan  # noqa: E402
from potstill.audit.radioactivity import local_samples, sampling_pairs, score_keys  # noqa: E402
from potstill.hf import generate_ids, load_model_dir, prompt_ids  # noqa: E402
from potstill.prompts import load_prompts  # noqa: E402
from potstill.tasks.skillmix import verify  # noqa: E402
from potstill.watermark import Watermark  # noqa: E402

CTX = 3
KEY = b"bench-audit-key-K-0123456789abcdef"
OTHERS = [b"bench-audit-other-key-%02d-abcdef" % i for i in range(9)]


def accuracy(model, tok, prompts, watermark=None) -> float:
    params = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 0}
    rows = [prompt_ids(tok, p.chat) for p in prompts]
    ok = 0
    for i in range(0, len(rows), 256):
        out = generate_ids(model, tok, rows[i:i + 256], params, i, [""] * len(rows[i:i + 256]), watermark=watermark)
        ok += sum(verify(p.text, c.text) for p, c in zip(prompts[i:i + 256], out))
    return ok / len(prompts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-audit")
    p.add_argument("--heldout", type=int, default=600)
    p.add_argument("--null-keys", type=int, default=100)
    p.add_argument("--null-prompts", type=int, default=200)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model_dir(QS / "teacher")
    held = load_prompts(QS / "prompts" / "heldout.jsonl", args.heldout)
    skip = {tok.eos_token_id}

    print("## Cost of the watermark (held-out accuracy, sampled at temperature 1)\n")
    print("| watermark | accuracy | text p-value for K | largest other-key p (Holm) | distinct pairs |")
    print("|---|---|---|---|---|")
    print(f"| none | {accuracy(model, tok, held):.1%} | | | |")
    for delta in (4.0, 8.0):
        wm = Watermark(KEY, 0.25, delta, CTX)
        rows, answers = [], []
        params = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 0}
        for i in range(0, len(held), 256):
            batch = [prompt_ids(tok, q.chat) for q in held[i:i + 256]]
            rows += batch
            answers += [c.token_ids for c in generate_ids(model, tok, batch, params, i, [""] * len(batch), watermark=wm)]
        keys = [wm] + [Watermark(k, 0.25, delta, CTX) for k in OTHERS]
        r = score_keys(sampling_pairs(rows, answers, CTX, skip), keys, "text")["keys"]
        acc = accuracy(model, tok, held, wm)
        print(f"| gamma 0.25, delta {delta:g}, context {CTX} | {acc:.1%} | {r[0]['p_holm']:.2g} | "
              f"{max(k['p_holm'] for k in r[1:]):.2g} | {r[0]['tokens']} (green {r[0]['green'] / r[0]['tokens']:.3f}) |")

    print(f"\n## Null calibration: a model that never saw a key, {args.null_keys} keys\n")
    null_prompts = [q.chat for q in held[:args.null_prompts]]
    rows, answers = local_samples(model, tok, null_prompts, 12)
    pairs = sampling_pairs(rows, answers, CTX, skip)
    pv = [score_keys(pairs, [Watermark(b"bench-null-key-%06d-xxxxxxxx" % i, 0.25, 4.0, CTX)], "sampling")
          ["keys"][0]["p_value"] for i in range(args.null_keys)]
    fp = sum(v < 0.01 for v in pv)
    lo, hi = stats.binom.interval(0.99, args.null_keys, 0.01)
    print(f"distinct pairs per test: {len(dict.fromkeys(pairs))}; KS vs Uniform(0,1): "
          f"statistic {stats.kstest(pv, 'uniform').statistic:.3f}, p = {stats.kstest(pv, 'uniform').pvalue:.3f} "
          f"(discrete p-values are super-uniform, so KS is conservative here); "
          f"false positives at alpha 0.01: {fp}/{args.null_keys} (binomial 99% interval {lo:.0f}-{hi:.0f}); "
          f"mean p {np.mean(pv):.3f}")
    (args.out / "null_p_values.json").write_text(json.dumps(pv))

    print("\n## Power planner (gamma 0.25, p < 1e-5, 90% power)\n")
    print("| share | assumed green rate | distinct pairs needed |\n|---|---|---|")
    for row in plan(0.25, 0.33, shares=(0.05, 0.1, 0.25, 1.0)):
        print(f"| {row['share']:.0%} | {row['green_rate']:.4f} | {row['tokens']:,} |")


if __name__ == "__main__":
    main()

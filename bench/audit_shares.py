"""Radioactivity by share of watermarked training data, and trained null students.

    python bench/audit_shares.py [--out runs/bench-audit-shares] [--prompts 128] [--shares 1 0.25 0.1 0.05]
                                 [--null-seeds 0 1]

For each share s, the bundled teacher answers `--prompts` training prompts (temperature 1), the
first s of them watermarked (gamma 0.25, delta 8, context 3); the answers go to a JSONL that a
student imports (`teacher.backend: imported`) and is fine-tuned on from the teacher's own
weights (SFT, 8 epochs: the end-to-end test's setting). The student is then sampled on the same
prompts and tested against K and 9 other keys (Holm). Null students: share 0, other data seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QS = ROOT / "examples" / "quickstart"
sys.path.insert(0, str(ROOT / "src"))

from potstill.audit.radioactivity import local_samples, sampling_pairs, score_keys  # noqa: E402
from potstill.hf import generate_ids, load_model_dir, prompt_ids  # noqa: E402
from potstill.prompts import load_prompts  # noqa: E402
from potstill.watermark import Watermark  # noqa: E402

KEY = b"bench-audit-key-K-0123456789abcdef"
OTHERS = [b"bench-audit-other-key-%02d-abcdef" % i for i in range(9)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-audit-shares")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.25, 0.1, 0.05])
    p.add_argument("--null-seeds", type=int, nargs="*", default=[0, 1])
    args = p.parse_args()
    model, tok = load_model_dir(QS / "teacher")
    prompts = load_prompts(QS / "prompts" / "train.jsonl", args.prompts)
    rows = [prompt_ids(tok, q.chat) for q in prompts]
    wm = Watermark(KEY, 0.25, 8.0, 3)
    keys = [wm] + [Watermark(k, 0.25, 8.0, 3) for k in OTHERS]
    params = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 0}
    print("| student | watermarked share | p-value for K (Holm, 10 keys) | largest other-key p | distinct pairs | "
          "green share | seconds |\n|---|---|---|---|---|---|---|")
    runs = [(s, 0) for s in args.shares] + [(0.0, seed) for seed in args.null_seeds]
    for share, seed in runs:
        start = time.perf_counter()
        n = round(len(rows) * share)
        answers = []
        if n:
            answers += generate_ids(model, tok, rows[:n], params, 1000 * seed, [""] * n, watermark=wm)
        if n < len(rows):
            answers += generate_ids(model, tok, rows[n:], params, 1000 * seed + 1, [""] * (len(rows) - n))
        out = args.out / f"share{share:g}-seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        with (out / "answers.jsonl").open("w") as f:
            for q, c in zip(prompts, answers):
                f.write(json.dumps({"messages": q.chat, "response": c.text}) + "\n")
        recipe = [str(QS / "recipe.yaml"), f"output_dir={out / 'run'}", "teacher.backend=imported",
                  f"teacher.data={out / 'answers.jsonl'}", "baseline=null", "student.config=null",
                  f"student.path={QS / 'teacher'}", "train.objective=sft", "train.epochs=8", "train.batch_size=16",
                  "train.warmup_steps=0", "train.lr=0.005", f"train.seed={seed}"]
        for verb in ("generate", "train"):  # generate imports the answers into the ledger
            subprocess.run([sys.executable, "-m", "potstill.cli", verb, *recipe], check=True, stdout=subprocess.DEVNULL)
        student, _ = load_model_dir(out / "run" / "student")
        r_rows, r_answers = local_samples(student, tok, [q.chat for q in prompts], 12)
        r = score_keys(sampling_pairs(r_rows, r_answers, 3, {tok.eos_token_id}), keys, "sampling")["keys"]
        name = "null" if share == 0 else "distilled"
        print(f"| {name} (seed {seed}) | {share:.0%} | {r[0]['p_holm']:.2g} | {max(k['p_holm'] for k in r[1:]):.2g} | "
              f"{r[0]['tokens']} | {r[0]['green'] / r[0]['tokens']:.3f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()

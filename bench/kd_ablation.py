"""When does logit KD beat SFT on the quickstart task? Temperature, kd_ratio, teacher signal, data size.

    python bench/kd_ablation.py --ledger runs/bench-quickstart/seed0/ledger.sqlite [--seeds 0 1 2] [key=value ...]

Every arm trains the quickstart student from the same ledger (the teacher is never asked
again) with the quickstart recipe plus the arm's overrides, for each seed, and evaluates it on
the 1,200 held-out prompts. Arms with fewer prompts get proportionally more epochs, so they
take the quickstart's 3,000 optimizer steps; arms that change the steps say so in their name. Prints a markdown table: held-out
accuracy and KL(teacher || student) per token, mean and sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POTSTILL = Path(sys.executable).parent / "potstill"
RECIPE = ROOT / "examples" / "quickstart" / "recipe.yaml"
ARMS = {  # name: overrides of the quickstart recipe
    "SFT (CE on teacher text)": ["train.objective=sft"],
    "KD, T=1, kd_ratio=1": ["train.kd_ratio=1.0", "train.temperature=1.0"],
    "KD, T=1, kd_ratio=0.5": ["train.kd_ratio=0.5", "train.temperature=1.0"],
    "KD, T=2, kd_ratio=1, cached top-20": ["train.kd_ratio=1.0", "train.temperature=2.0"],
    "KD, T=2, kd_ratio=1, online (full vocabulary)": ["train.kd_ratio=1.0", "train.temperature=2.0",
                                                      "train.teacher_signal=online"],
    "SFT, 2,000 prompts": ["train.objective=sft", "prompts.limit=2000", "train.epochs=96"],
    "KD, T=1, kd_ratio=1, 2,000 prompts": ["train.kd_ratio=1.0", "train.temperature=1.0", "prompts.limit=2000",
                                           "train.epochs=96"],
    # issue 15: levers of training efficiency inside the quickstart's time budget
    "KD, batch 128, lr 0.006 (half the steps)": ["train.batch_size=128", "train.lr=0.006", "train.warmup_steps=25"],
    "KD, lr 0.006": ["train.lr=0.006"],
    "KD, lr 0.0015": ["train.lr=0.0015"],
    "KD, 4 layers of width 56 (156k parameters)": ["student.config.hidden_size=56",
                                                   "student.config.intermediate_size=154",
                                                   "student.config.num_hidden_layers=4"],
    "KD, 36 epochs (4,500 steps)": ["train.epochs=36"],
    "KD, lr 0.001": ["train.lr=0.001"],
    "SFT, lr 0.0015": ["train.objective=sft", "train.lr=0.0015"],
    "SFT, lr 0.001": ["train.objective=sft", "train.lr=0.001"],
    # the recipe's teacher signal, against the teacher run at every step (full vocabulary) and GKD
    "KD, online teacher (full vocabulary)": ["train.teacher_signal=online"],
    "KD, on-policy (GKD, lmbda 0.5)": ["train.teacher_signal=on_policy", "train.lmbda=0.5"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ledger", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation")
    p.add_argument("--arms", nargs="+", default=list(ARMS), help="arm names to run (default: all)")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides for every arm, after the arm's own")
    args = p.parse_args()

    results: dict[str, list[dict]] = {}
    for i, arm in enumerate(args.arms):
        for seed in args.seeds:
            d = args.out / f"arm{i}-seed{seed}"
            if not (d / "eval.json").is_file():
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                shutil.copy(args.ledger, d / "ledger.sqlite")
                subprocess.run([str(POTSTILL), "run", str(RECIPE), f"output_dir={d}", "baseline=null",
                                f"train.seed={seed}", *ARMS[arm], *args.overrides], check=True,
                               stdout=subprocess.DEVNULL)
            results.setdefault(arm, []).append(json.loads((d / "eval.json").read_text())["models"]["student"])
            print(f"{arm} seed {seed}: {results[arm][-1]['accuracy']:.3f}", file=sys.stderr, flush=True)

    def cell(values, scale=1.0, fmt="{:.1f}"):
        values = [v * scale for v in values]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"

    skills = sorted(next(iter(results.values()))[0]["accuracy_by_category"])
    print("| arm | accuracy % | KL/token | " + " | ".join(skills) + " |")
    print("|---|---:|---:|" + "---:|" * len(skills))
    for arm, rows in results.items():
        per_skill = [f"{100 * statistics.mean(r['accuracy_by_category'][s] for r in rows):.0f}" for s in skills]
        print(f"| {arm} | {cell([r['accuracy'] for r in rows], 100)} | "
              f"{cell([r['kl_per_token'] for r in rows], 1, '{:.3f}')} | " + " | ".join(per_skill) + " |")


if __name__ == "__main__":
    main()

"""Time the quickstart and measure its table over several student seeds.

    python bench/quickstart.py [--seeds 0 1 2] [--out runs/bench-quickstart]

1. Runs `potstill quickstart --out OUT/seed0` as a user would (fresh run directory) and times
   it end to end (generate + two students + eval + report).
2. For each further seed, copies that ledger (so the teacher is not asked again) and reruns
   with train.seed=S: the students differ only in their initialisation and batch order.
3. Prints a markdown table: teacher, KD student and SFT student, mean and sample standard
   deviation over the seeds, plus the wall time of step 1; then each seed's accuracies and the
   paired difference KD - SFT with its 95% t-interval (scipy.stats.t) over the seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
POTSTILL = Path(sys.executable).parent / "potstill"


def run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([str(POTSTILL), *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-quickstart")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides for every seed")
    args = p.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    first = args.out / f"seed{args.seeds[0]}"
    wall = run(["quickstart", "--out", str(first), f"train.seed={args.seeds[0]}", *args.overrides])
    for seed in args.seeds[1:]:
        d = args.out / f"seed{seed}"
        d.mkdir(parents=True)
        shutil.copy(first / "ledger.sqlite", d / "ledger.sqlite")
        run(["quickstart", "--out", str(d), f"train.seed={seed}", *args.overrides])

    evals = [json.loads((args.out / f"seed{s}" / "eval.json").read_text()) for s in args.seeds]
    for e in evals:  # retention: accuracy as a share of the teacher's
        for m in e["models"].values():
            m["retention"] = m["accuracy"] / e["models"]["teacher"]["accuracy"]
    metrics = [("accuracy", "accuracy", 100, "{:.1f}%"), ("retention", "retention", 100, "{:.1f}%"),
               ("agreement", "agreement", 100, "{:.1f}%"),
               ("kl_per_token", "KL/token", 1, "{:.3f}"), ("top1_agreement", "top-1", 100, "{:.1f}%")]
    print(f"quickstart wall time (seed {args.seeds[0]}, fresh run directory): {wall:.0f} s\n")
    print("| model | params | " + " | ".join(h for _, h, _, _ in metrics) + " |")
    print("|---|---:|" + "---:|" * len(metrics))
    for name in ("teacher", "student", "baseline"):
        cells = []
        for key, _, scale, fmt in metrics:
            values = [e["models"][name][key] * scale for e in evals]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(fmt.format(statistics.mean(values)) + (f" ± {fmt.format(sd)}" if name != "teacher" else ""))
        label = {"teacher": "teacher", "student": "KD student", "baseline": "SFT student"}[name]
        print(f"| {label} | {evals[0]['models'][name]['parameters']:,} | " + " | ".join(cells) + " |")
    print("\n| seed | KD student | SFT student | KD - SFT |")
    print("|---:|---:|---:|---:|")
    diffs = []
    for seed, e in zip(args.seeds, evals):
        kd, sft = (100 * e["models"][n]["accuracy"] for n in ("student", "baseline"))
        diffs.append(kd - sft)
        print(f"| {seed} | {kd:.1f}% | {sft:.1f}% | {kd - sft:+.1f} |")
    if len(diffs) > 1:
        mean, se = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
        half = stats.t.ppf(0.975, len(diffs) - 1) * se
        print(f"\nKD - SFT, paired over {len(diffs)} seeds: {mean:+.1f} points, 95% interval "
              f"[{mean - half:+.1f}, {mean + half:+.1f}]")
    print("\nper skill (mean over seeds):")
    skills = sorted(evals[0]["models"]["teacher"]["accuracy_by_category"])
    print("| model | " + " | ".join(skills) + " |")
    print("|---|" + "---:|" * len(skills))
    for name in ("teacher", "student", "baseline"):
        row = [statistics.mean(e["models"][name]["accuracy_by_category"][s] for e in evals) for s in skills]
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}%" for v in row) + " |")


if __name__ == "__main__":
    main()

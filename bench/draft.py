"""Which training makes the best speculative-decoding draft? KD (forward KL), TVD and SFT
students of the quickstart teacher, several seeds, one ledger.

    OMP_NUM_THREADS=1 nice -n 5 python bench/draft.py [--seeds 0 1 2] [--out runs/bench-draft] [--stage all]
        [key=value ...]   # recipe overrides for every run, e.g. prompts.limit=64 train.epochs=1 (a smoke test)

1. generate: the quickstart's ledger once (OUT/ledger.sqlite); every run copies it, so the
   students differ only in their loss, initialisation and batch order.
2. train: per seed, OUT/kd-S (the quickstart as shipped: top-20 forward-KL student and its SFT
   baseline) and OUT/tvd-S (train.loss=tvd, no baseline); all 4,500 steps.
3. eval: `potstill eval` on each run (acceptance from the distributions, and the measured
   assisted-generation run).
4. table: alpha at greedy and at T = 1, the i.i.d. expected tokens per step at gamma = 4, the
   measured tokens per verification step and speed-up, mean ± sample sd over the seeds.

A stage whose output is already there is kept (a run's student, a run's eval.json), so the
stages can be run apart: ``--stage train`` then ``--stage eval``.
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
VARIANTS = {"kd": [], "tvd": ["train.loss=tvd", "baseline=null"]}
GAMMA = "4"


def potstill(*args: str) -> None:
    subprocess.run([str(POTSTILL), *args], check=True, stdout=subprocess.DEVNULL)


def runs(out: Path, seeds: list[int]):
    for seed in seeds:
        for variant, overrides in VARIANTS.items():
            yield seed, variant, out / f"{variant}-{seed}", [f"train.seed={seed}", *overrides]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-draft")
    p.add_argument("--stage", choices=["all", "train", "eval", "table"], default="all")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides for every run (generate, train, eval)")
    args = p.parse_args()
    out = args.out.resolve()

    if args.stage in ("all", "train"):
        if not (out / "ledger.sqlite").is_file():
            first = out / "generate"
            potstill("generate", str(RECIPE), f"output_dir={first}", *args.overrides)
            shutil.copy(first / "ledger.sqlite", out / "ledger.sqlite")
        for seed, variant, d, overrides in runs(out, args.seeds):
            if not (d / "student" / "potstill.json").is_file():
                d.mkdir(parents=True, exist_ok=True)
                shutil.copy(out / "ledger.sqlite", d / "ledger.sqlite")
                potstill("train", str(RECIPE), f"output_dir={d}", *overrides, *args.overrides)
                print(f"trained {d.name}", flush=True)
    if args.stage in ("all", "eval"):
        for seed, variant, d, overrides in runs(out, args.seeds):
            if not (d / "eval.json").is_file():
                potstill("eval", str(RECIPE), f"output_dir={d}", *overrides, *args.overrides)
                print(f"evaluated {d.name}", flush=True)
    if args.stage in ("all", "table"):
        table(out, args.seeds)


def table(out: Path, seeds: list[int]) -> None:
    rows = {"KD student (top-20 forward KL)": ("kd", "student"), "TVD student (train.loss=tvd)": ("tvd", "student"),
            "SFT student (teacher text only)": ("kd", "baseline")}
    evals = {(v, s): json.loads((out / f"{v}-{s}" / "eval.json").read_text()) for s in seeds for v in VARIANTS}
    cells = [("accuracy", lambda m: 100 * m["accuracy"], "{:.1f}%"),
             ("KL/token", lambda m: m["kl_per_token"], "{:.3f}"),
             ("α greedy (= top-1)", lambda m: m["draft"]["alpha"]["greedy"], "{:.3f}"),
             ("α at T=1", lambda m: m["draft"]["alpha"]["sampled"], "{:.3f}"),
             (f"E[tokens/step] γ={GAMMA}, α greedy", lambda m: m["draft"]["expected_tokens_per_step"]["greedy"][GAMMA], "{:.2f}"),
             (f"measured tokens/step γ={GAMMA}", lambda m: m["draft"]["measured"]["tokens_per_step"], "{:.2f}"),
             ("measured speed-up", lambda m: m["draft"]["measured"]["speedup"], "{:.2f}x")]
    print("| student | " + " | ".join(h for h, _, _ in cells) + " |")
    print("|---|" + "---:|" * len(cells))
    for label, (variant, name) in rows.items():
        out_cells = []
        for _, get, fmt in cells:
            values = [get(evals[variant, s]["models"][name]) for s in seeds]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            out_cells.append(f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}")
        print(f"| {label} | " + " | ".join(out_cells) + " |")
    print("\nper seed (α greedy, α at T=1, measured tokens/step):")
    for label, (variant, name) in rows.items():
        per = [evals[variant, s]["models"][name]["draft"] for s in seeds]
        print(f"- {label}: " + "; ".join(f"seed {s}: {d['alpha']['greedy']:.3f}, {d['alpha']['sampled']:.3f}, "
                                         f"{d['measured']['tokens_per_step']:.2f}" for s, d in zip(seeds, per)))
    m = evals["kd", seeds[0]]["models"]["student"]["draft"]["measured"]
    print(f"\nmeasured on {m['prompts']} held-out prompts, batch 1, greedy, γ = {m['gamma']}; "
          f"versions: {json.dumps(evals['kd', seeds[0]]['provenance']['versions'])}")


if __name__ == "__main__":
    main()

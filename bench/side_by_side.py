"""Student and baseline one after the other (all cores each) against side by side (one process each).

    python bench/side_by_side.py --run DIR [--rounds 2] [key=value ...]

DIR holds a ledger made by `potstill generate examples/quickstart/recipe.yaml output_dir=DIR`.
Each round trains the quickstart's two students both ways, alternating which goes first, into
fresh folders under DIR/bench-side-by-side/ (the ledger is copied, never changed), and prints the
wall time of each and their ratio. The default trains 4 epochs (500 steps); pass train.epochs=N
for another length.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from potstill.pipeline import students
from potstill.recipe import load_recipe
from potstill.train import train
from potstill.train.side_by_side import cpu_cores, train_side_by_side

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "recipe.yaml"


def fresh(run: Path, name: str, overrides: list[str]):
    out = run / "bench-side-by-side" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(run / "ledger.sqlite", out / "ledger.sqlite")
    return load_recipe(RECIPE, [f"output_dir={out}", "train.epochs=4", *overrides])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cores = cpu_cores()
    times = {"one after the other": [], "side by side": []}
    for r in range(args.rounds):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for way in order:
            recipe = fresh(args.run, f"{r}-{way.replace(' ', '-')}", args.overrides)
            start = time.perf_counter()
            if way == "side by side":
                train_side_by_side(recipe, students(recipe), None, threads=cores // 2)
            else:
                torch.set_num_threads(cores)
                for name, spec in students(recipe):
                    train(recipe, spec, name)
            times[way].append(time.perf_counter() - start)
            print(f"round {r}: {way}: {times[way][-1]:.1f} s", flush=True)
    seq, sbs = (min(v) for v in times.values())
    print(f"\n{cores} cores; best of {args.rounds}: one after the other {seq:.1f} s ({cores} threads), "
          f"side by side {sbs:.1f} s ({cores // 2} thread(s) each): {seq / sbs:.2f}x")


if __name__ == "__main__":
    main()

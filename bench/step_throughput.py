"""Milliseconds per optimizer step of the quickstart student against batch size, on a real ledger.

    OMP_NUM_THREADS=1 python bench/step_throughput.py --run DIR [--sizes 64 128 256 512] [--examples 1280]
        [key=value ...]

DIR holds a ledger made by `potstill generate examples/quickstart/recipe.yaml output_dir=DIR`.
One student per batch size, trained in interleaved rounds (about --examples each per round, at
least 2 steps, after one warm-up step) so that a machine whose load changes affects every size
alike. Prints ms per step, completion tokens per second (the tokens that carry the loss) and
padded positions.
Threads: set OMP_NUM_THREADS, which torch reads at start.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from potstill.recipe import load_recipe
from potstill.train.examples import collate
from potstill.train.loop import setup, train_step

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "recipe.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--examples", type=int, default=1280, help="examples per batch size and round")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides")
    args = p.parse_args()

    setups = {}
    for b in args.sizes:
        recipe = load_recipe(RECIPE, [f"output_dir={args.run}", f"train.batch_size={b}", *args.overrides])
        setups[b] = setup(recipe, recipe.train, "student")
        setups[b].model.train()
    seconds, steps, completion, padded = ({b: 0.0 for b in args.sizes} for _ in range(4))
    for rnd in range(4):  # round 0 warms up and is not counted
        for b, s in setups.items():
            n = max(2, args.examples // b) if rnd else 1
            start = time.perf_counter()
            for k in range(n):
                train_step(s, rnd * 100 + k)
            if rnd:
                seconds[b] += time.perf_counter() - start
                steps[b] += n
                for k in range(n):  # counted outside the timed loop
                    ids = s.plan.batch(rnd * 100 + k)
                    completion[b] += sum(s.data[i].n_completion for i in ids)
                    padded[b] += collate([s.data[i] for i in ids], s.pad_id)["input_ids"].numel()
    for b in args.sizes:
        print(f"batch {b}: {1000 * seconds[b] / steps[b]:.1f} ms/step, {completion[b] / seconds[b]:,.0f} completion "
              f"tok/s, {padded[b] / steps[b]:.0f} padded positions/step, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()

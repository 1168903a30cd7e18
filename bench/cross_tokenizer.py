"""Logit KD across tokenizers on the quickstart: does a teacher's top-20, given as OpenAI gives it
(bytes and logprobs, no ids) and mapped onto a student's own tokens, still beat SFT?

    OMP_NUM_THREADS=1 python bench/cross_tokenizer.py --seeds 0 1 2 3 4 [--out runs/bench-cross] [key=value ...]
    python bench/cross_tokenizer.py --seeds 0 1 2 3 4 --stages table     # the tables again, from the runs

Stages (``--stages``, default all three):

- ``train``: for each seed, in turn (so that an interrupted run leaves paired seeds), two quickstarts
  of the same recipe and steps: ``same/seedS`` (`potstill quickstart`: KD and SFT students with the
  teacher's tokenizer, from the local teacher's ledger of ids) and ``cross/seedS`` (`potstill
  quickstart --student-tokenizer bpe`: KD and SFT students with a 512-token byte-level BPE, from the
  ledger of the teacher behind `potstill serve`, asked as OpenAI is). The first seed generates; the
  others copy its ledger (and the BPE, and the served port that keys the HTTP teacher's answers),
  so the teacher is asked once per arm and every seed trains on the same rows (checked: the
  students' ledger_sha256). Students train two at a time, one thread each, as the quickstart does.
  A run with an eval.json is kept.
- ``cost``: in one process, one torch thread, on copies of the first seed's ledgers: the one-time
  preparation of the examples per ledger row (the teacher's ids as they are; the text re-tokenized;
  the top-k aligned onto the BPE, ``potstill.align``), then a cached KD step and an SFT step of each
  tokenizer, interleaved in rounds after a warm-up round; CPU seconds (time.process_time), medians
  over rounds. Written to OUT/cost.json.
- ``table``: markdown tables from the runs' eval.json and cost.json: per seed and mean ± sample sd
  of held-out accuracy; the paired differences KD - SFT with 95 % t intervals over seeds
  (scipy.stats.t); the share of the same-tokenizer gain recovered, (KD_cross - SFT_cross) /
  (KD_same - SFT_same), with Fieller's 95 % interval for a ratio of paired means; the step costs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POTSTILL = Path(sys.executable).parent / "potstill"
ARMS = {"same": [], "cross": ["--student-tokenizer", "bpe"]}
# what a later seed copies from the first seed's run: the ledger, and for the cross arm the BPE and
# the served port (an HTTP teacher's answers are keyed by its endpoint)
SHARED = {"same": ["ledger.sqlite"], "cross": ["ledger.sqlite", "student-tokenizer", "served-teacher.json"]}


# ---------------------------------------------------------------------------------------------------
# train


def quickstart(arm: str, d: Path, seed: int, first: Path, overrides: list[str]) -> float:
    """One quickstart of ``arm`` into ``d``; its wall seconds. Later seeds start from the first's ledger."""
    d.mkdir(parents=True, exist_ok=True)
    if d != first:
        for name in SHARED[arm]:
            src = first / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, d / name)
    start = time.perf_counter()
    with (d.parent / f"{d.name}.log").open("w") as log:
        subprocess.run([str(POTSTILL), "quickstart", *ARMS[arm], "--out", str(d), f"train.seed={seed}", *overrides],
                       check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def train_all(out: Path, seeds: list[int], overrides: list[str]) -> None:
    times_path = out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    for seed in seeds:
        for arm in ARMS:
            d, first = out / arm / f"seed{seed}", out / arm / f"seed{seeds[0]}"
            if (d / "eval.json").is_file():
                continue
            if d != first:
                shutil.rmtree(d, ignore_errors=True)
            times[f"{arm}/seed{seed}"] = quickstart(arm, d, seed, first, overrides)
            times_path.write_text(json.dumps(times, indent=2) + "\n")
            sha = {json.loads((r / "student" / "potstill.json").read_text())["ledger_sha256"] for r in (d, first)}
            if len(sha) != 1:
                raise SystemExit(f"{d}: trained on another ledger than {first} (the teacher was asked again?)")
            acc = {m: json.loads((d / "eval.json").read_text())["models"][m]["accuracy"] for m in ("student", "baseline")}
            print(f"{arm} seed {seed}: KD {acc['student']:.3f}, SFT {acc['baseline']:.3f}, "
                  f"{times[f'{arm}/seed{seed}']:.0f} s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# cost


def prepare_costs(same_recipe, cross_recipe, rounds: int) -> dict:
    """CPU seconds per ledger row to turn rows into training examples: the teacher's ids as they are
    (same tokenizer), the text re-tokenized by the BPE (SFT), the top-k aligned onto the BPE (KD)."""
    from potstill.hf import load_tokenizer_dir
    from potstill.ledger import Ledger
    from potstill.train.examples import CrossTokenizer, build_examples

    def rows(recipe):
        with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
            return list(ledger.examples())

    same_rows, cross_rows = rows(same_recipe), rows(cross_recipe)
    teacher_tok = load_tokenizer_dir(same_recipe.teacher.path)
    bpe = load_tokenizer_dir(cross_recipe.student.tokenizer)
    start = time.process_time()
    cross = CrossTokenizer.build(bpe, {}, 20)
    build = time.process_time() - start
    arms = {"teacher's ids (same tokenizer)": lambda: build_examples(same_rows, teacher_tok, same_tokenizer=True),
            "text re-tokenized (BPE, SFT)": lambda: build_examples(cross_rows, bpe, same_tokenizer=False),
            "top-20 aligned (BPE, KD)": lambda: build_examples(cross_rows, bpe, same_tokenizer=False, cross=cross)}
    seconds = {name: [] for name in arms}
    for _ in range(rounds):
        for name, run in arms.items():
            start = time.process_time()
            run()
            seconds[name].append(time.process_time() - start)
    n = {"teacher's ids (same tokenizer)": len(same_rows)}
    counts = {k: v // rounds for k, v in cross.counts.items()}  # counted once a round
    return {"rows": {name: n.get(name, len(cross_rows)) for name in arms},
            "us_per_row": {name: 1e6 * statistics.median(s) / n.get(name, len(cross_rows)) for name, s in seconds.items()},
            "cross_tokenizer_build_s": build, "align_counts": counts}


def step_costs(setups: dict, rounds: int, steps: int) -> dict:
    """CPU milliseconds per optimizer step of each setup, interleaved rounds after a warm-up round;
    examples and completion tokens (the student's own) per CPU second."""
    from potstill.train.loop import train_step

    per_round = {name: [] for name in setups}
    examples = {name: 0 for name in setups}
    tokens = {name: 0 for name in setups}
    for rnd in range(rounds + 1):
        for name, s in setups.items():
            start = time.process_time()
            for k in range(steps):
                train_step(s, rnd * steps + k)
            seconds = time.process_time() - start
            if rnd:
                per_round[name].append(seconds / steps)
                for k in range(steps):
                    ids = s.plan.batch(rnd * steps + k)
                    examples[name] += len(ids)
                    tokens[name] += sum(s.data[i].n_completion for i in ids)
    out = {}
    for name, s in per_round.items():
        step = statistics.median(s)
        n_steps = rounds * steps
        out[name] = {"ms_per_step": 1000 * step, "rounds_ms": [1000 * x for x in s],
                     "examples_per_cpu_s": examples[name] / n_steps / step, "tokens_per_cpu_s": tokens[name] / n_steps / step,
                     "completion_tokens_per_example": tokens[name] / examples[name]}
    return out


def measure_cost(out: Path, seed: int, rounds: int, steps: int) -> None:
    import torch

    from potstill.pipeline import baseline_spec
    from potstill.recipe import load_recipe
    from potstill.train.loop import setup

    torch.set_num_threads(1)
    recipes = {}
    for arm in ARMS:  # copies: setup's terms gate writes to the ledger it reads
        d = out / "cost" / arm
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        shutil.copy(out / arm / f"seed{seed}" / "ledger.sqlite", d / "ledger.sqlite")
        recipes[arm] = load_recipe(out / arm / f"seed{seed}" / "recipe.yaml", [f"output_dir={d}"])
    result = {"prepare": prepare_costs(recipes["same"], recipes["cross"], rounds), "threads": torch.get_num_threads()}
    setups = {}
    for arm, recipe in recipes.items():
        for objective, spec in (("KD", recipe.train), ("SFT", baseline_spec(recipe))):
            setups[f"{arm} {objective}"] = s = setup(recipe, spec, f"cost-{arm}-{objective.lower()}")
            s.model.train()
    result["step"] = step_costs(setups, rounds, steps)
    (out / "cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'cost.json'}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# table


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    from scipy import stats

    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, mean - half, mean + half


def fieller(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) / mean(b) and Fieller's 95 % interval over paired samples (t with n - 1 degrees of
    freedom): the R with (mean(a) - R mean(b))^2 <= t^2 var(mean(a) - R mean(b)). Infinite ends
    when mean(b) is not itself clear of zero at that level."""
    from scipy import stats

    n = len(a)
    ma, mb = statistics.mean(a), statistics.mean(b)
    if mb == 0:
        return math.nan, -math.inf, math.inf
    if n < 2:
        return ma / mb, math.nan, math.nan
    t2 = stats.t.ppf(0.975, n - 1) ** 2
    saa, sbb = statistics.variance(a) / n, statistics.variance(b) / n
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (n - 1) / n
    qa, qb, qc = mb * mb - t2 * sbb, -2 * (ma * mb - t2 * sab), ma * ma - t2 * saa  # qa R^2 + qb R + qc <= 0
    disc = qb * qb - 4 * qa * qc
    if qa <= 0 or disc < 0:
        return ma / mb, -math.inf, math.inf
    root = math.sqrt(disc)
    return ma / mb, (-qb - root) / (2 * qa), (-qb + root) / (2 * qa)


def pm(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f}% ± {sd:.1f}%"


def table(out: Path, seeds: list[int]) -> None:
    done = [s for s in seeds if all((out / arm / f"seed{s}" / "eval.json").is_file() for arm in ARMS)]
    if len(done) < len(seeds):
        print(f"seeds with both arms evaluated: {done} (of {seeds})\n")
    evals = {(arm, s): json.loads((out / arm / f"seed{s}" / "eval.json").read_text())["models"]
             for arm in ARMS for s in done}
    acc = {(arm, m): [100 * evals[arm, s][m]["accuracy"] for s in done] for arm in ARMS for m in ("student", "baseline")}
    print("| seed | same KD | same SFT | same KD - SFT | cross KD | cross SFT | cross KD - SFT |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for i, s in enumerate(done):
        sk, ss, ck, cs = (acc[k][i] for k in (("same", "student"), ("same", "baseline"), ("cross", "student"),
                                             ("cross", "baseline")))
        print(f"| {s} | {sk:.1f}% | {ss:.1f}% | {sk - ss:+.1f} | {ck:.1f}% | {cs:.1f}% | {ck - cs:+.1f} |")
    print(f"| mean ± sd | {pm(acc['same', 'student'])} | {pm(acc['same', 'baseline'])} | | "
          f"{pm(acc['cross', 'student'])} | {pm(acc['cross', 'baseline'])} | |")
    teacher = statistics.mean(100 * evals["same", s]["teacher"]["accuracy"] for s in done)
    params = {arm: evals[arm, done[0]]["student"]["parameters"] for arm in ARMS}
    print(f"\nteacher {teacher:.1f}%; students: {params['same']:,} parameters (teacher's tokenizer), "
          f"{params['cross']:,} (BPE)")
    same_d = [k - b for k, b in zip(acc["same", "student"], acc["same", "baseline"])]
    cross_d = [k - b for k, b in zip(acc["cross", "student"], acc["cross", "baseline"])]
    print(f"\npaired over {len(done)} seeds, 95% t intervals:")
    for label, diffs in (("same-tokenizer KD - SFT", same_d), ("cross-tokenizer KD - SFT", cross_d),
                         ("cross KD - same KD", [c - s for c, s in zip(acc["cross", "student"], acc["same", "student"])]),
                         ("cross SFT - same SFT", [c - s for c, s in zip(acc["cross", "baseline"],
                                                                          acc["same", "baseline"])])):
        mean, lo, hi = t_interval(diffs)
        print(f"- {label}: {mean:+.1f} points [{lo:+.1f}, {hi:+.1f}]")
    ratio, lo, hi = fieller(cross_d, same_d)
    print(f"- share of the same-tokenizer gain recovered, mean(cross KD - SFT) / mean(same KD - SFT): {ratio:.0%} "
          f"(Fieller 95% [{lo:.0%}, {hi:.0%}])")
    skills = sorted(evals["same", done[0]]["teacher"]["accuracy_by_category"])
    print("\nper skill (mean over seeds):\n\n| model | " + " | ".join(skills) + " |\n|---|" + "---:|" * len(skills))
    for arm in ARMS:
        for m, label in (("student", "KD"), ("baseline", "SFT")):
            row = [statistics.mean(evals[arm, s][m]["accuracy_by_category"][k] for s in done) for k in skills]
            print(f"| {arm} {label} | " + " | ".join(f"{100 * v:.1f}%" for v in row) + " |")
    cost_table(out)


def cost_table(out: Path) -> None:
    if not (out / "cost.json").is_file():
        return
    cost = json.loads((out / "cost.json").read_text())
    prep, step = cost["prepare"], cost["step"]
    print(f"\nexamples from ledger rows, once before the first step ({cost['threads']} thread, CPU time, median of "
          f"rounds):\n\n| rows to examples | rows | µs per row |\n|---|---:|---:|")
    for name, us in prep["us_per_row"].items():
        print(f"| {name} | {prep['rows'][name]:,} | {us:,.0f} |")
    c = prep["align_counts"]
    print(f"\nBPE tables (token bytes, trie): {prep['cross_tokenizer_build_s'] * 1000:.0f} ms once; alignment: "
          f"{c.get('positions', 0):,} student tokens, {c.get('exact', 0) / max(c.get('positions', 1), 1):.0%} cut where "
          f"the teacher's are, {c.get('unmappable', 0):,} unmappable alternatives")
    print("\n| training step | CPU ms / step | examples / CPU s | completion tokens / CPU s | tokens / example |")
    print("|---|---:|---:|---:|---:|")
    for name, r in step.items():
        print(f"| {name} | {r['ms_per_step']:.1f} | {r['examples_per_cpu_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} | "
              f"{r['completion_tokens_per_example']:.2f} |")
    ratio = step["cross KD"]["ms_per_step"] / step["same KD"]["ms_per_step"]
    rounds = [c / s for c, s in zip(step["cross KD"]["rounds_ms"], step["same KD"]["rounds_ms"])]
    print(f"\ncached cross-tokenizer KD step / same-tokenizer KD step: {ratio:.2f}x (per round: "
          + ", ".join(f"{r:.2f}" for r in rounds) + ")")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-cross")
    p.add_argument("--stages", nargs="+", choices=["train", "cost", "table"], default=["train", "cost", "table"])
    p.add_argument("--rounds", type=int, default=5, help="cost: timed rounds (after one warm-up round)")
    p.add_argument("--steps", type=int, default=20, help="cost: optimizer steps per arm and round")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every quickstart (the smoke test's tiny cut)")
    args = p.parse_args()
    if "train" in args.stages:
        train_all(args.out, args.seeds, args.overrides)
    if "cost" in args.stages:
        measure_cost(args.out, args.seeds[0], args.rounds, args.steps)
    if "table" in args.stages:
        table(args.out, args.seeds)


if __name__ == "__main__":
    main()

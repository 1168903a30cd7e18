"""Radioactivity and lineage on students distilled from scratch, as the quickstart trains them.

    OMP_NUM_THREADS=1 python bench/audit_students.py [--out runs/bench-audit-students]
        [--plain-ledger L] [--null-students 30] [--null-epochs 2] [--gt-epochs 12] [--train-only]
    python bench/audit_students.py --out DIR --prompts 64 --probes 16 --lineage-probes 16 --shares 1 \
        --epochs 1 --gt-epochs 1 --gt-models 2 --stages shares gt report      # seconds: the script works

The bundled teacher answers the quickstart's 8,000 training prompts twice (`potstill generate`,
temperature 1, top-20 logprobs): once plain (or --plain-ledger, copied), once watermarked with
key K (gamma 0.25, delta 4, context 3: the cost table in bench/audit_bench.py). A student's
training data takes a random share of its rows from the watermarked ledger and the rest from the
plain one, exported to a JSONL with token ids and top-k logprobs and imported
(`teacher.backend: imported`), so every student goes through the same path. Each student is the
quickstart's 154k-parameter Llama trained from scratch by logit KD with `train.lr=0.0015`.

- **shares** (24 epochs = 3,000 steps): 100 / 25 / 10 / 5 % watermarked rows; radioactivity
  against K and 9 other keys (Holm) on the 8,000 training prompts, in sampling mode at
  temperature 1 and greedy, every token or only tokens chosen at entropy >= MIN_ENTROPY.
- **null**: students on the plain rows only, train seeds 1..N, --null-epochs each (the null does
  not depend on how long they trained: they never saw K, so their choices are independent of
  it); p for K, for the 9 other keys and for 10 fresh keys per student (no two students share a
  fresh key, so those p-values are independent given the students' pairs): Kolmogorov-Smirnov
  against Uniform(0,1) and the rate below 0.01 with its Clopper-Pearson 95 % interval.
- **lineage** (1,200 held-out prompts, the teacher's greedy answers): the three statistics of
  `potstill audit lineage`, match (each model's greedy answer against the teacher's),
  likelihood (the log-probability each model gives the teacher's answer) and kl (minus the KL
  divergence from the teacher's next-token distributions on its answer), on all prompts, the
  shuffle prompts (any permutation is right) and the prompts the teacher gets wrong. References
  are students trained by SFT from scratch on the task's ground-truth answers (seeds and shapes
  in GT_MODELS, --gt-epochs); a control is one more of them; suspects are the distilled
  students. Leave-one-out over the ground-truth models gives null runs.

Each student and audit is kept under --out and skipped when done, so a rerun resumes (train with
--train-only first, then audit). Prints markdown tables for docs/benchmarks.md. CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
QS = ROOT / "examples" / "quickstart"
TEACHER = QS / "teacher"
sys.path.insert(0, str(ROOT / "src"))

from potstill.audit.lineage import lineage_test, match_rates  # noqa: E402
from potstill.audit.radioactivity import local_samples, reading_pairs, sampling_pairs, score_keys  # noqa: E402
from potstill.hf import generate_ids, load_model_dir, prompt_ids  # noqa: E402
from potstill.ledger import Ledger  # noqa: E402
from potstill.prompts import load_prompts  # noqa: E402
from potstill.tasks.skillmix import verify  # noqa: E402
from potstill.watermark import Watermark  # noqa: E402

KEY = b"bench-audit-key-K-0123456789abcdef"
OTHERS = [b"bench-audit-other-key-%02d-abcdef" % i for i in range(9)]
GAMMA, DELTA, CTX = 0.25, 4.0, 3
LR = "0.0015"
# ground-truth models for lineage: (name, seed, hidden, intermediate, layers); the last is the control
GT_MODELS = [("gt-s1", 1, 64, 176, 3), ("gt-s2", 2, 64, 176, 3), ("gt-s3", 3, 64, 176, 3),
             ("gt-w48-l4", 4, 48, 132, 4), ("gt-w80-l2", 5, 80, 220, 2), ("gt-s6", 6, 64, 176, 3),
             ("gt-s8", 8, 64, 176, 3), ("gt-s9", 9, 64, 176, 3), ("gt-s10", 10, 64, 176, 3),
             ("gt-w56-l4", 11, 56, 154, 4), ("gt-w72-l3", 12, 72, 198, 3), ("gt-s13", 13, 64, 176, 3),
             ("gt-s14", 14, 64, 176, 3), ("gt-w48-l5", 15, 48, 132, 5),
             ("control", 7, 64, 176, 3)]


def cli(*args: str, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    with log.open("a") as f:
        subprocess.run([sys.executable, "-m", "potstill.cli", *args], check=True, stdout=f, stderr=f, env=env)


def ledger_rows(path: Path) -> dict[str, dict]:
    """Prompt id -> an importable JSONL row (messages, response, token ids, top-k logprobs)."""
    rows = {}
    with Ledger(path) as ledger:
        for ex in ledger.examples():
            rows[ex.meta["id"]] = {"id": ex.meta["id"], "messages": ex.messages, "response": ex.text,
                                   "finish_reason": ex.finish_reason, "token_ids": ex.token_ids.tolist(),
                                   "topk_ids": ex.topk_ids.tolist(), "topk_logprobs": ex.topk_logprobs.tolist()}
    return rows


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def mixed_rows(plain: dict, marked: dict, share: float) -> list[dict]:
    """The training prompts in their file's order, a random ``share`` of them (fixed seed) answered
    by the watermarked teacher and the rest by the plain one."""
    ids = sorted(plain.keys() & marked.keys())  # a --plain-ledger may hold more prompts than --prompts
    chosen = set(np.random.default_rng(0).permutation(len(ids))[:round(share * len(ids))].tolist())
    return [marked[i] if n in chosen else plain[i] for n, i in enumerate(ids)]


def train_student(out: Path, data: Path, overrides: list[str], imported: Path | None = None) -> float:
    """Import ``data`` (or copy the ledger of ``imported``, a folder that imported the same file)
    and train one student in ``out`` (skipped when done); returns train seconds."""
    done = out / "train-seconds.json"
    if done.is_file():
        return json.loads(done.read_text())
    recipe = [str(QS / "recipe.yaml"), f"output_dir={out}", "teacher.backend=imported", f"teacher.data={data}",
              f"teacher.tokenizer={TEACHER}", "baseline=null", f"train.lr={LR}", *overrides]
    if imported is not None and (imported / "ledger.sqlite").is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(imported / "ledger.sqlite", out / "ledger.sqlite")
    else:
        cli("generate", *recipe, log=out.parent / f"{out.name}.log")
    start = time.perf_counter()
    cli("train", *recipe, log=out.parent / f"{out.name}.log")
    seconds = time.perf_counter() - start
    done.write_text(json.dumps(seconds))
    return seconds


def keys_for(extra: list[bytes] = ()) -> list[Watermark]:
    return [Watermark(k, GAMMA, DELTA, CTX) for k in [KEY, *OTHERS, *extra]]


MIN_ENTROPY = 0.5  # nats; chosen on the 100 % student (0.1, 0.3, 0.5, 1 gave similar p), then fixed


def radioactivity(student_dir: Path, tok, probes: list, keys: list[Watermark], skip: set[int]) -> dict:
    """One student against ``keys`` (Holm over them), as `potstill audit radioactivity` runs it:
    sampling mode with one answer per probe at temperature 1 (the old default) and at temperature 0
    (greedy, the default now), every token, then only tokens chosen at entropy >= MIN_ENTROPY."""
    from potstill.audit.radioactivity import next_token_view

    model, _ = load_model_dir(student_dir)
    start = time.perf_counter()
    out = {}
    for temperature, modes in ((1.0, ("sampling", "sampling-h")), (0.0, ("greedy", "greedy-h"))):
        rows, answers = local_samples(model, tok, probes, 12, temperature=temperature)
        entropy = next_token_view(model, [p + a for p, a in zip(rows, answers)], vocab=len(tok))[1]
        for mode, h in zip(modes, (0.0, MIN_ENTROPY)):
            out[mode] = score_keys(sampling_pairs(rows, answers, CTX, skip, entropy, h), keys, "sampling")
    out["seconds"] = time.perf_counter() - start
    return out


MODES = {"sampling": "temperature 1, every token", "sampling-h": f"temperature 1, entropy >= {MIN_ENTROPY}",
         "greedy": "greedy, every token", "greedy-h": f"greedy, entropy >= {MIN_ENTROPY}"}


def greedy_answers(model_dir: Path, prompts) -> list[str]:
    model, tok = load_model_dir(model_dir)
    params = {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_logprobs": 0}
    rows = [prompt_ids(tok, p.chat) for p in prompts]
    out = []
    for i in range(0, len(rows), 256):
        out += [c.text for c in generate_ids(model, tok, rows[i:i + 256], params, 0, [""] * len(rows[i:i + 256]))]
    return out


def cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value))
    return value


def fmt_row(name: str, mode: str, r: dict) -> str:
    k = r["keys"]
    return (f"| {name} | {mode} | {k[0]['p_holm']:.2g} | {min(x['p_holm'] for x in k[1:10]):.2g} | "
            f"{k[0]['tokens']:,} | {k[0]['green'] / max(1, k[0]['tokens']):.3f} |")



def calibration(pv: list[float]) -> str:
    """Null p-values against Uniform(0,1): KS test, and the rate below alpha = 0.01 with its exact 95% interval."""
    ks = stats.kstest(pv, "uniform")
    fp = sum(v < 0.01 for v in pv)
    ci = stats.binomtest(fp, len(pv), 0.01).proportion_ci(0.95, "exact")
    return (f"{len(pv)} p-values, KS statistic {ks.statistic:.3f}, p = {ks.pvalue:.3g}; below 0.01: {fp}/{len(pv)} = "
            f"{fp / len(pv):.3f} (95% CI {ci.low:.3f}-{ci.high:.3f}); mean p {np.mean(pv):.3f}")

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-audit-students")
    p.add_argument("--plain-ledger", type=Path, help="an unwatermarked quickstart ledger to reuse (copied, never "
                   "written); default: generate one")
    p.add_argument("--prompts", type=int, default=None, help="training prompts the teacher answers (default: "
                   "all 8,000)")
    p.add_argument("--probes", type=int, default=8000, help="training prompts the suspects answer (radioactivity)")
    p.add_argument("--null-probes", type=int, default=4000, help="training prompts the null students answer")
    p.add_argument("--lineage-probes", type=int, default=1200, help="held-out prompts for lineage")
    p.add_argument("--shares", type=float, nargs="*", default=[1.0, 0.25, 0.1, 0.05])
    p.add_argument("--null-students", type=int, default=30)
    p.add_argument("--epochs", type=int, default=24, help="share students (the quickstart's 24)")
    p.add_argument("--gt-epochs", type=int, default=12, help="ground-truth students (lineage references)")
    p.add_argument("--gt-models", type=int, default=len(GT_MODELS), help="train the first N of GT_MODELS "
                   f"(default: all {len(GT_MODELS)}, the last being the control)")
    p.add_argument("--null-epochs", type=int, default=2)
    p.add_argument("--train-only", action="store_true", help="train the students, audit nothing")
    p.add_argument("--audit-only", action="store_true", help="audit the students already trained, train nothing")
    p.add_argument("--stages", nargs="*", default=["shares", "gt", "null", "report"])
    p.add_argument("--context", type=int, default=3, help="the watermark's context width (default 3); "
                   "use a fresh --out for another width (its ledgers and students are the width's own)")
    args = p.parse_args()
    globals()["CTX"] = args.context  # a bench script's one setting, read by keys_for and the pair scorers
    torch.set_num_threads(1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tok = load_model_dir(TEACHER)[1]
    skip = {tok.eos_token_id}
    probes = [q.chat for q in load_prompts(QS / "prompts" / "train.jsonl", args.probes)]

    # the two teacher ledgers
    (out / "K.key").write_bytes(KEY)
    data = out / "data"
    data.mkdir(exist_ok=True)
    gen = [str(QS / "recipe.yaml"), "baseline=null", *([f"prompts.limit={args.prompts}"] if args.prompts else [])]
    marked_ledger = out / "teacher-wm" / "ledger.sqlite"
    if not (data / "share1.jsonl").is_file():  # generate resumes a ledger an interrupted run left
        cli("generate", *gen, f"output_dir={marked_ledger.parent}", f"teacher.watermark.key_file={out / 'K.key'}",
            f"teacher.watermark.gamma={GAMMA}", f"teacher.watermark.delta={DELTA}", f"teacher.watermark.context={CTX}",
            log=out / "generate.log")
    plain_ledger = out / "teacher-plain" / "ledger.sqlite"
    if args.plain_ledger and not plain_ledger.is_file():
        plain_ledger.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.plain_ledger, plain_ledger)  # opening a ledger may write to it: never the original
    if not (data / "share1.jsonl").is_file():
        cli("generate", *gen, f"output_dir={plain_ledger.parent}", log=out / "generate.log")
    if not all((data / f"share{share:g}.jsonl").is_file() for share in {*args.shares, 0.0}):
        plain, marked = ledger_rows(plain_ledger), ledger_rows(marked_ledger)
        for share in {*args.shares, 0.0}:  # share 0: the null students' data
            write_jsonl(data / f"share{share:g}.jsonl", mixed_rows(plain, marked, share))
        truth = load_prompts(QS / "prompts" / "train.jsonl", args.prompts)
        write_jsonl(data / "truth.jsonl", ({"id": q.meta["id"], "messages": q.chat, "response": q.meta["answer"]}
                                           for q in truth))

    students = out / "students"
    students.mkdir(exist_ok=True)
    audits = out / "audits"
    audits.mkdir(exist_ok=True)
    if "shares" in args.stages:
        for share in args.shares:
            name = f"kd-share{share:g}"
            if args.audit_only and not (students / name / "train-seconds.json").is_file():
                continue
            secs = train_student(students / name, data / f"share{share:g}.jsonl", [f"train.epochs={args.epochs}"])
            if args.train_only:
                continue
            r = cached(audits / f"{name}.json", lambda: radioactivity(students / name / "student", tok, probes,
                                                                       keys_for(), skip))
            print(f"{name}: trained {secs:.0f} s; " + ", ".join(f"{m} p(K) {r[m]['keys'][0]['p_holm']:.3g}"
                                                                 for m in MODES), flush=True)
    if "null" in args.stages:
        for seed in range(1, args.null_students + 1):
            name = f"null-s{seed}"
            if args.audit_only and not (students / name / "train-seconds.json").is_file():
                continue
            secs = train_student(students / name, data / "share0.jsonl",
                                 [f"train.seed={seed}", f"train.epochs={args.null_epochs}"], students / "null-s1")
            if args.train_only:
                continue
            fresh = [b"bench-null-student-%03d-key-%02d" % (seed, i) for i in range(10)]
            r = cached(audits / f"{name}.json", lambda: radioactivity(
                students / name / "student", tok, probes[:args.null_probes], keys_for(fresh), skip))
            print(f"{name}: trained {secs:.0f} s; " + ", ".join(f"{m} p(K) {r[m]['keys'][0]['p_value']:.3g}"
                                                                 for m in MODES), flush=True)
    if "gt" in args.stages:
        for name, seed, hidden, inter, layers in GT_MODELS[:args.gt_models]:
            secs = train_student(students / name, data / "truth.jsonl",
                                 ["train.objective=sft", f"train.seed={seed}", f"train.epochs={args.gt_epochs}",
                                  f"student.config.hidden_size={hidden}", f"student.config.intermediate_size={inter}",
                                  f"student.config.num_hidden_layers={layers}"], students / GT_MODELS[0][0])
            print(f"{name}: trained {secs:.0f} s", flush=True)
    if "report" in args.stages and not args.train_only:
        report(args, out, students, audits)


def report(args, out: Path, students: Path, audits: Path) -> None:
    print("\n## Radioactivity by share of watermarked training data (KD from scratch)\n")
    print("| student | mode | p for K (Holm, 10 keys) | smallest other-key p | distinct pairs | green share |")
    print("|---|---|---|---|---|---|")
    for share in args.shares:
        f = audits / f"kd-share{share:g}.json"
        if f.is_file():
            r = json.loads(f.read_text())
            for mode in MODES:
                print(fmt_row(f"{share:.0%}", MODES[mode], r[mode]))

    nulls = sorted(audits.glob("null-s*.json"), key=lambda f: int(f.stem.split("-s")[1]))
    if nulls:
        print(f"\n## Null students ({len(nulls)}, {args.null_epochs} epochs each)\n")
        for mode in MODES:
            res = [json.loads(f.read_text())[mode]["keys"] for f in nulls]
            k_p = [r[0]["p_value"] for r in res]
            named = [x["p_value"] for r in res for x in r[:10]]
            fresh = [x["p_value"] for r in res for x in r[10:]]
            for label, pv in (("K", k_p), ("K and 9 other keys", named), ("10 fresh keys each", fresh)):
                print(f"- {mode}, {label}: {calibration(pv)}; Holm p(K) < 0.01 in "
                      f"{sum(r[0]['p_holm'] < 0.01 for r in res)} students; pairs "
                      f"{min(r[0]['tokens'] for r in res):,}-{max(r[0]['tokens'] for r in res):,}")

    fresh = cached(audits / "share-students-fresh-keys.json", lambda: fresh_key_nulls(args, students))
    if fresh:
        pv = [v for ps in fresh.values() for v in ps]
        print(f"\n- the {len(fresh)} share students (24 epochs), greedy, entropy >= {MIN_ENTROPY}, 100 fresh keys "
              f"each: {calibration(pv)}")

    lineage_report(args, out, students)


def fresh_key_nulls(args, students: Path) -> dict:
    """Each fully trained share student's greedy, entropy-filtered pairs against 100 keys nobody
    used: null tests of the headline setting on students as long-trained as the flagged one."""
    from potstill.audit.radioactivity import next_token_view

    tok = load_model_dir(TEACHER)[1]
    probes = [q.chat for q in load_prompts(QS / "prompts" / "train.jsonl", args.probes)]
    out = {}
    for share in args.shares:
        d = students / f"kd-share{share:g}" / "student"
        if not (d / "model.safetensors").is_file():
            continue
        model, _ = load_model_dir(d)
        rows, answers = local_samples(model, tok, probes, 12, temperature=0.0)
        entropy = next_token_view(model, [p + a for p, a in zip(rows, answers)], vocab=len(tok))[1]
        pairs = sampling_pairs(rows, answers, CTX, {tok.eos_token_id}, entropy, MIN_ENTROPY)
        keys = [Watermark(b"bench-fresh-%g-key-%03d-xxxxxx" % (share, i), GAMMA, DELTA, CTX) for i in range(100)]
        out[str(share)] = [k["p_value"] for k in score_keys(pairs, keys, "sampling")["keys"]]
    return out


def lineage_report(args, out: Path, students: Path) -> None:
    from potstill.audit.lineage import LocalModel, kl_scores

    held = load_prompts(QS / "prompts" / "heldout.jsonl", args.lineage_probes)
    ans_dir = out / f"answers-{len(held)}"
    ans_dir.mkdir(exist_ok=True)
    models = {"teacher": TEACHER}
    for d in sorted(students.iterdir()):
        if (d / "student" / "model.safetensors").is_file():
            models[d.name] = d / "student"
    answers = {name: cached(ans_dir / f"{name}.json", lambda: greedy_answers(path, held))
               for name, path in models.items()}
    print(f"\n## Greedy held-out accuracy ({len(held)} prompts)\n")
    print(" ".join(f"{n}: {np.mean([verify(q.text, a) for q, a in zip(held, ans)]):.1%};"
                   for n, ans in answers.items()))
    tok = load_model_dir(TEACHER)[1]

    def tokenize(t):
        return tok(t, add_special_tokens=False)["input_ids"]

    gts = [g[0] for g in GT_MODELS if g[0] in answers]
    refs = [g for g in gts if g != "control"]
    teacher = answers["teacher"]
    if len(refs) < 2:
        return
    texts = [q.chat[-1]["content"] for q in held]
    # per prompt and model: match rate of its greedy answer, log-probability of the teacher's answer,
    # and minus KL(teacher || model) on it
    scores = {"match": {n: match_rates(teacher, a, tokenize) for n, a in answers.items() if n != "teacher"},
              "likelihood": {n: cached(ans_dir / f"logprob-{n}.json",
                                       lambda: LocalModel(p).answer_logprobs(texts, teacher, batch_size=128))
                             for n, p in models.items() if n != "teacher"}}
    t_model = LocalModel(TEACHER)
    scores["kl"] = {n: cached(ans_dir / f"kl-{n}.json", lambda: kl_scores(t_model, LocalModel(p), texts, teacher, 128))
                    for n, p in models.items() if n != "teacher"}
    shuffle = [i for i, q in enumerate(held) if q.meta.get("skill") == "shuffle"]
    wrong = [i for i, (q, a) in enumerate(zip(held, teacher)) if not verify(q.text, a)]

    def test(statistic, s, refs, only=None):
        pick = (lambda xs: [xs[i] for i in only]) if only else (lambda xs: xs)
        got = scores[statistic]
        return lineage_test(pick(got[s]), {g: pick(got[g]) for g in refs}, statistic)

    subsets = {"all prompts": None, "shuffle prompts": shuffle, "prompts the teacher gets wrong": wrong}
    suspects = [n for n in answers if n.startswith("kd-share")] + ["control"] + \
        [n for n in answers if n.startswith("null-s")][:5]
    for statistic in scores:
        print(f"\n## Lineage ({statistic}) against {len(refs)} ground-truth references ({len(held)} held-out "
              f"prompts; {len(shuffle)} shuffle prompts, where any permutation is right, and {len(wrong)} the "
              f"teacher gets wrong: matching the teacher on those is not competence)\n")
        print("| suspect | " + " | ".join(f"{k}: suspect, best reference, p" for k in subsets) + " |")
        print("|---|" + "---|" * len(subsets))
        for s in suspects:
            if s in answers:
                cells = []
                for only in subsets.values():
                    r = test(statistic, s, refs, only)
                    cells.append(f"{r['suspect_score']:.3f}, {max(x['score'] for x in r['references']):.3f}, "
                                 f"{r['p_value']:.2g}")
                print(f"| {s} | " + " | ".join(cells) + " |")
        for label, only in subsets.items():
            # leave one out: every ground-truth model as the suspect, the others as references
            loo = [test(statistic, s, [g for g in gts if g != s], only)["p_value"] for s in gts]
            print(f"\nleave-one-out null over {len(gts)} ground-truth models, {label} (each against the other "
                  f"{len(gts) - 1}): p = {', '.join(f'{v:.2g}' for v in loo)}; below 0.05: "
                  f"{sum(v < 0.05 for v in loo)}, below 0.01: {sum(v < 0.01 for v in loo)}")


if __name__ == "__main__":
    main()

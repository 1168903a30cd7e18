"""The potstill command line: one verb per stage, plus `run` (all stages) and `quickstart`.

Examples:
  potstill quickstart --out runs/quickstart
  potstill run examples/quickstart/recipe.yaml train.temperature=2.0 output_dir=runs/t2
  potstill generate my_recipe.yaml generation.batch_size=32
  potstill generate my_recipe.yaml --shard 3/8          (then: potstill merge RUN/ledger.sqlite RUN/ledger-shard-*)
  potstill serve examples/quickstart/teacher --port 8000
  potstill import chats.jsonl runs/x/ledger.sqlite --teacher-id gpt-4o
  potstill train my_recipe.yaml train.objective=sft
  potstill eval my_recipe.yaml
  potstill report runs/quickstart
  potstill report runs/a runs/b --out compare.html
  potstill terms list
  potstill terms check runs/quickstart --use commercial
  potstill verify runs/quickstart                      (--row HASH: one row's inclusion proof)
  potstill doctor path/to/teacher path/to/student  (--prompts my_prompts.jsonl: encode those by both too)
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sqlite3
import sys
from pathlib import Path

from potstill.errors import PotstillError

# the bundled quickstart: package data in an installed wheel, examples/quickstart/ in a checkout
QUICKSTART_DIRS = (Path(__file__).resolve().parent / "quickstart",
                   Path(__file__).resolve().parents[2] / "examples" / "quickstart")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging

    logging.disable_progress_bar()


def _recipe(args):
    from potstill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    args.run_dir = recipe.run_dir  # where a write without a file name (a full disk) was going
    return recipe


def print_summary(eval_report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from potstill.report import COLUMNS, summary_rows

    table = Table(title=f"held-out prompts: {eval_report['prompts']['n']}")
    table.add_column("model")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for row in summary_rows(eval_report):
        table.add_row(*row)
    console = Console(width=max(Console().width, 120))  # ten columns: no cell cut short
    console.print(table)
    console.print("retention: accuracy / the teacher's accuracy; agree: same answer as the teacher; KL/tok: KL(teacher || model) per token of the teacher's "
                  "answers; KL/byte: log p_teacher - log p_model of those answers per byte, in each model's own tokens; top-1: same argmax as the teacher there; accept: the chance the teacher keeps a token the model drafts "
                  "(speculative decoding; sum of min(p, q) at the sampling temperature; report.html has it by position and "
                  "the measured speed-up); tok/s: batched greedy generation")
    for name, m in eval_report["models"].items():
        for why in sorted(set(m.get("not_applicable", {}).values())):
            console.print(f"n/a for {name}: {why}")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PotstillError(f"--shard {text!r}: give i/n, e.g. 0/8 (shards are numbered from 0)") from None
    if not 0 <= i < n:
        raise PotstillError(f"--shard {text}: i must be in 0..{n - 1}")
    return i, n


def cmd_generate(args) -> int:
    from potstill.generate import generate

    return print_generated(generate(_recipe(args), shard=parse_shard(args.shard)))


def print_generated(counts: dict) -> int:
    """generate's counts, notes and failures; 1 if a request failed for good, else 0."""
    spend = counts["spend"]
    paid = f"; {spend['requests']} HTTP sends, ${spend['cost']:.4f}" if spend["requests"] else ""
    print(f"generate: sent {counts['sent']}, done {counts['done']}, failed {counts['failed']} "
          f"(of {counts['planned']} planned){paid}")
    for note in counts.get("notes", []):
        print(f"generate: note: {note}")
    return print_failures(counts)


def print_failures(counts: dict) -> int:
    """Requests that failed for good, grouped by reason, on stderr; 1 if there were any (a rerun
    sends them again), else 0."""
    failures = counts.get("failures") or []
    if failures:
        print(f"generate: {sum(n for _, n in failures)} requests failed for good (kept out of training; a rerun "
              f"sends them again):", file=sys.stderr)
        for reason, n in failures[:5]:
            print(f"  {n} x {reason}", file=sys.stderr)
        if len(failures) > 5:
            print(f"  ... and {len(failures) - 5} other reasons (the ledger's requests.error)", file=sys.stderr)
    return 1 if failures else 0


def cmd_serve(args) -> None:
    from potstill.devices import resolve_device
    from potstill.serve import ServeSpec, serve

    api_key = args.api_key
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise PotstillError(f"--api-key-env names {args.api_key_env}, which is not set: export it first")
    spec = ServeSpec(host=args.host, port=args.port, model_name=args.model_name, dtype=args.dtype,
                     device=resolve_device(args.device, "--device"), max_batch_size=args.max_batch_size,
                     batch_wait_ms=args.batch_wait_ms, exact_seeds=args.exact_seeds, api_key=api_key,
                     max_body_mb=args.max_body_mb, max_messages=args.max_messages,
                     watermark=watermark_of(args) if args.watermark_key_file else None)
    serve(args.model_dir, spec)


def watermark_of(args):
    from potstill.watermark import load_watermark

    return load_watermark(args.watermark_key_file, args.watermark_gamma, args.watermark_delta, args.watermark_context)


def port_number(text: str) -> int:
    """--port, checked when the arguments are parsed: before a model loads."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 0..65535 (0 picks a free one)")
    return port


def cmd_merge(args) -> None:
    from potstill.ledger.merge import merge_ledgers

    counts = merge_ledgers(Path(args.out), [Path(p) for p in args.inputs])
    print("merge: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if counts.get("conflicts"):
        print(f"merge: warning: {counts['conflicts']} requests had different completions in two inputs; the first "
              f"input's was kept", file=sys.stderr)


def cmd_import(args) -> None:
    from potstill.teachers.imported import import_file
    from potstill.ledger import Ledger, exclusive
    from potstill.hf import load_tokenizer_dir

    with exclusive(Path(args.ledger)), Ledger(args.ledger) as ledger:
        counts = import_file(ledger, args.file, format=args.format, teacher_id=args.teacher_id,
                             terms_family=args.terms_family, terms_url=args.terms_url,
                             n_tokens=None if args.tokenizer is None else len(load_tokenizer_dir(args.tokenizer, "teacher tokenizer")))
    print("import: " + ", ".join(f"{k} {counts[k]}" for k in ("read", "new", "already", "skipped")))
    for reason, info in counts.get("skipped_reasons", {}).items():
        print(f"  skipped: {reason}: {info}")


def cmd_train(args) -> None:
    from potstill.pipeline import students, train_students
    from potstill.train import check_outputs
    from potstill.train.distributed import check_launch

    recipe = _recipe(args)
    check_launch(recipe.device_for("train"))  # before any work: a launch that would not distribute as it says
    for name, _ in students(recipe):  # before the first student trains, not after
        check_outputs(recipe.run_dir, name)
    train_students(recipe, students(recipe), args.accept_terms_risk)


def cmd_eval(args) -> None:
    from potstill.evaluate import evaluate

    if _other_rank():  # under a launcher eval runs once, in the first process (eval.json records one process)
        return
    print_summary(evaluate(_recipe(args)))


def cmd_report(args) -> None:
    from potstill.report import write_report

    print(f"report: wrote {write_report(args.runs, args.out)}")


def cmd_run(args) -> int:
    from potstill.pipeline import run_all
    from potstill.train.distributed import check_launch

    recipe = _recipe(args)
    check_launch(recipe.device_for("train"))  # before generate: a launch that would not distribute as it says
    codes = []  # generate's exit code: 1 if requests failed for good
    report = run_all(recipe, args.accept_terms_risk, generated=lambda counts: codes.append(print_generated(counts)))
    if report:  # {} in the other processes of a launch: the first evaluated
        print_summary(report)
    return finished_despite(codes)


def finished_despite(codes: list[int]) -> int:
    """1, with one line on stderr, when the run went on without requests that failed for good."""
    if any(codes):
        print("run: finished without the requests that failed for good (listed above): the students trained on the "
              "rest; a rerun sends those again", file=sys.stderr)
        return 1
    return 0


def cmd_quickstart(args) -> int:
    from potstill.pipeline import run_all
    from potstill.recipe import load_recipe

    found = [d / "recipe.yaml" for d in QUICKSTART_DIRS if (d / "recipe.yaml").is_file()]
    if not found:
        raise PotstillError(f"the bundled quickstart is missing (looked in {', '.join(map(str, QUICKSTART_DIRS))}): "
                            f"reinstall potstill")
    codes = []

    def generated(counts: dict) -> None:
        codes.append(print_generated(counts))

    if args.student_tokenizer == "bpe":
        from potstill.quickstart_cross import run_cross

        recipe, report = run_cross(found[0], args.out, args.overrides, generated)
    else:
        recipe = load_recipe(found[0], [f"output_dir={args.out}", *args.overrides])
        report = run_all(recipe, generated=generated)
    print_summary(report)
    print(f"open {recipe.run_dir / 'report.html'} for plots and samples")
    return finished_despite(codes)


def cmd_terms(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from potstill.receipts.terms.gate import NOT_ADVICE, USES, check, registry

    console = Console(width=max(Console().width, 120))
    if args.action == "list":
        table = Table(title="potstill terms registry: may a teacher's outputs train a student for this use?")
        for col in ("family", "name", *USES, "licence", "verified", "url"):
            table.add_column(col)
        for f in registry().values():
            table.add_row(f.key, f.name, *(f.uses[u] for u in USES), f.licence, "yes" if f.verified else "no",
                          f.url or "-")
        console.print(table)
        console.print("review: allowed only under the condition in the registry, declared in the recipe "
                      f"(teacher.terms_declared). Unmatched teachers are unknown. {NOT_ADVICE}.")
        return 0
    if args.run is None:
        raise PotstillError("potstill terms check RUN --use USE: give the run directory")
    from potstill.ledger import Ledger

    ledger_path = Path(args.run) / "ledger.sqlite"
    if not ledger_path.is_file():
        raise PotstillError(f"{ledger_path} not found: give a run directory that has a ledger")
    from potstill.receipts.terms.export import trusted_teachers

    with Ledger(ledger_path) as ledger:
        trusted_teachers(ledger, None)  # as train does: a teacher row edited or moved is not judged
        described = ledger.teachers()
        teachers = [(described.get(k, {"id": k[:12]}), n) for k, n in sorted(ledger.teacher_rows(None).items())]
    terms = check(teachers, args.use)
    table = Table(title=f"{args.run}: every teacher with rows in the ledger, for use {args.use}")
    for col in ("teacher", "rows", "family", "matched by", "verdict", "evidence", "clause", "url"):
        table.add_column(col, overflow="fold")  # ids and URLs whole, never cut to "..."
    for t in terms:
        f = registry()[t.family]
        verdict = t.verdict + (f" (contradiction: {t.contradiction})" if t.contradiction else "")
        table.add_row(t.teacher_id, f"{t.rows:,}", t.family, t.matched_by, verdict,
                      "\n".join(str(e) for e in t.evidence), f.clause, f.url or "-")
    console.print(table)
    console.print(NOT_ADVICE + ".")
    return 0 if all(t.passes for t in terms) else 1


def cmd_verify(args) -> int:
    from potstill.receipts import manifest

    folder = Path(args.run) / args.student
    if args.row is not None:
        rows = manifest.read(folder)
        hits = [i for i, (h, _) in enumerate(rows) if h.startswith(args.row.lower())]
        if len(hits) != 1:
            raise PotstillError(f"--row {args.row}: {'no' if not hits else len(hits)} rows of {folder / manifest.MANIFEST} "
                                f"have a request hash starting so; give more of the hash")
        leaves = [leaf for _, leaf in rows]
        path = manifest.inclusion_proof(leaves, hits[0])
        root = manifest.merkle_root(leaves)
        print(f"row {hits[0]} of {len(rows)}: request {rows[hits[0]][0]}\nleaf    {leaves[hits[0]].hex()}")
        for side, sibling in path:
            print(f"{side:<7} {sibling.hex()}")
        ok = manifest.proof_root(leaves[hits[0]], path) == root
        info_path = folder / "potstill.json"
        recorded = json.loads(info_path.read_text()).get("manifest_merkle_root") if info_path.is_file() else None
        print(f"root    {root.hex()} ({'the path leads to it' if ok else 'THE PATH DOES NOT LEAD TO IT'}; "
              f"{'matches' if root.hex() == recorded else 'DOES NOT MATCH'} potstill.json)")
        problems, held = manifest.row_problems(folder, Path(args.run) / "ledger.sqlite", hits[0], rows)
        for line in [f"ok: {held}"] if held else [f"FAILED: {p}" for p in problems]:
            print(f"verify: {line}")
        return 0 if ok and root.hex() == recorded and not problems else 1
    problems, notes, passed = manifest.verify(folder, Path(args.run) / "ledger.sqlite")
    for prefix, lines in (("ok", passed), ("note", notes), ("FAILED", problems)):
        for line in lines:
            print(f"verify: {prefix}: {line}")
    return 1 if problems else 0


def cmd_doctor(args) -> None:
    from potstill.train.tokenizer_match import doctor

    for line in doctor(args.teacher, args.student, args.prompts):
        print(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potstill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    add_quickstart(verbs)
    add_stages(verbs)
    add_terms(verbs)
    add_verify(verbs)
    add_doctor(verbs)
    add_serve(verbs)
    add_merge(verbs)
    add_import(verbs)
    from potstill.audit.commands import add_parser as add_audit

    add_audit(verbs)
    add_report(verbs)
    return parser


def add_quickstart(verbs) -> None:
    q = verbs.add_parser("quickstart", help="the whole pipeline on the bundled teacher (about 5 minutes on 2 CPU cores)")
    q.add_argument("--out", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    q.add_argument("--student-tokenizer", choices=["teacher", "bpe"], default="teacher", help="teacher (default): the "
                   "student reads text with the teacher's tokenizer and trains on its token ids and top-20. bpe: the "
                   "student has a tokenizer of its own, a byte-level BPE of 512 tokens trained first on the training "
                   "prompts (RUN/student-tokenizer), and the teacher is asked as an API teacher is: the bundled teacher "
                   "behind `potstill serve` on a free loopback port (stopped at the end), answering with each token's "
                   "bytes and its top-20 as (bytes, logprob), no ids; the KD student learns from that top-20 mapped "
                   "onto its own tokens (potstill.align), the SFT baseline from the text. About as long as the "
                   "quickstart")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the bundled recipe "
                   "(examples/quickstart/recipe.yaml, installed as potstill/quickstart/recipe.yaml)")
    q.set_defaults(func=cmd_quickstart)


def add_stages(verbs) -> None:
    """The verbs that take a recipe and its overrides: run, generate, train, eval."""
    accept_terms_risk(with_recipe(verbs, "run", cmd_run, "run every stage, resuming whatever is already done"))
    g = with_recipe(verbs, "generate", cmd_generate, "ask the teacher for every prompt not yet in the ledger")
    g.add_argument("--shard", default=None, metavar="i/n", help="only shard i of n (from 0) of the requests, into "
                   "RUN/ledger-shard-i-of-n.sqlite, e.g. --shard $SLURM_ARRAY_TASK_ID/8")
    accept_terms_risk(with_recipe(verbs, "train", cmd_train, "train the student (and the baseline, if the recipe has "
                                                             "one) on the ledger, after checking the teacher's terms "
                                                             "against the recipe's use"))
    with_recipe(verbs, "eval", cmd_eval, "evaluate teacher, student and baseline on the held-out prompts")


def with_recipe(verbs, name, func, help_) -> argparse.ArgumentParser:
    p = verbs.add_parser(name, help=help_, description=help_)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")
    p.set_defaults(func=func)
    return p


def accept_terms_risk(p) -> None:
    p.add_argument("--accept-terms-risk", metavar="REASON", default=None,
                   help="train although the terms gate refuses (a teacher's terms forbid the recipe's `use`, or "
                        "are unknown); REASON is kept in the ledger and the model card. The gate is a "
                        "record-keeping aid, not legal advice")


def add_terms(verbs) -> None:
    t = verbs.add_parser("terms", help="the terms registry (list), or the verdict for every teacher of a run (check)",
                         description="potstill terms list: every terms family and its verdict per intended use. "
                                     "potstill terms check RUN --use USE: the verdict for each teacher with rows in "
                                     "RUN's ledger (exit 1 when one would stop train). A record-keeping aid, not "
                                     "legal advice.")
    t.add_argument("action", choices=["list", "check"])
    t.add_argument("run", nargs="?", default=None, help="check: the run directory")
    t.add_argument("--use", default="commercial", choices=["research", "internal", "commercial", "competing"],
                   help="check: the intended use of the student (default: commercial)")
    t.set_defaults(func=cmd_terms)


def add_verify(verbs) -> None:
    v = verbs.add_parser("verify", help="check a trained student against its ledger and potstill.json: Merkle "
                         "manifest, every file train wrote, the card", description="Recompute the Merkle root of the "
                         "ledger rows STUDENT was trained on and name the first row that differs; check the sha256 of "
                         "every file train wrote into the student's folder (weights, config, tokenizer, TERMS.md, "
                         "model.spdx3.json, ...) and name any missing, edited or added; check the card against the one "
                         "train wrote (naming each field and the first line that differ), its evaluation section "
                         "against RUN/eval.json, and its teachers and shares against the ledger. One line per check "
                         "that held; exit 1 if anything differs.")
    v.add_argument("run", help="run directory")
    v.add_argument("--student", default="student", help="the student's folder in the run (default: student)")
    v.add_argument("--row", metavar="HASH", default=None, help="print the inclusion proof of the row with this "
                   "request hash (or a unique prefix): its path to the root, without any other row's content; and "
                   "check that row's leaf against the ledger")
    v.set_defaults(func=cmd_verify)


def add_doctor(verbs) -> None:
    d = verbs.add_parser("doctor", help="can STUDENT learn from TEACHER's logits? (tokenizers, vocabulary, chat template)")
    d.add_argument("teacher", help="teacher model folder")
    d.add_argument("student", help="student model folder (or any folder with a tokenizer and config.json)")
    d.add_argument("--prompts", default=None, metavar="JSONL", help="a prompt file (as prompts.path): its first 200 "
                   "prompts and their answers are encoded by both tokenizers too, besides built-in probe texts")
    d.set_defaults(func=cmd_doctor)


def add_serve(verbs) -> None:
    s = verbs.add_parser("serve", help="serve a local model folder over an OpenAI-compatible HTTP API",
                         description="An OpenAI-compatible server (/v1/models, /v1/chat/completions, /v1/completions: "
                                     "logprobs, echo scoring, streaming, batching) for a Hugging Face model folder.")
    s.add_argument("model_dir", help="Hugging Face model folder (safetensors)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port_number, default=8000)
    s.add_argument("--model-name", default=None, help="the model id clients ask for (default: the folder name)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, mps, cuda or cuda:N")
    s.add_argument("--max-batch-size", type=int, default=32, help="rows per batched generate call")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to gather requests into a batch")
    s.add_argument("--exact-seeds", action="store_true", help="run each seeded sampled request alone, so its seed "
                   "alone decides its samples (default: batched; a seed reproduces a sample in the same batch)")
    key = s.add_mutually_exclusive_group()
    key.add_argument("--api-key-env", metavar="VAR", help="require the API key held in environment variable VAR "
                     "(Authorization: Bearer KEY) on every route")
    key.add_argument("--api-key", help="require this API key on every route (visible to other local users in the "
                     "process list: prefer --api-key-env)")
    s.add_argument("--watermark-key-file", metavar="F", help="watermark every generated token with the key in F "
                   "(docs/audit.md); only its key id is ever shown")
    s.add_argument("--watermark-gamma", type=float, default=0.25, help="green share of the vocabulary (default 0.25)")
    s.add_argument("--watermark-delta", type=float, default=2.0, help="logit bonus of green tokens (default 2.0)")
    s.add_argument("--watermark-context", type=int, default=1, help="previous tokens seeding each green list (default 1)")
    s.add_argument("--max-body-mb", type=float, default=16, help="refuse request bodies larger than this, unread")
    s.add_argument("--max-messages", type=int, default=2048, help="refuse chat requests of more messages than this, "
                   "or as many content parts, before they are validated or tokenized (default 2048)")
    s.set_defaults(func=cmd_serve)


def add_merge(verbs) -> None:
    m = verbs.add_parser("merge", help="combine ledgers (e.g. --shard outputs) into one, without duplicates")
    m.add_argument("out", help="the ledger to write (created, or merged into)")
    m.add_argument("inputs", nargs="+", help="ledgers to merge")
    m.set_defaults(func=cmd_merge)


def add_import(verbs) -> None:
    i = verbs.add_parser("import", help="bring existing completions (OpenAI chat JSONL, JSONL, Parquet) into a ledger")
    i.add_argument("file", help="JSONL or Parquet file of completions")
    i.add_argument("ledger", help="the ledger to add them to, e.g. runs/x/ledger.sqlite")
    i.add_argument("--format", default="auto", choices=["auto", "openai_chat", "jsonl", "parquet"])
    i.add_argument("--teacher-id", default=None, help="who wrote the completions (default: the file name)")
    i.add_argument("--terms-family", default="unknown", help="licence / terms of those outputs, for the model card")
    i.add_argument("--terms-url", default=None)
    i.add_argument("--tokenizer", default=None, help="the teacher's tokenizer folder: token ids outside it are refused")
    i.set_defaults(func=cmd_import)


def add_report(verbs) -> None:
    r = verbs.add_parser("report", help="write one report.html for one run, or several side by side")
    r.add_argument("runs", nargs="+", help="run directories")
    r.add_argument("--out", default=None, help="output file (default: RUN/report.html; for several runs, "
                                                 "report.html beside the first)")
    r.set_defaults(func=cmd_report)


# what the user can do about an OSError of these kinds; any other is a bug, and keeps its traceback
_DISK_ERRORS = {
    errno.ENOSPC: "free some space and rerun the same command (finished work is kept)",
    errno.EDQUOT: "free some space and rerun the same command (finished work is kept)",
    errno.EROFS: "the file system is read-only: choose another output_dir, or copy the file somewhere writable",
    errno.EACCES: "choose another output_dir, or make the file writable",
    errno.EPERM: "choose another output_dir, or make the file writable",
    errno.ENOTDIR: "a file stands where a folder is needed: move it, or choose another output_dir",
    errno.EEXIST: "a file stands where a folder is needed: move it, or choose another output_dir",
    errno.EISDIR: "a folder stands where a file is needed: move it, or choose another output_dir",
}


def _user_error(e: BaseException, args) -> str | None:
    """One line for a failure of the disk or of a ledger file rather than of potstill, else None."""
    if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
        where = e.filename or f"writing under {getattr(args, 'run_dir', '.')}"
        return f"{where}: {e.strerror}; {_DISK_ERRORS[e.errno]}"
    if isinstance(e, sqlite3.DatabaseError):  # a damaged or read-only ledger, or a full disk under it
        where = getattr(e, "potstill_path", None) or f"a ledger under {getattr(args, 'run_dir', '.')}"
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ("make it writable, or copy the run folder somewhere writable" if "readonly" in text else
                "free some space and rerun the same command" if "full" in text else
                "the file is damaged: restore it from a copy, or delete it to generate again")
        return f"{where}: SQLite: {text}; {hint}"
    return None


def _other_rank() -> bool:
    """A process of a multi-process launch other than the first: RANK, as `accelerate launch` and
    torchrun set it. It works as the others do, but prints no status lines and draws no bars (the
    main process speaks for all); its errors still reach stderr."""
    return os.environ.get("RANK", "0").strip() not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    if _other_rank():
        os.environ["POTSTILL_QUIET"] = "1"
        sys.stdout = open(os.devnull, "w")
    try:
        rc = args.func(args)
    except PotstillError as e:
        from potstill.train.distributed import LaunchRefused

        if not (isinstance(e, LaunchRefused) and _other_rank()):  # every rank refuses alike; the first says it
            print(f"potstill: error: {e}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.DatabaseError) as e:
        if (line := _user_error(e, args)) is None:
            raise
        print(f"potstill: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("potstill: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())

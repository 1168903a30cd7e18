"""``potstill audit watermark|radioactivity|lineage``: a verdict table on the terminal, and JSON.

The JSON (``--out``, default ``audit.json``; put it in a run folder and ``potstill report`` shows
it) holds key ids, never keys."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from potstill.audit.lineage import ENDPOINT_TIMEOUT
from potstill.errors import PotstillError

CAVEATS = [
    "results are statistical evidence, not proof",
    "a watermark can be paraphrased or fine-tuned away: no detection does not mean no distillation",
    "identity answers can come from web data that quotes other models",
    "a p-value is exact only for its null: references that share data with the teacher make lineage conservative "
    "or invalid",
    "one test, chosen before looking: reporting the smallest of several (statistics, probe sets, keys not "
    "Holm-corrected) needs their number as a multiplier",
]


def add_parser(verbs) -> None:
    a = verbs.add_parser("audit", help="watermark and distillation tests: was text, or a model, made from yours?",
                         description="watermark and distillation tests (docs/audit.md)")
    tests = a.add_subparsers(dest="test", required=True, metavar="TEST")
    _add_watermark(tests)
    _add_radioactivity(tests)
    _add_plan(tests)
    _add_lineage(tests)


def _add_watermark(tests) -> None:
    w = tests.add_parser("watermark", help="is this text watermarked with key K? (a ledger or a JSONL of text)")
    w.add_argument("texts", help="ledger.sqlite, or JSONL with a \"text\" per line")
    _keys(w)
    _common(w)
    w.set_defaults(func=cmd_watermark)


def _add_radioactivity(tests) -> None:
    r = tests.add_parser("radioactivity", help="was a suspect model trained on text watermarked with key K?")
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="the suspect's model folder (open weights)")
    where.add_argument("--endpoint", help="the suspect's OpenAI-compatible base URL, e.g. http://host:8000/v1")
    r.add_argument("--model-name", help="with --endpoint: the model name it serves")
    r.add_argument("--api-key-env", metavar="VAR", help="with --endpoint: environment variable holding the API key")
    _deadline(r)
    r.add_argument("--prompts", required=True, help="probe prompts (a prompt file, as in recipes)")
    r.add_argument("--mode", choices=["sampling", "reading"], default="sampling",
                   help="sampling: score the suspect's answers; reading (open weights): score its next-token "
                        "predictions on the prompts and its answers")
    r.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--min-entropy", type=float, default=0.0, metavar="NATS",
                   help="with --model: score only tokens the suspect chose from a distribution of at least this "
                        "entropy (nats; default 0, every token); its confident tokens carry no watermark signal "
                        "and dilute it (0.5 on the quickstart, docs/audit.md)")
    r.add_argument("--temperature", type=float, default=None, help="the suspect's temperature for its answers "
                   "(default: 0 in sampling mode, greedy, as its most likely tokens are where a learned green bias "
                   "shows, docs/benchmarks.md; 1 in reading mode, whose pairs are where its argmax differs from "
                   "the text read)")
    r.add_argument("--samples", type=int, default=1, help="answers per prompt, at --temperature > 0 (each adds the "
                   "distinct windows of the suspect's less likely choices; repeats are scored once)")
    _keys(r)
    _common(r)
    r.set_defaults(func=cmd_radioactivity)


def _add_plan(tests) -> None:
    n = tests.add_parser("plan", help="how many distinct tokens a radioactivity test needs (exact binomial power)")
    n.add_argument("--gamma", type=float, default=0.25, help="the key's green share (default 0.25)")
    n.add_argument("--green-rate", type=float, required=True, help="green share of the pairs of a suspect trained on "
                   "100%% watermarked data (measure it once, e.g. with `audit radioactivity` on such a student)")
    n.add_argument("--share", type=float, action="append", help="share of watermarked training data (repeatable; "
                   "default 0.05 0.1 0.25 1)")
    n.add_argument("--p", type=float, default=1e-5, help="the p-value to reach (default 1e-5)")
    n.add_argument("--power", type=float, default=0.9, help="the probability of reaching it (default 0.9)")
    n.add_argument("--pairs-per-query", type=float, default=None, help="distinct pairs one answer adds, for queries")
    n.set_defaults(func=cmd_plan)


def _add_lineage(tests) -> None:
    g = tests.add_parser("lineage", help="does a suspect agree with a teacher beyond unrelated reference models?")
    g.add_argument("--teacher", required=True, help="model folder, or URL#MODEL for an OpenAI-compatible endpoint")
    g.add_argument("--suspect", required=True, help="model folder, or URL#MODEL")
    g.add_argument("--reference", action="append", required=True, help="an unrelated model (folder or URL#MODEL); "
                   "repeat, at least 5 advised")
    g.add_argument("--prompts", required=True, help="probe prompts (a prompt file, as in recipes)")
    g.add_argument("--limit", type=int, default=None)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--name", action="append", default=[], help="ask identity probes and count the answers naming "
                   "the teacher by this name (repeatable)")
    g.add_argument("--statistic", choices=["auto", "likelihood", "kl", "match"], default="auto",
                   help="likelihood (suspect and references are folders): the log-probability each gives the "
                        "teacher's answer; kl (every model a folder, one tokenizer): minus the KL divergence from "
                        "the teacher's next-token distribution on its answer; match: token matches of its own "
                        "greedy answer with the teacher's; auto (default): likelihood when every suspect and "
                        "reference is a folder, else match")
    g.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key sent to the "
                   "endpoints among the models (one key for all)")
    _deadline(g)
    g.add_argument("--batch-size", type=int, default=16, help="probes per forward pass of a folder's model "
                   "(likelihood, kl; default 16): lower it for long probes or a large vocabulary")
    g.add_argument("--tokenizer", help="tokenizer for match rates (default: the teacher's folder; characters for "
                   "an endpoint teacher without one)")
    _common(g)
    g.set_defaults(func=cmd_lineage)


def _common(p) -> None:
    """--out and --alpha, which every test has."""
    p.add_argument("--out", default="audit.json", help="JSON results (default audit.json; in a run folder, "
                   "potstill report shows them)")
    p.add_argument("--alpha", type=float, default=1e-3, help="flag when the p-value is below this (default 1e-3)")


def _deadline(p) -> None:
    p.add_argument("--timeout", type=float, default=ENDPOINT_TIMEOUT, metavar="SECONDS",
                   help=f"an endpoint's deadline for each probe's whole answer (connect, headers and body; "
                        f"default {ENDPOINT_TIMEOUT:g}); a probe is sent once, never retried")


def _keys(p) -> None:
    p.add_argument("--key-file", action="append", required=True, metavar="F",
                   help="a watermark key file; repeat for one key per dataset release (Holm-corrected)")
    p.add_argument("--gamma", type=float, default=0.25, help="the keys' green share (default 0.25)")
    p.add_argument("--context", type=int, default=1, help="the keys' context width (default 1)")
    p.add_argument("--tokenizer", required=True, help="the watermarked teacher's tokenizer folder")


def _watermarks(args):
    from potstill.watermark import load_watermark

    return [load_watermark(f, args.gamma, 0.0, args.context) for f in args.key_file]


def _tokenizer(path):
    from potstill.hf import load_tokenizer_dir

    return load_tokenizer_dir(path, "tokenizer")


def _prompts(args):
    from potstill.prompts import load_prompts

    if args.limit is not None and args.limit < 1:
        raise PotstillError(f"--limit must be at least 1, not {args.limit}")
    return [p.chat for p in load_prompts(args.prompts, args.limit)]


def _texts(path: Path, tokenizer) -> tuple[list[list[int]], list[int]]:
    """(token ids, first scored position) per text: a ledger's completions after their prompts, or
    the "text" of each JSONL line (scored from its ``context``-th token)."""
    from potstill.hf import prompt_ids

    if not path.is_file():
        raise PotstillError(f"{path} not found")
    if path.suffix in (".sqlite", ".db"):
        from potstill.ledger import Ledger

        seqs, starts = [], []
        with Ledger(path) as ledger:
            for ex in ledger.examples():
                ids = prompt_ids(tokenizer, ex.messages)
                answer = ex.token_ids.tolist() if ex.token_ids is not None else \
                    tokenizer(ex.text, add_special_tokens=False)["input_ids"]
                seqs.append(ids + answer), starts.append(len(ids))
        return seqs, starts
    seqs = []
    for lineno, line in enumerate(path.open(encoding="utf-8"), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            raise PotstillError(f"{path}:{lineno}: not a JSON object with a \"text\" string") from None
        seqs.append(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    return seqs, [0] * len(seqs)


def _key_rows(result: dict, alpha: float) -> list[dict]:
    return [{"test": result["test"] + (f" ({result['mode']})" if "mode" in result else ""), "target": k["key_id"],
             "statistic": f"{k['green']}/{k['tokens']} green (gamma {k['gamma']}, z {k['z']:.1f})"
                          + (f", log10 p {k['log10_p']:.1f} before Holm" if k["p_value"] < 1e-300 else ""),
             "p_value": k["p_holm"], "tokens": k["tokens"], "flagged": k["p_holm"] < alpha} for k in result["keys"]]


def cmd_watermark(args) -> None:
    from potstill.audit.radioactivity import score_keys
    from potstill.watermark import scored_pairs

    marks, tok = _watermarks(args), _tokenizer(args.tokenizer)
    seqs, starts = _texts(Path(args.texts), tok)
    skip = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
    result = score_keys(scored_pairs(seqs, args.context, starts, skip), marks)
    result.update(texts=str(args.texts), sequences=len(seqs))
    finish(args, [result], _key_rows(result, args.alpha))


def cmd_radioactivity(args) -> None:
    from potstill.audit import radioactivity as ra

    marks, tok = _watermarks(args), _tokenizer(args.tokenizer)
    if args.samples < 1:
        raise PotstillError(f"--samples must be at least 1, not {args.samples}")
    if args.temperature is None:
        args.temperature = 1.0 if args.mode == "reading" else 0.0
    if not args.temperature >= 0:
        raise PotstillError(f"--temperature must be >= 0, not {args.temperature}")
    if args.samples > 1 and args.temperature == 0:
        raise PotstillError(f"--samples {args.samples} at --temperature 0 asks for the same greedy answer "
                            f"{args.samples} times; give --temperature 1 too, or leave --samples at 1")
    if not args.min_entropy >= 0:
        raise PotstillError(f"--min-entropy must be >= 0 nats, not {args.min_entropy}")
    prompts = _prompts(args) * args.samples
    skip = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
    if args.endpoint:
        if args.mode == "reading":
            raise PotstillError("--mode reading needs the suspect's weights (--model); an endpoint can be sampled only")
        if not args.model_name:
            raise PotstillError("--endpoint needs --model-name (the model name it serves)")
        if args.min_entropy:
            raise PotstillError("--min-entropy needs the suspect's weights (--model): an endpoint's answers come "
                                "without its entropy")
        key = _api_key(args)
        rows, answers = ra.endpoint_samples(args.endpoint, args.model_name, tok, prompts, args.max_new_tokens,
                                            temperature=args.temperature, api_key=key, timeout=_timeout(args))
        suspect = f"{args.model_name}@{args.endpoint}"
    else:
        from potstill.hf import load_model_dir, tokenizer_sha256

        model, own = load_model_dir(args.model, "suspect model")
        if tokenizer_sha256(own) != tokenizer_sha256(tok):
            raise PotstillError(f"suspect {args.model} has another tokenizer than {args.tokenizer}: its token ids mean "
                                f"other tokens; use --endpoint-style sampling of its text (serve it), or the same tokenizer")
        rows, answers = ra.local_samples(model, tok, prompts, args.max_new_tokens,
                                         temperature=args.temperature)
        suspect = str(args.model)
    texts = [p + a for p, a in zip(rows, answers)]
    if args.mode == "reading":
        pairs = ra.reading_pairs(model, texts, args.context, skip=skip, vocab=len(tok), min_entropy=args.min_entropy)
    elif args.min_entropy:
        entropy = ra.next_token_view(model, texts, vocab=len(tok))[1]
        pairs = ra.sampling_pairs(rows, answers, args.context, skip=skip, entropy=entropy, min_entropy=args.min_entropy)
    else:
        pairs = ra.sampling_pairs(rows, answers, args.context, skip=skip)
    result = ra.score_keys(pairs, marks, args.mode)
    result.update(suspect=suspect, prompts=len(prompts) // args.samples, samples=args.samples,
                  temperature=args.temperature, min_entropy=args.min_entropy)
    finish(args, [result], _key_rows(result, args.alpha))


def cmd_plan(args) -> None:
    from potstill.audit.power import plan

    for name, value in (("--gamma", args.gamma), ("--green-rate", args.green_rate), ("--p", args.p),
                        ("--power", args.power), *(("--share", v) for v in args.share or [])):
        if not 0 < value < 1 and not (name == "--share" and value == 1):
            raise PotstillError(f"{name} must be between 0 and 1, not {value}")
    rows = plan(args.gamma, args.green_rate, shares=args.share or (0.05, 0.1, 0.25, 1.0), alpha=args.p,
                target=args.power, tokens_per_query=args.pairs_per_query)
    print(f"share of watermarked data -> distinct pairs for p < {args.p:g} with power {args.power:g} "
          f"(green rate assumed linear in the share)")
    for r in rows:
        need = "never (no bias)" if r["tokens"] is None else f"{r['tokens']:,} pairs" + (
            f", {r['queries']:,} queries" if r["queries"] else "")
        print(f"  {r['share']:>6.1%}  green rate {r['green_rate']:.4f}  {need}")


def _api_key(args) -> str | None:
    """The key in the variable --api-key-env names (never the name's value echoed elsewhere), or None."""
    if not args.api_key_env:
        return None
    key = os.environ.get(args.api_key_env)
    if not key:
        raise PotstillError(f"--api-key-env names {args.api_key_env}, which is not set: export it first")
    return key


def _timeout(args) -> float:
    if not args.timeout > 0:
        raise PotstillError(f"--timeout must be more than 0 seconds, not {args.timeout:g}")
    return args.timeout


def _responder(spec: str, api_key: str | None = None, timeout: float = ENDPOINT_TIMEOUT):
    from potstill.audit.lineage import EndpointModel, LocalModel

    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        if not model:
            raise PotstillError(f"{spec}: an endpoint is given as URL#MODEL, e.g. http://localhost:8000/v1#teacher")
        return EndpointModel(url, model, api_key, timeout)
    return LocalModel(spec)


def cmd_lineage(args) -> None:
    from potstill.audit.lineage import (IDENTITY_PROBES, EndpointModel, identity_counts, kl_scores, lineage_test,
                                        match_rates)

    if len(set(args.reference)) != len(args.reference):
        raise PotstillError("--reference: a model is named twice")
    prompts = [m[-1]["content"] for m in _prompts(args)]
    models = {"teacher": args.teacher, "suspect": args.suspect, **{f"reference:{r}": r for r in args.reference}}
    endpoints = [spec for role, spec in models.items()
                 if role != "teacher" and spec.startswith(("http://", "https://"))]
    statistic = args.statistic
    if statistic == "auto":
        statistic = "match" if endpoints else "likelihood"
    elif statistic in ("likelihood", "kl") and endpoints:
        raise PotstillError(f"--statistic {statistic} needs the weights of the suspect and every reference; "
                            f"{endpoints[0]} is an endpoint: use --statistic match")
    if statistic == "kl":
        if args.teacher.startswith(("http://", "https://")):
            raise PotstillError("--statistic kl needs the teacher's weights (a folder): its next-token distributions")
        _one_tokenizer(models)  # before any weights load or any probe is answered
    if args.batch_size < 1:
        raise PotstillError(f"--batch-size must be at least 1, not {args.batch_size}")
    scores, identity, teacher, teacher_model = {}, {}, None, None
    key, timeout = _api_key(args), _timeout(args)
    for role, spec in models.items():
        m = _responder(spec, key, timeout)
        try:
            if role == "teacher":
                teacher = m.answer(prompts, args.max_new_tokens)
                tok = getattr(m, "tokenizer", None)
                if args.tokenizer:
                    tok = _tokenizer(args.tokenizer)
                tokenize = (lambda t: tok(t, add_special_tokens=False)["input_ids"]) if tok is not None else list
                teacher_model = m if statistic == "kl" else None  # kept loaded beside each other model
            elif statistic == "likelihood":
                scores[role] = m.answer_logprobs(prompts, teacher, args.batch_size)
            elif statistic == "kl":
                scores[role] = kl_scores(teacher_model, m, prompts, teacher, args.batch_size)
            else:
                scores[role] = match_rates(teacher, m.answer(prompts, args.max_new_tokens), tokenize)
            if args.name:
                identity[role] = m.answer(IDENTITY_PROBES, args.max_new_tokens)
        finally:
            if isinstance(m, EndpointModel):
                m.close()
        del m  # one model in memory at a time (two for kl)
    refs = {k.removeprefix("reference:"): v for k, v in scores.items() if k.startswith("reference:")}
    result = lineage_test(scores["suspect"], refs, statistic)
    result.update(teacher=args.teacher, suspect=args.suspect,
                  identity={"probes": len(IDENTITY_PROBES), "names": args.name,
                            "naming_the_teacher": identity_counts(identity, args.name) if args.name else None,
                            "answers": identity or None})
    what = {"likelihood": "log-probability of the teacher's answers", "kl": "minus KL from the teacher",
            "match": "match with the teacher"}[statistic]
    best = max(r["score"] for r in result["references"])
    rows = [{"test": f"lineage ({statistic})", "target": args.suspect,
             "statistic": f"{what}: {result['suspect_score']:.3f} vs references {best:.3f} at most",
             "p_value": result["p_value"], "tokens": None, "flagged": result["p_value"] < args.alpha}]
    finish(args, [result], rows)


def _one_tokenizer(models: dict[str, str]) -> None:
    """--statistic kl compares distributions id by id: every folder must have the teacher's vocabulary."""
    from potstill.hf import load_tokenizer_dir, tokenizer_sha256

    want = tokenizer_sha256(load_tokenizer_dir(models["teacher"], "teacher tokenizer"))
    for role, spec in models.items():
        if role != "teacher" and tokenizer_sha256(load_tokenizer_dir(spec, f"{role} tokenizer")) != want:
            raise PotstillError(f"--statistic kl compares next-token distributions id by id: {spec} has another "
                                f"tokenizer than the teacher {models['teacher']}; use --statistic likelihood")


def finish(args, results: list[dict], rows: list[dict]) -> None:
    from importlib.metadata import version

    out = Path(args.out)
    doc = {"potstill_audit": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "potstill": version("potstill"), "alpha": args.alpha, "verdicts": rows, "results": results,
           "caveats": CAVEATS}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)
    print_table(rows)
    for c in CAVEATS:
        print(f"  note: {c}")
    print(f"audit: wrote {out}")


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="potstill audit")
    for col in ("test", "target", "statistic", "p-value", "tokens", "verdict"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["test"], r["target"], r["statistic"], f"{r['p_value']:.3g}",
                      "" if r["tokens"] is None else str(r["tokens"]), "FLAGGED" if r["flagged"] else "not flagged")
    Console(width=160).print(table)

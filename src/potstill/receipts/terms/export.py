"""The terms gate at the start of training, and the obligations it carries into the exported
student: the name prefix, attribution lines, NOTICE and licence files, the flow-down restrictions.
A record-keeping aid, not legal advice."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from potstill.errors import PotstillError
from potstill.receipts.card import md_text, md_url
from potstill.receipts.terms.gate import NOT_ADVICE, check, family, gate, merge_obligations, prefixed_name


def gate_training(ledger, examples, descriptions: dict[str, dict], *, use: str, declared: str | None,
                  accept_risk: str | None, student: str) -> dict:
    """Check every teacher that contributed rows to ``examples`` (``descriptions``: teacher key ->
    description, the recipe's own overriding the ledger's); stop, or record the override's reason in
    the ledger. Returns the ``terms`` block of the student's potstill.json. The ledger's teacher
    rows are checked first (:func:`trusted_teachers`): a row edited or moved would be judged by
    another teacher's description."""
    trusted_teachers(ledger, [ex.request_hash for ex in examples])
    rows = Counter(ex.teacher_key for ex in examples)
    known = {**ledger.teachers(), **descriptions}
    teachers = [({**known.get(k, {"id": k[:12]}), "teacher_key": k}, n) for k, n in sorted(rows.items())]
    terms = check(teachers, use, declared)
    problems = gate(terms, accept_risk)
    obligations = merge_obligations(terms)
    if obligations["conflicts"] and not accept_risk:
        raise PotstillError("terms: the teachers' obligations conflict: " + "; ".join(obligations["conflicts"]) +
                            f". To export anyway pass --accept-terms-risk \"reason\"; {NOT_ADVICE}")
    problems += obligations["conflicts"]
    if problems:
        ledger.record_terms_override(student, use, accept_risk, problems)
    for t in terms:
        print(f"train {student}: terms: {t.teacher_id} ({t.rows:,} rows) is {t.family} ({t.matched_by}): "
              f"{t.verdict} for use {use}" + (" (declared)" if t.verdict in ("review", "unknown") and t.declared else "")
              + f"; evidence: {', '.join(str(e) for e in t.evidence) or 'none'}")
    if problems:
        print(f"train {student}: terms: trained past the gate, reason recorded in the ledger: {accept_risk}")
    print(f"train {student}: terms: {NOT_ADVICE}")
    records = [{**t.record(), "teacher_key": d["teacher_key"], "path": d.get("path")} for t, (d, _) in zip(terms, teachers)]
    return {"use": use, "teachers": records, "obligations": obligations, "declared": declared,
            "accepted_risk": accept_risk if problems else None, "overridden": problems}


def trusted_teachers(ledger, request_hashes: list[str] | None) -> None:
    """Stop unless the ledger's teacher rows behind these rows (all, with None) can be trusted
    (``Ledger.teacher_problems``): what train and ``potstill terms check`` do before reading them."""
    problems = ledger.teacher_problems(request_hashes)
    if problems:
        raise PotstillError(f"{ledger.path}: " + "; ".join(problems) + ": its teachers' terms cannot be judged from it; "
                            "generate again into a new ledger, or restore the original")


def model_name(name: str, terms: dict | None) -> str:
    """The exported student's name, with the prefix its teachers' terms require."""
    return prefixed_name(name, (terms or {}).get("obligations", {}).get("name_prefix"))


def write_obligation_files(folder: Path, terms: dict | None, licence: str | None = None) -> None:
    """Beside the weights: each teacher folder's licence and notice files named by its terms,
    a NOTICE with the required notice lines, and TERMS.md saying what binds users of the student
    (``licence``: the recipe's student.license, which the teachers' flow-down terms join)."""
    if not terms:
        return
    from potstill.receipts.spdx import concluded_licence
    ob = terms["obligations"]
    missing, notices = [], list(ob["notice"])
    for t in terms["teachers"]:
        here = Path(t["path"]) if t.get("path") else None
        # the files the teacher's terms name, licence first; its NOTICE is merged into ours below
        for key in t.get("families") or [t["family"]]:  # every family the evidence named
            for i, name in enumerate(f for f in family(key).obligations.get("files", []) if f != "NOTICE"):
                src = here / name if here else None
                if src is not None and src.is_file() and not src.is_symlink():
                    dest = folder / name if not (folder / name).exists() else folder / f"{name}.{key}"
                    shutil.copyfile(src, dest)
                elif i == 0:
                    missing.append(f"{name} of {t['teacher']} ({family(key).url or 'no URL'})")
        if here is not None and (here / "NOTICE").is_file() and not (here / "NOTICE").is_symlink():
            notices.insert(0, (here / "NOTICE").read_text(encoding="utf-8", errors="replace").strip())
    if notices:
        (folder / "NOTICE").write_text("\n\n".join(dict.fromkeys(notices)) + "\n", encoding="utf-8")
    # every value as literal text, as in the card: a teacher id, a reason or a declaration may hold markup
    lines = [f"# Terms that bind this model ({md_text(terms['use'])} use)", "",
             f"This file records what potstill found; {NOT_ADVICE}. Read each teacher's terms.", ""]
    for t in terms["teachers"]:
        declared = f" (declared: {md_text(t['declared'])})" if t.get("declared") else ""
        lines.append(f"- {md_text(t['teacher'])}: {md_text(t['family'])} ({md_text(t['licence'])}), "
                     f"{md_text(t['verdict'])} for {md_text(t['use'])}{declared}; "
                     f"{md_url(t['url']) if t['url'] else 'no URL'}; {md_text(t['clause'])}")
        if t.get("contradiction"):
            lines.append(f"  - declared terms contradict the evidence: {md_text(t['contradiction'])}")
    concluded, flows = concluded_licence({"license": licence, "terms": terms})
    if flows:
        lines += ["", "## Licence", "", f"{md_text(concluded)}: the terms of {md_text(', '.join(flows))} pass to every "
                  f"user of this model, beside " + (f"the declared {md_text(licence)}" if licence else "any licence it is given")
                  + "."]
    for title, key in (("Attribution", "attribution"), ("Restrictions that pass to every user", "flow_down"),
                       ("Thresholds", "thresholds")):
        if ob[key]:
            lines += ["", f"## {title}", ""] + [f"- {md_text(x)}" for x in ob[key]]
    if missing:
        lines += ["", "## Files to add before distributing", "",
                  "The teacher's folder did not hold these; copy them from the terms' URL:", ""]
        lines += [f"- {md_text(m)}" for m in missing]
    if terms.get("accepted_risk"):
        lines += ["", "## Trained past the terms gate", "", f"Reason given: {md_text(terms['accepted_risk'])}", ""]
        lines += [f"- {md_text(p)}" for p in terms["overridden"]]
    (folder / "TERMS.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


"""The student's model card (``<run>/<student>/README.md``): it names its teachers.

Hugging Face metadata (license, base_model when the student started from a checkpoint, tags
including ``distillation``) plus a ``distillation:`` block that the Hub has no field for:
teachers (id, revision, access route, terms family and URL, weights hash, share of the training
examples and tokens), method, loss, teacher signal, and the content hash of the ledger rows the
student was trained on. Written by ``train``; rewritten by ``eval`` with the measured results.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import yaml


# what can open markup in the middle of a line (values never start one: "- **id**", "# name: ...")
MARKDOWN_PUNCTUATION = set("\\`*_[]!|~#")


def md_text(value) -> str:
    """``value`` as literal text on one markdown line: the Hub renders a card's raw HTML and
    markdown, and a teacher id, terms or run name may hold either. Line breaks become spaces (no
    injected headings), ``<>&`` become entities (no raw HTML), and the punctuation that opens
    emphasis, code, links, images, tables or a heading's closing run is backslash-escaped."""
    text = " ".join(str(value).split())
    return "".join(f"\\{c}" if c in MARKDOWN_PUNCTUATION else html.escape(c, quote=False) for c in text)


def md_url(url: str) -> str:
    """A terms URL as a link when it is a plain http(s) URL, else as escaped text."""
    if re.fullmatch(r"https?://[^\s<>\\`\"']+", url):
        return f"<{url}>"
    return md_text(url)


def method_of(train: dict) -> str:
    if train["objective"] == "sft":
        return "sequence-level KD (SFT on teacher completions)"
    if train["teacher_signal"] == "on_policy":
        return "on-policy logit KD (GKD)"
    return f"logit KD ({'teacher top-k from the ledger' if train['teacher_signal'] == 'cached' else 'online teacher, full vocabulary'})"


def card_text(info: dict, eval_report: dict | None = None, name: str = "student") -> str:
    """README.md for a student from its ``potstill.json`` (and the run's eval.json, if any)."""
    train = info["train"]
    teachers = []
    for t in info["teachers"]:
        teachers.append({
            "id": t["id"], "revision": t.get("revision"),
            "access": {"local": "local weights", "openai": f"API: {t.get('model')} at {t.get('endpoint')}",
                       "imported": f"imported completions: {t.get('source')}"}.get(t.get("backend"), "unknown"),
            "terms_family": t.get("terms_family", "unknown"), "terms_url": t.get("terms_url"),
            "weights_sha256": t.get("weights_sha256"),
            "share_of_examples": t.get("share_of_examples", 1.0), "share_of_tokens": t.get("share_of_tokens", 1.0),
        })
    meta = {
        "license": info.get("license") or "other",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["potstill", "distillation", "knowledge-distillation", "synthetic"],
    }
    if info.get("student", {}).get("path"):
        meta["base_model"] = info["student"].get("base_model") or Path(info["student"]["path"]).name
        meta["base_model_relation"] = "finetune"
    meta["distillation"] = {
        "method": method_of(train), "objective": train["objective"],
        "loss": train["loss"] if train["objective"] == "kd" else "cross_entropy",
        "teacher_signal": train["teacher_signal"] if train["objective"] == "kd" else "teacher text",
        "temperature": train["temperature"], "kd_ratio": train["kd_ratio"] if train["objective"] == "kd" else 0.0,
        "teachers": teachers, "ledger_sha256": info["ledger_sha256"], "examples": info["examples"],
        "recipe_sha256": info["recipe_sha256"],
    }
    terms = info.get("terms")
    if terms:
        by_id = {r["teacher"]: r for r in terms["teachers"]}
        for t in teachers:  # the verdict beside each teacher; the merged obligations once
            if (r := by_id.get(t["id"])) is not None:
                t.update(terms_registry=r["family"], terms_verdict=r["verdict"], licence=r["licence"],
                         terms_url=t["terms_url"] or r["url"])
        meta["distillation"]["terms"] = {k: terms[k] for k in ("use", "declared", "accepted_risk", "overridden")}
        meta["distillation"]["terms"]["obligations"] = {k: v for k, v in terms["obligations"].items() if v}
    for key in ("manifest_merkle_root", "manifest_rows", "weights_sha256"):
        if info.get(key) is not None:
            meta["distillation"][key] = info[key]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {md_text(info.get('model_name') or name)}: distilled with potstill", "",
             f"A {info.get('parameters', 0):,}-parameter student trained by {method_of(train)} on "
             f"{info['examples']:,} completions of its teacher{'s' if len(teachers) > 1 else ''}:", ""]
    for t in teachers:
        url = f" ({md_url(t['terms_url'])})" if t.get("terms_url") else ""
        lines.append(f"- **{md_text(t['id'])}**{' @ ' + md_text(t['revision']) if t.get('revision') else ''}, "
                     f"{md_text(t['access'])}, terms: {md_text(t['terms_family'])}{url}; "
                     f"{t['share_of_examples']:.0%} of examples, {t['share_of_tokens']:.0%} of tokens")
    lines += ["", "Anyone using this model must also honour the terms under which its teachers' outputs were "
              "obtained; the `distillation:` block above records them.", ""]
    if terms:
        lines += terms_lines(terms)
    lines += ["## Training", "",
              f"{info['steps']:,} optimizer steps, batch {train['batch_size']}, lr {train['lr']}, "
              f"loss `{meta['distillation']['loss']}`, T = {train['temperature']}, kd_ratio = "
              f"{meta['distillation']['kd_ratio']}, seed {train['seed']}. Training data: the ledger rows whose "
              f"content hash is `{info['ledger_sha256']}`."]
    if info.get("manifest_merkle_root"):
        lines += ["", f"Merkle root of those {info['manifest_rows']:,} rows: `{info['manifest_merkle_root']}` "
                      f"(`potstill verify RUN` recomputes it; `--row HASH` proves one row belongs)."]
    if eval_report and name in eval_report.get("models", {}):
        m, t = eval_report["models"][name], eval_report["models"].get("teacher", {})
        lines += ["", "## Evaluation", "",
                  f"{eval_report['prompts']['n']:,} held-out prompts, greedy decoding.", "",
                  "| metric | this model | teacher |", "|---|---:|---:|"]
        for key, label in (("accuracy", "accuracy"), ("agreement", "agreement with the teacher"),
                           ("kl_per_token", "KL(teacher || model) per token"), ("parameters", "parameters")):
            if m.get(key) is not None:
                fmt = (lambda v: f"{v:,}") if key == "parameters" else (lambda v: f"{v:.3f}")
                lines.append(f"| {label} | {fmt(m[key])} | {fmt(t[key]) if t.get(key) is not None else '-'} |")
    return "\n".join(lines) + "\n"


def terms_lines(terms: dict) -> list[str]:
    """The card's terms section: the intended use, each teacher's verdict, the obligations, and
    any override with its reason."""
    ob = terms["obligations"]
    lines = ["## Terms", "", f"Intended use: **{md_text(terms['use'])}**. Checked against potstill's terms registry, "
             f"a record-keeping aid, not legal advice.", ""]
    for r in terms["teachers"]:
        url = f" ({md_url(r['url'])})" if r.get("url") else ""
        lines.append(f"- {md_text(r['teacher'])}: {md_text(r['family'])}{url}, {md_text(r['verdict'])}"
                     f"{' (declared: ' + md_text(r['declared']) + ')' if r.get('declared') and r['verdict'] in ('review', 'unknown') else ''}")
    for line in ob.get("attribution", []):
        lines += ["", f"**{md_text(line)}**"]
    if ob.get("flow_down"):
        lines += ["", "Restrictions that pass to every user of this model:", ""]
        lines += [f"- {md_text(x)}" for x in ob["flow_down"]]
    if ob.get("thresholds"):
        lines += ["", "Thresholds:", ""] + [f"- {md_text(x)}" for x in ob["thresholds"]]
    if terms.get("accepted_risk"):
        lines += ["", f"Trained past the terms gate (`--accept-terms-risk`). Reason given: "
                      f"{md_text(terms['accepted_risk'])}", ""] + [f"- {md_text(p)}" for p in terms["overridden"]]
    return lines + [""]


def write_card(model_dir: Path, eval_report: dict | None = None) -> Path:
    info = json.loads((model_dir / "potstill.json").read_text())
    path = model_dir / "README.md"
    path.write_text(card_text(info, eval_report, info.get("name", model_dir.name)), encoding="utf-8")
    return path

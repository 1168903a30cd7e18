"""The student's model card (``<run>/<student>/README.md``): it names its teachers.

Hugging Face metadata (license, base_model when the student started from a checkpoint, tags
including ``distillation``) plus a ``distillation:`` block that the Hub has no field for:
teachers (id, revision, access route, terms family and URL, weights hash, share of the training
examples and tokens), method, loss, teacher signal, and the content hash of the ledger rows the
student was trained on. The page is ``templates/model_card.md.j2``, the metadata a
``huggingface_hub.ModelCardData`` (as TRL's ``generate_model_card`` builds its cards). Written by
``train`` (:func:`write_card`), which records its sha256 in ``potstill.json``; ``eval`` appends its
results (``templates/model_card_evaluation.md.j2``) through :func:`add_results`, which leaves every
byte train wrote as it was, so ``potstill verify`` checks the two parts apart (:func:`split`).
"""

from __future__ import annotations

import html
import json
import re
from functools import cache
from pathlib import Path

import jinja2


# what can open markup in the middle of a line (values never start one: "- **id**", "# name: ...")
MARKDOWN_PUNCTUATION = set("\\`*_[]!|~#")


def md_text(value) -> str:
    """``value`` as literal text on one markdown line: the Hub renders a card's raw HTML and
    markdown, and a teacher id, terms or run name may hold either. Line breaks become spaces (no
    injected headings), ``<>&`` become entities (no raw HTML), and the punctuation that opens
    emphasis, code, links, images, tables or a heading's closing run is backslash-escaped."""
    text = " ".join(str(value).split())
    return "".join(f"\\{c}" if c in MARKDOWN_PUNCTUATION else html.escape(c, quote=False) for c in text)


class Markdown(str):
    """Text that is markdown already, written into the card as it is."""


def md_url(url: str) -> Markdown:
    """A terms URL as a link when it is a plain http(s) URL, else as escaped text."""
    if re.fullmatch(r"https?://[^\s<>\\`\"']+", url):
        return Markdown(f"<{url}>")
    return Markdown(md_text(url))


def md_code(value) -> Markdown:
    """A hash or a name as inline code (a backtick in it would end the span: it becomes a quote)."""
    text = " ".join(str(value).replace("`", "'").split())
    return Markdown(f"`{text}`")


@cache
def template(name: str = "model_card.md.j2") -> jinja2.Template:
    """A page of the card, shipped in ``potstill/receipts/templates``. Every ``{{ value }}`` is written
    as literal text (:func:`md_text`) unless it is :class:`Markdown`, so no teacher id, terms or run
    name can open markup, as the report's HTML template is autoescaped."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("potstill.receipts", "templates"), trim_blocks=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
                             finalize=lambda v: v if isinstance(v, Markdown) else md_text(v))
    env.filters.update(url=md_url, code=md_code)
    return env.get_template(name)


# the line eval's section starts with; no value can write it (md_text keeps values on their line and escapes "#")
EVALUATION = "\n## Evaluation\n"


def split(text: str) -> tuple[str, str]:
    """(the part of a card train wrote, eval's section or "")."""
    i = text.find(EVALUATION)
    return (text, "") if i < 0 else (text[:i], text[i:])


def evaluation_text(eval_report: dict | None, name: str) -> str:
    """The section eval appends to the card of model ``name`` ("" when the report has no row for it)."""
    results = results_of(eval_report, name)
    return template("model_card_evaluation.md.j2").render(results=results) if results else ""


def method_of(train: dict) -> str:
    if train["objective"] == "sft":
        return "sequence-level KD (SFT on teacher completions)"
    if train["teacher_signal"] == "on_policy":
        return "on-policy logit KD (GKD)"
    return f"logit KD ({'teacher top-k from the ledger' if train['teacher_signal'] == 'cached' else 'online teacher, full vocabulary'})"


def card_text(info: dict, eval_report: dict | None = None, name: str = "student") -> str:
    """README.md for a student from its ``potstill.json`` (and the run's eval.json, if any)."""
    from huggingface_hub import ModelCard, ModelCardData

    from potstill.receipts.spdx import concluded_licence

    train = info["train"]
    terms = info.get("terms")
    by_id = {r["teacher"]: r for r in (terms or {}).get("teachers", [])}
    teachers = []
    for t in info["teachers"]:
        declared = t.get("terms_family") or "unknown"
        teachers.append({
            "id": t["id"], "revision": t.get("revision"),
            "access": {"local": "local weights", "openai": f"API: {t.get('model')} at {t.get('endpoint')}",
                       "imported": f"imported completions: {t.get('source')}"}.get(t.get("backend"), "unknown"),
            # the family the gate found, not the recipe's field (which may say unknown, or be contradicted)
            "terms_family": by_id[t["id"]]["family"] if t["id"] in by_id else declared,
            "terms_url": t.get("terms_url"), "weights_sha256": t.get("weights_sha256"),
            "share_of_examples": t.get("share_of_examples", 1.0), "share_of_tokens": t.get("share_of_tokens", 1.0),
        })
        if t["id"] in by_id and declared != by_id[t["id"]]["family"] and declared != "unknown":
            teachers[-1]["terms_family_declared"] = declared
    concluded, flows = concluded_licence(info)
    meta = {
        "license": info.get("license") or "other",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["potstill", "distillation", "knowledge-distillation", "synthetic"],
    }
    if flows:  # the teachers' terms pass to every user: the declared licence alone is not the model's
        meta.update(license="other", license_name=re.sub(r"[^a-z0-9.]+", "-", concluded.lower()).strip("-"),
                    license_link="TERMS.md")
    if info.get("student", {}).get("path"):
        meta["base_model"] = info["student"].get("base_model") or Path(info["student"]["path"]).name
        meta["base_model_relation"] = "finetune"
    kd = train["objective"] == "kd"
    distillation = meta["distillation"] = {
        "method": method_of(train), "objective": train["objective"],
        "loss": train["loss"] if kd else "cross_entropy",
        "teacher_signal": train["teacher_signal"] if kd else "teacher text",
        "temperature": train["temperature"], "kd_ratio": train["kd_ratio"] if kd else 0.0,
        "teachers": teachers, "ledger_sha256": info["ledger_sha256"], "examples": info["examples"],
        "recipe_sha256": info["recipe_sha256"],
    }
    if flows:
        distillation["licence"] = {"declared": info.get("license"), "concluded": concluded, "flows_down": flows}
    if terms:
        for t in teachers:  # the verdict beside each teacher; the merged obligations once
            if (r := by_id.get(t["id"])) is not None:
                t.update(terms_registry=r["family"], terms_verdict=r["verdict"], licence=r["licence"],
                         terms_url=t["terms_url"] or r["url"])
                if r.get("contradiction"):  # a declared family the evidence contradicts, trained past the gate
                    t.update(terms_evidence=r["evidence"], terms_contradiction=r["contradiction"])
        distillation["terms"] = {k: terms[k] for k in ("use", "declared", "accepted_risk", "overridden")}
        distillation["terms"]["obligations"] = {k: v for k, v in terms["obligations"].items() if v}
    for key in ("manifest_merkle_root", "manifest_rows", "weights_sha256"):
        if info.get(key) is not None:
            distillation[key] = info[key]
    text = template().render(
        card_data=Markdown(ModelCardData(**meta).to_yaml()), name=info.get("model_name") or name,
        parameters=info.get("parameters", 0), method=method_of(train), examples=info["examples"], teachers=teachers,
        terms=terms, steps=info["steps"], train=train, loss=distillation["loss"], kd_ratio=distillation["kd_ratio"],
        ledger_sha256=info["ledger_sha256"], manifest_merkle_root=info.get("manifest_merkle_root"),
        manifest_rows=info.get("manifest_rows"), licence=distillation.get("licence"))
    # parsed back: a card the Hub would not read fails here, not on upload
    return str(ModelCard(text)) + evaluation_text(eval_report, name)


def results_of(eval_report: dict | None, name: str) -> dict | None:
    """The card's evaluation table for model ``name``: (metric, this model, teacher) rows."""
    if not eval_report or name not in eval_report.get("models", {}):
        return None
    m, t = eval_report["models"][name], eval_report["models"].get("teacher", {})
    rows = []
    for key, label in (("accuracy", "accuracy"), ("agreement", "agreement with the teacher"),
                       ("kl_per_token", "KL(teacher || model) per token"), ("parameters", "parameters")):
        if m.get(key) is not None:
            fmt = "{:,}" if key == "parameters" else "{:.3f}"
            rows.append((label, fmt.format(m[key]), fmt.format(t[key]) if t.get(key) is not None else "-"))
    return {"prompts": eval_report["prompts"]["n"], "rows": rows, "draft": draft_of(m, eval_report)}


def draft_of(m: dict, eval_report: dict) -> dict | None:
    """The card's draft figures: (label, value) rows and the teacher they were measured against."""
    d = m.get("draft")
    if not d or not (d.get("alpha") or d.get("measured")):
        return None
    rows, alpha, meas = [], d.get("alpha") or {}, d.get("measured")
    if alpha.get("greedy") is not None:
        rows.append(("acceptance α, greedy (the draft's argmax is the teacher's)", f"{alpha['greedy']:.3f}"))
    if alpha.get("sampled") is not None:
        rows.append((f"acceptance α at T={d['temperature']:g} (sum of min(p, q) = 1 - TVD)", f"{alpha['sampled']:.3f}"))
    expected = (d.get("expected_tokens_per_step") or {}).get("greedy")
    if expected:
        rows.append(("expected tokens per verification step, greedy, γ = 1 / 2 / 4 / 8 (i.i.d. estimate)",
                     " / ".join(f"{expected[str(g)]:.2f}" for g in (1, 2, 4, 8))))
    if meas:
        rows.append((f"measured tokens per verification step, γ = {meas['gamma']} ({meas['prompts']} prompts, batch 1)",
                     f"{meas['tokens_per_step']:.2f}"))
        device = (eval_report.get("provenance") or {}).get("device", "?")
        rows.append((f"measured speed-up over the teacher alone ({device})",
                     f"{meas['speedup']:.2f}x ({meas['teacher_tokens_per_second']:,.0f} → "
                     f"{meas['assisted_tokens_per_second']:,.0f} tokens/s)"))
    return {"teacher": d["teacher"]["id"], "weights_sha256": Markdown(md_code(d["teacher"]["weights_sha256"] or "-")),
            "universal": bool(meas and meas["universal"]), "rows": rows}


def write_card(model_dir: Path) -> Path:
    """The card of the student in ``model_dir``, from its ``potstill.json``: train writes it."""
    info = json.loads((model_dir / "potstill.json").read_text())
    path = model_dir / "README.md"
    path.write_text(card_text(info, None, info.get("name", model_dir.name)), encoding="utf-8")
    return path


def add_results(model_dir: Path, eval_report: dict) -> Path:
    """The card with eval's results for this model: the part train wrote, byte for byte (its sha256
    is in potstill.json), then this evaluation section in place of any earlier one."""
    path = model_dir / "README.md"
    if not path.is_file():
        write_card(model_dir)
    info = json.loads((model_dir / "potstill.json").read_text())
    # surrogateescape: bytes that are not UTF-8 go back as they came, and verify names them
    written, _ = split(path.read_text(encoding="utf-8", errors="surrogateescape"))
    text = written + evaluation_text(eval_report, info.get("name", model_dir.name))
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    return path

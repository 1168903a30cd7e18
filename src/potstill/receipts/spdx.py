"""The student as an SPDX 3.0.1 document (JSON-LD, AI and Dataset profiles): the student
``trainedOn`` the ledger rows (a dataset), each teacher ``generates`` that dataset, and the
concluded licences. Written beside the model card as ``model.spdx3.json``."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

CONTEXT = "https://spdx.org/rdf/3.0.1/spdx-context.jsonld"
FILE = "model.spdx3.json"


def spdx_document(info: dict) -> dict:
    """The document for a student's potstill.json (after its weights hash and manifest root are in)."""
    base = f"urn:potstill:{info.get('manifest_merkle_root') or info['ledger_sha256']}"
    ci = "_:creationinfo"
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    agent = {"type": "SoftwareAgent", "spdxId": f"{base}:agent/potstill", "creationInfo": ci, "name": "potstill"}
    student = _student(info, base, ci, agent["spdxId"])
    dataset = _dataset(info, base, ci, agent["spdxId"], student["name"])
    student_id, dataset_id = student["spdxId"], dataset["spdxId"]
    graph = [{"type": "CreationInfo", "@id": ci, "specVersion": "3.0.1", "created": created,
              "createdBy": [agent["spdxId"]]}, agent, student, dataset]
    relationships = [("trainedOn", student_id, [dataset_id])]
    licences = {}  # licence -> the elements it is concluded for
    for i, t in enumerate(info["teachers"]):
        record = _terms_record(info, t["id"])
        teacher = _teacher(info, base, ci, i, t, record)
        graph.append(teacher)
        relationships.append(("generates", teacher["spdxId"], [dataset_id]))
        if record.get("licence"):
            licences.setdefault(record["licence"], []).append(dataset_id)
    concluded, _ = concluded_licence(info)
    licences.setdefault(concluded, []).append(student_id)
    ids = {}  # one LicenseExpression element per expression
    for kind, expression, holder in _licence_relationships(info, licences, concluded, student_id):
        if expression not in ids:
            ids[expression] = f"{base}:license/{len(ids)}"
            graph.append({"type": "simplelicensing_LicenseExpression", "spdxId": ids[expression], "creationInfo": ci,
                          "simplelicensing_licenseExpression": expression})
        relationships.append((kind, holder, [ids[expression]]))
    for k, (kind, src, dst) in enumerate(relationships):
        graph.append({"type": "Relationship", "spdxId": f"{base}:relationship/{k}", "creationInfo": ci,
                      "relationshipType": kind, "from": src, "to": dst})
    elements = [e["spdxId"] for e in graph if "spdxId" in e]
    graph.append({"type": "SpdxDocument", "spdxId": f"{base}:document", "creationInfo": ci,
                  "name": f"{student['name']}: distilled with potstill",
                  "profileConformance": ["core", "software", "ai", "dataset", "simpleLicensing"],
                  "rootElement": [student_id], "element": elements})
    return {"@context": CONTEXT, "@graph": graph}


def _student(info: dict, base: str, ci: str, agent_id: str) -> dict:
    """The student: an AI package with its training hyperparameters and weights hash."""
    terms = info.get("terms") or {}
    train = info["train"]
    return {
        "type": "ai_AIPackage", "spdxId": f"{base}:student", "creationInfo": ci,
        "name": info.get("model_name") or info.get("name", "student"),
        "software_primaryPurpose": "model", "ai_typeOfModel": ["transformer language model, distilled"],
        "ai_informationAboutTraining": f"{info['objective']} distillation by potstill on {info['examples']:,} teacher "
                                       f"completions; intended use: {terms.get('use', 'not recorded')}",
        "ai_hyperparameter": [{"type": "DictionaryEntry", "key": k, "value": str(train[k])}
                              for k in ("objective", "loss", "teacher_signal", "temperature", "kd_ratio", "lr",
                                        "batch_size", "epochs", "seed") if k in train],
        "ai_limitation": "Anyone using this model must honour the terms under which its teachers' outputs were "
                         "obtained (TERMS.md). potstill's terms check is a record-keeping aid, not legal advice.",
        "verifiedUsing": [{"type": "Hash", "algorithm": "sha256", "hashValue": info["weights_sha256"],
                           "comment": "potstill weights_sha256: sha256 over each safetensors file's name and sha256"}],
        "suppliedBy": agent_id,
    }


def _dataset(info: dict, base: str, ci: str, agent_id: str, student_name: str) -> dict:
    """The ledger rows the student was trained on, with their content hash and Merkle root."""
    terms = info.get("terms") or {}
    dataset = {
        "type": "dataset_DatasetPackage", "spdxId": f"{base}:dataset", "creationInfo": ci,
        "name": f"ledger rows trained on ({info.get('manifest_rows', info['examples']):,})",
        "software_primaryPurpose": "data", "dataset_datasetType": ["text"],
        "dataset_dataCollectionProcess": "generated by " + ", ".join(t["id"] for t in info["teachers"]),
        "dataset_intendedUse": f"training {student_name} ({terms.get('use', 'use not recorded')})",
        "verifiedUsing": [{"type": "Hash", "algorithm": "sha256", "hashValue": info["ledger_sha256"],
                           "comment": "potstill ledger_sha256 of the rows' content"}],
        "suppliedBy": agent_id,
    }
    if info.get("manifest_merkle_root"):
        dataset["verifiedUsing"].append({"type": "Hash", "algorithm": "other", "hashValue": info["manifest_merkle_root"],
                                         "comment": "RFC 6962 Merkle root of the rows (manifest.merkle, potstill verify)"})
    return dataset


def _terms_record(info: dict, teacher_id: str) -> dict:
    """The terms check's record of the teacher ``teacher_id`` (the last one per teacher key), or {}."""
    by_key = {t.get("teacher_key"): t for t in (info.get("terms") or {}).get("teachers", [])}
    return next((r for r in by_key.values() if r["teacher"] == teacher_id), {})


def _teacher(info: dict, base: str, ci: str, i: int, t: dict, record: dict) -> dict:
    """Teacher ``i`` (``t``, from potstill.json's teachers): an AI package whose comment gives its terms
    and their verdict for the intended use."""
    use = (info.get("terms") or {}).get("use", "?")
    teacher = {"type": "ai_AIPackage", "spdxId": f"{base}:teacher/{i}", "creationInfo": ci, "name": t["id"],
               "software_primaryPurpose": "model",
               "comment": f"terms: {record.get('family', t.get('terms_family', 'unknown'))}, "
                          f"{record.get('verdict', 'not checked')} for {use}"
                          + (f"; declared terms contradict the evidence: {record['contradiction']}; evidence: "
                             f"{', '.join(record.get('evidence', []))}" if record.get("contradiction") else "")}
    if t.get("revision"):
        teacher["software_packageVersion"] = str(t["revision"])
    return teacher


def _licence_relationships(info: dict, licences: dict, concluded: str, student_id: str) -> list[tuple[str, str, str]]:
    """(relationship type, licence expression, holder) for each licence concluded for an element
    (``licences``: licence -> elements), and the recipe's declared licence of the student when the
    teachers' terms narrow it to ``concluded``."""
    expressions = {}
    for expression, holders in licences.items():
        expressions[licence_expression(expression)] = expressions.get(licence_expression(expression), []) + holders
    kinds = [("hasConcludedLicense", e, h) for e, holders in expressions.items() for h in dict.fromkeys(holders)]
    declared = licence_expression(info.get("license"))
    if declared != concluded:  # the recipe's licence, which the teachers' terms narrow
        kinds.append(("hasDeclaredLicense", declared, student_id))
    return kinds


def licence_expression(licence: str | None) -> str:
    """``licence`` as an SPDX licence expression: each licence id the SPDX list knows in its
    canonical spelling (``apache-2.0`` -> ``Apache-2.0``), ``LicenseRef-...`` as it is, any other
    name (a Hugging Face id such as ``llama3.1``, ``other``) as ``LicenseRef-<name>``, which SPDX
    reserves for licences outside its list; a string that does not parse as an expression is one
    LicenseRef. NOASSERTION for none. Parsed by ``license-expression`` (the SPDX grammar)."""
    from license_expression import ExpressionError, get_spdx_licensing

    text = " ".join(str(licence or "").split())
    if text in ("", "NOASSERTION", "NONE"):
        return text or "NOASSERTION"
    licensing = get_spdx_licensing()
    try:
        parsed = licensing.parse(text, validate=False)
    except ExpressionError:
        return _licence_ref(text)
    if parsed is None:
        return "NOASSERTION"
    names = {}
    for symbol in licensing.license_symbols(parsed, unique=True, decompose=True):
        key = symbol.key
        if not (key in licensing.known_symbols or re.fullmatch(r"LicenseRef-[A-Za-z0-9.\-]+", key)):
            names[key] = _licence_ref(key)
    out = parsed.render("{symbol.key}")
    for key, ref in names.items():  # whole symbols only: "mit" inside another name stays
        out = re.sub(rf"(?<![A-Za-z0-9.\-+]){re.escape(key)}(?![A-Za-z0-9.\-+])", ref, out)
    return out if not expression_problems(out) else _licence_ref(text)  # "X WITH <no exception>": one name


def _licence_ref(name: str) -> str:
    return "LicenseRef-" + (re.sub(r"[^A-Za-z0-9.\-]+", "-", name.removeprefix("LicenseRef-")).strip("-") or "unnamed")


def expression_problems(expression: str) -> list[str]:
    """What makes ``expression`` no valid SPDX licence expression (none when it is): parsed with
    the SPDX licence list; LicenseRef-... ids are valid by the grammar, not by the list."""
    from license_expression import get_spdx_licensing

    if expression in ("NOASSERTION", "NONE"):
        return []
    info = get_spdx_licensing().validate(expression, strict=True)
    unknown = [s for s in info.invalid_symbols if not re.fullmatch(r"LicenseRef-[A-Za-z0-9.\-]+", str(s))]
    others = [e for e in info.errors if not e.startswith("Unknown license key")]
    return others + ([f"unknown licence ids: {', '.join(map(str, unknown))}"] if unknown else [])


def concluded_licence(info: dict) -> tuple[str, list[str]]:
    """(the student's concluded licence, the licences that flow down to it): the recipe's
    ``student.license`` AND the licence of every teacher family whose restrictions pass to every
    user of the student (Gemma's terms, Llama's acceptable-use policy: ``obligations.licences``).
    A student of a Gemma teacher declared ``apache-2.0`` is ``Apache-2.0 AND
    LicenseRef-Gemma-Terms-of-Use``, not Apache-2.0."""
    declared = licence_expression(info.get("license"))
    flows = [licence_expression(x) for x in ((info.get("terms") or {}).get("obligations") or {}).get("licences", [])]
    flows = [x for x in dict.fromkeys(flows) if x not in (declared, "NOASSERTION")]
    parts = ([declared] if declared != "NOASSERTION" else []) + flows
    if not parts:
        return "NOASSERTION", []
    return " AND ".join(f"({p})" if " OR " in p else p for p in parts), flows


def write(folder: Path, info: dict) -> None:
    (folder / FILE).write_text(json.dumps(spdx_document(info), indent=2) + "\n", encoding="utf-8")

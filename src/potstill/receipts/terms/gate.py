"""May these teachers' outputs train a student for this use? The registry (``registry.yaml``)
answers per terms family; this module matches a teacher to a family and applies the verdict.

A record-keeping aid, not legal advice: it records what the terms say as potstill's registry
summarises them, and stops a run whose record says "forbidden" until a person accepts the risk
with a reason, which is kept in the ledger and the model card.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from potstill.errors import PotstillError

USES = ("research", "internal", "commercial", "competing")
VERDICTS = ("allowed", "obligations", "review", "forbidden", "unknown")
# verdicts that train without a word from the user; review and unknown need teacher.terms_declared
PASSES = ("allowed", "obligations")
NOT_ADVICE = "potstill's terms check is a record-keeping aid, not legal advice"


@dataclass(frozen=True)
class Family:
    key: str
    name: str
    licence: str
    url: str | None
    source: str | None
    clause: str
    uses: dict[str, str]
    obligations: dict = field(default_factory=dict)
    conditions: str | None = None
    verified: bool = False
    retrieved: str | None = None
    text_sha256: str | None = None
    match: dict = field(default_factory=dict)


@dataclass
class TeacherTerms:
    """One teacher's standing under one intended use."""

    teacher_id: str
    family: str
    matched_by: str  # how the family was found: "terms_family apache-2.0", "endpoint host api.openai.com", ...
    use: str
    verdict: str
    rows: int = 0
    declared: str | None = None  # the recipe's teacher.terms_declared, for review and unknown

    @property
    def passes(self) -> bool:
        return self.verdict in PASSES or (self.verdict in ("review", "unknown") and bool(self.declared))

    def record(self) -> dict:
        f = family(self.family)
        return {"teacher": self.teacher_id, "family": self.family, "matched_by": self.matched_by, "use": self.use,
                "verdict": self.verdict, "rows": self.rows, "declared": self.declared, "licence": f.licence,
                "url": f.url, "clause": f.clause, "verified": f.verified, "text_sha256": f.text_sha256}


@functools.cache
def registry() -> dict[str, Family]:
    """The families of ``registry.yaml``, in file order (the order matching tries them)."""
    text = resources.files("potstill.receipts.terms").joinpath("registry.yaml").read_text(encoding="utf-8")
    out = {}
    for key, entry in yaml.safe_load(text)["families"].items():
        fields = {k: entry.get(k) for k in ("name", "licence", "url", "source", "clause", "conditions", "retrieved",
                                            "text_sha256")}
        out[key] = Family(key=key, uses=entry["uses"], obligations=entry.get("obligations") or {},
                          verified=bool(entry.get("verified")), match=entry.get("match") or {}, **fields)
    return out


def family(key: str) -> Family:
    return registry()[key]


def folder_licenses(path: str | Path | None) -> list[str]:
    """The ``license`` and ``license_name`` fields of a model folder's README.md front matter (what
    the Hub shows as its licence), lower-cased; [] when there is none."""
    if not path:
        return []
    readme = Path(path) / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    m = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return []
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return []
    if not isinstance(meta, dict):
        return []
    return [str(meta[k]).strip().lower() for k in ("license_name", "license") if meta.get(k)]


def match_teacher(description: dict) -> tuple[str, str]:
    """(family key, how it matched) for a teacher's description (as stored in the ledger).

    Tried in this order, each over every family in registry order: the explicit
    ``terms_family`` (a key or alias), the endpoint host, the model id patterns, the local folder's
    licence field. Nothing matched: ``unknown``, never an allowing family."""
    families = registry()
    explicit = (description.get("terms_family") or "unknown").strip().lower()
    if explicit != "unknown":
        for f in families.values():
            if explicit == f.key or explicit in (a.lower() for a in f.match.get("aliases", [])):
                return f.key, f"terms_family {explicit}"
        return "unknown", f"terms_family {explicit} is not in the registry"
    hosts = {urlsplit(u).hostname or "" for u in (description.get("endpoint") or "").split()}
    for f in families.values():
        if hit := hosts & set(f.match.get("hosts", [])):
            return f.key, f"endpoint host {sorted(hit)[0]}"
    names = [n for n in (description.get("id"), description.get("model"),
                         Path(description["path"]).name if description.get("path") else None) if n]
    for f in families.values():
        for pattern in f.match.get("model_ids", []):
            for n in names:
                if re.search(pattern, n, re.I):
                    return f.key, f"model id {n}"
    licenses = folder_licenses(description.get("path")) if description.get("backend") == "local" else []
    for f in families.values():
        if hit := [lic for lic in licenses if lic in f.match.get("licenses", [])]:
            return f.key, f"folder licence {hit[0]}"
    return "unknown", "no registry entry matched"


def check(teachers: list[tuple[dict, int]], use: str, declared: str | None = None) -> list[TeacherTerms]:
    """The verdict for each (teacher description, rows it contributed) under ``use``."""
    if use not in USES:
        raise PotstillError(f"use {use!r}: give one of {', '.join(USES)}")
    out = []
    for desc, rows in teachers:
        key, how = match_teacher(desc)
        out.append(TeacherTerms(desc.get("id") or "?", key, how, use, family(key).uses[use], rows, declared))
    return out


def gate(terms: list[TeacherTerms], accept_risk: str | None = None) -> list[str]:
    """Stop, with one line naming each teacher that fails, its rows, the clause and the URL,
    unless ``accept_risk`` gives a reason. Returns the lines that were overridden (for the output)."""
    problems = []
    for t in terms:
        if t.passes:
            continue
        f = family(t.family)
        if t.verdict == "forbidden":
            why = f"its terms ({t.family}: {f.clause}; {f.url or 'no URL'}) forbid training a model for use {t.use!r}"
        elif t.verdict == "review":
            why = (f"its terms ({t.family}: {f.clause}; {f.url or 'no URL'}) allow use {t.use!r} only if "
                   f"{f.conditions or 'a condition holds'}: say so in teacher.terms_declared")
        else:
            why = f"potstill does not know its terms ({t.matched_by}): set teacher.terms_family or teacher.terms_declared"
        problems.append(f"teacher {t.teacher_id!r} ({t.rows:,} rows): {why}")
    if problems and not (accept_risk and accept_risk.strip()):
        raise PotstillError("terms: " + "; ".join(problems) + f". To go on anyway pass --accept-terms-risk "
                            f"\"reason\" (recorded in the ledger and the model card); {NOT_ADVICE}")
    return problems


def merge_obligations(terms: list[TeacherTerms]) -> dict:
    """What the export must carry for every teacher together: name prefixes, attribution lines,
    notices, files, flow-down restrictions, thresholds; and the conflicts between them (two
    different required name prefixes) for the export to refuse."""
    out = {"name_prefix": None, "attribution": [], "notice": [], "files": [], "flow_down": [], "thresholds": [],
           "conflicts": []}
    prefixes: dict[str, list[str]] = {}
    for t in terms:
        ob = family(t.family).obligations  # also when a review verdict was declared or a refusal overridden
        if ob.get("name_prefix"):
            prefixes.setdefault(ob["name_prefix"], []).append(t.teacher_id)
        for key in ("attribution", "notice"):
            if ob.get(key) and ob[key] not in out[key]:
                out[key].append(ob[key])
        for key in ("files", "flow_down", "thresholds"):
            out[key] += [x for x in ob.get(key, []) if x not in out[key]]
    if len(prefixes) > 1:
        out["conflicts"].append("the name must begin with each of " + ", ".join(
            f"{p!r} ({', '.join(ids)})" for p, ids in prefixes.items()))
    elif prefixes:
        out["name_prefix"] = next(iter(prefixes))
    return out


def prefixed_name(name: str, prefix: str | None) -> str:
    """``name`` with the required prefix in front, unless it already begins with it."""
    if not prefix or name.lower().startswith(prefix.lower()):
        return name
    return f"{prefix}-{name}"

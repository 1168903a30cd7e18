"""May these teachers' outputs train a student for this use? The registry (``registry.yaml``)
answers per terms family; this module gathers what is known of a teacher (endpoint host, the
models its responses name, its folder's licence, its id, the declared family), keeps the most
restrictive verdict among them, and stops a declaration the evidence contradicts.

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


# how restrictive each verdict is: the most restrictive one the evidence names decides
RANK = {"allowed": 0, "obligations": 1, "review": 2, "unknown": 3, "forbidden": 4}
DECLARED = "teacher.terms_family"
LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENSE-MODEL", "LICENCE", "LICENCE.txt")
LICENCE_HEAD = 4096  # characters of a licence file searched for its title


@dataclass(frozen=True)
class Evidence:
    """One thing potstill read about a teacher, and the families it names (none: it names no
    family the registry knows)."""

    source: str  # endpoint host, response model, served model, folder licence, ..., teacher id
    value: str
    families: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.source} {self.value}: " + (", ".join(self.families) if self.families else "no family")


@dataclass
class TeacherTerms:
    """One teacher's standing under one intended use."""

    teacher_id: str
    family: str  # the family that decides: the most restrictive verdict the evidence names
    matched_by: str  # the evidence that named it: "endpoint host api.openai.com", "folder licence llama3.1", ...
    use: str
    verdict: str
    rows: int = 0
    declared: str | None = None  # the recipe's teacher.terms_declared, for review and unknown
    families: tuple[str, ...] = ()  # every family the evidence names, the deciding one first
    evidence: tuple[Evidence, ...] = ()  # all that was read, named family or not
    contradiction: str | None = None  # the declared terms_family against the evidence

    @property
    def verdict_passes(self) -> bool:
        """The verdict trains: allowed, obligations, or review / unknown with a declaration that
        says something (a blank one says nothing)."""
        return self.verdict in PASSES or (self.verdict in ("review", "unknown") and bool((self.declared or "").strip()))

    @property
    def passes(self) -> bool:
        return self.verdict_passes and not self.contradiction

    def record(self) -> dict:
        f = family(self.family)
        return {"teacher": self.teacher_id, "family": self.family, "matched_by": self.matched_by, "use": self.use,
                "verdict": self.verdict, "rows": self.rows, "declared": self.declared, "licence": f.licence,
                "url": f.url, "clause": f.clause, "verified": f.verified, "text_sha256": f.text_sha256,
                "families": list(self.families or (self.family,)), "evidence": [str(e) for e in self.evidence],
                "contradiction": self.contradiction}


@functools.cache
def registry() -> dict[str, Family]:
    """The families of ``registry.yaml``, in file order."""
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


def declared_family(value: str | None) -> str | None:
    """The family key a recipe's ``terms_family`` names (a key or alias); None for unknown or
    empty; the value itself when the registry does not know it."""
    value = (value or "").strip().lower()
    if value in ("", "unknown"):
        return None
    for f in registry().values():
        if value == f.key or value in (a.lower() for a in f.match.get("aliases", [])):
            return f.key
    return value


def id_families(name: str) -> tuple[str, ...]:
    """The families whose ``model_ids`` patterns match a model id as a whole (case-insensitive):
    the last part of the id after any ``/`` (``meta-llama/Llama-3.1-8B`` -> ``llama-3.1-8b``)."""
    base = name.strip().lower().rsplit("/", 1)[-1]
    return tuple(f.key for f in registry().values()
                 if any(re.fullmatch(p, base, re.I) for p in f.match.get("model_ids", [])))


def folder_metadata(path: str | Path | None) -> dict:
    """A model folder's README.md front matter (what the Hub shows as its licence and base
    model); {} when there is none."""
    if not path:
        return {}
    try:
        text = (Path(path) / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _strings(value) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in values if isinstance(v, (str, int, float)) and str(v).strip()]


def _folder_evidence(desc: dict) -> list[Evidence]:
    """What a local teacher's folder says: its README's licence fields and base model, the title
    of its licence files, its name. Only when the folder holds the weights the description names
    (a ledger row's path is provenance, not identity: it could point anywhere)."""
    path = Path(desc["path"])
    if not path.is_dir():
        return [Evidence("folder", f"{path} (not found: its licence was not read)")]
    if desc.get("weights_sha256"):
        from potstill.provenance import weights_sha256

        try:
            same = weights_sha256(path) == desc["weights_sha256"]
        except OSError as e:
            return [Evidence("folder", f"{path} (its weights could not be read, {e.strerror}: its licence was not read)")]
        if not same:
            return [Evidence("folder", f"{path} (holds other weights than this teacher's: its licence was not read)")]
    found = []
    meta = folder_metadata(path)
    for key in ("license_name", "license"):
        for lic in _strings(meta.get(key)):
            lic = lic.lower()
            found.append(Evidence("folder licence", lic, tuple(
                f.key for f in registry().values() if lic in f.match.get("licenses", []))))
    for name in LICENCE_FILES:
        file = path / name
        if not file.is_file() or file.is_symlink():
            continue
        try:
            with file.open(encoding="utf-8", errors="replace") as fh:
                head = " ".join(fh.read(LICENCE_HEAD).lstrip("\ufeff").split())
        except OSError as e:
            found.append(Evidence("folder licence file", f"{name} (not readable, {e.strerror})"))
            continue
        found.append(Evidence("folder licence file", name, tuple(
            f.key for f in registry().values() if any(re.search(p, head, re.I) for p in f.match.get("license_texts", [])))))
    for base in _strings(meta.get("base_model")):
        found.append(Evidence("folder base_model", base, id_families(base)))
    found.append(Evidence("folder name", path.name, id_families(path.name)))
    return found


def evidence(desc: dict) -> list[Evidence]:
    """Everything potstill reads about a teacher (its description, as stored in the ledger), in
    the order that breaks ties between equally restrictive verdicts: the endpoint host, the models
    the responses or the export name, the model the recipe asks the endpoint for, the local
    folder (licence fields, licence files, base model, name), the teacher's id. The declared
    ``terms_family`` is not evidence: :func:`weigh` holds it against this."""
    found = []
    for url in (desc.get("endpoint") or "").split():
        host = (urlsplit(url).hostname or "").lower()
        found.append(Evidence("endpoint host", host, tuple(
            f.key for f in registry().values() if host in f.match.get("hosts", []))))
    for model in _strings(desc.get("models")):
        found.append(Evidence("response model", model, id_families(model)))
    for model in _strings(desc.get("model")):
        found.append(Evidence("served model", model, id_families(model)))
    if desc.get("path"):
        found += _folder_evidence(desc)
    for tid in _strings(desc.get("id")):
        found.append(Evidence("teacher id", tid, id_families(tid)))
    return found


def _agree(a: str, b: str) -> bool:
    """Two families that say the same: one key, or the same licence, verdicts and obligations
    (apache-2.0 and qwen-apache)."""
    fa, fb = family(a), family(b)
    return a == b or (fa.licence == fb.licence and fa.uses == fb.uses and fa.obligations == fb.obligations)


def weigh(desc: dict, use: str, declared: str | None = None, rows: int = 0) -> TeacherTerms:
    """One teacher's verdict under ``use``: the most restrictive verdict among the families the
    evidence names and the declared ``terms_family`` (ties: the evidence first, in
    :func:`evidence` order). A declared family that the registry does not know while the evidence
    names one, or that is less restrictive than a family the evidence names without saying the
    same, is a contradiction: the gate stops for it as for a forbidden verdict."""
    found = evidence(desc)
    named = [(key, e) for e in found for key in e.families]
    claim = declared_family(desc.get("terms_family"))
    said = Evidence(DECLARED, str(desc.get("terms_family")).strip(), (claim,) if claim in registry() else ())
    if claim in registry():
        named.append((claim, said))
    contradiction = None
    if claim is not None and named and claim not in registry():
        key, e = named[0]
        contradiction = (f"{DECLARED} {said.value!r} is not a family potstill knows, and {e.source} {e.value} "
                         f"names {key}")
    elif claim in registry():
        rank = RANK[family(claim).uses[use]]
        against = [(key, e) for key, e in named if e is not said and not _agree(claim, key)
                   and RANK[family(key).uses[use]] >= rank]
        if against:
            key, e = against[0]
            contradiction = (f"{DECLARED} {claim} contradicts {e.source} {e.value}, which names {key} "
                             f"({family(key).uses[use]} for use {use!r})")
    shown = tuple(found) + ((said,) if claim is not None else ())
    if not named:
        how = (f"{DECLARED} {said.value} is not in the registry" if claim is not None else
               "no registry entry matched")
        return TeacherTerms(desc.get("id") or "?", "unknown", how, use, "unknown", rows, declared, ("unknown",), shown,
                            contradiction)
    # max keeps the first of equals: the evidence before the declaration
    key, e = max(named, key=lambda pair: RANK[family(pair[0]).uses[use]])
    families = tuple(dict.fromkeys([key] + [k for k, _ in named]))
    return TeacherTerms(desc.get("id") or "?", key, f"{e.source} {e.value}", use, family(key).uses[use], rows,
                        declared, families, shown, contradiction)


def check(teachers: list[tuple[dict, int]], use: str, declared: str | None = None) -> list[TeacherTerms]:
    """The verdict for each (teacher description, rows it contributed) under ``use``."""
    if use not in USES:
        raise PotstillError(f"use {use!r}: give one of {', '.join(USES)}")
    return [weigh(desc, use, declared, rows) for desc, rows in teachers]


def gate(terms: list[TeacherTerms], accept_risk: str | None = None) -> list[str]:
    """Stop, with one line naming each teacher that fails (its rows, the clause and the URL, or
    the declaration the evidence contradicts), unless ``accept_risk`` gives a reason. Returns the
    lines that were overridden (for the output)."""
    problems = []
    for t in terms:
        head = f"teacher {t.teacher_id!r} ({t.rows:,} rows)"
        if t.contradiction:
            problems.append(f"{head}: {t.contradiction}; the most restrictive verdict is kept ({t.family}, {t.verdict} "
                            f"for use {t.use!r}): correct teacher.terms_family or leave it unknown")
        if t.verdict_passes:
            continue
        f = family(t.family)
        if t.verdict == "forbidden":
            why = (f"its terms ({t.family}, by {t.matched_by}: {f.clause}; {f.url or 'no URL'}) forbid training a "
                   f"model for use {t.use!r}")
        elif t.verdict == "review":
            why = (f"its terms ({t.family}, by {t.matched_by}: {f.clause}; {f.url or 'no URL'}) allow use {t.use!r} "
                   f"only if {f.conditions or 'a condition holds'}: say so in teacher.terms_declared")
        else:
            read = ", ".join(str(e) for e in t.evidence) or "nothing"
            why = (f"potstill does not know its terms ({t.matched_by}; read {read}): set teacher.terms_family or "
                   f"teacher.terms_declared")
        problems.append(f"{head}: {why}")
    if problems and not (accept_risk and accept_risk.strip()):
        raise PotstillError("terms: " + "; ".join(problems) + f". To go on anyway pass --accept-terms-risk "
                            f"\"reason\" (recorded in the ledger and the model card); {NOT_ADVICE}")
    return problems


def merge_obligations(terms: list[TeacherTerms]) -> dict:
    """What the export must carry for every teacher together: name prefixes, attribution lines,
    notices, files, flow-down restrictions, thresholds, of every family the evidence names for
    it; ``licences``, the licence of each family whose restrictions flow down to every user of the
    student (they join the student's declared licence in its concluded one: the card, SPDX); and
    the conflicts between them (two different required name prefixes) for the export to refuse."""
    out = {"name_prefix": None, "attribution": [], "notice": [], "files": [], "flow_down": [], "thresholds": [],
           "licences": [], "conflicts": []}
    prefixes: dict[str, list[str]] = {}
    for t in terms:
        for key in t.families or (t.family,):
            ob = family(key).obligations  # also when a review verdict was declared or a refusal overridden
            if ob.get("name_prefix") and t.teacher_id not in prefixes.get(ob["name_prefix"], []):
                prefixes.setdefault(ob["name_prefix"], []).append(t.teacher_id)
            for k in ("attribution", "notice"):
                if ob.get(k) and ob[k] not in out[k]:
                    out[k].append(ob[k])
            for k in ("files", "flow_down", "thresholds"):
                out[k] += [x for x in ob.get(k, []) if x not in out[k]]
            if ob.get("flow_down") and family(key).licence not in out["licences"]:
                out["licences"].append(family(key).licence)
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

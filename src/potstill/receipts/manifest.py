"""A tamper-evident manifest of the ledger rows a student was trained on: a Merkle tree.

Leaf i is ``sha256(0x00 || row digest)`` of the i-th row in request-hash order, where the row
digest covers what the teacher was asked and answered and under which terms: the request hash,
prompt messages, sampling parameters, sample index, completion text, token ids, top-k ids and
logprobs, finish reason, the teacher's description and the terms verdict recorded at training.
Inner nodes are ``sha256(0x01 || left || right)``; a level's unpaired last node moves up as it
is. This is the tree of RFC 6962 (Certificate Transparency) §2.1, so its inclusion proofs are the
familiar audit paths.

``<student>/manifest.merkle`` stores, per row, its request hash and leaf (32 + 32 bytes; not
``.bin``, which a model folder reads as pickled weights); the root
goes into potstill.json, the model card and the report. potstill.json also records the sha256 of
every other file train writes into the student's folder (``files_sha256``: weights, config,
tokenizer, manifest.merkle, model.spdx3.json, TERMS.md, NOTICE, licence copies) and of the card it
wrote (``card_sha256``; eval's section, appended later, is checked against the run's eval.json).
``verify`` recomputes every leaf from the ledger and names the first that differs, names every file
missing, edited or added, names every card field and the first line that differ from what train
wrote, and checks that the card agrees with the ledger; ``inclusion_proof`` shows one row belongs
without sharing any other, and ``row_problems`` checks that row against the ledger.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

from potstill.errors import PotstillError

ROW_BYTES = 64  # request hash (32) + leaf (32)
MANIFEST = "manifest.merkle"
RECORD, CARD = "potstill.json", "README.md"  # the record holds the other files' hashes; the card is bound apart


BYTES_FIELDS = b"token_bytes,topk_bytes,token_logprobs"  # names the fields a leaf holds after the verdict


def row_digest(fields: list) -> bytes:
    """sha256 over the fields, each length-prefixed so no two rows can run into the same bytes."""
    h = hashlib.sha256()
    for f in fields:
        b = b"" if f is None else f if isinstance(f, bytes) else str(f).encode()
        h.update((len(b) if f is not None else 2**64 - 1).to_bytes(8, "little"))
        h.update(b)
    return h.digest()


def leaf_hash(digest: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + digest).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def levels(leaves: list[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first, root last."""
    if not leaves:
        return [[hashlib.sha256(b"").digest()]]  # RFC 6962: the hash of an empty tree
    out = [list(leaves)]
    while len(out[-1]) > 1:
        below = out[-1]
        up = [node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            up.append(below[-1])
        out.append(up)
    return out


def merkle_root(leaves: list[bytes]) -> bytes:
    return levels(leaves)[-1][0]


def inclusion_proof(leaves: list[bytes], index: int) -> list[tuple[str, bytes]]:
    """The audit path of leaf ``index``: (side of the sibling, sibling hash), leaf to root."""
    path = []
    for level in levels(leaves)[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(("left" if sibling < index else "right", level[sibling]))
        index //= 2
    return path


def proof_root(leaf: bytes, path: list[tuple[str, bytes]]) -> bytes:
    """The root an audit path leads to from ``leaf``: equal to the manifest's root iff the row is in it."""
    node = leaf
    for side, sibling in path:
        node = node_hash(sibling, node) if side == "left" else node_hash(node, sibling)
    return node


def ledger_leaves(ledger, request_hashes: list[str], verdicts: dict[str, str]) -> list[tuple[str, bytes]]:
    """(request hash, leaf) for the done rows of ``request_hashes``, in request-hash order;
    ``verdicts``: teacher key -> the terms verdict recorded for it."""
    descriptions = {k: json.dumps(d, sort_keys=True, separators=(",", ":")) for k, d in ledger.teachers().items()}
    out = []
    for row in ledger.manifest_rows(request_hashes):
        h, teacher = row[0], row[1]
        fields = [*row[:11], descriptions.get(teacher), verdicts.get(teacher)]
        if any(f is not None for f in row[11:]):  # an endpoint's token bytes and logprobs, trained on too;
            fields += [BYTES_FIELDS, *row[11:]]  # a row without them keeps the leaf it always had
        out.append((h, leaf_hash(row_digest(fields))))
    return out


def write(folder: Path, rows: list[tuple[str, bytes]]) -> str:
    """Write ``manifest.merkle``; return the root (hex)."""
    with open(folder / MANIFEST, "wb") as f:
        for h, leaf in rows:
            f.write(bytes.fromhex(h) + leaf)
    return merkle_root([leaf for _, leaf in rows]).hex()


def read(folder: Path) -> list[tuple[str, bytes]]:
    if not (folder / MANIFEST).is_file():
        raise PotstillError(f"{folder / MANIFEST} not found: give a run folder whose student was trained by a potstill "
                            f"that writes a manifest (or retrain it)")
    data = (folder / MANIFEST).read_bytes()
    if len(data) % ROW_BYTES:
        raise PotstillError(f"{folder / MANIFEST}: {len(data)} bytes is not a whole number of {ROW_BYTES}-byte rows; "
                            f"the file is damaged")
    return [(data[i:i + 32].hex(), data[i + 32:i + 64]) for i in range(0, len(data), ROW_BYTES)]


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` but the record and the card, by name."""
    from potstill.provenance import file_sha256

    return {p.name: file_sha256(p, remember=False) for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in (RECORD, CARD)}


def seal(folder: Path, info: dict) -> None:
    """Write potstill.json with the sha256 of every file beside it, then the card (rendered from
    it), then the card's sha256 into it: what ``verify`` holds the folder to."""
    from potstill.receipts.card import write_card

    info["files_sha256"] = file_hashes(folder)
    (folder / RECORD).write_text(json.dumps(info, indent=2) + "\n")
    info["card_sha256"] = hashlib.sha256(write_card(folder).read_bytes()).hexdigest()
    (folder / RECORD).write_text(json.dumps(info, indent=2) + "\n")


def card_metadata(folder: Path) -> dict:
    """The YAML front matter of the student's README.md."""
    text = (folder / "README.md").read_text(encoding="utf-8", errors="replace")  # not UTF-8: card_check names it
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    try:
        meta = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        meta = None
    if not isinstance(meta, dict):
        raise PotstillError(f"{folder / 'README.md'}: no YAML metadata block; the card is damaged")
    return meta


def record(folder: Path) -> dict:
    """The student's potstill.json: what verify holds everything else to."""
    path = folder / RECORD
    if not path.is_file():
        raise PotstillError(f"{path} not found: give a run folder with a trained student")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PotstillError(f"{path} is not JSON ({e}): the record is damaged; retrain to write it again") from None
    if not isinstance(info, dict) or not info.get("manifest_merkle_root"):
        raise PotstillError(f"{path} records no manifest (trained by an older potstill): retrain to get one")
    return info


def verify(folder: Path, ledger_path: Path) -> tuple[list[str], list[str], list[str]]:
    """(problems, notes, passed) for the student in ``folder`` against the run's ledger and its
    potstill.json; ``passed`` has one line for each check that held, saying what it covered."""
    from potstill.ledger import Ledger
    from potstill.provenance import file_sha256

    info = record(folder)
    if not ledger_path.is_file():
        raise PotstillError(f"{ledger_path} not found: verify needs the run's ledger to recompute the rows")
    problems, notes, passed = [], [], []
    rows = read(folder)
    root = merkle_root([leaf for _, leaf in rows]).hex()
    if root != info["manifest_merkle_root"] or len(rows) != info.get("manifest_rows"):
        problems.append(f"{MANIFEST}: its root {root[:16]}... ({len(rows)} rows) is not the root in potstill.json "
                        f"({info['manifest_merkle_root'][:16]}..., {info.get('manifest_rows')} rows)")

    terms = info.get("terms") or {}
    verdicts = {t["teacher_key"]: t["verdict"] for t in terms.get("teachers", [])}
    with Ledger(ledger_path) as ledger:
        now = dict(ledger_leaves(ledger, [h for h, _ in rows], verdicts))
        rows_by_teacher = ledger.teacher_rows([h for h, _ in rows])
    for i, (h, leaf) in enumerate(rows):
        if h not in now:
            problems.append(f"ledger: row {i} (request {h}) is not in {ledger_path}")
            break
        if now[h] != leaf:
            problems.append(f"ledger: row {i} (request {h}) differs from the row the student was trained on")
            break
    if not problems:
        passed.append(f"{len(rows):,} ledger rows match Merkle root {root} ({MANIFEST} and potstill.json; every leaf "
                      f"recomputed from {ledger_path})")

    files = sorted(folder.glob("*.safetensors"))
    weights = hashlib.sha256()
    for f in files:
        weights.update(f.name.encode())
        weights.update(file_sha256(f, remember=False).encode())
    if weights.hexdigest() != info.get("weights_sha256"):
        problems.append(f"weights: the sha256 of {', '.join(f.name for f in files) or 'no safetensors'} is not the "
                        f"one in potstill.json")
    else:
        passed.append(f"weights: {', '.join(f.name for f in files)} match weights_sha256 {weights.hexdigest()} "
                      f"(potstill.json)")

    if not isinstance(info.get("files_sha256", {}), dict) or not isinstance(info.get("card_sha256", ""), str):
        problems.append(f"{RECORD}: files_sha256 or card_sha256 is not what train writes; the record is damaged")
    elif info.get("files_sha256") is None or info.get("card_sha256") is None:
        notes.append("potstill.json records no sha256 of the other files or of the card (trained by an older "
                     "potstill): config, tokenizer, TERMS.md, model.spdx3.json and the card's text are not checked; "
                     "retrain to bind them")
    else:
        for check in (file_problems, card_check):
            found, ok = check(folder, info)
            problems += found
            passed += [ok] if ok else []
    if (folder / CARD).is_file():
        found = card_problems(folder, info, rows_by_teacher)
        problems += found
        if not found:
            shares = ", ".join(f"{(terms_of(info).get(k) or {}).get('teacher', k[:12])} {n:,}"
                               for k, n in sorted(rows_by_teacher.items()))
            passed.append(f"card: its distillation block agrees with the ledger (teachers and their shares of the "
                          f"rows: {shares}) and with potstill.json (terms verdicts, intended use {terms.get('use')}, "
                          f"Merkle root, weights hash)")
    elif info.get("card_sha256") is None:
        problems.append(f"card: {CARD} is missing")
    from potstill.receipts.terms.gate import check

    for t in terms.get("teachers", []):
        (current,) = check([({"id": t["teacher"], "terms_family": t["family"]}, t["rows"])], terms["use"])
        if current.verdict != t["verdict"]:
            notes.append(f"terms: {t['teacher']} was {t['verdict']} for {terms['use']} when trained; the registry "
                         f"now says {current.verdict}: review it")
    return problems, notes, passed


def terms_of(info: dict) -> dict[str, dict]:
    """teacher key -> the terms record of potstill.json."""
    return {t["teacher_key"]: t for t in (info.get("terms") or {}).get("teachers", [])}


def row_problems(folder: Path, ledger_path: Path, index: int,
                 rows: list[tuple[str, bytes]]) -> tuple[list[str], str | None]:
    """(problems, the line saying it held) for row ``index`` of the manifest: its leaf recomputed
    from the ledger, as ``verify`` does for every row."""
    from potstill.ledger import Ledger

    h, leaf = rows[index]
    where = f"ledger: row {index} (request {h})"
    if not ledger_path.is_file():
        return [f"{where} cannot be recomputed: {ledger_path} not found"], None
    if not (folder / RECORD).is_file():
        return [f"{where} cannot be recomputed: {folder / RECORD} (the terms verdicts in each leaf) not found"], None
    verdicts = {k: t["verdict"] for k, t in terms_of(record(folder)).items()}
    with Ledger(ledger_path) as ledger:
        now = dict(ledger_leaves(ledger, [h], verdicts))
    if h not in now:
        return [f"{where} is not in {ledger_path}"], None
    if now[h] != leaf:
        return [f"{where} differs from the row the student was trained on"], None
    return [], f"row {index}'s leaf is recomputed from {ledger_path}: that row is the one the student was trained on"


def file_problems(folder: Path, info: dict) -> tuple[list[str], str | None]:
    """Every file potstill.json says train wrote beside the card, missing or edited; every file it did not write."""
    from potstill.provenance import file_sha256

    recorded: dict = info["files_sha256"]
    out = []
    for name, digest in sorted(recorded.items()):
        path = folder / name
        if Path(name).name != name or name in (RECORD, CARD, "", ".", ".."):
            out.append(f"files: potstill.json lists {name!r}, which is not a file train writes; the record is damaged")
        elif not path.is_file():
            out.append(f"files: {name} is missing (train wrote it; potstill.json records its sha256)")
        elif file_sha256(path, remember=False) != digest:
            out.append(f"files: {name} differs from the file potstill wrote (potstill.json records sha256 "
                       f"{digest[:16]}...)")
    for p in sorted(folder.iterdir()):
        if p.name not in recorded and p.name not in (RECORD, CARD) and not p.name.startswith("."):
            out.append(f"files: {p.name} was not written by potstill (potstill.json lists every file it wrote): a "
                       f"model folder may load it; move it elsewhere")
    if out:
        return out, None
    return [], (f"files: the {len(recorded)} files potstill wrote beside the card are present and unchanged, and no "
                f"other is there (dot-files aside): {', '.join(sorted(recorded))}")


def card_check(folder: Path, info: dict) -> tuple[list[str], str | None]:
    """The card against the one train wrote (``card_sha256``): each field and the first line that
    differ are named. Eval's section, if any, must be the one the run's eval.json gives."""
    from potstill.receipts import card

    path = folder / CARD
    if not path.is_file():
        return [f"card: {CARD} is missing (train wrote it; potstill.json records its sha256)"], None
    written, section = card.split(path.read_bytes().decode("utf-8", errors="surrogateescape"))
    name = info.get("name", folder.name)
    out = []
    if hashlib.sha256(written.encode("utf-8", errors="surrogateescape")).hexdigest() != info["card_sha256"]:
        try:  # name what changed against the card rendered again from potstill.json
            edits = card_edits(card.card_text(info, None, name), written)
        except (KeyError, TypeError, ValueError):
            edits = []
        out += [f"card: {e}" for e in edits] or [f"card: {CARD} is not the card train wrote (its sha256 is not "
                                                 f"potstill.json's card_sha256)"]
    eval_path = folder.parent / "eval.json"
    if section:
        try:
            expected = card.evaluation_text(json.loads(eval_path.read_text(encoding="utf-8")), name)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            expected = ""
        if section != expected:
            diff = first_line_diff(expected, section)
            line = written.count("\n") + diff[0] + 1 if diff else 0  # the section starts on the line after train's
            out.append(f"card: the evaluation section of {CARD} is not the one {eval_path} gives" +
                       (f": line {line} reads {diff[2]}, eval.json gives {diff[1]}" if expected and diff
                        else f" ({eval_path} is missing, unreadable or has no row for {name})" if not expected else ""))
    if out:
        return out, None
    return [], (f"card: {CARD} is the card train wrote, every field and line (sha256 {info['card_sha256'][:16]}... "
                f"in potstill.json); " + (f"its evaluation section is the one {eval_path} gives" if section
                                           else "no evaluation section"))


def card_edits(expected: str, actual: str) -> list[str]:
    """Each metadata field of card ``actual`` that is not ``expected``'s (by its path, e.g.
    ``distillation.teachers[0].licence``), then the first line of the page that differs."""
    def parts(text: str) -> tuple[object, str, int]:
        m = re.match(r"---\n(.*?)\n---\n", text, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError:
            meta = None
        return meta, text[m.end():] if m else text, m.group(0).count("\n") if m else 0

    (want, page, _), (have, their_page, offset) = parts(expected), parts(actual)
    out = []
    if not isinstance(have, dict):
        out.append(f"{CARD} has no readable metadata block")
    elif isinstance(want, dict):
        out += [f"{path} {what}" for path, what in _field_diff(want, have, "")]
    if (diff := first_line_diff(page, their_page)) is not None:
        out.append(f"line {diff[0] + offset + 1} of {CARD} reads {diff[2]}, train wrote {diff[1]}")
    return out


def _field_diff(want, have, path: str):
    """(path, what differs) for each leaf of ``have`` that is not ``want``'s."""
    if isinstance(want, dict) and isinstance(have, dict):
        for key in [*want, *(k for k in have if k not in want)]:
            at = f"{path}.{key}" if path else str(key)
            if key not in have:
                yield at, f"is missing, train wrote {_show(want[key])}"
            elif key not in want:
                yield at, f"is {_show(have[key])}, a field train did not write"
            else:
                yield from _field_diff(want[key], have[key], at)
    elif isinstance(want, list) and isinstance(have, list) and len(want) == len(have):
        for i, (w, h) in enumerate(zip(want, have)):
            yield from _field_diff(w, h, f"{path}[{i}]")
    elif want != have or type(want) is not type(have):
        yield path, f"is {_show(have)}, train wrote {_show(want)}"


def first_line_diff(want: str, have: str) -> tuple[int, str, str] | None:
    """(index, wanted line, line found), each shown quoted, of the first line that differs."""
    a, b = want.split("\n"), have.split("\n")
    for i in range(max(len(a), len(b))):
        x, y = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
        if x != y:
            return i, _show(x) if x is not None else "no line", _show(y) if y is not None else "no line"
    return None


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _show(value, limit: int = 100) -> str:
    # bytes that were not UTF-8 (read with surrogateescape) are shown as escapes, not written raw
    text = json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace").decode()
    return text if len(text) <= limit else text[:limit] + '..."'


def card_problems(folder: Path, info: dict, rows_by_teacher: dict[str, int]) -> list[str]:
    """Where the card contradicts the ledger (teachers and their shares) or potstill.json (terms,
    manifest root, weights)."""
    try:
        block = card_metadata(folder).get("distillation")
    except PotstillError as e:
        return [str(e)]
    block = block if isinstance(block, dict) else {}
    terms = info.get("terms") or {}
    recorded = terms_of(info)
    total = sum(rows_by_teacher.values()) or 1
    expected = {recorded.get(k, {}).get("teacher", k[:12]): n / total for k, n in rows_by_teacher.items()}
    listed = block.get("teachers")
    if not isinstance(listed, list) or not all(isinstance(t, dict) for t in listed):
        return [f"card: {CARD} lists no teachers (distillation.teachers); the ledger rows come from {sorted(expected)}"]
    card = {str(t.get("id")): t for t in listed}
    out = []
    if set(card) != set(expected):
        out.append(f"card: teachers {sorted(map(str, card))} but the ledger rows come from {sorted(expected)}")
    for tid, share in expected.items():
        if tid in card and not abs(_number(card[tid].get("share_of_examples")) - share) <= 1e-6:  # nan: differs
            out.append(f"card: teacher {tid} has share_of_examples {card[tid].get('share_of_examples')}, the ledger "
                       f"says {share:.6g}")
        verdict = next((t["verdict"] for t in recorded.values() if t["teacher"] == tid), None)
        if tid in card and verdict is not None and card[tid].get("terms_verdict") != verdict:
            out.append(f"card: teacher {tid} has terms_verdict {card[tid].get('terms_verdict')}, potstill.json "
                       f"records {verdict}")
    use = block["terms"].get("use") if isinstance(block.get("terms"), dict) else None
    if use != terms.get("use"):
        out.append(f"card: intended use {use}, potstill.json records {terms.get('use')}")
    for key in ("manifest_merkle_root", "weights_sha256"):
        if block.get(key) != info.get(key):
            out.append(f"card: {key} {str(block.get(key))[:16]}... is not potstill.json's {str(info.get(key))[:16]}...")
    return out

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
goes into potstill.json, the model card and the report. ``verify`` recomputes every leaf from
the ledger and names the first that differs, checks the weights' hash and that the card agrees
with the ledger; ``inclusion_proof`` shows one row belongs without sharing any other.
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
        out.append((h, leaf_hash(row_digest([*row, descriptions.get(teacher), verdicts.get(teacher)]))))
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


def card_metadata(folder: Path) -> dict:
    """The YAML front matter of the student's README.md."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    try:
        meta = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        meta = None
    if not isinstance(meta, dict):
        raise PotstillError(f"{folder / 'README.md'}: no YAML metadata block; the card is damaged")
    return meta


def verify(folder: Path, ledger_path: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) for the student in ``folder`` against the run's ledger. No problems: the
    manifest, the ledger rows, the weights and the card all agree with potstill.json."""
    from potstill.ledger import Ledger
    from potstill.provenance import file_sha256

    info_path = folder / "potstill.json"
    if not info_path.is_file():
        raise PotstillError(f"{info_path} not found: give a run folder with a trained student")
    info = json.loads(info_path.read_text())
    if not info.get("manifest_merkle_root"):
        raise PotstillError(f"{info_path} records no manifest (trained by an older potstill): retrain to get one")
    if not ledger_path.is_file():
        raise PotstillError(f"{ledger_path} not found: verify needs the run's ledger (the manifest alone proves single "
                            f"rows: --row HASH)")
    problems, notes = [], []
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

    files = sorted(folder.glob("*.safetensors"))
    weights = hashlib.sha256()
    for f in files:
        weights.update(f.name.encode())
        weights.update(file_sha256(f, remember=False).encode())
    if weights.hexdigest() != info.get("weights_sha256"):
        problems.append(f"weights: the sha256 of {', '.join(f.name for f in files) or 'no safetensors'} is not the "
                        f"one in potstill.json")

    problems += card_problems(folder, info, rows_by_teacher)
    from potstill.receipts.terms.gate import check

    for t in terms.get("teachers", []):
        (current,) = check([({"id": t["teacher"], "terms_family": t["family"]}, t["rows"])], terms["use"])
        if current.verdict != t["verdict"]:
            notes.append(f"terms: {t['teacher']} was {t['verdict']} for {terms['use']} when trained; the registry "
                         f"now says {current.verdict}: review it")
    return problems, notes


def card_problems(folder: Path, info: dict, rows_by_teacher: dict[str, int]) -> list[str]:
    """Where the card contradicts the ledger (teachers and their shares) or potstill.json (terms,
    manifest root, weights)."""
    try:
        block = card_metadata(folder).get("distillation") or {}
    except PotstillError as e:
        return [str(e)]
    terms = info.get("terms") or {}
    recorded = {t["teacher_key"]: t for t in terms.get("teachers", [])}
    total = sum(rows_by_teacher.values()) or 1
    expected = {recorded.get(k, {}).get("teacher", k[:12]): n / total for k, n in rows_by_teacher.items()}
    card = {t.get("id"): t for t in block.get("teachers", [])}
    out = []
    if set(card) != set(expected):
        out.append(f"card: teachers {sorted(map(str, card))} but the ledger rows come from {sorted(expected)}")
    for tid, share in expected.items():
        if tid in card and abs(float(card[tid].get("share_of_examples", -1)) - share) > 1e-6:
            out.append(f"card: teacher {tid} has share_of_examples {card[tid].get('share_of_examples')}, the ledger "
                       f"says {share:.6g}")
        verdict = next((t["verdict"] for t in recorded.values() if t["teacher"] == tid), None)
        if tid in card and verdict is not None and card[tid].get("terms_verdict") != verdict:
            out.append(f"card: teacher {tid} has terms_verdict {card[tid].get('terms_verdict')}, potstill.json "
                       f"records {verdict}")
    if (block.get("terms") or {}).get("use") != terms.get("use"):
        out.append(f"card: intended use {(block.get('terms') or {}).get('use')}, potstill.json records {terms.get('use')}")
    for key in ("manifest_merkle_root", "weights_sha256"):
        if block.get(key) != info.get(key):
            out.append(f"card: {key} {str(block.get(key))[:16]}... is not potstill.json's {str(info.get(key))[:16]}...")
    return out

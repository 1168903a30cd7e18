"""The Merkle manifest: the tree equals RFC 6962's, inclusion proofs check, and `potstill verify`
names the ledger row, weights or card field that changed."""

import contextlib
import hashlib
import json
import shutil
import sqlite3

import pytest

from potstill.receipts import manifest


def rfc6962_root(leaves: list[bytes]) -> bytes:
    """MTH of RFC 6962 §2.1, written from the RFC's recursion: split at the largest power of two
    smaller than n."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + rfc6962_root(leaves[:k]) + rfc6962_root(leaves[k:])).digest()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 9, 16, 17, 33])
def test_root_is_rfc6962_and_every_inclusion_proof_checks(n):
    leaves = [manifest.leaf_hash(manifest.row_digest([i, "row"])) for i in range(n)]
    root = manifest.merkle_root(leaves)
    assert root == rfc6962_root(leaves)
    for i in range(n):
        path = manifest.inclusion_proof(leaves, i)
        assert manifest.proof_root(leaves[i], path) == root
        assert len(path) <= max(n - 1, 0).bit_length()
        forged = manifest.leaf_hash(manifest.row_digest([i, "other"]))
        assert manifest.proof_root(forged, path) != root


def test_fields_cannot_run_into_each_other():
    d = manifest.row_digest
    assert d(["ab", "c"]) != d(["a", "bc"]) and d([None, "x"]) != d(["", "x"]) and d([b"\x00"]) != d([None])


def test_empty_tree_has_the_rfc_root():
    assert manifest.merkle_root([]) == hashlib.sha256(b"").digest()


def answers_file(tmp, n: int):
    """The first ``n`` quickstart prompts with their reference answers, as an import file."""
    from helpers import QUICKSTART

    prompts = [json.loads(line) for line in (QUICKSTART / "prompts" / "train.jsonl").open()][:n]
    data = tmp / "answers.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["answer"]}) + "\n" for r in prompts))
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from helpers import QUICKSTART, TEACHER, tiny_overrides
    from potstill.generate import generate
    from potstill.recipe import load_recipe
    from potstill.train import train

    tmp = tmp_path_factory.mktemp("m")
    data = answers_file(tmp, 32)
    recipe = load_recipe(QUICKSTART / "recipe.yaml", [
        *tiny_overrides(tmp / "run"), "prompts=null", "teacher.backend=imported", f"teacher.data={data}",
        f"student.tokenizer={TEACHER}", "train.objective=sft", "baseline=null", "teacher.id=deepseek-ai/DeepSeek-R1",
        "teacher.terms_family=unknown"])
    generate(recipe)
    train(recipe, recipe.train)
    return recipe.run_dir


def _verify(run, capsys, *extra):
    from potstill.cli import main

    rc = main(["verify", str(run), *extra])
    return rc, capsys.readouterr().out


def test_an_untouched_run_verifies_and_records_the_root(trained, capsys):
    rc, out = _verify(trained, capsys)
    assert rc == 0 and "verify: ok: 32 ledger rows" in out, out
    info = json.loads((trained / "student" / "potstill.json").read_text())
    assert info["manifest_rows"] == 32 and len(info["manifest_merkle_root"]) == 64
    card = (trained / "student" / "README.md").read_text()
    assert info["manifest_merkle_root"] in card and info["weights_sha256"] in card
    assert (trained / "student" / "manifest.merkle").stat().st_size == 32 * manifest.ROW_BYTES


def test_one_changed_byte_of_one_ledger_row_is_named(trained, capsys):
    rows = manifest.read(trained / "student")
    victim = rows[5][0]
    db = sqlite3.connect(trained / "ledger.sqlite")
    (text,) = db.execute("SELECT text FROM completions WHERE request_hash=?", (victim,)).fetchone()
    changed = chr(ord(text[0]) ^ 1) + text[1:]
    with db:
        db.execute("UPDATE completions SET text=? WHERE request_hash=?", (changed, victim))
    try:
        rc, out = _verify(trained, capsys)
        assert rc == 1 and f"row 5 (request {victim}) differs" in out, out
    finally:
        with db:
            db.execute("UPDATE completions SET text=? WHERE request_hash=?", (text, victim))
        db.close()
    assert _verify(trained, capsys)[0] == 0


def test_changed_weights_are_named(trained, capsys):
    weights = trained / "student" / "model.safetensors"
    backup = trained / "weights.bak"
    shutil.copyfile(weights, backup)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    try:
        rc, out = _verify(trained, capsys)
        assert rc == 1 and "weights: the sha256 of model.safetensors" in out, out
    finally:
        shutil.copyfile(backup, weights)
    assert _verify(trained, capsys)[0] == 0


def test_a_teacher_share_changed_in_the_card_is_named(trained, capsys):
    card = trained / "student" / "README.md"
    text = card.read_text()
    assert "share_of_examples: 1.0" in text
    card.write_text(text.replace("share_of_examples: 1.0", "share_of_examples: 0.5", 1))
    try:
        rc, out = _verify(trained, capsys)
        assert rc == 1 and "teacher deepseek-ai/DeepSeek-R1 has share_of_examples 0.5, the ledger says 1" in out, out
    finally:
        card.write_text(text)


def test_a_changed_terms_verdict_in_the_card_is_named(trained, capsys):
    card = trained / "student" / "README.md"
    text = card.read_text()
    card.write_text(text.replace("terms_verdict: allowed", "terms_verdict: forbidden", 1))
    try:
        rc, out = _verify(trained, capsys)
        assert rc == 1 and "terms_verdict forbidden, potstill.json records allowed" in out, out
    finally:
        card.write_text(text)


def test_inclusion_proof_of_one_row(trained, capsys):
    rows = manifest.read(trained / "student")
    rc, out = _verify(trained, capsys, "--row", rows[7][0][:12])
    assert rc == 0 and f"row 7 of 32: request {rows[7][0]}" in out and "matches potstill.json" in out
    assert sum(line.split()[0] in ("left", "right") for line in out.splitlines()) == 5  # log2(32) siblings
    from potstill.cli import main

    assert main(["verify", str(trained), "--row", "zz"]) == 2
    for args in (["verify", str(trained.parent)], ["verify", str(trained.parent), "--row", "ab"]):
        assert main(args) == 2  # not a run: one line, no ledger created
    assert not (trained.parent / "ledger.sqlite").exists()


def test_spdx_document_validates_against_the_spdx_3_0_1_schema(trained):
    """tests/fixtures/spdx-3.0.1-json-schema.json: the schema published for SPDX 3.0.1 (generated by
    shacl2code; sha256 582c64e8..., the hash other projects pin for the official file)."""
    import jsonschema

    from helpers import ROOT
    from huggingface_hub import ModelCard

    schema_path = ROOT / "tests" / "fixtures" / "spdx-3.0.1-json-schema.json"
    assert hashlib.sha256(schema_path.read_bytes()).hexdigest().startswith("582c64e809d5b3ef")
    schema = json.loads(schema_path.read_text())
    doc = json.loads((trained / "student" / "model.spdx3.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{e.json_path}: {e.message[:200]}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    graph = {e.get("spdxId", e.get("@id")): e for e in doc["@graph"]}
    rels = {(r["relationshipType"], graph[r["from"]]["type"], graph[r["to"][0]]["type"])
            for r in doc["@graph"] if r["type"] == "Relationship"}
    assert ("trainedOn", "ai_AIPackage", "dataset_DatasetPackage") in rels
    assert ("generates", "ai_AIPackage", "dataset_DatasetPackage") in rels
    assert ("hasConcludedLicense", "ai_AIPackage", "simplelicensing_LicenseExpression") in rels
    assert ("hasConcludedLicense", "dataset_DatasetPackage", "simplelicensing_LicenseExpression") in rels
    info = json.loads((trained / "student" / "potstill.json").read_text())
    hashes = {h["hashValue"] for e in doc["@graph"] for h in e.get("verifiedUsing", [])}
    assert {info["weights_sha256"], info["manifest_merkle_root"], info["ledger_sha256"]} <= hashes
    # a document the schema must refuse: the validation is not vacuous
    broken = json.loads(json.dumps(doc))
    next(e for e in broken["@graph"] if e["type"] == "Relationship")["relationshipType"] = "distilledFrom"
    assert list(validator.iter_errors(broken))
    ModelCard.load(trained / "student" / "README.md")  # the card still parses


def test_spdx_document_reads_and_writes_through_the_spdx_projects_own_bindings(trained):
    """spdx-python-model (generated by the SPDX project from its 3.0.1 SHACL model): every object
    reads with its property types and enumerations checked, every reference resolves, and writing
    it back checks each class's required properties and counts. A broken document is refused."""
    import io

    from spdx_python_model import v3_0_1 as spdx

    def roundtrip(text: str) -> set:
        objects = spdx.SHACLObjectSet()
        spdx.JSONLDDeserializer().read(io.StringIO(text), objects)
        unresolved = objects.link()
        spdx.JSONLDSerializer().write(objects, io.BytesIO())
        return unresolved

    text = (trained / "student" / "model.spdx3.json").read_text()
    assert roundtrip(text) == set()
    doc = json.loads(text)
    package = next(e for e in doc["@graph"] if e["type"] == "ai_AIPackage")
    package["software_primaryPurpose"] = "weights"  # not a SoftwarePurpose
    with pytest.raises(ValueError, match="not a valid value"):
        roundtrip(json.dumps(doc))
    del package["software_primaryPurpose"], package["creationInfo"]  # required of every Element
    with pytest.raises(ValueError, match="creationInfo.*is required"):
        roundtrip(json.dumps(doc))


@contextlib.contextmanager
def changed(path, new: bytes | None):
    """Inside the block ``path`` holds ``new`` (None: it is deleted); after it, its own bytes again."""
    old = path.read_bytes() if path.exists() else None
    if new is None:
        path.unlink()
    else:
        path.write_bytes(new)
    try:
        yield
    finally:
        if old is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(old)


# (what the card says, what an editor made it say, what verify must name): every field train writes
CARD_EDITS = [
    ("license: apache-2.0", "license: mit", "card: license is"),
    ("    terms_family: deepseek-mit", "    terms_family: own", "card: distillation.teachers[0].terms_family is"),
    ("    licence: MIT", "    licence: Apache-2.0", "card: distillation.teachers[0].licence is"),
    ("    terms_url: https://github.com/deepseek-ai/DeepSeek-R1/blob/main/LICENSE", "    terms_url: https://x.org/ok",
     "card: distillation.teachers[0].terms_url is"),
    ("    weights_sha256: null", "    weights_sha256: " + "ab" * 32,
     "card: distillation.teachers[0].weights_sha256 is"),
    ("    access: 'imported completions: answers.jsonl'", "    access: local weights",
     "card: distillation.teachers[0].access is"),
    ("  ledger_sha256: ", "  ledger_sha256: 00", "card: distillation.ledger_sha256 is"),
    ("  examples: 32", "  examples: 64", "card: distillation.examples is"),
    ("  method: sequence-level KD", "  method: logit KD, sequence-level KD", "card: distillation.method is"),
    ("- **deepseek-ai/DeepSeek-R1**", "- **Qwen/Qwen3-8B**", 'train wrote "- **deepseek-ai/DeepSeek-R1**'),
    ("Intended use: **commercial**", "Intended use: **research**", 'train wrote "Intended use: **commercial**'),
]


@pytest.mark.parametrize("old,new,named", CARD_EDITS, ids=["license", "terms_family", "licence", "terms_url",
                                                          "weights_sha256", "access", "ledger_sha256", "examples",
                                                          "method", "prose-teacher", "prose-use"])
def test_every_card_field_and_line_train_wrote_is_bound(trained, capsys, old, new, named):
    card = trained / "student" / "README.md"
    text = card.read_text()
    assert old in text
    with changed(card, text.replace(old, new, 1).encode()):
        rc, out = _verify(trained, capsys)
    assert rc == 1 and named in out and "README.md is the card train wrote" not in out, out
    assert _verify(trained, capsys)[0] == 0


SPDX_EDITS = [("licence", '"simplelicensing_licenseExpression": "Apache-2.0"',
               '"simplelicensing_licenseExpression": "MIT"'),
              ("relationship", '"relationshipType": "trainedOn"', '"relationshipType": "testedOn"')]


@pytest.mark.parametrize("what,old,new", SPDX_EDITS, ids=[e[0] for e in SPDX_EDITS])
def test_an_edited_spdx_document_is_named(trained, capsys, what, old, new):
    spdx = trained / "student" / "model.spdx3.json"
    text = spdx.read_text()
    assert old in text
    with changed(spdx, text.replace(old, new, 1).encode()):
        rc, out = _verify(trained, capsys)
    assert rc == 1 and "files: model.spdx3.json differs from the file potstill wrote" in out, out


@pytest.mark.parametrize("name", ["model.spdx3.json", "TERMS.md", "config.json", "tokenizer.json", "README.md"])
def test_a_deleted_file_is_named(trained, capsys, name):
    with changed(trained / "student" / name, None):
        rc, out = _verify(trained, capsys)
    assert rc == 1 and (f"files: {name} is missing" in out or f"card: {name} is missing" in out), out
    assert "Traceback" not in out


def test_a_file_potstill_did_not_write_is_named(trained, capsys):
    with changed(trained / "student" / "pytorch_model.bin", b"pickled weights"):
        rc, out = _verify(trained, capsys)
    assert rc == 1 and "files: pytorch_model.bin was not written by potstill" in out, out


def test_every_ok_line_names_what_it_covered(trained, capsys):
    rc, out = _verify(trained, capsys)
    info = json.loads((trained / "student" / "potstill.json").read_text())
    oks = [line for line in out.splitlines() if line.startswith("verify: ok: ")]
    assert rc == 0 and len(oks) == 5, out
    files = sorted(info["files_sha256"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "model.spdx3.json", "TERMS.md",
            "manifest.merkle"} <= set(files) and not {"README.md", "potstill.json"} & set(files)
    assert f"files: the {len(files)} files potstill wrote beside the card are present and unchanged" in out
    assert "card: README.md is the card train wrote, every field and line" in out and "no evaluation section" in out


EVAL = {"prompts": {"n": 48}, "models": {"student": {"accuracy": 0.5, "agreement": 0.25, "kl_per_token": 0.125,
                                                     "parameters": 1000}, "teacher": {"accuracy": 0.75}}}


def test_the_evaluation_section_eval_adds_verifies_and_an_edit_to_it_is_named(trained, capsys):
    """eval writes eval.json and appends its section to the card (``add_results``, as
    ``potstill.evaluate`` does): the card still verifies; an edited number in that section does not."""
    from potstill.receipts.card import add_results

    card = trained / "student" / "README.md"
    with changed(card, card.read_bytes()), changed(trained / "eval.json", json.dumps(EVAL).encode()):
        add_results(trained / "student", EVAL)
        rc, out = _verify(trained, capsys)
        assert rc == 0 and f"its evaluation section is the one {trained / 'eval.json'} gives" in out, out
        text = card.read_text()
        assert "| accuracy | 0.500 | 0.750 |" in text
        card.write_text(text.replace("| accuracy | 0.500 |", "| accuracy | 0.900 |"))
        rc, out = _verify(trained, capsys)
        assert rc == 1 and "card: the evaluation section of README.md is not the one" in out, out
        assert "| accuracy | 0.900 | 0.750 |" in out
    assert _verify(trained, capsys)[0] == 0


def test_an_edited_ledger_row_fails_its_inclusion_proof(trained, capsys):
    rows = manifest.read(trained / "student")
    victim = rows[5][0]
    db = sqlite3.connect(trained / "ledger.sqlite")
    (text,) = db.execute("SELECT text FROM completions WHERE request_hash=?", (victim,)).fetchone()
    with db:
        db.execute("UPDATE completions SET text=? WHERE request_hash=?", ("an answer never given", victim))
    try:
        rc, out = _verify(trained, capsys, "--row", victim[:12])
        assert rc == 1 and f"verify: FAILED: ledger: row 5 (request {victim}) differs from the row" in out, out
    finally:
        with db:
            db.execute("UPDATE completions SET text=? WHERE request_hash=?", (text, victim))
        db.close()
    rc, out = _verify(trained, capsys, "--row", victim[:12])
    assert rc == 0 and f"verify: ok: row 5's leaf is recomputed from {trained / 'ledger.sqlite'}" in out, out


def test_an_inclusion_proof_without_the_ledger_fails_naming_the_row(trained, capsys):
    rows = manifest.read(trained / "student")
    ledger = trained / "ledger.sqlite"
    moved = trained / "ledger.moved"
    ledger.rename(moved)
    try:
        rc, out = _verify(trained, capsys, "--row", rows[3][0][:12])
        assert rc == 1 and f"verify: FAILED: ledger: row 3 (request {rows[3][0]}) cannot be recomputed: " \
                           f"{ledger} not found" in out, out
        assert not ledger.exists()  # verify made no empty ledger
    finally:
        moved.rename(ledger)


HOSTILE = "evil</td><script>alert(1)</script>\n# Injected heading <img src=x onerror=alert(1)> *em* [a](javascript:x)"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A run trained through the CLI whose teacher id, declaration and accepted-risk reason are markup."""
    from helpers import QUICKSTART, TEACHER, tiny_overrides
    from potstill.cli import main

    tmp = tmp_path_factory.mktemp("h")
    data = answers_file(tmp, 16)
    overrides = [*tiny_overrides(tmp / "run"), "prompts=null", "teacher.backend=imported", f"teacher.data={data}",
                 f"student.tokenizer={TEACHER}", "train.objective=sft", "baseline=null", "use=competing",
                 f"teacher.id={json.dumps('id ' + HOSTILE)}", "teacher.terms_family=openai-api",
                 f"teacher.terms_declared={json.dumps('declared ' + HOSTILE)}"]
    recipe = str(QUICKSTART / "recipe.yaml")
    assert main(["generate", recipe, *overrides]) == 0
    assert main(["train", recipe, *overrides, "--accept-terms-risk", "reason " + HOSTILE]) == 0
    return tmp / "run"


def test_terms_md_writes_every_id_reason_and_declaration_as_text(hostile, capsys):
    from markdown_it import MarkdownIt

    text = (hostile / "student" / "TERMS.md").read_text()
    tokens = MarkdownIt("commonmark").parse(text)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings[0].startswith("Terms that bind this model") and "Trained past the terms gate" in headings
    assert not any("Injected" in h for h in headings), headings
    html = MarkdownIt("commonmark").render(text)
    assert "<script" not in html and "<img" not in html and "<em>" not in html and "javascript:x\"" not in html, html
    for what in ("id", "reason", "declared"):  # each written out, as text
        assert f"{what} evil&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt; # Injected heading" in html, what
    rc, out = _verify(hostile, capsys)
    assert rc == 0, out


def test_a_leaf_covers_an_endpoints_token_bytes_and_keeps_old_rows_leaves(tmp_path):
    """A row kept as bytes (an API teacher's) has its token bytes, top-k bytes and chosen logprobs in
    its leaf: changing one changes the leaf; a row without them hashes exactly as before."""
    import sqlite3

    import numpy as np
    from helpers import plan

    from potstill.ledger import Ledger
    from potstill.prompts import Prompt
    from potstill.receipts.manifest import leaf_hash, ledger_leaves, row_digest
    from potstill.records import Completion, TokenBytes

    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        key = ledger.register_teacher({"id": "api", "backend": "openai"})
        prompts = [Prompt((("user", f"q{i}"),), source=f"p:{i}") for i in range(2)]
        params = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_logprobs": 2, "seed": 0}
        todo = plan(ledger, key, prompts, params)
        session = ledger.start_session(None)
        ledger.record(session, [
            Completion(todo[0].request_hash, "hi", None, None, np.log(np.array([[0.6, 0.3]], np.float32)), "stop",
                       3, 0, 0.1, token_bytes=[b"hi"], topk_bytes=[[b"hi", b"ho"]],
                       token_logprobs=np.log(np.array([0.6], np.float32))),
            Completion(todo[1].request_hash, "yo", [5], None, None, "stop", 3, 0, 0.1)])
        hashes = sorted(r.request_hash for r in todo)
        before = dict(ledger_leaves(ledger, hashes, {}))
        old_formula = {row[0]: leaf_hash(row_digest([*row[:11], json.dumps(ledger.teachers()[key], sort_keys=True,
                                                                                separators=(",", ":")), None]))
                       for row in ledger.manifest_rows(hashes)}
    plain = todo[1].request_hash
    assert before[plain] == old_formula[plain]  # a row without bytes: the leaf it always had
    assert before[todo[0].request_hash] != old_formula[todo[0].request_hash]
    with sqlite3.connect(path) as db:
        db.execute("UPDATE completions SET topk_bytes=? WHERE request_hash=?",
                   (TokenBytes.pack([b"hi", b"ha"]), todo[0].request_hash))
    with Ledger(path) as ledger:
        after = dict(ledger_leaves(ledger, hashes, {}))
    assert after[plain] == before[plain] and after[todo[0].request_hash] != before[todo[0].request_hash]

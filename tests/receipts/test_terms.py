"""The terms registry and gate: the policy as a table a reviewer can read, matching of teachers to
families, the gate's refusal and its override, obligations merged across teachers."""

import json
from pathlib import Path

import pytest

from potstill.errors import PotstillError
from potstill.receipts.terms import check, gate, merge_obligations, prefixed_name, registry
from potstill.receipts.terms.gate import USES, VERDICTS

A, O, R, F, U = "allowed", "obligations", "review", "forbidden", "unknown"

# THE POLICY. family: (research, internal, commercial, competing). Written out by hand from
# ../shared/research/provenance.md (b); registry.yaml must say exactly this.
POLICY = {
    "openai-api":      (R, R, R, F),  # no models that compete with OpenAI's products and services
    "openai-consumer": (R, R, R, F),  # no competing models; no programmatic extraction
    "anthropic":       (R, R, R, F),  # no competing products, including training competing AI models
    "gemini-api":      (R, R, R, F),  # no models that compete with the Services
    "gemma-4":         (A, A, A, A),  # Apache-2.0
    "gemma":           (O, O, O, O),  # Gemma 1-3: a Model Derivative; use restrictions flow down
    "llama-2":         (F, F, F, F),  # outputs may not improve any other LLM
    "llama-3.1":       (O, O, O, O),  # "Llama" prefix, "Built with Llama", licence + Notice, 700M MAU
    "llama-3.2":       (O, O, O, O),  # the same clause; each version its own licence, notice and AUP
    "llama-3.3":       (O, O, O, O),
    "llama-4":         (O, O, O, O),
    "qwen-license":    (O, O, O, O),  # "Built with Qwen", 100M MAU
    "qwen-research":   (O, R, F, F),  # non-commercial research only
    "qwen-apache":     (A, A, A, A),
    "mistral-mrl":     (O, R, F, F),  # research / non-production only
    "mistral-api":     (R, R, R, F),  # no reverse engineering, including through outputs
    "mistral-apache":  (A, A, A, A),
    "deepseek-mit":    (A, A, A, A),  # MIT, distillation named as allowed
    "deepseek-v3":     (O, O, O, O),  # a Derivative; Attachment A flows down
    "apache-2.0":      (A, A, A, A),
    "mit":             (A, A, A, A),
    "own":             (A, A, A, A),
    "unknown":         (U, U, U, U),
}


@pytest.mark.parametrize("key", sorted(POLICY))
def test_registry_says_the_policy(key):
    assert tuple(registry()[key].uses[u] for u in USES) == POLICY[key]


def test_registry_has_exactly_the_policy_families_and_sources():
    assert set(registry()) == set(POLICY)
    for f in registry().values():
        assert set(f.uses) == set(USES) and set(f.uses.values()) <= set(VERDICTS)
        assert f.key in ("own", "unknown") or f.url.startswith("https://"), f.key
        assert f.verified is False and f.text_sha256 is None  # no primary text could be read: said so


@pytest.mark.parametrize("key", sorted(POLICY))
@pytest.mark.parametrize("use", USES)
def test_no_forbidden_or_unknown_pair_passes_the_gate(key, use):
    """Every pair the policy does not allow stops the gate; no declaration unlocks a forbidden one."""
    desc = {"id": "t", "backend": "imported", "terms_family": key}
    (t,) = check([(desc, 3)], use)
    assert t.verdict == POLICY[key][USES.index(use)]
    if t.verdict in (A, O):
        assert gate([t]) == []
        return
    with pytest.raises(PotstillError, match="not legal advice"):
        gate([t])
    (declared,) = check([(desc, 3)], use, declared="our lawyers read it")
    if t.verdict == F:
        with pytest.raises(PotstillError, match="forbid"):
            gate([declared])
    else:
        assert gate([declared]) == []


def _folder(tmp_path: Path, name: str, license_fields: dict | None) -> str:
    d = tmp_path / name
    d.mkdir()
    if license_fields is not None:
        front = "".join(f"{k}: {v}\n" for k, v in license_fields.items())
        (d / "README.md").write_text(f"---\n{front}library_name: transformers\n---\n\n# a model\n")
    return str(d)


def test_matching_by_host_model_id_folder_licence_and_explicit_key(tmp_path):
    cases = [
        ({"id": "gpt-4o-mini", "backend": "openai", "endpoint": "https://api.openai.com/v1", "model": "gpt-4o-mini"},
         "openai-api", "endpoint host api.openai.com"),
        ({"id": "teacher", "backend": "openai", "endpoint": "http://localhost:8000/v1",
          "model": "meta-llama/Llama-3.3-70B-Instruct"}, "llama-3.3", "served model meta-llama/Llama-3.3-70B-Instruct"),
        ({"id": "claude-sonnet-4", "backend": "imported"}, "anthropic", "teacher id claude-sonnet-4"),
        ({"id": "big", "backend": "local", "path": _folder(tmp_path, "big", {"license": "llama3.3"})},
         "llama-3.3", "folder licence llama3.3"),
        ({"id": "g", "backend": "local", "path": _folder(tmp_path, "gemma-2-2b-it", {"license": "gemma"})},
         "gemma", "folder licence gemma"),
        # MIT twice (the README's licence, the folder's name): equal verdicts, the earlier evidence is named
        ({"id": "r", "backend": "local", "path": _folder(tmp_path, "DeepSeek-R1-Distill", {"license": "mit"})},
         "mit", "folder licence mit"),
        ({"id": "q", "backend": "local", "path": _folder(tmp_path, "q", {"license": "other", "license_name": "qwen"})},
         "qwen-license", "folder licence qwen"),
        ({"id": "mystery", "backend": "local", "path": _folder(tmp_path, "mystery", None)}, "unknown",
         "no registry entry matched"),
        ({"id": "x", "backend": "local", "path": _folder(tmp_path, "x", {"license": "cc-by-nc-4.0"})}, "unknown",
         "no registry entry matched"),
        # the recipe's key or alias, with no evidence against it; one the registry does not know is unknown
        ({"id": "t", "backend": "imported", "terms_family": "openai-terms"}, "openai-api",
         "teacher.terms_family openai-terms"),
        ({"id": "t", "backend": "imported", "terms_family": "cc-by-4.0"}, "unknown",
         "teacher.terms_family cc-by-4.0 is not in the registry"),
        # open weights with a name like an API's are not that API's
        ({"id": "openai/gpt-oss-20b", "backend": "imported"}, "unknown", "no registry entry matched"),
        ({"id": "Qwen/Qwen2.5-32B-Instruct", "backend": "imported"}, "qwen-apache", "teacher id Qwen/Qwen2.5-32B-Instruct"),
        ({"id": "Qwen/Qwen2.5-3B-Instruct", "backend": "imported"}, "qwen-research", "teacher id Qwen/Qwen2.5-3B-Instruct"),
        ({"id": "deepseek-ai/DeepSeek-V3", "backend": "imported"}, "deepseek-v3", "teacher id deepseek-ai/DeepSeek-V3"),
        ({"id": "meta-llama/Llama-3.2-1B", "backend": "imported"}, "llama-3.2", "teacher id meta-llama/Llama-3.2-1B"),
        ({"id": "meta-llama/Llama-2-7b-hf", "backend": "imported"}, "llama-2", "teacher id meta-llama/Llama-2-7b-hf"),
        ({"id": "google/gemma-4-e4b", "backend": "imported"}, "gemma-4", "teacher id google/gemma-4-e4b"),
    ]
    for desc, key, how in cases:
        (t,) = check([(desc, 1)], "research")
        assert (t.family, t.matched_by, t.contradiction) == (key, how, None), desc


def test_competing_with_openai_rows_refuses_naming_teacher_rows_clause_and_url():
    desc = {"id": "openai", "backend": "openai", "endpoint": "https://api.openai.com/v1", "model": "gpt-4o"}
    terms = check([(desc, 1234)], "competing")
    with pytest.raises(PotstillError) as e:
        gate(terms)
    msg = str(e.value)
    assert "'openai'" in msg and "1,234 rows" in msg and "compete with our products" in msg
    assert "https://openai.com/policies/services-agreement/" in msg and "--accept-terms-risk" in msg
    assert "\n" not in msg
    assert gate(terms, accept_risk="counsel approved, ticket 42") == [msg.split("terms: ", 1)[1].split(". To go")[0]]


def test_llama_forces_the_prefix_gemma_lists_flow_down_and_two_prefixes_conflict():
    llama = check([({"id": "l", "terms_family": "llama-3.3"}, 5)], "commercial")
    ob = merge_obligations(llama)
    assert ob["name_prefix"] == "Llama" and ob["attribution"] == ["Built with Llama"]
    assert "NOTICE" in ob["files"] and "LICENSE" in ob["files"] and not ob["conflicts"]
    assert prefixed_name("tiny-student", ob["name_prefix"]) == "Llama-tiny-student"
    assert prefixed_name("llama-tiny", "Llama") == "llama-tiny"
    gemma = check([({"id": "g", "terms_family": "gemma"}, 5)], "research")
    assert any("Prohibited Use Policy" in r for r in merge_obligations(gemma)["flow_down"])
    both = merge_obligations(llama + check([({"id": "l4", "terms_family": "llama-4"}, 5)], "commercial"))
    assert both["name_prefix"] == "Llama" and not both["conflicts"]  # the same prefix twice is one
    # two different required prefixes cannot both begin a name: a family that required another one
    other = check([({"id": "g", "terms_family": "gemma"}, 5)], "research")[0]
    registry()["gemma"].obligations["name_prefix"] = "Gemma"
    try:
        ob = merge_obligations(llama + [other])
    finally:
        del registry()["gemma"].obligations["name_prefix"]
    assert ob["name_prefix"] is None and "'Llama' (l)" in ob["conflicts"][0] and "'Gemma' (g)" in ob["conflicts"][0]


def test_unknown_use_is_one_line():
    with pytest.raises(PotstillError, match="use 'resale': give one of research, internal, commercial, competing"):
        check([({"id": "t"}, 1)], "resale")


def test_registry_is_package_data():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"potstill.receipts.terms" = ["registry.yaml"]' in text
    json.dumps([f.__dict__ for f in registry().values()])  # plain data: it goes into potstill.json


# -- the gate in train, and the obligations in the export -------------------------------------------

def _imported_run(tmp_path: Path, rows: int = 32, *overrides: str):
    """A recipe whose teacher is a file of answers (generate imports it): no model runs to make rows."""
    from helpers import QUICKSTART, TEACHER, tiny_overrides
    from potstill.generate import generate
    from potstill.recipe import load_recipe

    prompts = [json.loads(line) for line in (QUICKSTART / "prompts" / "train.jsonl").open()][:rows]
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["answer"]}) + "\n" for r in prompts))
    args = [*tiny_overrides(tmp_path / "run"), "prompts=null", "teacher.backend=imported", f"teacher.data={data}",
            f"student.tokenizer={TEACHER}", "train.objective=sft", "baseline=null", *overrides]
    recipe = load_recipe(QUICKSTART / "recipe.yaml", args)
    generate(recipe)
    return recipe, args


def test_train_refuses_competing_on_openai_rows_and_the_override_is_kept(tmp_path, capsys):
    from helpers import QUICKSTART
    from potstill.cli import main
    from potstill.ledger import Ledger

    recipe, args = _imported_run(tmp_path, 32, "teacher.id=openai", "teacher.terms_family=openai-api", "use=competing")
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert "teacher 'openai' (32 rows)" in err and "compete with our products" in err and "not legal advice" in err
    assert "https://openai.com/policies/services-agreement/" in err and err.count("\n") == 1
    assert not (recipe.run_dir / "student").exists()

    reason = "internal benchmark only; counsel approved (ticket 7)"
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args, "--accept-terms-risk", reason]) == 0
    assert "trained past the gate" in capsys.readouterr().out
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        (kept,) = ledger.terms_overrides()
    assert kept["reason"] == reason and kept["use"] == "competing" and "'openai' (32 rows)" in kept["problems"][0]
    from huggingface_hub import ModelCard

    card = ModelCard.load(recipe.run_dir / "student" / "README.md")
    block = card.data.to_dict()["distillation"]
    assert block["terms"]["accepted_risk"] == reason and block["teachers"][0]["terms_verdict"] == "forbidden"
    assert reason in card.text and "not legal advice" in card.text
    assert reason in (recipe.run_dir / "student" / "TERMS.md").read_text()


def test_unknown_terms_need_a_declaration(tmp_path, capsys):
    from helpers import QUICKSTART
    from potstill.cli import main

    recipe, args = _imported_run(tmp_path, 16, "teacher.id=someone", "teacher.terms_family=unknown")
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 2
    assert "does not know its terms" in capsys.readouterr().err
    declared = "we wrote these answers ourselves"
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args, f"teacher.terms_declared={declared}"]) == 0
    info = json.loads((recipe.run_dir / "student" / "potstill.json").read_text())
    assert info["terms"]["teachers"][0]["declared"] == declared and info["terms"]["accepted_risk"] is None
    assert declared in (recipe.run_dir / "student" / "README.md").read_text()


def test_llama_teacher_forces_prefix_notice_and_licence_copy(tmp_path):
    """A Llama 3.3 folder (recognised by its README licence field) as the teacher: the exported
    student is named Llama-..., carries "Built with Llama", the folder's LICENSE and a NOTICE."""
    import shutil

    from helpers import TEACHER
    from huggingface_hub import ModelCard

    llama = tmp_path / "big-teacher"
    shutil.copytree(TEACHER, llama)
    text = (llama / "README.md").read_text().replace("license: apache-2.0", "license: llama3.3")
    (llama / "README.md").write_text(text)
    (llama / "LICENSE").write_text("LLAMA 3.3 COMMUNITY LICENSE AGREEMENT (test copy)\n")
    from helpers import QUICKSTART, tiny_overrides
    from potstill.generate import generate
    from potstill.recipe import load_recipe
    from potstill.train import train

    recipe = load_recipe(QUICKSTART / "recipe.yaml", [
        *tiny_overrides(tmp_path / "run", n_prompts=16), f"teacher.path={llama}", "teacher.id=big-teacher",
        "teacher.terms_family=unknown", "use=commercial", "train.objective=sft", "baseline=null"])
    generate(recipe)

    student = train(recipe, recipe.train)
    info = json.loads((student / "potstill.json").read_text())
    assert info["terms"]["teachers"][0]["family"] == "llama-3.3"
    assert info["terms"]["teachers"][0]["matched_by"] == "folder licence llama3.3"
    assert info["model_name"] == "Llama-student"
    card = ModelCard.load(student / "README.md")
    assert card.text.startswith("\n# Llama-student") or "# Llama-student" in card.text
    assert "Built with Llama" in card.text and "700 million" in card.text
    assert (student / "LICENSE").read_text().startswith("LLAMA 3.3")
    assert "Llama 3.3 is licensed under the Llama 3.3 Community License" in (student / "NOTICE").read_text()
    assert {"LICENSE", "NOTICE", "TERMS.md"} <= set(info["files"])
    assert "USE_POLICY.md" not in info["files"]  # not in the teacher's folder, so not invented


def test_a_ledger_from_before_the_gate_gets_the_override_table(tmp_path):
    from potstill.ledger import Ledger

    with Ledger(tmp_path / "old.sqlite") as ledger:
        ledger.db.execute("DROP TABLE terms_overrides")  # as a ledger written by an older potstill
    with Ledger(tmp_path / "old.sqlite") as ledger:
        ledger.record_terms_override("student", "commercial", "reason", ["problem"])
        assert ledger.terms_overrides()[0]["problems"] == ["problem"]


def test_terms_list_and_check(tmp_path, capsys):
    from potstill.cli import main

    assert main(["terms", "list"]) == 0
    out = capsys.readouterr().out
    assert "openai-api" in out and "llama-3" in out and "not legal advice" in out
    recipe, _ = _imported_run(tmp_path, 8, "teacher.id=gpt-4o-mini", "teacher.terms_family=unknown")
    assert main(["terms", "check", str(recipe.run_dir), "--use", "competing"]) == 1
    out = capsys.readouterr().out
    assert "gpt-4o-mini" in out and "openai-api" in out and "forbidden" in out
    assert main(["terms", "check", str(tmp_path / "nowhere")]) == 2


def test_report_has_a_terms_section(tmp_path):
    from helpers import make_run, parse

    from potstill.report import write_report

    run = make_run(tmp_path / "run", "add")
    info = json.loads((run / "student" / "potstill.json").read_text())
    reason = "<b>counsel</b> approved"
    info["terms"] = {"use": "competing", "accepted_risk": reason, "overridden": ["x"], "declared": None,
                     "teachers": [{"teacher": "openai", "rows": 12, "family": "openai-api", "verdict": "forbidden",
                                   "matched_by": "endpoint host api.openai.com", "declared": None}]}
    info["manifest_merkle_root"] = "ab" * 32
    (run / "student" / "potstill.json").write_text(json.dumps(info))
    page = write_report(run).read_text()
    text = " ".join(parse(page).text)
    assert "Terms" in text and "not legal" in text and "openai-api" in text and "forbidden" in text
    assert reason in text and "<b>counsel" not in page and "ab" * 32 in text


@pytest.mark.slow
def test_run_checks_the_terms_again_when_the_use_changes(tmp_path, capsys):
    """A student trained for research is not "up to date" for use=competing: the gate runs again."""
    from helpers import QUICKSTART
    from potstill.cli import main

    recipe, args = _imported_run(tmp_path, 16, "teacher.id=openai", "teacher.terms_family=openai-api",
                                 "teacher.terms_declared=a research probe that competes with nothing", "eval.limit=8",
                                 "eval.verifier=exact")
    assert main(["run", str(QUICKSTART / "recipe.yaml"), *args, "use=research"]) == 0
    capsys.readouterr()
    assert main(["run", str(QUICKSTART / "recipe.yaml"), *args, "use=competing"]) == 2
    assert "forbid training a model for use 'competing'" in capsys.readouterr().err


# -- issue 21: the gate weighs all the evidence; no label talks past it --------------------------

def _openai_desc(tmp_path: Path, *overrides: str) -> dict:
    """The description the HTTP backend records for a recipe's teacher (no request is sent)."""
    from helpers import QUICKSTART
    from potstill.recipe import load_recipe
    from potstill.teachers.openai.wire import describe_openai

    recipe = load_recipe(QUICKSTART / "recipe.yaml", [
        f"output_dir={tmp_path / 'run'}", "teacher.backend=openai", "teacher.path=null", "teacher.id=null",
        "teacher.endpoints=[https://api.openai.com/v1]", "teacher.model=gpt-4o", *overrides])
    return describe_openai(recipe.teacher, None, recipe.teacher_id())


def _teacher_folder(tmp_path: Path, name: str, licence: str, licence_file: str | None = None) -> Path:
    """The bundled tiny teacher's files under another licence: a real model folder, its README's
    licence field (and LICENSE file) changed."""
    import shutil

    from helpers import TEACHER

    folder = tmp_path / name
    shutil.copytree(TEACHER, folder)
    text = (folder / "README.md").read_text().replace("license: apache-2.0", f"license: {licence}")
    (folder / "README.md").write_text(text)
    if licence_file:
        (folder / "LICENSE").write_text(licence_file)
    return folder


def _local_desc(folder: Path, teacher_id: str, terms_family: str = "unknown") -> dict:
    """The description the local backend records for ``folder`` (its weights hashed, not loaded)."""
    from potstill.hf import describe_local, load_tokenizer_dir

    return describe_local(folder, load_tokenizer_dir(folder), id=teacher_id, revision=None,
                          terms_family=terms_family, dtype="float32")


@pytest.mark.parametrize("declared", ["apache-2.0", "own"])
def test_a_declared_family_does_not_outrank_the_endpoint_and_model(tmp_path, declared):
    """Item 1: api.openai.com serving gpt-4o, declared apache-2.0 (or own), use competing."""
    desc = _openai_desc(tmp_path, f"teacher.terms_family={declared}", "use=competing")
    (t,) = check([(desc, 40)], "competing")
    assert (t.family, t.verdict, t.matched_by) == ("openai-api", F, "endpoint host api.openai.com")
    assert t.contradiction == (f"teacher.terms_family {declared} contradicts endpoint host api.openai.com, which "
                               f"names openai-api (forbidden for use 'competing')")
    shown = [str(e) for e in t.evidence]
    assert shown == ["endpoint host api.openai.com: openai-api", "served model gpt-4o: openai-api",
                     "teacher id gpt-4o: openai-api", f"teacher.terms_family {declared}: {declared}"]
    with pytest.raises(PotstillError) as e:
        gate([t], accept_risk=None)
    assert "contradicts endpoint host api.openai.com" in str(e.value) and "forbid" in str(e.value)
    assert "\n" not in str(e.value)
    # a declaration that is not for a forbidden use still stops: the evidence contradicts it
    (research,) = check([(desc, 40)], "research", declared="a research probe")
    assert research.verdict == R and research.contradiction and not research.passes
    with pytest.raises(PotstillError, match="contradicts"):
        gate([research])


def test_train_past_a_contradiction_records_it_in_ledger_card_and_spdx(tmp_path, capsys):
    """Item 1, end to end: gpt-4o's answers declared apache-2.0 for use competing stop train; past
    the gate, the ledger, potstill.json, card, TERMS.md and SPDX keep OpenAI's terms and the
    contradiction, not Apache-2.0."""
    from helpers import QUICKSTART
    from huggingface_hub import ModelCard

    from potstill.cli import main
    from potstill.ledger import Ledger

    recipe, args = _imported_run(tmp_path, 16, "teacher.id=gpt-4o", "teacher.terms_family=apache-2.0", "use=competing")
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert "teacher.terms_family apache-2.0 contradicts teacher id gpt-4o, which names openai-api" in err
    assert "forbid training a model for use 'competing'" in err and err.count("\n") == 1
    assert not (recipe.run_dir / "student").exists()

    reason = "counsel read the contract (ticket 9)"
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args, "--accept-terms-risk", reason]) == 0
    student = recipe.run_dir / "student"
    with Ledger(recipe.run_dir / "ledger.sqlite") as ledger:
        (kept,) = ledger.terms_overrides()
    assert kept["reason"] == reason and any("contradicts teacher id gpt-4o" in p for p in kept["problems"])
    (record,) = json.loads((student / "potstill.json").read_text())["terms"]["teachers"]
    assert (record["family"], record["verdict"], record["licence"]) == ("openai-api", F,
                                                                       "LicenseRef-OpenAI-Services-Agreement")
    assert record["contradiction"].startswith("teacher.terms_family apache-2.0 contradicts")
    assert record["evidence"] == ["teacher id gpt-4o: openai-api", "teacher.terms_family apache-2.0: apache-2.0"]
    (card_teacher,) = ModelCard.load(student / "README.md").data.to_dict()["distillation"]["teachers"]
    assert card_teacher["terms_registry"] == "openai-api" and card_teacher["terms_contradiction"] == record["contradiction"]
    assert "contradict" in (student / "TERMS.md").read_text()
    graph = json.loads((student / "model.spdx3.json").read_text())["@graph"]
    ids = {e["spdxId"]: e for e in graph if "spdxId" in e}
    dataset = next(e["spdxId"] for e in graph if e["type"] == "dataset_DatasetPackage")
    concluded = [ids[r["to"][0]]["simplelicensing_licenseExpression"] for r in graph
                 if r["type"] == "Relationship" and r["relationshipType"] == "hasConcludedLicense" and r["from"] == dataset]
    assert concluded == ["LicenseRef-OpenAI-Services-Agreement"]
    (teacher,) = [e for e in graph if e["type"] == "ai_AIPackage" and e["name"] == "gpt-4o"]
    assert "openai-api" in teacher["comment"] and "contradict" in teacher["comment"]


@pytest.mark.slow
def test_a_llama_folder_declared_apache_is_refused_and_keeps_llamas_obligations(tmp_path, capsys):
    """Item 1: a folder whose README says llama3.1, declared apache-2.0."""
    from helpers import QUICKSTART, tiny_overrides
    from potstill.cli import main
    from potstill.generate import generate
    from potstill.recipe import load_recipe

    llama = _teacher_folder(tmp_path, "helper", "llama3.1", "LLAMA 3.1 COMMUNITY LICENSE AGREEMENT (test copy)\n")
    args = [*tiny_overrides(tmp_path / "run", n_prompts=16), f"teacher.path={llama}", "teacher.id=helper",
            "teacher.terms_family=apache-2.0", "use=commercial", "train.objective=sft", "baseline=null"]
    recipe = load_recipe(QUICKSTART / "recipe.yaml", args)
    generate(recipe)
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert "teacher.terms_family apache-2.0 contradicts folder licence llama3.1, which names llama-3.1" in err
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args, "--accept-terms-risk", "test"]) == 0
    info = json.loads((recipe.run_dir / "student" / "potstill.json").read_text())
    assert info["model_name"] == "Llama-student" and info["terms"]["teachers"][0]["family"] == "llama-3.1"
    assert "Built with Llama" in info["terms"]["obligations"]["attribution"]
    assert "folder licence file LICENSE: llama-3.1" in info["terms"]["teachers"][0]["evidence"]


def test_an_unknown_declared_family_does_not_hide_what_matched(tmp_path, capsys):
    """Item 2: terms_family "openai api" (no family) and a declaration, gpt-4o, use competing."""
    desc = _openai_desc(tmp_path, "teacher.terms_family=openai api", "use=competing")
    (t,) = check([(desc, 40)], "competing", declared="we are allowed")
    assert (t.family, t.verdict) == ("openai-api", F)
    assert t.contradiction == ("teacher.terms_family 'openai api' is not a family potstill knows, and endpoint host "
                               "api.openai.com names openai-api")
    with pytest.raises(PotstillError, match="not a family potstill knows"):
        gate([t])

    from helpers import QUICKSTART
    from potstill.cli import main

    recipe, args = _imported_run(tmp_path, 16, "teacher.id=gpt-4o", "teacher.terms_family=openai api",
                                 "teacher.terms_declared=we are allowed", "use=competing")
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 2
    assert "'openai api' is not a family potstill knows" in capsys.readouterr().err
    assert not (recipe.run_dir / "student").exists()


@pytest.mark.parametrize("licence, teacher_id, family_", [
    ("llama3.1", "acme/qwen3-style-helper", "llama-3.1"),
    ("llama3.1", "mistral-7b-distill", "llama-3.1"),
    ("gemma", "deepseek-r1-helper", "gemma"),
])
def test_a_free_text_id_does_not_outrank_the_folders_licence(tmp_path, licence, teacher_id, family_):
    """Item 3: the folder's licence decides; the id's family, if any, is kept beside it."""
    desc = _local_desc(_teacher_folder(tmp_path, "helper", licence), teacher_id)
    (t,) = check([(desc, 8)], "competing")
    assert (t.family, t.verdict, t.matched_by) == (family_, O, f"folder licence {licence}")
    assert t.contradiction is None and t.passes
    assert f"teacher id {teacher_id}" in ", ".join(map(str, t.evidence))
    if family_ == "llama-3.1":
        assert merge_obligations([t])["name_prefix"] == "Llama"


def test_a_folder_whose_weights_are_not_the_teachers_is_not_evidence(tmp_path):
    """A ledger row's path is provenance: a folder holding other weights says nothing of this teacher."""
    desc = _local_desc(_teacher_folder(tmp_path, "helper", "llama3.1"), "helper")
    other = _teacher_folder(tmp_path, "other", "apache-2.0")
    (other / "model.safetensors").write_bytes(b"not the teacher")
    (t,) = check([({**desc, "path": str(other)}, 8)], "research")
    assert t.family == "unknown" and "holds other weights" in str(t.evidence[0])


def _export_run(tmp_path: Path, rows: int, model: str, *overrides: str):
    """A recipe whose teacher is an OpenAI request/response export: every response names ``model``."""
    from helpers import QUICKSTART, TEACHER, tiny_overrides
    from potstill.recipe import load_recipe

    prompts = [json.loads(line) for line in (QUICKSTART / "prompts" / "train.jsonl").open()][:rows]
    data = tmp_path / "export.jsonl"
    data.write_text("".join(json.dumps({
        "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": r["prompt"]}]},
        "response": {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": r["answer"]},
                                  "finish_reason": "stop"}]}}) + "\n" for r in prompts))
    args = [*tiny_overrides(tmp_path / "run"), "prompts=null", "teacher.backend=imported", f"teacher.data={data}",
            f"student.tokenizer={TEACHER}", "train.objective=sft", "baseline=null", *overrides]
    return load_recipe(QUICKSTART / "recipe.yaml", args), args


def test_the_model_an_export_names_in_its_responses_is_evidence(tmp_path, capsys, monkeypatch):
    """Item 4: an OpenAI export naming gpt-4o-2024-08-06, a neutral id and a declaration, use competing."""
    monkeypatch.setenv("COLUMNS", "400")  # terms check's table on one line a teacher
    from helpers import QUICKSTART
    from potstill.cli import main
    from potstill.generate import generate

    recipe, args = _export_run(tmp_path, 16, "gpt-4o-2024-08-06", "teacher.id=export", "teacher.terms_family=unknown",
                               "teacher.terms_declared=our own answers", "use=competing")
    generate(recipe)
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert "teacher 'export' (16 rows)" in err and "by response model gpt-4o-2024-08-06" in err
    assert "forbid training a model for use 'competing'" in err
    assert main(["terms", "check", str(recipe.run_dir), "--use", "competing"]) == 1
    out = capsys.readouterr().out
    assert "response model gpt-4o-2024-08-06: openai-api" in out and "forbidden" in out


# Real model ids, each with the one family its terms are (None: no family of the registry; the
# hosted-only Qwen and DeepSeek API names, terms the registry does not hold, names that only look
# like a family's). Every id must name exactly its family: a pattern that also matches another
# family's id fails here.
REAL_IDS = {
    "openai-api": ["gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "openai/gpt-4o",
                   "gpt-4-turbo", "gpt-4-0613", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4.5-preview",
                   "gpt-3.5-turbo", "gpt-3.5-turbo-0125", "gpt-5", "gpt-5-mini", "gpt-5-nano", "o1", "o1-mini",
                   "o1-preview", "o3", "o3-mini", "o4-mini", "chatgpt-4o-latest",
                   "ft:gpt-4o-mini-2024-07-18:acme::9AbCdEf1"],
    "anthropic": ["claude-3-5-sonnet-20241022", "claude-3-opus-20240229", "claude-3-haiku-20240307",
                  "claude-sonnet-4-20250514", "claude-opus-4-1-20250805", "anthropic/claude-3.5-sonnet"],
    "gemini-api": ["gemini-1.5-pro", "gemini-2.0-flash", "gemini-2.5-pro", "models/gemini-2.5-flash",
                   "google/gemini-2.0-flash-001"],
    "gemma-4": ["google/gemma-4-e4b"],
    "gemma": ["google/gemma-2b", "google/gemma-7b-it", "google/gemma-1.1-2b-it", "google/gemma-2-2b-it",
              "google/gemma-2-9b", "google/gemma-2-27b-it", "google/gemma-3-1b-it", "google/gemma-3-4b-it",
              "google/gemma-3-27b-pt", "google/gemma-3n-E4B-it", "google/codegemma-7b-it", "google/recurrentgemma-2b",
              "google/shieldgemma-2b", "google/paligemma2-3b-pt-224", "gemma2:9b", "gemma3:27b"],
    "llama-2": ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-chat-hf", "meta-llama/Llama-2-70b-chat-hf",
                "llama2:13b", "codellama/CodeLlama-7b-hf", "codellama/CodeLlama-34b-Instruct-hf"],
    "llama-3.1": ["meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                  "meta-llama/Meta-Llama-3.1-70B-Instruct", "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF",
                  "meta-llama/llama-3.1-405b-instruct", "llama3.1:8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"],
    "llama-3.2": ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.2-11B-Vision-Instruct",
                  "llama3.2:3b"],
    "llama-3.3": ["meta-llama/Llama-3.3-70B-Instruct", "llama-3.3-70b-versatile",
                  "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"],
    "llama-4": ["meta-llama/Llama-4-Scout-17B-16E-Instruct", "meta-llama/Llama-4-Maverick-17B-128E-Instruct"],
    "qwen-license": ["Qwen/Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct", "Qwen/Qwen2.5-Math-72B-Instruct",
                     "Qwen/Qwen2.5-VL-72B-Instruct", "qwen2.5:72b"],
    "qwen-research": ["Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-Coder-3B-Instruct",
                      "Qwen/Qwen2.5-VL-3B-Instruct"],
    "qwen-apache": ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B", "Qwen/Qwen3-32B", "Qwen/Qwen3-30B-A3B",
                    "Qwen/Qwen3-235B-A22B", "Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-Coder-30B-A3B-Instruct",
                    "Qwen/Qwen3-Coder-480B-A35B-Instruct", "Qwen/Qwen3-Next-80B-A3B-Instruct", "qwen3:8b",
                    "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-14B",
                    "Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-Coder-7B-Instruct", "Qwen/Qwen2.5-Math-1.5B",
                    "Qwen/Qwen2.5-VL-7B-Instruct"],
    "mistral-mrl": ["mistralai/Mistral-Large-Instruct-2407", "mistralai/Mistral-Large-Instruct-2411",
                    "mistralai/Ministral-8B-Instruct-2410", "mistralai/Pixtral-Large-Instruct-2411"],
    "mistral-apache": ["mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.3",
                       "mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x22B-v0.1",
                       "mistralai/Mistral-Nemo-Instruct-2407", "mistralai/mathstral-7B-v0.1",
                       "mistralai/Mamba-Codestral-7B-v0.1", "TheBloke/Mistral-7B-Instruct-v0.2-GGUF"],
    "deepseek-mit": ["deepseek-ai/DeepSeek-R1", "deepseek-ai/DeepSeek-R1-0528", "deepseek-ai/DeepSeek-R1-Zero",
                     "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
                     "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B", "deepseek-ai/DeepSeek-V3-0324", "deepseek-ai/DeepSeek-V3.1",
                     "deepseek-ai/DeepSeek-V3.2-Exp", "deepseek/deepseek-r1"],
    "deepseek-v3": ["deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-V3-Base"],
    None: ["qwen3-max", "qwen3-max-preview", "qwen3-coder-plus", "qwen3-coder-flash", "qwen-max", "qwen-plus",
           "qwen2.5-max", "google/medgemma-4b-it", "google/medgemma-27b-text-it", "openai/gpt-oss-20b",
           "openai/gpt-oss-120b", "openai-community/gpt2", "EleutherAI/gpt-neox-20b", "meta-llama/Meta-Llama-3-8B",
           "meta-llama/Meta-Llama-3-70B-Instruct", "llama3:8b", "mistral-large-latest", "ministral-8b-latest",
           "mistral-small-latest", "mistralai/Codestral-22B-v0.1", "deepseek-chat", "deepseek-reasoner",
           "deepseek-ai/DeepSeek-V2-Lite", "microsoft/Phi-3-mini-4k-instruct", "HuggingFaceTB/SmolLM2-135M",
           # names that hold a family's id inside them: patterns are anchored at both ends
           "acme/qwen3-style-helper", "mistral-7b-distill", "acme/my-gpt-4o", "xgpt-4o", "best-llama-3.1-8b",
           "not-claude", "acme/megemma-2b"],
}
ID_CASES = [(i, f) for f, ids in REAL_IDS.items() for i in ids]


@pytest.mark.parametrize("model_id, expected", ID_CASES)
def test_real_model_ids_name_their_family(model_id, expected):
    """Item 5: the gate's verdict for a teacher known only by its id."""
    (t,) = check([({"id": model_id, "backend": "imported"}, 1)], "commercial")
    assert t.family == (expected or "unknown"), model_id


@pytest.mark.parametrize("model_id, expected", ID_CASES)
def test_no_pattern_matches_another_familys_id(model_id, expected):
    """Item 5: an id names exactly its family, through every registry pattern."""
    from potstill.receipts.terms import id_families

    assert id_families(model_id) == ((expected,) if expected else ()), model_id
    assert id_families(f"served/{model_id.upper()}") == id_families(model_id)  # case and org do not matter


def test_every_family_with_model_ids_has_real_ids_in_the_test():
    assert {k for k, f in registry().items() if f.match.get("model_ids")} <= set(REAL_IDS)


@pytest.mark.parametrize("family_, use", [("unknown", "research"), ("openai-api", "research")])
def test_a_blank_declaration_says_nothing(family_, use):
    """Item 6: whitespace is not a declaration, for unknown or review."""
    (t,) = check([({"id": "t", "backend": "imported", "terms_family": family_}, 3)], use, declared=" \t ")
    assert t.verdict in (U, R) and not t.passes
    with pytest.raises(PotstillError, match="not legal advice"):
        gate([t])


def test_a_blank_declaration_in_a_recipe_is_one_line(tmp_path, capsys):
    from helpers import QUICKSTART
    from potstill.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((QUICKSTART / "recipe.yaml").read_text().replace(
        "terms_family: apache-2.0", f"terms_family: apache-2.0\n  terms_declared: \"   \"\n  path: {QUICKSTART / 'teacher'}"
    ).replace("  path: teacher\n", "").replace("path: prompts/", f"path: {QUICKSTART}/prompts/"))
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"potstill: error: {recipe}: teacher.terms_declared: blank: say why the teacher's terms allow this "
                   f"use, or leave it out (got '   ')\n")


def _tamper(ledger_path: Path, edit: str):
    """Edit a finished run's ledger the way a user with sqlite3 could."""
    from potstill.ledger import Ledger, teacher_key

    with Ledger(ledger_path) as ledger:
        (key, desc), = ledger.teachers().items()
        if edit == "terms_family":  # provenance: not part of the key
            ledger.db.execute("UPDATE teachers SET description=? WHERE teacher_key=?",
                              (json.dumps({**desc, "terms_family": "own"}), key))
        elif edit == "identity":  # another source file's hash, under the old key
            ledger.db.execute("UPDATE teachers SET description=? WHERE teacher_key=?",
                              (json.dumps({**desc, "id": "Qwen/Qwen3-8B", "source_sha256": "0" * 64}), key))
        else:  # the rows moved to a teacher described as Qwen3's
            other = {**desc, "id": "Qwen/Qwen3-8B", "source_sha256": "0" * 64}
            ledger.db.execute("INSERT INTO teachers VALUES (?, ?)", (teacher_key(other), json.dumps(other)))
            ledger.db.execute("UPDATE requests SET teacher_key=?", (teacher_key(other),))


@pytest.mark.parametrize("edit, code, said", [
    ("terms_family", 1, "contradicts teacher id gpt-4o-mini"),
    ("identity", 2, "does not hash to its key"),
    ("moved", 2, "does not hash from its teacher"),
])
def test_terms_check_does_not_trust_an_edited_ledger(tmp_path, capsys, monkeypatch, edit, code, said):
    """Item 6: terms check verifies the ledger's teacher rows as train does, and weighs the same evidence."""
    from potstill.cli import main

    monkeypatch.setenv("COLUMNS", "400")

    recipe, _ = _imported_run(tmp_path, 8, "teacher.id=gpt-4o-mini", "teacher.terms_family=unknown")
    _tamper(recipe.run_dir / "ledger.sqlite", edit)
    assert main(["terms", "check", str(recipe.run_dir), "--use", "competing"]) == code
    out = capsys.readouterr()
    assert said in " ".join((out.out + out.err).split())
    if code == 2:
        assert out.err.count("\n") == 1 and "Traceback" not in out.err


def test_train_refuses_rows_moved_to_another_teacher(tmp_path, capsys):
    from helpers import QUICKSTART
    from potstill.cli import main

    recipe, args = _imported_run(tmp_path, 8, "teacher.id=gpt-4o-mini", "teacher.terms_family=unknown", "use=competing")
    _tamper(recipe.run_dir / "ledger.sqlite", "moved")
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 2
    assert "the row was edited or moved to another teacher" in capsys.readouterr().err
    assert not (recipe.run_dir / "student").exists()


# -- issue 21: obligations by version; the card and SPDX say what binds the student ---------------

LLAMA_31_NOTICE = ("Llama 3.1 is licensed under the Llama 3.1 Community License, Copyright © Meta Platforms, Inc. "
                   "All Rights Reserved.")


def _folder_run(tmp_path: Path, folder: Path, *overrides: str):
    """A local teacher ``folder`` generates 16 rows; the CLI's train then reads them (args returned)."""
    from helpers import QUICKSTART, tiny_overrides
    from potstill.generate import generate
    from potstill.recipe import load_recipe

    args = [*tiny_overrides(tmp_path / "run", n_prompts=16), f"teacher.path={folder}", "teacher.terms_family=unknown",
            "use=commercial", "train.objective=sft", "baseline=null", *overrides]
    recipe = load_recipe(QUICKSTART / "recipe.yaml", args)
    generate(recipe)
    return recipe, args


def _spdx(student: Path) -> tuple[list, dict]:
    graph = json.loads((student / "model.spdx3.json").read_text())["@graph"]
    return graph, {e["spdxId"]: e for e in graph if "spdxId" in e}


def _licences_of(graph: list, ids: dict, holder: str, kind: str = "hasConcludedLicense") -> list[str]:
    return [ids[r["to"][0]]["simplelicensing_licenseExpression"] for r in graph
            if r["type"] == "Relationship" and r["relationshipType"] == kind and r["from"] == holder]


@pytest.mark.slow
def test_a_llama_3_1_teacher_gets_llama_3_1s_text_and_the_card_names_the_family_found(tmp_path, capsys):
    """Items 7 and 8: a Llama 3.1 folder (README licence, LICENSE title, NOTICE) with the recipe's
    terms_family left unknown: NOTICE, TERMS.md, the card and SPDX carry 3.1's notice, URL,
    acceptable-use policy and licence, nothing of 3.3; the card says llama-3.1 beside the teacher."""
    from helpers import QUICKSTART
    from huggingface_hub import ModelCard

    from potstill.cli import main

    llama = _teacher_folder(tmp_path, "helper", "llama3.1", "LLAMA 3.1 COMMUNITY LICENSE AGREEMENT (test copy)\n")
    (llama / "NOTICE").write_text(LLAMA_31_NOTICE + "\n")
    recipe, args = _folder_run(tmp_path, llama, "teacher.id=helper")
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 0
    student = recipe.run_dir / "student"
    assert (student / "NOTICE").read_text() == LLAMA_31_NOTICE + "\n"  # the folder's line, once; no 3.3 line
    terms_md = (student / "TERMS.md").read_text()
    assert "models/llama3_1/LICENSE>" in terms_md and "llama.com/llama3\\_1/use-policy" in terms_md
    assert "LicenseRef-Llama-3.1-Community-License" in terms_md
    card = ModelCard.load(student / "README.md")
    (teacher,) = card.data.to_dict()["distillation"]["teachers"]
    assert teacher["licence"] == "LicenseRef-Llama-3.1-Community-License" and "llama3_1" in teacher["terms_url"]
    assert teacher["terms_family"] == teacher["terms_registry"] == "llama-3.1"  # item 8: not the recipe's "unknown"
    assert "terms: llama-3.1" in card.text and "terms: unknown" not in card.text
    assert "llama3\\_1/use-policy" in card.text
    graph, ids = _spdx(student)
    dataset = next(e["spdxId"] for e in graph if e["type"] == "dataset_DatasetPackage")
    assert _licences_of(graph, ids, dataset) == ["LicenseRef-Llama-3.1-Community-License"]
    for text in (terms_md, card.text, (student / "model.spdx3.json").read_text(), (student / "NOTICE").read_text()):
        assert "3.3" not in text and "3_3" not in text
    capsys.readouterr()
    assert main(["verify", str(recipe.run_dir)]) == 0, capsys.readouterr()


@pytest.mark.slow
def test_gemmas_terms_flow_down_into_the_concluded_licence(tmp_path, capsys):
    """Item 9: a Gemma teacher, the student declared apache-2.0: the card and SPDX conclude
    Apache-2.0 AND the Gemma terms, keep apache-2.0 as the declared licence, and say why."""
    from helpers import QUICKSTART
    from huggingface_hub import ModelCard

    from potstill.cli import main

    gemma = _teacher_folder(tmp_path, "helper", "gemma", "Gemma Terms of Use (test copy)\n")
    recipe, args = _folder_run(tmp_path, gemma, "teacher.id=helper", "student.license=apache-2.0")
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 0
    student = recipe.run_dir / "student"
    concluded = "Apache-2.0 AND LicenseRef-Gemma-Terms-of-Use"
    card = ModelCard.load(student / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "other" and meta["license_link"] == "TERMS.md"
    assert meta["distillation"]["licence"] == {"declared": "apache-2.0", "concluded": concluded,
                                               "flows_down": ["LicenseRef-Gemma-Terms-of-Use"]}
    assert f"Licence: **{concluded}**" in card.text and "pass to every user" in card.text
    assert concluded in (student / "TERMS.md").read_text()
    graph, ids = _spdx(student)
    model = next(e["spdxId"] for e in graph if e["type"] == "ai_AIPackage" and e["spdxId"].endswith(":student"))
    assert _licences_of(graph, ids, model) == [concluded]
    assert _licences_of(graph, ids, model, "hasDeclaredLicense") == ["Apache-2.0"]
    capsys.readouterr()
    assert main(["verify", str(recipe.run_dir)]) == 0, capsys.readouterr()


def test_licence_names_that_are_not_spdx_ids_become_licence_refs(tmp_path):
    """Item 10: student.license llama3.1 (a Hugging Face licence id, no SPDX one): every licence
    expression of the SPDX document parses as SPDX with the SPDX licence list (license-expression),
    each id either on the list or a LicenseRef."""
    from helpers import QUICKSTART
    from license_expression import get_spdx_licensing

    from potstill.cli import main

    recipe, args = _imported_run(tmp_path, 16, "teacher.id=Qwen/Qwen3-8B", "student.license=llama3.1")
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 0
    graph, ids = _spdx(recipe.run_dir / "student")
    written = [e["simplelicensing_licenseExpression"] for e in graph if e["type"] == "simplelicensing_LicenseExpression"]
    assert "LicenseRef-llama3.1" in written and "llama3.1" not in written
    licensing = get_spdx_licensing()
    for expression in written + [f.licence for f in registry().values()]:
        if expression == "NOASSERTION":
            continue
        checked = licensing.validate(expression, strict=True)
        assert [s for s in checked.invalid_symbols if not s.startswith("LicenseRef-")] == [], expression
        assert all(e.startswith("Unknown license key") for e in checked.errors), (expression, checked.errors)
    from potstill.receipts.spdx import licence_expression

    for given, written_as in [("apache-2.0", "Apache-2.0"), ("mit OR llama3.1", "MIT OR LicenseRef-llama3.1"),
                              ("other", "LicenseRef-other"), ("my licence (v2)", "LicenseRef-my-licence-v2"),
                              ("gpl-2.0+ WITH classpath-exception-2.0", "GPL-2.0-or-later WITH Classpath-exception-2.0"),
                              ("LicenseRef-Gemma-Terms-of-Use", "LicenseRef-Gemma-Terms-of-Use"), (None, "NOASSERTION")]:
        assert licence_expression(given) == written_as


def _merged_run(tmp_path: Path, *overrides: str):
    """Two teachers' runs, each importing its answers (16 rows of Llama 3.1 8B, 8 of Gemma 2 2B),
    merged by the CLI into a third run's ledger; that run's recipe trains on every row of it."""
    from potstill.cli import main

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, args = _imported_run(tmp_path / "a", 16, "teacher.id=meta-llama/Llama-3.1-8B-Instruct", "teacher.terms_family=unknown")
    _imported_run(tmp_path / "b", 8, "teacher.id=google/gemma-2-2b-it", "teacher.terms_family=unknown")
    run = tmp_path / "run"
    run.mkdir()
    assert main(["merge", str(run / "ledger.sqlite"), str(tmp_path / "a" / "run" / "ledger.sqlite"),
                 str(tmp_path / "b" / "run" / "ledger.sqlite")]) == 0
    return run, [*args, f"output_dir={run}", "train.data=ledger", "use=commercial", *overrides]


@pytest.mark.slow
def test_a_merged_ledger_of_two_teachers_trains_one_student_with_their_shares(tmp_path, capsys):
    """Item 12: train.data=ledger: one student on a merged ledger of a Llama 3.1 and a Gemma teacher;
    the card names both with their shares, the export carries both terms' obligations, verify holds."""
    from helpers import QUICKSTART
    from huggingface_hub import ModelCard

    from potstill.cli import main

    run, args = _merged_run(tmp_path)
    assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 0
    student = run / "student"
    info = json.loads((student / "potstill.json").read_text())
    assert info["examples"] == 24 and info["model_name"] == "Llama-student"
    assert {t["family"]: t["rows"] for t in info["terms"]["teachers"]} == {"llama-3.1": 16, "gemma": 8}
    teachers = {t["id"]: t for t in ModelCard.load(student / "README.md").data.to_dict()["distillation"]["teachers"]}
    assert set(teachers) == {"meta-llama/Llama-3.1-8B-Instruct", "google/gemma-2-2b-it"}
    assert teachers["meta-llama/Llama-3.1-8B-Instruct"]["share_of_examples"] == pytest.approx(2 / 3)
    assert teachers["google/gemma-2-2b-it"]["share_of_examples"] == pytest.approx(1 / 3)
    assert sum(t["share_of_tokens"] for t in teachers.values()) == pytest.approx(1.0)
    assert 0 < teachers["google/gemma-2-2b-it"]["share_of_tokens"] < 1
    terms_md = (student / "TERMS.md").read_text()
    assert "Built with Llama" in terms_md and "Gemma Prohibited Use Policy" in terms_md
    card = (student / "README.md").read_text()
    assert "67% of examples" in card and "33% of examples" in card
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0, capsys.readouterr()
    assert "meta-llama/Llama-3.1-8B-Instruct 16" in capsys.readouterr().out.replace(",", "")


def test_two_teachers_requiring_different_name_prefixes_refuse_the_export(tmp_path, capsys):
    """Item 12, end to end: the conflict refusal. No two families of the registry require different
    prefixes (every Llama version says "Llama"), so Gemma's entry is given one here, as a registry
    entry would; the merged ledger then refuses the export, naming both teachers, until overridden."""
    from helpers import QUICKSTART

    from potstill.cli import main
    from potstill.ledger import Ledger

    run, args = _merged_run(tmp_path)
    registry()["gemma"].obligations["name_prefix"] = "Gemma"
    try:
        assert main(["train", str(QUICKSTART / "recipe.yaml"), *args]) == 2
        err = capsys.readouterr().err
        assert "the teachers' obligations conflict: the name must begin with each of" in err
        assert "'Llama' (meta-llama/Llama-3.1-8B-Instruct)" in err and "'Gemma' (google/gemma-2-2b-it)" in err
        assert err.count("\n") == 1 and not (run / "student").exists()
        assert main(["train", str(QUICKSTART / "recipe.yaml"), *args, "--accept-terms-risk", "names cleared"]) == 0
    finally:
        del registry()["gemma"].obligations["name_prefix"]
    with Ledger(run / "ledger.sqlite") as ledger:
        (kept,) = ledger.terms_overrides()
    assert kept["reason"] == "names cleared" and any("'Gemma' (google/gemma-2-2b-it)" in p for p in kept["problems"])
    info = json.loads((run / "student" / "potstill.json").read_text())
    assert info["terms"]["obligations"]["conflicts"] and info["model_name"] == "student"
    assert "names cleared" in (run / "student" / "TERMS.md").read_text()


def test_train_data_ledger_with_an_online_teacher_is_one_line(tmp_path, capsys):
    """Cached logit KD reads every teacher's rows (mapped across tokenizers); an online teacher is one."""
    from helpers import QUICKSTART

    from potstill.cli import main

    assert main(["train", str(QUICKSTART / "recipe.yaml"), f"output_dir={tmp_path}", "train.data=ledger",
                 "train.objective=kd", "train.teacher_signal=online"]) == 2
    err = capsys.readouterr().err
    assert "train.data ledger trains on every teacher's rows" in err and err.count("\n") == 1

"""The terms registry and gate: the policy as a table a reviewer can read, matching of teachers to
families, the gate's refusal and its override, obligations merged across teachers."""

import json
from pathlib import Path

import pytest

from potstill.errors import PotstillError
from potstill.receipts.terms import check, gate, match_teacher, merge_obligations, prefixed_name, registry
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
    "llama-3":         (O, O, O, O),  # "Llama" prefix, "Built with Llama", licence + Notice, 700M MAU
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
          "model": "meta-llama/Llama-3.3-70B-Instruct"}, "llama-3", "model id meta-llama/Llama-3.3-70B-Instruct"),
        ({"id": "claude-sonnet-4", "backend": "imported"}, "anthropic", "model id claude-sonnet-4"),
        ({"id": "big", "backend": "local", "path": _folder(tmp_path, "big", {"license": "llama3.3"})},
         "llama-3", "folder licence llama3.3"),
        ({"id": "g", "backend": "local", "path": _folder(tmp_path, "gemma-2-2b-it", {"license": "gemma"})},
         "gemma", "model id gemma-2-2b-it"),
        ({"id": "r", "backend": "local", "path": _folder(tmp_path, "DeepSeek-R1-Distill", {"license": "mit"})},
         "deepseek-mit", "model id DeepSeek-R1-Distill"),
        ({"id": "q", "backend": "local", "path": _folder(tmp_path, "q", {"license": "other", "license_name": "qwen"})},
         "qwen-license", "folder licence qwen"),
        ({"id": "mystery", "backend": "local", "path": _folder(tmp_path, "mystery", None)}, "unknown",
         "no registry entry matched"),
        ({"id": "x", "backend": "local", "path": _folder(tmp_path, "x", {"license": "cc-by-nc-4.0"})}, "unknown",
         "no registry entry matched"),
        # the recipe's explicit key wins, and one the registry does not know is unknown, not allowed
        ({"id": "gpt-4o", "backend": "imported", "terms_family": "own"}, "own", "terms_family own"),
        ({"id": "t", "backend": "imported", "terms_family": "openai-terms"}, "openai-api", "terms_family openai-terms"),
        ({"id": "t", "backend": "imported", "terms_family": "cc-by-4.0"}, "unknown",
         "terms_family cc-by-4.0 is not in the registry"),
        # open weights with a name like an API's are not that API's
        ({"id": "openai/gpt-oss-20b", "backend": "imported"}, "unknown", "no registry entry matched"),
        ({"id": "Qwen/Qwen2.5-32B-Instruct", "backend": "imported"}, "qwen-apache", "model id Qwen/Qwen2.5-32B-Instruct"),
        ({"id": "Qwen/Qwen2.5-3B-Instruct", "backend": "imported"}, "qwen-research", "model id Qwen/Qwen2.5-3B-Instruct"),
        ({"id": "deepseek-ai/DeepSeek-V3", "backend": "imported"}, "deepseek-v3", "model id deepseek-ai/DeepSeek-V3"),
        ({"id": "meta-llama/Llama-3.2-1B", "backend": "imported"}, "llama-3", "model id meta-llama/Llama-3.2-1B"),
        ({"id": "meta-llama/Llama-2-7b-hf", "backend": "imported"}, "llama-2", "model id meta-llama/Llama-2-7b-hf"),
        ({"id": "google/gemma-4-e4b", "backend": "imported"}, "gemma-4", "model id google/gemma-4-e4b"),
    ]
    for desc, key, how in cases:
        assert match_teacher(desc) == (key, how), desc


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
    llama = check([({"id": "l", "terms_family": "llama-3"}, 5)], "commercial")
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
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"potstill.receipts.terms" = ["registry.yaml"]' in text
    json.dumps([f.__dict__ for f in registry().values()])  # plain data: it goes into potstill.json


# -- the gate in train, and the obligations in the export -------------------------------------------

def _imported_run(tmp_path: Path, rows: int = 32, *overrides: str):
    """A recipe whose teacher is a file of answers (generate imports it): no model runs to make rows."""
    from conftest import QUICKSTART, TEACHER, tiny_overrides
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
    from conftest import QUICKSTART
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
    from conftest import QUICKSTART
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

    from conftest import TEACHER
    from huggingface_hub import ModelCard

    llama = tmp_path / "big-teacher"
    shutil.copytree(TEACHER, llama)
    text = (llama / "README.md").read_text().replace("license: apache-2.0", "license: llama3.3")
    (llama / "README.md").write_text(text)
    (llama / "LICENSE").write_text("LLAMA 3.3 COMMUNITY LICENSE AGREEMENT (test copy)\n")
    from conftest import QUICKSTART, tiny_overrides
    from potstill.generate import generate
    from potstill.recipe import load_recipe
    from potstill.train import train

    recipe = load_recipe(QUICKSTART / "recipe.yaml", [
        *tiny_overrides(tmp_path / "run", n_prompts=16), f"teacher.path={llama}", "teacher.id=big-teacher",
        "teacher.terms_family=unknown", "use=commercial", "train.objective=sft", "baseline=null"])
    generate(recipe)

    student = train(recipe, recipe.train)
    info = json.loads((student / "potstill.json").read_text())
    assert info["terms"]["teachers"][0]["family"] == "llama-3"
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
    from test_report import make_run, parse

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


def test_run_checks_the_terms_again_when_the_use_changes(tmp_path, capsys):
    """A student trained for research is not "up to date" for use=competing: the gate runs again."""
    from conftest import QUICKSTART
    from potstill.cli import main

    recipe, args = _imported_run(tmp_path, 16, "teacher.id=openai", "teacher.terms_family=openai-api",
                                 "teacher.terms_declared=a research probe that competes with nothing", "eval.limit=8",
                                 "eval.verifier=exact")
    assert main(["run", str(QUICKSTART / "recipe.yaml"), *args, "use=research"]) == 0
    capsys.readouterr()
    assert main(["run", str(QUICKSTART / "recipe.yaml"), *args, "use=competing"]) == 2
    assert "forbid training a model for use 'competing'" in capsys.readouterr().err

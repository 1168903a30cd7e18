"""Lineage: the sign tests against references, their calibration under the null, the
likelihood statistic against a plain one-prompt-at-a-time computation, identity counts, and
`potstill audit lineage` on local folders and endpoints."""

import json
import shutil

import numpy as np
import pytest
import torch
from scipy import stats

from potstill.audit.lineage import identity_counts, kl_scores, lineage_test, match_rates
from potstill.cli import main

from helpers import QUICKSTART, TEACHER


def _answers(rng, n=60, length=8, vocab=20):
    return ["".join(chr(97 + c) for c in rng.integers(0, vocab, size=length)) for _ in range(n)]


def _near(rng, answers, keep):
    """Answers that keep each character of ``answers`` with probability ``keep``, else a random one."""
    return ["".join(c if rng.random() < keep else chr(97 + rng.integers(0, 20)) for c in a) for a in answers]


def test_match_rate_counts_positions_over_the_longer_answer():
    assert match_rates(["abcd", "ab", ""], ["abxd", "abcd", ""], list) == [0.75, 0.5, 1.0]


def test_a_suspect_close_to_the_teacher_is_flagged_and_a_reference_like_one_is_not():
    rng = np.random.default_rng(0)
    teacher = _answers(rng)
    refs = {f"r{i}": _near(rng, teacher, 0.2) for i in range(5)}  # unrelated models agree a little (same task)
    refs = {name: match_rates(teacher, answers, list) for name, answers in refs.items()}
    distilled = lineage_test(match_rates(teacher, _near(rng, teacher, 0.7), list), refs)
    control = lineage_test(match_rates(teacher, _near(rng, teacher, 0.2), list), refs)
    assert distilled["p_value"] < 1e-6 and control["p_value"] > 0.01
    assert distilled["p_value"] == max(r["p_value"] for r in distilled["references"])
    r = distilled["references"][0]
    assert r["p_value"] == pytest.approx(stats.binomtest(r["wins"], r["wins"] + r["losses"], 0.5,
                                                         alternative="greater").pvalue)


def test_null_false_positive_rate_is_at_most_alpha():
    """300 suspects exchangeable with the references: flagged at alpha = 0.05 no more often than the
    binomial 99.9% interval allows."""
    rng = np.random.default_rng(1)
    teacher = _answers(rng, n=40)
    flagged = 0
    for _ in range(300):
        refs = {f"r{i}": match_rates(teacher, _near(rng, teacher, 0.3), list) for i in range(5)}
        flagged += lineage_test(match_rates(teacher, _near(rng, teacher, 0.3), list), refs)["p_value"] < 0.05
    assert flagged <= stats.binom.ppf(0.9995, 300, 0.05)


def test_null_rate_below_alpha_of_continuous_scores_is_the_sign_tests():
    """Log-probabilities (no ties): with one reference the p-value is the exact sign test's, and
    over 400 exchangeable suspects its rate below 0.05 stays inside the binomial 99.9 % interval."""
    rng = np.random.default_rng(2)
    difficulty = rng.normal(-10, 3, size=50)  # shared per prompt: scores correlate across models
    p = [lineage_test(list(difficulty + rng.normal(size=50)), {"r": list(difficulty + rng.normal(size=50))},
                      "likelihood")["p_value"] for _ in range(400)]
    exact = sum(stats.binom.pmf(w, 50, 0.5) for w in range(51) if stats.binom.sf(w - 1, 50, 0.5) < 0.05)  # 0.032
    low, high = stats.binom.ppf([0.0005, 0.9995], 400, exact)
    assert low <= sum(v < 0.05 for v in p) <= high


def test_identity_counts():
    answers = {"s": ["I am TeacherBot.", "no idea"], "r": ["I am a model", "teacherbot here"]}
    assert identity_counts(answers, ["TeacherBot"]) == {"s": 1, "r": 1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Five reference models of the teacher's shape and tokenizer, randomly initialised; a suspect
    that is the teacher's copy; a control that is one more random model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lineage")
    config = AutoConfig.from_pretrained(TEACHER)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.head_dim = 32, 64, 1, 16
    config.num_attention_heads = config.num_key_value_heads = 2
    paths = []
    for i in range(6):
        torch.manual_seed(i)
        path = root / f"random{i}"
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        for f in TEACHER.glob("*token*"):
            shutil.copy(f, path)
        shutil.copy(TEACHER / "chat_template.jinja", path)
        paths.append(path)
    copy = root / "copy"
    shutil.copytree(TEACHER, copy)
    return copy, paths


@pytest.mark.slow
def test_lineage_cli_flags_a_copy_and_not_a_random_model(folders, tmp_path, capsys):
    copy, randoms = folders
    refs = [a for p in randoms[:5] for a in ("--reference", str(p))]
    common = ["--teacher", str(TEACHER), *refs, "--prompts", str(QUICKSTART / "prompts" / "heldout.jsonl"),
              "--limit", "40", "--max-new-tokens", "8", "--name", "quickstart"]
    assert main(["audit", "lineage", "--suspect", str(copy), *common, "--out", str(tmp_path / "a.json")]) == 0
    assert main(["audit", "lineage", "--suspect", str(randoms[5]), *common, "--out", str(tmp_path / "b.json")]) == 0
    assert main(["audit", "lineage", "--suspect", str(copy), *common, "--statistic", "match",
                 "--out", str(tmp_path / "c.json")]) == 0
    a, b, c = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json", "c.json"))
    assert a["results"][0]["statistic"] == b["results"][0]["statistic"] == "likelihood"  # auto: all are folders
    assert a["verdicts"][0]["flagged"] and a["results"][0]["p_value"] < 1e-9  # 40 of 40 prompts won, per reference
    assert not b["verdicts"][0]["flagged"]
    assert c["verdicts"][0]["flagged"] and c["results"][0]["suspect_score"] == 1.0
    assert set(a["results"][0]["identity"]["naming_the_teacher"]) == {"teacher", "suspect"} | {
        f"reference:{p}" for p in randoms[:5]}
    assert main(["audit", "lineage", "--suspect", "http://localhost:1/v1", *common]) == 2
    assert "URL#MODEL" in capsys.readouterr().err
    assert main(["audit", "lineage", "--suspect", "http://localhost:1/v1#s", *common, "--statistic", "likelihood"]) == 2
    assert "needs the weights of the suspect" in capsys.readouterr().err
    assert main(["audit", "lineage", "--suspect", str(copy), *common, "--statistic", "kl",
                 "--out", str(tmp_path / "kl.json")]) == 0
    assert main(["audit", "lineage", "--suspect", str(randoms[5]), *common, "--statistic", "kl",
                 "--out", str(tmp_path / "kl-random.json")]) == 0
    kl, kl_random = (json.loads((tmp_path / f).read_text())["results"][0] for f in ("kl.json", "kl-random.json"))
    assert kl["p_value"] < 1e-9 and kl["suspect_score"] == pytest.approx(0.0, abs=1e-6) and kl_random["p_value"] > 1e-3


def test_kl_refuses_another_tokenizer_in_one_line(folders, tmp_path, capsys):
    from transformers import AutoTokenizer

    copy, randoms = folders
    other = tmp_path / "other-tokenizer"
    shutil.copytree(randoms[5], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    args = ["audit", "lineage", "--teacher", str(TEACHER), *[a for p in randoms[:2] for a in ("--reference", str(p))],
            "--prompts", str(QUICKSTART / "prompts" / "heldout.jsonl"), "--limit", "4", "--max-new-tokens", "4",
            "--statistic", "kl", "--out", str(tmp_path / "x.json")]
    assert main([*args, "--suspect", str(other)]) == 2
    err = capsys.readouterr().err
    assert "has another tokenizer than the teacher" in err and "Traceback" not in err
    assert main([*args, "--suspect", str(copy), "--teacher", "http://localhost:1/v1#t"]) == 2
    assert "needs the teacher's weights" in capsys.readouterr().err


@pytest.mark.slow
def test_kl_scores_equal_scipy_position_by_position(folders):
    """minus the mean KL(teacher || model) over the teacher's answer, batched, equals scipy's
    entropy(p, q) at each position of a one-prompt forward; the teacher's copy scores 0."""
    from scipy.stats import entropy

    from potstill.audit.lineage import LocalModel
    from potstill.hf import prompt_ids

    copy, randoms = folders
    teacher, other = LocalModel(TEACHER), LocalModel(randoms[0])
    prompts = ["sort 3 1 2", "rev abcdef", "add 12 7", "shuffle xyz"]
    answers = teacher.answer(prompts, 8)
    got = kl_scores(teacher, other, prompts, answers, batch_size=3)
    vocab = len(teacher.tokenizer)
    for p, a, g in zip(prompts, answers, got):
        head = prompt_ids(teacher.tokenizer, [{"role": "user", "content": p}])
        tail = teacher.tokenizer(a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            t, o = (m.model(input_ids=torch.tensor([head + tail])).logits[0, len(head) - 1:-1, :vocab].double()
                    .softmax(-1).numpy() for m in (teacher, other))
        assert g == pytest.approx(-np.mean([entropy(t[i], o[i]) for i in range(len(tail))]), abs=1e-5)
    assert all(g < 0 for g in got)
    assert kl_scores(teacher, LocalModel(copy), prompts, answers) == pytest.approx([0.0] * 4, abs=1e-6)


SHAPES = {  # tiny configs: rotary (llama), soft-capped head (gemma2), learned positions (gpt2), ALiBi (bloom)
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=128),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=2),
}


@pytest.mark.parametrize("arch", list(SHAPES))
def test_answer_logprobs_equal_one_prompt_at_a_time(arch, tmp_path):
    """Batched, left-padded scoring (only the answer's logits computed) equals a plain forward of
    each prompt + answer alone, summed over the answer's tokens, on a padded vocabulary (its
    extra rows are left out), a head that soft-caps its logits (Gemma 2), learned positions
    (GPT-2: position ids must skip the padding) and ALiBi (Bloom: no position ids at all)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from potstill.audit.lineage import LocalModel
    from potstill.hf import load_tokenizer_dir, prompt_ids

    tok = load_tokenizer_dir(TEACHER, "tokenizer")
    config = AutoConfig.for_model(arch, vocab_size=len(tok) + 23, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[arch])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for f in [*TEACHER.glob("*token*"), TEACHER / "chat_template.jinja"]:
        shutil.copy(f, tmp_path)
    m = LocalModel(tmp_path)
    prompts = ["sort: 3 1 2", "rev: a b c d e f", "add: 12 + 7", "x"]
    answers = ["1 2 3", "f e d c b a", "", "a much longer answer than the prompt it follows"]
    got = m.answer_logprobs(prompts, answers, batch_size=3)
    for p, a, g in zip(prompts, answers, got):
        head, tail = prompt_ids(tok, [{"role": "user", "content": p}]), tok(a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = m.model(input_ids=torch.tensor([head + tail])).logits[0, :, :len(tok)].double()
        want = sum(float(logits[len(head) - 1 + t].log_softmax(-1)[i]) for t, i in enumerate(tail))
        assert g == pytest.approx(want, abs=1e-4)
    assert got[2] == 0.0 and all(g < 0 for i, g in enumerate(got) if i != 2)


@pytest.mark.slow
def test_lineage_reaches_a_teacher_behind_an_endpoint(folders, tmp_path, capsys):
    """The teacher served by `potstill serve` (official openai client): its copy is flagged as
    when the teacher is a folder, with the same match rates; a probe the endpoint refuses (too
    long for its 64-token context) is one line, not a traceback."""
    from potstill.serve import build_app
    from helpers import running

    copy, randoms = folders
    serving = running(build_app(TEACHER, model_name="teacher", batch_wait_ms=1))
    _, base = next(serving)
    try:
        args = ["audit", "lineage", "--suspect", str(copy), *[a for p in randoms[:5] for a in ("--reference", str(p))],
                "--prompts", str(QUICKSTART / "prompts" / "heldout.jsonl"), "--limit", "20", "--max-new-tokens", "8",
                "--tokenizer", str(TEACHER)]
        assert main([*args, "--teacher", f"{base}#teacher", "--out", str(tmp_path / "http.json")]) == 0
        assert main([*args, "--teacher", f"{base}#teacher", "--name", "x", "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err
        assert "refused the probe" in err and "HTTP 400" in err and "Traceback" not in err
    finally:
        next(serving, None)
    assert main([*args, "--teacher", str(TEACHER), "--out", str(tmp_path / "local.json")]) == 0
    http, local = (json.loads((tmp_path / f).read_text())["results"][0] for f in ("http.json", "local.json"))
    assert http["statistic"] == "likelihood" and http["p_value"] < 1e-3
    assert [r["score"] for r in http["references"]] == [r["score"] for r in local["references"]]


def test_a_hostile_endpoint_is_one_line_without_the_key(folders, tmp_path, capsys, monkeypatch):
    """A body with no choices, a body that is not JSON, a 401 that echoes the key: for the lineage
    teacher and the radioactivity suspect alike, one line naming the endpoint, the key redacted."""
    from mock_endpoint import Faults, MockEndpoint

    copy, randoms = folders
    key = "sk-audit-secret-key-0123456789"
    monkeypatch.setenv("AUDIT_KEY", key)
    lineage = ["audit", "lineage", "--suspect", str(copy), "--reference", str(randoms[0]), "--prompts",
               str(QUICKSTART / "prompts" / "heldout.jsonl"), "--limit", "2", "--max-new-tokens", "4",
               "--api-key-env", "AUDIT_KEY", "--out", str(tmp_path / "x.json")]
    radio = ["audit", "radioactivity", "--model-name", "s", "--key-file", str(tmp_path / "k"), "--tokenizer",
             str(TEACHER), "--prompts", str(QUICKSTART / "prompts" / "heldout.jsonl"), "--limit", "2",
             "--api-key-env", "AUDIT_KEY", "--out", str(tmp_path / "y.json")]
    (tmp_path / "k").write_text("a-watermark-key-of-enough-length-0123")
    for faults, patch, says in [(Faults(), True, "without a choice holding a message"),
                                (Faults(invalid_json=1.0), False, "not a chat completion"),
                                (Faults(fatal={"401": 1.0}), False, "HTTP 401")]:
        m = MockEndpoint(faults=faults).start_in_thread()
        if patch:
            monkeypatch.setattr(MockEndpoint, "completion", staticmethod(lambda body, nan=False, rule=None: {
                "id": "x", "object": "chat.completion", "created": 0, "model": "t", "choices": []}))
        try:
            assert main([*lineage, "--teacher", f"{m.url}#t"]) == 2
            err = capsys.readouterr().err
            assert says in err and f"t@{m.url}" in err and "Traceback" not in err and key[:12] not in err, err
            assert main([*radio, "--endpoint", m.url]) == 2
            err = capsys.readouterr().err
            assert says in err and "Traceback" not in err and key[:12] not in err, err
        finally:
            m.stop_thread()
            monkeypatch.undo()
            monkeypatch.setenv("AUDIT_KEY", key)
    monkeypatch.delenv("AUDIT_KEY")
    assert main([*lineage, "--teacher", "http://localhost:1/v1#t"]) == 2
    assert "--api-key-env names AUDIT_KEY, which is not set" in capsys.readouterr().err


@pytest.mark.slow  # seconds of real retries, deadlines or processes: the full suite runs it
def test_a_trickling_endpoint_fails_the_probe_within_the_deadline(tmp_path, capsys):
    """A body trickled a byte every 10 ms never trips a per-read timeout: --timeout is the deadline
    of the whole attempt (connect, headers, body), as teacher.timeout is, and nothing retries it
    behind the scenes. The probe fails once, within the deadline, with one line (was: the body
    read to its end, and the client's per-read timeout of 120 s and 3 retries held a probe past
    150 s), for the lineage teacher and the radioactivity suspect alike."""
    import time

    from mock_endpoint import Faults, MockEndpoint
    from potstill.audit.lineage import EndpointModel
    from potstill.errors import PotstillError

    m = MockEndpoint(faults=Faults(trickle=1.0, trickle_seconds=0.01)).start_in_thread()  # ~7 s a body
    try:
        model = EndpointModel(m.url, "t", timeout=1.0)
        start = time.monotonic()
        with pytest.raises(PotstillError, match=r"t@.* did not answer the probe 'sort 3 1 2' within --timeout 1 s"):
            model.chat([{"role": "user", "content": "sort 3 1 2"}], 0.0, 8)
        assert time.monotonic() - start < 1.5 and len(m.log) == 1  # one attempt, cut at the deadline
        model.close()
        probes = ["--prompts", str(QUICKSTART / "prompts" / "heldout.jsonl"), "--limit", "3", "--timeout", "1"]
        lineage = ["audit", "lineage", "--teacher", f"{m.url}#t", "--suspect", str(TEACHER), "--reference",
                   str(TEACHER), *probes, "--max-new-tokens", "4", "--out", str(tmp_path / "x.json")]
        (tmp_path / "k").write_text("a-watermark-key-of-enough-length-0123")
        radio = ["audit", "radioactivity", "--endpoint", m.url, "--model-name", "t", "--key-file", str(tmp_path / "k"),
                 "--tokenizer", str(TEACHER), *probes, "--out", str(tmp_path / "y.json")]
        for args in (lineage, radio):
            start, sent = time.monotonic(), len(m.log)
            assert main(args) == 2
            err = capsys.readouterr().err
            assert time.monotonic() - start < 10 and len(m.log) - sent == 1  # the first probe, once
            assert "did not answer the probe" in err and "within --timeout 1 s" in err and "Traceback" not in err
            assert len(err.strip().splitlines()) == 1, err
        assert main([*lineage[:-2], "--timeout", "0", "--out", str(tmp_path / "z.json")]) == 2
        assert "--timeout must be more than 0 seconds" in capsys.readouterr().err
    finally:
        m.stop_thread()

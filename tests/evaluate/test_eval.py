"""Evaluation pieces: the judge protocol and its parser, ROUGE-L, bootstrap intervals, bad input."""

import json
import shutil

import pytest

from potstill.tasks import skillmix
from potstill.cli import main
from potstill.errors import PotstillError
from potstill.evaluate.run import bootstrap_ci, rouge_l
from potstill.evaluate.judge import JUDGE_PROMPT, judge_pairs, parse_verdict
from potstill.records import Completion

from helpers import QUICKSTART, TEACHER, tiny_overrides

RECIPE = str(QUICKSTART / "recipe.yaml")


@pytest.mark.parametrize("reply, verdict", [
    ("A", "A"), ("b", "B"), ("Tie", "tie"), ("tie.", "tie"), ("Answer A", "A"), ("Verdict: B", "B"),
    ("  A, because it is correct", "A"), ("\n\nB\n", "B"), ("**A**", "A"),
    ("neither", None), ("", None), ("AB", None), ("I think A", None), ("Both are fine", None),
])
def test_parse_verdict_reads_the_first_line_and_never_guesses(reply, verdict):
    assert parse_verdict(reply) == verdict


class ScriptedJudge:
    """A judge backend for the protocol test: answers each judging prompt with a rule. (No model
    here can follow the judging instruction; the parsing, both orders and counting are real.)"""

    def __init__(self, rule):
        self.rule, self.prompts = rule, []

    def describe(self):
        return {"id": "scripted"}

    def complete(self, requests, params):
        out = []
        for r in requests:
            text = r.messages[0]["content"]
            self.prompts.append(text)
            out.append(Completion(r.request_hash, self.rule(text), None, None, None, "stop", 0, 0, 0.0))
        return out


def _parts(text):
    prompt = text.split("[Request]\n")[1].split("\n\n[Answer A]")[0]
    a = text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
    b = text.split("[Answer B]\n")[1].split("\n\nVerdict:")[0]
    return prompt, a, b


def test_both_orders_cancel_a_position_bias_and_ties_count_half():
    prompts, cand, ref = ["add 1 2", "add 2 2"], ["3", "5"], ["3", "4"]
    always_a = judge_pairs(ScriptedJudge(lambda t: "A"), prompts, cand, ref)
    assert always_a.win_rate == 0.5 and always_a.parsed == 4  # a judge that always says A favours no one

    def correctness(text):
        prompt, a, b = _parts(text)
        ok_a, ok_b = skillmix.verify(prompt, a), skillmix.verify(prompt, b)
        return "tie" if ok_a == ok_b else ("A" if ok_a else "B")

    judge = ScriptedJudge(correctness)
    result = judge_pairs(judge, prompts, cand, ref)
    assert (result.wins, result.losses, result.ties) == (0, 2, 2)  # a tie on "add 1 2", a loss on "add 2 2"
    assert result.win_rate == pytest.approx(0.25)
    assert judge.prompts[0] == JUDGE_PROMPT.format(prompt="add 1 2", a="3", b="3")


def test_unparseable_verdicts_are_counted_not_scored():
    replies = iter(["A", "banana", "B", ""])
    result = judge_pairs(ScriptedJudge(lambda t: next(replies)), ["p1", "p2"], ["x", "y"], ["u", "v"])
    assert result.unparseable == 2 and result.parsed == 2
    # order: (p1, candidate as A), (p1, candidate as B), (p2, candidate as A), (p2, candidate as B)
    assert result.votes == [1.0, None, 0.0, None]
    empty = judge_pairs(ScriptedJudge(lambda t: "no idea"), ["p"], ["x"], ["y"])
    assert empty.win_rate is None and empty.unparseable == 2


def test_verifiers_are_found_by_name():
    from potstill import verifiers

    assert verifiers.load("exact")("add 1 2", " 3 ", {"answer": 3}) is True
    assert verifiers.load("exact")("add 1 2", "3", {}) is None  # nothing to check against: not a zero
    skillmix_verify = verifiers.load("skillmix")  # registered as a potstill.verifiers entry point
    assert skillmix_verify("shuffle abc", "bca", {"answer": "cab"}) is True


def test_rouge_l_and_bootstrap():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS("a b c d", "a c d e") = 3: precision 3/4, recall 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("x", "y") == 0.0 and rouge_l("", "") == 0.0  # as rouge_score scores it (tests/evaluate/test_rouge.py)
    values = [1.0] * 70 + [0.0] * 30
    low, high = bootstrap_ci(values)
    assert low < 0.7 < high and 0.55 < low and high < 0.85
    assert bootstrap_ci([]) is None


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["run", RECIPE, *tiny_overrides(out), "baseline=null"]) == 0
    return out


@pytest.mark.slow
def test_eval_json_has_the_metrics_and_provenance(trained_run):
    report = json.loads((trained_run / "eval.json").read_text())
    m = report["models"]["student"]
    for key in ("accuracy", "accuracy_ci95", "rouge_l", "agreement", "agreement_ci95", "kl_per_token",
                "top1_agreement", "perplexity_teacher_text", "tokens_per_second", "tokens_per_second_range",
                "latency_ms", "size_bytes",
                "parameters", "weights_sha256"):
        assert m[key] is not None, key
    assert m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1]
    assert len(m["completion_lengths"]) == report["prompts"]["n"] == 48
    assert report["models"]["teacher"]["perplexity_teacher_text"] >= 1.0
    prov = report["provenance"]
    assert prov["versions"]["torch"] and prov["versions"]["rouge-score"]  # ROUGE-L's scorer, as it scored
    assert prov["recipe_sha256"] and prov["seeds"]["train"] == 0
    assert prov["device"] == "cpu"  # device: auto, on a machine without a GPU
    info = json.loads((trained_run / "student" / "potstill.json").read_text())
    assert info["device"] == "cpu" and info["mixed_precision"] == "no" and info["train"]["mixed_precision"] == "auto"
    assert len(report["prompts"]["sha256"]) == 64


@pytest.mark.slow
def test_a_judge_that_talks_nonsense_is_refused_not_scored(trained_run, capsys):
    # the bundled teacher only knows arithmetic: as a judge, none of its replies is a verdict
    args = ["eval", RECIPE, *tiny_overrides(trained_run), "baseline=null", f"eval.judge.path={QUICKSTART / 'teacher'}"]
    assert main(args) == 2
    assert "gave no parseable verdict in 96 replies" in capsys.readouterr().err


def _correctness(text):
    """A judge's rule: the answer the task's verifier accepts is better; both or neither is a tie."""
    prompt, a, b = _parts(text)
    ok_a, ok_b = skillmix.verify(prompt, a), skillmix.verify(prompt, b)
    return "tie" if ok_a == ok_b else ("A" if ok_a else "B")


@pytest.mark.slow
def test_a_judge_behind_an_endpoint_scores_as_the_same_rule_does_here(trained_run, tmp_path, monkeypatch):
    """eval.judge.backend: openai, through the official openai client and potstill's dispatch, to a
    loopback endpoint that judges by the task's verifier: the win rate is what the same rule gives
    in-process, the replies are kept in judge-ledger.sqlite (a rerun sends nothing), and the API
    key reaches no file."""
    from mock_endpoint import MockEndpoint

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    key = "sk-judge-secret-0123456789abcdef"
    monkeypatch.setenv("JUDGE_KEY", key)
    m = MockEndpoint(rule=_correctness).start_in_thread()
    try:
        args = ["eval", RECIPE, *tiny_overrides(run), "baseline=null", "eval.judge.backend=openai",
                "eval.judge.model=judge-model", f"eval.judge.endpoints=[{m.url}]", "eval.judge.api_key_env=JUDGE_KEY"]
        assert main(args) == 0
        sent = len(m.log)
        assert main(args) == 0
        assert len(m.log) == sent == 96  # 48 prompts, both orders, once
    finally:
        m.stop_thread()
    report = json.loads((run / "eval.json").read_text())
    got = report["models"]["student"]["judge"]
    assert got["wins"] + got["losses"] + got["ties"] == 96 and got["unparseable"] == 0 and got["losses"] > 0

    local = tmp_path / "local"  # the same eval with the same rule as an in-process judge
    shutil.copytree(trained_run, local)
    monkeypatch.setattr("potstill.evaluate.run.make_judge", lambda recipe, device: ScriptedJudge(_correctness))
    assert main(["eval", RECIPE, *tiny_overrides(local), "baseline=null",
                 f"eval.judge.path={QUICKSTART / 'teacher'}"]) == 0
    assert json.loads((local / "eval.json").read_text())["models"]["student"]["judge"] == got
    assert report["provenance"]["judge"]["model"] == "judge-model"
    assert report["provenance"]["judge"]["endpoint"] == m.url.rstrip("/")
    for f in run.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
    assert (run / "judge-ledger.sqlite").is_file()


def _http_judge(tmp_path, m, *extra):
    from potstill.evaluate.judge import HTTPJudge
    from potstill.recipe import load_recipe

    return HTTPJudge(load_recipe(RECIPE, [f"output_dir={tmp_path}", "eval.judge.backend=openai",
                                          "eval.judge.model=judge-model", f"eval.judge.endpoints=[{m.url}]", *extra]))


def test_an_endpoint_judge_sends_a_repeated_pair_once_and_counts_failures_apart(tmp_path):
    """Equal answers make the two orders one request: sent once, both votes counted. A request
    that fails for good is left out of the win rate and counted as failed, not unparseable."""
    from mock_endpoint import Faults, MockEndpoint

    m = MockEndpoint(rule=_correctness).start_in_thread()
    try:
        same = judge_pairs(_http_judge(tmp_path / "a", m), ["add 1 2", "add 2 2", "rev ab"], ["3", "5", "ba"],
                           ["3", "5", "ba"], batch_size=6)
        assert len(m.log) == 3 and same.ties == 6 and same.failed == same.unparseable == 0
    finally:
        m.stop_thread()
    m = MockEndpoint(faults=Faults(fatal={"400": 0.5}, sticky=True), rule=_correctness).start_in_thread()
    try:
        prompts = [f"add {i} {i}" for i in range(12)]
        got = judge_pairs(_http_judge(tmp_path / "b", m), prompts, [str(2 * i) for i in range(12)], ["0"] * 12,
                          batch_size=24)
    finally:
        m.stop_thread()
    assert 0 < got.failed < 24 and got.unparseable == 0 and got.parsed + got.failed == 24
    # the candidate is right and "0" wrong (a win in both orders), but for "add 0 0": both right, a tie
    assert got.losses == 0 and got.ties in (0, 2) and got.wins + got.ties == got.parsed


@pytest.mark.slow
def test_an_endpoint_judge_names_its_own_settings(tmp_path, trained_run, capsys):
    from mock_endpoint import MockEndpoint

    m = MockEndpoint(rule=_correctness).start_in_thread()
    try:
        with pytest.raises(PotstillError, match=r"stopped: budget reached: eval\.judge\.budget\.max_requests=2"):
            judge_pairs(_http_judge(tmp_path, m, "eval.judge.budget.max_requests=2"), ["add 1 2", "add 2 2"],
                        ["3", "4"], ["4", "3"], batch_size=4)
    finally:
        m.stop_thread()
    args = ["eval", RECIPE, *tiny_overrides(trained_run), "eval.judge.backend=openai", "eval.judge.model=j",
            f"eval.judge.endpoints=[{m.url}]", "eval.judge.api_key_env=POTSTILL_TEST_UNSET_KEY"]
    assert main(args) == 2
    assert "eval.judge.api_key_env names POTSTILL_TEST_UNSET_KEY, which is not set" in capsys.readouterr().err
    assert main([*args[:-1], "eval.judge.api_key_env=sk-proj-pasted-key-0123"]) == 2
    err = capsys.readouterr().err
    assert "never the key itself" in err and "sk-proj-pasted" not in err


@pytest.mark.slow
def test_an_endpoint_judge_without_model_or_endpoints_is_one_line(trained_run, capsys):
    assert main(["eval", RECIPE, *tiny_overrides(trained_run), "eval.judge.backend=openai"]) == 2
    err = capsys.readouterr().err
    assert "eval.judge.model and eval.judge.endpoints are required for backend openai" in err and "Traceback" not in err


@pytest.mark.slow
def test_student_with_another_chat_template_is_scored_in_its_own(trained_run, tmp_path, capsys):
    """Each model reads the prompt in its own chat template; the teacher's tokens are compared after it."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = json.loads((run / "eval.json").read_text())["models"]["student"]
    config = json.loads((run / "student" / "tokenizer_config.json").read_text())
    (run / "student" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (run / "student" / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["eval", RECIPE, *tiny_overrides(run), "baseline=null"]) == 0
    after = json.loads((run / "eval.json").read_text())["models"]["student"]
    assert after["kl_per_token"] > 0 and after["kl_per_token"] != before["kl_per_token"]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["eval", RECIPE, *tiny_overrides(trained_run), f"eval.prompts={tmp_path / 'empty.jsonl'}"]) == 2
    assert "no prompts in the file" in capsys.readouterr().err


def test_teacher_scored_against_itself_has_zero_kl():
    from potstill.evaluate.run import greedy, score_teacher_text
    from potstill.prompts import load_prompts
    from potstill.hf import LocalModel

    teacher = LocalModel(QUICKSTART / "teacher")
    prompts = load_prompts(str(QUICKSTART / "prompts" / "heldout.jsonl"), 12)
    completions, _ = greedy(teacher, prompts, 12, 5)
    scores = score_teacher_text(teacher, teacher, prompts, completions, batch_size=5)  # uneven last batch
    assert scores["kl_per_token"] == pytest.approx(0, abs=1e-6) and scores["top1_agreement"] == 1.0
    assert scores["perplexity_teacher_text"] >= 1.0


def test_generation_speed_is_warmed_up_repeated_and_shows_its_spread(monkeypatch):
    """tokens/s: an untimed warm-up first, then every batch of the first batch's size timed (a short
    last batch is not), the first batch re-timed up to three timings; the median and its range."""
    from potstill.evaluate.run import greedy
    from potstill.prompts import load_prompts
    from potstill.hf import LocalModel

    teacher = LocalModel(QUICKSTART / "teacher")
    prompts = load_prompts(str(QUICKSTART / "prompts" / "heldout.jsonl"), 20)
    sizes, complete = [], teacher.complete
    monkeypatch.setattr(teacher, "complete", lambda requests, params: sizes.append(len(requests)) or complete(requests, params))
    completions, speed = greedy(teacher, prompts, 12, 8)
    assert sizes == [8, 8, 8, 4, 8] and len(completions) == 20  # warm-up, three batches, one re-timing
    low, high = speed["tokens_per_second_range"]
    assert 0 < low <= speed["tokens_per_second"] <= high


@pytest.mark.slow
def test_lm_eval_adapter_scores_a_local_task(trained_run, tmp_path):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "skillmix.yaml").write_text(f"""task: potstill_skillmix
dataset_path: json
dataset_kwargs:
  data_files:
    test: {QUICKSTART / 'prompts' / 'heldout.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "<|user|>{{{{prompt}}}}<|assistant|>"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|end|>"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    args = ["eval", RECIPE, *tiny_overrides(trained_run), "baseline=null", "eval.lm_eval.tasks=[potstill_skillmix]",
            f"eval.lm_eval.include_path={tasks}", "eval.lm_eval.limit=40"]
    assert main(args) == 0
    models = json.loads((trained_run / "eval.json").read_text())["models"]
    teacher = models["teacher"]["lm_eval"]["potstill_skillmix"]["exact_match,none"]
    student = models["student"]["lm_eval"]["potstill_skillmix"]["exact_match,none"]
    # the harness's exact match on the first 40 held-out prompts (shuffle answers must match the
    # reference permutation here, so the teacher scores below its verifier accuracy)
    assert 0.5 < teacher <= 1.0 and 0.0 <= student < teacher


@pytest.mark.slow
def test_padded_student_vocabulary_trains_and_evaluates(tmp_path):
    """A student with more logit rows than the tokenizer (48 vs 41): KD and eval use the shared rows."""
    out = tmp_path / "run"
    assert main(["run", RECIPE, *tiny_overrides(out), "student.config.vocab_size=48", "baseline=null"]) == 0
    m = json.loads((out / "eval.json").read_text())["models"]["student"]
    assert m["kl_per_token"] > 0 and m["perplexity_teacher_text"] > 1
    # transformers takes two vocabulary sizes for two tokenizers: the draft run goes the universal way
    assert m["acceptance"] is not None and m["draft"]["measured"]["universal"] is True


def test_the_per_byte_gap_reads_each_models_own_tokens():
    """The teacher's answers scored by the teacher in its own ids and re-tokenized from their text
    give the same log-likelihood (its tokenizer spells them back), so its gap is 0 both ways; a
    model that finds every answer less likely has a positive gap per byte."""
    from potstill.evaluate.run import answer_logliks, greedy, kl_per_byte
    from potstill.hf import LocalModel
    from potstill.prompts import load_prompts

    teacher = LocalModel(TEACHER)
    prompts = load_prompts(QUICKSTART / "prompts" / "heldout.jsonl", 6)
    answers, _ = greedy(teacher, prompts, 24, 6)
    own = answer_logliks(teacher, prompts, answers, 4, own_ids=True)
    text = answer_logliks(teacher, prompts, answers, 4)
    assert own == pytest.approx(text, abs=1e-4) and all(x < 0 for x in own)
    assert kl_per_byte(own, text, answers) == pytest.approx(0, abs=1e-5)
    worse = [x - 2.0 for x in own]  # 2 nats less likely on every answer
    n_bytes = sum(len(a.text.encode()) for a in answers)
    assert kl_per_byte(own, worse, answers) == pytest.approx(2.0 * len(answers) / n_bytes)

"""report.html and the model card write every name as text: a run folder, a teacher id, terms or a
skill may hold markup or a `$`, and never becomes a tag, an attribute, a heading or a failed plot."""

import json

from markdown_it import MarkdownIt

from potstill.receipts.card import card_text
from potstill.report import write_report

from helpers import HOSTILE_TEACHER, make_run, parse, student_info

HOSTILE_RUN = "x<svg onload=alert(1)>'\"$"  # a folder name Linux allows


def test_hostile_names_in_the_report_stay_text(tmp_path):
    # "$_$" and "$^$" are mathtext that fails to parse: without escaping, the figure raises
    runs = [make_run(tmp_path / HOSTILE_RUN, skill="$x"), make_run(tmp_path / "cost $^$", skill="$_$")]
    for page in (write_report(runs[0]), write_report(runs, out=tmp_path / "compare.html")):
        html = page.read_text()
        parsed = parse(html)
        assert set(parsed.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table",
                                    "tr", "th", "td", "img", "pre"}
        assert not any(name.startswith("on") for name, _ in parsed.attrs)
        assert all(value.startswith("data:image/png;base64,") for name, value in parsed.attrs if name == "src")
        text = "".join(parsed.text)
        assert HOSTILE_RUN in text and HOSTILE_TEACHER["terms_family"] in text and "</pre><b>x</b>" in text
        assert parsed.tags.count("img") == 3  # the plots were drawn, `$` and all


def test_hostile_teacher_and_name_in_the_card_stay_text():
    card = card_text(student_info(HOSTILE_TEACHER), name=HOSTILE_RUN)
    body = card.split("\n---\n", 1)[1]
    tokens = MarkdownIt("commonmark").enable("table").parse(body)
    assert [t.tag for t in tokens if t.type == "heading_open"] == ["h1", "h2"]  # the card's own: no injected one
    rendered = MarkdownIt("commonmark").enable("table").render(body)
    parsed = parse(rendered)
    assert set(parsed.tags) <= {"h1", "h2", "p", "ul", "li", "strong", "code"}  # no script, img, a, em
    text = " ".join(parsed.text)
    assert HOSTILE_RUN in text and "evil</td><script>alert(1)</script> # Injected heading" in text
    assert "main*bold*" in text and HOSTILE_TEACHER["terms_family"] in text and "javascript:alert(1)" in text
    plain = card_text(student_info({**HOSTILE_TEACHER, "terms_url": "https://example.com/terms_of_use"}))
    assert MarkdownIt("commonmark").render(plain).count('<a href="https://example.com/terms_of_use">') == 1


EVAL = {"prompts": {"n": 48}, "models": {"student": {"accuracy": 0.5, "agreement": 0.25, "kl_per_token": 0.125,
                                                     "parameters": 1000},
                                         "teacher": {"accuracy": 0.75, "parameters": 12000}}}


def test_eval_adds_its_results_to_the_card_train_wrote(tmp_path):
    """Train writes the card; eval's add_results leaves every line of it and appends the results,
    a table whose rows keep their three columns (a `||` in a label would split it)."""
    from huggingface_hub import ModelCard

    from potstill.receipts.card import add_results, write_card

    (tmp_path / "potstill.json").write_text(json.dumps(student_info(HOSTILE_TEACHER)))
    trained = write_card(tmp_path).read_text()
    assert "## Evaluation" not in trained
    evaluated = add_results(tmp_path, EVAL).read_text()
    assert evaluated.startswith(trained) and evaluated[len(trained):].startswith("\n## Evaluation")
    assert ModelCard.load(tmp_path / "README.md").data.to_dict()["distillation"]["examples"] == 8
    tokens = MarkdownIt("commonmark").enable("table").parse(evaluated.split("\n---\n", 1)[1])
    cells = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type in ("th_open", "td_open")]
    rows = [cells[i:i + 3] for i in range(0, len(cells), 3)]
    assert ["KL(teacher || model) per token", "0.125", "-"] in rows and ["parameters", "1,000", "12,000"] in rows


def test_the_summary_shows_each_models_retention_of_the_teachers_accuracy(capsys):
    from potstill.cli import print_summary

    def model(accuracy):
        return {"accuracy": accuracy, "agreement": 0.5, "kl_per_token": 0.4, "top1_agreement": 0.8,
                "parameters": 1000, "tokens_per_second": 10.0}
    report = {"prompts": {"n": 3}, "models": {"teacher": model(0.8), "student": model(0.6), "baseline": model(0.2)}}
    print_summary(report)
    lines = capsys.readouterr().out.replace("┃", "│").splitlines()  # rich draws the header with heavy bars
    rows = {line.split("│")[1].strip(): line for line in lines if line.count("│") > 2}
    assert "retention" in rows["model"]
    assert "100.0%" in rows["teacher"] and "75.0%" in rows["student"] and "25.0%" in rows["baseline"]


def test_the_judge_column_counts_what_it_left_out(tmp_path):
    """Unparseable replies always, and requests an endpoint judge failed for good when there were any."""
    run = make_run(tmp_path / "run", skill="sort")
    report = json.loads((run / "eval.json").read_text())
    report["models"]["student"]["judge"] = {"win_rate_vs_teacher": 0.25, "wins": 1, "losses": 3, "ties": 0,
                                            "unparseable": 1, "failed": 2, "win_rate_ci95": [0.0, 0.6]}
    (run / "eval.json").write_text(json.dumps(report))
    text = "".join(parse(write_report(run).read_text()).text)
    assert "25.0% (1 unparseable, 2 failed)" in text


def test_each_model_keeps_its_colour_and_on_policy_ce_is_not_called_teacher_tokens(tmp_path, monkeypatch):
    """The KD term (the student's alone) is drawn in the student's colour, not the baseline's; the
    'cross-entropy on teacher tokens' curve leaves out on-policy steps (their CE is on the student's
    own samples) and says how many; the tok/s cell shows the measured range."""
    import matplotlib.pyplot as plt

    run = make_run(tmp_path / "run", skill="sort")
    report = json.loads((run / "eval.json").read_text())
    report["models"]["baseline"] = report["models"]["student"]
    report["models"]["student"] = {**report["models"]["student"], "tokens_per_second": 5021.0,
                                   "tokens_per_second_range": [4800.0, 5100.0]}
    (run / "eval.json").write_text(json.dumps(report))
    rows = [{"step": s, "loss": 1.0, "kd": 0.5, "ce": 2.0 + s, "on_policy": s == 2} for s in (1, 2, 3)]
    (run / "logs" / "student.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "logs" / "baseline.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0, "ce": 2.0}) + "\n"
                                                         for s in (1, 2, 3)))
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or close(fig))
    text = "".join(parse(write_report(run).read_text()).text)
    assert "5,021 (4,800-5,100)" in text
    curves = {ax.get_title().split("\n")[0]: ax for ax in figures[0].axes}
    colour = {line.get_label(): line.get_color() for line in curves["training loss"].lines}
    assert colour["student"] != colour["baseline"]
    assert [line.get_color() for line in curves["KD term (x T^2)"].lines] == [colour["student"]]
    ce = curves["cross-entropy on teacher tokens"]
    student_ce = next(line for line in ce.lines if line.get_label() == "student")
    assert list(student_ce.get_xdata()) == [1, 3] and "1 on-policy step left out" in ce.get_title()


def test_the_report_says_why_each_generate_session_stopped(tmp_path):
    """The ledger's sessions under the students and teachers: finished, stopped early (and why, as
    text even when an endpoint's message holds markup), or never recorded as ended."""
    from potstill.ledger import Ledger

    run = make_run(tmp_path / "run", skill="sort")
    with Ledger(run / "ledger.sqlite") as ledger:
        for stopped in (None, "http://x/v1: 5 requests in a row refused, the last with HTTP 400: <script>alert(1)</script>"):
            ledger.end_session(ledger.start_session("ab" * 32), stopped)
        ledger.start_session("ab" * 32)  # killed: never ended
    html = write_report(run).read_text()
    parsed = parse(html)
    assert "script" not in parsed.tags
    text = "".join(parsed.text)
    assert "how it ended" in text and "finished" in text
    assert "stopped: http://x/v1: 5 requests in a row refused, the last with HTTP 400: <script>alert(1)</script>" in text
    assert "not recorded (killed" in text
    assert text.index("how it ended") > text.index("teachers (terms)")  # beside the students and teachers

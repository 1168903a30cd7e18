"""`potstill report` shows a run's audit.json as an Audit section, as text, and none without it."""

import json

from potstill.report import write_report

from helpers import make_run, parse


def test_report_shows_the_audit_section_when_present(tmp_path):
    run = make_run(tmp_path / "run", skill="add")
    assert "Audit" not in parse(write_report(run).read_text()).text
    verdicts = [{"test": "radioactivity (sampling)", "target": "sha256:<b>0123</b>", "statistic": "90/300 green",
                 "p_value": 3.2e-9, "tokens": 300, "flagged": True},
                {"test": "lineage", "target": "suspect/", "statistic": "match 0.4", "p_value": 0.3, "tokens": None,
                 "flagged": False}]
    (run / "audit.json").write_text(json.dumps({"verdicts": verdicts, "caveats": ["results are evidence, not proof"]}))
    page = parse(write_report(run).read_text())
    text = "".join(page.text)
    assert "Audit" in page.text and "sha256:<b>0123</b>" in text and "b" not in page.tags
    assert "3.2e-09" in text and "FLAGGED" in text and "not flagged" in text and "Results are evidence" in text

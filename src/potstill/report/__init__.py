"""The report stage: runs' eval.json and training logs -> report.html, from ``templates/``."""

from potstill.report.page import COLUMNS, summary_rows, write_report

__all__ = ["COLUMNS", "summary_rows", "write_report"]

"""Figures and a Markdown report from results files (``hpcqml report``).

Each figure is one function of :mod:`hpcqml.report.figures` that reads what it needs from
an open results file and either draws a PNG or says why it skipped (the file lacks the
groups). :func:`make_report` draws all that exist and writes ``report.md`` with the key
numbers and their provenance.
"""
from hpcqml.report.build import ReportSummary, add_arguments, cli_main, make_report

__all__ = ["ReportSummary", "add_arguments", "cli_main", "make_report"]

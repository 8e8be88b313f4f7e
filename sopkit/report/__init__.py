"""Comparison reports: a terminal table, ``report.md``, a self-contained ``report.html``, the
figures, and ``summary.json`` / ``summary.csv``, all drawn from the groups that
:func:`sopkit.experiment.results.aggregate` makes.

The reports follow the paper's protocol (Section 5.1): every strategy's learning rate is chosen on
validation accuracy, test accuracy at that rate is reported as mean ± std over seeds, and Table 1's
layout puts models × strategies in rows and one accuracy column per optimizer. Next to that they
show what the paper leaves out and a reader needs to judge a method: the paired difference against
``baseline`` with its 95% interval, the cost (step time, parameters, wall time), every diverged
trial, and how the numbers were produced.

Where things are:

* :mod:`~sopkit.report.tables`: the :class:`Table` model (shared with ``sopkit bench``) and every
  table a comparison shows, built once and rendered by :mod:`~sopkit.report.terminal` (rich),
  :mod:`~sopkit.report.markdown` and :mod:`~sopkit.report.html`;
* :mod:`~sopkit.report.format`: numbers to text; :mod:`~sopkit.report.colours`: a colour and
  marker per strategy;
* :mod:`~sopkit.report.figures` (and :mod:`~sopkit.report.labels`): the figures;
* :mod:`~sopkit.report.meta`: how the results were produced (command, grid, provenance);
* :mod:`~sopkit.report.summary`: summary.json and summary.csv;
* :mod:`~sopkit.report.build`: :func:`write_all` and :func:`regenerate`, which ``sopkit compare``
  and ``sopkit report`` share.

Importing this package imports neither torch nor matplotlib.
"""

from __future__ import annotations

from sopkit.report.build import regenerate, write_all
from sopkit.report.html import render_html, write_html
from sopkit.report.markdown import render_markdown, write_markdown
from sopkit.report.meta import ReportMeta
from sopkit.report.summary import write_summary
from sopkit.report.tables import Cell, Table
from sopkit.report.terminal import print_report

__all__ = [
    "Cell",
    "ReportMeta",
    "Table",
    "print_report",
    "regenerate",
    "render_html",
    "render_markdown",
    "write_all",
    "write_html",
    "write_markdown",
    "write_summary",
]

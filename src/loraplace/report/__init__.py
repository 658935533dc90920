"""``loraplace report``: from stored study folders to tables (Markdown, CSV, LaTeX), figures
(PNG 300 dpi + SVG), ``report.md`` and a self-contained ``report.html``.

Everything is computed from the stored files (results.json and each run's folder); nothing is
re-run. Several study folders merge into one comparison; arms whose eval sets are identical are
compared pairwise, others side by side. The steps: :mod:`~loraplace.report.load` (read the
folders), :mod:`~loraplace.report.analysis` (arms, groups, the significance rule),
:mod:`~loraplace.report.stats`, :mod:`~loraplace.report.pareto`, :mod:`~loraplace.report.tables`,
:mod:`~loraplace.report.figures`, :mod:`~loraplace.report.recommend`,
:mod:`~loraplace.report.perplexity`, :mod:`~loraplace.report.doc` (Markdown/HTML/LaTeX),
:mod:`~loraplace.report.sections` (the report's sections in order, each ``section(ctx) -> Part``
over one :class:`~loraplace.report.context.ReportContext`; the automatic-placement ones in
:mod:`~loraplace.report.auto`) and :mod:`~loraplace.report.write` (all of it into one folder). :mod:`~loraplace.report.fmt` formats
numbers for every table, ``results.md`` included; ``write_report`` loads on first use, so that
formatting stays light.
"""

from importlib import import_module

__all__ = ["write_report", "default_report_dir"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("loraplace.report.write"), name)
    raise AttributeError(f"module 'loraplace.report' has no attribute {name!r}")

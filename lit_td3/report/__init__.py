"""lit_td3.report: read a run's TensorBoard scalars, summarize them, decide GO/NO-GO.

The public API (also behind ``python -m lit_td3.report``):

- ``load_run(run_dir) -> Run``: every scalar of a run, by tag, as numpy
  step/value arrays (event files merged; a re-logged step keeps the later write).
- ``summarize(run) -> dict``: per-tag statistics (``summary_table`` renders them).
- ``load_criteria(path=None) -> list[Criterion]``: a validated criteria file.
- ``evaluate(criteria, run) -> list[Verdict]``, ``decide(verdicts) -> Decision`` and
  ``explain(verdict) -> str``.
- ``compare(baseline, candidate, criteria, output_dir) -> Decision``: the whole
  A/B report, written atomically.
- ``plot_specs(runs) / make_figure(spec, runs)``: the report's figures, for notebooks.

This package only reads runs; it never imports the trainer.
"""

from lit_td3.report.comparison import compare
from lit_td3.report.criteria import (
    COMPARISONS,
    Criterion,
    Verdict,
    default_criteria_path,
    evaluate,
    load_criteria,
)
from lit_td3.report.decision import Decision, decide, explain
from lit_td3.report.errors import ReportInputError
from lit_td3.report.events import Run, Series, load_run
from lit_td3.report.markdown import summary_table
from lit_td3.report.plots import (
    ALERT_THRESHOLDS,
    GROUPS,
    PlotSpec,
    make_figure,
    plot_specs,
)
from lit_td3.report.stats import STATISTICS, summarize

__all__ = [
    "ALERT_THRESHOLDS",
    "COMPARISONS",
    "GROUPS",
    "STATISTICS",
    "Criterion",
    "Decision",
    "PlotSpec",
    "ReportInputError",
    "Run",
    "Series",
    "Verdict",
    "compare",
    "decide",
    "default_criteria_path",
    "evaluate",
    "explain",
    "load_criteria",
    "load_run",
    "make_figure",
    "plot_specs",
    "summarize",
    "summary_table",
]

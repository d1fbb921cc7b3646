"""The A/B comparison: judge a candidate run on the criteria, beside a baseline,
and write ``report.md`` with its PNG plots.

Everything that can fail on bad input (criteria, runs, required tags, the
output path) is checked before anything is written; the files are then built
in a staging folder beside the output folder and moved into place, so a
failure never leaves a half-written report. An existing output folder keeps
its other files; ours are replaced one by one, ``report.md`` last.

This module never decides what a criterion means (criteria.py) or how a plot
looks (plots.py).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from lit_td3.report.criteria import (
    Criterion,
    default_criteria_path,
    evaluate,
    load_criteria,
)
from lit_td3.report.decision import Decision, decide
from lit_td3.report.errors import ReportInputError
from lit_td3.report.events import Run, load_run
from lit_td3.report.markdown import render_report
from lit_td3.report.plots import DPI, make_figure, plot_specs
from lit_td3.report.stats import summarize

REPORT_NAME = "report.md"
BASELINE = "baseline"
CANDIDATE = "candidate"


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def _as_criteria(
    criteria: Sequence[Criterion] | str | Path | None,
) -> tuple[list[Criterion], str]:
    if criteria is None or isinstance(criteria, (str, Path)):
        path = default_criteria_path() if criteria is None else Path(criteria)
        return load_criteria(path), str(path)
    return list(criteria), "criteria passed in by the caller"


def compare(
    baseline: Run | str | Path,
    candidate: Run | str | Path,
    criteria: Sequence[Criterion] | str | Path | None,
    output_dir: str | Path,
) -> Decision:
    """Judge ``candidate`` (and ``baseline``, for comparison); write ``output_dir``.

    ``criteria`` is a list of Criterion, a criteria YAML path, or None for the
    packaged go_no_go.yaml. Raises ReportInputError, before writing anything,
    for a missing or empty run, a bad criteria file, a required tag the
    candidate lacks, or an output path that is an existing file.
    """
    criteria_list, criteria_source = _as_criteria(criteria)
    runs = {BASELINE: _as_run(baseline), CANDIDATE: _as_run(candidate)}
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ReportInputError(f"output {str(output)!r} exists and is not a directory.")
    decision = decide(
        evaluate(criteria_list, runs[CANDIDATE]),
        evaluate(criteria_list, runs[BASELINE], strict=False),
    )
    summaries = {label: summarize(run) for label, run in runs.items()}
    specs = plot_specs(list(runs.values()))

    def build(staging: Path) -> None:
        figures = [(spec, staging / spec.filename) for spec in specs]
        for spec, path in figures:
            make_figure(spec, runs).savefig(path, dpi=DPI)
        text = render_report(decision, runs, summaries, figures, criteria_source)
        (staging / REPORT_NAME).write_text(text, encoding="utf-8")

    _publish(output, build, last=REPORT_NAME)
    return replace(
        decision,
        report_path=output / REPORT_NAME,
        figures=tuple(output / spec.filename for spec in specs),
    )


def _publish(output: Path, build: Callable[[Path], None], last: str) -> None:
    """Run ``build`` in a staging folder beside ``output``, then move its files in."""
    output.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the moves below are renames on one filesystem.
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        build(staging)
        if not output.exists():
            staging.rename(output)
            return
        # The report goes last so it never links a plot that is not there yet.
        for name in sorted(
            (p.name for p in staging.iterdir()), key=lambda n: (n == last, n)
        ):
            os.replace(staging / name, output / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

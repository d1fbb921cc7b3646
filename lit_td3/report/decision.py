"""Turning the candidate's verdicts into the GO/NO-GO decision and its reasons.

GO means every blocking criterion passed (an optional criterion whose tag is
absent counts as n/a, not as a failure) and at least one blocking criterion
was judged. Failed non-blocking criteria and n/a
criteria never change the decision; they are listed as warnings.

This module never reads runs or writes files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lit_td3.report.criteria import Verdict
from lit_td3.report.errors import ReportInputError

EXIT_GO = 0
EXIT_NO_GO = 1
EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Decision:
    """GO/NO-GO for the candidate run, the verdicts behind it, and what was written."""

    go: bool
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]
    verdicts: tuple[Verdict, ...]
    baseline_verdicts: tuple[Verdict, ...]
    report_path: Path | None = None
    figures: tuple[Path, ...] = ()

    @property
    def label(self) -> str:
        return "GO" if self.go else "NO-GO"

    @property
    def exit_code(self) -> int:
        return EXIT_GO if self.go else EXIT_NO_GO


def explain(verdict: Verdict) -> str:
    """One line: the criterion, what was measured and what it needed."""
    criterion = verdict.criterion
    if verdict.value is None:
        return f"{criterion.name}: n/a ({verdict.note}: {criterion.tag})"
    return (
        f"{criterion.name}: {criterion.statistic}({criterion.tag}) "
        f"= {verdict.value:.4g}, "
        f"needs {criterion.comparison} {criterion.threshold:g}"
    )


def decide(
    verdicts: Sequence[Verdict], baseline_verdicts: Sequence[Verdict] = ()
) -> Decision:
    """GO when no blocking verdict failed and at least one was judged."""
    blocking = [v for v in verdicts if v.criterion.blocking]
    failed = [v for v in blocking if v.status == "fail"]
    judged = [v for v in blocking if v.status != "n/a"]
    if not judged:
        # A GO that no criterion could have stopped would be no decision at all.
        raise ReportInputError(
            "no blocking criterion could be judged on the candidate (none in the "
            "criteria file, or all of their optional tags are absent); nothing "
            "supports a GO."
        )
    warnings = [
        explain(v)
        for v in verdicts
        if v.status == "n/a" or (v.status == "fail" and not v.criterion.blocking)
    ]
    reasons = (
        [explain(v) for v in failed]
        if failed
        else [f"all {len(judged)} judged blocking criteria pass"]
    )
    return Decision(
        go=not failed,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
        verdicts=tuple(verdicts),
        baseline_verdicts=tuple(baseline_verdicts),
    )

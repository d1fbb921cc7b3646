"""Markdown text of the report tool: the per-tag summary table and the compare report.

Pure string building from values computed elsewhere. This module never reads
runs, computes statistics of its own, or writes files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from lit_td3.report.criteria import Verdict
from lit_td3.report.decision import Decision
from lit_td3.report.events import Run
from lit_td3.report.plots import GROUPS, PlotSpec
from lit_td3.report.stats import STATISTICS, SUMMARY_STATISTICS


def number(value: float | None) -> str:
    """A compact number for tables: 4 significant digits, integers kept whole."""
    if value is None:
        return "n/a"
    if math.isfinite(value) and value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    """The ``summarize`` result as one Markdown table, a row per tag."""
    columns = ("first_step", "last_step", *SUMMARY_STATISTICS)
    rows = [
        [f"`{tag}`", *(number(stats[c]) for c in columns)]
        for tag, stats in summary.items()
    ]
    notes = [
        f"- `{name}`: {STATISTICS[name].definition}" for name in SUMMARY_STATISTICS
    ]
    return "\n".join([*_table(["tag", *columns], rows), "", *notes]) + "\n"


def _verdict_cell(verdict: Verdict) -> str:
    if verdict.status == "n/a":
        return f"n/a ({verdict.note})"
    return number(verdict.value)


def _criteria_rows(decision: Decision) -> list[list[str]]:
    baseline = {v.criterion.name: v for v in decision.baseline_verdicts}
    rows = []
    for verdict in decision.verdicts:
        criterion = verdict.criterion
        base = baseline.get(criterion.name)
        base_cell = "" if base is None else f"{_verdict_cell(base)} ({base.status})"
        result = verdict.status.upper() if verdict.status != "n/a" else "n/a"
        threshold = number(criterion.threshold)
        rows.append(
            [
                criterion.name,
                f"`{criterion.tag}`",
                f"{criterion.statistic} {criterion.comparison} {threshold}",
                "yes" if criterion.blocking else "no",
                _verdict_cell(verdict),
                base_cell,
                f"**{result}**" if verdict.status == "fail" else result,
            ]
        )
    return rows


def _run_rows(runs: Mapping[str, Run]) -> list[list[str]]:
    rows = []
    for label, run in runs.items():
        first, last = run.step_range
        rows.append(
            [
                label,
                f"`{run.run_dir}`",
                str(len(run.event_files)),
                f"{first}-{last}",
                str(len(run.tags)),
            ]
        )
    return rows


def _tag_rows(
    runs: Mapping[str, Run], summaries: Mapping[str, Mapping[str, Mapping[str, float]]]
) -> list[list[str]]:
    tags = sorted(set().union(*(run.scalars for run in runs.values())))
    rows = []
    for tag in tags:
        row = [f"`{tag}`"]
        for label in runs:
            stats = summaries[label].get(tag)
            row += (
                ["absent", "absent"]
                if stats is None
                else [number(stats["mean"]), number(stats["last_window_mean"])]
            )
        rows.append(row)
    return rows


def render_report(
    decision: Decision,
    runs: Mapping[str, Run],
    summaries: Mapping[str, Mapping[str, Mapping[str, float]]],
    figures: Sequence[tuple[PlotSpec, Path]],
    criteria_source: str,
) -> str:
    """The compare report: decision, reasons, runs, criteria, plots, per-tag means."""
    used_statistics = sorted({v.criterion.statistic for v in decision.verdicts})
    lines = [
        f"# GO/NO-GO report: **{decision.label}**",
        "",
        f"Decision for the 1M-step run: **{decision.label}**.",
        "",
        "Reasons:",
        *(f"- {reason}" for reason in decision.reasons),
    ]
    if decision.warnings:
        lines += [
            "",
            "Warnings (do not change the decision):",
            *(f"- {w}" for w in decision.warnings),
        ]
    lines += [
        "",
        "## Runs",
        "",
        *_table(
            ["run", "directory", "event files", "env steps", "tags"], _run_rows(runs)
        ),
    ]
    lines += [
        "",
        "## Criteria",
        "",
        (f"From `{criteria_source}`. Measured values are the candidate's; "
         "the baseline's are beside them for comparison."),
        "",
        *_table(
            ["criterion", "tag", "rule", "blocking", "candidate", "baseline", "result"],
            _criteria_rows(decision),
        ),
        "",
        *(
            f"- **{v.criterion.name}**: {' '.join(v.criterion.description.split())}"
            for v in decision.verdicts
        ),
        "",
        "Statistics:",
        *(f"- `{name}`: {STATISTICS[name].definition}" for name in used_statistics),
    ]
    lines += ["", "## Plots"]
    for group in GROUPS:
        in_group = [(spec, path) for spec, path in figures if spec.group == group]
        if in_group:
            lines += ["", f"### {group.replace('_', ' ')}", ""]
            lines += [f"![{spec.title}]({path.name})" for spec, path in in_group]
    labels = list(runs)
    header = [
        "tag",
        *(
            f"{label} {stat}"
            for label in labels
            for stat in ("mean", "last-window mean")
        ),
    ]
    lines += ["", "## All tags", "", *_table(header, _tag_rows(runs, summaries))]
    return "\n".join(lines) + "\n"

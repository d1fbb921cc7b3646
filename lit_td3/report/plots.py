"""Figures of a run (or of a baseline beside a candidate), one small figure per spec.

A ``PlotSpec`` names the tags drawn on one axes, the y scale and any
horizontal threshold lines. ``plot_specs`` lists the specs that apply to the
given runs (a spec whose tags no run has is left out), grouped as gradients,
losses, Q values and episodes; ``make_figure`` draws one. Figures are built
with matplotlib's object API (no pyplot), so nothing here touches global
backend state; PNGs are rendered by Agg.

This module never reads event files and never judges a run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lit_td3.report.events import Run

FIGSIZE_INCHES = (8.0, 4.5)
DPI = 100
# The alert levels of the original report (section 2.2): an update whose
# pre-clip gradient norm exceeds these counts as a warning / critical alert.
ALERT_THRESHOLDS: dict[str, float] = {"warning (10K)": 1e4, "critical (100K)": 1e5}
_THRESHOLD_LINESTYLES = (":", "--")
GROUPS = ("gradients", "losses", "q_values", "episodes")
_LINESTYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class PlotSpec:
    """What one figure shows."""

    group: str
    title: str
    tags: tuple[str, ...]
    yscale: str = "linear"
    thresholds: tuple[tuple[str, float], ...] = ()

    @property
    def filename(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", self.title).strip("_").lower() + ".png"


def _gradient_specs(tags: set[str]) -> list[PlotSpec]:
    norm_tags = sorted(
        t for t in tags if re.fullmatch(r"gradients/\w+_norm(_clipped)?", t)
    )
    specs = [
        PlotSpec(
            "gradients",
            tag,
            (tag,),
            "log",
            () if tag.endswith("_clipped") else tuple(ALERT_THRESHOLDS.items()),
        )
        for tag in norm_tags
    ]
    return [
        *specs,
        PlotSpec(
            "gradients",
            "gradient clip fraction",
            ("gradients/actor_clip_fraction", "gradients/critic_clip_fraction"),
        ),
        PlotSpec(
            "gradients",
            "alert counts",
            (
                "alerts/gradient_warning",
                "alerts/gradient_critical",
                "alerts/nonfinite_steps",
            ),
        ),
    ]


_FIXED_SPECS = (
    # Actor loss is -Q and can run from -1 to -1e6 when it diverges: symlog
    # keeps both the healthy and the exploded run readable on one axes.
    PlotSpec("losses", "actor loss", ("train/actor_loss",), "symlog"),
    PlotSpec("losses", "critic loss", ("train/critic_loss",), "log"),
    PlotSpec("q_values", "Q1 and Q2", ("train/q1", "train/q2")),
    PlotSpec("q_values", "twin critic gap |Q1-Q2|", ("train/q_gap",)),
    PlotSpec("episodes", "episode return", ("rollout/episode_return", "eval/return")),
    PlotSpec(
        "episodes", "episode length", ("rollout/episode_length", "eval/episode_length")
    ),
)


def plot_specs(runs: Sequence[Run], group: str | None = None) -> list[PlotSpec]:
    """The specs with a tag present in one of ``runs``, optionally of one group."""
    tags: set[str] = set().union(*(run.scalars for run in runs))
    specs = _gradient_specs(tags) + list(_FIXED_SPECS)
    return [
        spec
        for spec in specs
        if (group is None or spec.group == group)
        and any(tag in tags for tag in spec.tags)
    ]


def make_figure(spec: PlotSpec, runs: Mapping[str, Run]) -> Figure:
    """One figure for ``spec``: every present tag of every run (labelled by its key)."""
    figure = Figure(figsize=FIGSIZE_INCHES, dpi=DPI)
    # Fixed margins: a layout engine costs a second draw per figure.
    figure.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.11)
    axes = figure.add_subplot()
    for color_index, (label, run) in enumerate(runs.items()):
        for tag_index, tag in enumerate(spec.tags):
            if tag in run:
                _draw_series(axes, run, tag, f"{label}: {tag}", color_index, tag_index)
    for index, (name, level) in enumerate(spec.thresholds):
        linestyle = _THRESHOLD_LINESTYLES[index % len(_THRESHOLD_LINESTYLES)]
        axes.axhline(
            level,
            color="red",
            linewidth=0.8,
            linestyle=linestyle,
            label=f"alert {name}",
        )
    _set_yscale(axes, spec.yscale)
    axes.set_title(spec.title)
    axes.set_xlabel("env step")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def _draw_series(
    axes: Axes, run: Run, tag: str, label: str, color_index: int, tag_index: int
) -> None:
    series = run[tag]
    axes.plot(
        series.steps,
        series.values,
        label=label,
        color=f"C{color_index}",
        linestyle=_LINESTYLES[tag_index % len(_LINESTYLES)],
        linewidth=1.0,
    )


def _set_yscale(axes: Axes, yscale: str) -> None:
    # A log axis with no positive data (e.g. a norm that stayed 0) draws
    # nothing and warns; fall back to linear so the flat line is still seen.
    if yscale == "log" and not any(
        np.any(np.asarray(line.get_ydata()) > 0) for line in axes.get_lines()
    ):
        return
    axes.set_yscale(yscale)

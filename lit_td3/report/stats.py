"""Statistics of one scalar series, by name: the vocabulary that criteria use.

Every statistic takes a ``Series`` (env steps ascending) and returns a float;
NaN means "cannot be computed" (too few points, or non-finite values in the
series) and makes any criterion on it fail. The window statistics cut the
series, in step order, into ``N_WINDOWS`` windows of (nearly) equal point
count (fewer when the series has fewer points), so "first window" and "last
window" are the first and last tenth of what was logged.

This module never reads files and never decides pass/fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lit_td3.report.events import Run, Series

N_WINDOWS = 10
STEPS_PER_SLOPE_UNIT = 1_000


@dataclass(frozen=True)
class Statistic:
    """A named statistic and the one-line definition shown in reports."""

    name: str
    definition: str
    compute: Callable[[Series], float]


def _windows(series: Series) -> list[np.ndarray]:
    return np.array_split(series.values, min(N_WINDOWS, len(series)))


def _window_means(series: Series) -> np.ndarray:
    return np.array([w.mean() for w in _windows(series)])


def _first_window_mean(series: Series) -> float:
    return float(_windows(series)[0].mean())


def _last_window_mean(series: Series) -> float:
    return float(_windows(series)[-1].mean())


def _window_change(series: Series) -> float:
    return _last_window_mean(series) - _first_window_mean(series)


def _trend_slope(series: Series) -> float:
    """Least-squares slope of value against env step, per 1,000 env steps."""
    steps = series.steps.astype(np.float64)
    if len(steps) < 2 or np.ptp(steps) == 0:
        return float("nan")
    centred = steps - steps.mean()
    slope = np.dot(centred, series.values - series.values.mean()) / np.dot(
        centred, centred
    )
    return float(slope * STEPS_PER_SLOPE_UNIT)


def _rise_fraction(series: Series) -> float:
    """Fraction of consecutive window means that go up."""
    means = _window_means(series)
    if len(means) < 2 or not np.all(np.isfinite(means)):
        return float("nan")
    return float(np.mean(np.diff(means) > 0))


def _last_window_growth(series: Series) -> float:
    """Mean |value| of the last window divided by that of the window before it."""
    windows = _windows(series)
    if len(windows) < 2:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.abs(windows[-1]).mean() / np.abs(windows[-2]).mean())


def _nonfinite_count(series: Series) -> float:
    return float(np.count_nonzero(~np.isfinite(series.values)))


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic("count", "number of points logged", lambda s: float(len(s))),
        Statistic(
            "nonfinite_count", "number of NaN or infinite values", _nonfinite_count
        ),
        Statistic("first", "first value logged", lambda s: float(s.values[0])),
        Statistic("last", "last value logged", lambda s: float(s.values[-1])),
        Statistic("min", "smallest value", lambda s: float(s.values.min())),
        Statistic("max", "largest value", lambda s: float(s.values.max())),
        Statistic("mean", "mean of all values", lambda s: float(s.values.mean())),
        Statistic(
            "median", "median of all values", lambda s: float(np.median(s.values))
        ),
        Statistic(
            "abs_max", "largest |value|", lambda s: float(np.abs(s.values).max())
        ),
        Statistic(
            "first_window_mean",
            f"mean of the first 1/{N_WINDOWS} of the points",
            _first_window_mean,
        ),
        Statistic(
            "last_window_mean",
            f"mean of the last 1/{N_WINDOWS} of the points",
            _last_window_mean,
        ),
        Statistic(
            "window_change", "last-window mean minus first-window mean", _window_change
        ),
        Statistic(
            "trend_slope",
            f"least-squares slope of value vs env step, "
            f"per {STEPS_PER_SLOPE_UNIT:,} env steps",
            _trend_slope,
        ),
        Statistic(
            "rise_fraction",
            f"fraction of the {N_WINDOWS - 1} steps between consecutive "
            "window means that rise",
            _rise_fraction,
        ),
        Statistic(
            "last_window_growth",
            "mean |value| of the last window / mean |value| of the window before it",
            _last_window_growth,
        ),
    )
}

SUMMARY_STATISTICS = (
    "count",
    "nonfinite_count",
    "mean",
    "median",
    "min",
    "max",
    "first_window_mean",
    "last_window_mean",
    "trend_slope",
)


def compute(statistic: str, series: Series) -> float:
    """The value of the named statistic on ``series`` (KeyError for an unknown name)."""
    return STATISTICS[statistic].compute(series)


def summarize(run: Run) -> dict[str, dict[str, float]]:
    """Per tag, the summary statistics plus the first and last env step logged."""
    return {
        tag: {
            "first_step": float(run[tag].steps[0]),
            "last_step": float(run[tag].steps[-1]),
            **{name: compute(name, run[tag]) for name in SUMMARY_STATISTICS},
        }
        for tag in run.tags
    }

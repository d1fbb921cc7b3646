"""GO/NO-GO criteria: loading them from YAML and judging a run against them.

A criterion is data (see configs/criteria/go_no_go.yaml): a statistic of one
tag, compared with a threshold. Loading validates every field up front so a
typo is reported before any run is read; judging turns each criterion into a
``Verdict`` (pass, fail, or n/a when an optional tag is absent).

This module never reads event files and never writes anything.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from lit_td3.report.errors import ReportInputError
from lit_td3.report.events import Run
from lit_td3.report.stats import STATISTICS, compute

COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}
PACKAGED_CRITERIA = "go_no_go.yaml"
_REPO_CRITERIA = (
    Path(__file__).resolve().parents[2] / "configs" / "criteria" / PACKAGED_CRITERIA
)

Status = Literal["pass", "fail", "n/a"]


@dataclass(frozen=True)
class Criterion:
    """One check: ``statistic(tag) <comparison> threshold``."""

    name: str
    tag: str
    statistic: str
    comparison: str
    threshold: float
    description: str
    blocking: bool = True
    required: bool = True


@dataclass(frozen=True)
class Verdict:
    """One criterion judged on one run; ``value`` is None when the tag is absent."""

    criterion: Criterion
    status: Status
    value: float | None
    note: str


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "tag": (str,),
    "statistic": (str,),
    "comparison": (str,),
    "threshold": (int, float),
    "description": (str,),
    "blocking": (bool,),
    "required": (bool,),
}
_OPTIONAL_FIELDS = {"blocking", "required"}


def default_criteria_path() -> Path:
    """The repo's configs/criteria/go_no_go.yaml, else the package's own copy."""
    if _REPO_CRITERIA.is_file():
        return _REPO_CRITERIA
    return Path(str(resources.files("lit_td3.report").joinpath(PACKAGED_CRITERIA)))


def load_criteria(path: str | Path | None = None) -> list[Criterion]:
    """Read and validate a criteria file (the packaged one when ``path`` is None)."""
    source = Path(path) if path is not None else default_criteria_path()
    try:
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as error:
        raise ReportInputError(
            f"criteria file {str(source)!r} cannot be read: {error}."
        ) from error
    except yaml.YAMLError as error:
        raise ReportInputError(
            f"criteria file {str(source)!r} is not valid YAML: {error}"
        ) from error
    entries = _criteria_list(document, source)
    criteria = [
        _criterion(entry, index, source) for index, entry in enumerate(entries, start=1)
    ]
    _reject_duplicate_names(criteria, source)
    return criteria


def _criteria_list(document: Any, source: Path) -> list[Any]:
    if not isinstance(document, dict) or set(document) != {"criteria"}:
        found = (
            sorted(document) if isinstance(document, dict) else type(document).__name__
        )
        raise ReportInputError(
            f"criteria file {str(source)!r} must be a mapping with the single key "
            "'criteria'; "
            f"found {found}."
        )
    entries = document["criteria"]
    if not isinstance(entries, list) or not entries:
        raise ReportInputError(
            f"criteria file {str(source)!r}: 'criteria' must be a non-empty list "
            "of criteria."
        )
    return entries


def _criterion(entry: Any, index: int, source: Path) -> Criterion:
    where = f"criteria file {str(source)!r}, criterion #{index}"
    if not isinstance(entry, dict):
        raise ReportInputError(f"{where} must be a mapping of fields, got {entry!r}.")
    if isinstance(entry.get("name"), str):
        where += f" ({entry['name']})"
    unknown = sorted(set(entry) - set(_FIELD_TYPES))
    missing = sorted(set(_FIELD_TYPES) - _OPTIONAL_FIELDS - set(entry))
    if unknown or missing:
        raise ReportInputError(
            f"{where}: unknown field(s) {unknown}, missing field(s) {missing}; "
            f"the fields are {sorted(_FIELD_TYPES)} "
            "(blocking and required default to true)."
        )
    for key, value in entry.items():
        _check_type(where, key, value)
    _check_known(where, "statistic", entry["statistic"], STATISTICS)
    _check_known(where, "comparison", entry["comparison"], COMPARISONS)
    if not math.isfinite(entry["threshold"]):
        raise ReportInputError(
            f"{where}: field 'threshold' must be finite, got {entry['threshold']!r}."
        )
    return Criterion(**{**entry, "threshold": float(entry["threshold"])})


def _check_type(where: str, key: str, value: Any) -> None:
    types = _FIELD_TYPES[key]
    # bool is an int in Python; a threshold of `true` is a typo, not 1.
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        hint = (
            " (YAML reads 1e4 as text: write 10000 or 1.0e+4)"
            if key == "threshold"
            else ""
        )
        raise ReportInputError(
            f"{where}: field {key!r} must be {wanted}, got {value!r}{hint}."
        )


def _check_known(where: str, key: str, value: str, known: dict[str, Any]) -> None:
    if value not in known:
        raise ReportInputError(
            f"{where}: field {key!r} has unknown value {value!r}; "
            f"known: {', '.join(known)}."
        )


def _reject_duplicate_names(criteria: Sequence[Criterion], source: Path) -> None:
    names = [c.name for c in criteria]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ReportInputError(
            f"criteria file {str(source)!r}: duplicate criterion name(s) {duplicates}."
        )


def check_required_tags(criteria: Sequence[Criterion], run: Run) -> None:
    """Raise ReportInputError naming every required tag that ``run`` lacks."""
    missing: dict[str, list[str]] = {}
    for criterion in criteria:
        if criterion.required and criterion.tag not in run:
            missing.setdefault(criterion.tag, []).append(criterion.name)
    if missing:
        listed = "; ".join(
            f"{tag!r} (needed by {', '.join(names)})" for tag, names in missing.items()
        )
        raise ReportInputError(
            f"run {str(run.run_dir)!r} lacks required tag(s): {listed}. "
            f"It has {len(run.tags)} scalar tags; list them with "
            f"`python -m lit_td3.report summarize {run.run_dir}`."
        )


def evaluate(
    criteria: Sequence[Criterion], run: Run, *, strict: bool = True
) -> list[Verdict]:
    """Judge ``run`` on every criterion.

    With ``strict`` (the default) a required tag missing from the run raises
    ReportInputError; otherwise (for a baseline shown only for comparison) it
    gives an n/a verdict like an optional one.
    """
    if strict:
        check_required_tags(criteria, run)
    return [_judge(criterion, run) for criterion in criteria]


def _judge(criterion: Criterion, run: Run) -> Verdict:
    if criterion.tag not in run:
        return Verdict(criterion, "n/a", None, "tag absent")
    value = compute(criterion.statistic, run[criterion.tag])
    if not math.isfinite(value):
        return Verdict(
            criterion, "fail", value, f"{criterion.statistic} is not a finite number"
        )
    passed = COMPARISONS[criterion.comparison](value, criterion.threshold)
    note = f"{value:.4g} {criterion.comparison} {criterion.threshold:g}"
    return Verdict(
        criterion,
        "pass" if passed else "fail",
        value,
        note if passed else f"not {note}",
    )

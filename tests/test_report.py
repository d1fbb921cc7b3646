"""lit_td3.report in-process: runs, statistics, criteria, verdicts, the written report.

Runs are event files written by torch's SummaryWriter (tests/report_fixtures.py)
and read back through TensorBoard's own reader. Exit codes through a real
subprocess are in tests/test_report_cli.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from lit_td3 import report
from lit_td3.report import criteria as criteria_module
from lit_td3.report import plots as plots_module
from lit_td3.report.markdown import number
from tests.report_fixtures import (
    EPISODE_STEPS,
    TRAIN_STEPS,
    Scalars,
    exploding_scalars,
    healthy_scalars,
    with_values,
    write_run,
)

REPO = Path(__file__).resolve().parents[1]
N = len(TRAIN_STEPS)


def f32(values: np.ndarray) -> np.ndarray:
    """What a TensorBoard scalar stores: float32, read back as float64."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def png_size(path_or_bytes: Path | bytes) -> tuple[int, int]:
    data = (
        path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    )
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "healthy": write_run(root / "healthy", healthy_scalars()),
        "baseline": write_run(root / "baseline", exploding_scalars()),
        "state_only": write_run(root / "state_only", healthy_scalars(pixels=False)),
    }


# --- events: reading and merging event files ------------------------------------------


def test_load_run_returns_every_tag_with_env_steps_and_values(tmp_path: Path) -> None:
    scalars = healthy_scalars()
    run = report.load_run(write_run(tmp_path, scalars))
    assert run.tags == sorted(scalars)
    for tag, (steps, values) in scalars.items():
        np.testing.assert_array_equal(run[tag].steps, steps)
        np.testing.assert_array_equal(run[tag].values, f32(values))
    assert run.step_range == (int(TRAIN_STEPS[0]), int(TRAIN_STEPS[-1]))


def test_resumed_run_keeps_the_later_write_of_a_relogged_step(tmp_path: Path) -> None:
    steps = np.arange(10) * 100
    write_run(tmp_path, {"train/q1": (steps, np.arange(10.0))})
    # The resumed run restarts from its step-500 checkpoint and logs new values.
    write_run(tmp_path, {"train/q1": (steps + 500, 100.0 + np.arange(10.0))})
    series = report.load_run(tmp_path)["train/q1"]
    assert len(report.load_run(tmp_path).event_files) == 2
    np.testing.assert_array_equal(series.steps, np.arange(15) * 100)
    np.testing.assert_array_equal(
        series.values, np.r_[np.arange(5.0), 100.0 + np.arange(10.0)]
    )


def test_same_step_twice_in_one_file_keeps_the_later_value(tmp_path: Path) -> None:
    writer = SummaryWriter(log_dir=str(tmp_path))
    for step, value in [(0, 1.0), (10, 2.0), (10, 3.0), (5, 4.0)]:
        writer.add_scalar("train/q1", value, step)
    writer.close()
    series = report.load_run(tmp_path)["train/q1"]
    np.testing.assert_array_equal(series.steps, [0, 5, 10])
    np.testing.assert_array_equal(series.values, [1.0, 4.0, 3.0])


def test_event_files_in_subfolders_are_merged(tmp_path: Path) -> None:
    write_run(tmp_path, {"train/q1": (np.array([0, 10]), np.array([1.0, 2.0]))})
    write_run(
        tmp_path / "version_0", {"eval/return": (np.array([10]), np.array([7.0]))}
    )
    run = report.load_run(tmp_path)
    assert run.tags == ["eval/return", "train/q1"]
    assert run["eval/return"].values.tolist() == [7.0]


def test_a_path_that_is_not_a_run_is_named(tmp_path: Path) -> None:
    with pytest.raises(report.ReportInputError, match="does not exist") as missing:
        report.load_run(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(missing.value)
    with pytest.raises(
        report.ReportInputError, match="no TensorBoard event files"
    ) as empty_dir:
        report.load_run(tmp_path)
    assert str(tmp_path) in str(empty_dir.value)


def test_a_run_whose_event_files_hold_no_scalars_is_rejected(tmp_path: Path) -> None:
    SummaryWriter(log_dir=str(tmp_path)).close()
    with pytest.raises(report.ReportInputError, match=r"1 event file.*no scalars"):
        report.load_run(tmp_path)


# --- stats: values against numpy on known inputs --------------------------------------


def test_summarize_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    steps = np.sort(rng.choice(10_000, size=23, replace=False))
    values = f32(rng.normal(3.0, 2.0, size=23))
    stats = report.summarize(
        report.load_run(write_run(tmp_path, {"train/q1": (steps, values)}))
    )["train/q1"]
    # 23 points in 10 windows: np.array_split gives three windows of 3, then 2s.
    expected = {
        "first_step": steps[0],
        "last_step": steps[-1],
        "count": 23,
        "nonfinite_count": 0,
        "mean": np.mean(values),
        "median": np.median(values),
        "min": np.min(values),
        "max": np.max(values),
        "first_window_mean": np.mean(values[:3]),
        "last_window_mean": np.mean(values[-2:]),
        "trend_slope": np.polyfit(steps.astype(float), values, 1)[0] * 1000,
    }
    assert set(stats) == set(expected)
    for name, value in expected.items():
        assert stats[name] == pytest.approx(value, rel=1e-9), name


def series(values: list[float] | np.ndarray) -> report.Series:
    values = np.asarray(values, dtype=np.float64)
    return report.Series(steps=np.arange(len(values)) * 10, values=values)


def test_rise_fraction_counts_rising_window_means() -> None:
    means = [1.0, 2.0, 3.0, 2.5, 4.0, 5.0, 4.5, 6.0, 7.0, 8.0]  # 7 of 9 steps rise
    noisy = np.repeat(means, 5) + np.tile([-0.1, 0.1, 0.0, 0.05, -0.05], 10)
    assert report.STATISTICS["rise_fraction"].compute(series(noisy)) == pytest.approx(
        7 / 9
    )


def test_last_window_growth_is_the_ratio_of_the_last_two_window_magnitudes() -> None:
    values = np.r_[np.full(80, -1.0), np.full(10, -20.0), np.full(10, -50.0)]
    assert report.STATISTICS["last_window_growth"].compute(
        series(values)
    ) == pytest.approx(2.5)


@pytest.mark.parametrize("name", ["trend_slope", "rise_fraction", "last_window_growth"])
def test_trend_statistics_of_a_single_point_are_nan(name: str) -> None:
    assert np.isnan(report.STATISTICS[name].compute(series([1.0])))


@pytest.mark.parametrize(
    ("comparison", "passes"),
    [("<", False), ("<=", True), (">", False), (">=", True), ("==", True)],
)
def test_comparisons_at_the_threshold(comparison: str, passes: bool) -> None:
    run = report.Run(Path("run"), (), {"train/q_gap": series([0.5, 1.5])})  # mean 1.0
    criterion = report.Criterion(
        "gap", "train/q_gap", "mean", comparison, 1.0, "boundary"
    )
    [verdict] = report.evaluate([criterion], run)
    assert verdict.value == 1.0
    assert verdict.status == ("pass" if passes else "fail")


# --- criteria files -------------------------------------------------------------------


def test_packaged_criteria_copy_matches_the_repo_file() -> None:
    repo_copy = REPO / "configs" / "criteria" / "go_no_go.yaml"
    package_copy = REPO / "lit_td3" / "report" / "go_no_go.yaml"
    assert package_copy.read_bytes() == repo_copy.read_bytes()
    assert report.default_criteria_path() == repo_copy


def test_installed_package_falls_back_to_its_own_copy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(criteria_module, "_REPO_CRITERIA", tmp_path / "absent.yaml")
    assert (
        report.default_criteria_path() == REPO / "lit_td3" / "report" / "go_no_go.yaml"
    )
    assert report.load_criteria() == report.load_criteria(
        REPO / "configs" / "criteria" / "go_no_go.yaml"
    )


def test_packaged_criteria_hold_the_report_thresholds() -> None:
    rules = {
        c.name: (c.tag, c.statistic, c.comparison, c.threshold, c.blocking)
        for c in report.load_criteria()
    }
    assert rules["actor_grad_clipped_mean"] == (
        "gradients/actor_norm_clipped",
        "mean",
        "<",
        1.0,
        True,
    )
    assert rules["actor_grad_clipped_max"] == (
        "gradients/actor_norm_clipped",
        "max",
        "<",
        1.5,
        True,
    )
    assert rules["actor_loss_magnitude"] == (
        "train/actor_loss",
        "abs_max",
        "<",
        1000.0,
        True,
    )
    assert rules["twin_critics_synchronized"] == ("train/q_gap", "mean", "<", 5.0, True)
    assert rules["critic_cnn_grad_mean"] == (
        "gradients/critic_cnn_norm",
        "mean",
        "<",
        10000.0,
        True,
    )
    assert rules["episode_length_improving"][4] is False


def write_criteria(tmp_path: Path, **changes: object) -> Path:
    """The packaged criteria, the first criterion's fields changed (None deletes)."""
    document = yaml.safe_load(report.default_criteria_path().read_text())
    first = document["criteria"][0]
    for key, value in changes.items():
        if value is None:
            del first[key]
        else:
            first[key] = value
    path = tmp_path / "criteria.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (
            {"statistic": "meen"},
            ["'statistic'", "'meen'", "actor_grad_clipped_mean", "criterion #1"],
        ),
        ({"comparison": "<<"}, ["'comparison'", "'<<'"]),
        ({"threshold": "1e4"}, ["'threshold'", "'1e4'", "10000"]),
        ({"threshold": True}, ["'threshold'", "True"]),
        ({"blocking": "yes please"}, ["'blocking'", "bool"]),
        (
            {"treshold": 1.0, "threshold": None},
            ["unknown field(s) ['treshold']", "missing field(s) ['threshold']"],
        ),
        ({"name": "actor_grad_clipped_max"}, ["duplicate", "actor_grad_clipped_max"]),
    ],
)
def test_bad_criteria_fields_are_named(
    tmp_path: Path, changes: dict[str, object], named: list[str]
) -> None:
    path = write_criteria(tmp_path, **changes)
    with pytest.raises(report.ReportInputError) as error:
        report.load_criteria(path)
    for text in [str(path), *named]:
        assert text in str(error.value)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("criteria:\n  - name: [unclosed\n", "not valid YAML"),
        ("", "single key 'criteria'"),
        ("criteria: []\n", "non-empty list"),
        ("criteria:\n  - just a string\n", "must be a mapping of fields"),
        ("rules: []\n", "found ['rules']"),
    ],
)
def test_malformed_criteria_files_are_rejected(
    tmp_path: Path, text: str, named: str
) -> None:
    path = tmp_path / "criteria.yaml"
    path.write_text(text)
    with pytest.raises(report.ReportInputError, match="criteria file") as error:
        report.load_criteria(path)
    assert named in str(error.value)


def test_a_missing_criteria_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(report.ReportInputError, match="cannot be read") as error:
        report.load_criteria(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(error.value)


# --- verdicts and the decision --------------------------------------------------------

Mutation = Callable[[Scalars], Scalars]
TRAIN_PROGRESS = np.linspace(0.0, 1.0, N)
LAST_TENTH = np.arange(N) >= N - N // 10


def running_count(first_index: int, count: int) -> np.ndarray:
    return np.where(np.arange(N) >= first_index, float(count), 0.0)


def scaled(scalars: Scalars, tag: str, factor: np.ndarray) -> np.ndarray:
    return scalars[tag][1] * factor


# Each case bends the healthy run so that exactly the named criteria fail.
NO_GO_CASES: dict[str, tuple[Mutation, set[str]]] = {
    "clipping not working": (
        lambda s: with_values(s, gradients__actor_norm_clipped=np.full(N, 1.2)),
        {"actor_grad_clipped_mean"},
    ),
    "one unclipped spike": (
        lambda s: with_values(
            s, gradients__actor_norm_clipped=np.where(np.arange(N) == 40, 2.0, 0.5)
        ),
        {"actor_grad_clipped_max"},
    ),
    "warning alerts": (
        lambda s: with_values(s, alerts__gradient_warning=running_count(60, 3)),
        {"no_gradient_warnings"},
    ),
    # A norm above 100,000 is also above 10,000: a critical alert is a warning too.
    "critical alert": (
        lambda s: with_values(
            s,
            alerts__gradient_warning=running_count(70, 1),
            alerts__gradient_critical=running_count(70, 1),
        ),
        {"no_gradient_warnings", "no_gradient_criticals"},
    ),
    "non-finite steps": (
        lambda s: with_values(s, alerts__nonfinite_steps=running_count(30, 2)),
        {"no_nonfinite_steps"},
    ),
    "actor loss excursion": (
        lambda s: with_values(
            s,
            train__actor_loss=np.where(
                np.arange(N) == 50, -1500.0, s["train/actor_loss"][1]
            ),
        ),
        {"actor_loss_magnitude"},
    ),
    "actor loss diverging below the limit": (
        lambda s: with_values(
            s,
            train__actor_loss=scaled(
                s, "train/actor_loss", np.where(LAST_TENTH, 5.0, 1.0)
            ),
        ),
        {"actor_loss_not_diverging"},
    ),
    "actor loss NaN": (
        lambda s: with_values(
            s,
            train__actor_loss=np.where(
                np.arange(N) == N - 1, np.nan, s["train/actor_loss"][1]
            ),
        ),
        {"actor_loss_magnitude", "actor_loss_not_diverging"},
    ),
    "Q1 collapsing": (
        lambda s: with_values(s, train__q1=71.0 - 51.0 * TRAIN_PROGRESS),
        {"q1_rising_smoothly"},
    ),
    "Q2 collapsing": (
        lambda s: with_values(s, train__q2=71.0 - 51.0 * TRAIN_PROGRESS),
        {"q2_rising_smoothly"},
    ),
    "Q1 exploding at the end": (
        lambda s: with_values(
            s, train__q1=scaled(s, "train/q1", np.where(LAST_TENTH, 3.0, 1.0))
        ),
        {"q1_not_diverging"},
    ),
    "twin critics apart": (
        lambda s: with_values(s, train__q_gap=np.full(N, 8.0)),
        {"twin_critics_synchronized"},
    ),
    "critic CNN destabilized": (
        lambda s: with_values(
            s, gradients__critic_cnn_norm=20_000.0 + 1000.0 * np.sin(np.arange(N))
        ),
        {"critic_cnn_grad_mean"},
    ),
}

# Failures that must not change a GO.
WARNING_CASES: dict[str, tuple[Mutation, set[str]]] = {
    "critic CNN spike": (
        lambda s: with_values(
            s, gradients__critic_cnn_norm=np.where(np.arange(N) == 20, 60_000.0, 5897.0)
        ),
        {"critic_cnn_grad_max"},
    ),
    "clipping every update": (
        lambda s: with_values(s, gradients__actor_clip_fraction=np.full(N, 0.9)),
        {"actor_clipping_selective"},
    ),
    "episodes getting shorter": (
        lambda s: with_values(
            s, rollout__episode_length=np.linspace(70.0, 30.0, len(EPISODE_STEPS))
        ),
        {"episode_length_improving"},
    ),
}


def judge(tmp_path: Path, scalars: Scalars) -> report.Decision:
    return report.decide(
        report.evaluate(
            report.load_criteria(), report.load_run(write_run(tmp_path, scalars))
        )
    )


def failing(decision: report.Decision) -> set[str]:
    return {v.criterion.name for v in decision.verdicts if v.status == "fail"}


def test_every_criterion_has_a_case_that_makes_it_fail() -> None:
    criteria = report.load_criteria()
    blocking = {c.name for c in criteria if c.blocking}
    non_blocking = {c.name for c in criteria if not c.blocking}
    assert set().union(*(names for _, names in NO_GO_CASES.values())) == blocking
    assert set().union(*(names for _, names in WARNING_CASES.values())) == non_blocking


def test_healthy_run_is_go_with_every_verdict_passing(tmp_path: Path) -> None:
    decision = judge(tmp_path, healthy_scalars())
    assert decision.go
    assert decision.exit_code == 0
    assert [v.status for v in decision.verdicts] == ["pass"] * len(
        report.load_criteria()
    )
    assert decision.warnings == ()


@pytest.mark.parametrize("case", list(NO_GO_CASES))
def test_each_blocking_failure_is_no_go(tmp_path: Path, case: str) -> None:
    mutate, expected = NO_GO_CASES[case]
    decision = judge(tmp_path, mutate(healthy_scalars()))
    assert failing(decision) == expected
    assert {
        v.status for v in decision.verdicts if v.criterion.name not in expected
    } == {"pass"}
    assert not decision.go
    assert decision.exit_code == 1
    assert sorted(reason.split(":")[0] for reason in decision.reasons) == sorted(
        expected
    )


@pytest.mark.parametrize("case", list(WARNING_CASES))
def test_non_blocking_failures_keep_go_as_warnings(tmp_path: Path, case: str) -> None:
    mutate, expected = WARNING_CASES[case]
    decision = judge(tmp_path, mutate(healthy_scalars()))
    assert failing(decision) == expected
    assert decision.go
    assert decision.exit_code == 0
    assert [w.split(":")[0] for w in decision.warnings] == sorted(expected)


def test_optional_cnn_tags_absent_are_na_not_failures(runs: dict[str, Path]) -> None:
    decision = report.decide(
        report.evaluate(report.load_criteria(), report.load_run(runs["state_only"]))
    )
    na = {v.criterion.name for v in decision.verdicts if v.status == "n/a"}
    assert na == {"critic_cnn_grad_mean", "critic_cnn_grad_max"}
    assert all(
        v.value is None and v.note == "tag absent"
        for v in decision.verdicts
        if v.status == "n/a"
    )
    assert decision.go
    assert any("critic_cnn_grad_mean: n/a" in w for w in decision.warnings)


def test_a_required_tag_missing_names_the_tag_and_its_criteria(tmp_path: Path) -> None:
    run = report.load_run(
        write_run(tmp_path, with_values(healthy_scalars(), train__q_gap=None))
    )
    with pytest.raises(
        report.ReportInputError,
        match="'train/q_gap' \\(needed by twin_critics_synchronized\\)",
    ):
        report.evaluate(report.load_criteria(), run)
    lenient = report.evaluate(report.load_criteria(), run, strict=False)
    assert {v.criterion.name for v in lenient if v.status == "n/a"} == {
        "twin_critics_synchronized"
    }


def test_a_decision_no_criterion_could_stop_is_refused(runs: dict[str, Path]) -> None:
    optional_only = [
        c for c in report.load_criteria() if c.name == "critic_cnn_grad_mean"
    ]
    verdicts = report.evaluate(optional_only, report.load_run(runs["state_only"]))
    with pytest.raises(
        report.ReportInputError, match="no blocking criterion could be judged"
    ):
        report.decide(verdicts)


# --- compare: the written report ------------------------------------------------------


def table_rows(markdown: str, first_header: str) -> dict[str, list[str]]:
    """Rows, by first cell, of the Markdown table headed by ``first_header``."""
    lines = markdown.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |")
    )
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_compare_writes_report_with_every_criterion_and_plots(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    output = tmp_path / "out"
    decision = report.compare(runs["baseline"], runs["healthy"], None, output)
    text = (output / "report.md").read_text()
    assert decision.go
    assert decision.report_path == output / "report.md"
    assert text.startswith("# GO/NO-GO report: **GO**")
    rows = table_rows(text, "criterion")
    baseline = {v.criterion.name: v for v in decision.baseline_verdicts}
    assert list(rows) == [v.criterion.name for v in decision.verdicts]
    for verdict in decision.verdicts:
        criterion = verdict.criterion
        base = baseline[criterion.name]
        threshold = number(criterion.threshold)
        assert rows[criterion.name] == [
            f"`{criterion.tag}`",
            f"{criterion.statistic} {criterion.comparison} {threshold}",
            "yes" if criterion.blocking else "no",
            number(verdict.value),
            f"{number(base.value)} ({base.status})",
            "PASS",
        ]
    # The pre-fix baseline fails what the fix was for.
    assert baseline["actor_grad_clipped_mean"].status == "fail"
    assert baseline["no_gradient_criticals"].status == "fail"
    pngs = sorted(output.glob("*.png"))
    assert pngs == sorted(decision.figures)
    assert {p.name for p in pngs} >= {
        "gradients_actor_cnn_norm.png",
        "gradients_actor_norm_clipped.png",
        "gradients_critic_cnn_norm.png",
        "actor_loss.png",
        "critic_loss.png",
        "q1_and_q2.png",
        "twin_critic_gap_q1_q2.png",
        "episode_return.png",
        "episode_length.png",
    }
    assert all(png_size(p) == (800, 450) for p in pngs)
    assert all(f"]({p.name})" in text for p in pngs)
    assert [p.name for p in output.parent.iterdir()] == [
        "out"
    ]  # no staging folder left


def test_compare_no_go_lists_reasons_in_report(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    decision = report.compare(
        runs["healthy"], runs["baseline"], report.load_criteria(), tmp_path / "out"
    )
    assert decision.report_path == tmp_path / "out" / "report.md"
    text = decision.report_path.read_text()
    assert not decision.go
    assert text.startswith("# GO/NO-GO report: **NO-GO**")
    assert all(f"- {reason}" in text for reason in decision.reasons)
    assert table_rows(text, "criterion")["actor_loss_magnitude"][-1] == "**FAIL**"


def test_compare_into_existing_folder_keeps_other_files(tmp_path: Path) -> None:
    # Two tags and one criterion keep this to a couple of figures.
    q_only = {tag: healthy_scalars()[tag] for tag in ("train/q1", "train/q2")}
    run = report.load_run(write_run(tmp_path / "run", q_only))
    q1_rising = [c for c in report.load_criteria() if c.name == "q1_rising_smoothly"]
    output = tmp_path / "out"
    output.mkdir()
    (output / "README.md").write_text("keep me")
    (output / "report.md").write_text("old report")
    decision = report.compare(run, run, q1_rising, output)
    assert (output / "README.md").read_text() == "keep me"
    assert (output / "report.md").read_text().startswith("# GO/NO-GO report: **GO**")
    assert sorted(p.name for p in output.iterdir()) == [
        "README.md",
        "q1_and_q2.png",
        "report.md",
    ]
    assert decision.figures == (output / "q1_and_q2.png",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("existing", [False, True])
def test_failure_while_writing_leaves_output_untouched(
    runs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    existing: bool,
) -> None:
    output = tmp_path / "out"
    if existing:
        output.mkdir()
        (output / "report.md").write_text("previous report")
    before = snapshot(tmp_path)
    drawn: list[str] = []

    def fail_on_third_figure(
        spec: report.PlotSpec, runs: Mapping[str, report.Run]
    ) -> Figure:
        drawn.append(spec.title)
        if len(drawn) == 3:
            raise RuntimeError("disk full")
        return plots_module.make_figure(spec, runs)

    monkeypatch.setattr("lit_td3.report.comparison.make_figure", fail_on_third_figure)
    with pytest.raises(RuntimeError, match="disk full"):
        report.compare(runs["baseline"], runs["healthy"], None, output)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])


@pytest.mark.parametrize(
    ("problem", "named"),
    [
        ("missing candidate", "nowhere"),
        ("required tag absent", "train/q1"),
        ("unknown tag in criteria", "train/q3"),
        ("output is a file", "is not a directory"),
    ],
)
def test_bad_input_writes_nothing(
    runs: dict[str, Path], tmp_path: Path, problem: str, named: str
) -> None:
    candidate: Path = runs["healthy"]
    criteria: list[report.Criterion] | None = None
    output = tmp_path / "out"
    if problem == "missing candidate":
        candidate = tmp_path / "nowhere"
    elif problem == "required tag absent":
        candidate = write_run(
            tmp_path / "no_q1", with_values(healthy_scalars(), train__q1=None)
        )
    elif problem == "unknown tag in criteria":
        criteria = [
            report.Criterion(
                "q3_rising", "train/q3", "rise_fraction", ">", 0.5, "a third critic?"
            )
        ]
    else:
        output.write_text("not a folder")
    before = snapshot(tmp_path)
    with pytest.raises(report.ReportInputError) as error:
        report.compare(runs["baseline"], candidate, criteria, output)
    assert named in str(error.value)
    assert snapshot(tmp_path) == before
    assert output.exists() == (problem == "output is a file")


def test_plot_specs_follow_the_tags_present(runs: dict[str, Path]) -> None:
    pixel = report.load_run(runs["healthy"])
    state = report.load_run(runs["state_only"])
    gradient_titles = {s.title for s in report.plot_specs([state], group="gradients")}
    assert "gradients/actor_cnn_norm" not in gradient_titles
    assert "gradients/actor_mlp_norm" in gradient_titles
    assert "gradients/actor_cnn_norm" in {
        s.title for s in report.plot_specs([state, pixel])
    }
    pre_clip = next(
        s for s in report.plot_specs([pixel]) if s.title == "gradients/critic_cnn_norm"
    )
    clipped = next(
        s
        for s in report.plot_specs([pixel])
        if s.title == "gradients/critic_norm_clipped"
    )
    assert (pre_clip.yscale, dict(pre_clip.thresholds)) == (
        "log",
        report.ALERT_THRESHOLDS,
    )
    assert clipped.thresholds == ()


def test_figures_draw_each_run_and_the_alert_thresholds(runs: dict[str, Path]) -> None:
    both = {
        "baseline": report.load_run(runs["baseline"]),
        "candidate": report.load_run(runs["healthy"]),
    }
    spec = next(
        s
        for s in report.plot_specs(list(both.values()))
        if s.title == "gradients/actor_cnn_norm"
    )
    axes = report.make_figure(spec, both).axes[0]
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels == [
        "baseline: gradients/actor_cnn_norm",
        "candidate: gradients/actor_cnn_norm",
        "alert warning (10K)",
        "alert critical (100K)",
    ]
    np.testing.assert_array_equal(
        axes.get_lines()[1].get_ydata(),
        both["candidate"]["gradients/actor_cnn_norm"].values,
    )
    assert axes.get_yscale() == "log"
    assert [np.asarray(line.get_ydata())[0] for line in axes.get_lines()[2:]] == [
        1e4,
        1e5,
    ]

"""`python -m lit_td3.report`: exit codes, messages, and what is (not) written.

Each exit status (0 GO, 1 NO-GO, 2 unusable input) and both commands go
through a real subprocess; the remaining bad-input cases call the same
``main(argv)`` in-process to keep the suite fast. One fixture starts every
subprocess at once (they are independent), so the module waits for the
slowest rather than for their sum.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from lit_td3.report.__main__ import main
from tests.report_fixtures import (
    TRAIN_STEPS,
    exploding_scalars,
    healthy_scalars,
    with_values,
    write_run,
)

REPO = Path(__file__).resolve().parents[1]
CRITERIA = REPO / "configs" / "criteria" / "go_no_go.yaml"
IN_PROCESS = {
    "empty_run",
    "missing_tag",
    "unknown_comparison",
    "malformed_yaml",
    "summarize_markdown",
    "summarize_not_a_run",
}


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    output: Path


def criteria_file(path: Path, change: dict[str, object]) -> Path:
    """The packaged criteria with the first criterion's fields updated."""
    document = yaml.safe_load(CRITERIA.read_text())
    document["criteria"][0].update(change)
    path.write_text(yaml.safe_dump(document))
    return path


def commands(root: Path) -> dict[str, tuple[list[str], Path]]:
    """Every case: its arguments and the output folder it names (``root`` if none)."""
    healthy = write_run(root / "healthy", healthy_scalars())
    baseline = write_run(root / "baseline", exploding_scalars())
    no_q_gap = write_run(
        root / "no_q_gap", with_values(healthy_scalars(), train__q_gap=None)
    )
    SummaryWriter(log_dir=str(root / "empty")).close()
    (root / "malformed.yaml").write_text("criteria:\n  - name: [unclosed\n")
    kept = root / "kept"
    kept.mkdir()
    (kept / "report.md").write_text("previous report")

    def compare(case: str, candidate: Path, *extra: str) -> tuple[list[str], Path]:
        output = kept if case == "unknown_statistic" else root / case
        args = ["compare", "--baseline", str(baseline), "--candidate", str(candidate)]
        return [*args, "--output", str(output), *extra], output

    def with_criteria(case: str, path: Path) -> tuple[list[str], Path]:
        return compare(case, healthy, "--criteria", str(path))

    return {
        "go": compare("go", healthy),
        "no_go": compare("no_go", baseline),
        "missing_run": compare("missing_run", root / "nowhere"),
        "empty_run": compare("empty_run", root / "empty"),
        "missing_tag": compare("missing_tag", no_q_gap),
        "unknown_tag": with_criteria(
            "unknown_tag", criteria_file(root / "tag.yaml", {"tag": "train/q3"})
        ),
        "unknown_statistic": with_criteria(
            "unknown_statistic",
            criteria_file(root / "statistic.yaml", {"statistic": "meen"}),
        ),
        "unknown_comparison": with_criteria(
            "unknown_comparison",
            criteria_file(root / "comparison.yaml", {"comparison": "=<"}),
        ),
        "malformed_yaml": with_criteria("malformed_yaml", root / "malformed.yaml"),
        "summarize_json": (["summarize", str(healthy), "--json"], root),
        "summarize_markdown": (["summarize", str(healthy)], root),
        "summarize_not_a_run": (["summarize", str(root / "nowhere")], root),
    }


def in_process(args: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        returncode = main(args)
    return returncode, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("cli")
    cases = commands(root)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "lit_td3.report", *args],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in cases.items()
        if name not in IN_PROCESS
    }
    results = {
        name: Result(*in_process(cases[name][0]), cases[name][1]) for name in IN_PROCESS
    }
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = Result(process.returncode, stdout, stderr, cases[name][1])
    return results


def test_go_exits_0_and_writes_the_report(cli: dict[str, Result]) -> None:
    result = cli["go"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "GO"
    assert (
        (result.output / "report.md")
        .read_text()
        .startswith("# GO/NO-GO report: **GO**")
    )
    assert len(list(result.output.glob("*.png"))) >= 10


def test_no_go_exits_1_and_names_the_failed_criteria(cli: dict[str, Result]) -> None:
    result = cli["no_go"]
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "NO-GO"
    failed = {
        line[2:].split(":")[0]
        for line in lines[1:]
        if line.startswith("- ") and not line.startswith("- warning:")
    }
    assert failed == {
        "actor_grad_clipped_mean",
        "actor_grad_clipped_max",
        "no_gradient_warnings",
        "no_gradient_criticals",
        "actor_loss_magnitude",
        "actor_loss_not_diverging",
    }
    assert "**NO-GO**" in (result.output / "report.md").read_text()


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("missing_run", "nowhere' does not exist"),
        ("empty_run", "empty' has 1 event file(s) but no scalars"),
        ("missing_tag", "'train/q_gap' (needed by twin_critics_synchronized)"),
        ("unknown_tag", "'train/q3' (needed by actor_grad_clipped_mean)"),
        ("unknown_statistic", "field 'statistic' has unknown value 'meen'"),
        ("unknown_comparison", "field 'comparison' has unknown value '=<'"),
        ("malformed_yaml", "malformed.yaml' is not valid YAML"),
    ],
)
def test_unusable_input_exits_2_naming_it_and_writes_nothing(
    cli: dict[str, Result], case: str, named: str
) -> None:
    result = cli[case]
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    if case == "unknown_statistic":  # an existing output folder is left as it was
        assert [p.name for p in result.output.iterdir()] == ["report.md"]
        assert (result.output / "report.md").read_text() == "previous report"
    else:
        assert not result.output.exists()
    assert not list(result.output.parent.glob(".*partial*"))


def test_summarize_json_matches_numpy(cli: dict[str, Result]) -> None:
    result = cli["summarize_json"]
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    scalars = healthy_scalars()
    assert sorted(document["tags"]) == sorted(scalars)
    q1 = np.asarray(scalars["train/q1"][1], dtype=np.float32).astype(np.float64)
    stats = document["tags"]["train/q1"]
    assert stats["count"] == len(TRAIN_STEPS)
    assert (stats["first_step"], stats["last_step"]) == (
        TRAIN_STEPS[0],
        TRAIN_STEPS[-1],
    )
    assert stats["mean"] == pytest.approx(q1.mean(), rel=1e-9)
    assert stats["median"] == pytest.approx(np.median(q1), rel=1e-9)
    assert stats["max"] == pytest.approx(q1.max(), rel=1e-9)
    assert stats["first_window_mean"] == pytest.approx(q1[:10].mean(), rel=1e-9)
    assert stats["last_window_mean"] == pytest.approx(q1[-10:].mean(), rel=1e-9)
    slope = np.polyfit(TRAIN_STEPS, q1, 1)[0] * 1000
    assert stats["trend_slope"] == pytest.approx(slope, rel=1e-9)


def test_summarize_markdown_has_a_row_per_tag(cli: dict[str, Result]) -> None:
    result = cli["summarize_markdown"]
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| `")]
    assert sorted(row.split("`")[1] for row in rows) == sorted(healthy_scalars())
    header = next(line for line in lines if line.startswith("| tag |"))
    for column in (
        "count",
        "mean",
        "median",
        "max",
        "first_window_mean",
        "last_window_mean",
        "trend_slope",
    ):
        assert f" {column} " in header


def test_summarize_not_a_run_exits_2(cli: dict[str, Result]) -> None:
    result = cli["summarize_not_a_run"]
    assert result.returncode == 2
    assert "nowhere' does not exist" in result.stderr


def test_summarize_json_writes_null_for_values_that_are_not_numbers(
    tmp_path: Path,
) -> None:
    steps = np.array([0, 10, 20])
    write_run(tmp_path, {"train/actor_loss": (steps, np.array([-1.0, np.nan, -3.0]))})
    returncode, stdout, _ = in_process(["summarize", str(tmp_path), "--json"])
    # parse_constant fails the test on NaN or Infinity, which are not JSON.
    stats = json.loads(stdout, parse_constant=pytest.fail)["tags"]["train/actor_loss"]
    assert returncode == 0
    assert stats["nonfinite_count"] == 1
    assert stats["mean"] is None
    assert stats["count"] == 3

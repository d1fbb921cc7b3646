"""The README's A/B check end to end: two real short runs (clipping off / on), then `report compare`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.test_cli import REPO, lit_td3, small_run_config


def test_compare_two_real_runs_writes_the_report_and_exits_with_the_decision(tmp_path: Path) -> None:
    runs = {}
    for name, enabled in [("clipping_off", "false"), ("clipping_on", "true")]:
        config = small_run_config(tmp_path / name, every=300, env_id="Pendulum-v1", total=300, learning_starts=60,
                                  episode_steps=60, extra={"model": {"log_every_n_env_steps": 20},
                                                           "data": {"batch_size": 16}})
        result = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config),
                         "--model.gradient_clipping.enabled", enabled)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = tmp_path / name / "run"

    output = tmp_path / "report"
    compared = subprocess.run(
        [sys.executable, "-m", "lit_td3.report", "compare", "--baseline", str(runs["clipping_off"]),
         "--candidate", str(runs["clipping_on"]), "--output", str(output)],
        cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=300, check=False,
    )
    report = (output / "report.md").read_text()
    decision = "NO-GO" if "Decision for the 1M-step run: **NO-GO**" in report else "GO"
    assert compared.returncode == (1 if decision == "NO-GO" else 0), compared.stderr
    assert len(list(output.glob("*.png"))) >= 10
    assert "gradients/actor_norm_clipped" in report
    # only the candidate clipped: its clip fraction is there, the baseline has none
    assert "actor_clipping_selective" in report and "n/a (tag absent)" in report

"""The gradient alerts callback counts and warns exactly as a naive per-update count would, across its block folds
and log points."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from callbacks import GradientAlertCallback, alerts
from lit_td3.module import TD3Module
from tests.conftest import EnvStepPerBatch, fit_on_random_batches, make_module

LOG_EVERY = 5
BATCHES = 4 * LOG_EVERY


class EveryNorm(pl.Callback):
    """Each update's pre-clip part norms and env step, read on the host (the naive reference)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: TD3Module, *args: object) -> None:
        norms = {part: float(norm) for part, norm in pl_module.last_gradient_norms.items()}
        self.rows.append((pl_module.counters.env_steps, norms))


def fit(callbacks: list[pl.Callback]) -> None:
    torch.manual_seed(0)
    module = make_module(policy_freq=2, log_every_n_env_steps=LOG_EVERY,
                         critic_mlp_lr=1.0, critic_cnn_lr=1.0)  # norms that grow over the run, crossing thresholds
    fit_on_random_batches(module, BATCHES, callbacks=[EnvStepPerBatch(), *callbacks], reward_scale=10.0)


def test_alert_counts_and_warnings_match_a_naive_count_across_folds_and_log_points(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reference = EveryNorm()
    fit([reference])
    critic_norms = [n for _, norms in reference.rows for part, n in norms.items() if part.startswith("critic")]
    warning, critical = np.quantile(critic_norms, [0.3, 0.8])  # thresholds that this run's norms cross

    monkeypatch.setattr(alerts, "FOLD_EVERY", 3)  # several folds inside each log window
    callback, again = GradientAlertCallback(float(warning), float(critical)), EveryNorm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([again, callback])
    assert again.rows == reference.rows  # the same run (CPU, same seed): the reference applies

    levels = {"warning": warning, "critical": critical}
    expected_counts = {(part.split("_")[0], level): 0 for part in reference.rows[-1][1] for level in levels}
    expected_warnings, above = [], {}
    for window in range(BATCHES // LOG_EVERY):
        rows = [(step, norms) for step, norms in reference.rows if (step - 1) // LOG_EVERY == window]
        for part in sorted({part for _, norms in rows for part in norms}):
            values = [(norms[part], step) for step, norms in rows if part in norms]
            peak, at = max(values, key=lambda v: v[0])  # the first step of the largest norm
            for level, threshold in levels.items():
                expected_counts[(part.split("_")[0], level)] += sum(v > threshold for v, _ in values)
                if peak > threshold and not above.get((part, level)):
                    expected_warnings.append((level, part, at))
                above[(part, level)] = peak > threshold
    assert callback.counts == expected_counts
    assert expected_counts[("critic", "warning")] > expected_counts[("critic", "critical")] > 0
    said = [re.match(r"gradient (\w+): (\w+) pre-clip gradient norm ([\d.e+-]+) exceeded [\d.e+-]+ at env step (\d+)",
                     str(w.message)) for w in caught]
    said = [(m[1], m[2], int(m[4])) for m in said if m]
    assert sorted(said) == sorted(expected_warnings) and said
    assert all(math.isfinite(n) for _, norms in reference.rows for n in norms.values())

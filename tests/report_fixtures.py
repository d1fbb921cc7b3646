"""Fake lit_td3 runs for the report tests: event files with the trainer's tags.

The files are written with torch's SummaryWriter, as the trainer's
TensorBoardLogger does, with the env step as the x-axis, so the report reads
them through the real TensorBoard event reader. The values are chosen, not
trained: ``healthy_scalars`` passes every criterion of the packaged
go_no_go.yaml, and each test bends one tag of it. A real tiny training run can
replace ``write_run(..., healthy_scalars())`` once the trainer exists.

Never import lit_td3.report here: the fixtures must not depend on the code they test.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

Scalars = dict[str, tuple[np.ndarray, np.ndarray]]

TRAIN_STEPS = np.arange(1, 101) * 50  # 100 updates logged over 5K env steps
EPISODE_STEPS = np.arange(1, 21) * 250  # 20 episodes
EVAL_STEPS = np.array([2500, 5000])
CNN_TAGS = (
    "gradients/actor_cnn_norm",
    "gradients/critic_cnn_norm",
)


def healthy_scalars(seed: int = 0, pixels: bool = True) -> Scalars:
    """A run that meets the report's post-fix expectations (section 2.2)."""
    rng = np.random.default_rng(seed)
    n = len(TRAIN_STEPS)
    progress = np.linspace(0.0, 1.0, n)
    q1 = 20.0 + 51.0 * progress + rng.normal(0.0, 0.5, n)  # report: Q 20 -> 71
    q2 = q1 + rng.normal(0.0, 0.8, n)
    zeros = np.zeros(n)
    train = {
        "gradients/actor_cnn_norm": rng.lognormal(1.0, 0.5, n),
        "gradients/actor_mlp_norm": rng.lognormal(-1.0, 0.3, n),
        "gradients/critic_cnn_norm": 5897.0 + rng.normal(0.0, 500.0, n),
        "gradients/critic_mlp_norm": 20.0 + rng.normal(0.0, 2.0, n),
        "gradients/actor_norm_clipped": np.clip(
            0.6 + rng.normal(0.0, 0.1, n), 0.1, 0.999
        ),
        "gradients/critic_norm_clipped": np.clip(
            8.0 + rng.normal(0.0, 1.0, n), 0.0, 10.0
        ),
        "gradients/actor_clip_fraction": np.clip(
            0.3 + rng.normal(0.0, 0.05, n), 0.0, 1.0
        ),
        "gradients/critic_clip_fraction": np.clip(
            0.4 + rng.normal(0.0, 0.05, n), 0.0, 1.0
        ),
        "train/actor_loss": -q1 + rng.normal(0.0, 0.5, n),
        "train/critic_loss": 2.0 + np.abs(rng.normal(0.0, 0.2, n)),
        "train/q1": q1,
        "train/q2": q2,
        "train/q_gap": 1.0 + np.abs(rng.normal(0.0, 0.1, n)),
        "alerts/gradient_warning": zeros,
        "alerts/gradient_critical": zeros,
        "alerts/nonfinite_steps": zeros,
        "perf/env_steps_per_s": 100.0 + rng.normal(0.0, 5.0, n),
    }
    episodes = np.linspace(0.0, 1.0, len(EPISODE_STEPS))
    scalars: Scalars = {tag: (TRAIN_STEPS, values) for tag, values in train.items()}
    scalars["rollout/episode_return"] = (EPISODE_STEPS, 20.0 + 10.0 * episodes)
    scalars["rollout/episode_length"] = (EPISODE_STEPS, 30.0 + 40.0 * episodes)
    scalars["eval/return"] = (EVAL_STEPS, np.array([22.0, 28.0]))
    scalars["eval/episode_length"] = (EVAL_STEPS, np.array([40.0, 65.0]))
    if not pixels:
        for tag in CNN_TAGS:
            del scalars[tag]
    return scalars


def exploding_scalars(seed: int = 1) -> Scalars:
    """Like the report's pre-fix baseline (2.1): actor CNN norms in the millions."""
    scalars = healthy_scalars(seed)
    n = len(TRAIN_STEPS)
    growth = np.geomspace(1.0, 2.67e6, n)  # actor loss -2.85 -> -7.6M
    exploded = np.arange(n) >= 12  # 88% of the updates alert
    actor_cnn = 1.826e6 * np.geomspace(0.05, 3.0, n)
    return scalars | {
        "gradients/actor_cnn_norm": (TRAIN_STEPS, actor_cnn),
        "gradients/actor_norm_clipped": (
            TRAIN_STEPS,
            actor_cnn,
        ),  # no clipping before the fix
        "gradients/actor_clip_fraction": (TRAIN_STEPS, np.zeros(n)),
        "train/actor_loss": (TRAIN_STEPS, -2.85 * growth),
        "alerts/gradient_warning": (TRAIN_STEPS, np.cumsum(exploded).astype(float)),
        "alerts/gradient_critical": (TRAIN_STEPS, np.cumsum(exploded).astype(float)),
    }


def with_values(scalars: Scalars, **changes: np.ndarray | None) -> Scalars:
    """A copy with some tags' values replaced (same steps), or dropped when None.

    Tags are keyword names with "/" written as "__": ``train__q1=...``.
    """
    changed = dict(scalars)
    for key, values in changes.items():
        tag = key.replace("__", "/")
        if values is None:
            del changed[tag]
        else:
            changed[tag] = (changed[tag][0], np.asarray(values, dtype=np.float64))
    return changed


def write_run(
    run_dir: Path, scalars: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> Path:
    """Write ``scalars`` as one new event file in ``run_dir`` (created if needed).

    A second call on the same folder is what a resumed run does: it adds a
    file, and the points it writes at steps already logged must win.
    """
    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        for tag, (steps, values) in scalars.items():
            for step, value in zip(steps, values, strict=True):
                writer.add_scalar(tag, float(value), global_step=int(step))
    finally:
        writer.close()
    return run_dir

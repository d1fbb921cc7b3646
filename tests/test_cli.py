"""End to end through the real CLI (``python -m lit_td3``), in subprocesses, on real gymnasium envs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_td3.envs import STEP_TIME_KEY
from lit_td3.report import load_run

REPO = Path(__file__).resolve().parents[1]

GRADIENT_TAGS = [
    "gradients/actor_mlp_norm", "gradients/critic_mlp_norm",
    "gradients/actor_norm_clipped", "gradients/critic_norm_clipped",
    "gradients/actor_clip_fraction", "gradients/critic_clip_fraction",
]
CNN_TAGS = ["gradients/actor_cnn_norm", "gradients/critic_cnn_norm"]
TRAIN_TAGS = ["train/actor_loss", "train/critic_loss", "train/q1", "train/q2", "train/q_gap",
              "alerts/gradient_warning", "alerts/gradient_critical", "alerts/nonfinite_steps"]
ROLLOUT_TAGS = ["rollout/episode_return", "rollout/episode_length", "eval/return", "eval/episode_length",
                "perf/env_steps_per_s", "perf/updates_per_s", "perf/env_ms", "perf/env_step_ms"]


def small_run_config(tmp_path: Path, *, every: int, env_id: str, total: int, learning_starts: int,
                     episode_steps: int, extra: dict | None = None) -> Path:
    """A config layered on configs/td3.yaml: tiny networks and a short run, so a CPU test takes seconds."""
    config = {
        "trainer": {
            "default_root_dir": str(tmp_path / "run"),
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "callbacks.EnvStepCheckpoint", "init_args": {"every_n_env_steps": every}},
                {"class_path": "callbacks.EvaluationCallback", "init_args": {"every_n_env_steps": every}},
                {"class_path": "callbacks.GradientAlertCallback"},
            ],
        },
        "model": {"network": {"hidden_sizes": [32, 32], "cnn_features": 32, "cnn_channels": [8, 16, 16]},
                  "log_every_n_env_steps": 50},
        "data": {"env_id": env_id, "total_env_steps": total, "learning_starts": learning_starts,
                 "max_episode_steps": episode_steps, "batch_size": 32, "buffer_size": 5000, "eval_episodes": 1},
    }
    for section, values in (extra or {}).items():
        config[section].update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def python_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` in the repo, headless, its output captured."""
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def lit_td3(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return python_module("lit_td3", *args, timeout=timeout)


def event_images(run_dir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import (
        IMAGES,
        EventAccumulator,
    )

    accumulator = EventAccumulator(str(run_dir), size_guidance={IMAGES: 0}).Reload()
    return accumulator.Images(tag) if tag in accumulator.Tags()["images"] else []


def counters_of(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["lit_td3"]["counters"]


@pytest.mark.parametrize(
    ("env_id", "tags"),
    [("lit_td3/CarRacing-v3", GRADIENT_TAGS + CNN_TAGS + TRAIN_TAGS + ROLLOUT_TAGS),
     ("Pendulum-v1", GRADIENT_TAGS + TRAIN_TAGS + ROLLOUT_TAGS)],
)
def test_fit_writes_every_tag_against_env_steps(tmp_path: Path, env_id: str, tags: list[str]) -> None:
    config = small_run_config(tmp_path, every=300, env_id=env_id, total=300, learning_starts=100, episode_steps=100)
    result = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    run = load_run(tmp_path / "run")
    missing = [t for t in tags if t not in run.tags]
    assert not missing, f"missing tags {missing}; have {sorted(run.tags)}"
    assert not [t for t in run.tags if STEP_TIME_KEY in t]  # a per-step time, not an episode stat
    # the x-axis is env steps: learning starts at 100 and the run ends at 300
    assert run["train/critic_loss"].steps.min() >= 100
    assert run["train/critic_loss"].steps.max() <= 300
    assert run["rollout/episode_length"].values.tolist()[:2] == [100.0, 100.0]
    if env_id == "Pendulum-v1":
        assert not [t for t in run.tags if "_cnn_" in t]
    else:  # the policy can be watched: a frame strip of the first evaluation episode
        images = event_images(tmp_path / "run", "eval/first_episode")
        assert images and images[0].width == 16 * 84 and images[0].height == 84
    final = counters_of(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert final["env_steps"] == 300
    assert final["critic_updates"] == 200  # replay ratio 1 after learning_starts
    assert final["actor_updates"] == 100  # policy_freq 2
    assert final["episodes"] == 3


def test_resume_continues_the_env_step_count(tmp_path: Path) -> None:
    config = small_run_config(tmp_path, every=100, env_id="Pendulum-v1", total=200, learning_starts=100,
                              episode_steps=50)
    first = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    assert counters_of(tmp_path / "run" / "checkpoints" / "last.ckpt")["env_steps"] == 200

    second = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config),
                     "--data.total_env_steps", "400", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-3000:]
    counters = counters_of(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert counters["env_steps"] == 400  # continued from 200, not restarted at 0
    assert counters["critic_updates"] == 300
    assert counters["episodes"] == 8
    critic_loss = load_run(tmp_path / "run")["train/critic_loss"]
    assert critic_loss.steps.max() == 400
    assert (tmp_path / "run" / "checkpoints" / "env_step=400.ckpt").is_file()

    validated = lit_td3("validate", "--config", "configs/td3.yaml", "--config", str(config), "--ckpt_path", "last")
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert "eval/return" in validated.stdout


def test_print_config_runs_as_is(tmp_path: Path) -> None:
    config = small_run_config(tmp_path, every=100, env_id="Pendulum-v1", total=120, learning_starts=60,
                              episode_steps=60, extra={"data": {"batch_size": 16}})
    printed = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config),
                      "--model.gradient_clipping.actor_max_norm", "5.0", "--float32_matmul_precision", "high",
                      "--print_config")
    assert printed.returncode == 0, printed.stderr[-3000:]
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["model"]["gradient_clipping"]["actor_max_norm"] == 5.0
    assert resolved["float32_matmul_precision"] == "high"
    assert resolved["data"]["env_id"] == "Pendulum-v1"
    (tmp_path / "printed.yaml").write_text(printed.stdout)
    run = lit_td3("fit", "--config", str(tmp_path / "printed.yaml"))
    assert run.returncode == 0, run.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"] == resolved["model"] and saved["data"] == resolved["data"]
    assert saved["float32_matmul_precision"] == "high"


def test_float32_matmul_precision_is_set_before_anything_is_built(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from lit_td3.cli import TD3CLI

    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything's; later subprocesses must not inherit them
        monkeypatch.delenv(name, raising=False)
    before = torch.get_float32_matmul_precision()
    try:
        for value in ("high", "medium", "highest"):
            cli = TD3CLI(args=["--config", str(REPO / "configs" / "td3.yaml"), "--trainer.default_root_dir",
                               str(tmp_path / "run"), "--float32_matmul_precision", value], run=False)
            assert torch.get_float32_matmul_precision() == value
            assert not hasattr(cli.model, "actor")  # set before the networks exist
    finally:
        torch.set_float32_matmul_precision(before)


def test_progress_bar_counts_env_steps_and_one_switch_turns_it_or_checkpoints_off(tmp_path: Path) -> None:
    config = small_run_config(tmp_path, every=150, env_id="Pendulum-v1", total=150, learning_starts=50,
                              episode_steps=50, extra={"data": {"batch_size": 16}})
    shown = yaml.safe_load(config.read_text())
    shown["trainer"]["enable_progress_bar"] = True
    shown["trainer"]["callbacks"].append({"class_path": "callbacks.EnvStepProgressBar",
                                          "init_args": {"refresh_every_s": 0.0}})
    config.write_text(yaml.safe_dump(shown))
    result = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).replace("\r", "\n").strip().splitlines()
    bar = [line for line in lines if "150/150" in line]
    assert bar, result.stderr[-2000:]
    for field in ("env steps", "env/s=", "upd/s=", "return=", "warn=", "crit=", "buffer=150/5000"):
        assert field in bar[-1], (field, bar[-1])

    # A resume continues mid-epoch, where Lightning calls no on_train_epoch_start: the bar still counts env steps.
    resumed = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config), "--ckpt_path", "last",
                      "--data.total_env_steps", "250")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = (resumed.stdout + resumed.stderr).replace("\r", "\n").strip().splitlines()
    bar = [line for line in lines if "/250 " in line]
    assert bar and "250/250 " in bar[-1] and "env steps" in bar[-1], (lines[-5:], bar[-1:])

    # The same switch turns checkpoints off: the config's EnvStepCheckpoint goes with it (Lightning would refuse it).
    quiet = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
                    "--trainer.default_root_dir", str(tmp_path / "quiet"))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "env steps" not in quiet.stdout + quiet.stderr
    assert (tmp_path / "quiet" / "config.yaml").is_file()
    assert not (tmp_path / "quiet" / "checkpoints").exists()


def test_a_run_stopped_by_max_time_checkpoints_where_it_stopped(tmp_path: Path) -> None:
    # trainer.max_time is a wall-clock budget: the run stops between env steps, and EnvStepCheckpoint saves there, with
    # the buffer, so that `--ckpt_path last` continues without losing a step.
    config = small_run_config(tmp_path, every=100_000, env_id="Pendulum-v1", total=100_000, learning_starts=50,
                              episode_steps=50, extra={"data": {"async_envs": False, "eval_episodes": 0}})
    result = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config), "--trainer.max_time", "00:00:00:08")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    saved = [p.name for p in checkpoints.glob("env_step=*.ckpt")]
    assert len(saved) == 1, saved  # the cadence (100,000 env steps) never came: this is the stop's checkpoint
    steps = int(saved[0].removeprefix("env_step=").removesuffix(".ckpt"))
    assert 50 < steps < 100_000
    assert counters_of(checkpoints / "last.ckpt")["env_steps"] == steps
    assert (checkpoints / f"replay_buffer-env_step={steps}.pt").is_file()

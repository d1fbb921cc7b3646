"""Numerical faults: skipped non-finite updates, the stop after K in a row, env outputs rejected at the boundary,
refused non-finite checkpoints, and alerts on an injected blow-up.

End-to-end tests run the real CLI in a subprocess on ``FaultyPendulum``, a real Pendulum-v1 with faults injected;
the subprocess imports this module first so that the env is registered (hence synchronous envs there).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from gymnasium.envs.classic_control.pendulum import PendulumEnv

from lit_td3.buffer import ReplayBuffer
from lit_td3.module import NonFiniteTrainingError, TD3Module
from lit_td3.report import load_run
from tests.conftest import fit_batches, make_module, random_batch
from tests.test_resume import checkpoints_of, fit, load, run_config

FAULTY_ENV_ID = "lit_td3_test/FaultyPendulum-v0"
WITH_FAULTY_ENV = [sys.executable, "-c", "import tests.test_faults; from lit_td3.cli import main; main()"]
VECTOR = {"vector": [3]}


class FaultyPendulum(gym.Wrapper):
    """Pendulum-v1 with rewards scaled by ``reward_scale`` and NaN rewards / observations at the given env steps
    (counted over the env's whole life, as lit_td3 counts env steps), in the envs of ``faulty_envs`` (global env
    indices: rank * num_envs + slot; default all)."""

    def __init__(self, reward_scale: float = 1.0, nan_reward_at: list[int] | None = None,
                 nan_obs_at: list[int] | None = None, env_index: int = 0,
                 faulty_envs: list[int] | None = None) -> None:
        super().__init__(PendulumEnv())
        self.reward_scale, self.steps = reward_scale, 0
        faulty = faulty_envs is None or env_index in faulty_envs
        self.nan_reward_at = set(nan_reward_at or []) if faulty else set()
        self.nan_obs_at = set(nan_obs_at or []) if faulty else set()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        reward = float("nan") if self.steps in self.nan_reward_at else float(reward) * self.reward_scale
        if self.steps in self.nan_obs_at:
            obs = np.full_like(obs, np.nan)
        return obs, reward, terminated, truncated, info


if FAULTY_ENV_ID not in gym.registry:
    gym.register(FAULTY_ENV_ID, entry_point=FaultyPendulum, max_episode_steps=200, kwargs={"env_index": 0})


def faulty_config(folder: Path, *, total: int, env_kwargs: dict[str, Any], model: dict[str, Any] | None = None) -> Path:
    return run_config(folder, env_id=FAULTY_ENV_ID, total=total, every=total, episode_steps=50, learning_starts=50,
                      data={"async_envs": False, "eval_episodes": 0, "env_kwargs": env_kwargs}, model=model)


def env_steps_named(stderr: str, pattern: str) -> list[int]:
    """The env steps of the stderr lines matching ``pattern`` (which ends where 'at env step N' follows)."""
    return [int(n) for n in re.findall(pattern + r".*?at env step (\d+)", stderr)]


# ---------------------------------------------------------------------------------------------------- in process
class Snapshots(pl.Callback):
    """The critic's weights and Adam state after every batch, and the env step each batch pretends to be at."""

    def __init__(self) -> None:
        self.critic: list[list[torch.Tensor]] = []
        self.adam_steps: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: TD3Module, batch: Any, batch_idx: int) -> None:
        pl_module.counters.env_steps = 1000 + batch_idx

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: TD3Module, *args: Any) -> None:
        self.critic.append([p.detach().clone() for p in pl_module.critic.parameters()])
        critic_opt = trainer.optimizers[1]
        self.adam_steps.append(float(critic_opt.state[next(pl_module.critic.parameters())].get("step", 0)))


def test_a_nonfinite_loss_skips_that_update_and_names_network_and_env_step() -> None:
    torch.manual_seed(0)
    module = make_module(VECTOR, 1, policy_freq=1, log_every_n_env_steps=1)  # the guard is read at every batch
    batches = [random_batch(VECTOR, 1, seed=i) for i in range(4)]
    batches[2].reward[0] = float("nan")  # one NaN reward: the critic's TD target and loss are NaN
    snapshots = Snapshots()
    with pytest.warns(UserWarning, match=r"non-finite critic loss at env step 1002: critic update skipped"):
        fit_batches(module, batches, [snapshots])
    same = [all(torch.equal(a, b) for a, b in zip(before, after))
            for before, after in zip(snapshots.critic, snapshots.critic[1:])]
    assert same == [False, True, False]  # only the NaN batch left the critic's weights as they were
    assert snapshots.adam_steps == [1.0, 2.0, 2.0, 3.0]  # and Adam's moments: that step did not happen
    assert module.counters.nonfinite_steps == 1
    assert module.counters.actor_updates == 4  # the actor's loss does not see rewards: its steps went on
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_k_nonfinite_updates_of_one_network_in_a_row_stop_the_run() -> None:
    torch.manual_seed(0)
    module = make_module(VECTOR, 1, policy_freq=1, max_consecutive_nonfinite=3, log_every_n_env_steps=1)
    with torch.no_grad():
        next(module.critic_target.parameters()).fill_(float("nan"))  # every TD target is NaN from here on
    batches = [random_batch(VECTOR, 1, seed=i) for i in range(6)]
    # The actor's finite steps in between do not reset the critic's streak.
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive non-finite critic updates"):
        fit_batches(module, batches, [Snapshots()])
    assert module.counters.nonfinite_steps == 3
    # Two finite actor steps came between the critic's three; the stop comes at the log point after the third
    # batch, after its actor step.
    assert module.counters.actor_updates == 3


class CheckpointAfterBatch(pl.Callback):
    """Batch i comes at env step i + 1; a checkpoint is written after batch ``at``."""

    def __init__(self, path: Path, at: int) -> None:
        self.path, self.at = path, at

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: TD3Module, batch: Any, batch_idx: int) -> None:
        pl_module.counters.env_steps = batch_idx + 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: TD3Module, *args: Any) -> None:
        if pl_module.counters.env_steps == self.at + 1:
            trainer.save_checkpoint(self.path)


def test_a_stop_that_a_checkpoint_read_between_log_points_still_comes_at_the_log_point(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = make_module(VECTOR, 1, policy_freq=1, max_consecutive_nonfinite=2, log_every_n_env_steps=4)
    batches = [random_batch(VECTOR, 1, seed=i) for i in range(6)]
    for batch in batches[:3]:
        batch.reward[0] = float("nan")  # three non-finite critic updates in a row, then finite ones
    checkpoint = CheckpointAfterBatch(tmp_path / "mid.ckpt", at=2)  # reads the device counts before the log point
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive non-finite critic updates .* by env step 4"):
        fit_batches(module, batches, [checkpoint])
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=True)["lit_td3"]["counters"]
    assert saved["nonfinite_steps"] == 3 and saved["consecutive_nonfinite"]["critic"] == 3
    assert module.counters.critic_updates == 4  # the streak had ended, yet the log point stopped the run


def test_a_nonfinite_weight_is_never_written_to_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = make_module(VECTOR, 1)
    trainer = fit_batches(module, [random_batch(VECTOR, 1, seed=i) for i in range(2)], [])
    trainer.save_checkpoint(tmp_path / "finite.ckpt")
    with torch.no_grad():
        module.actor.head[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite values in \['actor\.head\.0\.weight'\]"):
        trainer.save_checkpoint(tmp_path / "nonfinite.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finite.ckpt"]  # nothing written, not even a temp file


# ---------------------------------------------------------------------------------------------------- end to end
def test_nonfinite_env_outputs_are_rejected_counted_and_reported_with_their_env_step(tmp_path: Path) -> None:
    config = faulty_config(tmp_path, total=100, env_kwargs={"nan_reward_at": [30], "nan_obs_at": [70]})
    done = fit(config, command=WITH_FAULTY_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert env_steps_named(done.stderr, "env 0 returned a non-finite reward") == [30]
    assert env_steps_named(done.stderr, "env 0 returned a non-finite observation 'vector'") == [70]
    run = load_run(config.parent / "run")
    assert run["rollout/nonfinite_env_output"].steps.tolist() == [30, 70]  # each ended its episode, truncated
    count = run["alerts/nonfinite_env_outputs"]
    assert count.values[count.steps == 70].tolist() == [2.0] and count.values[-1] == 2.0
    final = load(checkpoints_of(config) / "last.ckpt")["lit_td3"]
    assert final["counters"]["nonfinite_env_outputs"] == 2
    buffer = ReplayBuffer.from_file(checkpoints_of(config) / final["buffer_files"][0])
    assert len(buffer) == 98  # the two faulty steps were never written
    stored = buffer.get(torch.arange(len(buffer)))
    assert torch.isfinite(stored.reward).all() and torch.isfinite(stored.next_obs["vector"]).all()


def test_k_nonfinite_updates_stop_the_run_with_a_checkpoint_of_the_last_finite_state(tmp_path: Path) -> None:
    # Rewards x1e30 are finite (float32 holds 3.4e38) but every critic loss (q - y)^2 overflows to inf.
    config = faulty_config(tmp_path, total=300, env_kwargs={"reward_scale": 1e30},
                           model={"max_consecutive_nonfinite": 5, "log_every_n_env_steps": 1})
    stopped = fit(config, command=WITH_FAULTY_ENV)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    skipped = env_steps_named(stopped.stderr, "non-finite critic loss")
    assert len(skipped) == 5 and skipped[0] == 51  # the first update after learning_starts=50, then 4 more
    assert "5 consecutive non-finite critic updates (model.max_consecutive_nonfinite=5)" in stopped.stderr
    checkpoint = load(checkpoints_of(config) / "last.ckpt")  # written on the way out, not a periodic one
    counters = checkpoint["lit_td3"]["counters"]
    assert counters["env_steps"] == skipped[-1] and counters["nonfinite_steps"] == 5
    weights = checkpoint["state_dict"]
    assert all(torch.isfinite(t).all() for t in weights.values())
    # The critic never stepped: its Polyak-averaged target is still an exact copy of it.
    critic = {k.removeprefix("critic."): v for k, v in weights.items() if k.startswith("critic.")}
    target = {k.removeprefix("critic_target."): v for k, v in weights.items() if k.startswith("critic_target.")}
    assert critic.keys() == target.keys() and all(torch.equal(critic[k], target[k]) for k in critic)


def test_an_injected_blow_up_raises_the_alerts_within_a_few_updates_naming_the_network(tmp_path: Path) -> None:
    # Rewards x1e6 and the critic's learning rate x1e4 without clipping, with Pendulum's true reward bound
    # (16.3) configured: a healthy run raises no Q alert (tests/test_resume.py checks that control).
    config = faulty_config(tmp_path, total=100, env_kwargs={"reward_scale": 1e6},
                           model={"reward_bound": 16.3, "critic_mlp_lr": 3.0, "gradient_clipping": {"enabled": False}})
    done = fit(config, command=WITH_FAULTY_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    critical = env_steps_named(done.stderr, "gradient critical: critic_mlp pre-clip gradient norm")
    q_bound = env_steps_named(done.stderr, r"Q-bound alert")
    assert critical and critical[0] <= 50 + 2  # learning starts after env step 50: within 2 updates
    assert q_bound and q_bound[0] <= 50 + 10  # within 10 updates
    assert re.search(r"Q-bound alert at env step \d+: the critic's mean Q1\(s, mu\(s\)\) is -?[\d.e+]+, "
                     r"beyond \+-3260", done.stderr)
    counters = load(checkpoints_of(config) / "last.ckpt")["lit_td3"]["counters"]
    assert counters["q_bound_alerts"] > 0
    assert load_run(config.parent / "run")["alerts/q_bound"].values[-1] == counters["q_bound_alerts"]

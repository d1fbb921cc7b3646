"""The rollout stream: what it writes into the buffer, and which actions it takes."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lit_td3.data import RolloutDataModule, RolloutStream, numeric_info
from lit_td3.envs import DISCARD_KEY, STEP_TIME_KEY
from lit_td3.module import RunCounters


class Countdown(gym.Env):
    """obs = [t, episode]; terminates when t reaches `terminate_at` (if set), fault at `discard_at` (if set); each
    step takes `delay` seconds."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)

    def __init__(self, terminate_at: int | None = None, discard_at: int | None = None, delay: float = 0.0) -> None:
        self.terminate_at, self.discard_at, self.delay = terminate_at, discard_at, delay
        self.episode = -1

    def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t, self.episode = 0, self.episode + 1
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        return np.array([self.t, self.episode], dtype=np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        time.sleep(self.delay)
        self.t += 1
        if self.discard_at is not None and self.t == self.discard_at:
            return np.zeros(2, np.float32), 0.0, False, True, {DISCARD_KEY: True, "crash": 1.0}
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return self._obs(), float(self.t), terminated, False, {"distance_m": 2.0 * self.t}


COUNTDOWN_ID = "lit_td3_test/Countdown-v0"
gym.register(COUNTDOWN_ID, entry_point=Countdown)


class FakeAgent:
    """What the stream needs of the module: counters, a policy, the log cadence."""

    def __init__(self, action: float = 0.5) -> None:
        self.counters = RunCounters()
        self.log_every_n_env_steps = 1000
        self.trainer = SimpleNamespace(should_stop=False, received_sigterm=False,
                                       strategy=SimpleNamespace(signal_vote=None))
        self.action = action

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.full((len(obs["vector"]), 1), self.action, dtype=np.float32)


def run_stream(steps: int, learning_starts: int | None = None, **env_kwargs: Any) -> tuple[RolloutDataModule, FakeAgent]:
    dm = RolloutDataModule(env_id=COUNTDOWN_ID, env_kwargs=env_kwargs, max_episode_steps=5,
                           async_envs=False, total_env_steps=steps, learning_starts=learning_starts or steps,
                           buffer_size=100, batch_size=1, exploration_noise=0.0)
    dm.setup("fit")
    agent = FakeAgent()
    assert list(RolloutStream(dm, agent)) == []  # all steps before learning_starts: nothing to learn from
    return dm, agent


def stored(dm: RolloutDataModule) -> list[tuple[list[float], list[float], float, float]]:
    batch = dm.buffer.get(torch.arange(len(dm.buffer)))
    return [(o.tolist(), n.tolist(), r, t) for o, n, r, t in
            zip(batch.obs["vector"], batch.next_obs["vector"], batch.reward.tolist(), batch.terminated.tolist())]


def test_terminations_stop_the_bootstrap_and_truncations_do_not() -> None:
    dm, agent = run_stream(8, terminate_at=3)  # episodes of 3 steps, terminated
    rows = stored(dm)
    assert [t for *_, t in rows] == [0, 0, 1, 0, 0, 1, 0, 0]
    # next_obs of the last step is the true final observation, not the next episode's reset observation
    assert rows[2][1] == [3.0, 0.0] and rows[3][0] == [0.0, 1.0]
    assert agent.counters.env_steps == 8 and agent.counters.episodes == 2
    assert agent.trainer.should_stop

    dm, agent = run_stream(7)  # no termination: the time limit (5) truncates
    rows = stored(dm)
    assert [t for *_, t in rows] == [0] * 7
    assert rows[4][1] == [5.0, 0.0] and rows[5][0] == [0.0, 1.0]


def test_a_discarded_step_writes_nothing_and_ends_the_episode() -> None:
    dm, agent = run_stream(6, discard_at=3)  # each episode: 2 real steps, then a fault
    rows = stored(dm)
    assert len(rows) == 4  # steps 3 and 6 were faults
    assert [r[0] for r in rows] == [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    assert all(r[1] != [0.0, 0.0] for r in rows)  # the fault's bogus observation never became a next_obs
    assert agent.counters.episodes == 2
    assert dm.last_episode.info["faults"] == 1.0 and dm.last_episode.info["crash"] == 1.0


def test_random_actions_before_learning_starts_then_policy_plus_noise() -> None:
    dm = RolloutDataModule(env_id=COUNTDOWN_ID, async_envs=False, total_env_steps=100,
                           learning_starts=50, buffer_size=100, batch_size=1, exploration_noise=0.1)
    dm.setup("fit")
    agent = FakeAgent(action=0.5)
    dm._obs = {"vector": np.zeros((1, 2), np.float32)}
    early = np.concatenate([dm.explore(None, agent) for _ in range(200)])
    agent.counters.env_steps = 50
    late = np.concatenate([dm.explore(None, agent) for _ in range(200)])
    assert early.min() < -0.8 and early.max() > 0.8  # uniform over [-1, 1], the policy ignored
    assert abs(late.mean() - 0.5) < 0.05 and 0.07 < late.std() < 0.13  # mu(s) + N(0, 0.1)
    assert late.min() >= -1.0 and late.max() <= 1.0


def timed_stream(agent: FakeAgent, write_s: float, **kwargs: Any) -> dict[str, float]:
    """Streams 21 Countdown steps (one random, then one batch each) with every buffer write ``write_s`` seconds
    slower; returns the ``perf/*`` of the stream's last log point, which covers all 21."""
    dm = RolloutDataModule(**{"env_id": COUNTDOWN_ID, "async_envs": False, "total_env_steps": 21, "learning_starts": 1,
                              "buffer_size": 100, "batch_size": 1, "exploration_noise": 0.0, **kwargs})
    dm.setup("fit")
    add, flush, flushed = dm.buffer.add, dm.timings.flush, []
    dm.buffer.add = lambda *a, **kw: (time.sleep(write_s), add(*a, **kw))[1]
    dm.timings.flush = lambda *args: flushed.append(flush(*args)) or flushed[-1]
    try:
        assert len(list(RolloutStream(dm, agent))) == 20
    finally:
        dm.teardown("fit")
    return flushed[-1]


def test_the_stream_times_the_policy_step_and_the_buffer_write_apart_from_the_env_step() -> None:
    agent = FakeAgent()
    act = agent.act
    agent.act = lambda obs: (time.sleep(0.02), act(obs))[1]
    perf = timed_stream(agent, write_s=0.03)
    assert perf["perf/act_ms"] >= 20 * 20 / 21  # the first of the 21 steps acts at random, without the agent
    assert perf["perf/write_ms"] >= 30
    assert perf["perf/env_ms"] < 10  # a Countdown step takes microseconds: neither sleep is counted in it
    # One env, synchronous: the three stages are disjoint parts of each env step's wall time.
    assert perf["perf/env_ms"] + perf["perf/act_ms"] + perf["perf/write_ms"] <= 1000 / perf["perf/env_steps_per_s"]


@pytest.mark.parametrize("async_envs", [False, True])
def test_the_env_steps_own_time_is_measured_where_it_runs(async_envs: bool) -> None:
    # In worker processes the env id names this module, which registers Countdown there too.
    env_id = f"{__name__}:{COUNTDOWN_ID}" if async_envs else COUNTDOWN_ID
    perf = timed_stream(FakeAgent(), write_s=0.025, env_id=env_id, env_kwargs={"delay": 0.04},
                        async_envs=async_envs, max_episode_steps=50)
    assert perf["perf/env_step_ms"] >= 40
    if async_envs:
        # The learner waits for the step less than the step takes: the buffer write ran while the worker stepped.
        assert perf["perf/env_ms"] <= perf["perf/env_step_ms"] - 10
    else:
        # In-process the wait is the step itself (plus the vector env's own bookkeeping), and holds no write.
        assert perf["perf/env_step_ms"] <= perf["perf/env_ms"] < perf["perf/env_step_ms"] + 10


def test_env_actions_are_rescaled_to_the_env_bounds() -> None:
    from lit_td3.envs import make_env

    env = make_env("lit_td3/CarRacing-v3", seed=0)
    assert env.action_space.low.tolist() == [-1.0, -1.0, -1.0]
    assert env.observation_space["image"].shape == (4, 84, 84)
    assert env.observation_space["image"].dtype == np.uint8
    # the actor's -1 means no gas and no brake: CarRacing's own bounds are [-1,0,0]..[1,1,1]
    assert env.unwrapped.action_space.low.tolist() == [-1.0, 0.0, 0.0]
    assert gym.wrappers.RescaleAction in [type(w) for w in _wrappers(env)]
    env.close()


def _wrappers(env: gym.Env) -> list[gym.Env]:
    out = []
    while isinstance(env, gym.Wrapper):
        out.append(env)
        env = env.env
    return out


def test_unknown_env_id_carries_gymnasiums_suggestion() -> None:
    with pytest.raises(ValueError, match=r"data.env_id='CarRacing-v2'.*"):
        RolloutDataModule(env_id="CarRacing-v2")


def test_numeric_info_keeps_the_numeric_scalars() -> None:
    info = {"collision": True, "distance_m": np.float32(3.5), "name": "x", "terms": {"progress": 1.0},
            "reward/progress": 2}
    assert numeric_info(info) == {"collision": 1.0, "distance_m": 3.5, "reward/progress": 2.0}
    # lit_td3's own per-step keys are not episode stats
    assert numeric_info({**info, DISCARD_KEY: True, STEP_TIME_KEY: 0.004}) == numeric_info(info)


def async_pendulum_stream() -> tuple[RolloutDataModule, FakeAgent, gym.vector.VectorEnv]:
    """Two Pendulum envs in worker processes, 40 env steps, one update per 2 env steps from env step 10."""
    dm = RolloutDataModule(env_id="Pendulum-v1", num_envs=2, async_envs=True, total_env_steps=40, learning_starts=10,
                           buffer_size=100, batch_size=4, exploration_noise=0.0, replay_ratio=0.5)
    dm.setup("fit")
    return dm, FakeAgent(), dm.training_envs()


def test_async_stream_writes_a_step_while_the_envs_compute_the_next_and_samples_see_every_finished_step() -> None:
    dm, agent, envs = async_pendulum_stream()
    events: list[tuple[str, int]] = []
    add, step_async = dm.buffer.add, envs.step_async

    def logged_add(*args: Any, **kwargs: Any) -> None:
        events.append(("add", len(dm.buffer)))
        add(*args, **kwargs)

    def logged_step_async(actions: np.ndarray) -> None:
        events.append(("step", agent.counters.env_steps))
        step_async(actions)

    dm.buffer.add, envs.step_async = logged_add, logged_step_async
    at_yields = []
    try:
        for _ in RolloutStream(dm, agent):
            at_yields.append((len(dm.buffer), agent.counters.env_steps))
    finally:
        dm.teardown("fit")

    kinds = [kind for kind, _ in events]
    # Every vector step's transitions are written after the next step was issued, the last one at the end.
    assert kinds == ["step"] + ["step", "add"] * 19 + ["add"]
    assert [n for kind, n in events if kind == "add"] == list(range(0, 40, 2))
    # Yet every batch is drawn from all transitions of the finished steps, as if each were written at once.
    assert len(at_yields) == 15 and all(stored == steps for stored, steps in at_yields)
    assert len(dm.buffer) == agent.counters.env_steps == 40
    # Written a step late, each transition still holds its own observations: row t + 2 (the same env, one step on)
    # starts where row t ended, and Pendulum moves at every step (time limit 200: no episode ends here).
    batch = dm.buffer.get(torch.arange(40))
    obs, next_obs = batch.obs["vector"], batch.next_obs["vector"]
    assert torch.equal(obs[2:], next_obs[:-2])
    assert not (obs == next_obs).all(dim=1).any()


def break_the_env_pipe_at(dm: RolloutDataModule, agent: FakeAgent, envs: gym.vector.VectorEnv, env_step: int,
                          after_sigterm: bool) -> None:
    """Runs the stream until its env workers' pipe breaks at ``env_step``, the learner having received SIGTERM first
    or not; what the stream raises propagates."""
    step_async = envs.step_async

    def failing_step_async(actions: np.ndarray) -> None:
        if agent.counters.env_steps == env_step:
            agent.trainer.received_sigterm = after_sigterm
            raise BrokenPipeError("env worker gone")
        step_async(actions)

    envs.step_async = failing_step_async
    try:
        list(RolloutStream(dm, agent))
    finally:
        dm.teardown("fit")


def test_an_env_step_that_fails_to_start_leaves_every_counted_step_in_the_buffer() -> None:
    dm, agent, envs = async_pendulum_stream()
    with pytest.raises(BrokenPipeError):
        break_the_env_pipe_at(dm, agent, envs, 16, after_sigterm=False)
    # What a crash checkpoint would save: the transitions of all 16 counted env steps, the last written on the way out.
    assert agent.counters.env_steps == len(dm.buffer) == 16


@pytest.mark.parametrize("after_sigterm", [True, False])
def test_under_ddp_a_broken_env_pipe_waits_for_the_signal_vote_of_its_env_step(after_sigterm: bool) -> None:
    # SLURM's SIGTERM kills the env workers too. A rank that met their broken pipe and raised at once would stop alone
    # while the other ranks wait for it in a collective; the stream holds the error until the signal vote after the
    # env step, which every rank reaches. Here the vote stops the ranks when this rank noted SIGTERM (as
    # lit_td3.distributed._SignalVote); without one, the env failure is raised after it.
    dm, agent, envs = async_pendulum_stream()
    votes: list[int] = []

    def vote() -> None:
        votes.append(agent.counters.env_steps)
        if agent.trainer.received_sigterm:
            raise SIGTERMException()

    agent.trainer.strategy.signal_vote = vote
    with pytest.raises(SIGTERMException if after_sigterm else BrokenPipeError):
        break_the_env_pipe_at(dm, agent, envs, 16, after_sigterm=after_sigterm)
    assert votes == list(range(0, 17, 2))  # one per vector step of 2 envs, the failed one's included
    assert agent.counters.env_steps == len(dm.buffer) == 16


def test_an_env_worker_gone_after_sigterm_is_the_stop_not_an_env_failure() -> None:
    # The group's SIGTERM (SLURM, `timeout`) can end the env workers before the learner stops at the end of its batch
    # (tests/test_resume.py forces it in a real run): the broken pipe then means "stop", exit 143 with a checkpoint.
    dm, agent, envs = async_pendulum_stream()
    with pytest.raises(SIGTERMException):
        break_the_env_pipe_at(dm, agent, envs, 16, after_sigterm=True)
    assert agent.counters.env_steps == len(dm.buffer) == 16

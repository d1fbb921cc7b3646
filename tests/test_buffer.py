"""Tests for lit_td3.buffer: deduplicated frame stacks against a naive full-stack buffer, errors, files.

Observations come from real gymnasium frame stacking (``FrameStackObservation``) inside a real ``SyncVectorEnv`` with
``SAME_STEP`` autoreset, driven the way the rollout stream drives it; the reference buffer stores whatever ``add`` was
given, full stacks and all, so it cannot share a bug with the buffer under test.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lit_td3.buffer as buffer_module
from lit_td3.buffer import ReplayBuffer, Transition
from lit_td3.files import CheckpointWriteError
from tests.conftest import needs_gpu

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FRAME_HW = (3, 2)
ACTION_DIM = 2
VECTOR_DIM = 3
# What each env does at one step of its plan; any larger code continues the episode.
TERMINATE, TRUNCATE, DISCARD, DISCARD_TRUNCATE = 0, 1, 2, 3


class PlannedEnv(gym.Env):
    """Tiny frames whose episodes end where a plan says. Pixel (0,0) is the env index and (0,1), (1,0) a frame
    counter, so a frame from another env or step never equals the right one; a quarter of steps repeat the last
    frame (a still scene) so that equal neighbouring frames occur too."""

    def __init__(self, index: int, plan: list[int], seed: int, with_vector: bool) -> None:
        self.index, self.plan, self.steps, self.frames = index, plan, 0, 0
        self.rng = np.random.default_rng(seed)
        self.with_vector = with_vector
        self.last: np.ndarray | None = None
        image = spaces.Box(0, 255, FRAME_HW, np.uint8)
        vector = spaces.Box(-np.inf, np.inf, (VECTOR_DIM,), np.float32)
        self.observation_space = spaces.Dict({"image": image, "vector": vector}) if with_vector else image
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    def _observe(self, fresh: bool) -> Any:
        if fresh or self.last is None or self.rng.random() >= 0.25:
            self.frames += 1
            self.last = self.rng.integers(0, 2, FRAME_HW, dtype=np.uint8)
            self.last[0, 0], self.last[0, 1], self.last[1, 0] = self.index, self.frames % 256, self.frames // 256
        image = self.last.copy()
        if not self.with_vector:
            return image
        return {"image": image, "vector": self.rng.normal(size=VECTOR_DIM).astype(np.float32)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self._observe(fresh=True), {}

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict]:
        code = self.plan[self.steps] if self.steps < len(self.plan) else 99
        self.steps += 1
        return (self._observe(fresh=False), float(self.rng.normal()), code == TERMINATE,
                code in (TRUNCATE, DISCARD_TRUNCATE), {})


class BufferObservation(gym.ObservationWrapper):
    """The project's observation convention: ``image`` stacked, ``vector`` the current one."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.observation_space
        if isinstance(space, spaces.Dict):
            vector = spaces.Box(-np.inf, np.inf, (VECTOR_DIM,), np.float32)
            self.observation_space = spaces.Dict({"image": space["image"], "vector": vector})
        else:
            self.observation_space = spaces.Dict({"image": space})

    def observation(self, observation: Any) -> dict[str, np.ndarray]:
        if isinstance(observation, Mapping):
            return {"image": observation["image"], "vector": observation["vector"][-1]}
        return {"image": observation}


@dataclasses.dataclass
class Scenario:
    num_envs: int
    stack: int
    with_vector: bool
    padding: str
    capacity: int
    ample_frames: bool
    plan: list[list[int]]
    resets: set[int] = dataclasses.field(default_factory=set)
    reloads: set[int] = dataclasses.field(default_factory=set)
    seed: int = 0

    @property
    def steps(self) -> int:
        return len(self.plan[0])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"image": (self.stack, *FRAME_HW)}
        if self.with_vector:
            shapes["vector"] = (VECTOR_DIM,)
        return shapes

    def make_buffer(self, device: str) -> ReplayBuffer:
        # Enough spare frames for a first frame of every episode: then nothing is evicted before the ring is full.
        spare = self.stack * self.num_envs * (self.steps + len(self.resets) + 1) if self.ample_frames else 0
        return ReplayBuffer(self.capacity, self.shapes(), ACTION_DIM, self.num_envs, device, seed=self.seed,
                            spare_frames=spare)

    def make_envs(self) -> gym.vector.SyncVectorEnv:
        def factory(i: int) -> Any:
            def make() -> gym.Env:
                env = PlannedEnv(i, self.plan[i], self.seed * 31 + i, self.with_vector)
                return BufferObservation(gym.wrappers.FrameStackObservation(env, self.stack, padding_type=self.padding))
            return make
        return gym.vector.SyncVectorEnv([factory(i) for i in range(self.num_envs)],
                                        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


class NaiveBuffer:
    """The obvious replay buffer: a deque of full obs/next_obs stacks, the newest ``capacity`` kept."""

    def __init__(self, capacity: int) -> None:
        self.rows: collections.deque = collections.deque(maxlen=capacity)
        self.total = 0

    def add(self, obs: dict, action: np.ndarray, reward: np.ndarray, next_obs: dict, terminated: np.ndarray,
            valid: np.ndarray) -> None:
        for i in np.flatnonzero(valid):
            self.rows.append(({k: v[i].copy() for k, v in obs.items()}, action[i].copy(), np.float32(reward[i]),
                              {k: v[i].copy() for k, v in next_obs.items()}, np.float32(terminated[i])))
            self.total += 1

    def newest(self, n: int) -> list[tuple]:
        return list(self.rows)[len(self.rows) - n:]


def true_next_obs(next_obs: dict, infos: dict, done: np.ndarray) -> dict:
    """Under SAME_STEP autoreset a done env's row already holds the reset obs; the real one is in final_obs."""
    real = {k: v.copy() for k, v in next_obs.items()}
    for i in np.flatnonzero(done):
        for k, v in infos["final_obs"][i].items():
            real[k][i] = v
    return real


def reloaded(buffer: ReplayBuffer, scenario: Scenario, device: str) -> ReplayBuffer:
    """The buffer after a trip through a file image and torch.load(weights_only=True), as on resume."""
    stream = io.BytesIO()
    torch.save(buffer.state_dict(), stream)
    stream.seek(0)
    fresh = scenario.make_buffer(device)
    fresh.load_state_dict(torch.load(stream, weights_only=True))
    return fresh


def assert_holds_newest(buffer: ReplayBuffer, naive: NaiveBuffer) -> None:
    """Every stored transition, by position, equals the naive buffer's transition at the same age."""
    n = len(buffer)
    got = buffer.get(torch.arange(n))
    assert len(got.reward) == n
    if n == 0:
        return
    want = naive.newest(n)
    for key in buffer.observation_shapes:
        for part, field in ((0, "obs"), (3, "next_obs")):
            np.testing.assert_array_equal(getattr(got, field)[key].cpu().numpy(),
                                          np.stack([row[part][key] for row in want]), err_msg=f"{field}[{key}]")
    for part, field in ((1, "action"), (2, "reward"), (4, "terminated")):
        np.testing.assert_array_equal(getattr(got, field).cpu().numpy(), np.stack([row[part] for row in want]),
                                      err_msg=field)


AroundAdd = Callable[[ReplayBuffer], contextlib.AbstractContextManager[None]]


def drive(scenario: Scenario, device: str, check_every_step: bool = True,
          around_add: AroundAdd = lambda _: contextlib.nullcontext()) -> tuple[ReplayBuffer, NaiveBuffer, int]:
    """Runs the scenario's envs, feeding both buffers; returns them and the rows of the last add. Each ``add`` runs
    inside ``around_add(buffer)``."""
    buffer, naive = scenario.make_buffer(device), NaiveBuffer(scenario.capacity)
    envs = scenario.make_envs()
    rng = np.random.default_rng(scenario.seed)
    obs, _ = envs.reset(seed=scenario.seed)
    last_rows = 0
    for k in range(scenario.steps):
        if k in scenario.resets:  # a resumed run: the envs restart, the cut episodes end here
            obs, _ = envs.reset()
            buffer.mark_episode_boundary()
        if k in scenario.reloads:
            buffer = reloaded(buffer, scenario, device)
        action = rng.uniform(-1, 1, (scenario.num_envs, ACTION_DIM)).astype(np.float32)
        next_obs, reward, terminated, truncated, infos = envs.step(action)
        real_next = true_next_obs(next_obs, infos, terminated | truncated)
        valid = np.array([plan[k] not in (DISCARD, DISCARD_TRUNCATE) for plan in scenario.plan])
        with around_add(buffer):
            buffer.add(obs, action, reward, real_next, terminated, truncated, valid=valid)
        naive.add(obs, action, reward, real_next, terminated, valid)
        last_rows = int(valid.sum())
        if check_every_step:
            assert_holds_newest(buffer, naive)
        obs = next_obs
    envs.close()
    return buffer, naive, last_rows


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    num_envs = draw(st.integers(1, 3))
    steps = draw(st.integers(0, 60))
    # How often episodes end or steps are discarded: from every step (many first frames: the frame ring, not the
    # transition ring, decides what is dropped) to one step in five.
    last_code = draw(st.sampled_from([1, 3, 7, 19]))
    codes = st.lists(st.integers(0, last_code), min_size=steps, max_size=steps)
    step_sets = st.sets(st.integers(0, max(steps - 1, 0)), max_size=3)
    return Scenario(
        num_envs=num_envs, stack=draw(st.integers(1, 4)), with_vector=draw(st.booleans()),
        padding=draw(st.sampled_from(["reset", "zero"])), capacity=draw(st.integers(num_envs, 30)),
        ample_frames=draw(st.booleans()), plan=draw(st.lists(codes, min_size=num_envs, max_size=num_envs)),
        resets=draw(step_sets), reloads=draw(step_sets), seed=draw(st.integers(0, 2**16)),
    )


# ---------------------------------------------------------------------------------------------------- content
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_every_stored_transition_equals_the_naive_full_stack_buffer(scenario: Scenario, device: str) -> None:
    """Episode starts, terminations, truncations, discarded steps, resumes, reloads, wrap-around, 1-3 envs."""
    buffer, naive, last_rows = drive(scenario, device)
    assert len(buffer) <= min(naive.total, scenario.capacity)
    assert len(buffer) >= last_rows  # the newest transitions are never the ones dropped
    if scenario.ample_frames:
        assert len(buffer) == min(naive.total, scenario.capacity)


def long_episodes(padding: str = "reset", lengths: tuple[int, ...] = (5, 7, 2)) -> Scenario:
    plan = [code for n in lengths for code in [99] * (n - 1) + [TERMINATE]]
    return Scenario(num_envs=1, stack=4, with_vector=False, padding=padding, capacity=100, ample_frames=True,
                    plan=[plan])


@pytest.mark.parametrize(("padding", "first_frames"), [("reset", 1), ("zero", 2)])
def test_each_frame_is_stored_once(padding: str, first_frames: int) -> None:
    buffer, _, _ = drive(long_episodes(padding), "cpu")
    stored = buffer.state_dict()["tensors"]["frames"]
    assert len(stored) == 14 + 3 * first_frames  # one per step, plus each episode's distinct first frames


def test_sampling_is_uniform_over_the_stored_transitions() -> None:
    buffer = ReplayBuffer(50, {"vector": (1,)}, 1, seed=3)
    for t in range(130):
        v = np.full((1, 1), t, np.float32)
        buffer.add({"vector": v}, np.zeros((1, 1), np.float32), np.array([t], np.float32), {"vector": v},
                   np.array([False]), np.array([False]))
    rewards = torch.cat([buffer.sample(50).reward for _ in range(200)]).long()
    assert rewards.min() >= 80 and rewards.max() <= 129  # only the 50 newest of 130
    counts = torch.bincount(rewards - 80, minlength=50).double()
    chi2 = float(((counts - 200) ** 2 / 200).sum())
    assert chi2 < 86.7  # 99.9% quantile of chi-square with 49 degrees of freedom


@pytest.mark.parametrize("device", DEVICES)
def test_batches_have_the_documented_dtypes_shapes_and_device(device: str) -> None:
    scenario = Scenario(num_envs=2, stack=4, with_vector=True, padding="reset", capacity=20, ample_frames=True,
                        plan=[[99] * 12, [99, 99, TRUNCATE] * 4])
    buffer, _, _ = drive(scenario, device, check_every_step=False)
    batch = buffer.sample(7)
    assert isinstance(batch, Transition)
    assert batch.obs["image"].dtype == batch.next_obs["image"].dtype == torch.uint8
    assert batch.obs["image"].shape == batch.next_obs["image"].shape == (7, 4, *FRAME_HW)
    assert batch.obs["vector"].shape == (7, VECTOR_DIM) and batch.obs["vector"].dtype == torch.float32
    assert batch.action.shape == (7, ACTION_DIM) and batch.reward.shape == batch.terminated.shape == (7,)
    assert all(t.dtype == torch.float32 for t in (batch.action, batch.reward, batch.terminated))
    assert {t.device.type for t in (batch.obs["image"], batch.next_obs["vector"], batch.action)} == {device}


@needs_gpu
def test_cuda_buffer_adds_and_samples_without_waiting_for_the_gpu() -> None:
    """The rollout writes while the learner's update runs on the GPU: an add that synchronized (a pageable copy,
    reading frames back) would make the env step wait for the update."""
    @contextlib.contextmanager
    def no_sync_allowed(buffer: ReplayBuffer) -> Iterator[None]:
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield  # the add
            buffer.sample(len(buffer))
        finally:
            torch.cuda.set_sync_debug_mode("default")

    # 30 steps of 2 envs wrap the 12-transition ring several times; drive compares with the naive buffer each step.
    scenario = Scenario(num_envs=2, stack=4, with_vector=True, padding="reset", capacity=12, ample_frames=True,
                        plan=[[99, 99, TERMINATE] * 10, [99, TRUNCATE] * 15])
    buffer, naive, _ = drive(scenario, "cuda", around_add=no_sync_allowed)
    assert naive.total == 60 and len(buffer) == 12


@needs_gpu
def test_cuda_buffer_rows_survive_a_gpu_that_lags_behind_the_adds() -> None:
    """An add's rows reach the GPU from a pinned staging area that the add after next refills. With a long kernel
    queued before every add, the host runs several adds ahead of the copies; each copy must still carry its own
    rows, not a later add's."""
    @contextlib.contextmanager
    def gpu_lagging(_: ReplayBuffer) -> Iterator[None]:
        torch.cuda._sleep(20_000_000)  # about 10 ms of GPU time queued ahead of this add's copies
        yield

    # No wrap-around (capacity 80 > 2 x 30 transitions): at the end every add's rows are still stored and compared.
    scenario = Scenario(num_envs=2, stack=4, with_vector=True, padding="reset", capacity=80, ample_frames=True,
                        plan=[[99, 99, TERMINATE] * 10, [99, TRUNCATE] * 15])
    buffer, naive, _ = drive(scenario, "cuda", check_every_step=False, around_add=gpu_lagging)
    assert len(buffer) == naive.total == 60
    assert_holds_newest(buffer, naive)


@needs_gpu
@pytest.mark.parametrize("with_vector", [False, True])
def test_cpu_buffer_batches_reach_the_gpu_as_drawn_while_the_gpu_lags(with_vector: bool) -> None:
    """A CPU buffer's batch for a GPU learner is gathered into a pinned area that the sample after next refills, and
    goes over in one asynchronous copy. With a long kernel queued before each sample, the host draws several batches
    ahead of their copies; each must still arrive as drawn on the CPU, not as a later batch."""
    scenario = Scenario(num_envs=2, stack=4, with_vector=with_vector, padding="reset", capacity=40, ample_frames=True,
                        plan=[[99, 99, TERMINATE] * 10, [99, TRUNCATE] * 15])
    buffer, _, _ = drive(scenario, "cpu", check_every_step=False)
    twin = reloaded(buffer, scenario, "cpu")  # the same transitions and sampling RNG state
    on_gpu = []
    for _ in range(6):
        torch.cuda._sleep(20_000_000)  # about 10 ms of GPU time queued ahead of this batch's copy
        on_gpu.append(buffer.sample(16, "cuda"))
    for got, want in zip(on_gpu, [twin.sample(16) for _ in range(6)], strict=True):
        tensors = [*got.obs.values(), got.action, got.reward, *got.next_obs.values(), got.terminated]
        assert {t.device.type for t in tensors} == {"cuda"}
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1  # one copy for the whole batch
        for field in Transition._fields:
            got_part, want_part = getattr(got, field), getattr(want, field)
            if isinstance(want_part, dict):
                assert got_part.keys() == want_part.keys()
                for key in want_part:
                    assert torch.equal(got_part[key].cpu(), want_part[key]), f"{field}[{key}]"
            else:
                assert torch.equal(got_part.cpu(), want_part), field


def test_vector_only_buffer_keeps_obs_and_next_obs() -> None:
    buffer = ReplayBuffer(4, {"vector": (2,)}, 1, num_envs=2)
    rng = np.random.default_rng(0)
    given_obs = []
    for _ in range(3):
        obs, nxt = rng.normal(size=(2, 2)).astype(np.float32), rng.normal(size=(2, 2)).astype(np.float32)
        buffer.add({"vector": obs}, np.zeros((2, 1), np.float32), np.zeros(2), {"vector": nxt},
                   np.array([False, True]), np.array([False, False]))
        given_obs.append((obs, nxt))
    got = buffer.get([0, 1, 2, 3])
    np.testing.assert_array_equal(got.obs["vector"].numpy(), np.concatenate([o for o, _ in given_obs[1:]]))
    np.testing.assert_array_equal(got.next_obs["vector"].numpy(), np.concatenate([n for _, n in given_obs[1:]]))
    np.testing.assert_array_equal(got.terminated.numpy(), [0, 1, 0, 1])


def test_mark_episode_boundary_starts_new_episodes_and_is_required_after_a_reset() -> None:
    scenario = Scenario(num_envs=2, stack=4, with_vector=False, padding="reset", capacity=50, ample_frames=True,
                        plan=[[99] * 6, [99] * 6])
    buffer, naive, _ = drive(scenario, "cpu", check_every_step=False)
    envs = scenario.make_envs()
    obs, _ = envs.reset(seed=5)  # new episodes: their stacks do not continue what the buffer holds
    action = np.zeros((2, ACTION_DIM), np.float32)
    next_obs, reward, terminated, truncated, _ = envs.step(action)
    before = buffer.get(torch.arange(len(buffer)))
    with pytest.raises(ValueError, match=r"env\(s\) \[0, 1\].*mark_episode_boundary"):
        buffer.add(obs, action, reward, next_obs, terminated, truncated)
    assert_unchanged(buffer, before)
    buffer.mark_episode_boundary([1])
    with pytest.raises(ValueError, match=r"env\(s\) \[0\] "):
        buffer.add(obs, action, reward, next_obs, terminated, truncated)
    buffer.mark_episode_boundary()
    buffer.add(obs, action, reward, next_obs, terminated, truncated)
    naive.add(obs, action, reward, next_obs, terminated, np.ones(2, bool))
    assert_holds_newest(buffer, naive)
    with pytest.raises(ValueError, match=r"env_ids \[2\] out of range"):
        buffer.mark_episode_boundary([2])


@pytest.mark.parametrize("padding", ["reset", "zero"])
def test_short_episodes_drop_the_oldest_transitions_before_their_frames_are_overwritten(padding: str) -> None:
    scenario = Scenario(num_envs=1, stack=4, with_vector=False, padding=padding, capacity=30, ample_frames=False,
                        plan=[[TERMINATE, TRUNCATE] * 30])
    buffer, naive, _ = drive(scenario, "cpu")  # checks every stored transition after every step
    # Two or three frames per one-step episode: the frame ring fills before the transition ring does.
    assert naive.total == 60 and 0 < len(buffer) < 30


def test_capacity_keeps_the_newest_transitions() -> None:
    scenario = Scenario(num_envs=3, stack=2, with_vector=False, padding="reset", capacity=7, ample_frames=True,
                        plan=[[99, 99, TERMINATE] * 10] * 3)
    buffer, naive, _ = drive(scenario, "cpu")
    assert len(buffer) == 7 and naive.total == 90 and buffer.capacity == 7


# ---------------------------------------------------------------------------------------------------- errors
def step_arrays(num_envs: int = 1, stack: int = 4) -> dict[str, Any]:
    """Arguments of one valid add(): the first step of new episodes, reset padding."""
    rng = np.random.default_rng(1)
    first = rng.integers(0, 256, (num_envs, 1, *FRAME_HW), dtype=np.uint8)
    obs = np.repeat(first, stack, axis=1)
    nxt = np.concatenate([obs[:, 1:], rng.integers(0, 256, (num_envs, 1, *FRAME_HW), dtype=np.uint8)], axis=1)
    flags = np.zeros(num_envs, bool)
    return {"obs": {"image": obs}, "action": np.zeros((num_envs, ACTION_DIM), np.float32),
            "reward": np.zeros(num_envs, np.float32), "next_obs": {"image": nxt}, "terminated": flags,
            "truncated": flags}


def assert_unchanged(buffer: ReplayBuffer, before: Transition) -> None:
    after = buffer.get(torch.arange(len(buffer)))
    assert len(after.reward) == len(before.reward)
    assert torch.equal(after.obs["image"], before.obs["image"]) and torch.equal(after.reward, before.reward)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"capacity": 0}, r"capacity=0 must be an int >= 1"),
    ({"capacity": 2, "num_envs": 3}, r"capacity=2 is smaller than num_envs=3"),
    ({"observation_shapes": {"image": (84, 84)}}, r"observation_shapes\['image'\]=\(84, 84\) must be \(S, H, W\)"),
    ({"observation_shapes": {"pixels": (4, 84, 84)}}, r"observation_shapes=.*'pixels'.*keys 'image'"),
    ({"observation_shapes": {"vector": (0,)}}, r"observation_shapes\['vector'\]=\(0,\) must be \(D,\)"),
    ({"action_dim": 0}, r"action_dim=0"),
    ({"spare_frames": -1}, r"spare_frames=-1"),
    ({"seed": 1.5}, r"seed=1.5"),
])
def test_bad_configuration_is_refused(kwargs: dict, message: str) -> None:
    args = {"capacity": 10, "observation_shapes": {"image": (4, *FRAME_HW)}, "action_dim": ACTION_DIM} | kwargs
    with pytest.raises(ValueError, match=message):
        ReplayBuffer(**args)


def _wrong_leading_dim(a: dict) -> None:
    a["obs"]["image"] = np.repeat(a["obs"]["image"], 2, axis=0)


def _float_image(a: dict) -> None:
    a["obs"]["image"] = a["obs"]["image"].astype(np.float32)


def _not_shifted(a: dict) -> None:
    a["next_obs"]["image"] = a["next_obs"]["image"][:, ::-1].copy()


@pytest.mark.parametrize(("corrupt", "message"), [
    (_wrong_leading_dim, r"obs\['image'\] has shape \(2, 4, 3, 2\), expected \(1, 4, 3, 2\)"),
    (_float_image, r"obs\['image'\] has dtype float32, expected uint8"),
    (lambda a: a["next_obs"].pop("image"), r"next_obs has keys \[\], expected \['image'\]"),
    (lambda a: a["obs"].update(vector=np.zeros((1, 3), np.float32)), r"obs has keys \['image', 'vector'\]"),
    (lambda a: a.update(action=np.zeros((1, 3), np.float32)), r"action has shape \(1, 3\), expected \(1, 2\)"),
    (lambda a: a.update(reward=np.array([np.nan])), r"reward of env\(s\) \[0\] is NaN or infinite"),
    (lambda a: a.update(action=np.full((1, 2), np.inf)), r"action of env\(s\) \[0\] is NaN or infinite"),
    (lambda a: a.update(terminated=np.array([0])), r"terminated has dtype int64, expected bool"),
    (lambda a: a.update(truncated=np.array([False, False])), r"truncated has shape \(2,\), expected \(1,\)"),
    (_not_shifted, r"next_obs\['image'\] of env\(s\) \[0\] is not obs\['image'\] shifted by one frame"),
])
def test_bad_add_is_refused_before_anything_is_written(corrupt: Any, message: str) -> None:
    buffer = ReplayBuffer(10, {"image": (4, *FRAME_HW)}, ACTION_DIM)
    buffer.add(**step_arrays())
    before = buffer.get(torch.arange(len(buffer)))
    frames_before = buffer.state_dict()["tensors"]["frames"].clone()
    arguments = step_arrays()
    corrupt(arguments)
    with pytest.raises(ValueError, match=message):
        buffer.add(**arguments)
    assert_unchanged(buffer, before)
    assert torch.equal(buffer.state_dict()["tensors"]["frames"], frames_before)


def test_vector_observation_errors_name_the_key_and_both_shapes() -> None:
    buffer = ReplayBuffer(10, {"vector": (3,)}, 1, num_envs=2)
    flags = np.zeros(2, bool)
    with pytest.raises(ValueError, match=r"next_obs\['vector'\] has shape \(2, 4\), expected \(2, 3\)"):
        buffer.add({"vector": np.zeros((2, 3), np.float32)}, np.zeros((2, 1), np.float32), np.zeros(2),
                   {"vector": np.zeros((2, 4), np.float32)}, flags, flags)
    assert len(buffer) == 0


def test_sampling_errors() -> None:
    buffer = ReplayBuffer(10, {"image": (4, *FRAME_HW)}, ACTION_DIM)
    with pytest.raises(ValueError, match="empty ReplayBuffer"):
        buffer.sample(1)
    buffer.add(**step_arrays())
    with pytest.raises(ValueError, match=r"batch_size=2 is larger than the 1 transitions stored"):
        buffer.sample(2)
    with pytest.raises(ValueError, match=r"batch_size=0"):
        buffer.sample(0)
    with pytest.raises(IndexError, match=r"indices \[1\] out of range"):
        buffer.get([0, 1])


def test_memory_warning_when_the_buffer_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = {"image": (4, 84, 84)}
    need = ReplayBuffer.estimate_nbytes(1_000_000, shapes, 3)
    assert 7.0e9 < need < 7.3e9  # one 84x84 frame per transition, plus 1% spare frames and indices
    monkeypatch.setattr(buffer_module.psutil, "virtual_memory", lambda: type("vm", (), {"available": need - 1}))
    with pytest.warns(UserWarning, match=r"needs 7\.\d\d GB once full .* only 7\.\d\d GB"):
        ReplayBuffer(1_000_000, shapes, 3)
    monkeypatch.setattr(buffer_module.psutil, "virtual_memory", lambda: type("vm", (), {"available": need + 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ReplayBuffer(1_000_000, shapes, 3)


# ---------------------------------------------------------------------------------------------------- files
def filled_buffer(capacity: int = 30, frame_hw: tuple[int, int] = FRAME_HW) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, {"image": (4, *frame_hw), "vector": (2,)}, ACTION_DIM, num_envs=2, seed=11)
    rng = np.random.default_rng(2)
    obs = np.repeat(rng.integers(0, 256, (2, 1, *frame_hw), dtype=np.uint8), 4, axis=1)
    for k in range(40):
        nxt = np.concatenate([obs[:, 1:], rng.integers(0, 256, (2, 1, *frame_hw), dtype=np.uint8)], axis=1)
        done = np.array([k % 9 == 8, k % 13 == 12])
        vec = rng.normal(size=(2, 2)).astype(np.float32)
        buffer.add({"image": obs, "vector": vec}, rng.uniform(-1, 1, (2, ACTION_DIM)).astype(np.float32),
                   rng.normal(size=2), {"image": nxt, "vector": vec + 1}, done, np.zeros(2, bool))
        obs = nxt.copy()
        obs[done] = np.repeat(rng.integers(0, 256, (int(done.sum()), 1, *frame_hw), dtype=np.uint8), 4, axis=1)
    return buffer


def assert_same_transitions(a: Transition, b: Transition) -> None:
    for key in a.obs:
        assert torch.equal(a.obs[key], b.obs[key]) and torch.equal(a.next_obs[key], b.next_obs[key])
    assert torch.equal(a.action, b.action) and torch.equal(a.reward, b.reward)
    assert torch.equal(a.terminated, b.terminated)


def test_save_and_load_round_trip_with_the_same_batches(tmp_path: Path) -> None:
    buffer = filled_buffer()
    path = tmp_path / "replay.pt"
    buffer.save(path)
    state = torch.load(path, weights_only=True)  # what a Lightning-style loader does
    assert state["counters"]["added"] == 80
    loaded = ReplayBuffer.from_file(path)
    into_existing = ReplayBuffer(30, {"image": (4, *FRAME_HW), "vector": (2,)}, ACTION_DIM, num_envs=2, seed=999)
    into_existing.load(path)
    everything = torch.arange(len(buffer))
    for other in (loaded, into_existing):
        assert len(other) == len(buffer) == 30
        assert_same_transitions(other.get(everything), buffer.get(everything))
    for _ in range(3):  # the sampling RNG is restored: a resumed run draws the same batches
        reference = buffer.sample(16)
        assert_same_transitions(loaded.sample(16), reference)
        assert_same_transitions(into_existing.sample(16), reference)


def test_loaded_buffer_continues_episodes_exactly() -> None:
    scenario = Scenario(num_envs=2, stack=3, with_vector=True, padding="reset", capacity=9, ample_frames=False,
                        plan=[[99, 99, 99, TRUNCATE] * 8, [99, TERMINATE] * 16], reloads={5, 17, 18})
    buffer, naive, _ = drive(scenario, "cpu")
    assert len(buffer) == 9 and naive.total == 64


def test_rng_state_from_another_device_type_is_not_restored_but_the_data_is() -> None:
    buffer = filled_buffer()
    state = buffer.state_dict()
    state["generator"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}  # a CUDA Philox state
    other = ReplayBuffer(30, {"image": (4, *FRAME_HW), "vector": (2,)}, ACTION_DIM, num_envs=2, seed=0)
    with pytest.warns(UserWarning, match="saved on cuda and cannot be restored on cpu"):
        other.load_state_dict(state)
    assert_same_transitions(other.get(torch.arange(30)), buffer.get(torch.arange(30)))


def test_saved_file_holds_only_the_filled_part(tmp_path: Path) -> None:
    buffer = ReplayBuffer(100_000, {"image": (4, 84, 84)}, ACTION_DIM, seed=0)
    arrays = step_arrays()
    first = np.repeat(np.arange(84 * 84, dtype=np.uint8).reshape(1, 1, 84, 84), 4, axis=1)
    arrays["obs"]["image"] = first
    arrays["next_obs"]["image"] = np.concatenate([first[:, 1:], first[:, :1] + 1], axis=1)
    buffer.add(**arrays)
    buffer.save(tmp_path / "small.pt")
    assert (tmp_path / "small.pt").stat().st_size < 100_000  # two frames, not 100k
    assert_same_transitions(ReplayBuffer.from_file(tmp_path / "small.pt").get([0]), buffer.get([0]))


def test_a_failing_save_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "replay.pt"
    filled_buffer().save(path)
    good = path.read_bytes()

    def disk_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    # the error names the file (lit_td3.checkpoints.atomic_write, shared with the checkpoints)
    with pytest.raises(CheckpointWriteError, match=r"replay\.pt.*No space left"):
        filled_buffer(capacity=50).save(path)
    with pytest.raises(CheckpointWriteError, match=r"new\.pt.*No space left"):
        filled_buffer().save(tmp_path / "new.pt")
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["replay.pt"]  # no temp file left, no half-written new.pt
    monkeypatch.undo()
    assert len(ReplayBuffer.from_file(path)) == 30


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # frames are most of the file: this lands in pixel data
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "is truncated or corrupt"),
    (flip_middle_byte, "tensor 'frames' fails its checksum"),
    (lambda p: torch.save({"weights": torch.zeros(3)}, p), "not a lit_td3.ReplayBuffer state"),
    (lambda p: p.write_bytes(b""), "is truncated or corrupt"),
])
def test_damaged_file_is_refused_naming_the_file(tmp_path: Path, damage: Any, message: str) -> None:
    path = tmp_path / "replay.pt"
    filled_buffer(frame_hw=(84, 84)).save(path)
    damage(path)
    target = ReplayBuffer(30, {"image": (4, 84, 84), "vector": (2,)}, ACTION_DIM, num_envs=2)
    for load in (ReplayBuffer.from_file, target.load):
        with pytest.raises(ValueError, match=message) as error:
            load(path)
        assert str(path) in str(error.value)
    assert len(target) == 0


def test_loading_into_another_configuration_names_both(tmp_path: Path) -> None:
    path = tmp_path / "replay.pt"
    filled_buffer().save(path)
    other = ReplayBuffer(50, {"image": (4, *FRAME_HW), "vector": (2,)}, ACTION_DIM, num_envs=2)
    with pytest.raises(ValueError, match=r"replay.pt.*capacity=30 \(this buffer: 50\)"):
        other.load(path)
    other = ReplayBuffer(30, {"image": (3, *FRAME_HW), "vector": (2,)}, ACTION_DIM, num_envs=2)
    with pytest.raises(ValueError, match=r"observation_shapes=\{'image': \[4, 3, 2\].*this buffer: \{'image': \[3,"):
        other.load(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        other.load(tmp_path / "missing.pt")

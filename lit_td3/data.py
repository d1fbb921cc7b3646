"""The rollout stream: the one place where the env and the learner meet.

``RolloutStream`` is an ``IterableDataset`` that steps the envs with the current actor plus exploration noise (uniform
random actions before ``learning_starts``), writes every transition into the replay buffer, and yields sampled
batches. The learner (``TD3Module``) only learns; the envs never import Lightning.

With asynchronous envs the stream issues the env step, writes the previous step's transitions into the buffer and
yields the batches due while the env worker processes compute (the learner updates meanwhile), then waits for the step.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, IterableDataset

from lit_td3.buffer import ReplayBuffer
from lit_td3.config import ConfigError, check
from lit_td3.distributed import gather_from_ranks
from lit_td3.envs import DISCARD_KEY, STEP_TIME_KEY, check_env_id, make_env
from lit_td3.envs.wrappers import NONFINITE_FIELDS_KEY, NONFINITE_KEY
from lit_td3.scalars import log_scalars

if TYPE_CHECKING:
    from lit_td3.module import TD3Module

EVAL_SEED_OFFSET = 1_000_003
"""Evaluation episodes use seeds far from the training episodes' so they never replay a training track."""


@dataclass
class EpisodeResult:
    """One finished episode: what the stream and the evaluation log under ``rollout/*`` and ``eval/*``."""

    episode_return: float
    length: int
    info: dict[str, float] = field(default_factory=dict)
    frames: np.ndarray | None = None  # T×H×W uint8, kept for the first evaluation episode only


BOOKKEEPING_KEYS = (DISCARD_KEY, STEP_TIME_KEY)
"""lit_td3's own per-step ``info`` keys: the stream acts on them, they are not episode stats."""


def numeric_info(info: Mapping[str, Any]) -> dict[str, float]:
    """The numeric scalars of an env's final ``info`` (nested values, e.g. per-step dicts, are not episode stats; nor
    are ``BOOKKEEPING_KEYS``)."""
    return {key: float(value) for key, value in info.items() if key not in BOOKKEEPING_KEYS and is_number(value)}


def is_number(value: Any) -> bool:
    """A Python or numpy scalar (bools included), or a 0-d numeric array: what TensorBoard can plot."""
    return isinstance(value, (bool, int, float, np.number, np.bool_)) or (
        isinstance(value, np.ndarray) and value.shape == () and value.dtype != object)


def final_info_of(infos: Mapping[str, Any], env: int) -> dict[str, Any]:
    """The final ``info`` of vector slot ``env`` from gymnasium's vectorised info format (``key`` + ``_key`` mask)."""
    final = infos.get("final_info", {})
    return {k: v[env] for k, v in final.items() if not k.startswith("_") and final.get(f"_{k}", [False] * (env + 1))[env]}


class SampleRequest:
    """What the stream yields for each update: the batch itself is drawn when the learner takes it.

    Lightning fetches one item ahead of ``training_step`` (LIGHTNING_NOTES 4). A batch drawn at fetch time would
    leave a checkpoint written after ``training_step`` with a buffer RNG that already drew a batch the checkpoint
    does not hold; drawn in ``RolloutDataModule.on_before_batch_transfer`` instead, a prefetched request holds no
    state but one unit of update credit, which ``RolloutDataModule.state_dict`` gives back.
    """


class RolloutStream(IterableDataset):
    """Steps the envs, fills the buffer, and yields training batches at the configured replay ratio."""

    def __init__(self, datamodule: RolloutDataModule, agent: TD3Module) -> None:
        super().__init__()
        self.dm = datamodule
        self.agent = agent

    def __iter__(self) -> Iterator[SampleRequest]:
        # Lightning calls __iter__ again on a new epoch or after a restart of the fit loop: continue the running
        # envs, never reset them (LIGHTNING_NOTES 4).
        dm, counters = self.dm, self.agent.counters
        envs = dm.training_envs()
        dm.timings.start(counters.env_steps, counters.critic_updates)
        overlapped = isinstance(envs, gym.vector.AsyncVectorEnv)
        vote = getattr(self.agent.trainer.strategy, "signal_vote", None)  # under DDP (lit_td3.distributed)
        try:
            while counters.env_steps < dm.total_env_steps:
                actions = dm.next_actions(self.agent)
                gone = _pipe_error(envs.step_async, actions)[1] if overlapped else None
                # The previous step's transitions land in the buffer while the envs compute: every batch is drawn
                # after this write, so it draws from the same transitions as it would with the write done first.
                dm.write_transitions()
                yield from self._batches_due()
                if gone is None:
                    with dm.timings.timed("env_ms"):
                        step, gone = _pipe_error(envs.step_wait) if overlapped else _pipe_error(envs.step, actions)
                if vote is not None:
                    vote()  # every rank, at this env step: a SIGTERM that broke a rank's env pipes stops them all
                if gone is not None:
                    raise gone
                dm.record(actions, *step, agent=self.agent)
        except _PIPE_ERRORS as err:
            # SLURM's preemption and `timeout` signal the whole process group: the env workers may die of the
            # SIGTERM before this process stops at the end of its batch. That is the stop, not an env failure.
            if self.agent.trainer.received_sigterm:
                raise SIGTERMException() from err
            raise
        finally:
            dm.write_transitions()  # also when an env fails: a crash checkpoint's buffer holds every counted step
        if counters.env_steps > dm.timings.env_steps:
            dm.log_rollout_stats(counters)  # the episodes that ended since the last log point
        # The run is over at data.total_env_steps, whichever epoch this is (a resumed run starts a new one).
        self.agent.trainer.should_stop = True

    def _batches_due(self) -> Iterator[SampleRequest]:
        dm = self.dm
        while dm.update_credit >= 1.0:
            dm.update_credit -= 1.0
            dm.requests_out += 1
            t0, sampling_s = time.perf_counter(), dm.sampling_s
            yield SampleRequest()
            # Time away from the generator, less the sampling done there: the update and Lightning's loop around it.
            dm.timings.add("update_ms", time.perf_counter() - t0 - (dm.sampling_s - sampling_s))


_PIPE_ERRORS = (BrokenPipeError, ConnectionResetError, EOFError)
"""What an env step raises when an async env worker is gone."""


def _pipe_error(call: Callable[..., Any], *args: Any) -> tuple[Any, Exception | None]:
    """``(call(*args), None)``, or ``(None, error)`` when an env worker's pipe is broken (the worker is gone)."""
    try:
        return call(*args), None
    except _PIPE_ERRORS as err:
        return None, err


class EvaluationEpisodes(IterableDataset):
    """Deterministic evaluation episodes as a dataset, so ``python -m lit_td3 validate`` runs them."""

    def __init__(self, datamodule: RolloutDataModule, agent: TD3Module) -> None:
        super().__init__()
        self.dm, self.agent = datamodule, agent

    def __iter__(self) -> Iterator[EpisodeResult]:
        yield from self.dm.evaluate(self.agent.act)


class Timings:
    """Mean wall-clock time per stage since the last log point, and the rates; flushed as ``perf/*`` scalars."""

    def __init__(self) -> None:
        self.start(0, 0)

    def start(self, env_steps: int, updates: int) -> None:
        """Starts the clock at the run's current totals (a resumed run's rates count from its first step)."""
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.since = time.perf_counter()
        self.env_steps, self.updates = env_steps, updates

    def add(self, key: str, seconds: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + seconds
        self.counts[key] = self.counts.get(key, 0) + 1

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Adds the wall time of the ``with`` block to ``key`` (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, time.perf_counter() - start)

    def flush(self, env_steps: int, updates: int) -> dict[str, float]:
        """Means since the last flush, given the run's current env-step and update totals."""
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        out = {f"perf/{k}": 1000.0 * self.sums[k] / self.counts[k] for k in self.sums}
        out["perf/env_steps_per_s"] = (env_steps - self.env_steps) / elapsed
        out["perf/updates_per_s"] = (updates - self.updates) / elapsed
        self.sums, self.counts, self.since = {}, {}, now
        self.env_steps, self.updates = env_steps, updates
        return out


class RolloutDataModule(pl.LightningDataModule):
    """Envs, replay buffer and the rollout stream; every run length and cadence here is counted in env steps."""

    def __init__(
        self,
        env_id: str = "lit_td3/CarRacing-v3",
        env_kwargs: dict[str, Any] | None = None,
        max_episode_steps: int | None = None,
        frame_stack: int = 4,
        image_size: int = 84,
        num_envs: int = 1,
        async_envs: bool = True,
        total_env_steps: int = 1_000_000,
        learning_starts: int = 10_000,
        buffer_size: int = 1_000_000,
        batch_size: int = 256,
        exploration_noise: float = 0.1,
        replay_ratio: float = 1.0,
        buffer_device: str = "cpu",
        eval_episodes: int = 10,
        seed: int = 0,
    ) -> None:
        """
        Args:
            env_id: A registered gymnasium id (``lit_td3/CarRacing-v3``: gymnasium's CarRacing-v3 with the same frames
                rendered faster; ``CarRacing-v3``, ``Pendulum-v1``, ``lit_td3/CarlaLaneKeeping-v0``, ...), or
                ``module:id`` for an env that ``module`` registers when imported (``my_pkg.envs:MyEnv-v0``).
            env_kwargs: Keyword arguments for ``gymnasium.make`` (the CARLA env takes its server and scenario here).
            max_episode_steps: Time limit per episode (truncation, which bootstraps); ``null`` keeps the env's own.
            frame_stack: Frames per image observation (RGB envs are turned to grayscale and stacked).
            image_size: Side of the square grayscale frames fed to the CNNs.
            num_envs: Envs stepped together (one gymnasium vector env); each env step counts once.
            async_envs: Run the envs in worker processes so that they step while the learner updates.
            total_env_steps: Env steps of the whole run (over all envs and ranks); the run ends there.
            learning_starts: Env steps of uniform random actions before the first update (all ranks together); at
                least ``batch_size`` per rank, so that every rank's first batch finds that many transitions.
            buffer_size: Replay buffer capacity in transitions.
            batch_size: Transitions per update.
            exploration_noise: Std of the Gaussian action noise, as a fraction of the half action range.
            replay_ratio: Updates per env step (1/8 = one update every 8 env steps).
            buffer_device: Where the replay buffer lives (``cpu`` or ``cuda``: sampling then never leaves the GPU).
            eval_episodes: Deterministic episodes per evaluation.
            seed: Base seed of the env episodes (episode k of env i is seeded from it, i and k).
        """
        super().__init__()
        check_env_id(env_id)
        check("data.frame_stack", frame_stack, frame_stack >= 1, "a positive number of frames")
        check("data.image_size", image_size, image_size >= 36, "at least 36 pixels (NatureCNN's smallest input)")
        check("data.num_envs", num_envs, num_envs >= 1, "at least 1")
        check("data.total_env_steps", total_env_steps, total_env_steps >= 1, "at least 1")
        check("data.learning_starts", learning_starts, 0 <= learning_starts <= total_env_steps,
              f"between 0 and data.total_env_steps={total_env_steps}")
        check("data.buffer_size", buffer_size, buffer_size >= 1, "at least 1")
        check("data.batch_size", batch_size, 1 <= batch_size <= buffer_size,
              f"between 1 and data.buffer_size={buffer_size}")
        check("data.exploration_noise", exploration_noise, exploration_noise >= 0, "non-negative")
        check("data.replay_ratio", replay_ratio, replay_ratio > 0, "positive")
        check("data.max_episode_steps", max_episode_steps, max_episode_steps is None or max_episode_steps >= 1,
              "null or at least 1")
        check("data.eval_episodes", eval_episodes, eval_episodes >= 0, "non-negative")
        check("data.buffer_device", buffer_device, buffer_device.split(":")[0] in {"cpu", "cuda"}, "'cpu' or 'cuda'")
        self.save_hyperparameters()
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs or {})
        self.max_episode_steps, self.frame_stack, self.image_size = max_episode_steps, frame_stack, image_size
        self.num_envs, self.async_envs = num_envs, async_envs
        self.total_env_steps, self.learning_starts = total_env_steps, learning_starts
        self.buffer_size, self.batch_size, self.buffer_device = buffer_size, batch_size, buffer_device
        self.exploration_noise, self.replay_ratio = exploration_noise, replay_ratio
        self.eval_episodes, self.seed = eval_episodes, seed
        self.check_first_batch(world_size=1)

        self.observation_shapes: dict[str, list[int]] = {}
        self.action_dim = 0
        self.buffer: ReplayBuffer | None = None
        self.envs: gym.vector.VectorEnv | None = None
        self.update_credit = 0.0
        self.timings = Timings()
        self.rng = np.random.default_rng(seed)
        self._obs: dict[str, np.ndarray] | None = None
        self._episode_returns = np.zeros(num_envs)
        self._episode_lengths = np.zeros(num_envs, dtype=np.int64)
        self._episodes_per_env = [0] * num_envs
        self._resumed = False
        self.last_episode: EpisodeResult | None = None
        self._unlogged: list[tuple[int, dict[str, float]]] = []  # (env step, rollout/*) of episodes ended since
        # Resume state (see state_dict): the actions chosen for the coming env step, not yet applied to the envs;
        # sample requests yielded but not yet turned into batches; seconds spent sampling (for perf/update_ms).
        self.pending_actions: np.ndarray | None = None
        self.requests_out = 0
        # The last env step's transitions (buffer.add's arguments), written while the envs compute the next step.
        self._unwritten: tuple[Any, ...] | None = None
        self.sampling_s = 0.0

    # ----------------------------------------------------------------------------------------------- setup
    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _env_fn(self, env_index: int, seed: int, first_episode: int) -> Callable[[], gym.Env]:
        return partial(
            make_env, self.env_id, self.env_kwargs, seed=seed, env_index=env_index, first_episode=first_episode,
            max_episode_steps=self.max_episode_steps, frame_stack=self.frame_stack, image_size=self.image_size,
        )

    def check_first_batch(self, world_size: int) -> None:
        """The first update samples a full batch from each rank's own replay-buffer shard, which then holds
        ``learning_starts / world_size`` transitions or a few more (its ranks step in lockstep)."""
        per_rank = "" if world_size == 1 else f" / {world_size} ranks = {self.learning_starts / world_size:g}"
        check("data.batch_size", self.batch_size, self.batch_size * world_size <= self.learning_starts,
              f"at most data.learning_starts={self.learning_starts}{per_rank}, or the first update would sample an "
              "unfilled buffer" + ("" if world_size == 1 else " (each rank samples only its own shard)"))

    def probe_spaces(self) -> None:
        """Reads the observation shapes and action size from one env instance (CARLA's connects only on reset)."""
        env = self._env_fn(0, self.seed, 0)()
        try:
            self.observation_shapes = {k: list(s.shape) for k, s in env.observation_space.spaces.items()}
            self.action_dim = int(env.action_space.shape[0])
        finally:
            env.close()

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_first_batch(self.world_size)
        if not self.observation_shapes:
            self.probe_spaces()
        if stage == "fit" and self.buffer is None:
            self.rng = np.random.default_rng((self.seed, self.rank))  # each rank explores with noise of its own
            self.buffer = ReplayBuffer(
                capacity=self.buffer_size, observation_shapes=self.observation_shapes, action_dim=self.action_dim,
                num_envs=self.num_envs, device=self.buffer_device, seed=self.seed + self.rank,
            )

    def global_env_index(self, slot: int) -> int:
        return self.rank * self.num_envs + slot

    def training_envs(self) -> gym.vector.VectorEnv:
        """The training envs, built on first use (after a checkpoint restore, so episode seeds continue)."""
        if self.envs is None:
            if self._resumed:
                self._close_cut_episodes()  # first: the episode indices the new envs start from move past them
            fns = [
                self._env_fn(g, self.seed + 7919 * g, self._episodes_per_env[i])
                for i, g in enumerate(self.global_env_index(i) for i in range(self.num_envs))
            ]
            vector_cls = gym.vector.AsyncVectorEnv if self.async_envs else gym.vector.SyncVectorEnv
            # copy: each step's observations are arrays of their own, which the buffer write reads during the next
            # step (with copy=False they would be views of the workers' shared memory, overwritten by that step).
            self.envs = vector_cls(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, copy=True,
                                   **self._vector_kwargs())
            # Lightning skips teardown when fit raises: without this, worker processes would outlive the run.
            atexit.register(self.teardown, "fit")
            self._obs, _ = self.envs.reset()
            if self._resumed:
                # The env state died with the process: the episode the checkpoint cut ends here, as truncated.
                self.buffer.mark_episode_boundary()
        return self.envs

    def _close_cut_episodes(self) -> None:
        """Ends, as truncated, the episodes a checkpoint cut: their env state died with the process.

        They are logged with what they had gathered and ``rollout/cut_by_resume = 1``. A checkpoint on an episode
        boundary cuts none, and the resumed run then follows the same episodes as one never stopped.
        """
        counters = self.trainer.lightning_module.counters
        for i in np.flatnonzero(self._episode_lengths > 0):
            self._close_episode(i, {"cut_by_resume": 1.0}, counters)

    def _vector_kwargs(self) -> dict[str, Any]:
        # forkserver: a forked worker inherits the learner's OpenMP thread pool state and the two fight for the
        # cores (a 10x slowdown measured on 2 cores); a fresh interpreter per worker does not.
        return {"context": "forkserver"} if self.async_envs else {}

    def train_dataloader(self) -> DataLoader:
        # Batches are built by the stream; one process only (LIGHTNING_NOTES 6): workers would copy env and buffer.
        # A generator of its own: iter() draws the loader's (unused) base seed from it, not from the global torch RNG
        # that the update noise uses, so a resumed run draws the same noise as one never stopped. No pin_memory:
        # the loader carries SampleRequests; batches are drawn after it, in on_before_batch_transfer.
        return DataLoader(RolloutStream(self, self.trainer.lightning_module), batch_size=None, num_workers=0,
                          generator=torch.Generator())

    def val_dataloader(self) -> DataLoader | list:
        if self.trainer.state.fn == "fit":
            return []  # during fit, evaluation runs on its env-step cadence (callbacks.EvaluationCallback)
        return DataLoader(EvaluationEpisodes(self, self.trainer.lightning_module), batch_size=None, num_workers=0,
                          collate_fn=lambda x: x)

    def teardown(self, stage: str) -> None:
        if self.envs is not None:
            envs, self.envs = self.envs, None
            close_vector_env(envs)

    # ----------------------------------------------------------------------------------------------- rollout
    def next_actions(self, agent: TD3Module) -> np.ndarray:
        """The actions of the coming env step, chosen once (with its update credit) and kept until they are applied.

        Kept in ``pending_actions`` because a checkpoint can fall between choosing and applying them (the learner
        updates while the step runs): a resumed run applies the same actions.
        """
        if self.pending_actions is None:
            if agent.counters.env_steps >= self.learning_starts:
                self.update_credit += self.num_envs * self.replay_ratio
            with self.timings.timed("act_ms"):
                self.pending_actions = self.explore(self.envs, agent)
        return self.pending_actions

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Draws the batch of a ``SampleRequest`` now that the learner takes it (see ``SampleRequest``)."""
        if not isinstance(batch, SampleRequest):
            return batch
        self.requests_out -= 1
        t0 = time.perf_counter()
        # Onto the learner's device here, through pinned memory (ReplayBuffer.sample): Lightning's copy is a no-op.
        drawn = self.buffer.sample(self.batch_size, self.trainer.strategy.root_device)
        sample = self.trainer.precision_plugin.convert_input(drawn)
        elapsed = time.perf_counter() - t0
        self.sampling_s += elapsed
        self.timings.add("sample_ms", elapsed)
        return sample

    def explore(self, envs: gym.vector.VectorEnv, agent: TD3Module) -> np.ndarray:
        """Uniform random actions before ``learning_starts``, then mu(s) + N(0, sigma), clipped to [-1, 1]."""
        shape = (self.num_envs, self.action_dim)
        if agent.counters.env_steps < self.learning_starts:
            return self.rng.uniform(-1.0, 1.0, shape).astype(np.float32)
        action = agent.act(self._obs) + self.rng.normal(0.0, self.exploration_noise, shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def record(self, actions: np.ndarray, next_obs: dict[str, np.ndarray], reward: np.ndarray,
               terminated: np.ndarray, truncated: np.ndarray, infos: dict[str, Any], *, agent: TD3Module) -> None:
        """Counts one vector step, closes the episodes that ended in it, and keeps its transitions for
        ``write_transitions``."""
        done = terminated | truncated
        real_next = {k: v.copy() for k, v in next_obs.items()}
        for i in np.flatnonzero(done):
            for k, v in infos["final_obs"][i].items():
                real_next[k][i] = v  # SAME_STEP autoreset: next_obs already holds the reset observation
        discard = np.array([bool(final_info_of(infos, i).get(DISCARD_KEY, False)) for i in range(self.num_envs)]) \
            if done.any() else np.zeros(self.num_envs, dtype=bool)
        self._unwritten = (self._obs, actions, reward.astype(np.float32), real_next, terminated, truncated, ~discard)
        self._obs = next_obs
        self.pending_actions = None
        counters = agent.counters
        counters.env_steps += self.num_envs * self.world_size  # data.total_env_steps is global: ranks step in lockstep
        stepped = infos.get(f"_{STEP_TIME_KEY}")
        if stepped is not None and stepped.any():  # an env that ended in this step has its time in final_info
            self.timings.add("env_step_ms", float(infos[STEP_TIME_KEY][stepped].mean()))
        self._episode_returns += np.where(discard, 0.0, reward)
        self._episode_lengths += 1
        for i in np.flatnonzero(done):
            self._report_nonfinite(i, final_info_of(infos, i), counters)
            info = numeric_info(final_info_of(infos, i))
            info["faults"] = float(discard[i])
            self._close_episode(i, info, counters)
        self._log_progress(counters, agent.log_every_n_env_steps)

    def write_transitions(self) -> None:
        """Writes the transitions of the last recorded env step into the buffer, if not written yet.

        The stream calls it right after issuing the next env step, so that with one env the write is not part of the
        serial path between two env steps (the policy step needs the newest observation, the write does not).
        """
        if self._unwritten is not None:
            *transitions, valid = self._unwritten
            self._unwritten = None  # first: a write that raises is not tried again by the stream's cleanup
            with self.timings.timed("write_ms"):
                self.buffer.add(*transitions, valid=valid)

    def _report_nonfinite(self, i: int, info: Mapping[str, Any], counters: Any) -> None:
        """Counts and reports a step whose NaN/inf output the env boundary rejected (``wrappers.RejectNonFinite``)."""
        if not info.get(NONFINITE_KEY):
            return
        counters.nonfinite_env_outputs += 1
        warnings.warn(
            f"lit_td3: env {self.global_env_index(i)} returned a non-finite {info.get(NONFINITE_FIELDS_KEY, 'output')} "
            f"at env step {counters.env_steps}: transition discarded, episode ended as truncated "
            f"({counters.nonfinite_env_outputs} so far)", stacklevel=2
        )
        if self.world_size == 1:  # under DDP the count is all ranks' and known at log points (log_rollout_stats)
            log_scalars(self.trainer, {"alerts/nonfinite_env_outputs": float(counters.nonfinite_env_outputs)},
                        counters.env_steps)

    def _close_episode(self, i: int, info: dict[str, float], counters: Any) -> None:
        result = EpisodeResult(float(self._episode_returns[i]), int(self._episode_lengths[i]), info)
        self._episode_returns[i], self._episode_lengths[i] = 0.0, 0
        self._episodes_per_env[i] += 1
        counters.episodes += 1
        metrics = {"rollout/episode_return": result.episode_return, "rollout/episode_length": float(result.length)}
        metrics.update({f"rollout/{k}": v for k, v in result.info.items()})
        self.last_episode = result
        self._unlogged.append((counters.env_steps, metrics))

    def _log_progress(self, counters: Any, every: int) -> None:
        if counters.env_steps // every != (counters.env_steps - self.num_envs * self.world_size) // every:
            self.log_rollout_stats(counters)

    def log_rollout_stats(self, counters: Any) -> None:
        """Logs the episodes of every rank that ended since the last log point, each at its own env step, and the
        stream's ``perf/*``, buffer fill and env outputs rejected. A collective in a distributed run: all ranks reach it
        at the same env step.

        ``perf/env_steps_per_s`` counts the global env steps (the sum over ranks); stage times are the ranks' mean;
        ``rollout/buffer_size`` is the sum of the shards and ``alerts/nonfinite_env_outputs`` of the ranks' counts.
        """
        self.write_transitions()  # rollout/buffer_size counts every env step up to this one
        perf = self.timings.flush(counters.env_steps, counters.critic_updates)
        ranks = gather_from_ranks(self.trainer, {"episodes": self._unlogged, "perf": perf, "buffer": len(self.buffer),
                                                 "nonfinite": counters.nonfinite_env_outputs})
        self._unlogged = []
        # A scalar tag holds one value per step (TensorBoard and the report keep the last): the episodes that ended
        # at the same env step, in several envs or ranks, are logged as their mean and counted.
        by_step: dict[int, list[dict[str, float]]] = {}
        for step, episode in (e for r in ranks for e in r["episodes"]):
            by_step.setdefault(step, []).append(episode)
        for step in sorted(by_step):
            episodes = by_step[step]
            keys = dict.fromkeys(k for e in episodes for k in e)
            metrics = {k: float(np.mean([e[k] for e in episodes if k in e])) for k in keys}
            metrics["rollout/episodes_ended"] = float(len(episodes))
            log_scalars(self.trainer, metrics, step)
        metrics = {k: float(np.mean([r["perf"].get(k, np.nan) for r in ranks])) for k in perf}
        metrics["perf/env_steps_per_s"] = perf["perf/env_steps_per_s"]
        metrics["rollout/buffer_size"] = float(sum(r["buffer"] for r in ranks))
        metrics["alerts/nonfinite_env_outputs"] = float(sum(r["nonfinite"] for r in ranks))
        log_scalars(self.trainer, metrics, counters.env_steps)

    # ----------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, act: Callable[[Mapping[str, np.ndarray]], np.ndarray],
                 episodes: int | None = None) -> Iterator[EpisodeResult]:
        """Deterministic episodes on a separate env; the first keeps its frames for the video strip."""
        # Its own env index past the training envs: a CARLA eval env needs a server of its own.
        eval_index = self.world_size * self.num_envs + self.rank
        env = self._env_fn(eval_index, self.seed + EVAL_SEED_OFFSET, 0)()
        try:
            for k in range(self.eval_episodes if episodes is None else episodes):
                yield self._eval_episode(env, act, keep_frames=k == 0)
        finally:
            env.close()

    @staticmethod
    def _eval_episode(env: gym.Env, act: Callable, keep_frames: bool) -> EpisodeResult:
        obs, _ = env.reset()
        frames, total, length = [], 0.0, 0
        while True:
            if keep_frames and "image" in obs:
                frames.append(obs["image"][-1])
            action = act({k: v[None] for k, v in obs.items()})[0]
            obs, reward, terminated, truncated, info = env.step(action)
            total, length = total + float(reward), length + 1
            if terminated or truncated:
                return EpisodeResult(total, length, numeric_info(info), np.stack(frames) if frames else None)

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What the stream needs to continue exactly: exploration RNG, the chosen but unapplied actions, update
        credit, per-env episode indices and the open episodes' accumulators. Plain types and tensors only, so that the
        checkpoint loads with ``torch.load(weights_only=True)``.

        Requests the learner has not taken yet (Lightning's prefetch) are given back as credit: the resumed stream
        issues them again. The buffer itself is written beside the checkpoint by ``callbacks.EnvStepCheckpoint``.
        """
        pending = None if self.pending_actions is None else torch.from_numpy(self.pending_actions.copy())
        mine = {
            "rng": self.rng.bit_generator.state,
            "update_credit": self.update_credit + self.requests_out,
            "pending_actions": pending,
            "episodes_per_env": list(self._episodes_per_env),
            "episode_returns": self._episode_returns.tolist(),
            "episode_lengths": self._episode_lengths.tolist(),
        }
        # Every rank's stream, in rank order: a resumed rank continues its own envs' seeds and noise.
        return {"ranks": gather_from_ranks(self.trainer, mine), "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            raise ConfigError(
                f"the checkpoint was written by {state['world_size']} rank(s), this run has {self.world_size}: "
                "each rank's replay-buffer shard and env seeds belong to its rank; resume with the same "
                "--trainer.devices/--trainer.num_nodes"
            )
        state = state["ranks"][self.rank]
        self.rng.bit_generator.state = state["rng"]
        self.update_credit = state["update_credit"]
        self._episodes_per_env = list(state["episodes_per_env"])
        pending = state.get("pending_actions")
        self.pending_actions = None if pending is None else pending.numpy()
        self._episode_returns = np.array(state.get("episode_returns", self._episode_returns), dtype=np.float64)
        self._episode_lengths = np.array(state.get("episode_lengths", self._episode_lengths), dtype=np.int64)
        self._resumed = True

    def buffer_path(self, directory: str | os.PathLike) -> str:
        suffix = f"-rank{self.rank}" if self.world_size > 1 else ""
        return os.path.join(directory, f"replay_buffer{suffix}.pt")


def close_vector_env(envs: gym.vector.VectorEnv) -> None:
    """Closes the envs, also when their worker processes are already gone.

    SLURM's preemption and ``timeout`` signal the whole process group: the env workers die of the SIGTERM while the
    main process writes its checkpoint, and asking a dead worker to close raises a broken-pipe error. Then the workers
    still alive are terminated instead of asked, and the pipes closed.
    """
    workers = getattr(envs, "processes", [])
    if all(worker.is_alive() for worker in workers):
        try:
            envs.close()
            return
        except (BrokenPipeError, ConnectionResetError, EOFError):
            pass  # a worker died while being asked: terminate the rest
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
        worker.join()
    for pipe in getattr(envs, "parent_pipes", []):
        if pipe is not None:
            pipe.close()
    envs.closed = True  # nothing left to close: gymnasium's __del__ must not try again

"""Replay buffer for TD3 from pixels: every frame is stored once, frame stacks are rebuilt by index when sampled.

A transition's ``obs`` and ``next_obs`` image stacks share S-1 frames, and its ``next_obs`` is the next transition's
``obs``, so storing full stacks would cost 2·S frames per transition where one is enough (1M transitions of 4x84x84:
56 GB instead of 7 GB). Here each env step writes only its newest frame into a frame ring, plus, at an episode's
start, the distinct frames of its first observation (one frame under gymnasium's
``FrameStackObservation(padding_type="reset")``). Every transition keeps the ring slots of S+1 frames: ``obs`` is
frames ``[0..S-1]``, ``next_obs`` frames ``[1..S]``; sampling gathers them with two ``index_select`` calls.

Stacks are exact by construction: slots are chosen at ``add`` time from the env's own episode, so a stack never
holds a frame of another episode or env; before a frame slot is reused, every stored transition that still points at
it is dropped (oldest first), so an overwritten frame is never sampled. ``add`` checks that what it is given obeys frame
stacking (and raises before writing anything otherwise), so what comes out is bit-for-bit what went in.

This module must never step an env, import Lightning, or hand out a stack that mixes frames of two episodes or frames
that were overwritten.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil
import torch

from lit_td3.files import atomic_write

IMAGE = "image"
VECTOR = "vector"
_FORMAT = "lit_td3.ReplayBuffer"
_VERSION = 1
_MAX_SLOTS = 2**31 - 1  # frame slots are stored as int32
_Empty = Callable[[Sequence[int], torch.dtype], torch.Tensor] | None
"""Where ``_gather`` writes a batch: a function giving an empty tensor of a shape and dtype; None for new tensors."""


class Transition(NamedTuple):
    """A batch of transitions, on the device it was sampled to (the buffer's by default)."""

    obs: dict[str, torch.Tensor]
    """``image``: uint8 [B, S, H, W]; ``vector``: float32 [B, D]."""
    action: torch.Tensor
    """float32 [B, A]."""
    reward: torch.Tensor
    """float32 [B]."""
    next_obs: dict[str, torch.Tensor]
    """Same keys, dtypes and shapes as ``obs``; the true next observation, also when the episode ended."""
    terminated: torch.Tensor
    """float32 [B]: 1.0 only for true terminations; truncated transitions are 0.0 and bootstrap."""


class _Step(NamedTuple):
    """One validated ``add`` call: the rows of the envs whose transition is kept, as numpy arrays."""

    obs: dict[str, np.ndarray]
    action: np.ndarray
    reward: np.ndarray
    next_obs: dict[str, np.ndarray]
    terminated: np.ndarray
    done: np.ndarray
    envs: np.ndarray


class ReplayBuffer:
    """Uniform-sampling ring buffer of transitions with frame-deduplicated image stacks.

    Observations are dicts with an ``image`` key (uint8 frame stack, stack axis first), a ``vector`` key (float32), or
    both. Storage is allocated with ``torch.empty``, so resident memory grows as the buffer fills. With
    ``device="cuda"`` everything sampling touches lives on the GPU and a batch never leaves it.

    Each episode costs one frame slot more than its length (its first frame), so a ring of ``capacity`` transitions
    needs slightly more than ``capacity`` frames; ``spare_frames`` sets that margin (default ``capacity // 100``:
    episodes averaging 100 steps or more). With shorter episodes the oldest transitions are dropped a little before
    the ring is full, so ``len(buffer)`` settles slightly below ``capacity``.

    Files: ``save(path)`` writes atomically; ``load(path)`` fills this buffer and refuses a file written for another
    configuration; ``ReplayBuffer.from_file(path)`` builds a buffer from the file's own configuration.
    """

    def __init__(
        self,
        capacity: int,
        observation_shapes: Mapping[str, Sequence[int]],
        action_dim: int,
        num_envs: int = 1,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        *,
        spare_frames: int | None = None,
    ) -> None:
        """Args:
        capacity: Most transitions kept; the oldest are overwritten first. At least ``num_envs``.
        observation_shapes: ``{"image": (S, H, W)}``, ``{"vector": (D,)}``, or both keys.
        action_dim: A, the action size.
        num_envs: Envs writing in each ``add`` call (one row each).
        device: Where the storage lives and batches are returned.
        seed: Seed of the sampling RNG (a ``torch.Generator``); None draws one.
        spare_frames: Frame slots beyond one per transition, for the first frame of each episode.
        """
        _check_int("capacity", capacity, 1)
        _check_int("num_envs", num_envs, 1)
        _check_int("action_dim", action_dim, 1)
        if capacity < num_envs:
            raise ValueError(f"capacity={capacity} is smaller than num_envs={num_envs}: one add() writes num_envs "
                             "transitions, so capacity must be at least num_envs")
        if seed is not None:
            _check_int("seed", seed, 0)
        self._image_shape, self._vector_dim = _parse_shapes(observation_shapes)
        stack = self._image_shape[0] if self._image_shape else 0
        self._spare_frames = _default_spare_frames(capacity) if spare_frames is None else spare_frames
        _check_int("spare_frames", self._spare_frames, 0)
        self._frame_capacity = _frame_capacity(capacity, stack, num_envs, self._spare_frames) if stack else 0
        if self._frame_capacity > _MAX_SLOTS:
            raise ValueError(f"capacity={capacity} needs {self._frame_capacity} frame slots, more than {_MAX_SLOTS}")
        self._capacity, self._action_dim, self._num_envs = capacity, action_dim, num_envs
        self._device = torch.device(device)
        self._warn_if_too_big()
        self._allocate()
        self._generator = torch.Generator(device=self._device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def _allocate(self) -> None:
        capacity, device = self._capacity, self._device
        self._action = torch.empty(capacity, self._action_dim, dtype=torch.float32, device=device)
        self._reward = torch.empty(capacity, dtype=torch.float32, device=device)
        self._terminated = torch.empty(capacity, dtype=torch.float32, device=device)
        self._vector = self._next_vector = None
        if self._vector_dim:
            self._vector = torch.empty(capacity, self._vector_dim, dtype=torch.float32, device=device)
            self._next_vector = torch.empty(capacity, self._vector_dim, dtype=torch.float32, device=device)
        self._frames = self._stacks = None
        stack = self._image_shape[0] if self._image_shape else 0
        if self._image_shape:
            self._frames = torch.empty(self._frame_capacity, *self._image_shape[1:], dtype=torch.uint8, device=device)
            self._stacks = torch.empty(capacity, stack + 1, dtype=torch.int32, device=device)
        # Bookkeeping used by add() only, kept on the CPU. _frame_last_user[slot] is the newest transition (by
        # counter) whose stacks point at that slot; it is only read for slots that were written before.
        self._frame_last_user = torch.empty(self._frame_capacity, dtype=torch.int64)
        self._episode_open = torch.zeros(self._num_envs, dtype=torch.bool)
        self._open_stack = torch.zeros(self._num_envs, stack, dtype=torch.int64)
        # The frames _open_stack points at, kept on the host too: add() checks each env's new obs against them
        # without reading the storage back (for a CUDA buffer that was a device-to-host copy, and a sync, per add).
        self._open_frames = np.zeros((self._num_envs, *self._image_shape), np.uint8) if self._image_shape else None
        self._staging = _PinnedStaging(self._max_add_nbytes(), self._device) if self._device.type == "cuda" else None
        self._sample_staging: _PinnedStaging | None = None  # for batches to a GPU, made by the first such sample
        self._added = 0  # transitions ever added; transition t lives in slot t % capacity
        self._oldest = 0  # counter of the oldest transition still stored
        self._frames_added = 0  # frames ever written; frame g lives in slot g % frame_capacity

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def num_envs(self) -> int:
        return self._num_envs

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def observation_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        if self._image_shape:
            shapes[IMAGE] = self._image_shape
        if self._vector_dim:
            shapes[VECTOR] = (self._vector_dim,)
        return shapes

    @property
    def action_dim(self) -> int:
        return self._action_dim

    @property
    def nbytes(self) -> int:
        """Bytes the storage takes once full (what ``estimate_nbytes`` says for this configuration)."""
        return ReplayBuffer.estimate_nbytes(self._capacity, self.observation_shapes, self._action_dim,
                                            self._num_envs, spare_frames=self._spare_frames)

    @staticmethod
    def estimate_nbytes(capacity: int, observation_shapes: Mapping[str, Sequence[int]], action_dim: int,
                        num_envs: int = 1, *, spare_frames: int | None = None) -> int:
        """Bytes a full buffer of this configuration takes (about ``H·W + 4·(S+1) + 8`` per transition for images)."""
        image, vector_dim = _parse_shapes(observation_shapes)
        per_transition = 4 * (action_dim + 2) + 8 * (vector_dim or 0)
        total = capacity * per_transition
        if image:
            spare = _default_spare_frames(capacity) if spare_frames is None else spare_frames
            frames = _frame_capacity(capacity, image[0], num_envs, spare)
            total += frames * (image[1] * image[2] + 8) + capacity * 4 * (image[0] + 1)
        return total

    def __len__(self) -> int:
        return self._added - self._oldest

    def __repr__(self) -> str:
        return (f"ReplayBuffer(len={len(self)}, capacity={self._capacity}, observation_shapes="
                f"{self.observation_shapes}, action_dim={self._action_dim}, num_envs={self._num_envs}, "
                f"device={self._device})")

    # ------------------------------------------------------------------------------------------------ writing
    # The add path works in numpy on the host: torch's intra-op threads cost more than they save on a few rows, and
    # stall when the cores are busy (measured on 2 busy cores: 1 ms per add with numpy, up to 76 ms with torch).
    def add(
        self,
        obs: Mapping[str, np.ndarray],
        action: np.ndarray,
        reward: np.ndarray,
        next_obs: Mapping[str, np.ndarray],
        terminated: np.ndarray,
        truncated: np.ndarray,
        *,
        valid: np.ndarray | None = None,
    ) -> None:
        """Stores one vector-env step: row i of every array is env i's transition.

        ``next_obs`` is the true next observation (the final one when the episode ended). After ``terminated`` or
        ``truncated`` for env i, env i's next ``obs`` starts a new episode. Rows where ``valid`` is False (a step that
        produced no real transition) are not stored and close that env's episode. Raises before writing anything when
        a row breaks frame stacking: ``next_obs`` must be ``obs`` shifted by one frame, and ``obs`` must be the
        ``next_obs`` this env gave last time unless its episode ended (or ``mark_episode_boundary`` was called).
        """
        step = self._validated(obs, action, reward, next_obs, terminated, truncated, valid)
        if self._image_shape:
            self._check_frame_stacking(step)
        self._evict_for(len(step.envs))
        with self._staging.round() if self._staging is not None else contextlib.nullcontext():
            stacks = self._write_frames(step) if self._image_shape else None
            self._write_transitions(step, stacks)
        episode_open = self._episode_open.numpy()
        episode_open[:] = False
        episode_open[step.envs[~step.done]] = True
        if stacks is not None and self._open_frames is not None:
            self._open_stack.numpy()[step.envs] = stacks[:, 1:]
            self._open_frames[step.envs] = step.next_obs[IMAGE]

    def mark_episode_boundary(self, env_ids: Sequence[int] | None = None) -> None:
        """Ends the open episode of the given envs (default: all), as if their last step had been truncated.

        For a resumed run: the envs were reset, so their next ``obs`` starts a new episode.
        """
        if env_ids is None:
            self._episode_open[:] = False
            return
        ids = [int(i) for i in env_ids]
        bad = [i for i in ids if not 0 <= i < self._num_envs]
        if bad:
            raise ValueError(f"env_ids {bad} out of range: this buffer has num_envs={self._num_envs}")
        self._episode_open[ids] = False

    def _validated(self, obs: Mapping[str, Any], action: Any, reward: Any, next_obs: Mapping[str, Any],
                   terminated: Any, truncated: Any, valid: Any) -> _Step:
        n = self._num_envs
        envs = np.flatnonzero(np.ones(n, bool) if valid is None else _flags("valid", valid, n))
        terminated_, truncated_ = _flags("terminated", terminated, n), _flags("truncated", truncated, n)
        return _Step(
            obs=self._validated_obs("obs", obs, envs),
            action=_real("action", action, (n, self._action_dim), envs),
            reward=_real("reward", reward, (n,), envs),
            next_obs=self._validated_obs("next_obs", next_obs, envs),
            terminated=terminated_[envs].astype(np.float32),
            done=(terminated_ | truncated_)[envs],
            envs=envs,
        )

    def _validated_obs(self, name: str, obs: Mapping[str, Any], envs: np.ndarray) -> dict[str, np.ndarray]:
        if not isinstance(obs, Mapping) or set(obs) != set(self.observation_shapes):
            keys = sorted(obs) if isinstance(obs, Mapping) else type(obs).__name__
            raise ValueError(f"{name} has keys {keys}, expected {sorted(self.observation_shapes)} (the "
                             "observation_shapes of this buffer)")
        out = {}
        if self._image_shape:
            image = _as_array(f"{name}['image']", obs[IMAGE])
            _check_shape(f"{name}['image']", image, (self._num_envs, *self._image_shape))
            if image.dtype != np.uint8:
                raise ValueError(f"{name}['image'] has dtype {image.dtype}, expected uint8: the buffer stores raw "
                                 "pixels; scale them in the network, not before the buffer")
            out[IMAGE] = image[envs]
        if self._vector_dim:
            out[VECTOR] = _real(f"{name}['vector']", obs[VECTOR], (self._num_envs, self._vector_dim), envs)
        return out

    def _check_frame_stacking(self, step: _Step) -> None:
        image, next_image = step.obs[IMAGE], step.next_obs[IMAGE]
        shifted = _rows_differ(next_image[:, :-1], image[:, 1:])
        if shifted.any():
            raise ValueError(f"next_obs['image'] of env(s) {step.envs[shifted].tolist()} is not obs['image'] shifted "
                             "by one frame (next_obs[:, :-1] must equal obs[:, 1:]): the buffer stores each frame once "
                             "and needs frame-stacked observations")
        continuing = self._episode_open.numpy()[step.envs]
        envs = step.envs[continuing]
        broken = _rows_differ(self._open_frames[envs], image[continuing])
        if broken.any():
            raise ValueError(f"obs['image'] of env(s) {envs[broken].tolist()} is not the next_obs['image'] those envs "
                             "gave at the previous add(): pass terminated or truncated for the step that ended an "
                             "episode, and call mark_episode_boundary() after resetting envs (e.g. on resume)")

    def _evict_for(self, count: int) -> None:
        self._oldest = max(self._oldest, self._added + count - self._capacity)

    def _write_frames(self, step: _Step) -> np.ndarray:
        """Writes this step's new frames and returns each transition's S+1 frame slots."""
        assert self._frames is not None
        image, next_image = step.obs[IMAGE], step.next_obs[IMAGE]
        starting = ~self._episode_open.numpy()[step.envs]
        # A new episode's first stack is stored once per run of equal frames: one frame under "reset" padding.
        fresh = _distinct_frames(image) & starting[:, None]
        first, count = self._frames_added, int(fresh.sum()) + len(step.envs)
        self._evict_users_of_frames(first, count)
        # Frame counters of this step, in order: env 0's fresh frames, env 1's, ..., then each env's newest frame.
        counters = np.arange(first, first + count)
        self._write_rows(self._frames, first, np.concatenate([image[fresh], next_image[:, -1]]))
        self._frames_added += count
        per_env = fresh.sum(1)
        # Each position of a new episode's stack shows the last fresh frame at or before it.
        first_stack = first + (per_env.cumsum() - per_env)[:, None] + fresh.cumsum(1) - 1
        obs_slots = np.where(starting[:, None], first_stack % self._frame_capacity,
                             self._open_stack.numpy()[step.envs])
        newest = counters[count - len(step.envs):] % self._frame_capacity
        return np.concatenate([obs_slots, newest[:, None]], 1)

    def _evict_users_of_frames(self, first: int, count: int) -> None:
        """Drops every stored transition that points at a frame slot about to be overwritten (they are the oldest)."""
        start = max(first, self._frame_capacity)  # frames below frame_capacity go to never-used slots
        if start < first + count:
            reused = np.arange(start, first + count) % self._frame_capacity
            self._oldest = max(self._oldest, int(self._frame_last_user.numpy()[reused].max()) + 1)

    def _write_transitions(self, step: _Step, stacks: np.ndarray | None) -> None:
        first = self._added
        counters = np.arange(first, first + len(step.envs))
        self._write_rows(self._action, first, step.action)
        self._write_rows(self._reward, first, step.reward)
        self._write_rows(self._terminated, first, step.terminated)
        if self._vector is not None and self._next_vector is not None:
            self._write_rows(self._vector, first, step.obs[VECTOR])
            self._write_rows(self._next_vector, first, step.next_obs[VECTOR])
        if stacks is not None and self._stacks is not None:
            self._write_rows(self._stacks, first, stacks.astype(np.int32))
            self._frame_last_user.numpy()[stacks.reshape(-1)] = counters.repeat(stacks.shape[1])
        self._added += len(step.envs)

    def _write_rows(self, target: torch.Tensor, first: int, rows: np.ndarray) -> None:
        """Writes ``rows`` to the ring ``target`` at counters ``first, first + 1, ...`` (slot = counter mod its
        length), as at most two slices.

        On a CUDA buffer each slice is one asynchronous copy from the pinned staging area (``_PinnedStaging``).
        """
        start = first % len(target)
        head = min(len(rows), len(target) - start)
        source = rows if self._staging is None or not len(rows) else self._staging.stage(rows, target.dtype)
        for slots, part in [(slice(start, start + head), source[:head]), (slice(0, len(rows) - head), source[head:])]:
            if len(part) and self._staging is None:
                target.numpy()[slots] = part
            elif len(part):
                target[slots].copy_(part, non_blocking=True)

    def _max_add_nbytes(self) -> int:
        """Bytes of the rows one ``add`` writes at most: each env's transition and, per env, the S frames of a new
        episode's first stack plus its newest frame."""
        row_nbytes = [self._action[0].nbytes, self._reward[0].nbytes, self._terminated[0].nbytes]
        row_nbytes += [t[0].nbytes for t in (self._vector, self._next_vector, self._stacks) if t is not None]
        frames_nbytes = (self._image_shape[0] + 1) * self._frames[0].nbytes if self._frames is not None else 0
        return self._num_envs * (sum(row_nbytes) + frames_nbytes) + _PinnedStaging.ALIGN * (len(row_nbytes) + 1)

    def _read_frames(self, frame_slots: np.ndarray) -> np.ndarray:
        """Frames at [K, S] slots, as a [K, S, H, W] host array."""
        assert self._frames is not None
        if self._device.type == "cpu":
            return self._frames.numpy()[frame_slots]
        flat = self._frames.index_select(0, torch.from_numpy(frame_slots.reshape(-1)).to(self._device))
        return flat.cpu().numpy().reshape(*frame_slots.shape, *self._frames.shape[1:])

    # ------------------------------------------------------------------------------------------------ reading
    def sample(self, batch_size: int, device: str | torch.device | None = None) -> Transition:
        """``batch_size`` transitions drawn uniformly (with replacement) from those stored, on ``device`` (default:
        the buffer's).

        From a CPU buffer to a GPU, the batch is gathered straight into pinned memory and goes over in one
        asynchronous copy (``_PinnedStaging``): copies from pageable memory, as ``Tensor.to`` of a batch gathered on
        the CPU makes, each wait for the GPU's queued work (the update before) and for their bytes to be staged.
        """
        _check_int("batch_size", batch_size, 1)
        if len(self) == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer: add() transitions first")
        if batch_size > len(self):
            raise ValueError(f"batch_size={batch_size} is larger than the {len(self)} transitions stored")
        positions = torch.randint(len(self), (batch_size,), generator=self._generator, device=self._device)
        slots = (positions + self._oldest) % self._capacity
        to = self._device if device is None else torch.device(device)
        if to.type == "cuda" and self._device.type == "cpu":
            return self._gather_to_gpu(slots, to)
        batch = self._gather(slots)
        return batch if to == self._device else _mapped(batch, lambda t: t.to(to))

    def _gather_to_gpu(self, slots: torch.Tensor, device: torch.device) -> Transition:
        staging, nbytes = self._sample_staging, self._batch_nbytes(len(slots))
        if staging is None or staging.device != device or staging.nbytes < nbytes:
            staging = self._sample_staging = _PinnedStaging(nbytes, device)
        with staging.round():
            staged = self._gather(slots, staging.empty)
            return _mapped(staged, staging.to_device(staging.copy()))

    def get(self, indices: torch.Tensor | Sequence[int]) -> Transition:
        """The stored transitions at these positions, 0 being the oldest and ``len(self) - 1`` the newest."""
        positions = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        bad = positions[(positions < 0) | (positions >= len(self))]
        if len(bad):
            raise IndexError(f"indices {bad[:5].tolist()} out of range: the buffer holds {len(self)} transitions")
        return self._gather(((positions + self._oldest) % self._capacity).to(self._device))

    def _gather(self, slots: torch.Tensor, empty: _Empty = None) -> Transition:
        """The transitions in these ring slots, each tensor written into ``empty(shape, dtype)`` where given (a
        pinned staging area), else new on the buffer's device."""
        def take(source: torch.Tensor) -> torch.Tensor:
            if empty is None:
                return source.index_select(0, slots)
            return torch.index_select(source, 0, slots, out=empty((len(slots), *source.shape[1:]), source.dtype))

        obs: dict[str, torch.Tensor] = {}
        next_obs: dict[str, torch.Tensor] = {}
        if self._stacks is not None:
            obs[IMAGE], next_obs[IMAGE] = self._image_stacks(self._stacks.index_select(0, slots), empty)
        if self._vector is not None and self._next_vector is not None:
            obs[VECTOR], next_obs[VECTOR] = take(self._vector), take(self._next_vector)
        return Transition(obs, take(self._action), take(self._reward), next_obs, take(self._terminated))

    def _image_stacks(self, stacks: torch.Tensor, empty: _Empty = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The obs and next_obs image stacks of transitions with these S+1 frame slots: frames [0..S-1], [1..S]."""
        assert self._frames is not None
        batch, stack, frame_shape = len(stacks), stacks.shape[1] - 1, self._frames.shape[1:]
        # Both stacks go into one block: with two separate 7 MB outputs per batch, glibc kept handing the memory
        # back to the OS and faulting it in again (7.0 ms per batch of 256 against 1.6 ms; one Xeon core, 1M frames).
        slots = torch.cat([stacks[:, :-1].reshape(-1), stacks[:, 1:].reshape(-1)])
        if self._device.type == "cpu":
            # numpy's take runs on one thread. torch's index_select spreads over every intra-op thread, and in a
            # learner whose cores the env workers share that was 6x slower (11.5 ms per batch with torch's 16
            # threads against 2.0 ms with one, in runs on the 16-core GPU machine; BENCHMARKS.md, "Sampling in a
            # run").
            # mode="clip" (the slots are the buffer's own, always in range): with "raise", numpy gathers into a
            # temporary and copies that into `out` (perf/sample_ms 8.1 against 3.0 in an H200 run; BENCHMARKS.md).
            out = None if empty is None else empty((len(slots), *frame_shape), torch.uint8).numpy()
            pair = torch.from_numpy(np.take(self._frames.numpy(), slots.numpy(), axis=0, out=out, mode="clip"))
        else:
            pair = self._frames.index_select(0, slots)
        pair = pair.view(2, batch, stack, *frame_shape)
        return pair[0], pair[1]

    def _batch_nbytes(self, batch_size: int) -> int:
        """Bytes of a batch of ``batch_size``, as ``_gather`` lays it out in a staging area."""
        row_nbytes = [self._action[0].nbytes, self._reward[0].nbytes, self._terminated[0].nbytes]
        row_nbytes += [2 * t[0].nbytes for t in (self._vector,) if t is not None]
        frames_nbytes = 2 * self._image_shape[0] * self._frames[0].nbytes if self._frames is not None else 0
        return batch_size * (sum(row_nbytes) + frames_nbytes) + _PinnedStaging.ALIGN * (len(row_nbytes) + 2)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, sampling RNG included; loads with ``torch.load(weights_only=True)``.

        Tensors are on the CPU and hold only the filled part. For a CPU buffer they share memory with the buffer
        (a full one is gigabytes): save or copy them before the next ``add``.
        """
        tensors = self._filled_tensors()
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "config": self._config(),
            "counters": {"added": self._added, "oldest": self._oldest, "frames_added": self._frames_added},
            "generator": {"device": self._device.type, "state": self._generator.get_state()},
            "tensors": tensors,
            # torch.load verifies no checksum: without these a flipped byte would load silently.
            "checksums": {name: _crc32(t) for name, t in tensors.items()},
        }

    def _config(self) -> dict[str, Any]:
        return {"capacity": self._capacity,
                "observation_shapes": {k: list(v) for k, v in self.observation_shapes.items()},
                "action_dim": self._action_dim, "num_envs": self._num_envs, "spare_frames": self._spare_frames}

    def _filled_tensors(self) -> dict[str, torch.Tensor]:
        """The state tensors, named after the attributes they restore (``"frames"`` is ``self._frames``)."""
        n, n_frames = min(self._added, self._capacity), min(self._frames_added, self._frame_capacity)
        tensors = {"action": _cpu_prefix(self._action, n), "reward": _cpu_prefix(self._reward, n),
                   "terminated": _cpu_prefix(self._terminated, n)}
        if self._vector is not None and self._next_vector is not None:
            tensors |= {"vector": _cpu_prefix(self._vector, n), "next_vector": _cpu_prefix(self._next_vector, n)}
        if self._frames is not None and self._stacks is not None:
            tensors |= {"frames": _cpu_prefix(self._frames, n_frames), "stacks": _cpu_prefix(self._stacks, n),
                        "frame_last_user": _cpu_prefix(self._frame_last_user, n_frames),
                        "episode_open": self._episode_open.clone(), "open_stack": self._open_stack.clone()}
        return tensors

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a ``state_dict()``; refuses one written for another configuration or that fails its checks.

        Checks everything before writing anything. Open episodes are restored as they were: if the envs were reset
        since, call ``mark_episode_boundary()``.
        """
        _check_format(state)
        self._check_config(_expect(state, "config", Mapping))
        added, oldest, frames_added = self._checked_counters(_expect(state, "counters", Mapping))
        tensors = self._checked_tensors(_expect(state, "tensors", Mapping), _expect(state, "checksums", Mapping),
                                        added, frames_added)
        generator_state = self._checked_generator_state(_expect(state, "generator", Mapping))
        for name, tensor in tensors.items():
            getattr(self, f"_{name}")[: len(tensor)].copy_(tensor)
        self._added, self._oldest, self._frames_added = added, oldest, frames_added
        if self._open_frames is not None:
            self._open_frames[:] = self._read_frames(self._open_stack.numpy())
        if generator_state is not None:
            self._generator.set_state(generator_state)

    def _check_config(self, config: Mapping[str, Any]) -> None:
        ours = self._config()
        diff = [f"{k}={config.get(k)!r} (this buffer: {v!r})" for k, v in ours.items() if config.get(k) != v]
        if diff:
            raise ValueError("buffer state was written for another configuration: " + ", ".join(diff))

    def _checked_generator_state(self, generator: Mapping[str, Any]) -> torch.Tensor | None:
        device, state = _expect(generator, "device", str), _expect(generator, "state", torch.Tensor)
        if device != self._device.type:
            warnings.warn(f"the sampling RNG state was saved on {device} and cannot be restored on "
                          f"{self._device.type}: sampling continues from this buffer's own seed", stacklevel=3)
            return None
        try:
            torch.Generator(device=self._device).set_state(state)
        except RuntimeError as exc:
            raise ValueError(f"buffer state has an unusable sampling RNG state: {exc}") from exc
        return state

    def _checked_counters(self, counters: Any) -> tuple[int, int, int]:
        added, oldest, frames_added = (_expect(counters, k, int) for k in ("added", "oldest", "frames_added"))
        ok = 0 <= oldest <= added and added - oldest <= self._capacity and frames_added >= 0
        if self._image_shape:
            ok = ok and frames_added >= added
        if not ok:
            raise ValueError(f"buffer state has inconsistent counters added={added}, oldest={oldest}, "
                             f"frames_added={frames_added} for capacity={self._capacity}")
        return added, oldest, frames_added

    def _checked_tensors(self, tensors: Any, checksums: Any, added: int, frames_added: int) -> dict[str, torch.Tensor]:
        expected = {name: (t.dtype, tuple(t.shape)) for name, t in
                    self._expected_tensors(min(added, self._capacity),
                                           min(frames_added, self._frame_capacity)).items()}
        if not isinstance(tensors, Mapping) or set(tensors) != set(expected):
            raise ValueError(f"buffer state has tensors {sorted(tensors) if isinstance(tensors, Mapping) else tensors}"
                             f", expected {sorted(expected)}")
        for name, (dtype, shape) in expected.items():
            t = tensors[name]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"buffer state tensor {name!r} is {got}, expected {dtype} {shape}")
            if not isinstance(checksums, Mapping) or checksums.get(name) != _crc32(t):
                raise ValueError(f"buffer state tensor {name!r} fails its checksum: the data is corrupt")
        if self._image_shape:
            self._check_frame_references(tensors, min(frames_added, self._frame_capacity))
        return dict(tensors)

    def _expected_tensors(self, n: int, n_frames: int) -> dict[str, torch.Tensor]:
        """Meta tensors with the dtype and shape each state tensor must have."""
        def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device="meta")

        out = {"action": meta(n, self._action_dim), "reward": meta(n), "terminated": meta(n)}
        if self._vector_dim:
            out |= {"vector": meta(n, self._vector_dim), "next_vector": meta(n, self._vector_dim)}
        if self._image_shape:
            stack, height, width = self._image_shape
            out |= {"frames": meta(n_frames, height, width, dtype=torch.uint8),
                    "stacks": meta(n, stack + 1, dtype=torch.int32),
                    "frame_last_user": meta(n_frames, dtype=torch.int64),
                    "episode_open": meta(self._num_envs, dtype=torch.bool),
                    "open_stack": meta(self._num_envs, stack, dtype=torch.int64)}
        return out

    @staticmethod
    def _check_frame_references(tensors: Mapping[str, torch.Tensor], n_frames: int) -> None:
        open_stack = tensors["open_stack"][tensors["episode_open"]]
        for name, slots in (("stacks", tensors["stacks"]), ("open_stack", open_stack)):
            if len(slots) and not (int(slots.min()) >= 0 and int(slots.max()) < n_frames):
                raise ValueError(f"buffer state tensor {name!r} points outside the {n_frames} frames written")

    # ------------------------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Writes ``state_dict()`` to ``path`` atomically: a temp file in the same folder, fsync, then rename.

        A crash or error mid-write leaves any previous file at ``path`` as it was.
        """
        state = self.state_dict()
        atomic_write(path, lambda f: torch.save(state, f))

    def load(self, path: str | os.PathLike) -> None:
        """Loads a file written by ``save`` into this buffer, which must have the same configuration.

        A truncated or corrupt file, or one written for another configuration, raises ``ValueError`` naming the file.
        Open episodes are restored as saved: after resetting the envs, call ``mark_episode_boundary()``.
        """
        state = _read_state(path)
        try:
            self.load_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"cannot load replay buffer file {str(path)!r}: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> ReplayBuffer:
        """A new buffer with the configuration and contents of a file written by ``save`` (e.g. for analysis)."""
        state = _read_state(path)
        try:
            _check_format(state)
            config = _expect(state, "config", Mapping)
            buffer = cls(config["capacity"], config["observation_shapes"], config["action_dim"], config["num_envs"],
                         device=device, spare_frames=config["spare_frames"])
            buffer.load_state_dict(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"cannot load replay buffer file {str(path)!r}: {exc}") from exc
        return buffer

    def _warn_if_too_big(self) -> None:
        needed = self.nbytes
        if self._device.type == "cuda":
            available = torch.cuda.mem_get_info(self._device)[0]
        elif self._device.type == "cpu":
            available = psutil.virtual_memory().available
        else:
            return
        if needed > available:
            # As in Stable-Baselines3: storage is touched lazily, so the failure would come hours into the run.
            warnings.warn(f"this ReplayBuffer needs {needed / 1e9:.2f} GB once full (capacity={self._capacity}) but "
                          f"only {available / 1e9:.2f} GB of {self._device.type} memory is available; lower the "
                          "capacity or free memory", stacklevel=3)


# ---------------------------------------------------------------------------------------------------- helpers
class _PinnedStaging:
    """Pinned host memory that data passes through on its way to a GPU (one ``add``'s rows to a CUDA buffer, or a CPU
    buffer's batch to the learner): two areas, used in turn.

    A copy to the GPU from pageable memory waits for all queued GPU work (the learner's update) first. Pinning each
    write anew (``Tensor.pin_memory()``) avoids that wait but goes through torch's caching host allocator every time:
    in a graphed 8-env run that made the learning phase slower than pageable copies did (339 against 547 env-steps/s,
    ``benchmarks/env_scaling.py`` on an H200). An area is refilled only after the copies out of it have run: an event
    recorded behind them is waited for, and since the other area took the add in between, it has normally passed.
    """

    ALIGN = 64
    """Byte alignment of each staged array (a float32 or int32 view of the area needs at least 4)."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.device, self.nbytes = device, nbytes
        self._areas = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = self._used = 0

    @contextlib.contextmanager
    def round(self) -> Iterator[None]:
        """One ``add``: stages into the area whose copies are the older, and marks where its copies end on the
        stream, also when the add fails half-way (copies already issued still read the area)."""
        self._turn, self._used = 1 - self._turn, 0
        copied = self._copied[self._turn]
        if copied is not None and not copied.query():
            copied.synchronize()
        try:
            yield
        finally:
            self._copied[self._turn] = torch.cuda.Event()
            self._copied[self._turn].record(torch.cuda.current_stream(self.device))

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialized pinned memory of ``shape`` and ``dtype`` in this round's area, valid until its next round."""
        start = -(-self._used // self.ALIGN) * self.ALIGN
        end = start + math.prod(shape) * dtype.itemsize
        area = self._areas[self._turn]
        assert end <= len(area), f"staged {end} bytes, more than the {len(area)} this area was sized for"
        self._used = end
        return area[start:end].view(dtype).view(*shape)

    def stage(self, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """A pinned copy of ``rows`` as ``dtype``, valid until this area's next round."""
        staged = self.empty(rows.shape, dtype)
        staged.numpy()[...] = rows
        return staged

    def copy(self) -> torch.Tensor:
        """What this round staged, copied to the GPU as one asynchronous transfer."""
        return self._areas[self._turn][:self._used].to(self.device, non_blocking=True)

    def to_device(self, copied: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Maps a tensor staged in this round to its part of ``copied`` (``copy()``'s result)."""
        base = self._areas[self._turn].data_ptr()

        def on_device(staged: torch.Tensor) -> torch.Tensor:
            start = staged.data_ptr() - base
            return copied[start:start + staged.nbytes].view(staged.dtype).view(staged.shape)

        return on_device


def _mapped(batch: Transition, fn: Callable[[torch.Tensor], torch.Tensor]) -> Transition:
    """``batch`` with ``fn`` applied to each of its tensors."""
    return Transition({k: fn(v) for k, v in batch.obs.items()}, fn(batch.action), fn(batch.reward),
                      {k: fn(v) for k, v in batch.next_obs.items()}, fn(batch.terminated))


def _default_spare_frames(capacity: int) -> int:
    return capacity // 100  # one first frame per 100 transitions: no loss for episodes of 100 steps or more


def _frame_capacity(capacity: int, stack: int, num_envs: int, spare_frames: int) -> int:
    # (S+1)·num_envs·(S+1) slots cover every frame written in the last S+1 add() calls, which include every frame an
    # env's open stack points at: those are never overwritten, whatever the episode lengths.
    return capacity + spare_frames + (stack + 1) ** 2 * num_envs


def _distinct_frames(stacks: np.ndarray) -> np.ndarray:
    """[N, S] mask of the frames of each stack that differ from the frame before them (the first always does)."""
    distinct = np.ones(stacks.shape[:2], dtype=bool)
    distinct[:, 1:] = _flat(stacks[:, 1:] != stacks[:, :-1], axes=2).any(2)
    return distinct


def _parse_shapes(shapes: Any) -> tuple[tuple[int, int, int] | None, int | None]:
    if not isinstance(shapes, Mapping) or not shapes or not set(shapes) <= {IMAGE, VECTOR}:
        raise ValueError(f"observation_shapes={shapes!r} must be a dict with keys 'image' (S, H, W) and/or "
                         "'vector' (D,)")
    image = vector = None
    if IMAGE in shapes:
        image = tuple(shapes[IMAGE])
        if len(image) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in image):
            raise ValueError(f"observation_shapes['image']={shapes[IMAGE]!r} must be (S, H, W), three positive "
                             "ints, frame-stack axis first")
    if VECTOR in shapes:
        vector = tuple(shapes[VECTOR])
        if len(vector) != 1 or not isinstance(vector[0], int) or isinstance(vector[0], bool) or vector[0] < 1:
            raise ValueError(f"observation_shapes['vector']={shapes[VECTOR]!r} must be (D,), one positive int")
    return image, (vector[0] if vector else None)  # type: ignore[return-value]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


def _as_array(name: str, value: Any) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} has dtype {array.dtype}, expected a numeric array")
    return array


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape} (one row per env, num_envs={shape[0]})")


def _real(name: str, value: Any, shape: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """Float32 copy of the kept rows of a real-valued array; refuses NaN/inf (one would poison every target)."""
    array = _as_array(name, value)
    _check_shape(name, array, shape)
    if array.dtype == np.bool_:
        raise ValueError(f"{name} has dtype bool, expected a real number type (float32)")
    kept = array[rows].astype(np.float32)
    finite = _flat(np.isfinite(kept), axes=1).all(1)
    if not finite.all():
        raise ValueError(f"{name} of env(s) {rows[~finite].tolist()} is NaN or infinite")
    return kept


def _flags(name: str, value: Any, num_envs: int) -> np.ndarray:
    array = _as_array(name, value)
    _check_shape(name, array, (num_envs,))
    if array.dtype != np.bool_:
        raise ValueError(f"{name} has dtype {array.dtype}, expected bool")
    return array


def _rows_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row (first axis): whether a and b differ anywhere."""
    return np.asarray(_flat(a != b, axes=1).any(1))


def _flat(array: np.ndarray, axes: int) -> np.ndarray:
    """``array`` with every axis after the first ``axes`` merged into one (well defined for empty arrays too)."""
    return array.reshape(*array.shape[:axes], int(np.prod(array.shape[axes:])))


def _cpu_prefix(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows as a CPU tensor; on the CPU it shares memory with ``tensor`` instead of copying it."""
    if tensor.device.type != "cpu":
        return tensor[:n].cpu()
    if n == len(tensor):
        return tensor
    # torch.save writes a view's whole storage (touching every lazily allocated page): give the prefix a storage of
    # its own size that aliases the same memory.
    nbytes = n * tensor[0].numel() * tensor.element_size()
    storage = tensor.untyped_storage()[:nbytes]
    return torch.empty(0, dtype=tensor.dtype).set_(storage, 0, (n, *tensor.shape[1:]), tensor.stride())


def _crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().numpy().reshape(-1).view(np.uint8).data)


def _check_format(state: Any) -> None:
    found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
    if found != _FORMAT:
        raise ValueError(f"not a {_FORMAT} state (found format={found!r})")
    if state.get("version") != _VERSION:
        raise ValueError(f"buffer state has version={state.get('version')!r}, this code reads version={_VERSION}")


def _expect(mapping: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    value = mapping.get(key) if isinstance(mapping, Mapping) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"buffer state field {key!r} is {type(value).__name__}, expected {kind}")
    return value


def _read_state(path: str | os.PathLike) -> Any:
    if not Path(path).is_file():
        raise FileNotFoundError(f"replay buffer file {str(path)!r} does not exist")
    try:
        # mmap: the file is read page by page into the buffer's own storage instead of being loaded whole first.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError...: all mean "unreadable"
        raise ValueError(f"replay buffer file {str(path)!r} is truncated or corrupt: {exc}") from exc

"""Shared helpers of the benchmark scripts (GitHub issue "Performance", sections 2-4).

What lives here: the machine/versions line every table ends with, median and min-max formatting, Markdown tables,
the harness that drives lit_td3 through its real CLI (``TD3CLI``) with timing callbacks added, and the callbacks that
time the learning phase and single updates.

The scripts import this file as ``common`` (run them as ``python benchmarks/<script>.py``). Nothing here asserts a
target or edits a number: the scripts print what they measure and the reader compares it with the issue's targets.
Timed regions on CUDA are bracketed by ``torch.cuda.synchronize()``; nothing here ever syncs inside a timed region
of the code under test beyond that.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader, IterableDataset

from lit_td3.buffer import ReplayBuffer, Transition

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "td3.yaml"
DROPPED_CALLBACKS = ("EnvStepCheckpoint", "EvaluationCallback", "EnvStepProgressBar")
"""Callbacks of configs/td3.yaml left out of timed runs: checkpoints (buffer files on disk), evaluation episodes and
the progress display have no counterpart inside Stable-Baselines3's ``learn`` and are not part of the learning loop.
The gradient alerts stay: they consume the telemetry whose cost is part of what is measured."""
PIXEL_ENV, STATE_ENV = "lit_td3/CarRacing-v3", "Pendulum-v1"
STATE_HIDDEN_SIZES = [400, 300]


# ---------------------------------------------------------------------------------------------------- reporting
def machine_line(device: str) -> str:
    """One line naming the CPU, cores, RAM, GPU (when used) and the versions that decide the numbers."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" and torch.cuda.is_available() else ""
    versions = ", ".join(f"{name} {_version(name)}" for name in
                         ("pytorch-lightning", "gymnasium", "numpy", "stable-baselines3"))
    return (f"Machine: {cpu} ({os.cpu_count()} cores, {psutil.virtual_memory().total / 1e9:.0f} GB RAM){gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{versions}")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Summary:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise ValueError("no measurements to summarize (was the timed window empty?)")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}–{self.high:.{digits}f})"


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first line as the description, the rest (commands, notes) as the epilog."""
    lines = (doc or "").split("\n")
    return argparse.ArgumentParser(description=lines[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(lines[1:]))


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str],
                     least: int) -> None:
    """``parser.error`` naming the flag and its value unless each of ``names`` that was given is at least ``least``."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} {value}: expected at least {least}")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


_LOAD_SAMPLES: list[float] = []


def log(message: str) -> None:
    """Progress notes go to stderr, so stdout holds only the Markdown report; each note also samples the load."""
    _LOAD_SAMPLES.append(os.getloadavg()[0])
    print(message, file=sys.stderr, flush=True)


def run_line(started: float) -> str:
    """Wall time since ``started`` and the 1-minute load average, sampled at each progress note: other processes on
    the machine take cores, and the numbers above are only as good as that allows. The first sample shows the load
    before this run; later ones include this run's own processes (learner threads, env workers)."""
    samples = [*_LOAD_SAMPLES, os.getloadavg()[0]]
    return (f"Wall time {time.perf_counter() - started:.0f} s; 1-minute load average {samples[0]:.1f} at the start, "
            f"{min(samples):.1f}–{max(samples):.1f} during the run (its own processes included) on "
            f"{os.cpu_count()} cores.")


# ---------------------------------------------------------------------------------------------------- timing
def synchronize(device: str | torch.device) -> None:
    """Waits for queued GPU work, so that a wall-clock stamp covers it; a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def accelerator_of(device: str) -> str:
    return {"cpu": "cpu", "cuda": "gpu"}[device]


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device on this machine")


STAGES = ("env_ms", "env_step_ms", "act_ms", "write_ms", "sample_ms", "update_ms")
"""lit_td3's per-stage times (``perf/*``, README): env step or the wait for it, the env step's own time where the env
runs, policy step, buffer write, sampling, update with Lightning's loop."""


def stage_section(stages: dict[str, dict[str, list[float]]], label: str) -> str:
    """lit_td3's learning phase stage by stage: one row per run kind (``label`` heads the column), each stage's median
    over the timed windows' log points, ms per call, with min–max; or a line saying that none fell inside them."""
    if not any(stages.values()):
        return ("lit_td3's stage timings (`perf/*`): no log point fell inside the timed windows (more timed steps, or a "
                "smaller --lit-arg=--model.log_every_n_env_steps=N).")
    rows = [[name] + [Summary.of(values[s]).text(3) if values.get(s) else "not logged" for s in STAGES]
            for name, values in stages.items()]
    return ("lit_td3's learning phase stage by stage (`perf/*`, ms per call; medians over the timed windows' log "
            "points, min–max):\n\n" + markdown_table([label, *(f"perf/{s}" for s in STAGES)], rows))


class LearningWindow(pl.Callback):
    """Wall time, env steps and updates of a lit_td3 run between env step ``start`` and env step ``end``.

    Stamps are taken at batch ends (after a synchronize on CUDA): the first batch that ends at or past ``start`` opens
    the window, the first that ends at or past ``end`` (the run's last batch: the stream has already taken every env
    step when Lightning runs its prefetched last batch) closes it.
    """

    def __init__(self, start: int, end: int, device: str) -> None:
        self.start, self.end, self.device = start, end, device
        self.opened: tuple[float, int, int] | None = None
        self.closed: tuple[float, int, int] | None = None
        self.stages: dict[str, list[float]] = {}
        """``perf/<stage>`` of each log point whose interval lies inside the window (``stage_section``)."""
        self._log_point = -1

    def _stamp(self, pl_module: Any) -> tuple[float, int, int]:
        synchronize(self.device)
        counters = pl_module.counters
        return time.perf_counter(), counters.env_steps, counters.critic_updates

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        steps = pl_module.counters.env_steps
        if self.opened is None and steps >= self.start:
            self.opened = self._stamp(pl_module)
        elif self.opened is not None and self.closed is None:
            if steps >= self.end:
                self.closed = self._stamp(pl_module)
            self._read_stages(pl_module, steps)

    def _read_stages(self, pl_module: Any, steps: int) -> None:
        # The stream logs perf/* at every multiple of log_every_n_env_steps, as means since the multiple before.
        every = pl_module.log_every_n_env_steps
        point = steps // every
        if point != self._log_point and (point - 1) * every >= self.start:
            for stage in STAGES:
                value = pl_module.latest_metrics.get(f"perf/{stage}")
                if value is not None:
                    self.stages.setdefault(stage, []).append(value)
        self._log_point = point

    def pool_stages(self, pooled: dict[str, list[float]]) -> None:
        """Adds this window's stage times to ``pooled`` (stage -> values over several runs)."""
        for stage, values in self.stages.items():
            pooled.setdefault(stage, []).extend(values)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.opened is not None and self.closed is None:
            self.closed = self._stamp(pl_module)

    def rates(self) -> tuple[float, float, int]:
        """(env-steps/s, updates/s, env steps in the window)."""
        if self.opened is None or self.closed is None or self.closed[1] <= self.opened[1]:
            raise RuntimeError(f"the timed window [{self.start}, {self.end}] saw no env steps: more --steps?")
        seconds = self.closed[0] - self.opened[0]
        steps, updates = self.closed[1] - self.opened[1], self.closed[2] - self.opened[2]
        return steps / seconds, updates / seconds, steps


class UpdateTimer(pl.Callback):
    """Wall time of each ``training_step`` (plus the callbacks listed before this one), synchronized on CUDA.

    Put it last in the callback list so that its ``on_train_batch_end`` runs after the other callbacks'.
    """

    def __init__(self, device: str, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.seconds: list[float] = []
        self._started = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        synchronize(self.device)  # the batch's host-to-device copy is not part of the update
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        synchronize(self.device)
        elapsed = time.perf_counter() - self._started
        if batch_idx >= self.warmup:
            self.seconds.append(elapsed)


def per_update_ms(seconds: Sequence[float], policy_freq: int) -> list[float]:
    """Milliseconds per TD3 update (one critic step + 1/policy_freq of an actor step): each group of
    ``policy_freq`` consecutive batches holds exactly one actor step, so its mean is one such update."""
    groups = len(seconds) // policy_freq
    return [1e3 * sum(seconds[g * policy_freq:(g + 1) * policy_freq]) / policy_freq for g in range(groups)]


class Batches(IterableDataset):
    """``count`` batches from ``draw`` (a replay-buffer sample, or one of a fixed pool of batches)."""

    def __init__(self, draw: Callable[[int], Transition], count: int) -> None:
        super().__init__()
        self.draw, self.count = draw, count

    def __iter__(self) -> Iterator[Transition]:
        for i in range(self.count):
            yield self.draw(i)


def time_updates(module: pl.LightningModule, draw: Callable[[int], Transition], *, device: str, iterations: int,
                 warmup: int, callbacks: Sequence[pl.Callback] = (), precision: Any = "32-true",
                 pin_memory: bool = False, strategy: Any = "auto") -> UpdateTimer:
    """Runs ``warmup + iterations`` training steps of ``module`` in a fresh Trainer and times each one.

    Batches come from ``draw``; a CPU batch is copied to the device by Lightning (from pinned memory with
    ``pin_memory``) before the timer starts, so the timed region is the update alone, as ``training_step`` runs
    inside ``fit``.
    """
    timer = UpdateTimer(device, warmup)
    loader = DataLoader(Batches(draw, warmup + iterations), batch_size=None, num_workers=0, pin_memory=pin_memory)
    trainer = pl.Trainer(
        accelerator=accelerator_of(device), devices=1, strategy=strategy, max_epochs=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*callbacks, timer],
    )
    with quiet():
        trainer.fit(module, train_dataloaders=loader)
    return timer


def buffer_sampler(buffer: ReplayBuffer, batch_size: int) -> Callable[[int], Transition]:
    return lambda _: buffer.sample(batch_size)


def timed_ms(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 1) -> list[float]:
    """Milliseconds per call of ``fn``, ``repeats`` times after ``warmup`` untimed calls, synchronized on CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def time_lit_sampling(buffer: ReplayBuffer, batch_size: int, device: str, repeats: int) -> list[float]:
    """Milliseconds per batch the way the learner gets it: ``buffer.sample`` onto the learner's device (in the data
    module's ``on_before_batch_transfer``), synchronized."""
    return timed_ms(lambda: buffer.sample(batch_size, device), device, repeats)


def to_device(batch: Transition, device: torch.device) -> Transition:
    # non_blocking: from pinned memory the copy overlaps host work, as Lightning's own batch transfer does.
    return Transition(*[
        {k: v.to(device, non_blocking=True) for k, v in part.items()} if isinstance(part, dict)
        else part.to(device, non_blocking=True)
        for part in batch
    ])


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Library chatter (Lightning's prints, SB3's) goes to stderr while a measurement runs."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ---------------------------------------------------------------------------------------------------- lit_td3 runs
def base_config() -> dict[str, Any]:
    """configs/td3.yaml, the configuration every lit_td3 run here starts from."""
    return yaml.safe_load(BASE_CONFIG.read_text())


def timed_callbacks() -> list[dict[str, Any]]:
    """configs/td3.yaml's callbacks minus the ones with no counterpart in a plain learning loop (DROPPED_CALLBACKS)."""
    callbacks = base_config()["trainer"].get("callbacks") or []
    return [c for c in callbacks if not str(c["class_path"]).endswith(DROPPED_CALLBACKS)]


def timed_callback_instances() -> list[pl.Callback]:
    """``timed_callbacks()`` instantiated as LightningCLI would: the telemetry consumers (gradient alerts)."""
    import importlib

    out = []
    for spec in timed_callbacks():
        module_name, _, class_name = spec["class_path"].rpartition(".")
        out.append(getattr(importlib.import_module(module_name), class_name)(**spec.get("init_args", {})))
    return out


@dataclass
class LitRun:
    """A finished lit_td3 training run: its learning-phase window and what is left to time updates with."""

    window: LearningWindow
    module: Any
    buffer: ReplayBuffer
    policy_freq: int


def run_lit_td3(*, device: str, data: dict[str, Any], model: dict[str, Any] | None = None, window_start: int,
                extra_args: Sequence[str] = ()) -> LitRun:
    """Trains through ``TD3CLI`` in this process: configs/td3.yaml, then an overlay of ``data``/``model`` settings,
    then ``extra_args`` (``--data.x=y`` style, as on the command line); the learning phase from env step
    ``window_start`` to ``data["total_env_steps"]`` is timed. The run folder is deleted afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="lit_td3_bench_") as tmp:  # event files, config.yaml: not kept
        return _fit_lit_td3(Path(tmp), device, data, model, window_start, extra_args)


def _fit_lit_td3(workdir: Path, device: str, data: dict[str, Any], model: dict[str, Any] | None, window_start: int,
                 extra_args: Sequence[str]) -> LitRun:
    from lit_td3.cli import TD3CLI

    overlay = {
        "trainer": {
            "default_root_dir": str(workdir / "run"), "accelerator": accelerator_of(device), "devices": 1,
            "enable_progress_bar": False, "enable_checkpointing": False, "enable_model_summary": False,
            "callbacks": timed_callbacks(),
        },
        "model": dict(model or {}),
        "data": {"eval_episodes": 0, **data},
    }
    overlay_path = workdir / "overlay.yaml"
    overlay_path.write_text(yaml.safe_dump(overlay))
    window = LearningWindow(window_start, data["total_env_steps"], device)
    with quiet():
        cli = TD3CLI(args=["--config", str(BASE_CONFIG), "--config", str(overlay_path), *extra_args], run=False)
        cli.trainer.callbacks.append(window)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return LitRun(window, cli.model, cli.datamodule.buffer, int(cli.model.hparams.policy_freq))


def collect() -> None:
    """Frees what a finished round left (call after dropping its references), so rounds do not share memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lit_hyperparameters() -> dict[str, Any]:
    """The TD3 hyperparameters of configs/td3.yaml that the Stable-Baselines3 side must share."""
    config = base_config()
    model, data = config["model"], config["data"]
    return {
        "gamma": model["gamma"], "tau": model["tau"], "policy_delay": model["policy_freq"],
        "target_policy_noise": model["policy_noise"], "target_noise_clip": model["noise_clip"],
        "batch_size": data["batch_size"], "exploration_noise": data["exploration_noise"],
        "learning_rate": model["critic_mlp_lr"], "network": copy.deepcopy(model["network"]),
        "max_episode_steps": data["max_episode_steps"], "frame_stack": data["frame_stack"],
        "image_size": data["image_size"],
    }


def random_batches(shapes: dict[str, list[int]], action_dim: int, batch_size: int, device: str, pool: int = 4,
                   seed: int = 0) -> list[Transition]:
    """A small pool of random batches already on ``device`` (timings do not depend on the pixel values)."""
    g = torch.Generator().manual_seed(seed)

    def obs() -> dict[str, torch.Tensor]:
        out = {}
        if "image" in shapes:
            out["image"] = torch.randint(0, 256, (batch_size, *shapes["image"]), generator=g, dtype=torch.uint8)
        if "vector" in shapes:
            out["vector"] = torch.randn(batch_size, *shapes["vector"], generator=g)
        return out

    batches = [Transition(obs=obs(), action=torch.rand(batch_size, action_dim, generator=g) * 2 - 1,
                          reward=torch.randn(batch_size, generator=g), next_obs=obs(),
                          terminated=(torch.rand(batch_size, generator=g) < 0.01).float()) for _ in range(pool)]
    return [to_device(b, torch.device(device)) for b in batches]


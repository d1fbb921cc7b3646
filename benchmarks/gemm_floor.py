"""How fast an update could be on this machine: each learner's matrix products alone against its whole update.

GitHub issue "Performance", section 4 (the CPU state path's 1.5x over Stable-Baselines3). Both learners spend an
update in matrix products of the same networks, and no code can run an update faster than its matrix products run
on the machine's BLAS. The script

1. records the matrix products one TD3 update issues (``aten.mm``, ``addmm``, ``bmm``, ``convolution`` and
   ``convolution_backward``, forward and backward, over ``policy_freq`` batches so that one actor step is in), with
   their shapes and strides: lit_td3's from ``TD3Module.training_step`` inside a real ``Trainer.fit`` (as trained),
   the plain PyTorch loop's of ``update_time.py`` (lit_td3's networks, losses and optimizers without Lightning,
   clipping or telemetry), SB3's from ``TD3.train(gradient_steps=1)`` on a filled buffer;
2. replays only those products, back to back, on tensors of the recorded shapes and strides: the learner's
   *floor*, ms per update (critic step + 1/policy_freq actor step), and counts their FLOPs with
   ``torch.utils.flop_counter.FlopCounterMode``;
3. times each learner's whole update, taking turns with the floors for ``--repeats`` rounds (drift hits all alike).

SB3's measured update over lit_td3's floor is the most an update of lit_td3 could gain on SB3's here, whatever the
implementation (short of changing the arithmetic: precision, networks, batch). For env-steps/s at one update per env
step the bound is lower still, since an env step and a policy step come on top. A large square product gives the
machine's BLAS rate for reference.

    python benchmarks/gemm_floor.py                       # CPU, state path (Pendulum-v1, 400-300 MLPs)
    python benchmarks/gemm_floor.py --paths state,pixel --repeats 3

The script reports; it asserts no target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytorch_lightning as pl
import torch
from common import (
    Summary,
    check_device,
    collect,
    lit_hyperparameters,
    log,
    machine_line,
    markdown_table,
    quiet,
    random_batches,
    require_at_least,
    run_line,
    script_parser,
    time_updates,
    timed_callback_instances,
    timed_ms,
)
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from update_time import PATHS, PlainLoop, build, lightning_round, plain_round

from lit_td3.buffer import Transition

aten = torch.ops.aten
MATRIX_PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution.default,
                   aten.convolution_backward.default}


@dataclass(frozen=True)
class Spec:
    """A recorded tensor argument: enough to allocate one of the same layout."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class ProductRecorder(TorchDispatchMode):
    """Records each matrix product's op and arguments (tensors as ``Spec``) while active; runs every op unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in MATRIX_PRODUCTS:
            self.calls.append((func, _specs(args), _specs(kwargs)))
        return func(*args, **kwargs)


def _specs(value: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: Spec(tuple(t.shape), tuple(t.stride()), t.dtype), value)


def _tensors(value: Any, device: str) -> Any:
    return pytree.tree_map_only(
        Spec, lambda s: torch.empty_strided(s.shape, s.stride, dtype=s.dtype, device=device).normal_(), value)


class Floor:
    """A learner's recorded matrix products, ready to replay on tensors allocated once."""

    def __init__(self, calls: Sequence[tuple[Any, tuple[Any, ...], dict[str, Any]]], policy_freq: int,
                 device: str) -> None:
        if not calls:
            raise RuntimeError("no matrix products were recorded: did the update run inside the recorder?")
        self.calls = [(func, _tensors(args, device), _tensors(kwargs, device)) for func, args, kwargs in calls]
        self.policy_freq, self.device = policy_freq, device

    def run(self) -> None:
        for func, args, kwargs in self.calls:
            func(*args, **kwargs)

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.run()
        return counter.get_total_flops()

    def time(self, iterations: int) -> list[float]:
        """Milliseconds per update, one value per replay of the recorded ``policy_freq`` batches (after one untimed
        replay: BLAS workspaces, oneDNN primitives)."""
        return [ms / self.policy_freq for ms in timed_ms(self.run, self.device, iterations)]


class RecordBatches(pl.Callback):
    """Keeps a ``ProductRecorder`` active over training batches ``[start, start + count)``."""

    def __init__(self, start: int, count: int) -> None:
        self.start, self.count = start, count
        self.recorder = ProductRecorder()

    def _recording(self, batch_idx: int) -> bool:
        return self.start <= batch_idx < self.start + self.count

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._recording(batch_idx):
            self.recorder.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._recording(batch_idx):
            self.recorder.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------------- learners
class Learner:
    """One side of the comparison: how to time its whole update, and its recorded floor."""

    def __init__(self, name: str, update_ms: Callable[[], list[float]], floor: Floor) -> None:
        self.name, self.update_ms, self.floor = name, update_ms, floor
        self.measured: list[float] = []
        self.floor_ms: list[float] = []


def _batches(path: str, device: str) -> list[Transition]:
    shapes, action_dim = PATHS[path]
    return random_batches(shapes, action_dim, lit_hyperparameters()["batch_size"], device)


def lit_learner(path: str, device: str, iterations: int) -> Learner:
    """lit_td3 as trained (``update_time.py``'s "trained" variant): recorded in one fit, timed in fresh fits."""
    batches = _batches(path, device)
    module = build("trained", path)
    policy_freq = int(module.hparams.policy_freq)
    warmup = 2 * policy_freq
    recording = RecordBatches(start=warmup, count=policy_freq)
    time_updates(module, lambda i: batches[i % len(batches)], device=device, iterations=policy_freq, warmup=warmup,
                 callbacks=[*timed_callback_instances(), recording])
    floor = Floor(recording.recorder.calls, policy_freq, device)

    def update_ms() -> list[float]:
        return lightning_round(build("trained", path), "trained", batches, device, iterations, 2, "32-true")

    return Learner("lit_td3 (as trained)", update_ms, floor)


def plain_learner(path: str, device: str, iterations: int) -> Learner:
    """``update_time.py``'s reference: lit_td3's networks, losses and optimizers in a plain PyTorch loop, without
    Lightning, clipping or telemetry (what eager PyTorch of these networks does on its own)."""
    batches = _batches(path, device)
    loop = PlainLoop(build("trained", path), device)
    policy_freq = int(loop.m.hparams.policy_freq)
    for i in range(2 * policy_freq):
        loop.step(batches[i % len(batches)])
    recorder = ProductRecorder()
    with recorder:
        for i in range(policy_freq):  # a whole group after whole groups: one actor step in it
            loop.step(batches[i % len(batches)])
    floor = Floor(recorder.calls, policy_freq, device)
    return Learner("plain PyTorch loop", lambda: plain_round(loop, batches, device, iterations, 2), floor)


def sb3_learner(path: str, device: str, iterations: int) -> Learner:
    """Stable-Baselines3's TD3 with the same networks and hyperparameters (``compare_sb3.py``), on a buffer filled by
    ``learning_starts`` random steps."""
    from compare_sb3 import (  # needs the bench extra; the floors do not
        BUDGETS,
        sb3_model,
        time_sb3_updates,
    )

    budget = BUDGETS[(path, True)]
    model = sb3_model(path, "lit_td3/CarRacing-v3", budget, device, seed=0)
    with quiet():
        model.learn(total_timesteps=budget.learning_starts + 2 * model.policy_delay)
    recorder = ProductRecorder()
    with recorder:
        for _ in range(model.policy_delay):  # SB3's own count decides which call holds the actor step
            model.train(gradient_steps=1, batch_size=model.batch_size)
    floor = Floor(recorder.calls, model.policy_delay, device)
    timing = replace(budget, update_groups=iterations, update_warmup=2)
    return Learner("Stable-Baselines3", lambda: time_sb3_updates(model, timing, device), floor)


def blas_gflops(device: str, size: int = 2048, repeats: int = 5) -> float:
    """The machine's rate on a large square float32 product, GFLOP/s (median of ``repeats``)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size**3 / statistics.median(timed_ms(lambda: a @ b, device, repeats)) / 1e6


# ---------------------------------------------------------------------------------------------------- report
def report(path: str, learners: list[Learner], blas: float) -> str:
    rows = []
    for learner in learners:
        floor, measured = Summary.of(learner.floor_ms), Summary.of(learner.measured)
        gflop = learner.floor.flops() / learner.floor.policy_freq / 1e9
        rows.append([learner.name, len(learner.floor.calls) / learner.floor.policy_freq, f"{gflop:.3f}",
                     floor.text(2), f"{gflop / floor.median * 1e3:.1f}", measured.text(2),
                     f"{floor.median / measured.median:.0%}"])
    lit, plain, sb3 = learners
    sb3_ms = statistics.median(sb3.measured)
    now, eager = sb3_ms / statistics.median(lit.measured), sb3_ms / statistics.median(plain.measured)
    bound = sb3_ms / statistics.median(lit.floor_ms)
    table = markdown_table(["learner", "matrix products per update", "GFLOP per update", "floor ms (products alone)",
                            "floor GFLOP/s", "measured update ms", "floor / measured"], rows)
    return (f"### {path} path\n\n{table}\n\nSB3's measured update over lit_td3's: **{now:.2f}×**; over the plain "
            f"loop's: **{eager:.2f}×** (eager PyTorch of the same networks without Lightning, clipping or telemetry); "
            f"over lit_td3's floor: **{bound:.2f}×**, the most any lit_td3 update could gain on SB3's on this machine "
            f"with the same arithmetic. The machine's rate on a 2048² float32 product: {blas:.1f} GFLOP/s "
            f"({torch.get_num_threads()} threads).\n")


def parse_args() -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--paths", default="state", help="comma-separated subset of state,pixel (default state)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each times every learner and floor once")
    parser.add_argument("--iterations", type=int, default=20, help="timed updates per learner and round")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in args.paths if p not in PATHS]
    if bad or not args.paths:
        parser.error(f"--paths {','.join(args.paths)}: expected a comma-separated subset of state,pixel")
    require_at_least(parser, args, ("repeats", "iterations", "threads"), 1)
    return args


def main() -> None:
    args = parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sections = []
    for path in args.paths:
        log(f"[gemm_floor] {path}: recording")
        learners = [make(path, args.device, args.iterations) for make in (lit_learner, plain_learner, sb3_learner)]
        for r in range(args.repeats):
            log(f"[gemm_floor] {path} round {r + 1}/{args.repeats}")
            for learner in learners if r % 2 == 0 else learners[::-1]:
                learner.measured += learner.update_ms()
                learner.floor_ms += learner.floor.time(args.iterations)
        sections.append(report(path, learners, blas_gflops(args.device)))
        del learners
        collect()
    print(f"## Matrix-product floor of one TD3 update ({args.device})\n")
    print("\n".join(sections))
    print(f"Command: python benchmarks/gemm_floor.py {' '.join(sys.argv[1:])}. {run_line(started)}")
    print(machine_line(args.device))


if __name__ == "__main__":
    main()

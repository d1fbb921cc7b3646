"""Replay-buffer benchmark: time to sample a batch, and resident memory per stored transition.

Prints a Markdown table for BENCHMARKS.md. Targets (GitHub issue "Performance", section 1): a batch of 256 (obs and
next_obs stacks of 4x84x84) in <= 3 ms on one CPU core; 1,000,000 such transitions in <= 7.5 GB resident.

    python benchmarks/buffer.py            # 100,000 transitions
    python benchmarks/buffer.py --quick    # 20,000 transitions, fewer repeats
    python benchmarks/buffer.py --transitions 1000000
    python benchmarks/buffer.py --transitions 1000000 --memory-only   # the memory tables alone

Memory is measured in a fresh interpreter that only fills a buffer, so the number is the buffer's own; where CUDA is
available, a second fresh interpreter fills a CUDA buffer and reports the GPU memory it holds beside the process's
RSS. This script never asserts: it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import psutil
import torch

from lit_td3.buffer import ReplayBuffer

STACK, SIZE, ACTION_DIM, VECTOR_DIM, NUM_ENVS = 4, 84, 3, 8, 8
GB = 1e9


def shapes(with_vector: bool) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"image": (STACK, SIZE, SIZE)}
    if with_vector:
        out["vector"] = (VECTOR_DIM,)
    return out


class Rollout:
    """NUM_ENVS envs with frame-stacked episodes of 50-999 steps, ending terminated or truncated."""

    def __init__(self, with_vector: bool, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(0, 256, (512, SIZE, SIZE), dtype=np.uint8)  # incompressible, cheap to draw
        self.with_vector = with_vector
        self.obs = np.repeat(self.frames(NUM_ENVS), STACK, axis=1)  # as FrameStackObservation(padding_type="reset")
        self.vector = self.rng.normal(size=(NUM_ENVS, VECTOR_DIM)).astype(np.float32)
        self.left = self.rng.integers(50, 1000, NUM_ENVS)
        self.action = np.zeros((NUM_ENVS, ACTION_DIM), np.float32)
        self.reward = np.zeros(NUM_ENVS, np.float32)

    def frames(self, n: int) -> np.ndarray:
        return self.pool[self.rng.integers(0, len(self.pool), n)][:, None]

    def run(self, buffer: ReplayBuffer, transitions: int) -> float:
        """Adds ``transitions`` to the buffer; returns the mean seconds per add() call."""
        spent, calls = 0.0, transitions // NUM_ENVS
        for _ in range(calls):
            next_obs = np.concatenate([self.obs[:, 1:], self.frames(NUM_ENVS)], axis=1)
            next_vector = self.rng.normal(size=(NUM_ENVS, VECTOR_DIM)).astype(np.float32)
            self.left -= 1
            done = self.left == 0
            o, n = {"image": self.obs}, {"image": next_obs}
            if self.with_vector:
                o["vector"], n["vector"] = self.vector, next_vector
            terminated = done & (self.rng.random(NUM_ENVS) < 0.5)
            start = time.perf_counter()
            buffer.add(o, self.action, self.reward, n, terminated, done & ~terminated)
            spent += time.perf_counter() - start
            self.obs, self.vector = next_obs, next_vector
            if done.any():
                self.obs[done] = np.repeat(self.frames(int(done.sum())), STACK, axis=1)
                self.left[done] = self.rng.integers(50, 1000, int(done.sum()))
        return spent / max(calls, 1)


def time_sampling(buffer: ReplayBuffer, batch_size: int, repeats: int) -> list[float]:
    for _ in range(10):  # warm-up: allocator and caches
        buffer.sample(batch_size)
    synchronize = torch.cuda.synchronize if buffer.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        buffer.sample(batch_size)
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_rss(transitions: int, device: str) -> dict[str, Any]:
    """Fills an image-only buffer in this (fresh) process and reports its resident memory, also at half fill; for a
    CUDA buffer also the GPU memory torch has allocated (the CUDA context is started first, so that "before" holds
    it and the growth is the buffer's)."""
    process = psutil.Process()
    rollout = Rollout(with_vector=False)
    if device == "cuda":
        torch.empty(1, device=device)
    before = process.memory_info().rss
    buffer = ReplayBuffer(transitions, shapes(False), ACTION_DIM, num_envs=NUM_ENVS, device=device, seed=0)
    empty = process.memory_info().rss
    rollout.run(buffer, transitions // 2)
    half, half_len = process.memory_info().rss, len(buffer)
    rollout.run(buffer, transitions - half_len)
    gpu = torch.cuda.memory_allocated() if device == "cuda" else 0
    return {"before": before, "empty": empty, "half": half, "half_len": half_len, "full": process.memory_info().rss,
            "len": len(buffer), "gpu": gpu, "nbytes": buffer.nbytes, "cuda_build": torch.version.cuda is not None}


def rss_in_subprocess(transitions: int, device: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, __file__, "--rss-only", str(transitions), "--memory-device", device],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def second_half_bytes(m: dict[str, Any]) -> float:
    """Host RSS growth per transition over the second half of the fill: fixed costs (the allocator's, a CUDA
    buffer's pinned staging) are all in place by the half, so this is what each further transition adds."""
    return (m["full"] - m["half"]) / (m["len"] - m["half_len"])


def print_cuda_memory(m: dict[str, Any]) -> None:
    """The CUDA buffer's table: its storage is allocated on the GPU when it is created, so the GPU figure is the full
    buffer's at any fill, and the host keeps only the per-frame bookkeeping and the pinned staging areas."""
    print("| memory (image-only CUDA buffer, fresh process) | value |")
    print("|---|---|")
    print(f"| RSS before creating the buffer (interpreter + torch + CUDA context) | {m['before'] / GB:.3f} GB |")
    print(f"| GPU memory allocated by the buffer ({m['len']:,} transitions) | {m['gpu'] / GB:.3f} GB "
          f"({m['gpu'] / m['len']:,.0f} B per transition) |")
    print(f"| RSS after {m['len']:,} transitions (host, whole process) | {m['full'] / GB:.3f} GB "
          f"(+{(m['full'] - m['before']) / 1e6:.0f} MB) |")
    host_marginal = second_half_bytes(m)
    print(f"| host bytes per transition: second half of the fill only | {host_marginal:,.1f} |")
    print(f"| 1,000,000 transitions, extrapolated: GPU memory / whole-process RSS | "
          f"{m['gpu'] / m['len'] * 1e6 / GB:.2f} GB / {(m['full'] + host_marginal * (1e6 - m['len'])) / GB:.2f} GB "
          f"(target <= 7.5 GB) |")
    print()


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    # Other processes on the same cores inflate the medians and maxima: say how busy the machine was.
    load = f"; load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return (f"Machine: {cpu} ({os.cpu_count()} cores, {psutil.virtual_memory().total / GB:.0f} GB RAM){gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}{load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transitions", type=int, default=100_000, help="transitions stored before measuring")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=300, help="timed sample() calls per row")
    parser.add_argument("--quick", action="store_true", help="20,000 transitions and 100 repeats")
    parser.add_argument("--memory-only", action="store_true", help="the memory tables alone, no sampling rows")
    # The memory subprocess's job (also run by tests/test_buffer_memory.py): fill N transitions, print the JSON.
    parser.add_argument("--rss-only", type=int, metavar="N", help=argparse.SUPPRESS)
    parser.add_argument("--memory-device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_only:
        print(json.dumps(measure_rss(args.rss_only, args.memory_device)))
        return
    if args.quick:
        args.transitions, args.repeats = 20_000, 100

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    memory = {device: rss_in_subprocess(args.transitions, device) for device in devices}
    rss = memory["cpu"]
    torch.set_num_threads(1)
    rows = []
    for device in devices if not args.memory_only else []:
        for with_vector in (False, True):
            buffer = ReplayBuffer(args.transitions, shapes(with_vector), ACTION_DIM, num_envs=NUM_ENVS,
                                  device=device, seed=0)
            add_seconds = Rollout(with_vector).run(buffer, args.transitions)
            times = time_sampling(buffer, args.batch_size, args.repeats)
            kind = f"image {STACK}x{SIZE}x{SIZE}" + (f" + vector {VECTOR_DIM}" if with_vector else "")
            where = "CPU, 1 thread" if device == "cpu" else "CUDA"
            rows.append(f"| sample({args.batch_size}), {kind}, {where} | {statistics.median(times):.2f} | "
                        f"{min(times):.2f} | {max(times):.2f} | add() of {NUM_ENVS} envs: "
                        f"{add_seconds * 1e3:.3f} ms |")
            del buffer

    per_transition = (rss["full"] - rss["before"]) / rss["len"]
    marginal = second_half_bytes(rss)
    if rows:
        print(f"### Replay buffer ({args.transitions:,} transitions stored, {args.repeats} timed batches)\n")
        print("| what | median ms | min ms | max ms | notes |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))
        print()
    print("| memory (image-only, fresh process) | value |")
    print("|---|---|")
    print(f"| RSS before creating the buffer (interpreter + torch) | {rss['before'] / GB:.3f} GB |")
    print(f"| RSS growth on creating it (empty, lazily allocated) | {(rss['empty'] - rss['before']) / 1e6:.1f} MB |")
    print(f"| RSS after {rss['len']:,} transitions | {rss['full'] / GB:.3f} GB |")
    print(f"| bytes per transition: RSS growth / transitions | {per_transition:,.0f} (one 84x84 frame: 7,056) |")
    print(f"| bytes per transition: second half of the fill only | {marginal:,.0f} |")
    print(f"| 1,000,000 transitions, extrapolated (buffer only) | {marginal * 1e6 / GB:.2f} GB |")
    print(f"| 1,000,000 transitions, extrapolated (whole process) | "
          f"{(rss['empty'] + marginal * 1e6) / GB:.2f} GB (target <= 7.5 GB) |")
    print(f"| ReplayBuffer.estimate_nbytes(1,000,000) (used for the RAM warning) | "
          f"{ReplayBuffer.estimate_nbytes(1_000_000, shapes(False), ACTION_DIM, NUM_ENVS) / GB:.2f} GB |")
    print()
    if "cuda" in memory:
        print_cuda_memory(memory["cuda"])
    print(machine_line())


if __name__ == "__main__":
    main()

"""Which GPU kernels clipping + telemetry add to a TD3 update, counted with the PyTorch profiler (CUDA only).

Profiles ``--updates`` updates (batches: a critic step each, an actor step every policy_freq; after a warm-up) of
each variant of ``update_time.py`` inside a real ``Trainer.fit``, and prints kernels per update and their GPU time,
then the kernels the as-trained variant runs that the bare one does not (by name; what clipping, telemetry, the guard
and the alerts cost on the device). Replayed CUDA graphs report their kernels one by one. cuBLAS's and cuDNN's
memsets are counted under one name ("memset"): the profiler labels the same memset differently from run to run.

    python benchmarks/kernels.py --variants graphs,graphs_bare --updates 20
    python benchmarks/kernels.py --variants trained,ddp,ddp_copies --updates 20     # what DDP adds, one process

The script reports; it asserts no target.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
from common import (
    base_config,
    check_device,
    log,
    machine_line,
    markdown_table,
    random_batches,
    run_line,
    time_updates,
)
from torch.profiler import ProfilerActivity, profile
from update_time import PATHS, VARIANTS, build, strategy_of, timed_callback_instances


class ProfileBatches(pl.Callback):
    """Profiles batches ``[first, first + count)``, synchronized at both ends."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first:
            torch.cuda.synchronize()
            self.profiler.start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first + self.count - 1:
            torch.cuda.synchronize()
            self.profiler.stop()


def census(variant: str, path: str, updates: int, warmup: int, trace: str | None) -> dict[str, tuple[float, float]]:
    """Kernel name -> (launches per update, GPU microseconds per update)."""
    torch.manual_seed(0)
    module = build(variant, path)
    shapes, action_dim = PATHS[path]
    batches = random_batches(shapes, action_dim, base_config()["data"]["batch_size"], "cuda")
    probe = ProfileBatches(warmup, updates)
    callbacks = ([] if variant.endswith("bare") else timed_callback_instances()) + [probe]
    time_updates(module, lambda i: batches[i % len(batches)], device="cuda", iterations=updates, warmup=warmup,
                 callbacks=callbacks, strategy=strategy_of(variant))
    if trace:
        probe.profiler.export_chrome_trace(f"{trace}/{path}_{variant}.json")
    kernels: dict[str, list[float]] = collections.defaultdict(list)
    for event in probe.profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            kernels["memset" if event.name.lower().startswith("memset") else event.name].append(event.device_time)
    return {name: (len(times) / updates, sum(times) / updates) for name, times in kernels.items()}


def short(name: str) -> str:
    """A kernel's name without the namespaces that all of PyTorch's share, cut to a table cell."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "std::"):
        name = name.replace(noise, "")
    return name if len(name) <= 110 else name[:107] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", default="pixel", help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--variants", default="graphs,graphs_bare", help="two or more of update_time.py's variants; "
                        "the first is compared with each bare one")
    parser.add_argument("--updates", type=int, default=20, help="updates profiled per variant (a multiple of "
                        "policy_freq, so that they hold whole actor steps)")
    parser.add_argument("--warmup", type=int, default=10, help="updates before the profiled ones")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--trace", help="a folder to write each variant's Chrome trace to (chrome://tracing)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS or v.startswith("plain")]
    if unknown or len(variants) < 2:
        parser.error(f"--variants {args.variants}: expected two or more update_time.py variants other than the "
                     "plain ones")
    policy_freq = base_config()["model"]["policy_freq"]
    if args.updates < 1 or args.updates % policy_freq or args.warmup < 1:
        parser.error(f"--updates {args.updates} --warmup {args.warmup}: expected positive counts, --updates a "
                     f"multiple of policy_freq={policy_freq}")
    check_device("cuda")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    started = time.perf_counter()
    print(f"## GPU kernels per TD3 update (cudnn.benchmark {args.cudnn_benchmark})\n")
    for path in [p.strip() for p in args.paths.split(",")]:
        found = {}
        for variant in variants:
            log(f"[kernels] {path}: {variant}")
            found[variant] = census(variant, path, args.updates, args.warmup, args.trace)
        rows = [[VARIANTS[v], f"{sum(n for n, _ in k.values()):.1f}", f"{sum(t for _, t in k.values()):.1f}"]
                for v, k in found.items()]
        print(f"### {path}\n")
        print(markdown_table(["variant", "kernels per update", "GPU µs per update (sum of kernel times)"], rows))
        trained = found[variants[0]]
        for bare_name in [v for v in variants[1:] if v.endswith("bare")]:
            bare = found[bare_name]
            extra = []
            for name, (count, micros) in trained.items():
                base_count, base_micros = bare.get(name, (0.0, 0.0))
                if count - base_count > 0.01 or micros - base_micros > 0.5:
                    extra.append([short(name), f"{count - base_count:+.1f}", f"{micros - base_micros:+.1f}"])
            extra.sort(key=lambda row: -float(row[2]))
            print(f"\nKernels of `{variants[0]}` beyond `{bare_name}` (per update):\n")
            print(markdown_table(["kernel", "launches", "GPU µs"], extra))
        print()
    print(f"Command: python benchmarks/kernels.py {' '.join(sys.argv[1:])}. {run_line(started)}")
    print(machine_line("cuda"))


if __name__ == "__main__":
    main()

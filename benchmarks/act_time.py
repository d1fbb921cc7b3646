"""Time of ``TD3Module.act``: the policy step that the env step of a rollout waits for (GitHub issue "Performance", 2).

Each env step starts with mu(s) for the envs' newest observations: host arrays to the device, the actor's forward
pass, the actions back to the host. Nothing overlaps it, so with one env it adds to every env step. Timed for the
pixel networks of configs/td3.yaml at the batch sizes of evaluation (1) and of ``data.num_envs`` envs, eagerly and
with ``model.cuda_graphs`` (one CUDA graph per batch size).

    python benchmarks/act_time.py --device cuda
    python benchmarks/act_time.py --quick              # CPU, eager only

The script reports; it asserts no target.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from common import Summary, check_device, machine_line, markdown_table, run_line
from update_time import module_kwargs

from lit_td3.module import TD3Module


def time_act(module: TD3Module, batch_size: int, iterations: int, warmup: int) -> list[float]:
    """Milliseconds per ``act`` call on random observations (fresh ones each call, as from an env)."""
    rng = np.random.default_rng(0)
    shapes = module.hparams.observation_shapes
    pool = [{"image": rng.integers(0, 256, (batch_size, *shapes["image"]), dtype=np.uint8)} for _ in range(8)]
    for i in range(warmup):
        module.act(pool[i % len(pool)])
    times = []
    for i in range(iterations):
        start = time.perf_counter()
        module.act(pool[i % len(pool)])  # ends with the actions on the host: synchronized by construction
        times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated numbers of envs")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; eager and graphed take turns in each")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 50 calls, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.repeats = 50, 2
    check_device(args.device)
    started = time.perf_counter()
    variants = {"eager": False} | ({"cuda_graphs": True} if args.device == "cuda" else {})
    modules = {name: TD3Module(**{**module_kwargs("pixel"), "cuda_graphs": graphs}).to(args.device)
               for name, graphs in variants.items()}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    times: dict[tuple[str, int], list[float]] = {}
    for round_ in range(args.repeats):
        for name in (list(variants) if round_ % 2 == 0 else list(reversed(variants))):
            for batch_size in batch_sizes:
                times.setdefault((name, batch_size), []).extend(
                    time_act(modules[name], batch_size, args.iterations, warmup=20 if round_ == 0 else 5))
    rows = []
    for batch_size in batch_sizes:
        eager = Summary.of(times[("eager", batch_size)])
        row = [batch_size, eager.text(3)]
        if "cuda_graphs" in variants:
            graphed = Summary.of(times[("cuda_graphs", batch_size)])
            row += [graphed.text(3), f"{eager.median / graphed.median:.1f}×"]
        rows.append(row)
    headers = ["envs (batch)", "eager, ms"] + (["cuda_graphs, ms", "speed-up"] if "cuda_graphs" in variants else [])
    print(f"## TD3Module.act, pixel networks ({args.device})\n")
    print(markdown_table(headers, rows))
    print(f"\nMedian (min–max) of {args.repeats} rounds of {args.iterations} calls; a call takes uint8 observations "
          "on the host and returns actions on the host.")
    print(f"\nCommand: python benchmarks/act_time.py {' '.join(sys.argv[1:])}. {run_line(started)}")
    print(machine_line(args.device))


if __name__ == "__main__":
    main()

"""Env-steps/s of one GPU against several, through the real CLI and TD3DDPStrategy (GitHub issue "Scale-out").

Each configuration trains configs/td3.yaml's env (lit_td3/CarRacing-v3, pixels) from scratch for
``--total-env-steps`` global env steps with ``--num-envs`` async envs per rank; the figure is the median of the
``perf/env_steps_per_s`` points the run logged during its learning phase (global env steps over wall time between
log points, all ranks together).
Runs alternate between the device counts for ``--repeats`` rounds. The stage table below the rates holds the
``perf/*`` stage times of the same log points (each point the mean over ranks), so a device count that scales badly
shows which stage grew.

A count written ``DxK`` starts K independent runs of D devices each at once, each on its own GPUs
(``CUDA_VISIBLE_DEVICES``), and reports the sum of their rates: ``1x2`` is two one-GPU runs side by side on one
host, the ceiling for 2-GPU DDP there once the host's shared cores, memory and clocks are counted, with no gradient
exchanged.

    python benchmarks/ddp_scaling.py --devices 1,2           # on a machine with 2 GPUs
    python benchmarks/ddp_scaling.py --devices 1,2,1x2       # and two one-GPU runs at once
    python benchmarks/ddp_scaling.py --devices 1,2 --accelerator cpu --total-env-steps 1200 --learning-starts 600 \
        --log-every 50 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import STAGES, machine_line, stage_section

from lit_td3.report import load_run


def fit_arguments(parser: argparse.ArgumentParser, total_env_steps: int) -> None:
    """The options of one training run (``command``)."""
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--num-envs", type=int, default=4, help="async envs per rank")
    parser.add_argument("--replay-ratio", type=float, default=0.25, help="updates per env step")
    parser.add_argument("--total-env-steps", type=int, default=total_env_steps, help="global env steps per run")
    parser.add_argument("--learning-starts", type=int, default=2_000)
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument("--lit-arg", action="append", default=[], metavar="ARG", help="extra CLI argument for lit_td3")


def command(devices: int, args: argparse.Namespace, root: Path) -> list[str]:
    """The CLI call of one training run on ``devices`` devices."""
    call = [
        sys.executable, "-m", "lit_td3", "fit", "--config", "configs/td3.yaml",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", args.accelerator, "--trainer.devices", str(devices),
        "--trainer.callbacks", "[]",
        "--data.total_env_steps", str(args.total_env_steps), "--data.learning_starts", str(args.learning_starts),
        "--data.num_envs", str(args.num_envs), "--data.replay_ratio", str(args.replay_ratio),
        "--data.buffer_size", str(args.total_env_steps), "--data.max_episode_steps", "1000",
        "--model.log_every_n_env_steps", str(args.log_every), *args.lit_arg,
    ]
    return call + (["--trainer.strategy", "ddp"] if devices > 1 else [])


def run(kind: str, args: argparse.Namespace, root: Path) -> tuple[float, dict[str, list[float]]]:
    """One entry of ``--devices`` (``D`` or ``DxK``): the sum over its K concurrent runs of each run's median
    learning-phase env-steps/s, and the stage times of all their learning-phase log points."""
    devices, _, copies = kind.partition("x")
    devices, copies = int(devices), int(copies or 1)
    runs = []
    for copy in range(copies):
        env = {**os.environ, "SDL_VIDEODRIVER": "dummy"}
        if copies > 1 and args.accelerator == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(copy * devices + d) for d in range(devices))
        runs.append((root / str(copy), subprocess.Popen(command(devices, args, root / str(copy)), cwd=REPO, env=env,
                                                        stdout=subprocess.DEVNULL)))
    for _, process in runs:
        if process.wait():
            raise subprocess.CalledProcessError(process.returncode, process.args)
    rate, stages, start = 0.0, {}, args.learning_starts + 2 * args.log_every
    for run_root, _ in runs:
        scalars = load_run(run_root)
        rate += statistics.median(learning_phase(scalars, "perf/env_steps_per_s", start))
        for stage in STAGES:
            if f"perf/{stage}" in scalars:
                stages.setdefault(stage, []).extend(learning_phase(scalars, f"perf/{stage}", start))
    return rate, stages


def learning_phase(scalars: Any, tag: str, start: int) -> list[float]:
    """The values of ``tag`` logged after env step ``start``."""
    return [float(v) for v in scalars[tag].values[scalars[tag].steps > start]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2",
                        help="comma-separated device counts, D or DxK (K runs of D devices at once); the first is "
                             "the baseline")
    parser.add_argument("--repeats", type=int, default=2)
    fit_arguments(parser, total_env_steps=12_000)
    args = parser.parse_args()
    counts = args.devices.split(",")
    rates: dict[str, list[float]] = {d: [] for d in counts}
    stages: dict[str, dict[str, list[float]]] = {d: {} for d in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for devices in counts if round_ % 2 == 0 else counts[::-1]:
                rate, run_stages = run(devices, args, Path(tmp) / f"d{devices}_r{round_}")
                rates[devices].append(rate)
                for stage, values in run_stages.items():
                    stages[devices].setdefault(stage, []).extend(values)
    base = statistics.median(rates[counts[0]])
    print(machine_line("cuda" if args.accelerator == "gpu" else "cpu"))
    extra = f" with {' '.join(args.lit_arg)}" if args.lit_arg else ""
    print(f"\nconfigs/td3.yaml's env (lit_td3/CarRacing-v3, pixels){extra}, {args.num_envs} async envs per rank, "
          f"replay ratio {args.replay_ratio}, {args.total_env_steps} global env steps per run, {args.repeats} runs "
          "each, alternating\n")
    print("| devices | env-steps/s median | min–max | ratio to first |\n| --- | --- | --- | --- |")
    for devices in counts:
        median = statistics.median(rates[devices])
        print(f"| {devices} | {median:.1f} | {min(rates[devices]):.1f}–{max(rates[devices]):.1f} | "
              f"{median / base:.2f}× |")
    print("\n" + stage_section(stages, "devices"))


if __name__ == "__main__":
    main()

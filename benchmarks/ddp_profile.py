"""Where a rank's host time goes, batch by batch, on one GPU against several: py-spy profiles of real fits.

Each device count trains as ``ddp_scaling.py`` does (the same CLI call), under ``py-spy record --idle --subprocesses``,
which samples every process of the run, idle time included (a rank waiting for its GPU, its envs or the other rank).
The main thread of each rank is then split into the stages of one batch, and each stage's samples are turned into
milliseconds per batch of that rank (a batch is one vector env step of the rank; ``--total-env-steps /
(--num-envs x ranks)`` of them per rank, warm-up included, which is the same share of every run). A stage that grows
with the device count without DDP in it (the frame gather of the CPU buffer, Adam's kernel launches) shows the host
itself slowing down; the stages of DDP's own work show what the wrappers add.

    python benchmarks/ddp_profile.py --devices 1,2 --out profiles      # on a machine with 2 GPUs and py-spy
    python benchmarks/ddp_profile.py --devices 1,2 --out profiles --analyze-only   # the table again, from the files

The raw profiles stay in ``--out`` (``devices_<D>.raw``, py-spy's collapsed stacks; ``--analyze-only`` also reads
them gzipped, ``devices_<D>.raw.gz``, as ``benchmarks/results/2xh200_ddp_profile/`` keeps them).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table
from ddp_scaling import REPO, command, fit_arguments

RATE = 100
"""py-spy's samples per second, per thread: each sample stands for 10 ms."""

STAGES = (
    # (stage, the frames that mark it): the first stage with a marker in a sample's stack takes the sample
    ("the SIGTERM check under DDP (Lightning's per-batch broadcast, or lit_td3's vote after each env step)",
     ("_TrainingEpochLoop._broadcast_sigterm_tensor", "_SignalVote.__call__")),
    ("sampling from the buffer (numpy frame gather; the copy to the GPU, where it issues it)", ("ReplayBuffer.sample",)),
    ("batch to the GPU (Lightning's copy)", ("Strategy.batch_to_device",)),
    ("DDP forward (the wrappers' Python)", ("DistributedDataParallel.forward",)),
    ("backward (DDP's hooks and bucket copies run in it)", ("_engine_run_backward",)),
    ("loss all-reduce of the non-finite guard", ("sum_over_ranks",)),
    ("clipping and telemetry", ("TD3Module.on_before_optimizer_step",)),
    ("Adam's step", ("Adam.step",)),
    ("rest of the update (forward passes, losses)", ("TD3Module.training_step",)),
    ("rollout: env wait, policy step, buffer write", ("_DataFetcher.__next__",)),
    ("rest of Lightning's loop (hooks, logging)", ("_TrainingEpochLoop.run",)),
)
LOOP = "_TrainingEpochLoop.run"
"""The frame of a rank's training loop: samples without it (imports, env workers, other threads) are left out."""


def stacks(raw: Path) -> list[tuple[list[str], list[str], int]]:
    """py-spy's collapsed stacks: (process chain, frame names, samples) per line; ``raw`` may be gzipped."""
    text = gzip.decompress(raw.read_bytes()).decode() if raw.suffix == ".gz" else raw.read_text()
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        processes = [part for part in parts if part.startswith("process ")]
        frames = [part.split(" (")[0] for part in parts if not part.startswith("process ")]
        out.append((processes, frames, int(count)))
    return out


def rank_stages(raw: Path) -> dict[str, Counter[str]]:
    """Samples per stage of each rank's training loop, keyed by the rank's process (pid and command)."""
    ranks: dict[str, Counter[str]] = {}
    for processes, frames, count in stacks(raw):
        if LOOP not in frames:
            continue
        stage = next(name for name, markers in STAGES if any(marker in frames for marker in markers))
        ranks.setdefault(processes[-1], Counter())[stage] += count
    return ranks


def record(devices: int, args: argparse.Namespace, raw: Path, root: Path) -> None:
    """One fit under py-spy."""
    subprocess.run(["py-spy", "record", "--idle", "--nonblocking", "--subprocesses", "-r", str(RATE), "--format", "raw",
                    "-o", str(raw), "--", *command(devices, args, root)],
                   cwd=REPO, check=True, env={**os.environ, "SDL_VIDEODRIVER": "dummy"}, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2", help="comma-separated device counts")
    parser.add_argument("--out", type=Path, required=True, help="folder of the raw profiles")
    parser.add_argument("--analyze-only", action="store_true", help="read the raw profiles already in --out")
    fit_arguments(parser, total_env_steps=8_000)
    args = parser.parse_args()
    counts = [int(d) for d in args.devices.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    columns, per_batch = [], {}
    for devices in counts:
        raw = args.out / f"devices_{devices}.raw"
        if not args.analyze_only:
            record(devices, args, raw, args.out / f"run_{devices}")
        elif not raw.exists():
            raw = raw.with_suffix(".raw.gz")
        batches = args.total_env_steps / (args.num_envs * devices)
        for rank, (process, samples) in enumerate(sorted(rank_stages(raw).items(), key=lambda kv: _pid(kv[0]))):
            column = f"{devices} GPU{'s' if devices > 1 else ''}, rank {rank}"
            columns.append(column)
            per_batch[column] = {stage: samples[stage] * 1000 / RATE / batches for stage, _ in STAGES}
    rows = [[stage, *(f"{per_batch[c][stage]:.2f}" for c in columns)] for stage, _ in STAGES]
    rows.append(["**the training loop**", *(f"**{sum(per_batch[c].values()):.2f}**" for c in columns)])
    print(f"py-spy, {RATE} samples/s, idle included; ms per batch of the rank, averaged over all its batches (the "
          f"warm-up's, without updates, included), {args.num_envs} async envs per rank, replay ratio "
          f"{args.replay_ratio}, {args.total_env_steps} global env steps per run\n")
    print(markdown_table(["stage (the first that matches)", *columns], rows))


def _pid(process: str) -> int:
    return int(re.match(r"process (\d+)", process).group(1))


if __name__ == "__main__":
    main()

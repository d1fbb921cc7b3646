"""Resident memory of lit_td3.buffer.ReplayBuffer: 200,000 transitions of 4x84x84 frames stay near one frame each,
in host memory for a CPU buffer, in GPU memory for a CUDA one.

Runs in a fresh interpreter (a subprocess), so the RSS it measures is the buffer's and not the test session's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import needs_gpu

FRAME_BYTES = 84 * 84
TRANSITIONS = 200_000

MEASURE = Path(__file__).resolve().parents[1] / "benchmarks" / "buffer.py"
"""Its ``--rss-only N`` fills a buffer with N transitions of 8 envs' frame-stacked episodes (random frames, episodes
of 50-999 steps ending terminated or truncated) and prints the process's RSS before, empty and full as JSON: the
same fill as the memory rows of BENCHMARKS.md."""


def fill(device: str) -> dict[str, int]:
    result = subprocess.run([sys.executable, str(MEASURE), "--rss-only", str(TRANSITIONS), "--memory-device", device],
                            capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_200k_image_transitions_stay_within_one_frame_each_of_resident_memory() -> None:
    rss = fill("cpu")
    assert rss["len"] == TRANSITIONS
    assert rss["empty"] - rss["before"] < 32 * 2**20  # storage is touched only as it fills
    per_transition = (rss["full"] - rss["before"]) / rss["len"]
    # One frame per transition, plus a first frame per episode (~1/500), indices and spare slack: far from the
    # 2·4 frames of naive full stacks (56 KB).
    assert FRAME_BYTES <= per_transition <= FRAME_BYTES * 1.03, per_transition
    assert rss["full"] - rss["before"] <= rss["nbytes"]  # the estimate used for the RAM warning is an upper bound
    if not rss["cuda_build"]:  # a CUDA build of torch alone takes ~0.5 GB more before any buffer exists
        assert rss["full"] <= 1.6 * 2**30  # whole process, torch included (floor: 200k frames = 1.31 GiB)


@needs_gpu
def test_a_cuda_buffer_keeps_its_frames_in_gpu_memory_and_next_to_nothing_on_the_host() -> None:
    mem = fill("cuda")
    assert mem["len"] == TRANSITIONS
    # Allocated whole at creation: one frame per transition plus the spare frames of episode starts, within the
    # estimate that the memory check before training uses.
    assert FRAME_BYTES <= mem["gpu"] / TRANSITIONS <= FRAME_BYTES * 1.03, mem["gpu"] / TRANSITIONS
    assert mem["gpu"] <= mem["nbytes"]
    # The host keeps 8 bytes of bookkeeping per frame and two small pinned staging areas (16 B per transition at
    # 1M on an H200); a storage that fell back to the host would add a frame's 7 KB per transition.
    assert (mem["full"] - mem["before"]) / TRANSITIONS <= 256
    assert mem["full"] <= 1.6 * 2**30  # whole process: interpreter, CUDA torch and its context, the buffer's host part

"""Resident memory of lit_td3.buffer.ReplayBuffer: 200,000 transitions of 4x84x84 frames stay near one frame each,
in host memory for a CPU buffer, in GPU memory for a CUDA one.

Runs in a fresh interpreter (a subprocess), so the RSS it measures is the buffer's and not the test session's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import needs_gpu

FRAME_BYTES = 84 * 84
TRANSITIONS = 200_000

FILL = textwrap.dedent(f"""
    import json, sys
    import numpy as np, psutil, torch
    from lit_td3.buffer import ReplayBuffer

    device = sys.argv[1]
    if device == "cuda":
        torch.empty(1, device=device)  # the CUDA context first: "before" holds it, the growth is the buffer's
    process, num_envs, stack = psutil.Process(), 8, 4
    rng = np.random.default_rng(0)
    # A pool of random frames drawn from at random: incompressible pixels, cheap to generate.
    pool = rng.integers(0, 256, (512, 84, 84), dtype=np.uint8)
    def frames(n):
        return pool[rng.integers(0, len(pool), n)][:, None]
    before = process.memory_info().rss
    buffer = ReplayBuffer({TRANSITIONS}, {{"image": (stack, 84, 84)}}, 3, num_envs=num_envs, device=device, seed=0)
    empty = process.memory_info().rss
    obs = np.repeat(frames(num_envs), stack, axis=1)  # FrameStackObservation(padding_type="reset")
    left = rng.integers(50, 1000, num_envs)  # steps left in each env's episode
    action, reward = np.zeros((num_envs, 3), np.float32), np.zeros(num_envs, np.float32)
    for _ in range({TRANSITIONS} // num_envs):
        next_obs = np.concatenate([obs[:, 1:], frames(num_envs)], axis=1)
        left -= 1
        done = left == 0
        terminated, truncated = done & (rng.random(num_envs) < 0.5), done
        truncated &= ~terminated
        buffer.add({{"image": obs}}, action, reward, {{"image": next_obs}}, terminated, truncated)
        obs = next_obs
        if done.any():
            obs[done] = np.repeat(frames(int(done.sum())), stack, axis=1)
            left[done] = rng.integers(50, 1000, int(done.sum()))
    del obs, next_obs, pool
    print(json.dumps({{"before": before, "empty": empty, "full": process.memory_info().rss, "len": len(buffer),
                      "nbytes": buffer.nbytes, "cuda_build": torch.version.cuda is not None,
                      "gpu": torch.cuda.memory_allocated() if device == "cuda" else 0}}))
""")


def fill(device: str) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-c", FILL, device], capture_output=True, text=True, timeout=300,
                            check=True)
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

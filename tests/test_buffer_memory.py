"""Resident memory of lit_td3.buffer.ReplayBuffer: 200,000 transitions of 4x84x84 frames stay near one frame each.

Runs in a fresh interpreter (a subprocess), so the RSS it measures is the buffer's and not the test session's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

FRAME_BYTES = 84 * 84
TRANSITIONS = 200_000

FILL = textwrap.dedent(f"""
    import json
    import numpy as np, psutil, torch
    from lit_td3.buffer import ReplayBuffer

    process, num_envs, stack = psutil.Process(), 8, 4
    rng = np.random.default_rng(0)
    # A pool of random frames drawn from at random: incompressible pixels, cheap to generate.
    pool = rng.integers(0, 256, (512, 84, 84), dtype=np.uint8)
    def frames(n):
        return pool[rng.integers(0, len(pool), n)][:, None]
    before = process.memory_info().rss
    buffer = ReplayBuffer({TRANSITIONS}, {{"image": (stack, 84, 84)}}, 3, num_envs=num_envs, seed=0)
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
                      "nbytes": buffer.nbytes, "cuda_build": torch.version.cuda is not None}}))
""")


def test_200k_image_transitions_stay_within_one_frame_each_of_resident_memory() -> None:
    result = subprocess.run([sys.executable, "-c", FILL], capture_output=True, text=True, timeout=300, check=True)
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    assert rss["len"] == TRANSITIONS
    assert rss["empty"] - rss["before"] < 32 * 2**20  # storage is touched only as it fills
    per_transition = (rss["full"] - rss["before"]) / rss["len"]
    # One frame per transition, plus a first frame per episode (~1/500), indices and spare slack: far from the
    # 2·4 frames of naive full stacks (56 KB).
    assert FRAME_BYTES <= per_transition <= FRAME_BYTES * 1.03, per_transition
    assert rss["full"] - rss["before"] <= rss["nbytes"]  # the estimate used for the RAM warning is an upper bound
    if not rss["cuda_build"]:  # a CUDA build of torch alone takes ~0.5 GB more before any buffer exists
        assert rss["full"] <= 1.6 * 2**30  # whole process, torch included (floor: 200k frames = 1.31 GiB)

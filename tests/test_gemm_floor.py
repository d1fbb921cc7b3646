"""benchmarks/gemm_floor.py: its floor replays exactly the matrix products of a real update, forward and backward.

The floor is only a bound if nothing is missed: every product the update issues (backward ones included, which run
inside autograd's engine) must be recorded, and replaying them must do the same arithmetic. FlopCounterMode, run on
the live update at the same time as the recorder, is the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import random_batches
from gemm_floor import Floor, ProductRecorder
from update_time import PATHS, PlainLoop, build

aten = torch.ops.aten


@pytest.mark.parametrize("path", ["state", "pixel"])
def test_the_floor_replays_the_matrix_products_of_one_update(path: str) -> None:
    shapes, action_dim = PATHS[path]
    batches = random_batches(shapes, action_dim, batch_size=32, device="cpu", pool=2)
    loop = PlainLoop(build("trained", path), "cpu")
    policy_freq = loop.m.hparams.policy_freq
    with FlopCounterMode(display=False) as live, ProductRecorder() as recorder:
        for i in range(policy_freq):  # one critic step per batch, one actor step in the group
            loop.step(batches[i % len(batches)])
    floor = Floor(recorder.calls, policy_freq, "cpu")

    recorded = {func for func, _, _ in recorder.calls}
    backward = {aten.mm.default} if path == "state" else {aten.mm.default, aten.convolution_backward.default}
    assert backward <= recorded, f"no backward products recorded: {recorded}"
    assert live.get_total_flops() > 0
    assert floor.flops() == live.get_total_flops()
    assert len(floor.time(iterations=2)) == 2

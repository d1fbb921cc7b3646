"""The step telemetry's arithmetic: right against torch's own norms, and the same compiled (``model.compile`` /
``model.cuda_graphs``) as eager, non-finite cases included."""

from __future__ import annotations

import math

import pytest
import torch

from lit_td3.events import DeviceEvents, read_events
from lit_td3.telemetry import StepTelemetry

SHAPES = [(8, 4, 3, 3), (8,), (16, 8, 3, 3), (16,), (32, 20), (32,), (1, 32), (1,)]
PART_SIZES = [4, 4]  # a CNN's four tensors, then an MLP's


def gradients(seed: int, poison: float | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(shape, generator=g) * 10 ** (i % 3) for i, shape in enumerate(SHAPES)]
    if poison is not None:
        grads[5][3] = poison
    return grads


def run(fn: StepTelemetry, cases: list[tuple[list[torch.Tensor], torch.Tensor]]) -> tuple[list, dict]:
    events = {"nonfinite": DeviceEvents(), "q_bound": DeviceEvents()}
    outputs = []
    for step, (grads, loss) in enumerate(cases):
        env_step = torch.tensor(float(step), dtype=torch.float64)
        stats = fn.step_statistics(torch._foreach_norm(grads), PART_SIZES, loss, 50.0,
                                   events["nonfinite"].on(loss.device), env_step)
        fn.record_q_bound(events["q_bound"].on(loss.device), loss, 2.0, env_step)
        outputs.append([t.tolist() for t in (*stats, fn.total_norm(torch._foreach_norm(grads)))])
    return outputs, read_events(events)


CASES = [
    (gradients(0), torch.tensor(1.0)),
    (gradients(1), torch.tensor(-3.0)),  # Q = 3: beyond the Q bound 2
    (gradients(2, poison=math.inf), torch.tensor(0.5)),  # non-finite gradient
    (gradients(3), torch.tensor(math.nan)),  # non-finite loss
    (gradients(4), torch.tensor(-0.1)),
]


def test_step_statistics_are_torchs_norms_and_the_events_count_what_happened() -> None:
    outputs, windows = run(StepTelemetry(fused=False), CASES)
    for (grads, loss), (parts, total, nonfinite, clips, again) in zip(CASES, outputs):
        expected = [torch.nn.utils.get_total_norm(grads[:4]).item(), torch.nn.utils.get_total_norm(grads[4:]).item()]
        all_norm = torch.nn.utils.get_total_norm(grads).item()
        assert parts == pytest.approx(expected, rel=1e-6, nan_ok=True)
        assert total == pytest.approx(all_norm, rel=1e-6, nan_ok=True) and again == pytest.approx(total, nan_ok=True)
        assert nonfinite == float(not (math.isfinite(loss.item()) and math.isfinite(all_norm)))
        assert clips == float(all_norm > 50.0)
    assert [o[2] for o in outputs] == [0.0, 0.0, 1.0, 1.0, 0.0]
    nonfinite, q_bound = windows["nonfinite"], windows["q_bound"]
    assert (nonfinite.count, nonfinite.streak, nonfinite.longest, nonfinite.first_step) == (2, 0, 2, 2)
    assert nonfinite.first_value == 0.5  # the recorded loss: finite, so the gradient was the non-finite one
    assert (q_bound.count, q_bound.first_step, q_bound.first_value) == (1, 1, 3.0)  # NaN is beyond no bound


def test_compiled_step_statistics_equal_the_eager_ones() -> None:
    eager, eager_windows = run(StepTelemetry(fused=False), CASES)
    fused, fused_windows = run(StepTelemetry(fused=True), CASES)
    for a, b in zip(eager, fused):
        assert b[0] == pytest.approx(a[0], rel=1e-6, nan_ok=True)  # the part norms
        assert b[1:] == pytest.approx(a[1:], rel=1e-6, nan_ok=True)
    assert fused_windows == eager_windows

"""``model.cuda_graphs``: replayed updates do what eager ones do, skip non-finite steps, and never sync the host.

The graph tests need a CUDA GPU (they run on the GPU machine: ``bash benchmarks/gpu_session.sh part1 OUT``); the
refusals are checked everywhere.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from callbacks import GradientAlertCallback
from lit_td3.config import ConfigError
from lit_td3.graphs import check_cuda_graphs
from lit_td3.module import TD3Module
from tests.conftest import (
    EnvStepPerBatch,
    assert_same_training,
    fit_batches,
    fit_on_random_batches,
    make_module,
    needs_gpu,
    random_batch,
)
from tests.probes import NoSyncAfter


def test_cuda_graphs_are_refused_off_the_gpu_naming_the_field_and_the_device() -> None:
    module = make_module(cuda_graphs=True)
    with pytest.raises(ConfigError, match=r"model\.cuda_graphs=true needs a CUDA device \(this run trains on 'cpu'"):
        fit_on_random_batches(module, 2)
    assert module.counters.critic_updates == 0


def test_cuda_graphs_are_refused_with_several_processes_or_mixed_precision() -> None:
    cuda = torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"needs one process \(this run has 2"):
        check_cuda_graphs(cuda, 2, "32-true")
    with pytest.raises(ConfigError, match=r"needs precision 32-true or 64-true \(this run: 'bf16-mixed'"):
        check_cuda_graphs(cuda, 1, "bf16-mixed")
    with pytest.raises(ConfigError, match=r"a CUDA device .*; and one process .*; and precision .*'16-mixed'"):
        check_cuda_graphs(torch.device("cpu"), 4, "16-mixed")
    with pytest.raises(ConfigError, match=r"needs model\.compile false"):
        check_cuda_graphs(cuda, 1, "32-true", compile=True)
    check_cuda_graphs(cuda, 1, "32-true")  # the supported case passes (also through TD3DDPStrategy: test_ddp)


# ---------------------------------------------------------------------------------------------------- GPU
class CriticSnapshots(pl.Callback):
    def __init__(self) -> None:
        self.critic: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: TD3Module, *args: Any) -> None:
        self.critic.append([p.detach().clone() for p in pl_module.critic.parameters()])


@pytest.fixture
def deterministic_cudnn() -> Any:
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


@needs_gpu
def test_graphed_updates_match_eager_updates(deterministic_cudnn: Any) -> None:
    batches = [random_batch({"image": [4, 36, 36], "vector": [3]}, 2, seed=i) for i in range(16)]
    runs = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        module = make_module(policy_freq=2, cuda_graphs=graphs, log_every_n_env_steps=4)
        alerts = GradientAlertCallback(1.0, 10.0)
        trainer = fit_batches(module, batches, [EnvStepPerBatch(), alerts], accelerator="gpu")
        runs[graphs] = module, trainer, alerts.counts
    (eager, eager_trainer, eager_alerts), (graphed, graphed_trainer, graphed_alerts) = runs[False], runs[True]
    assert graphed._telemetry.fused and not eager._telemetry.fused
    assert graphed_alerts == eager_alerts and eager_alerts[("critic", "warning")] > 0
    # Captured after 3 eager warm-up calls each, then replayed: 16 critic and 8 actor updates.
    assert graphed._critic_step.graph is not None and graphed._critic_step.calls == 16
    assert graphed._actor_step.graph is not None and graphed._actor_step.calls == 8
    assert graphed_trainer.global_step == eager_trainer.global_step == 16 + 8  # replays count as optimizer steps
    assert_same_training(eager, graphed)
    for eager_opt, graphed_opt in zip(eager_trainer.optimizers, graphed_trainer.optimizers):
        assert [float(s["step"]) for s in graphed_opt.state.values()] == [float(s["step"]) for s in
                                                                           eager_opt.state.values()]


@needs_gpu
def test_the_graphed_policy_acts_as_the_eager_actor_with_its_current_weights(deterministic_cudnn: Any) -> None:
    torch.manual_seed(0)
    module = make_module(cuda_graphs=True).to("cuda")  # SMALL_IMAGE: a 4x36x36 image and a 3-vector
    rng = np.random.default_rng(0)
    for round_ in range(3):
        for batch_size in (1, 3):  # evaluation's single env, the training envs
            for _ in range(5):  # warm-up calls, the capture, replays
                obs = {"image": rng.integers(0, 256, (batch_size, 4, 36, 36), dtype=np.uint8),
                       "vector": rng.standard_normal((batch_size, 3)).astype(np.float32)}
                with torch.no_grad():
                    eager = module.actor({k: torch.as_tensor(v, device="cuda") for k, v in obs.items()}).cpu().numpy()
                np.testing.assert_allclose(module.act(obs), eager, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # an optimizer step: in place, where the graphs read the weights
            for p in module.actor.parameters():
                p.mul_(0.9).add_(0.01 * (round_ + 1))
    assert {n: g.graph is not None for n, g in module._policy_graphs.items()} == {1: True, 3: True}


@needs_gpu
def test_a_nonfinite_batch_is_skipped_inside_the_graph_and_counted_at_the_log_point() -> None:
    torch.manual_seed(0)
    batches = [random_batch({"image": [4, 36, 36]}, 2, seed=i) for i in range(8)]
    batches[6].reward[0] = float("nan")  # long after the capture (the 4th call)
    module = make_module({"image": [4, 36, 36]}, policy_freq=1, cuda_graphs=True, log_every_n_env_steps=1)
    snapshots = CriticSnapshots()
    with pytest.warns(UserWarning, match=r"non-finite critic loss at env step 7: critic update skipped"):
        trainer = fit_batches(module, batches, [EnvStepPerBatch(), snapshots], accelerator="gpu")
    same = [all(torch.equal(a, b) for a, b in zip(before, after))
            for before, after in zip(snapshots.critic, snapshots.critic[1:])]
    assert same == [False] * 5 + [True, False]
    critic_opt = trainer.optimizers[1]
    assert {float(s["step"]) for s in critic_opt.state.values()} == {7.0}  # Adam's step count did not move either
    assert module.counters.nonfinite_steps == 1 and module.counters.consecutive_nonfinite["critic"] == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())


@needs_gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_no_host_sync_between_log_points(cuda_graphs: bool) -> None:
    torch.manual_seed(0)
    module = make_module(policy_freq=2, cuda_graphs=cuda_graphs, reward_bound=10.0)  # the Q-bound check is on
    batches = [random_batch({"image": [4, 36, 36], "vector": [3]}, 2, seed=i) for i in range(12)]
    watch = NoSyncAfter(warmup=5)
    try:
        # watch last: its batch end comes after the alerts'
        fit_batches(module, batches, [GradientAlertCallback(), watch], accelerator="gpu")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.checked == 12 - 5


@needs_gpu
def test_a_graphed_run_resumed_from_a_checkpoint_continues_as_one_never_stopped(tmp_path: Any,
                                                                                deterministic_cudnn: Any) -> None:
    batches = [random_batch({"image": [4, 36, 36]}, 2, seed=i) for i in range(16)]

    torch.manual_seed(0)
    straight = make_module({"image": [4, 36, 36]}, policy_freq=2, cuda_graphs=True)
    fit_batches(straight, batches, accelerator="gpu")
    torch.manual_seed(0)
    first = make_module({"image": [4, 36, 36]}, policy_freq=2, cuda_graphs=True)
    fit_batches(first, batches[:8], accelerator="gpu").save_checkpoint(tmp_path / "half.ckpt")
    torch.manual_seed(123)  # the checkpoint's RNG states must win
    resumed = make_module({"image": [4, 36, 36]}, policy_freq=2, cuda_graphs=True)
    fit_batches(resumed, batches[8:], accelerator="gpu", epochs=2, ckpt_path=tmp_path / "half.ckpt")
    assert resumed._critic_step.graph is not None  # recaptured after the restore, then replayed
    assert asdict(resumed.counters) == asdict(straight.counters)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")

"""Distributed data-parallel TD3 through lit_td3's TD3DDPStrategy: 2 ranks, real subprocesses; on the CPU (gloo)
everywhere, and on 2 GPUs (NCCL) where a machine has them."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

from lit_td3.config import ConfigError
from lit_td3.distributed import TD3DDPStrategy, _SignalVote, check_strategy
from lit_td3.envs.carla.server import free_port
from lit_td3.report.events import load_run
from tests.test_cli import counters_of, lit_td3, python_module, small_run_config
from tests.test_faults import FAULTY_ENV_ID, env_steps_named
from tests.test_resume import (
    finish,
    sigterm_after,
    sigterm_env_workers_first,
    start,
    wait_for,
)

needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs")
needs_a_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=needs_2_gpus)])
def ddp(request: pytest.FixtureRequest) -> list[str]:
    """The trainer flags of a 2-rank DDP run: gloo on the CPU, NCCL on 2 GPUs."""
    return ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", request.param]


def test_only_td3_ddp_strategy_runs_several_processes() -> None:
    # TD3Module.setup checks the trainer it is given, for runs built in Python (the CLI refuses before launching)
    for strategy in (DDPStrategy(), DDPStrategy(find_unused_parameters=True), FSDPStrategy()):
        with pytest.raises(ConfigError, match=rf"trainer.strategy={type(strategy).__name__}: expected 'ddp'"):
            check_strategy(strategy)
    check_strategy(TD3DDPStrategy())
    check_strategy(SingleDeviceStrategy("cpu"))


@pytest.mark.parametrize("name", ["ddp_comm_hook", "ddp_comm_wrapper", "ddp_comm_state", "model_averaging_period"])
def test_td3_ddp_refuses_what_it_could_not_apply(name: str) -> None:
    value = 4 if name == "model_averaging_period" else fp16_compress_hook
    with pytest.raises(ConfigError, match=rf"trainer.strategy.{name}=.*expected null"):
        TD3DDPStrategy(**{name: value})
    assert TD3DDPStrategy(gradient_as_bucket_view=False)._ddp_kwargs == {"gradient_as_bucket_view": False}


def ddp_config(tmp_path: Path, total: int, every: int = 200, probes: tuple[dict, ...] = ()) -> Path:
    path = small_run_config(tmp_path, every=every, env_id="Pendulum-v1", total=total, learning_starts=100,
                            episode_steps=50, extra={"data": {"async_envs": False}})
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] += [*probes, {"class_path": "tests.probes.RankDump"}]
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_ranks_train_one_model_on_their_own_envs_and_resume(tmp_path: Path, ddp: list[str]) -> None:
    config = ddp_config(tmp_path, total=400)
    first = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config), *ddp, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["strategy"] == "td3_ddp"  # as it ran
    ranks = [torch.load(run / f"rank_{r}.pt", weights_only=True) for r in (0, 1)]

    # data.total_env_steps is global: 400 env steps = 200 per rank, each rank's shard holds its own 200
    assert [r["env_steps"] for r in ranks] == [400, 400]
    assert [r["buffer_len"] for r in ranks] == [200, 200]
    assert not torch.equal(ranks[0]["first_obs"], ranks[1]["first_obs"])  # seeded per rank: different episodes
    # each network in its own DDP wrapper, its gradients views of the wrapper's all-reduce buckets
    assert [r["bucket_views"] for r in ranks] == [{"actor": True, "critic": True}] * 2
    # DDP all-reduced every update: one model, the same on both ranks (targets included)
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(value, ranks[1]["params"][name], msg=f"{name} differs across ranks")
    assert counters_of(run / "checkpoints" / "last.ckpt")["env_steps"] == 400
    assert {"replay_buffer-env_step=400-rank0.pt", "replay_buffer-env_step=400-rank1.pt"} <= {
        p.name for p in (run / "checkpoints").glob("replay_buffer-*")}  # one shard per rank
    # rank 0 logs every rank's episodes: 50-step episodes end at global env steps 100..400 on both ranks
    logged = load_run(run)
    assert logged["rollout/episode_return"].steps.tolist() == [100, 200, 300, 400]
    assert logged["rollout/episodes_ended"].values.tolist() == [2.0, 2.0, 2.0, 2.0]  # one per rank at each step
    # each rank's episode returns are the sums of its shard's rewards, 50 at a time; the logged value is their mean
    per_rank = [r["rewards"].reshape(4, 50).sum(dim=1).double() for r in ranks]
    assert not torch.allclose(per_rank[0], per_rank[1])  # two different episodes at each step
    torch.testing.assert_close(torch.from_numpy(logged["rollout/episode_return"].values),
                               (per_rank[0] + per_rank[1]) / 2, rtol=1e-5, atol=1e-3)
    # the checkpoint holds each rank's own stream: its exploration RNG and open episodes
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    streams = saved["RolloutDataModule"]["ranks"]
    assert len(streams) == 2 and streams[0]["rng"] != streams[1]["rng"]
    assert [len(r["counters"]) > 0 for r in saved["lit_td3"]["ranks"]] == [True, True]

    second = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config), *ddp,
                     "--data.total_env_steps", "600", "--ckpt_path", "last", timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    ranks = [torch.load(run / f"rank_{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["env_steps"] for r in ranks] == [600, 600]
    assert [r["buffer_len"] for r in ranks] == [300, 300]  # each rank restored its own shard and added 100
    assert [r["resumed_rng"] for r in ranks] == [s["rng"] for s in streams]  # each rank resumed its own stream
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(value, ranks[1]["params"][name])

    # a different world size cannot take the two shards: refused, naming the reason
    single = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config), "--data.total_env_steps", "800",
                     "--ckpt_path", "last")
    assert single.returncode == 2
    assert "2 rank(s)" in single.stderr and "1" in single.stderr


@pytest.mark.parametrize("method", ["spawn", "fork"])
@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=needs_a_gpu)])
def test_ranks_started_from_python_hand_the_trained_networks_back(tmp_path: Path, method: str,
                                                                  accelerator: str) -> None:
    # Lightning's spawn and fork launchers load rank 0's final weights into the main process's module, which never ran
    # setup, where the networks are built: the module must come back whole, not silently without networks.
    # 2 ranks on the CPU; on GPUs, as many as there are, up to 2.
    devices = 2 if accelerator == "cpu" else min(torch.cuda.device_count(), 2)
    config = ddp_config(tmp_path, total=400)
    out = tmp_path / "main_process.pt"
    done = python_module("tests.python_api_fit", method, accelerator, str(devices), str(out), "configs/td3.yaml",
                         str(config), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    main = torch.load(out, weights_only=True)
    rank_0 = torch.load(tmp_path / "run" / "rank_0.pt", weights_only=True)  # what rank 0 held at the end of the fit
    assert main["state_dict"].keys() == rank_0["params"].keys()
    for name, value in rank_0["params"].items():
        torch.testing.assert_close(main["state_dict"][name], value, rtol=0, atol=0, msg=f"{name} not handed back")
    assert main["counters"]["env_steps"] == rank_0["env_steps"] == 400
    assert main["counters"]["critic_updates"] == rank_0["critic_updates"] > 0


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=needs_a_gpu),
                                         pytest.param("gpu-graphs", marks=needs_a_gpu)])
def test_one_rank_of_ddp_trains_the_model_one_process_trains(tmp_path: Path, accelerator: str) -> None:
    # world size 1: DDP's hooks, bucket views and all-reduce in every update, an identity on the gradients; with the
    # same seed the run must end with the parameters of a run without DDP (clipping and the guard act on the views).
    # With CUDA graphs both runs capture their updates, the DDP run with its all-reduces (PyTorch's recipe: the
    # wrappers built on the capture stream, 11 eager warm-up updates).
    graphs_flags = ["--model.cuda_graphs", "true"]
    accelerator, _, graphs = accelerator.partition("-")
    params, updates = {}, {}
    for strategy in ("ddp", "auto"):
        config = ddp_config(tmp_path / strategy, total=300)
        done = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config), "--trainer.strategy", strategy,
                       "--trainer.devices", "1", "--trainer.accelerator", accelerator, *(graphs_flags if graphs else []),
                       timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        dump = torch.load(tmp_path / strategy / "run" / "rank_0.pt", weights_only=True)
        params[strategy], updates[strategy] = dump["params"], dump["critic_updates"]
        views = strategy == "ddp" or None  # None: the networks themselves, in no wrapper
        assert dump["bucket_views"] == {"actor": views, "critic": views}
        assert dump["captured"] == {"actor": bool(graphs), "critic": bool(graphs)}
    exact = {"rtol": 0, "atol": 0} if accelerator == "cpu" else {}  # cuBLAS may pick other kernels in another run
    assert params["ddp"].keys() == params["auto"].keys()
    for name, value in params["ddp"].items():
        torch.testing.assert_close(value, params["auto"][name], msg=f"{name} differs from the run without DDP", **exact)
    assert updates["ddp"] == updates["auto"] > 100
    trained = {k: v for k, v in params["auto"].items() if k.startswith("actor.")}
    assert any(not torch.equal(v, params["auto"][f"actor_target.{k[6:]}"]) for k, v in trained.items())


def test_env_outputs_rejected_on_any_rank_are_counted_in_the_alert(tmp_path: Path, ddp: list[str]) -> None:
    # "module:id": each rank imports the module that registers the faulty env, as gymnasium.make does
    config = small_run_config(tmp_path, every=100, env_id=f"tests.test_faults:{FAULTY_ENV_ID}", total=200,
                              learning_starts=100, episode_steps=50,
                              extra={"data": {"async_envs": False, "eval_episodes": 0,
                                              "env_kwargs": {"nan_reward_at": [30], "faulty_envs": [1]}}})
    done = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config), *ddp, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # only rank 1's env faults, at its 30th step: global env step 60 (both ranks step in lockstep)
    assert env_steps_named(done.stderr, "env 1 returned a non-finite reward") == [60]
    assert env_steps_named(done.stderr, "env 0 returned a non-finite") == []
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert [r["counters"]["nonfinite_env_outputs"] for r in saved["lit_td3"]["ranks"]] == [0, 1]
    count = load_run(tmp_path / "run")["alerts/nonfinite_env_outputs"]  # rank 0 writes the sum over ranks
    assert count.values[count.steps < 60].tolist() == [0.0] * int((count.steps < 60).sum())
    assert count.values[count.steps >= 60].tolist() == [1.0] * int((count.steps >= 60).sum()) != []


@needs_2_gpus
def test_two_gpu_updates_never_wait_for_the_host(tmp_path: Path) -> None:
    # Each network's all-reduce is queued on the GPU in its own backward: between log points a rank's updates never
    # sync the host, as on one GPU (test_graphs). Lightning's DDP around the whole module needs
    # find_unused_parameters here, whose reducer copies a map to the host at the end of every backward. Nor does the
    # signal vote after each env step (Lightning's SIGTERM broadcast at each batch start read a GPU tensor back).
    probe = {"class_path": "tests.probes.NoSyncAfter", "init_args": {"warmup": 10}}
    config = ddp_config(tmp_path, total=400, every=10**6, probes=(probe,))  # no log point, checkpoint or evaluation
    done = lit_td3("fit", "--config", "configs/td3.yaml", "--config", str(config), "--trainer.strategy", "ddp",
                   "--trainer.devices", "2", "--trainer.accelerator", "gpu", "--data.eval_episodes", "0",
                   "--model.log_every_n_env_steps", str(10**6), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        dumped = torch.load(tmp_path / "run" / f"rank_{rank}.pt", weights_only=True)
        assert dumped["critic_updates"] > 20
        assert dumped["sync_checked"] == [dumped["critic_updates"] - 10]
        assert dumped["votes_checked"][0] > 0  # nor the stream's signal votes


@pytest.mark.parametrize("to", ["rank-0", "process-group", "group-env-workers-first"])
def test_sigterm_stops_every_rank_at_one_env_step_with_a_checkpoint_of_all(tmp_path: Path, to: str) -> None:
    # SLURM's preemption signals every process of the job (ranks and their async env workers); `kill PID` only rank 0.
    # Either way all ranks must stop at the same env step, write one crash checkpoint holding every rank's state and
    # buffer shard, and end with 128 + SIGTERM, as one process does (tests/test_resume.py). With Lightning's own
    # handling the ranks deadlocked: its signal handler runs a collective wherever the signal lands. Last variant: the
    # env workers die of the group's SIGTERM before their ranks get to stop (forced, as in test_resume).
    config = ddp_config(tmp_path, total=20_000, every=200)
    envs = ["--data.async_envs", "true", "--data.num_envs", "2"] if to != "rank-0" else []
    running = start(config, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                    "--data.eval_episodes", "0", *envs, own_process_group=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    if to == "group-env-workers-first":
        wait_for(running, checkpoints / "env_step=200.ckpt", delay_s=0.5)
        rank_1 = [p.pid for p in psutil.Process(running.pid).children() if "lit_td3" in " ".join(p.cmdline())]
        stopped = sigterm_env_workers_first(running, [running.pid, *rank_1], timeout=300)
    else:
        stopped = sigterm_after(running, checkpoints / "env_step=200.ckpt", to == "process-group", delay_s=0.5,
                                timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
    assert "SIGTERM received" in stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr[-4000:]
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)["lit_td3"]
    steps = state["counters"]["env_steps"]
    assert 200 < steps < 20_000
    assert [rank["counters"]["env_steps"] for rank in state["ranks"]] == [steps, steps]  # the same env step on both
    assert state["buffer"]["env_step"] == steps
    assert state["buffer"]["transitions"] == [steps // 2, steps // 2]  # each rank's shard, written at the stop
    assert [(checkpoints / name).is_file() for name in state["buffer_files"]] == [True, True]


def test_the_signal_vote_acts_at_the_first_vote_after_a_signal_and_once() -> None:
    # One rank (gloo, in this process) shows the timing; the 2-rank tests above and below, that the ranks act together.
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        requeued: list[int] = []
        connector = SimpleNamespace(received_sigterm=False,
                                    _slurm_sigusr_handler_fn=lambda signum, frame: requeued.append(signum))
        vote = _SignalVote(SimpleNamespace(global_rank=0, _signal_connector=connector))
        vote()
        vote.note_requeue(signal.SIGUSR1, None)
        vote()
        assert requeued == [signal.SIGUSR1]
        vote()
        assert requeued == [signal.SIGUSR1]  # once
        vote.note_stop(signal.SIGTERM, None)
        assert not connector.received_sigterm
        with pytest.raises(SIGTERMException):
            vote()
        assert connector.received_sigterm
    finally:
        torch.distributed.destroy_process_group()


def test_slurm_requeue_signal_checkpoints_every_rank_at_one_env_step_and_training_goes_on(tmp_path: Path) -> None:
    # srun starts one task per rank (here: two processes with srun's variables), and `#SBATCH --signal=USR1@90` makes
    # SLURM send the requeue signal to every task. Lightning's auto-requeue saves a checkpoint of all ranks and asks
    # SLURM to requeue the job (no `scontrol` here: it says so and goes on); training goes on until SLURM stops it.
    # Lightning does this inside its signal handler, the checkpoint's collectives wherever the signal lands on each
    # rank; lit_td3 does it on all ranks at the same env step.
    config = ddp_config(tmp_path, total=1000, every=200)
    port = free_port()
    tasks = []
    for rank in (0, 1):
        srun = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lit_td3",
                "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        tasks.append(start(config, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator",
                           "cpu", "--data.eval_episodes", "0", env=srun))
    wait_for(tasks[0], tmp_path / "run" / "checkpoints" / "env_step=200.ckpt", delay_s=0.5)
    for task in tasks:
        task.send_signal(signal.SIGUSR1)
    ends = [finish(task, timeout=300) for task in tasks]
    assert [end.returncode for end in ends] == [0, 0], ends[0].stderr[-3000:] + ends[1].stderr[-3000:]
    assert "Requeuing SLURM job 4242 failed" in ends[0].stderr  # asked from rank 0; there is no scontrol here
    requeued = torch.load(tmp_path / "run" / "hpc_ckpt_1.ckpt", weights_only=True)["lit_td3"]
    steps = requeued["counters"]["env_steps"]
    assert 200 < steps < 1000
    assert [rank["counters"]["env_steps"] for rank in requeued["ranks"]] == [steps, steps]  # the same env step on both
    assert counters_of(tmp_path / "run" / "checkpoints" / "last.ckpt")["env_steps"] == 1000  # and it went on

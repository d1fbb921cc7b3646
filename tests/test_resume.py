"""Resume that is really a resume: real ``kill -9`` of the real CLI, then ``--ckpt_path last``.

Every run here is a subprocess of ``python -m lit_td3`` on a real gymnasium env with tiny networks and one torch
thread (two processes on two cores otherwise fight over threads and take four times as long).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml

from lit_td3.buffer import ReplayBuffer
from lit_td3.checkpoints import CheckpointError, resolve_checkpoint
from lit_td3.report import load_run
from tests.conftest import is_channels_last, needs_gpu
from tests.test_cli import small_run_config

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "SDL_VIDEODRIVER": "dummy", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "lit_td3"]

# Runs the real CLI after making the first torch.save into a temp file of $KILL_WRITING write half of its bytes and
# then SIGKILL its own process: a kill in the middle of writing that file, at a moment chosen exactly.
KILL_WHILE_WRITING = [sys.executable, "-c", """
import io, os, signal, tempfile, torch
target, temps, real_mkstemp, real_save = os.environ["KILL_WRITING"], {}, tempfile.mkstemp, torch.save
def mkstemp(*args, **kwargs):
    fd, name = real_mkstemp(*args, **kwargs)
    temps[fd] = os.path.basename(name)
    return fd, name
def save(obj, f, *args, **kwargs):
    if isinstance(f, io.BufferedWriter) and temps.get(f.fileno(), "").startswith(f".{target}."):
        data = io.BytesIO()
        real_save(obj, data, *args, **kwargs)
        f.write(data.getvalue()[: len(data.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
tempfile.mkstemp, torch.save = mkstemp, save
from lit_td3.cli import main
main()
"""]


# Runs the real CLI with no file allowed to grow past $FILE_SIZE_LIMIT bytes: a write beyond it fails as on a full
# disk (the kernel refuses the write; SIGXFSZ, which a full disk does not send, is ignored).
WITH_FILE_SIZE_LIMIT = [sys.executable, "-c", """
import os, resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(os.environ["FILE_SIZE_LIMIT"])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from lit_td3.cli import main
main()
"""]


def run_config(folder: Path, *, env_id: str, total: int, every: int, episode_steps: int, learning_starts: int,
               data: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> Path:
    """tests/test_cli.py's small run (tiny networks, checkpoints every ``every`` env steps) in ``folder``."""
    return small_run_config(folder, every=every, env_id=env_id, total=total, learning_starts=learning_starts,
                            episode_steps=episode_steps, extra={"data": data or {}, "model": model or {}})


def start(config: Path, *args: str, command: list[str] = CLI, env: dict[str, str] | None = None,
          own_process_group: bool = False) -> subprocess.Popen:
    return subprocess.Popen([*command, "fit", "--config", "configs/td3.yaml", "--config", str(config), *args],
                            cwd=REPO, env={**SUBPROCESS_ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=own_process_group)


def finish(process: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def fit(config: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return finish(start(config, *args, **kwargs))


def wait_for(process: subprocess.Popen, checkpoint: Path, delay_s: float) -> None:
    """Returns ``delay_s`` after ``checkpoint`` appeared, failing if the run ended before writing it."""
    while not checkpoint.exists():
        assert process.poll() is None, f"the run ended before writing {checkpoint}: {finish(process).stderr[-3000:]}"
        time.sleep(0.02)
    time.sleep(delay_s)


def kill_after(process: subprocess.Popen, checkpoint: Path, delay_s: float = 0.05) -> None:
    """``kill -9`` the run some time after ``checkpoint`` appeared, while it is still training."""
    wait_for(process, checkpoint, delay_s)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"


def sigterm_after(process: subprocess.Popen, checkpoint: Path, to_the_group: bool, delay_s: float = 0.05,
                  timeout: float = 240) -> subprocess.CompletedProcess:
    """SIGTERM to the run's main process, or to its whole process group as SLURM and ``timeout`` send it (the run
    must have its own), some time after ``checkpoint`` appeared; returns how the run ended."""
    wait_for(process, checkpoint, delay_s)
    if to_the_group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    return finish(process, timeout)


def checkpoints_of(config: Path) -> Path:
    return config.parent / "run" / "checkpoints"


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)  # what the issue asks of every checkpoint


def assert_same_training_state(straight: dict[str, Any], resumed: dict[str, Any]) -> None:
    assert resumed["lit_td3"]["counters"] == straight["lit_td3"]["counters"]
    torch.testing.assert_close(resumed["state_dict"], straight["state_dict"], rtol=1e-6, atol=1e-7)
    for ours, theirs in zip(resumed["optimizer_states"], straight["optimizer_states"], strict=True):
        torch.testing.assert_close(ours["state"], theirs["state"], rtol=1e-6, atol=1e-7)  # Adam's moments
        assert ours["param_groups"] == theirs["param_groups"]


def assert_same_buffer(straight: Path, resumed: Path) -> None:
    a, b = ReplayBuffer.from_file(straight), ReplayBuffer.from_file(resumed)
    assert len(a) == len(b)
    everything = torch.arange(len(a))
    torch.testing.assert_close(tuple(b.get(everything)), tuple(a.get(everything)), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- exact resume
# Pixels: 36x36 frames (the smallest NatureCNN input) keep the CNN small; no evaluation episodes, to save time.
SMALL_PIXELS = {"image_size": 36, "batch_size": 16, "eval_episodes": 0}


@pytest.mark.parametrize(
    ("env_id", "episode_steps", "data"),
    [
        # state-based, envs stepped in this process, evaluation episodes in between
        ("Pendulum-v1", 50, {"async_envs": False}),
        # pixels through a small CNN, envs in worker processes that step while the learner updates
        ("lit_td3/CarRacing-v3", 25, {"async_envs": True, **SMALL_PIXELS}),
    ],
)
def test_killed_and_resumed_run_equals_a_run_never_stopped(tmp_path: Path, env_id: str, episode_steps: int,
                                                            data: dict[str, Any]) -> None:
    half = 2 * episode_steps  # a checkpoint on an episode boundary: the resumed envs replay the same episodes
    total = 2 * half
    # Pendulum's largest |reward| is 16.3: a healthy run is the control of the Q-bound alert's test (test_faults)
    model = {"reward_bound": 16.3} if env_id == "Pendulum-v1" else {}
    settings = {"env_id": env_id, "total": total, "every": half, "episode_steps": episode_steps,
                "learning_starts": episode_steps, "data": data, "model": model}
    straight_config = run_config(tmp_path / "straight", **settings)
    killed_config = run_config(tmp_path / "killed", **settings)
    straight = start(straight_config)
    killed = start(killed_config)
    kill_after(killed, checkpoints_of(killed_config) / f"env_step={half}.ckpt")
    assert not (checkpoints_of(killed_config) / f"env_step={total}.ckpt").exists()

    resumed = fit(killed_config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(env step {half})" in resumed.stderr  # it says where it resumed
    done = finish(straight)
    assert done.returncode == 0, done.stderr[-3000:]

    final_straight = load(checkpoints_of(straight_config) / "last.ckpt")
    final_resumed = load(checkpoints_of(killed_config) / "last.ckpt")
    assert final_resumed["lit_td3"]["counters"]["env_steps"] == total
    assert_same_training_state(final_straight, final_resumed)
    assert_same_buffer(checkpoints_of(straight_config) / f"replay_buffer-env_step={total}.pt",
                       checkpoints_of(killed_config) / f"replay_buffer-env_step={total}.pt")
    if model:
        assert final_straight["lit_td3"]["counters"]["q_bound_alerts"] == 0
    for checkpoint in checkpoints_of(killed_config).glob("*.ckpt"):
        state = load(checkpoint)["lit_td3"]
        assert set(state["ranks"][0]["rng"]) == {"python", "numpy", "torch", "cuda"}
        assert (checkpoint.parent / state["buffer_files"][0]).is_file()  # the buffer is beside it, not inside


def test_resume_mid_episode_ends_the_cut_episode_as_truncated(tmp_path: Path) -> None:
    # Pixels: the buffer refuses a frame stack that continues an episode the resumed envs no longer have.
    config = run_config(tmp_path, env_id="lit_td3/CarRacing-v3", total=90, every=45, episode_steps=30, learning_starts=30,
                        data={"async_envs": False, **SMALL_PIXELS})
    killed = start(config)
    kill_after(killed, checkpoints_of(config) / "env_step=45.ckpt")
    resumed = fit(config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(env step 45)" in resumed.stderr

    run = load_run(config.parent / "run")
    cut = run["rollout/cut_by_resume"]
    assert cut.steps.tolist() == [45] and cut.values.tolist() == [1.0]
    lengths = dict(zip(run["rollout/episode_length"].steps.tolist(), run["rollout/episode_length"].values.tolist()))
    assert lengths[45] == 15.0  # steps 30..45 of the second episode, closed where the checkpoint cut it
    assert lengths[75] == 30.0  # then a full new episode
    final = load(checkpoints_of(config) / "last.ckpt")["lit_td3"]
    assert final["counters"]["env_steps"] == 90
    assert final["counters"]["episodes"] == 3
    # 45 transitions came back with the saved buffer, 45 were added after the resume
    assert len(ReplayBuffer.from_file(checkpoints_of(config) / final["buffer_files"][0])) == 90


@pytest.mark.parametrize("to_the_group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_saves_the_current_state_and_exits_non_zero(tmp_path: Path, to_the_group: bool) -> None:
    # SLURM's preemption and `timeout` signal the whole process group, async env workers included.
    config = run_config(tmp_path, env_id="Pendulum-v1", total=5000, every=100, episode_steps=50, learning_starts=50,
                        data={"async_envs": to_the_group, "num_envs": 2 if to_the_group else 1, "eval_episodes": 0})
    running = start(config, own_process_group=to_the_group)
    stopped = sigterm_after(running, checkpoints_of(config) / "env_step=100.ckpt", to_the_group)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "SIGTERM received" in stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]  # the env workers' teardown included
    state = load(checkpoints_of(config) / "last.ckpt")["lit_td3"]
    assert 100 < state["counters"]["env_steps"] < 5000
    assert state["buffer"]["env_step"] == state["counters"]["env_steps"]  # the buffer was written with it
    assert (checkpoints_of(config) / state["buffer_files"][0]).is_file()


def test_sigterm_still_stops_with_a_checkpoint_when_the_env_workers_died_first(tmp_path: Path) -> None:
    # The group's SIGTERM can end the env workers before the main process has finished its batch: its next env step
    # then meets a closed pipe. That is the stop, not an env failure. Forced here: the main process is stopped while the
    # group is signalled, and continues once its workers are gone (its own SIGTERM is delivered first).
    config = run_config(tmp_path, env_id="Pendulum-v1", total=5000, every=100, episode_steps=50, learning_starts=50,
                        data={"async_envs": True, "num_envs": 2, "eval_episodes": 0})
    running = start(config, own_process_group=True)
    wait_for(running, checkpoints_of(config) / "env_step=100.ckpt", delay_s=0.05)
    stopped = sigterm_env_workers_first(running, [running.pid])
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    state = load(checkpoints_of(config) / "last.ckpt")["lit_td3"]
    assert state["buffer"]["env_step"] == state["counters"]["env_steps"] > 100


def sigterm_env_workers_first(running: subprocess.Popen, learners: list[int],
                              timeout: float = 240) -> subprocess.CompletedProcess:
    """SIGTERM to the run's process group, with the learner processes stopped until their env workers have died of it;
    returns how the run ended."""
    # the env workers and their forkserver; multiprocessing's resource tracker ignores SIGTERM by design
    workers = [child for child in psutil.Process(running.pid).children(recursive=True)
               if child.pid not in learners and "resource_tracker" not in " ".join(child.cmdline())]
    for pid in learners:
        os.kill(pid, signal.SIGSTOP)
    os.killpg(running.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not all(_ended(worker) for worker in workers):  # zombies until the stopped learners reap them
        assert time.monotonic() < deadline, "the env workers outlived the SIGTERM"
        time.sleep(0.05)
    for pid in learners:
        os.kill(pid, signal.SIGCONT)
    return finish(running, timeout)


def _ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------------------------------------------- damaged files
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished Pendulum run with checkpoints (and buffers) at env steps 100 and 200; tests copy it."""
    config = run_config(tmp_path_factory.mktemp("finished"), env_id="Pendulum-v1", total=200, every=100,
                        episode_steps=50, learning_starts=50, data={"async_envs": False})
    done = fit(config)
    assert done.returncode == 0, done.stderr[-3000:]
    return config.parent


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished run whose config points at the copy; returns the copy's config."""
    folder = tmp_path / "copy"
    shutil.copytree(finished_run, folder, symlinks=True)
    config = yaml.safe_load((folder / "small.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(folder / "run")
    (folder / "small.yaml").write_text(yaml.safe_dump(config))
    return folder / "small.yaml"


@pytest.mark.parametrize("written", ["checkpoint", "buffer"])
def test_a_kill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path: Path, finished_run: Path,
                                                                       written: str) -> None:
    config = copy_run(finished_run, tmp_path)
    target = {"checkpoint": "env_step=300.ckpt", "buffer": "replay_buffer-env_step=300.pt"}[written]
    killed = fit(config, "--ckpt_path", "last", "--data.total_env_steps", "300",
                 command=KILL_WHILE_WRITING, env={"KILL_WRITING": target})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = checkpoints_of(config)
    assert [p.name for p in folder.glob(f".{target}.*.tmp")]  # the kill really came in the middle of that write
    assert not (folder / target).exists()
    assert load(folder / "last.ckpt")["lit_td3"]["counters"]["env_steps"] == 200

    resumed = fit(config, "--ckpt_path", "last", "--data.total_env_steps", "300")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(env step 200)" in resumed.stderr
    assert load(folder / "last.ckpt")["lit_td3"]["counters"]["env_steps"] == 300
    assert not list(folder.glob(".*.tmp"))  # the half-written file was cleaned up


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_corrupt_last_checkpoint_is_named_and_the_run_falls_back_to_the_previous(tmp_path: Path,
                                                                                    finished_run: Path) -> None:
    config = copy_run(finished_run, tmp_path)
    folder = checkpoints_of(config)
    truncate(folder / "env_step=200.ckpt")  # last.ckpt links to it
    resumed = fit(config, "--ckpt_path", "last", "--data.total_env_steps", "300")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "env_step=200.ckpt' is truncated or corrupt" in resumed.stderr
    assert "env_step=100.ckpt' (env step 100)" in resumed.stderr  # not a fresh start
    counters = load(folder / "last.ckpt")["lit_td3"]["counters"]
    assert counters["env_steps"] == 300 and counters["episodes"] == 6


def test_damaged_checkpoints_and_buffers_are_refused_by_name(tmp_path: Path, finished_run: Path) -> None:
    folder = checkpoints_of(copy_run(finished_run, tmp_path))
    (folder / "env_step=100.ckpt").write_bytes(os.urandom(4096))  # garbage, not just short
    truncate(folder / "replay_buffer-env_step=200.pt")
    with pytest.raises(CheckpointError, match=r"env_step=100\.ckpt' is truncated or corrupt"):
        resolve_checkpoint(str(folder / "env_step=100.ckpt"), folder)  # an explicit path gets no fallback
    with pytest.raises(CheckpointError, match=r"env_step=200\.ckpt' refers to a replay buffer .*"
                                              r"replay_buffer-env_step=200\.pt' is truncated or corrupt"):
        resolve_checkpoint(str(folder / "env_step=200.ckpt"), folder)
    with pytest.raises(CheckpointError, match="no usable checkpoint .* every one of 3"):
        resolve_checkpoint("last", folder)  # last, 200 and 100 all damaged: never a silent fresh start


def test_disk_full_while_saving_names_the_file_and_keeps_the_previous_checkpoint(tmp_path: Path,
                                                                                 finished_run: Path) -> None:
    config = copy_run(finished_run, tmp_path)
    folder = checkpoints_of(config)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}
    # No file may grow past the buffer written at env step 200: the one at 300 (50% bigger) cannot be written.
    limit = (folder / "replay_buffer-env_step=200.pt").stat().st_size + 1024
    full = fit(config, "--ckpt_path", "last", "--data.total_env_steps", "300", command=WITH_FILE_SIZE_LIMIT,
               env={"FILE_SIZE_LIMIT": str(limit)})
    assert full.returncode == 5, full.stderr[-3000:]
    assert f"replay buffer: could not write '{folder / 'replay_buffer-env_step=300.pt'}'" in full.stderr
    assert "File too large" in full.stderr
    assert not (folder / "env_step=300.ckpt").exists()
    assert not list(folder.glob(".*.tmp"))  # the partial temp file was removed
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}
    assert after == before  # every earlier checkpoint and buffer byte for byte as it was
    assert resolve_checkpoint("last", folder) == str(folder / "last.ckpt")
    assert load(folder / "last.ckpt")["lit_td3"]["counters"]["env_steps"] == 200


def test_a_checkpoint_loads_with_new_training_settings(tmp_path: Path, finished_run: Path) -> None:
    """The original report's rollback plan: clipping off (or other limits), other learning rates or noise."""
    config = copy_run(finished_run, tmp_path)
    # An explicit path: Lightning's own CLI would apply the checkpoint's hyperparameters over these.
    resumed = fit(config, "--ckpt_path", str(checkpoints_of(config) / "env_step=200.ckpt"),
                  "--data.total_env_steps", "300",
                  "--model.gradient_clipping.enabled", "false", "--model.actor_mlp_lr", "1e-5",
                  "--model.critic_mlp_lr", "2e-4", "--model.policy_noise", "0.3", "--data.exploration_noise", "0.2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load(checkpoints_of(config) / "last.ckpt")
    assert final["lit_td3"]["counters"]["env_steps"] == 300
    assert [g["lr"] for g in final["optimizer_states"][0]["param_groups"]] == [1e-5]
    assert [g["lr"] for g in final["optimizer_states"][1]["param_groups"]] == [2e-4]
    assert final["hyper_parameters"]["policy_noise"] == 0.3
    assert final["hyper_parameters"]["gradient_clipping"]["enabled"] is False
    assert final["datamodule_hyper_parameters"]["exploration_noise"] == 0.2
    clip = load_run(config.parent / "run")["gradients/critic_clip_fraction"]
    assert clip.steps.max() <= 200  # clipping telemetry stops where the run continued without clipping


# ---------------------------------------------------------------------------------------------------- device move
# The GPU's fastest settings (CUDA graphs keep Adam's state capturable on the GPU; a CUDA buffer) and the CPU's own
# (no graphs; channels_last convolutions; a CPU buffer): the two most different layouts a checkpoint can move between.
ON_GPU = ("--trainer.accelerator", "gpu", "--model.cuda_graphs", "true", "--data.buffer_device", "cuda")
ON_CPU = ("--trainer.accelerator", "cpu", "--model.cuda_graphs", "false", "--data.buffer_device", "cpu")


@needs_gpu
def test_a_checkpoint_moves_from_the_gpu_to_the_cpu_and_back(tmp_path: Path) -> None:
    config = run_config(tmp_path, env_id="lit_td3/CarRacing-v3", total=100, every=50, episode_steps=25,
                        learning_starts=25, data={"async_envs": False, **SMALL_PIXELS})
    folder = checkpoints_of(config)
    legs = [(ON_GPU, 100), (ON_CPU, 150), (ON_GPU, 200)]
    saved = []
    for leg, (device, total) in enumerate(legs):
        resume = ("--ckpt_path", "last") if leg else ()
        done = fit(config, *device, "--data.total_env_steps", str(total), *resume)
        assert done.returncode == 0, done.stderr[-3000:]
        if leg:
            assert f"(env step {legs[leg - 1][1]})" in done.stderr
        saved.append(load(folder / "last.ckpt"))
        shutil.copy(folder / f"replay_buffer-env_step={total}.pt", tmp_path / f"buffer_{total}.pt")

    for (before, after), (_, total) in zip(itertools.pairwise(saved), legs[1:]):
        assert after["lit_td3"]["counters"]["env_steps"] == total
        for counter in ("critic_updates", "actor_updates"):
            assert after["lit_td3"]["counters"][counter] > before["lit_td3"]["counters"][counter]
        weights = after["state_dict"]
        assert all(torch.isfinite(value).all() for value in weights.values())
        first_conv = "actor.encoder.cnn.convs.0.weight"
        assert not torch.equal(weights[first_conv], before["state_dict"][first_conv])  # trained on from the loaded
    # each leg's buffer holds the one before it unchanged, then its own 50 transitions
    for (_, before), (_, after) in itertools.pairwise(legs):
        previous, current = (ReplayBuffer.from_file(tmp_path / f"buffer_{n}.pt") for n in (before, after))
        assert len(current) == len(previous) + 50
        kept = torch.arange(len(previous))
        torch.testing.assert_close(tuple(current.get(kept)), tuple(previous.get(kept)), rtol=0, atol=0)
    # each leg trained in its own layout: a convolution's Adam moments are channels_last on the CPU only
    conv_moments = [[state["exp_avg"] for optimizer in checkpoint["optimizer_states"]
                     for state in optimizer["state"].values() if state["exp_avg"].dim() == 4]
                    for checkpoint in saved]
    assert [len(leg) for leg in conv_moments] == [2 * 3] * 3  # actor and critic encoders, three convolutions each
    assert [{is_channels_last(moment) for moment in leg} for leg in conv_moments] == [{False}, {True}, {False}]

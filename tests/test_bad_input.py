"""Bad input: every case exits non-zero with a message naming the field, before any env is built.

The CLI runs in this process (``lit_td3.cli.main``), with env construction made impossible: an error that came
after an env was touched would surface as that AssertionError, not as the expected exit.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
import yaml

import lit_td3.data
from lit_td3.cli import main

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "configs" / "td3.yaml")
SMALL = {"model": {"network": {"hidden_sizes": [32, 32]}, "log_every_n_env_steps": 20},
         "data": {"env_id": "Pendulum-v1", "async_envs": False, "total_env_steps": 40, "learning_starts": 32,
                  "batch_size": 32, "max_episode_steps": 20, "eval_episodes": 0}}


def write_config(folder: Path, extra: dict | None = None, text: str | None = None) -> Path:
    config = yaml.safe_load(yaml.safe_dump(SMALL))
    config["trainer"] = {"default_root_dir": str(folder / "run"), "enable_progress_bar": False,
                         "callbacks": [{"class_path": "callbacks.EnvStepCheckpoint",
                                        "init_args": {"every_n_env_steps": 20}}]}
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config) if text is None else text)
    return path


def fails(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Runs the CLI, which must exit with code 2; returns what it printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")  # what the CLI's seed_everything leaves in os.environ


@pytest.fixture(autouse=True)
def no_leaked_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SEED_VARIABLES:
        monkeypatch.delenv(name, raising=False)  # and restored after the test: later subprocesses must not inherit it


@pytest.fixture
def no_envs(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an env was built")

    monkeypatch.setattr(lit_td3.data, "make_env", refuse)
    monkeypatch.setattr(gym, "make", refuse)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.gamma", "abc"], 'Parser key "model.gamma"'),  # wrong type
        (["--data.batch_size", "1.5"], 'Parser key "data.batch_size"'),
        (["--model.gamma", "1.0"], "model.gamma=1.0: expected a discount in [0, 1)"),
        (["--model.tau", "0"], "model.tau=0.0: expected a Polyak rate in (0, 1]"),
        (["--model.tau", "1.5"], "model.tau=1.5: expected a Polyak rate in (0, 1]"),
        (["--model.critic_mlp_lr", "-0.001"], "model.critic_mlp_lr=-0.001: expected a positive learning rate"),
        (["--model.gradient_clipping.actor_max_norm", "-1"],
         "model.gradient_clipping.actor_max_norm=-1.0: expected a positive norm"),
        (["--data.buffer_size", "16"], "data.batch_size=32: expected between 1 and data.buffer_size=16"),
        (["--data.learning_starts", "0"],
         "data.batch_size=32: expected at most data.learning_starts=0, or the first update would sample an unfilled"),
        # under DDP each rank's shard holds half the random steps when the first update samples it: refused before
        # the trainer launches the second rank
        (["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
         ("data.batch_size=32: expected at most data.learning_starts=32 / 2 ranks = 16, or the first update would "
          "sample an unfilled buffer (each rank samples only its own shard)")),
        # Lightning's own DDP strategies wrap the whole module: refused, the default's pick for 2 devices included
        (["--trainer.devices", "2", "--trainer.accelerator", "cpu"],
         "trainer.strategy='auto' (DDPStrategy): expected 'ddp' to train on several devices or nodes"),
        (["--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2", "--trainer.accelerator",
          "cpu"],
         "trainer.strategy='ddp_find_unused_parameters_true' (DDPStrategy): expected 'ddp'"),
        (["--data.env_id", "Pendulm-v1"], ("data.env_id='Pendulm-v1' is not a registered gymnasium env: "
                                           "Environment `Pendulm` doesn't exist. Did you mean: `Pendulum`?")),
        (["--data.env_id", "no_such_pkg.envs:MyEnv-v0"],
         "data.env_id='no_such_pkg.envs:MyEnv-v0': module 'no_such_pkg.envs' cannot be imported"),
        (["--data.env_id", "lit_td3.envs:Pendulm-v1"],  # the module imports, the id is still unknown
         ("data.env_id='lit_td3.envs:Pendulm-v1' is not a registered gymnasium env: "
          "Environment `Pendulm` doesn't exist")),
        (["--float32_matmul_precision", "low"], 'Parser key "float32_matmul_precision"'),
        (["--trainer.max_steps", "1000"],
         "trainer.max_steps=1000: expected unset: a lit_td3 run is counted in env steps, set data.total_env_steps"),
        (["--ckpt_path", "/no/such/run/last.ckpt"], "checkpoint '/no/such/run/last.ckpt' does not exist"),
        (["--model.cuda_graphs", "true", "--trainer.accelerator", "cpu"],
         "model.cuda_graphs=true needs a CUDA device (this run trains on 'cpu'"),
        (["--model.cuda_graphs", "true", "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed"],
         "; and precision 32-true or 64-true (this run: 'bf16-mixed'"),
    ],
)
def test_bad_values_name_the_field_before_any_env(tmp_path: Path, capsys: pytest.CaptureFixture, no_envs: None,
                                                   args: list[str], expected: str) -> None:
    stderr = fails(capsys, "--config", BASE, "--config", str(write_config(tmp_path)), *args)
    assert expected in stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"modle": {"gamma": 0.9}}, "does not accept option 'modle.gamma'"),
        ({"data": {"env_idd": "Pendulum-v1"}}, "does not accept option 'data.env_idd'"),
        ({"model": {"gradient_clipping": {"enbled": False}}}, "Option 'enbled' is not accepted"),
        ({"trainer": {"callbacks": [{"class_path": "callbacks.EnvStepCheckpoint",
                                     "init_args": {"every_n_env_step": 5}}]}},
         "Option 'every_n_env_step' is not accepted"),
    ],
)
def test_unknown_keys_at_any_depth_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        no_envs: None, extra: dict, expected: str) -> None:
    stderr = fails(capsys, "--config", BASE, "--config", str(write_config(tmp_path, extra)))
    assert expected in stderr
    if "gradient_clipping" in str(extra):
        assert 'Parser key "model.gradient_clipping"' in stderr
    if "trainer" in extra:
        assert 'Parser key "trainer.callbacks"' in stderr and "callbacks.EnvStepCheckpoint" in stderr


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                no_envs: None) -> None:
    config = write_config(tmp_path, text="model:\n  gamma: 0.9\n  tau: [0.005\n")
    stderr = fails(capsys, "--config", BASE, "--config", str(config))
    assert f"--config {config}: not valid YAML" in stderr and "line 3" in stderr


# ---------------------------------------------------------------------------------------------------- shapes
@pytest.fixture(scope="module")
def pendulum_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pendulum")
    with pytest.MonkeyPatch.context() as patch:
        for name in SEED_VARIABLES:
            patch.delenv(name, raising=False)
        main(["fit", "--config", BASE, "--config", str(write_config(folder))])
    return folder / "run" / "checkpoints" / "env_step=40.ckpt"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # LunarLander: 8 observations, 2 actions; the checkpoint's Pendulum: 3 and 1
        (["--data.env_id", "LunarLanderContinuous-v3"],
         ["its observation_shapes {'vector': [3]} (this run: {'vector': [8]})", "its action_dim 1 (this run: 2)"]),
        (["--model.network.hidden_sizes", "[64, 64]"], ["'hidden_sizes': [32, 32]", "'hidden_sizes': [64, 64]"]),
    ],
)
def test_a_checkpoint_of_other_shapes_is_refused_before_anything_is_loaded(
        tmp_path: Path, capsys: pytest.CaptureFixture, pendulum_checkpoint: Path, args: list[str],
        expected: list[str]) -> None:
    before = pendulum_checkpoint.read_bytes()
    stderr = fails(capsys, "--config", BASE, "--config", str(write_config(tmp_path)), "--ckpt_path",
                   str(pendulum_checkpoint), *args)
    assert f"checkpoint '{pendulum_checkpoint}' does not fit this run's env and model" in stderr
    assert all(part in stderr for part in expected), stderr[-2000:]
    assert pendulum_checkpoint.read_bytes() == before
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not list((tmp_path / "run").rglob("*.pt"))

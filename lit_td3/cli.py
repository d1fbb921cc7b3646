"""``python -m lit_td3``: LightningCLI over ``TD3Module`` and ``RolloutDataModule``.

Every artifact of a run lives under ``trainer.default_root_dir``: TensorBoard event files in the folder itself (no
``version_N``), checkpoints and replay-buffer files in ``checkpoints/``, the resolved ``config.yaml`` beside them. So
``--ckpt_path last`` finds the same run's latest good checkpoint every time.

Bad configuration fails with one paragraph naming the field and value, before any env is built (exit code 2).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Any, Literal

import torch
import yaml
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lit_td3.checkpoints import CheckpointError, checkpoint_dir, resolve_checkpoint
from lit_td3.config import ConfigError, check
from lit_td3.data import RolloutDataModule
from lit_td3.distributed import TD3DDPStrategy, check_strategy
from lit_td3.envs.carla.server import SimulatorUnavailableError
from lit_td3.files import CheckpointWriteError
from lit_td3.graphs import check_cuda_graphs
from lit_td3.module import NonFiniteTrainingError, TD3Module

DEFAULT_ROOT_DIR = "runs/td3"
SWITCHED_CALLBACKS = {"enable_progress_bar": "ProgressBar", "enable_checkpointing": "Checkpoint"}
"""Trainer switches, and the class-name ending of the configured callbacks that each one turns off."""


class TD3CLI(LightningCLI):
    """LightningCLI with lit_td3's defaults: a stable run folder, env-step cadences, no sanity validation."""

    def __init__(self, args: Any = None, run: bool = True) -> None:
        super().__init__(
            TD3Module,
            RolloutDataModule,
            # Resuming writes into the same run folder, so its config.yaml is rewritten (LIGHTNING_NOTES 11).
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "default_root_dir": DEFAULT_ROOT_DIR,
                "max_epochs": -1,  # the run ends at data.total_env_steps, when the stream stops the trainer
                "num_sanity_val_steps": 0,
                "log_every_n_steps": 1,
                "enable_model_summary": True,
            },
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--float32_matmul_precision", type=Literal["highest", "high", "medium"], default="highest",
            help="torch.set_float32_matmul_precision for the whole run, set before anything is built: 'high' lets "
                 "float32 matmuls use TF32 tensor cores (Ampere and newer GPUs: about 10%% off a graphed pixel update "
                 "on an H200, at TF32's 10-bit mantissa); 'highest' keeps full float32.")

    def _parse_ckpt_path(self) -> None:
        """Keeps the configured model settings: Lightning's version overwrites them with a checkpoint's hyperparameters.

        In lit_td3 the config decides the training settings of a resumed run (the original report's rollback plan:
        clipping off, other learning rates or noise), and a checkpoint must fit the configured shapes, which
        ``TD3Module.on_load_checkpoint`` checks; ``--ckpt_path`` is resolved in ``before_instantiate_classes``.
        """

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or DEFAULT_ROOT_DIR
        config.trainer.default_root_dir = root
        torch.set_float32_matmul_precision(config.float32_matmul_precision)
        # LIGHTNING_NOTES 1: Lightning's step limit is not the run's length.
        check("trainer.max_steps", config.trainer.max_steps, config.trainer.max_steps in (None, -1),
              "unset: a lit_td3 run is counted in env steps, set data.total_env_steps (Lightning's max_steps counts "
              "optimizer steps, two per TD3 update when the actor steps)")
        if config.trainer.logger in (None, True):
            config.trainer.logger = {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": root, "name": "", "version": "", "default_hp_metric": False},
            }
        if config.model.cuda_graphs:
            _check_cuda_graphs_request(config.trainer, bool(config.model.compile))
        if config.trainer.strategy == "ddp":
            # Lightning's DDP wraps the whole module, and each TD3 backward leaves one network without gradients.
            config.trainer.strategy = TD3DDPStrategy.strategy_name
        for switch, kind in SWITCHED_CALLBACKS.items():
            if config.trainer.get(switch) is False and config.trainer.callbacks:
                # One switch turns the feature off, whichever callback of that kind the config plugged in (Lightning
                # refuses a checkpoint callback with checkpointing off).
                config.trainer.callbacks = [c for c in config.trainer.callbacks
                                            if not str(c.get("class_path", "")).endswith(kind)]
        if self.subcommand and config.get("ckpt_path"):
            config.ckpt_path = resolve_checkpoint(config.ckpt_path, checkpoint_dir(root))

    def before_fit(self) -> None:
        # The trainer knows its strategy and ranks before it launches them: refuse what cannot train while no process,
        # GPU or env has started (TD3Module and the data module check again in setup, for runs outside the CLI).
        check_strategy(self.trainer.strategy, self.config[self.subcommand].trainer.strategy)
        self.datamodule.check_first_batch(self.trainer.world_size)


EXIT_CODES = {"bad input": 2, "non-finite training": 3, "simulator unavailable": 4, "write failed": 5,
              "terminated": 128 + signal.SIGTERM}


def main(args: Any = None) -> None:
    """Entry point; user-facing failures print one paragraph and exit non-zero instead of a traceback.

    Exit codes: 2 bad configuration or checkpoint, 3 too many non-finite updates, 4 simulator unavailable, 5 a
    checkpoint or buffer file could not be written (disk full), 143 SIGTERM (after writing a checkpoint);
    ``docs/reliability.md`` says what each leaves behind.
    """
    try:
        _check_config_files(sys.argv[1:] if args is None else args)
        TD3CLI(args=args)
    except (ConfigError, CheckpointError) as err:
        _exit("error", err, EXIT_CODES["bad input"])
    except NonFiniteTrainingError as err:
        _exit("stopped", err, EXIT_CODES["non-finite training"])
    except SimulatorUnavailableError as err:
        _exit("stopped", err, EXIT_CODES["simulator unavailable"])
    except CheckpointWriteError as err:
        _exit("stopped", err, EXIT_CODES["write failed"])
    except SIGTERMException:
        # Lightning's SIGTERMException is a SystemExit with code None: the run would end as if it had finished.
        _exit("stopped", "SIGTERM received (callbacks.EnvStepCheckpoint has saved the current state if training had "
              "started): continue with --ckpt_path last", EXIT_CODES["terminated"])
    except ValueError as err:
        # Constructors check their arguments: a ValueError while the config becomes objects is a bad value
        # (jsonargparse wraps some in its own; the innermost one names the field).
        if not any(frame.name == "instantiate_classes" for frame in traceback.extract_tb(err.__traceback__)):
            raise
        _exit("error", _innermost(err), EXIT_CODES["bad input"])


def _exit(kind: str, err: BaseException | str, code: int) -> None:
    print(f"lit_td3: {kind}: {err}", file=sys.stderr)
    sys.exit(code)


def _innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _check_cuda_graphs_request(trainer: Any, compile: bool) -> None:
    """``model.cuda_graphs`` against the configured trainer, before anything is built (``TD3Module.setup`` checks the
    trainer Lightning actually made)."""
    cuda = str(trainer.accelerator or "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    devices = trainer.devices if trainer.devices is not None else "auto"
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif str(devices).strip() in ("auto", "-1"):
        count = torch.cuda.device_count() if cuda else 1
    elif "," in str(devices):
        count = len([d for d in str(devices).split(",") if d.strip()])
    else:
        count = int(devices) if str(devices).strip().isdigit() else 1  # anything else: TD3Module.setup decides
    check_cuda_graphs(torch.device("cuda" if cuda else "cpu"), count * int(trainer.num_nodes or 1),
                      str(trainer.precision or "32-true"), compile)


def _check_config_files(args: Any) -> None:
    """Names the file and line of a malformed ``--config`` YAML (jsonargparse's own message names neither)."""
    if not isinstance(args, (list, tuple)):
        return
    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else None
        if isinstance(arg, str) and arg.startswith("--config="):
            path = arg.removeprefix("--config=")
        if not isinstance(path, str) or not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML: {' '.join(str(err).split())}") from None



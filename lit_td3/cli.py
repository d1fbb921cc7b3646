"""``python -m lit_td3``: LightningCLI over ``TD3Module`` and ``RolloutDataModule``.

Every artifact of a run lives under ``trainer.default_root_dir``: TensorBoard event files in the folder itself (no
``version_N``), checkpoints and replay-buffer files in ``checkpoints/``, the resolved ``config.yaml`` beside them. So
``--ckpt_path last`` finds the same run's latest good checkpoint every time.

Bad configuration fails with one paragraph naming the field and value, before any env is built (exit code 2).
"""

from __future__ import annotations

import sys
from typing import Any

from pytorch_lightning.cli import LightningCLI

from lit_td3.checkpoints import CheckpointError, checkpoint_dir, resolve_checkpoint
from lit_td3.config import ConfigError
from lit_td3.data import RolloutDataModule
from lit_td3.envs.carla.server import SimulatorUnavailableError
from lit_td3.module import NonFiniteTrainingError, TD3Module

DEFAULT_ROOT_DIR = "runs/td3"


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

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or DEFAULT_ROOT_DIR
        config.trainer.default_root_dir = root
        if config.trainer.logger in (None, True):
            config.trainer.logger = {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": root, "name": "", "version": "", "default_hp_metric": False},
            }
        if config.trainer.strategy == "ddp":
            # The actor steps every policy_freq-th batch: in the others its parameters get no gradient, which plain
            # DDP takes for an error (Lightning issues #20328, #20866).
            config.trainer.strategy = "ddp_find_unused_parameters_true"
        if config.trainer.enable_progress_bar is False and config.trainer.callbacks:
            # One switch turns the display off, whichever progress-bar callback the config plugged in.
            config.trainer.callbacks = [c for c in config.trainer.callbacks
                                        if not str(c.get("class_path", "")).endswith("ProgressBar")]
        if self.subcommand and config.get("ckpt_path"):
            config.ckpt_path = resolve_checkpoint(config.ckpt_path, checkpoint_dir(root))


def main(args: Any = None) -> None:
    """Entry point; user-facing failures print one paragraph and exit non-zero instead of a traceback."""
    try:
        TD3CLI(args=args)
    except (ConfigError, CheckpointError) as err:
        print(f"lit_td3: error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteTrainingError as err:
        print(f"lit_td3: stopped: {err}", file=sys.stderr)
        sys.exit(3)
    except SimulatorUnavailableError as err:
        print(f"lit_td3: stopped: {err}", file=sys.stderr)
        sys.exit(4)



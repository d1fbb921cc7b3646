"""A fit of DEVICES ranks started from Python with ``TD3DDPStrategy(start_method=METHOD)``, as a script or a notebook
would start one; run as a subprocess by tests/test_ddp.py. After the fit, the main process saves its own module's
weights and counters to OUT.

    python -m tests.python_api_fit METHOD ACCELERATOR DEVICES OUT CONFIG...
"""

from __future__ import annotations

import dataclasses
import sys

import pytorch_lightning as pl
import torch

from lit_td3.cli import TD3CLI
from lit_td3.distributed import TD3DDPStrategy


def main(method: str, accelerator: str, devices: int, out: str, configs: list[str]) -> None:
    cli = TD3CLI(args=[arg for config in configs for arg in ("--config", config)], run=False)
    trainer = pl.Trainer(strategy=TD3DDPStrategy(start_method=method), accelerator=accelerator, devices=devices,
                         max_epochs=-1, num_sanity_val_steps=0, enable_progress_bar=False, logger=cli.trainer.logger,
                         default_root_dir=cli.trainer.default_root_dir, callbacks=cli.trainer.callbacks)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    torch.save({"state_dict": cli.model.state_dict(), "counters": dataclasses.asdict(cli.model.counters)}, out)


if __name__ == "__main__":  # spawn imports this module again in every rank
    method, accelerator, devices, out, *configs = sys.argv[1:]
    del sys.argv[1:]  # not LightningCLI's arguments: it takes the configs as args
    main(method, accelerator, int(devices), out, configs)

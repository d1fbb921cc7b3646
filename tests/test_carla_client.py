"""The real ``carla`` client against a closed local port, alone and behind ``python -m lit_td3 fit``.

No CARLA server runs on these machines, so this is the one place where the wheel's own networking code is exercised:
its time-out must reach the user as the clear "no server" error naming host:port and the launch command, never as
a traceback from inside the client. Skipped where the ``carla`` wheel is not installed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lit_td3.envs.carla import (
    CarlaLaneKeepingEnv,
    ServerNotRunningError,
    SimulatorUnavailableError,
)
from lit_td3.envs.carla.server import free_port

REPO = Path(__file__).resolve().parents[1]


def test_real_client_time_out_becomes_the_clear_error() -> None:
    carla = pytest.importorskip("carla")
    assert carla.Client.__module__.startswith("carla")  # the wheel's client, not the stand-in
    port = free_port()  # nothing listens there
    env = CarlaLaneKeepingEnv(server={"host": "127.0.0.1", "port": port, "timeout_s": 1.0})
    try:
        with pytest.raises(ServerNotRunningError) as caught:
            env.reset()
    finally:
        env.close()
    message = str(caught.value)
    assert f"no CARLA server answered at 127.0.0.1:{port} within 1 s" in message
    assert f"./CarlaUE4.sh -RenderOffScreen -carla-rpc-port={port}" in message
    assert "time-out of 1000ms while waiting for the simulator" in message  # the wheel's own words, kept
    assert isinstance(caught.value, SimulatorUnavailableError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no client traceback chained


def test_fit_without_a_server_exits_with_the_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("carla")
    config = yaml.safe_load((REPO / "configs" / "carla.yaml").read_text())
    port = free_port()
    config["data"]["env_kwargs"]["server"].update(port=port, timeout_s=2.0)
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    layered = tmp_path / "carla_no_server.yaml"
    layered.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "lit_td3", "fit", "--config", "configs/td3.yaml", "--config", str(layered)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )
    print(f"fit without a server exited with {out.returncode} after {time.monotonic() - started:.1f} s")
    assert out.returncode != 0
    last_line = [line for line in out.stderr.splitlines() if line.strip()][-1]
    assert f"no CARLA server answered at localhost:{port}" in last_line  # the run ends on the clear message
    assert f"./CarlaUE4.sh -RenderOffScreen -carla-rpc-port={port}" in last_line
    # gymnasium logs the worker's traceback as a warning; the trainer process itself must not die of one
    assert "<frozen runpy>" not in out.stderr, out.stderr[-3000:]

"""The CARLA server as seen from one env: reaching it, (re)starting its process, and the retry budget.

``Supervisor`` turns the client's raw failures into errors a user can act on (naming host, port and the launch
command), launches and restarts the server process when ``server.command`` is configured, and paces recoveries with
``RestartBudget``. The world inside the server (settings, actors) is ``world.py``'s business, not this module's.
This module never imports ``carla`` itself: the caller hands in the client module, so nothing loads the wheel before
the first connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from types import ModuleType
from typing import Any

from lit_td3.envs.carla.config import ROOT, RestartConfig, ServerConfig

log = logging.getLogger(__name__)

SUPPORTED_VERSION = "0.9.16"


class SimulatorUnavailableError(RuntimeError):
    """No usable CARLA server: none at start, or the restart budget is spent. The message names host and port.

    Constructible from one message string: gymnasium's AsyncVectorEnv re-raises a worker's error as ``type(e)(msg)``.
    """


class ServerNotRunningError(SimulatorUnavailableError):
    """Nothing answered at host:port when the env first connected."""


class TrafficManagerPortError(SimulatorUnavailableError):
    """The Traffic Manager port is held by another process and ``server.tm_port_in_use`` is ``fail``."""


def launch_hint(host: str, port: int) -> str:
    return (
        f"start CARLA {SUPPORTED_VERSION} on {host} with `./CarlaUE4.sh -RenderOffScreen -carla-rpc-port={port}` "
        f"(it also uses ports {port + 1} and {port + 2}), or set {ROOT}.server.command so the env starts it"
    )


# ------------------------------------------------------------------------------------------------- ports
def port_accepts(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def port_bindable(port: int) -> bool:
    """Whether this machine could open a listening socket on ``port`` (what the Traffic Manager does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The TM's RPC server sets SO_REUSEADDR too: a port lingering in TIME_WAIT is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the OS reports free right now (from its ephemeral range, away from the configured strides)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------------- retry budget
class RestartBudget:
    """Consecutive attempts with exponential backoff, plus a cap on recoveries over the env's life."""

    def __init__(self, config: RestartConfig) -> None:
        self.config = config
        self.recoveries = 0

    def delay_s(self, failed_attempts: int) -> float:
        """Wait before attempt ``failed_attempts + 1``."""
        c = self.config
        return min(c.backoff_s * c.backoff_factor ** max(failed_attempts - 1, 0), c.backoff_max_s)

    def spent(self, failed_attempts: int) -> bool:
        return failed_attempts >= self.config.attempts

    def lifetime_spent(self) -> bool:
        return self.recoveries >= self.config.max_recoveries


# ------------------------------------------------------------------------------------------------- supervisor
class Supervisor:
    """Connects env ``env_index`` to its server, and launches or restarts the server process if configured."""

    def __init__(self, config: ServerConfig, env_index: int) -> None:
        self.config = config
        self.env_index = env_index
        self.host = config.host
        self.port = config.rpc_port(env_index)
        self.process: subprocess.Popen[bytes] | None = None
        self.launches = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self, carla: ModuleType) -> Any:
        """The first connection: launches the server first if configured and nothing listens on its port.

        Raises ``ServerNotRunningError`` naming host:port and how to start a server, after ``server.timeout_s``.
        """
        if self.config.command is not None and not port_accepts(self.host, self.port):
            self.start_process()
        return self._client(carla, ServerNotRunningError)

    def reconnect(self, carla: ModuleType) -> Any:
        """After a fault: the same server if it still answers, else (with ``server.command``) a restarted one.

        Launches at most once per call, so each recovery attempt costs one server start.
        """
        if self.config.command is None:
            return self._client(carla, SimulatorUnavailableError)
        if port_accepts(self.host, self.port):
            try:
                return self._client(carla, SimulatorUnavailableError)
            except SimulatorUnavailableError as err:
                log.warning("%s; restarting the server", err)
        self.start_process()  # dead, or listening but not answering: either way a fresh process
        return self._client(carla, SimulatorUnavailableError)

    def _client(self, carla: ModuleType, error: type[SimulatorUnavailableError]) -> Any:
        client = carla.Client(self.host, self.port)
        client.set_timeout(self.config.timeout_s)
        try:
            server_version = client.get_server_version()
        except RuntimeError as err:
            raise error(
                f"no CARLA server answered at {self.address} within {self.config.timeout_s:g} s "
                f"({ROOT}.server.timeout_s); {launch_hint(self.host, self.port)}. Client said: {err}"
            ) from None
        if server_version != client.get_client_version():
            log.warning("CARLA server at %s runs %s, the client is %s: expect RPC errors",
                        self.address, server_version, client.get_client_version())
        return client

    def start_process(self) -> None:
        """(Re)starts the configured server and waits until its RPC port accepts connections."""
        self.stop_process()
        command = [part.format(port=self.port, env_index=self.env_index) for part in self.config.command or ()]
        log_path = os.path.join(self.config.log_dir or tempfile.gettempdir(), f"carla_server_{self.port}.log")
        log.warning("starting CARLA server for env %d: %s (output in %s)", self.env_index, " ".join(command), log_path)
        with open(log_path, "ab") as out:
            try:
                # Own session: a Ctrl+C in the trainer's terminal must not kill the server before the env has put
                # its world back to asynchronous mode; stop_process() ends the whole group (CarlaUE4.sh forks).
                self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as err:
                raise SimulatorUnavailableError(
                    f"could not start the CARLA server for {self.address} with {command}: {err}"
                ) from None
        self.launches += 1
        self._wait_for_port(log_path)

    def _wait_for_port(self, log_path: str) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if port_accepts(self.host, self.port, timeout_s=0.2):
                return
            if self.process is not None and self.process.poll() is not None:
                raise SimulatorUnavailableError(
                    f"the CARLA server command for {self.address} exited with code {self.process.returncode} "
                    f"before opening its port; see {log_path}"
                )
            time.sleep(0.1)
        raise SimulatorUnavailableError(
            f"the CARLA server for {self.address} did not open its port within "
            f"{self.config.startup_timeout_s:g} s ({ROOT}.server.startup_timeout_s); see {log_path}"
        )

    def stop_process(self, grace_s: float = 10.0) -> None:
        """Stops the server process this env launched (its whole process group), if any."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def close(self) -> None:
        if self.config.stop_on_close:
            self.stop_process()

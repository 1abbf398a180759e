"""Finding a broker: the configured cluster, or an embedded broker started by `sipstream broker`.

`sipstream broker` records its address in `$SIPSTREAM_HOME/broker.json` (default ~/.sipstream) so that
workers and `topics` commands started later, without `bus.bootstrap_servers`, find it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

from sipstream.bus import topics as T
from sipstream.bus.broker import EmbeddedBroker, port_open
from sipstream.bus.client import check_reachable
from sipstream.config import Config
from sipstream.errors import BrokerError
from sipstream.telemetry.logs import get_logger


def state_path() -> Path:
    home = os.environ.get("SIPSTREAM_HOME") or Path.home() / ".sipstream"
    return Path(home) / "broker.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def running_embedded_broker() -> str | None:
    """Bootstrap address of a live broker started by `sipstream broker`, if any."""
    try:
        state = json.loads(state_path().read_text())
        host, port = state["bootstrap_servers"].rsplit(":", 1)
    except (OSError, ValueError, KeyError):
        return None
    if _pid_alive(int(state.get("pid", -1))) and port_open(host, int(port)):
        return state["bootstrap_servers"]
    return None


def resolve_bootstrap(cfg: Config) -> str:
    """The cluster to talk to, or a clear error that says how to get one."""

    bootstrap = cfg.bus.bootstrap_servers or running_embedded_broker()
    if bootstrap is None:
        raise BrokerError(
            "no broker: start one with `sipstream broker` (in another terminal), "
            "or set bus.bootstrap_servers / --bootstrap-servers to a Kafka cluster"
        )
    check_reachable(cfg.bus, bootstrap)
    return bootstrap


def run_broker(cfg: Config, create_topics: bool = True) -> None:
    """Start the embedded broker, print its address, block until SIGINT/SIGTERM, stop it."""

    log = get_logger(component="broker")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    broker = EmbeddedBroker(cfg.bus.embedded)
    bootstrap = broker.start()
    path = state_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"bootstrap_servers": bootstrap, "pid": os.getpid(), "storage": cfg.bus.embedded.storage}))
        if create_topics:
            T.create_topics(cfg.bus, bootstrap, T.load_specs(T.topics_dir(cfg.bus)))
        print(f"embedded broker ready at {bootstrap} (storage {cfg.bus.embedded.storage}); Ctrl-C to stop", flush=True)
        log.info("broker started", bootstrap_servers=bootstrap, log=broker.log_path)
        while not stop.wait(0.5):
            if not broker.alive():
                raise BrokerError(f"embedded broker exited unexpectedly; its log: {broker.log_path}")
    finally:
        broker.stop()
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
        print("embedded broker stopped", flush=True)

"""A worker's or the learner's health and metrics over HTTP, for Kubernetes probes and Prometheus.

    GET /livez    200 while the poll loop keeps turning (a beat within `stale_after_s`), else 503
    GET /readyz   200 once the loop has turned at least once and until shutdown begins, else 503
    GET /metrics  the process's Prometheus metrics (`sipstream.telemetry.metrics`: names, types, labels)

Liveness is "the loop is not stuck", not "there is work": an idle worker beats every
`runner.batch_timeout_s`. During one long batch (model calls) there is no beat, so `stale_after_s`
must exceed the slowest batch; Kubernetes' own failureThreshold adds to it. Before the first beat
(models still loading) /livez answers 200 "starting": a startupProbe, not liveness, bounds that phase.

The server binds 127.0.0.1 by default, so nothing is exposed on a laptop; deployments set
`runner.health_host=0.0.0.0` because the kubelet and Prometheus reach the pod's IP. It runs in a
daemon thread (stdlib http.server) and never touches Kafka, so a slow scrape cannot stall the loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MetricsFn = Callable[[], bytes]
"""Returns the Prometheus exposition text (`ProcessMetrics.text`)."""
# The text format prometheus-client's generate_latest() writes (prometheus_client.CONTENT_TYPE_LATEST).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Health:
    """What the loop reports (beats, shutdown) and what the probes read. Thread-safe enough: a float
    and two bools are written by one thread and read by others."""

    def __init__(self, stale_after_s: float = 900.0) -> None:
        self.stale_after_s = stale_after_s
        self._last_beat: float | None = None
        self._stopping = False

    def beat(self) -> None:
        """Call once per loop iteration."""
        self._last_beat = time.monotonic()

    def stopping(self) -> None:
        """Shutdown has begun: readiness drops so no new traffic/attention is routed here."""
        self._stopping = True

    def live(self) -> tuple[bool, str]:
        if self._last_beat is None:
            return True, "starting"
        age = time.monotonic() - self._last_beat
        if age > self.stale_after_s:
            return False, f"no loop iteration for {age:.0f}s (limit {self.stale_after_s:.0f}s)"
        return True, f"last beat {age:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "stopping"
        if self._last_beat is None:
            return False, "starting"
        return self.live()


class HealthServer:
    """The HTTP server thread. `beat()`/`close()` forward to the shared `Health`."""

    def __init__(self, health: Health, host: str, port: int, metrics: MetricsFn | None) -> None:
        self.health = health
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/livez":
                    ok, why = owner.health.live()
                    self._reply(200 if ok else 503, why + "\n")
                elif path == "/readyz":
                    ok, why = owner.health.ready()
                    self._reply(200 if ok else 503, why + "\n")
                elif path == "/metrics" and metrics is not None:
                    try:
                        body = metrics()
                    except Exception as exc:
                        self._reply(500, f"metrics unavailable: {exc!r}\n")
                        return
                    self._reply(200, body, METRICS_CONTENT_TYPE)
                else:
                    self._reply(404, "not found: try /livez, /readyz, /metrics\n")

            def _reply(self, code: int, body: str | bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                data = body if isinstance(body, bytes) else body.encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # probes every few seconds are not news
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="sipstream-health", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self.health.beat()

    def close(self) -> None:
        self.health.stopping()
        self._server.shutdown()
        self._server.server_close()


class _NoHealth:
    """What `start_health_server` returns when no port is configured: every call is a no-op."""

    port = None

    def beat(self) -> None:
        pass

    def close(self) -> None:
        pass


def start_health_server(
    port: int | None,
    host: str = "127.0.0.1",
    metrics: MetricsFn | None = None,
    stale_after_s: float = 900.0,
) -> HealthServer | _NoHealth:
    """Serve /livez, /readyz, /metrics on `host:port` (0: a free port) in a daemon thread; `port=None`
    serves nothing and returns an object whose `beat()`/`close()` do nothing, so callers need no `if`."""
    if port is None:
        return _NoHealth()
    return HealthServer(Health(stale_after_s), host, port, metrics)

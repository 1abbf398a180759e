"""sipstream.telemetry.health: probes and a process's Prometheus metrics over a real local HTTP server."""

from __future__ import annotations

import urllib.error
import urllib.request

from sipstream.telemetry.health import Health, start_health_server
from sipstream.telemetry.metrics import ProcessMetrics


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_probes_follow_the_loop() -> None:
    metrics = ProcessMetrics("worker", run="exp1", stage="rollout")
    metrics.inc("sipstream_records_consumed_total", 3, topic="sip.rewritten")
    metrics.sync_total("sipstream_stage_events_total", 1, event="weights_loaded")
    metrics.set("sipstream_policy_version", 4)
    server = start_health_server(0, metrics=metrics.text, stale_after_s=0.3)
    try:
        assert server.host == "127.0.0.1"  # loopback unless a deployment says otherwise
        assert _get(server.port, "/livez") == (200, "starting\n")  # models may still be loading
        assert _get(server.port, "/readyz")[0] == 503
        server.beat()
        assert _get(server.port, "/livez")[0] == 200
        assert _get(server.port, "/readyz")[0] == 200
        status, body = _get(server.port, "/metrics")
        assert status == 200
        assert 'sipstream_records_consumed_total{run="exp1",stage="rollout",topic="sip.rewritten"} 3.0' in body
        assert 'sipstream_stage_events_total{event="weights_loaded",run="exp1",stage="rollout"} 1.0' in body
        assert 'sipstream_policy_version{run="exp1",stage="rollout"} 4.0' in body
        assert "# TYPE sipstream_batch_duration_seconds histogram" in body
        assert _get(server.port, "/nope")[0] == 404
        import time

        time.sleep(0.4)  # no beat for longer than stale_after_s: the loop is stuck
        status, body = _get(server.port, "/livez")
        assert status == 503 and "no loop iteration" in body
        assert _get(server.port, "/readyz")[0] == 503
    finally:
        server.close()


def test_readiness_drops_at_shutdown() -> None:
    health = Health(stale_after_s=60)
    health.beat()
    assert health.ready()[0]
    health.stopping()
    assert health.ready() == (False, "stopping")
    assert health.live()[0]  # still alive while it drains


def test_a_failing_metrics_callback_is_a_500_not_a_dead_server() -> None:
    def broken() -> bytes:
        raise RuntimeError("a collector failed")

    server = start_health_server(0, metrics=broken)
    try:
        assert _get(server.port, "/metrics")[0] == 500
        assert _get(server.port, "/livez")[0] == 200
    finally:
        server.close()


def test_no_port_serves_nothing_and_calls_are_no_ops() -> None:
    server = start_health_server(None)
    server.beat()
    server.close()
    assert server.port is None

"""sipstream.health: probes and Prometheus text over a real local HTTP server."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from sipstream.health import Health, prometheus_text, start_health_server


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_probes_follow_the_loop() -> None:
    record = {"source": "rollout", "instance": "rollout-0", "counters": {"consumed": 3, "stage.weights_loaded": 1},
              "gauges": {"records_per_s": 1.5}}
    server = start_health_server(0, metrics=lambda: record, stale_after_s=0.3)
    try:
        assert server.host == "127.0.0.1"  # loopback unless a deployment says otherwise
        assert _get(server.port, "/livez") == (200, "starting\n")  # models may still be loading
        assert _get(server.port, "/readyz")[0] == 503
        server.beat()
        assert _get(server.port, "/livez")[0] == 200
        assert _get(server.port, "/readyz")[0] == 200
        status, body = _get(server.port, "/metrics")
        assert status == 200
        assert 'sipstream_consumed_total{stage="rollout",instance="rollout-0"} 3.0' in body
        assert 'sipstream_stage_weights_loaded_total{stage="rollout",instance="rollout-0"} 1.0' in body
        assert "# TYPE sipstream_records_per_s gauge" in body
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
    def broken() -> dict:
        raise RuntimeError("dictionary changed size during iteration")

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


@pytest.mark.parametrize(("key", "name"), [("dead-lettered", "sipstream_dead_lettered_total"), ("a.b", "sipstream_a_b_total")])
def test_metric_names_are_sanitised(key: str, name: str) -> None:
    text = prometheus_text({"source": 's"x', "instance": "i", "counters": {key: 1, "flag": True}})
    assert text.startswith(f"# TYPE {name} counter\n{name}{{stage=\"s\\\"x\",instance=\"i\"}} 1.0")
    assert "flag" not in text  # booleans are not samples

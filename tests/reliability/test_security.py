"""Security: credentials come only from config files or the environment and never reach a log or a file a run
writes (`sipstream run`'s output, each stage worker's and the learner's log, the run directory); SASL/TLS settings
pass through to the Kafka clients; every listening endpoint binds to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sipstream.bus import topics as T

SASL = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "sip-user",
        "sasl.password": "pw-7f3a9c-literal", "ssl.ca.location": "/etc/ssl/certs/ca-certificates.crt"}


def test_sasl_and_tls_settings_reach_every_kafka_client_config() -> None:
    from confluent_kafka import Producer

    from sipstream.bus.client import admin_config, consumer_config, producer_config
    from sipstream.config import load_config

    cfg = load_config(overrides=[f"bus.client={json.dumps(SASL)}"], env={})
    built = {"producer": producer_config(cfg.bus, "kafka:9093"), "admin": admin_config(cfg.bus, "kafka:9093"),
             "consumer": consumer_config(cfg.bus, "kafka:9093", group_id="g")}
    for name, conf in built.items():
        assert {k: conf[k] for k in SASL} == SASL, name
    Producer(built["producer"]).flush(0)  # librdkafka accepts them (SSL and SASL/SCRAM are compiled in)


def test_a_secret_can_live_in_the_environment_only(monkeypatch) -> None:
    from sipstream.bus.client import producer_config
    from sipstream.config import load_config
    from sipstream.errors import UserError

    cfg = load_config(overrides=['bus.client={"sasl.password": "${SIP_TEST_SASL_PASSWORD}"}'], env={})
    monkeypatch.setenv("SIP_TEST_SASL_PASSWORD", "pw-from-env")
    assert producer_config(cfg.bus, "kafka:9093")["sasl.password"] == "pw-from-env"
    assert cfg.model_dump(mode="json")["bus"]["client"]["sasl.password"] == "${SIP_TEST_SASL_PASSWORD}"
    monkeypatch.delenv("SIP_TEST_SASL_PASSWORD")
    with pytest.raises(UserError, match="SIP_TEST_SASL_PASSWORD, which is not set"):
        producer_config(cfg.bus, "kafka:9093")


def test_every_json_dump_of_the_config_redacts_credentials() -> None:
    from sipstream.config import load_config, secrets_env

    cfg = load_config(overrides=[f"bus.client={json.dumps(SASL)}", "learner.weight_store=s3://AKIAX:sk-9d2e@bucket/w",
                                 'learner.weight_store_options={"secret": "opt-secret-1"}'], env={})
    dumped = json.dumps(cfg.model_dump(mode="json")) + cfg.model_dump_json()
    for secret in ("pw-7f3a9c-literal", "sk-9d2e", "opt-secret-1"):
        assert secret not in dumped
    assert cfg.model_dump(mode="json")["bus"]["client"]["sasl.username"] == "sip-user"  # not a secret
    # A child process loading the redacted dump gets the credentials back through SIPSTREAM_SECRETS.
    child = load_config(overrides=[f"bus.client={json.dumps(cfg.model_dump(mode='json')['bus']['client'])}"],
                        env=secrets_env(cfg))
    assert child.bus.client["sasl.password"] == "pw-7f3a9c-literal"


@pytest.mark.slow
def test_secrets_never_reach_logs_or_run_files(bus, tmp_path: Path, moto_s3, s3_bucket, figures) -> None:
    """`sipstream run` (every stage worker and the learner as its children) with an S3 weight store (secret key in
    the environment) and a SASL password in its config file, at debug level: the learner publishes to S3 (moto),
    the rollout worker loads from it. The secrets appear in no output: not `sipstream run`'s, not any worker's or
    the learner's log, not `config --show`, no file of the run directory, not sip.metrics or sip.deadletter."""
    from sipstream.config import project_root

    s3_secret, sasl_secret = "s3-secret-0d4c81", "sasl-pw-52be77"
    s3_bucket("reliability-weights")
    config_file = tmp_path / "secret.yaml"
    smoke = yaml.safe_load((project_root() / "configs" / "smoke.yaml").read_text())
    config_file.write_text(yaml.safe_dump({
        **smoke, "run_name": "secrets", "run_dir": str(tmp_path / "runs"),
        # A SASL password on a PLAINTEXT listener is accepted and unused by librdkafka: enough to follow the value.
        "bus": {"topic_prefix": bus.cfg.bus.topic_prefix, "group_prefix": bus.cfg.bus.group_prefix,
                "client": {"sasl.username": "sip", "sasl.password": sasl_secret}},
        "logging": {"level": "debug", "format": "json"},
        "runner": {**smoke["runner"], "health_port": 0, "metrics_interval_s": 1},
        "local": {"max_documents": 2, "timeout_s": 300},
        "learner": {**smoke["learner"], "batch_pairs": 2, "weight_store": "s3://reliability-weights/w",
                    "weight_store_options": {"endpoint_url": moto_s3["AWS_ENDPOINT"]}},
    }))
    env = {**os.environ, **moto_s3, "AWS_SECRET_ACCESS_KEY": s3_secret, "SIPSTREAM_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "sipstream", "run", "--config", str(config_file),
                          "--bootstrap-servers", bus.bootstrap], capture_output=True, text=True, env=env, check=False,
                         timeout=400)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    shown = subprocess.run([sys.executable, "-m", "sipstream", "config", "--show", "--config", str(config_file)],
                           capture_output=True, text=True, env=env, check=False, timeout=60)

    texts = {"sipstream run output": run.stdout + run.stderr, "config --show": shown.stdout + shown.stderr}
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    texts |= {str(p.relative_to(tmp_path)): p.read_bytes().decode("utf-8", "replace") for p in files
              if p.suffix != ".safetensors"}
    texts["sip.metrics"] = json.dumps(bus.values(T.METRICS))
    texts["sip.deadletter"] = json.dumps(bus.values(T.DEADLETTER))
    leaks = [name for name, text in texts.items() if s3_secret in text or sasl_secret in text]
    assert leaks == []
    logs = {p.name: texts[str(p.relative_to(tmp_path))] for p in files if p.parent.name == "logs"}
    # Every process's log was written and scanned (each worker built its Kafka clients with the SASL password);
    # the learner really published to S3.
    assert set(logs) == {"split.log", "rewrite.log", "rollout.log", "judge.log", "assemble.log", "learner.log"}, sorted(logs)
    assert '"weights published"' in logs["learner.log"] and "s3://reliability-weights/w" in logs["learner.log"]
    assert "<redacted>" in texts["config --show"]
    assert any(p.name == "manifest.json" for p in files)  # the run directory really was written
    figures("security", outputs_and_files_checked=len(texts), process_logs=len(logs), run_files=len(files),
            rollout_loaded_from_s3='"policy weights swapped"' in logs["rollout.log"], leaks=len(leaks))


def test_listeners_bind_to_loopback_by_default(bus) -> None:
    from sipstream.bus.runner import StageRunner
    from sipstream.config import Config, merged
    from sipstream.models.serve import CompletionServer
    from sipstream.stages.echo import EchoStage
    from sipstream.telemetry.health import start_health_server

    defaults = Config()
    assert defaults.runner.health_host == "127.0.0.1" and defaults.bus.embedded.host == "127.0.0.1"
    runner = StageRunner(EchoStage(), merged(bus.cfg, runner={"health_port": 0}), bus.bootstrap)
    try:
        assert runner.health.host == "127.0.0.1" and runner.health.port > 0
    finally:
        runner.run(max_batches=0, until=lambda s: True)
    server = CompletionServer(model=None, model_name="x")  # type: ignore[arg-type] - binding needs no model
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    health = start_health_server(0)  # the learner's and any other process's default
    try:
        assert health.host == "127.0.0.1"
    finally:
        health.close()

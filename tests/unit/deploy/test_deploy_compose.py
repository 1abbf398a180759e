"""deploy/compose and deploy/Dockerfile, checked without a Docker daemon: YAML, the Compose
Specification's JSON Schema (vendored by check-jsonschema), the stages, the GPU reservation, and every
SIPSTREAM_* variable against the real config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from sipstream.stages import STAGES

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_DIR = ROOT / "deploy" / "compose"
BASE = COMPOSE_DIR / "docker-compose.yml"
OVERRIDES = [COMPOSE_DIR / "docker-compose.cpu.yml", COMPOSE_DIR / "docker-compose.gpu.yml"]


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (the dev extra) for the Compose schema")
    from importlib.resources import files

    return json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text("utf-8"))


@pytest.fixture
def services(load_compose, compose_env) -> dict:
    return load_compose(BASE, compose_env)["services"]


@pytest.mark.parametrize("path", [BASE, *OVERRIDES], ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec(path: Path, compose_schema: dict, load_compose, compose_env) -> None:
    from jsonschema import Draft7Validator

    document = load_compose(path, compose_env)
    errors = sorted(Draft7Validator(compose_schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_mistake(compose_schema: dict, load_compose, compose_env) -> None:
    from jsonschema import Draft7Validator

    document = load_compose(BASE, compose_env)
    document["services"]["split"]["restart_policy"] = "always"  # not a Compose key (restart is)
    assert list(Draft7Validator(compose_schema).iter_errors(document))


def test_every_stage_has_a_service_running_it(services: dict) -> None:
    for stage in STAGES:
        assert stage in services, f"no compose service for stage {stage!r}"
        command = services[stage]["command"]
        text = " ".join(command) if isinstance(command, list) else command
        assert re.search(rf"\bworker {stage}\b", text), (stage, text)
        assert "replicas" not in services[stage].get("deploy", {}), "a fixed replica count blocks --scale"
        assert "container_name" not in services[stage], "a fixed container name blocks --scale"


def test_rollout_and_judge_use_static_membership_with_unique_ids(services: dict) -> None:
    for stage in ("rollout", "judge"):
        text = " ".join(services[stage]["command"])
        assert "--static" in text and '--instance-id "' + stage + "-$(hostname)" in text, text


def test_learner_reserves_gpus_and_runs_torchrun(services: dict) -> None:
    learner = services["learner"]
    devices = learner["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert learner["entrypoint"] == ["torchrun"]
    assert learner["command"][-2:] == ["-m", "sipstream.learner"]


def test_kafka_is_kraft_with_the_official_image(services: dict) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "ZOOKEEPER" not in json.dumps(env).upper()
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert len(env["CLUSTER_ID"]) == 22  # base64 of a 16-byte UUID, as kafka-storage expects


def test_minio_bucket_is_created_before_sipstream_starts(services: dict) -> None:
    assert "mc mb --ignore-existing" in " ".join(services["minio-init"]["command"])
    for stage in STAGES:
        assert services[stage]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert services[stage]["depends_on"]["topics"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("service", [*STAGES, "learner", "topics", "ingest"])
def test_sipstream_environment_is_a_valid_config(service: str, services: dict, check_env) -> None:
    env = services[service]["environment"]
    config = Path(env["SIPSTREAM_CONFIG"].replace("/app/", str(ROOT) + "/", 1))
    assert config.is_file(), f"{service}: SIPSTREAM_CONFIG {env['SIPSTREAM_CONFIG']} is not in the image"
    check_env(env, config)


def test_gpu_override_environment_is_a_valid_config(load_compose, compose_env, check_env) -> None:
    base = load_compose(BASE, compose_env)["services"]["rollout"]["environment"]
    gpu = load_compose(COMPOSE_DIR / "docker-compose.gpu.yml", compose_env)["services"]["rollout"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    check_env({**base, **gpu["environment"]}, ROOT / "configs" / "smoke.yaml")


@pytest.mark.parametrize("service", sorted(STAGES))
def test_health_vars_are_wired_into_the_config(service: str, services: dict, check_env) -> None:
    env = services[service]["environment"]
    port, host = env.get("SIPSTREAM_RUNNER__HEALTH_PORT"), env.get("SIPSTREAM_RUNNER__HEALTH_HOST")
    assert port and host, f"{service}: no health server address (Prometheus scrapes it, the healthcheck probes it)"
    config = Path(env["SIPSTREAM_CONFIG"].replace("/app/", str(ROOT) + "/", 1))
    runner = check_env(env, config).runner
    assert (runner.health_port, runner.health_host) == (int(port), host), f"{service}: the config did not take the health vars"


def test_prometheus_scrapes_every_model_stage(services: dict) -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "sipstream-workers")
    names = set(job["dns_sd_configs"][0]["names"])
    assert names == set(STAGES) - {"echo"}
    assert job["dns_sd_configs"][0]["port"] == int(services["split"]["environment"]["SIPSTREAM_RUNNER__HEALTH_PORT"])
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]


def test_env_example_covers_every_required_variable() -> None:
    text = BASE.read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required, "no ${VAR:?} in the compose file: the pattern no longer matches its syntax"
    example = (COMPOSE_DIR / ".env.example").read_text(encoding="utf-8")
    for name in required:
        assert re.search(rf"^{name}=", example, re.MULTILINE), f"{name} is required by the compose file but not in .env.example"


def test_dockerfile_copies_only_what_the_dockerignore_lets_through() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(line.split()[1:-1])
    assert copied and copied <= allowed, copied - allowed
    for path in copied:
        assert (ROOT / path).exists(), path
    assert 'ENTRYPOINT ["sipstream"]' in dockerfile
    assert re.search(r"^ARG TORCH_INDEX_URL=", dockerfile, re.MULTILINE)  # CPU by default, CUDA by build-arg
    assert re.search(r"^USER sipstream$", dockerfile, re.MULTILINE)

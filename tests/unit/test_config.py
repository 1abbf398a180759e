from pathlib import Path

import pytest

from sipstream.config import Config, load_config
from sipstream.errors import ConfigError


def test_shipped_tiny_config_is_the_embedded_default() -> None:
    cfg = load_config(env={})
    assert cfg.embedded and cfg.bus.bootstrap_servers is None
    assert cfg.items.suffix_tokens == 128  # the paper's chunk length
    assert cfg.rollout.rollouts == 2


def test_layers_file_then_env_then_set(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("runner:\n  batch_size: 4\nitems:\n  suffix_tokens: 64\n")
    env = {"SIPSTREAM_RUNNER__BATCH_SIZE": "7", "SIPSTREAM_BUS__BOOTSTRAP_SERVERS": "kafka:9092", "OTHER": "x"}
    cfg = load_config(path, ["runner.batch_size=9", "rollout.temperature=0.7"], env=env)
    assert cfg.runner.batch_size == 9  # --set beats env beats file
    assert cfg.bus.bootstrap_servers == "kafka:9092" and not cfg.embedded
    assert cfg.items.suffix_tokens == 64
    assert cfg.rollout.temperature == pytest.approx(0.7)
    assert load_config(path, env={"SIPSTREAM_RUNNER__BATCH_SIZE": "7"}).runner.batch_size == 7


def test_config_path_from_env(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run_name: from-env\n")
    assert load_config(env={"SIPSTREAM_CONFIG": str(path)}).run_name == "from-env"


@pytest.mark.parametrize(
    ("overrides", "env", "needle"),
    [
        (["runner.batch_size=0"], {}, "runner.batch_size: Input should be greater than or equal to 1 [from --set runner.batch_size]"),
        (["runner.batchsize=3"], {}, "runner.batchsize: unknown field"),
        ([], {"SIPSTREAM_ROLLOUT__TOP_P": "2"}, "rollout.top_p: Input should be less than or equal to 1 [from env SIPSTREAM_ROLLOUT__TOP_P]"),
        (["learner.algo=ppo"], {}, "learner.algo: Input should be 'dpo', 'nll' or 'pretrain'"),
        (["items.suffix_tokens=4096"], {}, "suffix_tokens (4096) must be smaller than max_context_tokens (1024)"),
        (["runner.batch_size"], {}, "--set expects section.field=value"),
        (["items.suffix_tokens=8"], {}, "min_suffix_tokens (16) must not exceed suffix_tokens (8)"),
    ],
)
def test_bad_values_give_one_line_naming_the_field(overrides: list[str], env: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides, env=env)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("runner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar, env={})


def test_every_field_is_documented() -> None:
    def walk(model: type, path: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{path}{name}")
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                missing += walk(ann, f"{path}{name}.")
        return missing

    assert walk(Config, "") == []


def test_topic_prefix_names_live_topics() -> None:
    cfg = load_config(overrides=["bus.topic_prefix=exp1."], env={})
    assert cfg.bus.topic("sip.pairs") == "exp1.sip.pairs"
    with pytest.raises(ConfigError, match=r"bus\.topic_prefix"):
        load_config(overrides=["bus.topic_prefix=bad prefix"], env={})


def test_sipstream_run_shares_the_cores_out_among_its_model_processes(monkeypatch) -> None:
    from sipstream.config import merged
    from sipstream.ops.local import thread_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = load_config(env={})
    assert thread_env(cfg, cores=2) == {"OMP_NUM_THREADS": "1"}
    # The default colocates rewrite+judge and split+rollout: 2 model processes + the learner.
    assert thread_env(cfg, cores=16) == {"OMP_NUM_THREADS": "5"}
    assert thread_env(merged(cfg, local={"workers_per_stage": 2}), cores=16) == {"OMP_NUM_THREADS": "3"}
    # One process per stage: 3 model stages + the learner.
    assert thread_env(merged(cfg, local={"colocate": []}), cores=16) == {"OMP_NUM_THREADS": "4"}
    assert thread_env(merged(cfg, local={"threads_per_process": 3}), cores=2) == {"OMP_NUM_THREADS": "3"}
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_env(cfg, cores=2) == {}  # the user's setting stands


def test_colocated_stages_form_process_groups_in_pipeline_order() -> None:
    from sipstream.config import merged
    from sipstream.errors import UserError
    from sipstream.ops.local import process_groups

    cfg = load_config(env={})
    assert process_groups(merged(cfg, local={"colocate": []})) == [[s] for s in ("split", "rewrite", "rollout", "judge", "assemble")]
    assert process_groups(merged(cfg, local={"colocate": [["judge", "rewrite"]]})) == [
        ["split"], ["rewrite", "judge"], ["rollout"], ["assemble"]]
    for bad, message in (([["rewrite", "jugde"]], "jugde is not one"), ([["rewrite"]], "two or more"),
                         ([["rewrite", "judge"], ["judge", "assemble"]], "in two groups")):
        with pytest.raises(UserError, match=message):
            process_groups(merged(cfg, local={"colocate": bad}))


def test_worker_stage_lists_are_checked() -> None:
    from sipstream.errors import UserError
    from sipstream.ops.worker import parse_stages

    assert parse_stages("rewrite+judge") == ["rewrite", "judge"]
    assert parse_stages("rollout") == ["rollout"]
    with pytest.raises(UserError, match=r"unknown stage 'rewrit'.*rewrite\+judge"):
        parse_stages("rewrit+judge")
    with pytest.raises(UserError, match="twice"):
        parse_stages("judge+judge")


def test_the_learner_alone_gets_the_malloc_threshold() -> None:
    from sipstream.config import merged
    from sipstream.ops.local import learner_env

    cfg = load_config(env={})
    assert learner_env(cfg, {"A": "1"}) == {"A": "1", "MALLOC_MMAP_THRESHOLD_": "4194304"}  # configs/tiny.yaml
    assert learner_env(merged(cfg, local={"learner_malloc_mmap_threshold": None}), {"A": "1"}) == {"A": "1"}


@pytest.mark.parametrize(
    ("key", "value", "kept"),
    [
        ("sasl.password", "hunter2", True),  # a literal credential under a secret key
        ("ssl.key.password", 1234, True),  # any non-empty non-flag value counts
        ("sasl.password", "${KAFKA_PASSWORD}", False),  # a reference to the environment holds no secret
        ("sasl.password", None, False),
        ("sasl.password", "", False),
        ("sasl.password", True, False),  # a flag, not a credential
        ("endpoint_url", "s3://key:secret@bucket/x", True),  # a URL's password, whatever the key
        ("sasl.password", "https://user:pass@host", True),  # both reasons at once
        ("endpoint_url", "s3://bucket/x", False),
        ("endpoint_url", 42, False),
        ("suffix_tokens", 128, False),  # `tokens` is not a secret word
        ("api_key_env", "OPENAI_API_KEY", False),  # names a variable; does not hold the key
        ("api_key", "sk-123", True),
    ],
)
def test_secret_values_keeps_exactly_the_literal_credentials(key: str, value: object, kept: bool) -> None:
    from sipstream.config import REDACTED, redact, secret_values

    dump = {"bus": {"client": {key: value, "security.protocol": "SASL_SSL"}}}
    assert secret_values(dump) == ({"bus": {"client": {key: value}}} if kept else {})
    # `redact` hides what `secret_values` keeps (a URL keeps its host; only its password goes).
    redacted = redact(dump)["bus"]["client"][key]
    assert (redacted != value) == kept
    if kept and not (isinstance(value, str) and "://" in value):
        assert redacted == REDACTED

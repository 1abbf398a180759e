import typing

import pytest

from sipstream.bus import topics as T
from sipstream.bus.records import RECORDS

SPECS = T.load_specs()

VALID = {
    "sip.documents": {"doc_id": "d1", "text": "Hello.", "source": "test", "meta": {"k": 1}},
    "sip.echo": {"doc_id": "d1", "text": "Hello.", "source": "test", "echoed_by": "w1"},
    "sip.prefixes": {"item_id": "d1:0", "doc_id": "d1", "chunk_index": 0, "prefix": "", "suffix": "Hi", "seed": 3},
    "sip.rewritten": {"item_id": "d1:0", "doc_id": "d1", "chunk_index": 0, "prefix": "", "suffix": "Hi", "seed": 3,
                      "rewrite": None, "why": ["kept_original"]},
    "sip.rollouts": {"item_id": "d1:0", "doc_id": "d1", "chunk_index": 0, "prefix": "", "suffix": "Hi", "seed": 3,
                     "rewrite": "Hey", "why": [], "rollouts": ["a", "b"], "policy_version": 2},
    "sip.judged": {"item_id": "d1:0", "doc_id": "d1", "chunk_index": 0, "prefix": "", "suffix": "Hi", "seed": 3,
                   "rewrite": None, "why": [], "rollouts": ["a"], "policy_version": 0,
                   "scores": [{"kind": "original", "index": 0, "quality": 0.5, "safety": 1, "factuality": 1, "total": 2.5}]},
    "sip.pairs": {"item_id": "d1:0", "doc_id": "d1", "prefix": "p", "suffix": "s", "seed": 3, "policy_version": 1,
                  "chosen": {"kind": "rewrite", "index": 0, "text": "x", "total": 2.0},
                  "rejected": {"kind": "rollout", "index": 1, "text": "y", "total": 0.5}, "target": None},
    "sip.weights": {"run_name": "tiny", "version": 3, "uri": "file:///tmp/w.safetensors", "sha256": "a" * 64,
                    "step": 30, "created_at": "2026-11-25T12:00:00Z"},
    "sip.metrics": {"source": "echo", "instance": "w1", "ts": 1.0, "counters": {"consumed": 3}},
    "sip.deadletter": {"stage": "echo", "error": "bad_json", "reason": "x", "topic": "sip.documents", "partition": 0,
                       "offset": 5, "value_b64": "", "value_bytes": 0, "value_sha256": "", "truncated": False, "ts": 1.0},
}


def test_every_design_topic_has_a_spec() -> None:
    assert set(T.CORE_TOPICS) <= set(SPECS)
    for spec in SPECS.values():
        assert spec.partitions >= 1 and spec.key
    # Weight announcements must stay ordered for every reader.
    assert SPECS[T.WEIGHTS].partitions == 1


@pytest.mark.parametrize("topic", sorted(VALID))
def test_valid_samples_pass_and_broken_ones_fail(topic: str) -> None:
    spec = SPECS[topic]
    assert spec.errors(VALID[topic]) == []
    for required in spec.schema_["required"]:
        broken = {k: v for k, v in VALID[topic].items() if k != required}
        assert any(required in e for e in spec.errors(broken)), f"{topic} accepts a record without {required}"
    assert spec.errors([1, 2]) != []


def test_wrong_types_are_named_by_path() -> None:
    errors = SPECS[T.JUDGED].errors({**VALID[T.JUDGED], "scores": [{"kind": "other", "index": -1}]})
    assert any(e.startswith("scores/0") for e in errors)


@pytest.mark.parametrize("topic", sorted(RECORDS))
def test_typed_records_match_specs(topic: str) -> None:
    record = RECORDS[topic]
    required_in_code = {k for k in typing.get_type_hints(record) if k in record.__required_keys__}
    assert required_in_code == set(SPECS[topic].schema_["required"])
    assert set(typing.get_type_hints(record)) == set(SPECS[topic].schema_["properties"])


def test_spec_file_must_match_topic_name(tmp_path) -> None:
    from sipstream.errors import ConfigError

    for name, spec in SPECS.items():
        (tmp_path / f"{name}.yaml").write_text(spec.model_dump_json(by_alias=True))
    (tmp_path / "sip.pairs.yaml").rename(tmp_path / "sip.pair.yaml")
    with pytest.raises(ConfigError, match="rename the file"):
        T.load_specs(tmp_path)


_ODD_VALUES = [None, True, -1, 0, 1.5, "", "x", "2026-11-25T12:00:00Z", "not a date", [], ["a"], [1], {}, {"k": 1},
               "a" * 64, "g" * 64, 2**40]


def _mutations(value, rng, depth=0):
    """Records one edit away from `value`: a key dropped, added or given an odd value, at any depth."""
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        choice = rng.randrange(4)
        if choice == 0:
            return {k: v for k, v in value.items() if k != key}
        if choice == 1:
            return {**value, "extra_field": rng.choice(_ODD_VALUES)}
        if choice == 2 and depth < 3:
            return {**value, key: _mutations(value[key], rng, depth + 1)}
        return {**value, key: rng.choice(_ODD_VALUES)}
    if isinstance(value, list) and value:
        index = rng.randrange(len(value))
        return [*value[:index], _mutations(value[index], rng, depth + 1), *value[index + 1:]]
    return rng.choice(_ODD_VALUES)


@pytest.mark.parametrize("topic", sorted(VALID))
def test_compiled_validator_agrees_with_jsonschema(topic: str) -> None:
    """`errors` lets the compiled validator decide: on valid records and on 400 random one-edit mutations per
    topic it must accept and reject exactly what jsonschema accepts and rejects."""
    import random

    spec = SPECS[topic]
    rng = random.Random(topic)
    records = [VALID[topic]] + [_mutations(VALID[topic], rng) for _ in range(400)]
    rejected = 0
    for record in records:
        by_jsonschema = not any(True for _ in spec.validator.iter_errors(record))
        assert (spec.errors(record) == []) == by_jsonschema, (topic, record)
        rejected += not by_jsonschema
    assert rejected > 50  # the mutations do reach the rejecting side

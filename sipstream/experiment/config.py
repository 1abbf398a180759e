"""The experiment's own config (`configs/experiments/*.yaml`): which base config, arms, documents,
updates and seeds; see `sipstream.experiment.run` for what an experiment does with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sipstream.errors import UserError

ARMS = ("pretrain", "nll", "dpo")


class ExperimentConfig(BaseModel):
    """One comparison: which config, which arms, how many documents, updates and seeds."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str
    """Name of the experiment; its directory is `out_dir/<name>-<timestamp>`."""

    base_config: Path
    """The sipstream config every arm runs with (models, items, judge, learner defaults)."""

    set: list[str] = Field(default_factory=list)
    """Overrides of the base config, as `--set` takes them (e.g. `items.suffix_tokens=32`)."""

    mode: Literal["shared", "online"] = "shared"
    """``shared``: one scored stream per seed, every arm trains on its pairs (CPU). ``online``:
    every arm runs the full loop with its own rollouts (GPU)."""

    arms: list[Literal["pretrain", "nll", "dpo"]] = Field(default_factory=lambda: list(ARMS))
    """Algorithms compared; `pretrain` is the standard next-token baseline."""

    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    """One repetition per seed: the documents drawn, item seeds, sampling and learner RNG."""

    documents: int = Field(16, ge=1)
    """Training documents per seed, drawn from the training split of the shipped corpus."""

    unsafe_fraction: float = Field(0.25, ge=0, le=1)
    """Share of documents carrying an unsafe passage (training-split RealToxicityPrompts texts)."""

    false_fraction: float = Field(0.25, ge=0, le=1)
    """Share of documents carrying false statements (training-split false claims)."""

    insert_after_words: int = Field(60, ge=1)
    """The bad passage is put at the first sentence end after this many words, where the first items'
    suffixes are (see `items.min_prefix_tokens`)."""

    steps: int = Field(8, ge=1)
    """Policy updates per arm (the same for every arm)."""

    evaluation: dict[str, Any] = Field(default_factory=dict)
    """Fields of `sipstream.eval.EvalConfig` (sizes of the held-out sets, tokens per continuation)."""

    out_dir: Path = Path("runs/experiments")
    """Parent folder of the experiment directory."""

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.unsafe_fraction + self.false_fraction > 1:
            raise ValueError("unsafe_fraction + false_fraction must be at most 1")
        if len(set(self.arms)) != len(self.arms) or not self.arms:
            raise ValueError("arms must be distinct and not empty")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError("seeds must be distinct and not empty")
        return self

def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment config {path} not found (see configs/experiments/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"experiment config {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"experiment config {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"experiment config {path} must hold a mapping of fields, not {type(data).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: write FIELD=VALUE, e.g. --set steps=4")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    try:
        exp = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not exp.base_config.is_absolute() and not exp.base_config.is_file():
        candidate = path.parent / exp.base_config
        exp.base_config = candidate if candidate.is_file() else exp.base_config
    return exp

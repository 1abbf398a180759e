"""Helpers for the deploy/ checks: YAML loading that knows Compose's tags, variable interpolation as
Compose does it, and validating SIPSTREAM_* environments against the real config."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from sipstream.config import Config, load_config

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"


class ComposeLoader(yaml.SafeLoader):
    """safe_load plus Compose's `!reset` / `!override` merge tags (kept as their value)."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tagged)

_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}` and `$$` (a literal `$`)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        value = env.get(name)
        if op in (":-", ":?"):
            if value:
                return value
            if op == ":?":
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return arg
        if op in ("-", "?"):
            return value if value is not None else arg
        if op == ":+":
            return arg if value else ""
        return value or ""

    return _VAR.sub(sub, text)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def check_sipstream_env(env: Mapping[str, str], config_path: Path | None) -> Config:
    """Load the real config with every SIPSTREAM_* variable of this environment (none dropped); raises
    ConfigError naming any bad field, else returns the config."""
    sip = {k: str(v) for k, v in env.items() if k.startswith("SIPSTREAM_") and k not in ("SIPSTREAM_CONFIG",)}
    return load_config(config_path, env=sip)


@pytest.fixture
def compose_env() -> dict[str, str]:
    return read_env_file(DEPLOY / "compose" / ".env.example")


@pytest.fixture
def interp() -> Callable[[str, Mapping[str, str]], str]:
    return interpolate


@pytest.fixture
def check_env() -> Callable[[Mapping[str, str], Path | None], Config]:
    return check_sipstream_env


def load_compose_file(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """A compose file as Compose sees it after interpolation (anchors, merge keys and tags resolved)."""
    return yaml.load(interpolate(path.read_text(encoding="utf-8"), env), Loader=ComposeLoader)


@pytest.fixture
def load_compose() -> Callable[[Path, Mapping[str, str]], dict[str, Any]]:
    return load_compose_file

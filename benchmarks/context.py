"""What a benchmark section is given: the mode, one embedded broker for the whole suite, fresh topics."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"  # tiny random GPT-2 everywhere: the plumbing, in seconds
TINY = ROOT / "configs" / "tiny.yaml"  # the embedded default's real models (SmolLM2-135M, Gemma-3-270M)


@dataclass
class Context:
    quick: bool
    bootstrap: str
    scratch: Path
    """A temporary directory for weight stores and run directories; removed after the suite."""
    _configs: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        """Quick mode runs tiny random models; the full run the embedded default's real models."""
        return SMOKE if self.quick else TINY

    def config(self, path: Path | None = None, overrides: tuple[str, ...] = (), **sections: Any) -> Any:
        """A config on the suite's broker with its own topic prefix and consumer groups (topics created),
        so sections never read each other's records."""
        from sipstream.bus import topics as T
        from sipstream.config import load_config, merged

        prefix = f"bench{uuid.uuid4().hex[:8]}."
        cfg = load_config(
            path or self.config_path,
            overrides=[f"bus.bootstrap_servers={self.bootstrap}", f"bus.topic_prefix={prefix}",
                       f"bus.group_prefix={prefix}group", "logging.level=warning", *overrides],
            env={},
        )
        if sections:
            cfg = merged(cfg, **sections)
        T.create_topics(cfg.bus, self.bootstrap, T.load_specs(T.topics_dir(cfg.bus)))
        return cfg

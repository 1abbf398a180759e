"""Structured log events (structlog): pretty on a terminal, JSON lines otherwise.

Events bind the fields a reader needs to find a record again: stage, item_id, topic, partition,
offset, policy_version. Logs go to stderr so stdout stays free for command output.

"auto" means JSON whenever stderr is not a terminal, so the workers `sipstream run` starts (their stderr
is a log file) and containers write one JSON object per line. Hugging Face progress bars are turned off
then too: on a file they are not progress, just non-JSON lines between the events.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

from sipstream.config import LoggingConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(cfg: LoggingConfig | None = None) -> None:
    cfg = cfg or LoggingConfig()
    pretty = cfg.format == "console" or (cfg.format == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer() if pretty else structlog.processors.JSONRenderer()
    if not pretty:
        # Read when huggingface_hub is first imported (transformers follows it); commands import it later.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[cfg.level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger().bind(**bound)

"""Model instances shared by the roles of one worker process.

The judge and the rewriter are the same model by default; loading it once halves memory and start-up.
"""

from __future__ import annotations

import threading
from typing import Any

from sipstream.models import load_text_model

_LOADED: dict[str, Any] = {}
_SERIALISE = False


class SerialisedModel:
    """A model shared by stages on different threads of one process: one call at a time (a forward
    pass would be safe, but a fast tokenizer's state is not, and the cores are shared anyway)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._model, name)
        if not callable(attribute):
            return attribute

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attribute(*args, **kwargs)

        return locked


def serialise_shared_models() -> None:
    """Models loaded from now on are wrapped in :class:`SerialisedModel` (several stages, one process)."""
    global _SERIALISE
    _SERIALISE = True


def shared_model(spec: Any) -> Any:  # ModelSpec → TextModel

    key = spec.model_dump_json()
    if key not in _LOADED:
        model = load_text_model(spec)
        _LOADED[key] = SerialisedModel(model) if _SERIALISE else model
    return _LOADED[key]

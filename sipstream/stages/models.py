"""Model instances shared by the roles of one worker process.

The judge and the rewriter are the same model by default; loading it once halves memory and start-up.
"""

from __future__ import annotations

from typing import Any

_LOADED: dict[str, Any] = {}


def shared_model(spec: Any) -> Any:  # ModelSpec → TextModel
    from sipstream.models import load_text_model

    key = spec.model_dump_json()
    if key not in _LOADED:
        _LOADED[key] = load_text_model(spec)
    return _LOADED[key]

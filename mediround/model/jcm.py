"""The Judgment & Correction Mechanism: two small MLPs on the 256-d projected [SEG] feature.

judge: 256 -> 512 -> 512 -> 1 (GELU) with a sigmoid, the predicted quality of the feature's mask.
refine: 256 -> 512 -> 512 -> 256 (GELU), a corrected feature. Untrained until ``train-jcm``.

``residual=True`` (the tiny presets): refine is feature + MLP(feature) with its last layer initialised to
zero: it starts as the identity, so stage 2 learns a correction of the raw feature instead of re-learning
the feature from scratch, and a briefly trained refine cannot make a good mask worse than the raw one by
much (docs/jcm.md measures it). ``residual=False`` (``heads.jcm_refine: direct``, the 7B preset): the MLP
outputs the new feature, as in the authors' code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


def _mlp(dims: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if index < len(dims) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class JCM(nn.Module):
    def __init__(self, feature_dim: int = 256, hidden: int = 512, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.judge_mlp = _mlp((feature_dim, hidden, hidden, 1))
        self.refine_mlp = _mlp((feature_dim, hidden, hidden, feature_dim))
        if residual:
            nn.init.zeros_(self.refine_mlp[-1].weight)
            nn.init.zeros_(self.refine_mlp[-1].bias)

    def judge_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(n, 256) -> (n,) logits of the quality score (for a BCE-with-logits loss)."""
        return self.judge_mlp(features).squeeze(-1)

    def judge(self, features: torch.Tensor) -> torch.Tensor:
        """(n, 256) -> (n,) quality scores in [0, 1]."""
        return torch.sigmoid(self.judge_logits(features))

    def refine(self, features: torch.Tensor) -> torch.Tensor:
        """(n, 256) -> (n, 256) corrected features: the feature plus a learned correction (residual), or
        the MLP's output (direct)."""
        refined = self.refine_mlp(features)
        return features + refined if self.residual else refined


@dataclass
class JCMDecision:
    """JCM applied to one [SEG] feature h_c: its score q = judge(h_c), and decode(refine(h_c)) when some
    threshold asked for it (None otherwise)."""

    score: float
    refined_logits: torch.Tensor | None

    def refines(self, beta: float) -> bool:
        """Whether the round's mask comes from the refined feature at threshold ``beta``: q <= beta."""
        return not self.score > beta


def apply_jcm(jcm: JCM, feature: torch.Tensor, betas: Sequence[float],
              decode: Callable[[torch.Tensor], torch.Tensor]) -> JCMDecision:
    """Algorithm 1's judgement and correction of one (256,) [SEG] feature for one or more thresholds (a
    beta sweep shares it): the score once, and the refined feature decoded once when any ``beta`` refines.
    The one place JCM is applied at inference (chained dialogues and chat alike)."""
    with torch.no_grad():
        score = float(jcm.judge(feature).reshape(-1)[0])
        refining = any(not score > beta for beta in betas)
        return JCMDecision(score, decode(jcm.refine(feature)) if refining else None)

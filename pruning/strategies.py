"""Stage 1 keep rules, one registry: a rule is one function plus one name.

Every rule sees the CLS-similarity scores of a batch [B, n] and the ``PruningConfig``; it decides how many patches
each sample keeps (1 <= k <= n) and by which ranking they are chosen (the scores themselves, except for ``random``).
i* is computed from the CLS scores for every rule, so token accounting can log it whichever rule is active.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pruning.config import PruningConfig
from pruning.inflection import ceil_div_alpha, ceil_times, check_scores, inflection_point


@dataclass(frozen=True)
class KeepDecision:
    """What a rule decided for a batch: ``keep`` [B] int64 counts, ``ranking`` [B, n] fp32 (higher = kept first)."""

    keep: torch.Tensor
    ranking: torch.Tensor


# (scores [B, n] fp32, inflection [B] int64, config, generator) -> KeepDecision
KeepRule = Callable[[torch.Tensor, torch.Tensor, PruningConfig, torch.Generator | None], KeepDecision]

_RULES: dict[str, KeepRule] = {}


def register_strategy(name: str) -> Callable[[KeepRule], KeepRule]:
    """Register a keep rule under ``name`` (also add the name to ``pruning.config.VISUAL_STRATEGIES``)."""

    def add(rule: KeepRule) -> KeepRule:
        if name in _RULES:
            raise ValueError(f"visual pruning strategy {name!r} is registered twice")
        _RULES[name] = rule
        return rule

    return add


def strategy_names() -> tuple[str, ...]:
    return tuple(_RULES)


def get_strategy(name: str) -> KeepRule:
    if name not in _RULES:
        raise ValueError(f"unknown visual pruning strategy {name!r}; registered: {', '.join(_RULES)}")
    return _RULES[name]


@dataclass(frozen=True)
class StrategyResult:
    """A rule's decision plus the i* of the CLS scores, which is logged for every rule."""

    keep: torch.Tensor  # [B] int64, 1 <= keep <= n
    ranking: torch.Tensor  # [B, n] fp32
    inflection: torch.Tensor  # [B] int64


def apply_strategy(
    scores: torch.Tensor, config: PruningConfig, generator: torch.Generator | None = None
) -> StrategyResult:
    """Run the configured rule on scores [B, n] and enforce 1 <= k <= n whatever the rule returned.

    ``generator`` only matters for ``random``: pass one that lives across batches to draw a fresh pattern per batch;
    without it each call reseeds from ``config.seed`` and repeats the same pattern.
    """
    check_scores(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [batch, n], got {tuple(scores.shape)}")
    scores = scores.detach().float()
    inflection = inflection_point(scores)
    decision = get_strategy(config.visual_pruning)(scores, inflection, config, generator)
    n = scores.shape[-1]
    keep = decision.keep.to(device=scores.device, dtype=torch.long).expand(scores.shape[0]).clamp(min=1, max=n)
    if decision.ranking.shape != scores.shape:
        raise ValueError(
            f"strategy {config.visual_pruning!r} returned a ranking of shape {tuple(decision.ranking.shape)}, "
            f"expected {tuple(scores.shape)}"
        )
    return StrategyResult(keep=keep, ranking=decision.ranking, inflection=inflection)


def _clamp(keep: torch.Tensor | int, scores: torch.Tensor, config: PruningConfig) -> torch.Tensor:
    """min(n, max(min_keep, keep)) as int64 [B]."""
    batch, n = scores.shape
    keep = torch.as_tensor(keep, dtype=torch.long, device=scores.device).expand(batch)
    return keep.clamp(min=min(config.visual_min_keep, n), max=n)


def _fixed_count(scores: torch.Tensor, config: PruningConfig) -> int:
    """Count for the fixed-budget rules: ceil(visual_ratio * n) when a ratio is set, else visual_topk."""
    n = scores.shape[-1]
    if config.visual_ratio is not None:
        return ceil_times(n, config.visual_ratio)
    if config.visual_topk is None:
        raise ValueError(f"visual_pruning={config.visual_pruning!r} needs visual_ratio or visual_topk")
    return config.visual_topk


@register_strategy("longtail")
def longtail(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    """The paper: k = min(n, max(min_keep, ceil(i* / alpha))); a flat curve (i* = n) keeps all n."""
    return KeepDecision(_clamp(ceil_div_alpha(inflection, config.alpha), scores, config), scores)


@register_strategy("alpha_times")
def alpha_times(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    """Literal reading k = ceil(alpha * i*), for ablations; a flat curve still keeps all n (it has no tail)."""
    n = scores.shape[-1]
    keep = torch.where(inflection == n, n, ceil_times(inflection, config.alpha))
    return KeepDecision(_clamp(keep, scores, config), scores)


@register_strategy("topk")
def topk(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    """Fixed budget (paper Table 1): the visual_topk highest-scoring patches."""
    if config.visual_topk is None:
        raise ValueError("visual_pruning='topk' needs visual_topk")
    return KeepDecision(_clamp(config.visual_topk, scores, config), scores)


@register_strategy("ratio")
def ratio(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    """Fixed fraction (paper Tables 7-8): ceil(visual_ratio * n) highest-scoring patches."""
    return KeepDecision(_clamp(_fixed_count(scores, config), scores, config), scores)


@register_strategy("random")
def random_patches(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    """Same count as ``ratio`` (or ``topk``), patches drawn uniformly: the ranking is noise, not the scores.

    The noise is drawn on the CPU from a seeded generator, so a seed gives the same patches on every device.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    noise = torch.rand(scores.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return KeepDecision(_clamp(_fixed_count(scores, config), scores, config), noise.to(scores.device))


@register_strategy("none")
def keep_all(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    """No pruning: k = n."""
    return KeepDecision(_clamp(scores.shape[-1], scores, config), scores)

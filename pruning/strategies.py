"""Vision-side methods, the simple case: CLS-score keep rules (stage 1 of the paper and its fixed baselines).

A keep rule is one function plus one name, registered with ``register_keep_rule``: it sees the CLS-similarity
scores of a batch [B, n] (at ``--visual-layer``) and the config, and decides how many patches each sample keeps and
by which ranking they are chosen. ``keep_rule_reducer`` turns it into a vision-side method (pruning/visual.py):
score, rank, keep the best k in raster order from the select-layer features, or ('inside' mode) run the later
tower layers on the kept tokens only. i* is computed from the CLS scores for every rule, so token accounting can
log it whichever rule is active. Every rule reads the flags of ``KEEP_RULE_PARAMS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pruning import registry
from pruning.config import PruningConfig, PruningConfigError
from pruning.inflection import ceil_times, check_scores, clamp_keep, inflection_point, longtail_keep
from pruning.registry import Param, at_least, in_range
from pruning.scoring import SCORE_MODES, cls_patch_scores
from pruning.visual import (
    ReducedPatches,
    VisionContext,
    gather_patches,
    raster_order_indices,
    register_vision_method,
    with_cls,
)

VISUAL_MODES = ("select", "inside")
CROP_BUDGETS = ("per_crop", "global")

# read by every keep rule
VISUAL_LAYER = Param("visual_layer", int, 16, "CLIP layer whose CLS row scores the patches", check=at_least(0))
VISUAL_MIN_KEEP = Param("visual_min_keep", int, 1, "never keep fewer patches than this", check=at_least(1))
VISUAL_SCORE = Param(
    "visual_score", str, "full", "full-width score (paper eq. 1) or the mean of per-head softmax", choices=SCORE_MODES
)
VISUAL_MODE = Param(
    "visual_mode", str, "select", "'inside' runs the later tower layers on the kept tokens only", choices=VISUAL_MODES
)
CROP_BUDGET = Param(
    "crop_budget",
    str,
    "per_crop",
    "LLaVA-1.6: a budget per crop, or pooled over an image's crops",
    choices=CROP_BUDGETS,
)
KEEP_RULE_PARAMS = (VISUAL_LAYER, VISUAL_MIN_KEEP, VISUAL_SCORE, VISUAL_MODE, CROP_BUDGET)
# read by some
ALPHA = Param(
    "alpha", float, 0.24, "smoothing coefficient: keep k = ceil(i*/alpha)", check=in_range(0, 1, low_open=True)
)
VISUAL_TOPK = Param(  # the common budget of the fixed-budget vision-side methods (pruning/baselines too)
    "visual_topk",
    int,
    None,
    "visual tokens per image (per crop for LLaVA-1.6) that fixed-budget methods keep",
    check=at_least(1),
    optional=True,
    flag="--visual-tokens",
    aliases=("--visual-topk",),
)
VISUAL_RATIO = Param(
    "visual_ratio", float, None, "kept fraction of the patches", check=in_range(0, 1, low_open=True), optional=True
)
SEED = Param("seed", int, 0, "seed of the random patterns", flag="")


@dataclass(frozen=True)
class KeepDecision:
    """What a rule decided for a batch: ``keep`` [B] int64 counts, ``ranking`` [B, n] fp32 (higher = kept first)."""

    keep: torch.Tensor
    ranking: torch.Tensor


# (scores [B, n] fp32, inflection [B] int64, config, generator) -> KeepDecision
KeepRule = Callable[[torch.Tensor, torch.Tensor, PruningConfig, "torch.Generator | None"], KeepDecision]


class KeepRuleReducer:
    """A keep rule as a vision-side method; the rule itself stays reachable for ``apply_strategy``."""

    def __init__(self, rule: KeepRule):
        self.rule = rule

    def __call__(self, context: VisionContext) -> ReducedPatches:
        return keep_rule_reducer(context, self.rule)


def register_keep_rule(
    name: str,
    *,
    params: Sequence[Param] = (),
    description: str,
    check: Callable[[PruningConfig], None] | None = None,
    detail: Callable[[PruningConfig], str] | None = None,
) -> Callable[[KeepRule], KeepRule]:
    """Register ``rule`` as ``--visual-pruning NAME``; it also reads ``KEEP_RULE_PARAMS``."""

    def add(rule: KeepRule) -> KeepRule:
        registry.register(
            "visual_pruning",
            name,
            KeepRuleReducer(rule),
            params=(*params, *KEEP_RULE_PARAMS),
            description=description,
            check=check,
            detail=lambda config: ", ".join([*([detail(config)] if detail else []), f"layer {config.visual_layer}"]),
            reads_text=False,  # a keep rule sees the CLS scores only
        )
        return rule

    return add


def keep_rule_names() -> tuple[str, ...]:
    return tuple(m.name for m in registry.methods("visual_pruning") if isinstance(m.implementation, KeepRuleReducer))


def is_keep_rule(name: str) -> bool:
    return isinstance(registry.get("visual_pruning", name).implementation, KeepRuleReducer)


def get_keep_rule(name: str) -> KeepRule:
    implementation = registry.get("visual_pruning", name).implementation
    if not isinstance(implementation, KeepRuleReducer):
        raise ValueError(f"visual_pruning {name!r} is not a CLS-score keep rule; keep rules: {keep_rule_names()}")
    return implementation.rule


@dataclass(frozen=True)
class StrategyResult:
    """A rule's decision plus the i* of the CLS scores, which is logged for every rule."""

    keep: torch.Tensor  # [B] int64, 1 <= keep <= n
    ranking: torch.Tensor  # [B, n] fp32
    inflection: torch.Tensor  # [B] int64


def apply_strategy(
    scores: torch.Tensor, config: PruningConfig, generator: torch.Generator | None = None
) -> StrategyResult:
    """Run the configured keep rule on scores [B, n] and enforce 1 <= k <= n whatever the rule returned.

    ``generator`` only matters for ``random``: pass one that lives across batches to draw a fresh pattern per batch;
    without it each call reseeds from ``config.seed`` and repeats the same pattern. ``visual_pruning: none`` (not a
    keep rule: in the tower it scores nothing) keeps all n here, ranked by the scores, for callers that score anyway.
    """
    rule = _keep_everything if config.visual_pruning == registry.NONE else get_keep_rule(config.visual_pruning)
    return _run_rule(rule, scores, config, generator)


def scoring_config(config: PruningConfig) -> PruningConfig:
    """``config`` changed to keep every patch while scoring them at its ``visual_layer`` (the ratio rule at 1.0),
    for callers that need the CLS curve and i* of every patch: ``visual_pruning: none`` scores nothing."""
    return config.merged(visual_pruning="ratio", visual_ratio=1.0)


def _keep_everything(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    return KeepDecision(torch.full((scores.shape[0],), scores.shape[-1], dtype=torch.long), scores)


def _run_rule(
    rule: KeepRule, scores: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> StrategyResult:
    check_scores(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [batch, n], got {tuple(scores.shape)}")
    scores = scores.detach().float()
    inflection = inflection_point(scores)
    decision = rule(scores, inflection, config, generator)
    n = scores.shape[-1]
    keep = decision.keep.to(device=scores.device, dtype=torch.long).expand(scores.shape[0]).clamp(min=1, max=n)
    if decision.ranking.shape != scores.shape:
        raise ValueError(
            f"strategy {config.visual_pruning!r} returned a ranking of shape {tuple(decision.ranking.shape)}, "
            f"expected {tuple(scores.shape)}"
        )
    return StrategyResult(keep=keep, ranking=decision.ranking, inflection=inflection)


def keep_rule_reducer(context: VisionContext, rule: KeepRule) -> ReducedPatches:
    """Score the patches at visual_layer, let the rule decide, keep the best k in raster order.

    "select" mode gathers them from the select-layer features (the tower is untouched). "inside" mode cuts
    hidden_states[visual_layer] to CLS + the kept patches (padded to the longest sample, padded keys masked out) and
    runs encoder.layers[visual_layer:select] on those only, which cuts tower compute.
    """
    config = context.config
    _check_visual_layer(config, len(context.layers), context.select_index)
    hidden = context.hidden_states(config.visual_layer)  # [B, 1+n, D]
    scores = cls_patch_scores(context.layers[config.visual_layer], hidden, mode=config.visual_score)  # [B, n]
    decision = _run_rule(rule, scores, config, context.generator)
    indices, mask = raster_order_indices(decision.ranking, decision.keep)  # [B, k_max]
    if config.visual_mode == "inside":
        tokens = torch.cat([hidden[:, :1], gather_patches(hidden[:, 1:], indices, mask)], dim=1)  # [B, 1+k_max, D]
        tokens = context.run_rows(tokens, config.visual_layer, context.select_index, with_cls(mask))
        return ReducedPatches(tokens[:, 1:], mask, indices, tokens[:, :1], decision.inflection, scores)
    patches = gather_patches(context.features()[:, 1:], indices, mask)
    return ReducedPatches(patches, mask, indices, None, decision.inflection, scores)


def _check_visual_layer(config: PruningConfig, num_layers: int, select_index: int) -> None:
    if config.visual_layer >= num_layers:
        raise ValueError(
            f"visual_layer {config.visual_layer} needs encoder.layers[{config.visual_layer}], "
            f"but the vision tower has {num_layers} layers (valid: 0..{num_layers - 1})"
        )
    if config.visual_mode == "inside" and config.visual_layer > select_index:
        raise ValueError(
            f"visual_mode 'inside' prunes at hidden_states[{config.visual_layer}], after the select layer "
            f"hidden_states[{select_index}]; use a visual_layer <= {select_index} or visual_mode 'select'"
        )


# ---- the rules -------------------------------------------------------------------------------------------------------
def _clamp(keep: torch.Tensor | int, scores: torch.Tensor, config: PruningConfig) -> torch.Tensor:
    """min(n, max(min_keep, keep)) as int64 [B]."""
    batch, n = scores.shape
    keep = torch.as_tensor(keep, dtype=torch.long, device=scores.device).expand(batch)
    return clamp_keep(keep, n, config.visual_min_keep)


def _fixed_count(scores: torch.Tensor, config: PruningConfig) -> int:
    """Count for the fixed-budget rules: ceil(visual_ratio * n) when a ratio is set, else visual_topk."""
    n = scores.shape[-1]
    if config.visual_ratio is not None:
        return ceil_times(n, config.visual_ratio)
    if config.visual_topk is None:
        raise ValueError(f"visual_pruning={config.visual_pruning!r} needs visual_ratio or visual_topk")
    return config.visual_topk


def _needs_topk(config: PruningConfig) -> None:
    if config.visual_topk is None:
        raise PruningConfigError(f"visual_pruning='topk' needs visual_topk >= 1 ({VISUAL_TOPK.cli_flag}), got {None!r}")


def _needs_a_count(config: PruningConfig) -> None:
    if config.visual_ratio is None and config.visual_topk is None:
        raise PruningConfigError(
            f"visual_pruning={config.visual_pruning!r} needs visual_ratio (--visual-ratio) or visual_topk "
            f"({VISUAL_TOPK.cli_flag})"
        )


def _count_detail(config: PruningConfig) -> str:
    return f"ratio={config.visual_ratio}" if config.visual_ratio is not None else f"k={config.visual_topk}"


@register_keep_rule(
    "longtail",
    params=(ALPHA,),
    description="The paper (stage 1): keep k = min(n, max(min_keep, ceil(i*/alpha))) patches by CLS score, i* the "
    "inflection point of the sorted CLS-similarity curve.",
    detail=lambda config: f"alpha={config.alpha}",
)
def longtail(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    """A flat curve (i* = n) keeps all n."""
    return KeepDecision(longtail_keep(inflection, scores.shape[-1], config.alpha, config.visual_min_keep), scores)


@register_keep_rule(
    "topk",
    params=(VISUAL_TOPK,),
    description="Fixed budget (paper Table 1): the visual_topk patches with the highest CLS score.",
    check=_needs_topk,
    detail=lambda config: f"k={config.visual_topk}",
)
def topk(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    return KeepDecision(_clamp(config.visual_topk, scores, config), scores)


@register_keep_rule(
    "ratio",
    params=(VISUAL_RATIO, VISUAL_TOPK),
    description="Fixed fraction (paper Tables 7-8): ceil(visual_ratio * n) patches by CLS score (or visual_topk).",
    check=_needs_a_count,
    detail=lambda config: f"ratio={config.visual_ratio}",
)
def ratio(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    return KeepDecision(_clamp(_fixed_count(scores, config), scores, config), scores)


@register_keep_rule(
    "alpha_times",
    params=(ALPHA,),
    description="Literal reading of the paper, for ablations: k = ceil(alpha * i*); a flat curve keeps all n.",
    detail=lambda config: f"alpha={config.alpha}",
)
def alpha_times(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    n = scores.shape[-1]
    keep = torch.where(inflection == n, n, ceil_times(inflection, config.alpha))
    return KeepDecision(_clamp(keep, scores, config), scores)


@register_keep_rule(
    "random",
    params=(VISUAL_RATIO, VISUAL_TOPK, SEED),
    description="Same count as ratio (or topk), patches drawn uniformly from a seeded generator.",
    check=_needs_a_count,
    detail=_count_detail,
)
def random_patches(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, generator: torch.Generator | None
) -> KeepDecision:
    """The ranking is noise, not the scores. The noise is drawn on the CPU from a seeded generator, so a seed gives
    the same patches on every device."""
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    noise = torch.rand(scores.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return KeepDecision(_clamp(_fixed_count(scores, config), scores, config), noise.to(scores.device))


@register_vision_method(
    "none",
    description="No pruning: upstream's plain path, every select-layer patch (no scoring, no i*).",
    reads_text=False,
)
def keep_all(context: VisionContext) -> ReducedPatches:
    """The tower runs to the select layer only, as upstream LLaVA's did; no layer is scored, so the tower needs no
    ``visual_layer`` (a 12-layer ViT-B tower loads with pruning off) and the answers record no i*."""
    patches = context.features()[:, 1:]  # [B, n, C]
    batch, n = patches.shape[:2]
    indices = torch.arange(n, device=patches.device).expand(batch, n)
    return ReducedPatches(patches, torch.ones(batch, n, dtype=torch.bool, device=patches.device), indices)

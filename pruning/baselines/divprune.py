"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175), after the official code: vbdi/divprune at
799e2d950aa01ba7860907f5a6d86061f885dca6, ``LLaVA/llava/model/llava_arch.py`` (``DivPrune``,
``pairwise_cosine_similarity`` and its call with ``LAYER_INDEX=0``).

Max-min diversity over the image's visual tokens as the LLM receives them (after the multimodal projector), with the
cosine distance ``d(i, j) = 1 - cos(x_i, x_j)``:

- first token: the one whose nearest other token is farthest, ``argmax_j`` of the second-smallest ``d(., j)``;
- then, k - 1 times: the token farthest from the chosen set, ``argmax_j min_{s chosen} d(s, j)`` (first on ties);
- the chosen tokens keep their original (raster) order.

Budget: ``k = round(0.098 n)`` by default (the official SUBSET_RATIO, 56 of 576), or ``--visual-tokens``.

Deviations (docs/baselines.md): the official selects over the whole image sequence of a sample at batch 1 (for
LLaVA-1.6 the merged crops with their newline tokens, at a fixed offset of 35 prompt tokens); we select per image
(per crop on LLaVA-1.6) among the patch tokens, in fp32, before they are spliced into the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pruning.baselines.common import gather_rows, token_budget
from pruning.config import PruningConfigError
from pruning.registry import Param, in_range
from pruning.strategies import VISUAL_TOPK
from pruning.visual import ReducedPatches, VisionContext, register_vision_method

DIVPRUNE_RATIO = Param(
    "divprune_ratio",
    float,
    0.098,
    "kept fraction of the visual tokens, round(ratio * n), unless --visual-tokens is set",
    check=in_range(0, 1, low_open=True),
)


@register_vision_method(
    "divprune",
    params=(DIVPRUNE_RATIO, VISUAL_TOPK),
    description="DivPrune: max-min diversity (cosine distance) over the projected visual tokens; round(0.098 n) "
    "tokens, or visual_topk.",
    detail=lambda c: f"k={c.visual_topk}" if c.visual_topk else f"ratio={c.divprune_ratio}",
    reads_text=False,
)
def divprune(context: VisionContext) -> ReducedPatches:
    if context.projector is None:
        raise ValueError(
            "visual_pruning 'divprune' compares the tokens the LLM receives: pass the model's projector to "
            "select_visual_tokens(..., projector=...)"
        )
    config = context.config
    features = context.features()[:, 1:]  # [B, n, C]
    n = features.shape[1]
    budget = token_budget(config, n, "divprune")
    keep = budget if budget is not None else int(round(config.divprune_ratio * n))
    if keep < 1:
        raise PruningConfigError(
            f"visual_pruning 'divprune' keeps round({config.divprune_ratio} * {n}) = 0 tokens; raise divprune_ratio "
            f"({DIVPRUNE_RATIO.cli_flag})"
        )
    with torch.no_grad():
        chosen = max_min_diversity(context.projector(features).float(), keep)  # [B, keep], selection order
    indices = torch.sort(chosen, dim=-1).values
    mask = torch.ones(indices.shape, dtype=torch.bool, device=indices.device)
    return ReducedPatches(gather_rows(features, indices), mask, indices)


def max_min_diversity(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices [B, keep] of tokens [B, n, D] in the order the greedy max-min rule picks them."""
    unit = F.normalize(tokens, dim=-1, eps=0.0)  # the official divides by the norm as is
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [B, n, n]
    batch, n = tokens.shape[:2]
    rows = torch.arange(batch, device=tokens.device)
    chosen = torch.empty(batch, keep, dtype=torch.long, device=tokens.device)
    # first pick: the nearest other token of each column is its second-smallest distance (the smallest is itself)
    nearest = torch.topk(distance, min(2, n), dim=1, largest=False).values[:, -1]  # [B, n]
    chosen[:, 0] = nearest.argmax(dim=-1)
    to_set = distance[rows, chosen[:, 0]]  # [B, n]: distance of every token to the chosen set
    for step in range(1, keep):
        chosen[:, step] = to_set.argmax(dim=-1)
        to_set = torch.minimum(to_set, distance[rows, chosen[:, step]])
    return chosen

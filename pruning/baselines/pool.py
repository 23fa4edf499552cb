"""Spatial average pooling of the select-layer patch grid to a smaller grid: the plain baseline that recent benchmark
studies (VTC-Bench, arXiv 2510.07143; UniPruneBench, arXiv 2511.02650) find hard to beat. No scores, no merging rule:
each output token is the mean of the patches of one window, exactly ``torch.nn.functional.adaptive_avg_pool2d``
(window i of an axis covers ``floor(i * side / out) .. ceil((i + 1) * side / out) - 1``).

The budget is ``--visual-tokens T``, laid out as the most square grid rows x cols = T (rows <= cols <= side): 64 is
8 x 8 (windows of 3 x 3 patches on LLaVA's 24 x 24 grid), 144 is 12 x 12, 128 is 8 x 16, 192 is 12 x 16. A count
with no such grid is an error that names the nearest counts that have one. Each pooled token is laid out at the
centre patch of its window, so the tokens stay in raster order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pruning.baselines.common import require_budget, token_budget
from pruning.config import PruningConfigError
from pruning.strategies import VISUAL_TOPK
from pruning.visual import ReducedPatches, VisionContext, register_vision_method


def pool_grid(count: int, side: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols = count, rows <= cols <= side, rows as large as possible."""
    for rows in range(int(count**0.5), 0, -1):
        if count % rows == 0 and count // rows <= side:
            return rows, count // rows
    feasible = sorted({r * c for r in range(1, side + 1) for c in range(r, side + 1)})
    below = max((f for f in feasible if f < count), default=None)
    above = min((f for f in feasible if f > count), default=None)
    nearest = " or ".join(str(f) for f in (below, above) if f is not None)
    raise PruningConfigError(
        f"visual_pruning 'pool' lays visual_topk {count} out as a grid rows x cols of at most {side} x {side}, and "
        f"{count} has none; nearest: {nearest} ({VISUAL_TOPK.cli_flag})"
    )


def window_centres(out: int, side: int) -> torch.Tensor:
    """The middle input index of each adaptive-pooling window along one axis: [out]."""
    starts = torch.div(torch.arange(out) * side, out, rounding_mode="floor")
    ends = -torch.div(-(torch.arange(out) + 1) * side, out, rounding_mode="floor")  # ceil
    return torch.div(starts + ends - 1, 2, rounding_mode="floor")


@register_vision_method(
    "pool",
    params=(VISUAL_TOPK,),
    description="Spatial average pooling of the patch grid to a rows x cols grid of visual_topk tokens (the most "
    "square one; no scores).",
    check=require_budget,
    detail=lambda c: f"k={c.visual_topk}",
    reads_text=False,
)
def pool(context: VisionContext) -> ReducedPatches:
    features = context.features()[:, 1:]  # [B, n, C]
    batch, n, channels = features.shape
    side = context.grid_side
    if side * side != n:
        raise ValueError(f"visual_pruning 'pool' needs a square patch grid; the tower gives {n} patches, side {side}")
    rows, cols = pool_grid(token_budget(context.config, n, "pool"), side)
    grid = features.transpose(1, 2).reshape(batch, channels, side, side)
    pooled = F.adaptive_avg_pool2d(grid, (rows, cols)).flatten(2).transpose(1, 2)  # [B, rows * cols, C]
    centre = window_centres(rows, side)[:, None] * side + window_centres(cols, side)[None, :]
    indices = centre.flatten().to(features.device).expand(batch, rows * cols)
    mask = torch.ones(batch, rows * cols, dtype=torch.bool, device=features.device)
    return ReducedPatches(pooled, mask, indices)

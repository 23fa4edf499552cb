"""What the vision-side baselines share: the common budget (``--visual-tokens``) and the gathers they build on."""

from __future__ import annotations

import torch

from pruning.config import PruningConfig, PruningConfigError
from pruning.strategies import VISUAL_TOPK


def token_budget(config: PruningConfig, n: int, method: str) -> int | None:
    """``visual_topk`` (tokens per image or crop) checked against the n patches of the tower; None when unset.

    A budget above n cannot be met by a method that keeps or merges patches, so it is an error naming the flag rather
    than a silent clamp (the config cannot know n: it depends on the tower).
    """
    budget = config.visual_topk
    if budget is not None and budget > n:
        raise PruningConfigError(
            f"visual_pruning {method!r}: visual_topk {budget} is above the {n} patches of an image (crop) "
            f"({VISUAL_TOPK.cli_flag})"
        )
    return budget


def require_budget(config: PruningConfig) -> None:
    """The ``check`` of a method that has no budget of its own."""
    if config.visual_topk is None:
        raise PruningConfigError(
            f"visual_pruning={config.visual_pruning!r} needs visual_topk >= 1 ({VISUAL_TOPK.cli_flag}), got None"
        )


def gather_rows(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tokens [B, n, C] at indices [B, k] (all valid) -> [B, k, C]."""
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def fp32(weight: torch.Tensor | None) -> torch.Tensor | None:
    """A weight detached in fp32: the baselines score and select in fp32 whatever the tower's dtype."""
    return None if weight is None else weight.detach().float()

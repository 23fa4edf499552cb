"""Where the long tail starts: the inflection point of the sorted CLS-similarity curve (paper eq. 2-3).

Conventions (docs/method.md, "Stage 1"): scores are sorted descending, d_1 >= ... >= d_n; the split point
i* = argmax over i in {1..n-1} of f(i) = (n - i)(d_1 - d_i) / (d_1 - d_n) is 1-based and the smallest i wins ties.
A flat curve (d_1 == d_n) has no head and no tail: we report i* = n, "everything is head", so that every keep rule
built on i* keeps all n patches.

Everything works on a leading batch shape [...] with no Python loop over samples, on any device.
"""

from __future__ import annotations

import math

import torch

# ceil() of a quotient that is an integer in decimal (6 / 0.24 = 25) must not be bumped to the next integer by binary
# rounding (6 / 0.24 == 25.000000000000004 in float64).
_CEIL_TOLERANCE = 1e-9


def check_scores(scores: torch.Tensor, name: str = "scores") -> None:
    """Reject what the sort-based split cannot handle, naming the argument; NaN would silently sort anywhere."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() < 1 or scores.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., n] with n >= 1, got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    if not bool(torch.isfinite(scores).all()):
        bad = "NaN" if bool(torch.isnan(scores).any()) else "inf"
        raise ValueError(f"{name} contain {bad} values; CLS-similarity scores must be finite")


def _sorted_curve(scores: torch.Tensor) -> torch.Tensor:
    """The descending curve in float64, so that ties and near-ties in f(i) are decided the same way everywhere."""
    return torch.sort(scores.detach().to(torch.float64), dim=-1, descending=True).values


def split_objective(scores: torch.Tensor) -> torch.Tensor:
    """f(i) of eq. 2 for i = 1..n-1 (entry i-1), float64, shape [..., n-1]; zeros for a flat curve.

    Exposed for plots and tests; ``inflection_point`` maximises the same numerator without dividing by d_1 - d_n.
    """
    check_scores(scores)
    curve = _sorted_curve(scores)
    numerator = _numerator(curve)
    span = (curve[..., 0] - curve[..., -1]).unsqueeze(-1)
    return torch.where(span > 0, numerator / torch.where(span > 0, span, 1.0), torch.zeros_like(numerator))


def _numerator(curve: torch.Tensor) -> torch.Tensor:
    """(n - i)(d_1 - d_i) for i = 1..n-1 over a descending float64 curve [..., n]."""
    n = curve.shape[-1]
    right_of_split = torch.arange(n - 1, 0, -1, device=curve.device, dtype=curve.dtype)  # n - i for i = 1..n-1
    return right_of_split * (curve[..., :1] - curve[..., : n - 1])


def inflection_point(scores: torch.Tensor) -> torch.Tensor:
    """i* of eq. 3 for unsorted scores [..., n]: int64 [...], 1-based, smallest i on ties, n for a flat curve.

    The division by d_1 - d_n is a positive constant per sample, so the argmax is taken over the numerator alone:
    dividing could round two different values onto one and change which index wins.
    """
    check_scores(scores)
    curve = _sorted_curve(scores)
    n = curve.shape[-1]
    if n == 1:
        return torch.ones(curve.shape[:-1], dtype=torch.long, device=curve.device)
    # torch.argmax returns the first maximal index, which is the smallest i.
    split = torch.argmax(_numerator(curve), dim=-1) + 1
    flat = curve[..., 0] == curve[..., -1]
    return torch.where(flat, torch.full_like(split, n), split)


def ceil_div_alpha(inflection: torch.Tensor, alpha: float) -> torch.Tensor:
    """ceil(i* / alpha) as int64, tolerant to binary rounding of alpha."""
    return torch.ceil(inflection.to(torch.float64) / alpha - _CEIL_TOLERANCE).to(torch.long)


def ceil_times(value: torch.Tensor | float, factor: float) -> torch.Tensor | int:
    """ceil(value * factor), tolerant to binary rounding (0.3 * 10 must give 3, not 4)."""
    if isinstance(value, torch.Tensor):
        return torch.ceil(value.to(torch.float64) * factor - _CEIL_TOLERANCE).to(torch.long)
    return math.ceil(value * factor - _CEIL_TOLERANCE)


def clamp_keep(keep: torch.Tensor | int, n: int, min_keep: int) -> torch.Tensor:
    """min(n, max(min(min_keep, n), keep)) as int64: the bounds every keep rule obeys."""
    return torch.as_tensor(keep, dtype=torch.long).clamp(min=min(min_keep, n), max=n)


def longtail_keep(inflection: torch.Tensor, n: int, alpha: float, min_keep: int = 1) -> torch.Tensor:
    """The paper's keep rule from i*: k = min(n, max(min_keep, ceil(i* / alpha))), int64 like ``inflection``.

    We read "i* multiplied by a smoothing coefficient alpha" as scaling by 1/alpha: it is the only reading that gives
    the paper's token counts (docs/method.md). The literal reading is the ``alpha_times`` rule. This is the one
    implementation: the ``longtail`` rule (pruning.strategies) and ``keep_count`` both call it.
    """
    return clamp_keep(ceil_div_alpha(inflection, alpha), n, min_keep).to(inflection.device)


def keep_count(scores: torch.Tensor, alpha: float = 0.24, min_keep: int = 1) -> torch.Tensor:
    """``longtail_keep`` straight from unsorted scores [..., n]: int64 [...]."""
    if not (0 < alpha <= 1):
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if min_keep < 1:
        raise ValueError(f"min_keep must be >= 1, got {min_keep!r}")
    return longtail_keep(inflection_point(scores), scores.shape[-1], alpha, min_keep)

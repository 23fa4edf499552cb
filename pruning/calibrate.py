"""Calibrating stage 1 on a data set: the distribution of i* and of the kept count k per keep rule, the alpha that
reaches a target mean count, and how strongly the kept patches lie on objects.

Why: alpha = 0.24 was tuned on CLIP ViT-L/14 as LLaVA-1.5 fine-tuned it; another checkpoint (or the demo model) has
another CLS curve, so the same alpha keeps another number of tokens. The mean kept count is a monotone step function
of alpha, so the alpha that reaches a target mean is found by bisection over the stored scores without running the
tower again. The default target is the paper's 127 of 576 tokens, scaled to the tower's n.

These are the algorithms, on scores and masks only; the command that scores a data set with a checkpoint's tower is
``python -m eval.tools.calibrate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pruning.config import PruningConfig
from pruning.strategies import apply_strategy

PAPER_KEPT, PAPER_N = 127, 576
ALPHA_RULES = ("longtail", "alpha_times")


def distribution(values: torch.Tensor) -> dict[str, float]:
    """Mean, spread and quantiles of a 1D tensor of counts."""
    values = values.detach().double().flatten()
    if values.numel() == 0:
        raise ValueError("distribution of an empty set of values")
    quantiles = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {
        "mean": values.mean().item(),
        "std": values.std(unbiased=False).item(),
        "min": values.min().item(),
        "p10": quantiles[0],
        "median": quantiles[1],
        "p90": quantiles[2],
        "max": values.max().item(),
    }


def kept_counts(scores: torch.Tensor, config: PruningConfig) -> torch.Tensor:
    """k per image [N] under ``config``'s rule, by the rule's own code (pruning.strategies)."""
    return apply_strategy(scores, config).keep


_GAP_TOLERANCE = 1e-9  # mean counts closer than this to each other are equally close to the target


def alpha_for_target(
    mean_kept: Callable[[float], float], target: float, *, grows: bool = False, decimals: int = 6
) -> float:
    """The alpha in (0, 1] with ``decimals`` decimals whose mean kept count ``mean_kept(alpha)`` is closest to
    ``target``; of equally close ones the largest (the same count here, fewer tokens where the curves are flatter).

    ``mean_kept`` must be monotone in alpha: non-increasing (the long-tail rule, k = ceil(i* / alpha)) or, with
    ``grows``, non-decreasing (``alpha_times``). The distance to the target then falls and rises along the grid, so two
    bisections over the 10**decimals grid values find the answer with about 2 * log2(10**decimals) evaluations. A
    target out of reach gives the grid end nearest to it (alpha 1 for a long-tail target below the mean i*).
    """
    if not target > 0:
        raise ValueError(f"the target mean count must be > 0, got {target!r}")
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 9:
        raise ValueError(f"decimals must be an integer in 0..9, got {decimals!r}")
    steps = 10**decimals  # alpha = step / steps, step in 1..steps
    means: dict[int, float] = {}

    def distance(step: int) -> float:
        if step not in means:
            means[step] = float(mean_kept(step / steps))
        return abs(means[step] - target)

    def past_target(step: int) -> bool:
        distance(step)
        return means[step] >= target if grows else means[step] <= target

    low, high = 1, steps + 1  # the first step past the target; steps + 1 when none is
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if past_target(middle) else (middle + 1, high)
    crossing = low
    closest = min(distance(step) for step in (crossing - 1, crossing) if 1 <= step <= steps)
    if crossing > steps or distance(crossing) > closest + _GAP_TOLERANCE:
        return max(crossing - 1, 1) / steps  # the last step before the target is the only closest one
    low, high = crossing, steps  # beyond the crossing distances only grow: the last step still as close as the best
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if distance(middle) <= closest + _GAP_TOLERANCE else (low, middle - 1)
    return low / steps


def alpha_for_mean(
    scores: torch.Tensor, target: float, config: PruningConfig, rule: str = "longtail", decimals: int = 6
) -> tuple[float, float]:
    """(alpha, mean k) for scores [N, n]: ``alpha_for_target`` with k by the rule's own code (pruning.strategies)."""
    if rule not in ALPHA_RULES:
        raise ValueError(f"alpha only drives the rules {ALPHA_RULES}, not {rule!r}")

    def mean(alpha: float) -> float:
        return kept_counts(scores, config.merged(visual_pruning=rule, alpha=alpha)).double().mean().item()

    alpha = alpha_for_target(mean, target, grows=rule == "alpha_times", decimals=decimals)
    return alpha, mean(alpha)


def calibrate(
    scores: torch.Tensor, inflection: torch.Tensor, config: PruningConfig, target_count: float | None = None
) -> dict[str, Any]:
    """The calibration report for scores [N, n] and their i* [N]: distributions per rule and the target alpha.

    Rules: long tail at the config's alpha and at the target alpha, the literal alpha * i* reading, fixed top-k at
    the long tail's mean count (the paper's Table 1 comparison), and no pruning.
    """
    if scores.dim() != 2 or inflection.shape != scores.shape[:1]:
        raise ValueError(
            f"need scores [N, n] and inflection [N], got {tuple(scores.shape)} and {tuple(inflection.shape)}"
        )
    n = scores.shape[1]
    target = target_count if target_count is not None else PAPER_KEPT * n / PAPER_N
    longtail = config.merged(visual_pruning="longtail")
    default_k = kept_counts(scores, longtail)
    alpha, reached = alpha_for_mean(scores, target, config, "longtail")
    literal_alpha, literal_reached = alpha_for_mean(scores, target, config, "alpha_times")
    same_count = max(1, round(default_k.double().mean().item()))
    rules = {
        f"longtail (alpha={config.alpha})": default_k,
        f"longtail (alpha={alpha}, target)": kept_counts(scores, longtail.merged(alpha=alpha)),
        f"alpha_times (alpha={config.alpha})": kept_counts(scores, config.merged(visual_pruning="alpha_times")),
        f"topk (k={same_count})": kept_counts(scores, config.merged(visual_pruning="topk", visual_topk=same_count)),
        "none": torch.full_like(default_k, n),
    }
    return {
        "images": scores.shape[0],
        "n": n,
        "target_count": target,
        "inflection": distribution(inflection),
        "kept": {name: distribution(k) for name, k in rules.items()},
        "alpha_for_target": {"longtail": alpha, "mean_kept": reached},
        "alpha_for_target_alpha_times": {"alpha_times": literal_alpha, "mean_kept": literal_reached},
    }


def patches_on_objects(mask: torch.Tensor, grid_side: int) -> torch.Tensor:
    """[grid_side**2] bool in raster order: which patches overlap an object of ``mask`` [H, W] (non-zero = object)."""
    height, width = mask.shape
    if height % grid_side or width % grid_side:
        raise ValueError(f"a {height}x{width} mask does not split into a {grid_side}x{grid_side} patch grid")
    cells = (mask != 0).reshape(grid_side, height // grid_side, grid_side, width // grid_side)
    return cells.any(dim=3).any(dim=1).flatten()


def object_concentration(kept: list[torch.Tensor], masks: list[torch.Tensor], grid_side: int) -> dict[str, float]:
    """How strongly a rule keeps object patches: the share of kept patches that overlap an object, over the share of
    the image the objects cover (pixels). 1 = no better than chance; the demo's acceptance asks for >= 3.

    ``kept``: per image the kept patch indices (raster order, -1 padding ignored); ``masks``: per image [H, W].
    """
    if len(kept) != len(masks) or not masks:
        raise ValueError(f"need one mask per image, got {len(kept)} index sets and {len(masks)} masks")
    on_object = kept_total = 0
    object_pixels = pixels = 0
    for indices, mask in zip(kept, masks):
        overlap = patches_on_objects(mask, grid_side)
        indices = indices[indices >= 0]
        on_object += int(overlap[indices].sum())
        kept_total += indices.numel()
        object_pixels += int((mask != 0).sum())
        pixels += mask.numel()
    kept_share, cover = on_object / max(kept_total, 1), object_pixels / pixels
    return {
        "kept_on_objects": kept_share,
        "object_cover": cover,
        "concentration": kept_share / cover if cover else float("nan"),
        "mean_kept": kept_total / len(masks),
    }


def format_report(report: dict[str, Any]) -> str:
    columns = ("mean", "std", "min", "p10", "median", "p90", "max")
    lines = [f"{report['images']} images, n = {report['n']} patches per image", ""]
    lines.append("| counts | " + " | ".join(columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    rows = {"i*": report["inflection"], **{f"k, {name}": d for name, d in report["kept"].items()}}
    for name, stats in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{stats[c]:.1f}" for c in columns) + " |")
    found = report["alpha_for_target"]
    literal = report["alpha_for_target_alpha_times"]
    lines += [
        "",
        f"target mean count {report['target_count']:.1f}: longtail alpha = {found['longtail']} "
        f"(mean k {found['mean_kept']:.1f}); literal alpha_times alpha = {literal['alpha_times']} "
        f"(mean k {literal['mean_kept']:.1f})",
    ]
    return "\n".join(lines)

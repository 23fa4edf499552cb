"""Calibrate stage 1 on a data set: the distribution of i* and of the kept count k per keep rule, and the alpha that
reaches a target mean count.

    python -m pruning.calibrate --model-path liuhaotian/llava-v1.5-7b \\
        --question-file playground/data/eval/pope/llava_pope_test.jsonl --image-folder playground/data/eval/pope/val2014 \\
        [--target-count 127] [--max-images 500] [--output-json calibration.json]

Why: alpha = 0.24 was tuned on CLIP ViT-L/14 as LLaVA-1.5 fine-tuned it; another checkpoint (or the demo model) has
another CLS curve, so the same alpha keeps another number of tokens. The mean kept count is a non-increasing step
function of alpha, so the alpha that reaches a target mean is found by bisection over the stored scores without
running the tower again. The default target is the paper's 127 of 576 tokens, scaled to the tower's n.

The algorithms here need only the scores; ``main`` is the one place that loads a model (as in pruning.visualize).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pruning.config import PruningConfig
from pruning.strategies import apply_strategy, scoring_config

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


def alpha_for_mean(
    scores: torch.Tensor, target: float, config: PruningConfig, rule: str = "longtail", steps: int = 60
) -> tuple[float, float]:
    """(alpha, mean k) with the mean kept count closest to ``target``; ties go to the larger alpha (fewer tokens).

    Bisection finds the smallest alpha whose mean is <= target; the step just below it is the other candidate.
    """
    if rule not in ALPHA_RULES:
        raise ValueError(f"alpha only drives the rules {ALPHA_RULES}, not {rule!r}")
    if not target > 0:
        raise ValueError(f"the target mean count must be > 0, got {target!r}")

    def mean(alpha: float) -> float:
        return kept_counts(scores, config.merged(visual_pruning=rule, alpha=alpha)).double().mean().item()

    # longtail: k shrinks as alpha grows; alpha_times: k grows with alpha. Bisect on the monotone direction.
    grows = rule == "alpha_times"
    low, high = 1e-6, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        above = mean(middle) > target
        if above != grows:
            low = middle
        else:
            high = middle
    # alphas with 6 decimals either side of the step, so the printed value is the one that was measured
    candidates = {math.floor(x * 1e6) / 1e6 for x in (low, high)} | {math.ceil(x * 1e6) / 1e6 for x in (low, high)}
    ranked = sorted((abs(mean(a) - target), -a, a) for a in candidates if 0 < a <= 1)
    best = ranked[0][2]
    return best, mean(best)


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Score the images of a question file with the checkpoint's tower, then print and optionally save the report.
    Bad input ends with one ``error:`` line, before the model loads."""
    from llava.utils import run_entry_point

    return run_entry_point(_calibrate, argv)


def _calibrate(argv: list[str] | None) -> dict[str, Any]:
    import argparse
    import json
    from pathlib import Path

    from llava.eval.runner import RunnerInputError
    from llava.mm_utils import load_image, process_images
    from llava.utils import add_model_args, check_before_loading, load_from_args, quiet_transformers
    from pruning.config import add_pruning_args, pruning_overrides

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--question-file", required=True, help="JSON lines with an 'image' field, or a JSON list")
    parser.add_argument("--image-folder", required=True)
    parser.add_argument("--target-count", type=float, default=None, help="mean kept count to reach (default 127/576*n)")
    parser.add_argument("--max-images", type=int, default=None, help="calibrate on the first N distinct images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-json", default=None)
    add_pruning_args(parser)
    args = parser.parse_args(argv)
    try:
        names = image_names(Path(args.question_file))
    except (OSError, ValueError, RunnerInputError) as err:
        raise SystemExit(f"error: {err}") from None
    names = names[: args.max_images] if args.max_images else names
    missing = [n for n in names if not (Path(args.image_folder) / n).is_file()]
    if missing:
        raise SystemExit(f"error: --image-folder {args.image_folder}: {len(missing)} images missing, e.g. {missing[0]}")
    check_before_loading(args, pruning_overrides(args))
    quiet_transformers()
    _, model, processor, _ = load_from_args(args, pruning_overrides(args))
    tower, config = model.get_vision_tower(), model.pruning_config
    scores, inflection = [], []
    with torch.no_grad():
        for start in range(0, len(names), args.batch_size):
            batch = [load_image(str(Path(args.image_folder) / n)) for n in names[start : start + args.batch_size]]
            pixels = process_images(batch, processor, model.config)
            if isinstance(pixels, list) or pixels.ndim != 4:
                raise SystemExit(
                    "error: pruning.calibrate scores one crop per image; anyres checkpoints are not supported"
                )
            out = tower.select(pixels.to(device=tower.device, dtype=tower.dtype), scoring_config(config))
            scores.append(out.scores.float().cpu())
            inflection.append(out.inflection.cpu())
    report = calibrate(torch.cat(scores), torch.cat(inflection), config, args.target_count)
    report["model_path"], report["question_file"] = args.model_path, args.question_file
    print(format_report(report))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output_json}")
    return report


def image_names(path) -> list[str]:
    """Distinct image names, in first-seen order, of a JSON-lines question file or a JSON list of records."""
    import json

    text = path.read_text(encoding="utf-8")
    rows = (
        json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    names: dict[str, None] = {}
    for number, row in enumerate(rows, 1):
        image = row.get("image") if isinstance(row, dict) else None
        if image is None:
            continue
        if not isinstance(image, str):
            raise ValueError(f"{path}: record {number}: 'image' must be a file name, found {image!r}")
        names.setdefault(image, None)
    if not names:
        raise ValueError(f"{path}: no record names an image")
    return list(names)


if __name__ == "__main__":
    main()

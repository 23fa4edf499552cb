"""Calibrate stage 1 on a data set: the distribution of i* and of the kept count k per keep rule, and the alpha that
reaches a target mean count.

    python -m eval.tools.calibrate --model-path liuhaotian/llava-v1.5-7b \\
        --question-file playground/data/eval/pope/llava_pope_test.jsonl --image-folder playground/data/eval/pope/val2014 \\
        [--target-count 127] [--max-images 500] [--output-json calibration.json]

Why: alpha = 0.24 was tuned on CLIP ViT-L/14 as LLaVA-1.5 fine-tuned it; another checkpoint (or the demo model) has
another CLS curve, so the same alpha keeps another number of tokens. The images are scored once by the checkpoint's
tower; the alpha that reaches a target mean is then found by bisection over the stored scores (pruning.calibrate).
The default target is the paper's 127 of 576 tokens, scaled to the tower's n.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from llava.eval.runner import RunnerInputError
from llava.mm_utils import load_image, process_images
from llava.utils import add_model_args, check_before_loading, load_from_args, quiet_transformers, run_entry_point
from pruning.calibrate import calibrate, format_report
from pruning.config import add_pruning_args, pruning_overrides
from pruning.strategies import scoring_config


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Score the images of a question file with the checkpoint's tower, then print and optionally save the report.
    Bad input ends with one ``error:`` line, before the model loads."""
    return run_entry_point(_calibrate, argv)


def _calibrate(argv: list[str] | None) -> dict[str, Any]:
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
                    "error: eval.tools.calibrate scores one crop per image; anyres checkpoints are not supported"
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


def image_names(path: Path) -> list[str]:
    """Distinct image names, in first-seen order, of a JSON-lines question file or a JSON list of records."""
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

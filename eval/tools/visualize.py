"""Paper Fig. 3 and Fig. 6 for one image: the sorted CLS-similarity curve with i* and k, and the kept patches.

    python -m eval.tools.visualize --model-path P --image-file F --out DIR

The checkpoint's tower scores the image with the pruning settings given (default --visual-pruning longtail); the
figures are drawn by pruning.visualize.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llava.mm_utils import load_image, process_images
from llava.utils import add_model_args, check_before_loading, load_from_args, quiet_transformers, run_entry_point
from pruning.config import add_pruning_args, pruning_overrides
from pruning.visualize import plot_kept_patches, plot_similarity_curve, tower_view


def main(argv: list[str] | None = None) -> list[Path]:
    """Bad input ends with one ``error:`` line, before the model loads."""
    return run_entry_point(_visualize, argv)


def _visualize(argv: list[str] | None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--out", required=True, help="folder for curve.png and kept_patches.png")
    add_pruning_args(parser)
    args = parser.parse_args(argv)
    overrides = pruning_overrides(args)
    overrides.setdefault("visual_pruning", "longtail")
    image = load_image(args.image_file)  # bad input fails before the model loads
    check_before_loading(args, overrides)
    quiet_transformers()
    _, model, processor, _ = load_from_args(args, overrides)
    tower = model.get_vision_tower()
    pixels = process_images([image], processor, model.config)
    if isinstance(pixels, list) or pixels.ndim != 4:
        raise SystemExit("eval.tools.visualize shows one 336px crop; multi-crop (anyres) checkpoints are not supported")
    with torch.no_grad():
        out = tower.select(pixels.to(device=tower.device, dtype=tower.dtype), model.pruning_config)
    if out.scores is None or out.inflection is None:
        raise SystemExit(
            f"error: --visual-pruning {model.pruning_config.visual_pruning} scores no patches; the curve needs a "
            "CLS-score keep rule (longtail, topk, ratio, alpha_times, random)"
        )
    n, inflection, kept = int(out.n[0]), int(out.inflection[0]), int(out.kept[0])
    out_dir = Path(args.out)
    curve = plot_similarity_curve(out.scores[0], inflection, kept, out_dir / "curve.png")
    view = tower_view(pixels[0], processor.image_mean, processor.image_std)
    patches = plot_kept_patches(view, out.indices[0][:kept], tower.num_patches_per_side, out_dir / "kept_patches.png")
    print(f"n={n} i*={inflection} kept={kept} ({model.pruning_config.describe()})\nwrote {curve}\nwrote {patches}")
    return [curve, patches]


if __name__ == "__main__":
    main()

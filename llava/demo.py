"""The README's main command: a miniature of the paper's Tables 1-2 on a CPU, in minutes.

    python -m llava.demo                                   # the committed demo model on the synthetic POPE set
    python -m llava.demo --num-images 100 --alpha 0.3      # a larger held-out set, another alpha
    python -m llava.demo --model-path liuhaotian/llava-v1.5-7b --device cuda \\
        --question-file playground/data/eval/pope/llava_pope_test.jsonl \\
        --image-folder playground/data/eval/pope/val2014 --annotation-dir playground/data/eval/pope/coco

It evaluates one checkpoint four times with exactly what the benchmark scripts run (the runner core, then the POPE
scorer ``python -m eval.pope``): no pruning, ours stage 1 (long-tail visual pruning at the checkpoint's alpha),
fixed top-k at stage 1's mean kept count (paper Table 1's comparison), and ours stages 1+2 (plus H2O KV eviction,
0.5 / 0.5). It prints the paper-style table, F1 per POPE category with the mean token counts in parentheses, and
writes the Fig. 3 curve and the Fig. 6 kept patches of the first image. On the synthetic set (held out: seed 1, the
model trained on seed 0) it also measures how strongly stage 1 keeps object patches, from the object masks.

The default model is ``playground/checkpoints/llava-v1.5-demo``, a 4 MB LLaVA-1.5 trained from scratch on synthetic
shapes by ``scripts/train_demo_model.sh`` (docs/demo.md). Pruning flags (``--alpha``, ``--visual-layer``, ...) change
the "ours" settings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from eval.synthetic import POPE_CATEGORIES
from llava.eval.model_vqa_loader import read_question_lines
from llava.eval.runner import RunnerInputError, check_images_exist, model_generate_fn, run
from llava.mm_utils import load_image, process_images
from llava.utils import add_model_args, load_from_args, quiet_transformers
from pruning import PruningConfig, add_pruning_args, pruning_overrides
from pruning.calibrate import object_concentration
from pruning.visualize import plot_kept_patches, plot_similarity_curve, tower_view

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "playground" / "checkpoints" / "llava-v1.5-demo"
DEMO_TOWER = REPO / "playground" / "checkpoints" / "llava-v1.5-demo-clip"
OUTPUT = REPO / "output" / "demo"
TEST_SEED = 1  # the demo model trained on seed 0
SETTINGS = ("none", "stage1", "topk", "stages12")
LABELS = {
    "none": "LLaVA-1.5 (no pruning)",
    "topk": "fixed top-k (same mean count)",
    "stage1": "ours, stage 1",
    "stages12": "ours, stages 1+2",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, require_model_path=False)
    parser.set_defaults(model_path=str(DEMO_MODEL))  # the committed demo model
    parser.add_argument("--question-file", default=None, help="POPE questions (default: the synthetic held-out set)")
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--annotation-dir", default=None, help="folder of coco_pope_<category>.json")
    parser.add_argument("--num-images", type=int, default=40, help="size of the synthetic held-out set")
    parser.add_argument("--output-dir", default=str(OUTPUT), help="answers, results, figures and summary.json")
    parser.add_argument("--conv-mode", default="vicuna_v1")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    add_pruning_args(parser)
    args = parser.parse_args(argv)
    given = [args.question_file, args.image_folder, args.annotation_dir]
    if any(given) and not all(given):
        parser.error("--question-file, --image-folder and --annotation-dir go together (default: the synthetic set)")
    if Path(args.model_path) == DEMO_MODEL and args.vision_tower is None:
        args.vision_tower = str(DEMO_TOWER)  # the config names the folder relative to the repository root
    return args


def synthetic_test_set(output: Path, num_images: int) -> Path:
    """The held-out synthetic set, generated on first use (deterministic, a few seconds)."""
    folder = output / f"synthetic-test-seed{TEST_SEED}-{num_images}"
    if not (folder / "llava_pope_test.jsonl").is_file():
        print(f"generating the held-out synthetic set ({num_images} images, seed {TEST_SEED}) in {folder} ...")
        command = [sys.executable, "-m", "eval.synthetic", "--out", str(folder), "--split", "test"]
        command += ["--num-images", str(num_images), "--seed", str(TEST_SEED)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # eval/ prepares data as its own command, as in the benchmark scripts
            raise SystemExit(f"error: generating the synthetic set failed:\n{done.stderr.strip()}")
    return folder


def settings(base: PruningConfig, topk: int | None) -> dict[str, PruningConfig]:
    off = base.merged(visual_pruning="none", kv_pruning="none")
    ours = off.merged(visual_pruning="longtail")
    out = {"none": off, "stage1": ours, "stages12": ours.merged(kv_pruning="h2o")}
    if topk is not None:
        out["topk"] = off.merged(visual_pruning="topk", visual_topk=topk)
    return out


def score_pope(annotation_dir: str, question_file: str, answers: Path, result_json: Path) -> dict[str, Any]:
    """The scorer runs as its own command, as in the benchmark scripts (eval/ only reads files)."""
    command = [sys.executable, "-m", "eval.pope", "--annotation-dir", annotation_dir, "--question-file", question_file]
    command += ["--result-file", str(answers), "--result-json", str(result_json)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: the POPE scorer failed:\n{done.stderr.strip()}")
    return json.loads(result_json.read_text(encoding="utf-8"))


def paper_table(results: dict[str, dict[str, Any]]) -> str:
    """F1 per category and mean, each with (visual tokens kept) and the last column the KV entries per layer."""
    header = ["method", *POPE_CATEGORIES, "mean F1", "visual tokens", "KV final"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in SETTINGS:
        if name not in results:
            continue
        result = results[name]
        metrics, tokens = result["metrics"], result["tokens"]
        visual = tokens.get("visual_after")
        cells = [f"{metrics[c]['f1']:.1f} ({visual:.0f})" for c in POPE_CATEGORIES]
        cells += [f"{result['headline']:.1f} ({visual:.0f})", f"{visual:.1f}", f"{tokens.get('kv_final', 0):.1f}"]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tower_pass(model, processor, names: list[str], folder: Path, config: PruningConfig) -> list[Any]:
    """Stage 1 on each image alone: (pixels, tower output) per image, for the figures and the mask statistics."""
    tower = model.get_vision_tower()
    out = []
    with torch.no_grad():
        for name in names:
            pixels = process_images([load_image(str(folder / name))], processor, model.config)
            out.append((pixels[0], tower.select(pixels.to(device=tower.device, dtype=tower.dtype), config)))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_transformers()
    output = Path(args.output_dir)
    masks_dir = None
    if args.question_file is None:
        data = synthetic_test_set(output, args.num_images)
        args.question_file, args.image_folder = str(data / "llava_pope_test.jsonl"), str(data / "images")
        args.annotation_dir, masks_dir = str(data / "coco"), data / "masks"
    try:
        samples = read_question_lines(args.question_file, args.image_folder)
        check_images_exist(samples)
    except (RunnerInputError, OSError) as err:
        raise SystemExit(f"error: {err}") from None

    tokenizer, model, processor, _ = load_from_args(args, pruning_overrides(args))
    base = model.pruning_config
    print(f"model: {args.model_path}\nquestions: {args.question_file} ({len(samples)})\n")
    results: dict[str, dict[str, Any]] = {}
    order = ["none", "stage1", "topk", "stages12"]
    topk = None
    for name in order:
        if name == "topk":
            topk = max(1, round(results["stage1"]["tokens"]["visual_after"]))
        config = settings(base, topk)[name]
        print(f"== {LABELS[name]}: {config.describe()}")
        folder = output / name
        generate = model_generate_fn(
            args.conv_mode,
            tokenizer,
            model,
            processor,
            temperature=0.0,
            max_new_tokens=args.max_new_tokens,
            pruning=config,
        )
        try:
            run(
                samples,
                folder / "answers.jsonl",
                generate,
                Path(args.model_path).name,
                args.batch_size,
                overwrite=True,
                progress=False,
            )
        except RunnerInputError as err:
            raise SystemExit(f"error: {err}") from None
        results[name] = score_pope(
            args.annotation_dir, args.question_file, folder / "answers.jsonl", folder / "result.json"
        )
        results[name]["pruning"] = config.to_dict()

    print("\nPOPE F1 (mean visual tokens per question in parentheses), paper Tables 1-2 in miniature:\n")
    print(paper_table(results))
    names = list(dict.fromkeys(s.image.name for s in samples if s.image is not None))
    stage1 = settings(base, topk)["stage1"]
    passes = tower_pass(model, processor, names, Path(args.image_folder), stage1)
    pixels, first = passes[0]
    tower = model.get_vision_tower()
    kept = int(first.kept[0])
    curve = plot_similarity_curve(first.scores[0], int(first.inflection[0]), kept, output / "fig3_curve.png")
    view = tower_view(pixels, processor.image_mean, processor.image_std)
    patches = plot_kept_patches(view, first.indices[0][:kept], tower.num_patches_per_side, output / "fig6_kept.png")
    print(f"\nfigures for {names[0]} (i* = {int(first.inflection[0])}, kept {kept}): {curve}, {patches}")
    summary: dict[str, Any] = {"model_path": args.model_path, "question_file": args.question_file, "results": {}}
    for name, result in results.items():
        summary["results"][name] = {
            "mean_f1": result["headline"],
            "tokens": result["tokens"],
            "pruning": result["pruning"],
        }
    if masks_dir is not None:
        masks = [torch.from_numpy(np.array(Image.open(masks_dir / name))) for name in names]
        concentration = {}
        for name, config in (("stage1", stage1), ("topk", settings(base, topk)["topk"])):
            outs = passes if name == "stage1" else tower_pass(model, processor, names, Path(args.image_folder), config)
            kept_sets = [out.indices[0][: int(out.kept[0])] for _, out in outs]
            concentration[name] = object_concentration(kept_sets, masks, tower.num_patches_per_side)
        summary["object_concentration"] = concentration
        found = concentration["stage1"]
        print(
            f"kept patches on objects (stage 1): {100 * found['kept_on_objects']:.1f} % of kept patches overlap an "
            f"object, which covers {100 * found['object_cover']:.1f} % of the image: {found['concentration']:.1f}x"
        )
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"summary: {output / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()

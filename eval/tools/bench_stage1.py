"""What stage 1 costs inside the vision tower: plain tower vs tower + CLS scoring + selection, in one run.

    python -m eval.tools.bench_stage1 [--batch-size 1] [--repeats 7] [--device cpu]

Geometry is LLaVA-1.5's tower (CLIP ViT-L/14-336: 24 layers, hidden 1024, 16 heads, 577 tokens) with random
weights: the cost of scoring and selecting does not depend on the weights. The kept count does (random weights give
a nearly flat CLS curve, so longtail keeps most patches), and it only changes the cost of the 'inside' mode, which is
therefore timed at a fixed count (--inside-keep), for information. Timings alternate between the variants so that
drift (thermal, other load) hits them alike; we report medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from pruning.config import PruningConfig
from pruning.scoring import cls_patch_scores
from pruning.strategies import apply_strategy
from pruning.visual import raster_order_indices, select_visual_tokens

VIT_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


def build_tower(device: str, dtype: torch.dtype) -> CLIPVisionModel:
    config = CLIPVisionConfig(**VIT_L_336, attn_implementation="sdpa")
    return CLIPVisionModel(config).to(device=device, dtype=dtype).eval()


def plain_tower(model: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """What LLaVA feeds the projector, computed without waste: hidden_states[-2][:, 1:] (23 of the 24 layers)."""
    hidden = model.pre_layrnorm(model.embeddings(pixels))
    for layer in model.encoder.layers[:-1]:
        hidden = layer(hidden, None)
    return hidden[:, 1:]


def upstream_tower(model: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """Upstream LLaVA's call: all 24 layers with every hidden state kept, then hidden_states[-2]."""
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


def selection_only(model: CLIPVisionModel, hidden: torch.Tensor, select: torch.Tensor, config: PruningConfig) -> None:
    """The stage 1 work alone, on precomputed hidden_states[visual_layer] and hidden_states[-2]."""
    scores = cls_patch_scores(model.encoder.layers[config.visual_layer], hidden, mode=config.visual_score)
    decision = apply_strategy(scores, config)
    indices, mask = raster_order_indices(decision.ranking, decision.keep)
    patches = select[:, 1:]
    gathered = torch.gather(patches, 1, indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    torch.where(mask.unsqueeze(-1), gathered, 0)


def time_once(fn: Callable[[], object], device: str, clock: Callable[[], float] = time.perf_counter) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = clock()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return clock() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="default: fp16 on GPU"
    )
    parser.add_argument("--visual-layer", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.24)
    parser.add_argument("--inside-keep", type=int, default=144, help="fixed kept count for the 'inside' timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="'cpu' times the process's CPU time: steadier than wall time on a shared CPU machine (CPU device only)",
    )
    parser.add_argument("--skip-upstream", action="store_true", help="do not time upstream's 24-layer call")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-size and --repeats must be >= 1, --warmup >= 0")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work; use it with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))

    torch.manual_seed(0)
    model = build_tower(args.device, dtype)
    pixels = torch.randn(args.batch_size, 3, 336, 336, device=args.device, dtype=dtype)
    config = PruningConfig(visual_pruning="longtail", alpha=args.alpha, visual_layer=args.visual_layer)
    inside = PruningConfig(
        visual_pruning="topk", visual_topk=args.inside_keep, visual_layer=args.visual_layer, visual_mode="inside"
    )
    with torch.inference_mode():
        hidden_states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        hidden, select = hidden_states[args.visual_layer], hidden_states[-2]
        variants: dict[str, Callable[[], object]] = {
            "plain tower (to hidden_states[-2])": lambda: plain_tower(model, pixels),
            f"tower + longtail select (layer {args.visual_layer})": lambda: select_visual_tokens(model, pixels, config),
            "scoring + selection alone": lambda: selection_only(model, hidden, select, config),
            f"tower, 'inside' mode, {args.inside_keep} kept": lambda: select_visual_tokens(model, pixels, inside),
        }
        if not args.skip_upstream:
            variants["upstream call (24 layers, all hidden states)"] = lambda: upstream_tower(model, pixels)
        for fn in variants.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            names = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in names:
                times[name].append(time_once(variants[name], args.device, clock))
        kept = select_visual_tokens(model, pixels, config).kept.tolist()

    medians = {name: statistics.median(values) for name, values in times.items()}
    plain = medians["plain tower (to hidden_states[-2])"]
    pruned = medians[f"tower + longtail select (layer {args.visual_layer})"]
    alone = medians["scoring + selection alone"]
    threads = torch.get_num_threads() if args.device == "cpu" else "-"
    print(
        f"device {args.device} ({dtype}), batch {args.batch_size}, repeats {args.repeats}, threads {threads}, "
        f"{args.clock} clock"
    )
    print(f"kept visual tokens (random weights): {kept} of 576")
    for name, value in medians.items():
        print(f"  {name:<48} {value * 1000:10.2f} ms  ({value / plain:6.3f} x plain)")
    print(f"selection overhead, tower + select vs plain:  {100 * (pruned - plain) / plain:+.2f} % of tower time")
    print(f"selection overhead, measured alone:           {100 * alone / plain:+.2f} % of tower time")


if __name__ == "__main__":
    main()

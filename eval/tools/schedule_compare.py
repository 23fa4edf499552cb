"""The measured comparison of docs/schedules.md: accuracy against prefill FLOPs on the demo model for G-Search,
P-Sigmoid, FastV, PyramidDrop and our stages, each LLM-side method and stage 1 set to the same FLOPs budgets.

    python -m eval.tools.schedule_compare --figure docs/schedules.png    # the docs' table and figure (demo model)
    python -m eval.tools.schedule_compare --budgets 0.5 --trials 6       # fewer points, quicker

Two synthetic POPE sets (eval.synthetic): the calibration set (seed 2, ``--num-images``), on which G-Search and
P-Sigmoid search and every method's setting is solved for each budget, and the test set (seed 1, ``--test-images``,
the demo's held-out set), on which everything is measured. Prefill FLOPs are ``eval.roofline``'s count of each decoder
layer at the tokens it holds, summed (``eval.tools.gsearch.PrefillCost``), relative to the unpruned model; a
method's setting for a budget is the one whose FLOPs on the calibration samples come closest to it:

- FastV at ``--fastv-k`` (default 1: the demo LLM has 3 layers; FastV's K = 2 of 32 is as shallow): its R;
- PyramidDrop at its layers 8, 16, 24 scaled to the depth (``round(l L / 32)``, deduplicated): its lambda (ratios
  lambda, lambda^2, ...);
- ours, stage 1 (long-tail pruning in the tower): its alpha, from the tower's scores of the calibration images;
  ours, stages 1+2 (+ H2O, 0.5 / 0.5): the same alpha (stage 2 evicts KV entries while decoding; the prefill is
  stage 1's);
- P-Sigmoid: optimised for the budget (``--trials``, ``--seed``); G-Search: one point, its own FLOPs; and G-Search
  on top of stage 1 (the checkpoint's alpha; the schedule's fractions apply to each sample's adaptive count).

Written to ``--out-dir``: the Markdown table (``table.md``), everything measured (``results.json``) and the figure
(``--figure``, default ``<out-dir>/schedules.png``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from eval.tools.gsearch import (
    CALIBRATION_SEED,
    Calibration,
    SampleTokens,
    demo_benchmark,
    fraction_grid,
    greedy_search,
    schedule_config,
    synthetic_folder,
)
from eval.tools.psigmoid import optimise
from llava.demo import DEMO_MODEL, DEMO_TOWER, TEST_SEED
from llava.mm_utils import load_image, process_images
from llava.utils import add_model_args, check_before_loading, load_from_args, quiet_transformers, run_entry_point
from pruning import PruningConfig
from pruning.calibrate import alpha_for_target, kept_counts
from pruning.strategies import scoring_config

METHODS = ("FastV", "PyramidDrop", "ours, stage 1", "ours, stages 1+2", "P-Sigmoid")
PDROP_OFFICIAL = (8, 16, 24)  # of 32 layers
PDROP_RATIO_POWERS = (1, 2, 3)  # lambda, lambda^2, lambda^3 (official: 0.5, 0.25, 0.125)


# ---- a setting per budget -------------------------------------------------------------------------------------------
def closest(ratio: Callable[[float], float], budget: float, low: float, high: float, grows: bool) -> float:
    """The parameter in [low, high], on a 1e-4 grid, whose FLOPs ratio is closest to ``budget``; ``ratio`` is monotone
    (non-decreasing in the parameter with ``grows``)."""
    steps = round((high - low) * 10_000)
    value = lambda step: low + step / 10_000  # noqa: E731
    lo, hi = 0, steps  # the first step at or past the budget
    while lo < hi:
        mid = (lo + hi) // 2
        past = ratio(value(mid)) >= budget if grows else ratio(value(mid)) <= budget
        lo, hi = (lo, mid) if past else (mid + 1, hi)
    candidates = [s for s in (lo - 1, lo) if 0 <= s <= steps]
    best = min(candidates, key=lambda s: abs(ratio(value(s)) - budget))
    return round(value(best), 4)


def pdrop_layers(layers: int) -> list[int]:
    """PyramidDrop's official layers 8, 16, 24 of 32, scaled to ``layers`` (each at least 1), deduplicated."""
    return sorted({min(layers - 1, max(1, round(layer * layers / 32))) for layer in PDROP_OFFICIAL})


def fastv_counts(k: int, ratio: float, layers: int) -> Callable[[SampleTokens], list[int]]:
    def counts(sample: SampleTokens) -> list[int]:  # round(n (1 - R)) from layer K, fastv.kept_count's rule
        kept = round(sample.visual * (1 - Fraction(str(ratio))))
        return [sample.visual] * k + [kept] * (layers - k)

    return counts


def pdrop_counts(at: Sequence[int], lam: float, layers: int) -> Callable[[SampleTokens], list[int]]:
    ratios = [round(lam**power, 4) for power in PDROP_RATIO_POWERS[: len(at)]]

    def counts(sample: SampleTokens) -> list[int]:  # int(n * ratio_s) from stage s's layer, pdrop.stage_counts
        per_layer, held = [], sample.visual
        for layer in range(layers):
            if layer in at:
                held = min(held, int(sample.visual * Fraction(str(ratios[at.index(layer)]))))
            per_layer.append(held)
        return per_layer

    return counts


class TowerCounts:
    """Stage 1's kept count per calibration image at any alpha, from one pass of the tower (its CLS scores)."""

    def __init__(self, model, processor, calibration: Calibration, base: PruningConfig):
        names = list(dict.fromkeys(str(s.image) for s in calibration.samples))
        tower = model.get_vision_tower()
        scores = []
        with torch.no_grad():
            for start in range(0, len(names), 16):
                images = [load_image(name) for name in names[start : start + 16]]
                pixels = process_images(images, processor, model.config)
                out = tower.select(pixels.to(device=tower.device, dtype=tower.dtype), scoring_config(base))
                scores.append(out.scores.float().cpu())
        self.scores, self.index = torch.cat(scores), {name: i for i, name in enumerate(names)}
        self.image_of = [self.index[str(s.image)] for s in calibration.samples]

    def counts(self, config: PruningConfig) -> list[int]:
        """Per calibration sample (in order), the visual tokens stage 1 keeps under ``config``."""
        per_image = kept_counts(self.scores, config).tolist()
        return [int(per_image[i]) for i in self.image_of]


# ---- the run ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, require_model_path=False)
    parser.set_defaults(model_path=str(DEMO_MODEL))
    parser.add_argument("--budgets", default="0.45,0.6,0.75", help="prefill FLOPs budgets, fractions of the unpruned")
    parser.add_argument("--num-images", type=int, default=12, help="calibration set (seed 2)")
    parser.add_argument("--test-images", type=int, default=40, help="test set (seed 1, the demo's)")
    parser.add_argument("--fastv-k", type=int, default=1)
    parser.add_argument("--trials", type=int, default=8, help="P-Sigmoid trials per budget")
    parser.add_argument("--seed", type=int, default=0, help="P-Sigmoid's seed")
    parser.add_argument("--tolerance", type=float, default=1.0, help="G-Search's accepted drop (F1 points)")
    parser.add_argument("--step", type=float, default=0.05, help="G-Search's grid")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--out-dir", default="output/schedules/compare")
    parser.add_argument("--figure", default=None, help="the PNG to write (default: <out-dir>/schedules.png)")
    args = parser.parse_args(argv)
    try:
        args.budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        parser.error(f"--budgets must be comma-separated fractions, got {args.budgets!r}")
    if not all(0 < b <= 1 for b in args.budgets):
        parser.error(f"--budgets must be in (0, 1], got {args.budgets}")
    if Path(args.model_path) == DEMO_MODEL and args.vision_tower is None:
        args.vision_tower = str(DEMO_TOWER)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_entry_point(_main, argv)


def _main(argv: list[str] | None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out_dir)
    check_before_loading(args)
    quiet_transformers()
    loaded = load_from_args(args)
    model, processor = loaded[1], loaded[2]
    benchmark = demo_benchmark()
    options = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    calibration = Calibration(
        loaded, args.model_path, benchmark, synthetic_folder(out, args.num_images, CALIBRATION_SEED), **options
    )
    test = Calibration(
        loaded, args.model_path, benchmark, synthetic_folder(out, args.test_images, TEST_SEED), **options
    )
    base = model.pruning_config.merged(visual_pruning="none", kv_pruning="none", llm_pruning="none")
    layers, cost = calibration.layers, calibration.cost
    candidate = out / "candidate.json"
    unpruned = calibration.evaluate(base)
    samples = [SampleTokens.from_stats(t) for t in unpruned.tokens]
    print(f"calibration: {len(calibration.samples)} questions, F1 {unpruned.metric:.2f} unpruned")

    def score(keep: tuple[float, ...]) -> float:
        return calibration.evaluate(schedule_config(base, keep, candidate)).metric

    searches: dict[str, Any] = {}

    def g_search(name: str, start_from: PruningConfig) -> PruningConfig:
        tick, before = time.perf_counter(), calibration.evaluations

        def score_from(keep: tuple[float, ...]) -> float:
            return calibration.evaluate(schedule_config(start_from, keep, candidate)).metric

        found = greedy_search(layers, fraction_grid(args.step), score_from, args.tolerance)
        searches[name] = {
            "keep": list(found.keep),
            "evaluations": calibration.evaluations - before,
            "seconds": round(time.perf_counter() - tick, 1),
        }
        print(f"{name}: {list(found.keep)} ({searches[name]['evaluations']} evaluations)")
        return schedule_config(start_from, found.keep, out / f"{name.replace(' ', '-').replace('+-', '')}.json")

    stage1 = base.merged(visual_pruning="longtail")
    runs: list[dict[str, Any]] = [
        {"method": "LLaVA-1.5 (no pruning)", "budget": None, "config": base},
        {"method": "G-Search", "budget": None, "config": g_search("G-Search", base)},
        {"method": "ours, stage 1 + G-Search", "budget": None, "config": g_search("stage 1 + G-Search", stage1)},
    ]
    tower = TowerCounts(model, processor, calibration, base)
    at = pdrop_layers(layers)
    unpruned_ops = cost.unpruned(samples)
    for budget in args.budgets:
        r = closest(lambda r: cost.ratio(samples, fastv_counts(args.fastv_k, r, layers)), budget, 0, 1, grows=False)
        runs.append({"method": "FastV", "budget": budget, "config": base.merged(
            llm_pruning="fastv", fastv_k=args.fastv_k, fastv_ratio=r)})  # fmt: skip
        lam = closest(lambda x: cost.ratio(samples, pdrop_counts(at, x, layers)), budget, 0.0001, 1, grows=True)
        ratios = ",".join(f"{round(lam**p, 4):g}" for p in PDROP_RATIO_POWERS[: len(at)])
        runs.append({"method": "PyramidDrop", "budget": budget, "config": base.merged(
            llm_pruning="pdrop", pdrop_layers=",".join(map(str, at)), pdrop_ratios=ratios)})  # fmt: skip

        def stage1_ratio(alpha: float) -> float:
            kept = tower.counts(stage1.merged(alpha=alpha))
            total = sum(cost.prefill([s.text + k] * layers) for s, k in zip(samples, kept))
            return total / unpruned_ops

        alpha = alpha_for_target(stage1_ratio, budget, decimals=4)
        runs.append({"method": "ours, stage 1", "budget": budget, "config": stage1.merged(alpha=alpha)})
        runs.append({"method": "ours, stages 1+2", "budget": budget, "config": stage1.merged(
            alpha=alpha, kv_pruning="h2o")})  # fmt: skip
        tick, before = time.perf_counter(), calibration.evaluations
        tuned = optimise(
            layers,
            score,
            lambda schedule: cost.schedule_ratio(samples, schedule),
            budget,
            trials=args.trials,
            seed=args.seed,
            progress=True,
        )
        name = f"P-Sigmoid @ {budget:g}"
        searches[name] = {
            "keep": list(tuned.keep),
            "params": tuned.params,
            "evaluations": calibration.evaluations - before,
            "seconds": round(time.perf_counter() - tick, 1),
        }
        print(f"{name}: {list(tuned.keep)} ({searches[name]['evaluations']} evaluations)")
        path = out / f"psigmoid-{budget:g}.json"
        runs.append({"method": "P-Sigmoid", "budget": budget, "config": schedule_config(base, tuned.keep, path)})

    rows = []
    for run in runs:
        result = test.evaluate(run["config"])
        tokens = result.tokens
        per_layer = [t.get("visual_per_layer") or [t.get("visual_after", 0)] * layers for t in tokens]
        rows.append(
            {
                "method": run["method"],
                "budget": run["budget"],
                "setting": run["config"].describe(),
                "f1": result.metric,
                "prefill_flops": test.cost.measured_ratio(tokens),
                "visual_per_layer": [sum(c[i] for c in per_layer) / len(per_layer) for i in range(layers)],
                "kv_final": sum(t.get("kv_final", 0) for t in tokens) / len(tokens),
                "seconds": round(result.seconds, 1),
            }
        )
        print(f"  {rows[-1]['method']:<24} F1 {result.metric:6.2f}  FLOPs {100 * rows[-1]['prefill_flops']:5.1f} %")
    summary = {
        "model_path": args.model_path,
        "calibration": {"question_file": calibration.run.question_file, "questions": len(calibration.samples)},
        "test": {"question_file": test.run.question_file, "questions": len(test.samples)},
        "settings": {k: v for k, v in vars(args).items() if k not in ("device",)},
        "searches": searches,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = markdown(summary)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    figure = Path(args.figure) if args.figure else out / "schedules.png"
    plot(summary, figure)
    print(f"\n{table}\n\nwrote {out / 'results.json'}, {out / 'table.md'}, {figure} ({summary['seconds']:.0f} s)")
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| budget | method | setting | POPE F1 | prefill FLOPs | visual tokens per layer | KV final |",
        "|---:|---|---|---:|---:|---|---:|",
    ]
    for row in summary["rows"]:
        budget = "-" if row["budget"] is None else f"{100 * row['budget']:.0f} %"
        per_layer = " / ".join(f"{v:.0f}" for v in row["visual_per_layer"])
        lines.append(
            f"| {budget} | {row['method']} | {row['setting']} | {row['f1']:.1f} | {100 * row['prefill_flops']:.1f} % "
            f"| {per_layer} | {row['kv_final']:.0f} |"
        )
    lines += ["", "| search | schedule | calibration evaluations | seconds |", "|---|---|---:|---:|"]
    for name, search in summary["searches"].items():
        keep = ", ".join(f"{v:g}" for v in search["keep"])
        lines.append(f"| {name} | [{keep}] | {search['evaluations']} | {search['seconds']:.0f} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    markers = {"FastV": "s", "PyramidDrop": "^", "ours, stage 1": "o", "ours, stages 1+2": "D", "P-Sigmoid": "*"}
    for method, marker in markers.items():
        points = sorted((r["prefill_flops"], r["f1"]) for r in summary["rows"] if r["method"] == method)
        if points:
            axis.plot([100 * x for x, _ in points], [y for _, y in points], marker=marker, label=method)
    for row in summary["rows"]:
        if row["budget"] is None:
            marker = {"G-Search": "X", "ours, stage 1 + G-Search": "h"}.get(row["method"], "P")
            axis.scatter([100 * row["prefill_flops"]], [row["f1"]], marker=marker, s=90, zorder=3, label=row["method"])
    for budget in summary["settings"]["budgets"]:
        axis.axvline(100 * budget, color="grey", linewidth=0.6, linestyle=":")
    axis.set_xlabel("prefill FLOPs, % of the unpruned model (eval.roofline per layer)")
    axis.set_ylabel("POPE F1 (synthetic test set)")
    axis.set_title(f"demo model, {summary['test']['questions']} held-out questions")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()

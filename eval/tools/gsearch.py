"""G-Search (Zhao et al., arXiv 2412.00556, Scenario I: "cut the cost without a drop"): on a calibration set, from
the shallow decoder layers to the deep ones, the fewest visual tokens each layer needs without a drop on the
calibration metric, written as a schedule file for ``--llm-pruning schedule --schedule FILE``.

    python -m eval.tools.gsearch --out output/schedules/gsearch.json     # the demo model, a synthetic calibration set
    python -m eval.tools.gsearch --model-path P --benchmark pope --data-dir DIR --out s.json   # a benchmark folder
    python -m eval.tools.gsearch --visual-pruning longtail --out s.json  # after stage 1: fractions of its count

The rule as implemented (docs/schedules.md): m0 is the calibration metric with nothing dropped inside the LLM (with
the run's vision-side method and KV policy). Layer 0 keeps everything. For l = 1, ..., L-1 in turn, r_l is the
smallest fraction on the grid (multiples of ``--step``, at most r_{l-1}) for which the schedule
(1, r_1, ..., r_{l-1}, r_l, r_l, ..., r_l) -- the deeper layers inheriting r_l, the most they may keep under the
paper's assumption that the number of essential tokens never grows with depth -- scores at least m0 - tolerance.
That assumption also makes the test monotone in r_l, so the smallest is found by bisection over the grid. If a
schedule passes exactly when it keeps at least e_l tokens at every layer (e non-increasing), the result is e: the
optimum (tests/test_schedules.py checks this on injected scores).

Cost: one evaluation of the calibration set for m0, then at most ceil(log2(1 / step + 1)) per layer (a schedule is
never evaluated twice); the command prints the count and the time, and writes both into the schedule file.

This module also holds what the schedule commands share (``eval.tools.psigmoid``, ``eval.tools.schedule_compare``):
the calibration set run through the benchmark's own runner format and scorer (``Calibration``) and the prefill cost
of a per-layer token count by ``eval.roofline``'s count of one decoder layer (``PrefillCost``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from eval.benchmarks import Benchmark, get_benchmark
from eval.common import read_jsonl
from eval.roofline import ModelSpec, prefill_cost
from eval.synthetic import generate as generate_synthetic
from llava.demo import DEMO_MODEL, DEMO_TOWER
from llava.eval import runner
from llava.eval.runner import RunnerInputError
from llava.mm_utils import get_model_name_from_path
from llava.utils import add_model_args, check_before_loading, load_from_args, quiet_transformers, run_entry_point
from pruning import PruningConfig, PruningConfigError, add_pruning_args, pruning_overrides
from pruning.llm_methods.schedule import Schedule, write_schedule

CALIBRATION_SEED = 2  # the demo model trained on seed 0 and is tested on seed 1
RUN_NAME = "schedule-search"  # answers/<name>.jsonl and results/<name>.json in the calibration folder


# ---- the greedy rule ------------------------------------------------------------------------------------------------
Evaluate = Callable[[tuple[float, ...]], float]  # a schedule (fraction per layer) -> the calibration metric


@dataclass
class SearchResult:
    keep: tuple[float, ...]  # the schedule found
    baseline: float  # m0: nothing dropped
    metric: float  # the schedule's own score
    tolerance: float
    evaluations: list[tuple[tuple[float, ...], float]] = field(default_factory=list)  # in the order run


def fraction_grid(step: float) -> list[float]:
    """0, step, 2 step, ..., 1 (1 always included), rounded to 6 decimals."""
    if not 0 < step <= 1:
        raise ValueError(f"--step must be in (0, 1], got {step}")
    count = math.floor(1 / step + 1e-9)
    return sorted({round(i * step, 6) for i in range(count + 1)} | {1.0})


def greedy_search(layers: int, grid: Sequence[float], evaluate: Evaluate, tolerance: float) -> SearchResult:
    """G-Search over ``layers`` decoder layers (module docstring); ``evaluate`` scores a schedule, higher is better."""
    if layers < 1:
        raise ValueError(f"a schedule needs at least one decoder layer, got {layers}")
    if tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0, got {tolerance}")
    scores: dict[tuple[float, ...], float] = {}
    order: list[tuple[tuple[float, ...], float]] = []

    def score(schedule: tuple[float, ...]) -> float:
        if schedule not in scores:
            scores[schedule] = float(evaluate(schedule))
            order.append((schedule, scores[schedule]))
        return scores[schedule]

    keep = (1.0,) * layers
    baseline = score(keep)
    threshold = baseline - tolerance
    for layer in range(1, layers):
        options = [value for value in sorted(set(grid)) if value < keep[layer - 1]] + [keep[layer - 1]]
        low, high = 0, len(options) - 1  # options[high] is the schedule already passed
        while low < high:
            middle = (low + high) // 2
            if score(keep[:layer] + (options[middle],) * (layers - layer)) >= threshold:
                high = middle
            else:
                low = middle + 1
        keep = keep[:layer] + (options[low],) * (layers - layer)
    return SearchResult(keep, baseline, score(keep), tolerance, order)


# ---- the prefill cost of a schedule ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleTokens:
    """One calibration answer's counts: prompt tokens besides the visual ones, visual tokens entering the LLM, and
    visual tokens before any vision-side method (the unpruned model's)."""

    text: int
    visual: int
    visual_before: int

    @classmethod
    def from_stats(cls, tokens: dict[str, Any]) -> SampleTokens:
        visual = int(tokens.get("visual_after") or 0)
        return cls(int(tokens["prompt"]) - visual, visual, int(tokens.get("visual_before") or visual))


class PrefillCost:
    """Prefill OPs of the LLM with a given number of tokens entering each decoder layer: ``eval.roofline``'s count of
    one layer (q = kv = the tokens it holds) summed over the layers, plus the LM head for the last token."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.layers = spec.num_hidden_layers
        self.head = prefill_cost(spec, 1).lm_head.ops

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "config") -> PrefillCost:
        return cls(ModelSpec.from_config(config, name))

    @cache  # noqa: B019  (one cost model per run; the counts repeat)
    def layer(self, tokens: int) -> float:
        return float(sum(op.ops for op in prefill_cost(self.spec, max(tokens, 1)).layer_ops))

    def prefill(self, per_layer: Sequence[int]) -> float:
        if len(per_layer) != self.layers:
            raise ValueError(f"{len(per_layer)} token counts for a decoder of {self.layers} layers")
        return sum(self.layer(tokens) for tokens in per_layer) + self.head

    def unpruned(self, samples: Sequence[SampleTokens]) -> float:
        """No pruning at all: every sample's visual tokens as the tower made them, in every layer."""
        return sum(self.prefill([s.text + s.visual_before] * self.layers) for s in samples)

    def ratio(self, samples: Sequence[SampleTokens], counts: Callable[[SampleTokens], Sequence[int]]) -> float:
        """The prefill OPs of the samples, ``counts(sample)`` visual tokens entering each layer, over those of the
        unpruned model."""
        total = sum(self.prefill([s.text + c for c in counts(s)]) for s in samples)
        return total / self.unpruned(samples)

    def schedule_ratio(self, samples: Sequence[SampleTokens], schedule: Schedule) -> float:
        """The prefill OPs of the samples under ``schedule`` over those of the unpruned model."""
        return self.ratio(samples, lambda s: schedule.counts(s.visual))

    def measured_ratio(self, tokens: Sequence[dict[str, Any]]) -> float:
        """The same ratio from answers' token statistics as a run wrote them (``visual_per_layer`` when an LLM-side
        method dropped tokens)."""
        samples = [SampleTokens.from_stats(t) for t in tokens]
        total = 0.0
        for sample, stats in zip(samples, tokens):
            per_layer = stats.get("visual_per_layer") or [sample.visual] * self.layers
            total += self.prefill([sample.text + v for v in per_layer])
        return total / self.unpruned(samples)


def mean_visual_tokens(samples: Sequence[SampleTokens], schedule: Schedule) -> float:
    """Visual tokens entering a decoder layer, averaged over the layers and the samples."""
    counts = [sum(schedule.counts(s.visual)) / len(schedule.keep) for s in samples]
    return sum(counts) / len(counts)


# ---- the calibration set, run through the benchmark's runner format and scorer -------------------------------------
def demo_benchmark() -> Benchmark:
    """POPE as eval.synthetic writes it: the folder has images/ where a POPE folder has val2014/."""
    return dataclasses.replace(get_benchmark("pope"), image_folder="images")


def synthetic_folder(root: Path, num_images: int, seed: int) -> Path:
    """A synthetic POPE set (eval.synthetic), written on first use; deterministic from the seed."""
    folder = root / f"synthetic-seed{seed}-{num_images}"
    if not (folder / "llava_pope_test.jsonl").is_file():
        print(f"writing the synthetic set ({num_images} images, seed {seed}) to {folder}", file=sys.stderr)
        generate_synthetic(folder, num_images, seed, split="test")
    return folder


@dataclass
class Evaluation:
    metric: float  # the benchmark's headline
    tokens: list[dict[str, Any]]  # each answer's token statistics
    seconds: float


class Calibration:
    """A loaded model and one benchmark folder: ``evaluate(config)`` answers every question with those pruning
    settings (the benchmark's runner format, greedy) and scores the answers with the benchmark's own scorer (or
    ``score``, a function of the answers file)."""

    def __init__(
        self,
        loaded: tuple,
        model_path: str,
        benchmark: Benchmark,
        data_dir: str | Path,
        *,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        conv_mode: str | None = None,
        run_name: str = RUN_NAME,
        score: Callable[[Path], float] | None = None,
    ):
        self.tokenizer, self.model, self.processor = loaded[:3]
        self.benchmark, self.run = benchmark, benchmark.run(str(data_dir), run_name, {})
        self.question_format = importlib.import_module(benchmark.runner).FORMAT
        parser = runner.build_parser(self.question_format)
        argv = ["--model-path", model_path, *self.run.runner_args()]
        if conv_mode:
            argv += ["--conv-mode", conv_mode]
        args = parser.parse_args(argv)
        if not Path(self.run.question_file).is_file():
            raise RunnerInputError(f"{benchmark.name}: question file not found: {self.run.question_file}")
        self.samples = self.question_format.read(args)
        runner.check_images_exist(self.samples)
        model_name = get_model_name_from_path(model_path)
        self.conv_mode = runner.resolve_conv_mode(args, self.question_format, model_name, self.model.config)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens or self.question_format.max_new_tokens
        self.cost = PrefillCost.from_config(self.model.config.to_dict(), model_path)
        self.score = score or self.benchmark_score  # the answers file -> the calibration metric
        self.evaluations = 0

    def evaluate(self, config: PruningConfig) -> Evaluation:
        start = time.perf_counter()
        generate = runner.model_generate_fn(
            self.conv_mode,
            self.tokenizer,
            self.model,
            self.processor,
            temperature=0.0,
            max_new_tokens=self.max_new_tokens,
            pruning=config,
        )
        answers = Path(self.run.answers)
        runner.run(self.samples, answers, generate, RUN_NAME, self.batch_size, overwrite=True, progress=False)
        metric = self.score(answers)
        self.evaluations += 1
        tokens = [row.get("tokens") or {} for row in read_jsonl(answers)]
        return Evaluation(metric, tokens, time.perf_counter() - start)

    def benchmark_score(self, answers: Path) -> float:
        """The benchmark's own scorer on the answers file (as its script runs it): the result's headline."""
        args = self.benchmark.score_args(self.run)
        if args is None:
            raise RunnerInputError(f"benchmark {self.benchmark.name!r} has nothing to score here; pick another")
        command = [sys.executable, "-m", self.benchmark.scorer, *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RunnerInputError(f"the {self.benchmark.name} scorer failed on {answers}:\n{done.stderr.strip()}")
        result = json.loads(Path(self.run.result_json).read_text(encoding="utf-8"))
        if result.get("headline") is None:
            raise RunnerInputError(f"{self.run.result_json}: the scorer wrote no headline metric")
        return float(result["headline"])

    @property
    def layers(self) -> int:
        return len(self.model.get_model().layers)


def schedule_config(base: PruningConfig, keep: Sequence[float], path: Path) -> PruningConfig:
    """``base`` with ``--llm-pruning schedule`` reading ``keep`` (fractions) from ``path``."""
    write_schedule(path, "fraction", list(keep))
    return base.merged(llm_pruning="schedule", schedule=str(path))


# ---- the command ----------------------------------------------------------------------------------------------------
def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """The flags G-Search and P-Sigmoid share: the model, the calibration set, how to answer, the pruning base."""
    add_model_args(parser, require_model_path=False)
    parser.set_defaults(model_path=str(DEMO_MODEL))
    parser.add_argument(
        "--benchmark",
        default=None,
        help="a registered benchmark (eval.benchmarks) whose folder --data-dir is the calibration set; default: a "
        "synthetic POPE set for the demo model (--num-images, seed 2; the demo tests on seed 1)",
    )
    parser.add_argument("--data-dir", default=None, help="the benchmark's folder (with --benchmark)")
    parser.add_argument("--num-images", type=int, default=12, help="size of the synthetic calibration set")
    parser.add_argument("--work-dir", default="output/schedules", help="the synthetic set and the candidates")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 4 on the demo, else the format's")
    parser.add_argument("--conv-mode", default=None, help="default: chosen from the checkpoint")
    add_pruning_args(parser)


def open_calibration(args: argparse.Namespace) -> tuple[Calibration, PruningConfig]:
    """Check what can be checked, load the model once, read the calibration set. The base configuration is the
    run's own (vision side, KV policy) with nothing dropped inside the LLM."""
    if (args.benchmark is None) != (args.data_dir is None):
        raise RunnerInputError("--benchmark and --data-dir go together (default: the synthetic demo set)")
    if args.num_images < 1 or args.batch_size < 1:
        raise RunnerInputError("--num-images and --batch-size must be >= 1")
    if Path(args.model_path) == DEMO_MODEL and args.vision_tower is None:
        args.vision_tower = str(DEMO_TOWER)  # the config names the folder relative to the repository root
    overrides = pruning_overrides(args)
    if overrides.get("llm_pruning") not in (None, "none"):
        raise PruningConfigError("the search sets --llm-pruning itself; leave it unset")
    check_before_loading(args, overrides)
    if args.benchmark is None:
        benchmark = demo_benchmark()
        data_dir = synthetic_folder(Path(args.work_dir), args.num_images, CALIBRATION_SEED)
        max_new_tokens = args.max_new_tokens or 4  # as llava.demo: the demo model answers in one word
    else:
        benchmark, data_dir, max_new_tokens = get_benchmark(args.benchmark), Path(args.data_dir), args.max_new_tokens
        if not data_dir.is_dir():
            raise RunnerInputError(f"--data-dir {data_dir}: no such folder")
    quiet_transformers()
    loaded = load_from_args(args, overrides)
    calibration = Calibration(
        loaded,
        args.model_path,
        benchmark,
        data_dir,
        batch_size=args.batch_size,
        max_new_tokens=max_new_tokens,
        conv_mode=args.conv_mode,
    )
    base = loaded[1].pruning_config.merged(llm_pruning="none")
    return calibration, base


def provenance(args: argparse.Namespace, calibration: Calibration, base: PruningConfig) -> dict[str, Any]:
    return {
        "model_path": args.model_path,
        "calibration": {
            "benchmark": calibration.benchmark.name,
            "question_file": calibration.run.question_file,
            "questions": len(calibration.samples),
        },
        "base_pruning": base.describe(),
    }


def run_search(search: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """A schedule command's body: a bad file or setting ends with one ``error:`` line (``PruningConfigError`` is left
    to ``run_entry_point``)."""
    try:
        return search(args)
    except (ValueError, OSError) as err:  # RunnerInputError included
        if isinstance(err, PruningConfigError):
            raise
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Search and write the schedule; bad input ends with one ``error:`` line (status 2)."""
    return run_entry_point(_main, argv)


def _main(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_args(parser)
    parser.add_argument("--out", required=True, help="the schedule file to write (JSON)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1.0,
        help="'without a drop': a schedule passes when its metric is at least the unpruned one minus this, in the "
        "benchmark's headline units (default 1.0, e.g. one F1 point)",
    )
    parser.add_argument("--step", type=float, default=0.05, help="grid of fractions searched per layer")
    args = parser.parse_args(argv)
    return run_search(search, args)


def search(args: argparse.Namespace) -> dict[str, Any]:
    grid = fraction_grid(args.step)
    if args.tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0, got {args.tolerance}")
    calibration, base = open_calibration(args)
    candidate = Path(args.work_dir) / "gsearch-candidate.json"
    start = time.perf_counter()
    samples: list[SampleTokens] = []

    def evaluate(keep: tuple[float, ...]) -> float:
        result = calibration.evaluate(schedule_config(base, keep, candidate))
        if not samples:
            samples.extend(SampleTokens.from_stats(t) for t in result.tokens)
        ratio = calibration.cost.measured_ratio(result.tokens)
        print(f"  {_fmt(keep)}: metric {result.metric:.2f}, prefill FLOPs {100 * ratio:.1f} % ({result.seconds:.1f} s)")
        return result.metric

    print(f"G-Search on {calibration.run.question_file} ({len(calibration.samples)} questions), base {base.describe()}")
    found = greedy_search(calibration.layers, grid, evaluate, args.tolerance)
    seconds = time.perf_counter() - start
    schedule = Schedule("fraction", found.keep)
    report = {
        "method": "gsearch",
        "paper": "arXiv 2412.00556 (G-Search)",
        **provenance(args, calibration, base),
        "tolerance": args.tolerance,
        "step": args.step,
        "baseline_metric": found.baseline,
        "metric": found.metric,
        "prefill_flops_ratio": calibration.cost.schedule_ratio(samples, schedule),
        "mean_visual_tokens": mean_visual_tokens(samples, schedule),
        "search": {"evaluations": len(found.evaluations), "seconds": round(seconds, 1)},
        "evaluated": [{"keep": list(keep), "metric": metric} for keep, metric in found.evaluations],
    }
    write_schedule(args.out, "fraction", list(found.keep), **report)
    print(
        f"schedule {_fmt(found.keep)}: metric {found.metric:.2f} (unpruned {found.baseline:.2f}, tolerance "
        f"{args.tolerance}), prefill FLOPs {100 * report['prefill_flops_ratio']:.1f} % of the unpruned model; "
        f"{len(found.evaluations)} evaluations in {seconds:.0f} s\nwrote {args.out}"
    )
    return report


def _fmt(keep: Sequence[float]) -> str:
    return "[" + ", ".join(f"{value:g}" for value in keep) + "]"


if __name__ == "__main__":
    main()

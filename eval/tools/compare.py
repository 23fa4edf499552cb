"""Every token reducer at matched budgets, accuracy and speed side by side, in one run (docs/baselines.md).

    python -m eval.tools.compare                                   # the demo checkpoint on the synthetic POPE set
    python -m eval.tools.compare --num-images 40 --budgets 32,64,128,192 --speed-repeats 5
    python -m eval.tools.compare --model-path liuhaotian/llava-v1.5-7b --benchmark pope   # playground/data/eval/pope
    python -m eval.tools.compare --methods topk,fastv,visionzip --budgets 64 --output-dir output/compare-small

Rows (``eval/tools/compare_plan.py``): no pruning; ours (the long-tail rule at ``--alpha``, 0.24) and ours stages
1+2; top-k, random and pool at ours' mean count per image on the same images; every fixed-budget method at each of
``--budgets`` visual tokens per image (vision side: ``--visual-tokens``; LLM side, FastV / PyramidDrop / DART:
``--llm-tokens``); the adaptive methods at their own counts. Each row is answered through the benchmark runners' core
(``llava.eval.runner``: answers file, run record, resume, settings check) under the run name
``<model>-<method>[-<budget>]`` (``-matched`` at ours' count) in the benchmark folder (``answers/``, ``results/``), as
``scripts/v1_5/eval/<benchmark>.sh`` would with ``CKPT`` and ``PRUNING_ARGS``, and scored by the benchmark's own
scorer. Then every row is timed in one process (prefill and decode, batch 1 and batch ``--speed-batch``) against no
pruning. Written to ``--output-dir``: ``comparison.md`` (also printed), ``comparison.json``, ``comparison.png``.

Without ``--benchmark`` the data is the demo's held-out synthetic POPE set (``--num-images`` images, seed 1, built
by ``eval.synthetic`` under ``--output-dir``) and the model is the bundled demo checkpoint. A benchmark folder is
answered whole (on a GPU: thousands of questions per row). Rows a model refuses (a budget ToMe cannot reach, FastV
on a two-layer LLM, a tower without CLIP's text side for Recoverable Compression) are reported with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eval.benchmarks import Benchmark, BenchmarkError, Run, get_benchmark
from eval.common import token_stat
from eval.tools import compare_plan, compare_report, compare_speed
from eval.tools.compare_plan import PlanError, Row
from eval.tools.gsearch import PrefillCost
from llava.demo import DEMO_MODEL, DEMO_TOWER, synthetic_test_set
from llava.eval import prompt_styles, runner
from llava.eval.runner import QuestionFormat, RunnerInputError, Sample
from llava.mm_utils import get_model_name_from_path, load_image
from llava.utils import add_model_args, exit_with_user_error, load_from_args, quiet_transformers, user_errors
from pruning import PruningConfig

OUTPUT = Path("output") / "compare"
DEFAULT_BUDGETS = "64,128,192"
SYNTHETIC_MAX_NEW_TOKENS = 4  # the demo's setting: its answers are one word


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.tools.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser, require_model_path=False)
    parser.set_defaults(model_path=str(DEMO_MODEL))
    data = parser.add_argument_group("data")
    data.add_argument("--benchmark", default=None, help="a registered benchmark (python -m eval.benchmarks); default: "
                      "the synthetic POPE set")  # fmt: skip
    data.add_argument("--data-dir", default=None, help="the benchmark's folder (default playground/data/eval/<folder>)")
    data.add_argument(
        "--num-images", type=int, default=20, help="images of the synthetic set (about 15 questions each)"
    )
    rows = parser.add_argument_group("rows")
    rows.add_argument("--methods", default=None, help=f"comma-separated, default all: {', '.join(compare_plan.METHODS)}"
                      " (no pruning and ours always run)")  # fmt: skip
    rows.add_argument("--budgets", default=DEFAULT_BUDGETS, help="visual tokens per image (per crop for LLaVA-1.6) of "
                      "the fixed-budget methods, comma-separated")  # fmt: skip
    rows.add_argument("--alpha", type=float, default=0.24, help="ours' smoothing coefficient")
    answer = parser.add_argument_group("answering")
    answer.add_argument("--batch-size", type=int, default=8)
    answer.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark runner's (4 on the "
                        "synthetic set, as the demo)")  # fmt: skip
    answer.add_argument("--conv-mode", default=None, help="default: chosen from the checkpoint, as the runners do")
    answer.add_argument("--overwrite", action="store_true", help="answer every row afresh instead of resuming")
    answer.add_argument("--name", default=None, help="run names are <name>-<method>[-<budget>] (default: the model's "
                        "folder name, as the scripts' CKPT)")  # fmt: skip
    answer.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (0: torch's default, one per "
                        "core). 1 by default: the demo model's matrices are too small for a second thread to pay, and "
                        "on a machine shared with other jobs more threads than free cores make every step wait")  # fmt: skip
    speed = parser.add_argument_group("speed")
    speed.add_argument("--speed-batch", type=int, default=8, help="questions timed alone (batch 1) and together")
    speed.add_argument("--speed-repeats", type=int, default=3)
    speed.add_argument("--speed-warmup", type=int, default=1)
    speed.add_argument("--speed-new-tokens", type=int, default=8)
    speed.add_argument("--clock", choices=("wall", "cpu"), default=None, help="default: cpu (process CPU time) on a "
                       "CPU, which a shared machine's other jobs do not inflate; wall on a GPU")  # fmt: skip
    speed.add_argument("--no-speed", action="store_true", help="answer and score only")
    parser.add_argument("--output-dir", default=str(OUTPUT), help="the report (and the synthetic set)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for flag, value, low in (
        ("--num-images", args.num_images, 1),
        ("--batch-size", args.batch_size, 1),
        ("--speed-batch", args.speed_batch, 1),
        ("--speed-repeats", args.speed_repeats, 1),
        ("--speed-warmup", args.speed_warmup, 0),
        ("--speed-new-tokens", args.speed_new_tokens, 2),
        ("--threads", args.threads, 0),
    ):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 < args.alpha <= 1:
        parser.error(f"--alpha must be in (0, 1], got {args.alpha}")
    if args.data_dir is not None and args.benchmark is None:
        parser.error("--data-dir needs --benchmark (which benchmark the folder holds)")
    try:
        args.method_names = compare_plan.parse_methods(args.methods)
        args.budget_list = compare_plan.parse_budgets(args.budgets)
        args.benchmark_spec = get_benchmark(args.benchmark or "pope")
    except (PlanError, BenchmarkError) as err:
        parser.error(str(err))
    if args.benchmark_spec.select is not None:
        args.benchmark_spec = get_benchmark(args.benchmark_spec.select(os.environ))
    args.name = args.name or get_model_name_from_path(args.model_path)
    if Path(args.model_path) == DEMO_MODEL and args.vision_tower is None:
        args.vision_tower = str(DEMO_TOWER)  # the config names the folder relative to the repository root
    return args


# ---- the benchmark and its runner ------------------------------------------------------------------------------


@dataclass
class Data:
    """Where the rows read their questions and write answers and results: a benchmark's folder, as the scripts."""

    benchmark: Benchmark
    folder: str
    image_folder: str | None  # the synthetic set's, else the spec's
    question_format: QuestionFormat
    max_new_tokens: int | None

    def run(self, ckpt: str) -> Run:
        return self.benchmark.run(self.folder, ckpt, os.environ)


def find_data(args: argparse.Namespace) -> Data:
    benchmark = args.benchmark_spec
    runner_module = importlib.import_module(benchmark.runner)
    question_format = runner_module.FORMAT
    if args.benchmark is None:
        folder = synthetic_test_set(Path(args.output_dir), args.num_images)
        return Data(benchmark, str(folder), str(folder / "images"), question_format,
                    args.max_new_tokens or SYNTHETIC_MAX_NEW_TOKENS)  # fmt: skip
    folder = args.data_dir or f"playground/data/eval/{benchmark.folder}"
    if not Path(folder).is_dir():
        raise RunnerInputError(f"--data-dir {folder}: no such folder (see playground/data/eval/README.md)")
    return Data(benchmark, folder, None, question_format, args.max_new_tokens)


@dataclass
class Prepared:
    """A row as the runner sees it: its flags parsed by the runner's parser, its questions and run record."""

    row: Row
    ckpt: str
    args: argparse.Namespace
    samples: list[Sample]
    record: dict[str, Any]
    conv_mode: str

    @property
    def answers(self) -> Path:
        return Path(self.args.answers_file)


def runner_argv(args: argparse.Namespace, data: Data, row: Row, ckpt: str) -> list[str]:
    """The runner flags of this row: what llava.eval.run_benchmark passes (question file, image folder, the
    benchmark's own flags, the model, temperature 0, the batch size), plus the row's pruning flags."""
    run = data.run(ckpt)
    argv = [*run.runner_args(), "--model-path", args.model_path, "--temperature", "0"]
    argv += ["--batch-size", str(args.batch_size), "--answers-file", run.answers, "--device", args.device]
    if data.image_folder is not None:
        argv += ["--image-folder", data.image_folder]
    for flag, value in (("--model-base", args.model_base), ("--vision-tower", args.vision_tower),
                        ("--conv-mode", args.conv_mode), ("--max-new-tokens", data.max_new_tokens)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    return argv + row.flags()


def prepare(args: argparse.Namespace, data: Data, row: Row) -> Prepared:
    """Parse, read and check as the runner's main does, before anything is answered: a run record that differs
    (an answers file written with other settings) stops here, naming the differences."""
    ckpt = row.run_name(args.name)
    fmt = data.question_format
    parsed = runner.build_parser(fmt).parse_args(runner_argv(args, data, row, ckpt))
    runner.check_args(parsed)
    samples = prompt_styles.restyle(parsed.prompt_style, fmt.name, fmt.read(parsed))
    if not samples:
        raise RunnerInputError(f"{parsed.question_file} holds no questions")
    answers = Path(parsed.answers_file)
    if args.overwrite:
        answers.unlink(missing_ok=True)
        runner.run_record_path(answers).unlink(missing_ok=True)
    record, conv_mode = runner.build_run_record(parsed, fmt)
    runner.check_record(answers, record)
    return Prepared(row, ckpt, parsed, samples, record, conv_mode)


def answer(prepared: Prepared, loaded: tuple, progress: bool) -> None:
    tokenizer, model, processor = loaded
    settings = {**runner.generation_settings(prepared.args), **runner.serving_settings(prepared.args)}
    pruning = PruningConfig.from_dict(prepared.record["pruning"], source=prepared.row.key)
    generate = runner.model_generate_fn(prepared.conv_mode, tokenizer, model, processor, **settings, pruning=pruning)
    runner.run(
        prepared.samples,
        prepared.answers,
        generate,
        get_model_name_from_path(prepared.args.model_path),
        batch_size=prepared.args.batch_size,
        progress=progress,
        desc=prepared.row.key,
        record=prepared.record,
    )


def score(data: Data, prepared: Prepared) -> dict[str, Any] | None:
    """The benchmark's scorer, run as the scripts run it; None when it writes no result (a judge it needs is not set)."""
    run = data.run(prepared.ckpt)
    score_args = data.benchmark.score_args(run)
    if score_args is None:
        return None
    started = time.time()
    done = subprocess.run([sys.executable, "-m", data.benchmark.scorer, *score_args], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        raise RunnerInputError(f"the {data.benchmark.name} scorer failed on {run.answers}:\n{done.stderr.strip()}")
    path = Path(run.result_json)
    if not path.is_file() or path.stat().st_mtime < started - 1:  # a result of an earlier run is not this one's
        return None
    return json.loads(path.read_text(encoding="utf-8"))


# ---- the comparison -------------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def matched_count(result: dict[str, Any] | None, prepared: Prepared) -> int:
    """Ours' mean visual tokens per image (per crop where the answers record crops), rounded: the matched budget."""
    crops = [len(t["crop_kept"]) for t in _answer_tokens(prepared) if isinstance(t.get("crop_kept"), list)]
    per_image = token_stat((result or {}).get("tokens"), "visual_after")
    if per_image is None:
        raise RunnerInputError(f"{prepared.answers}: no visual token counts to match ours' count to")
    per_crop = per_image / (sum(crops) / len(crops)) if crops else per_image
    return max(1, round(per_crop))


def _answer_tokens(prepared: Prepared) -> list[dict[str, Any]]:
    from eval.common import read_jsonl

    return [row.get("tokens") or {} for row in read_jsonl(prepared.answers)]


def run_rows(
    args: argparse.Namespace, data: Data, rows: list[Row], loaded: tuple
) -> tuple[dict[str, Prepared], dict[str, str]]:
    """Answer every row (each checked first); a row the model refuses is recorded with its message, not run."""
    prepared = {row.key: prepare(args, data, row) for row in rows}
    refused: dict[str, str] = {}
    for row in rows:
        say(f"== {row.label} {row.budget or ''}: {' '.join(row.flags())}")
        try:
            answer(prepared[row.key], loaded, not args.no_progress)
        except user_errors() as err:
            refused[row.key] = str(err)
            say(f"   not run: {err}")
    return prepared, refused


def comparison(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    data = find_data(args)
    quiet_transformers()
    tokenizer, model, processor, _ = load_from_args(args)
    loaded = (tokenizer, model, processor)
    tower = model.get_vision_tower()
    compare_plan.check_budgets(args.budget_list, tower.num_patches)
    depth = model.config.num_hidden_layers

    reference = compare_plan.reference_rows(args.method_names, args.alpha)
    planned = compare_plan.budget_rows(args.method_names, args.budget_list, depth)
    planned += compare_plan.adaptive_rows(args.method_names, args.alpha)
    for row in planned:  # every later row's settings checked before the first answer
        prepare(args, data, row)
    prepared, refused = run_rows(args, data, reference, loaded)
    results = {key: score(data, p) for key, p in prepared.items() if key not in refused}
    count = matched_count(results.get("longtail"), prepared["longtail"])
    matched = compare_plan.matched_rows(args.method_names, count, tower.num_patches_per_side, depth)
    more, more_refused = run_rows(args, data, matched + planned, loaded)
    prepared.update(more)
    refused.update(more_refused)
    results.update({key: score(data, p) for key, p in more.items() if key not in refused})
    rows = reference + matched + planned

    speed: dict[str, Any] = {}
    speed_errors: dict[str, str] = {}
    if not args.no_speed:
        configs = {
            r.key: PruningConfig.from_dict(prepared[r.key].record["pruning"]) for r in rows if r.key not in refused
        }
        speed, speed_errors = time_rows(args, model, tokenizer, processor, prepared["none"], configs)
    report = build_report(args, data, model, rows, prepared, results, refused, speed, speed_errors, count)
    report["wall_s"] = time.perf_counter() - start
    return report


def speed_samples(samples: Sequence[Sample], count: int) -> list[Sample]:
    """The first ``count`` questions with an image, one per image while there are enough distinct images."""
    with_image = [s for s in samples if s.image is not None and s.error is None]
    chosen, seen = [], set()
    for sample in with_image:
        if str(sample.image) not in seen:
            seen.add(str(sample.image))
            chosen.append(sample)
    chosen += [s for s in with_image if s not in chosen]
    return chosen[:count]


def time_rows(args, model, tokenizer, processor, reference: Prepared, configs: dict[str, PruningConfig]):
    samples = speed_samples(reference.samples, args.speed_batch)
    images = [load_image(s.image) if isinstance(s.image, Path) else s.image() for s in samples]
    texts = [s.text for s in samples]
    conv = reference.conv_mode
    singles = [compare_speed.build_inputs(model, tokenizer, processor, conv, [t], [i]) for t, i in zip(texts, images)]
    batch = compare_speed.build_inputs(model, tokenizer, processor, conv, texts, images)
    say(f"timing {len(configs)} rows: batch 1 and batch {len(samples)}, {args.speed_repeats} repeats")
    return compare_speed.measure(
        model, singles, batch, configs, args.speed_repeats, args.speed_warmup, args.speed_new_tokens,
        compare_speed.CLOCKS[args.clock], errors=user_errors(),
    )  # fmt: skip


def build_report(args, data, model, rows, prepared, results, refused, speed, speed_errors, count) -> dict[str, Any]:
    cost = PrefillCost.from_config(model.config.to_dict(), name=args.model_path)
    none_metric = (results.get("none") or {}).get("headline")
    out_rows = []
    for row in rows:
        p = prepared[row.key]
        result = results.get(row.key)
        entry: dict[str, Any] = {
            "key": row.key,
            "method": row.method,
            "label": row.label,
            "group": row.group,
            "family": row.family,
            "budget": row.budget,
            "flags": row.flags(),
            "note": row.note,
            "run_name": p.ckpt,
            "answers_file": str(p.answers),
            "result_json": data.run(p.ckpt).result_json if result is not None else None,
            "config": p.record["pruning"],
        }
        if row.key in refused:
            entry["status"] = f"not applicable: {refused[row.key]}"
        else:
            entry["status"] = "ok"
            metric = None if result is None else result["headline"]
            entry["metric"] = metric
            entry["retention"] = 100 * metric / none_metric if metric is not None and none_metric else None
            entry["figures"] = compare_report.answer_figures(p.answers, cost)
            entry["speed"] = compare_report.speed_ratios(speed, row.key) if row.key in speed else {}
            if row.key in speed_errors:
                entry["speed_error"] = speed_errors[row.key]
        out_rows.append(entry)
    samples = prepared["none"].samples
    return {
        "benchmark": {
            "name": data.benchmark.name,
            "title": data.benchmark.title,
            "headline": data.benchmark.headline,
            "folder": data.folder,
            "questions": len(samples),
            "images": len({str(s.image) for s in samples if s.image is not None}),
        },
        "model": {
            "path": args.model_path,
            "name": get_model_name_from_path(args.model_path),
            "llm_layers": model.config.num_hidden_layers,
            "patches_per_image": model.get_vision_tower().num_patches,
        },  # fmt: skip
        "settings": {
            "alpha": args.alpha,
            "budgets": args.budget_list,
            "methods": args.method_names,
            "batch_size": args.batch_size,
            "speed_batch": args.speed_batch,
            "speed_repeats": args.speed_repeats,
            "speed_new_tokens": args.speed_new_tokens,
            "clock": args.clock,
            "threads": torch.get_num_threads() if model.device.type == "cpu" else None,
            "packed_prefill": bool(getattr(model.config, "packed_prefill", True)),
        },
        "machine": {"device": describe_device(model), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
        "matched_count": count,
        "rows": out_rows,
        "not_run": compare_plan.not_planned(),
    }


def describe_device(model) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return f"CPU, {os.cpu_count()} cores"


def write_outputs(args: argparse.Namespace, report: dict[str, Any]) -> str:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = compare_report.markdown(report)
    (out / "comparison.md").write_text(text, encoding="utf-8")
    compare_report.write_json(report, out / "comparison.json")
    written = [out / "comparison.md", out / "comparison.json"]
    if not args.no_plot:
        if importlib.util.find_spec("matplotlib") is None:
            say("no plot: matplotlib is not installed (pip install -e '.[plot]')")
        else:
            compare_report.plot(report, out / "comparison.png")
            written.append(out / "comparison.png")
    say("wrote " + ", ".join(map(str, written)))
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.clock is None:
        args.clock = "cpu" if not args.device.startswith("cuda") else "wall"
    if args.threads and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    try:
        report = comparison(args)
    except (RunnerInputError, PlanError, prompt_styles.PromptStyleError, *user_errors()) as err:
        exit_with_user_error(err)
    print(write_outputs(args, report))
    return report


if __name__ == "__main__":
    main()

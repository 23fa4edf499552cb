"""Speed suite: prefill, decode, peak memory and throughput with and without pruning, as ratios from one process.

    python -m eval.tools.speed                                       # GPU: LLaVA-1.5-7B geometry, random weights, fp16
    python -m eval.tools.speed --model-path liuhaotian/llava-v1.5-7b # any checkpoint load_pretrained_model loads
    python -m eval.tools.speed --llm-layers 2 --dtype bfloat16 --threads 1 --clock cpu --new-tokens 8   # docs/speed.md (CPU)

Four rows, each timed at every batch size (see docs/speed.md for what they mean and for measured figures):

* ``none``: no pruning.
* ``topk``: fixed top-k with k = the mean count per crop that ``ours-s1`` keeps on the same images.
* ``ours-s1``: stage 1, the long-tail rule. With ``--target-visual-tokens T`` (default 120 on random weights, the
  count behind the paper's Table 6) alpha is calibrated so that the mean visual tokens per image is T; otherwise
  the checkpoint's alpha is used.
* ``ours-s12``: stage 1 + stage 2 (H2O KV eviction with the checkpoint's heavy/recent settings, paper 0.5/0.5).
* ``ours-s1-packed``, ``ours-s12-packed``: the same with the packed prefill (pruning/packing.py: the LLM prefill on
  the samples' real tokens only). The four rows above run padded (``packed_prefill=False``); ``none`` and ``topk``
  keep one length per batch on LLaVA-1.5, so packing would change nothing there.

``--group-window K`` adds a queue measurement: K batches of the largest batch size answered by ``ours-s1`` in
question order or grouped by prompt length (the images of the K batches encoded first), padded or packed.

Every run is one ``model.generate`` call with exactly ``--new-tokens`` new tokens: prefill = from the call to the
first logits (tower + projector + merge + LLM prefill; the split at the LLM's first forward is reported too), decode
per token = the mean time between later logits, throughput = generated tokens / call time. The rows run in a new
order in every repeat (a shuffle seeded by the repeat) so that drift hits them alike; we report medians, and ratios
to ``none`` at the same batch size. The ideal speedup is the ratio of OPs: the vision tower and projector counted here, the LLM prefill by ``eval.roofline``
(LLM-Viewer's count), each sample at its own prompt length.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from eval.common import format_table
from eval.roofline import prefill_cost
from eval.tools.speed_models import (
    PromptBatch,
    RowPlan,
    build_prompt_batch,
    build_random_llava,
    flatten_crops,
    folder_images,
    get_geometry,
    inflection_points,
    plan_rows,
    row_configs,
    synthetic_images,
)
from eval.tools.speed_results import (
    Headline,
    IdealCost,
    PrefillHeadline,
    QueueRow,
    Ratios,
    Row,
    RowSettings,
    RunResult,
    Setup,
    SpeedReport,
    ThroughputScaling,
)
from llava.inference import length_groups
from llava.model.builder import load_pretrained_model
from pruning import PruningConfig

ROWS = ("none", "topk", "ours-s1", "ours-s12", "ours-s1-packed", "ours-s12-packed")
PACKED_ROWS = {"ours-s1-packed": "ours-s1", "ours-s12-packed": "ours-s12"}  # row -> the padded row it packs
CONTROL_ROW = "topk-again"  # with --control: top-k's work run twice per repeat, so its ratio to top-k is the noise
ROW_TITLES = {
    "none": "no pruning",
    "topk": "fixed top-k, same mean count",
    "ours-s1": "ours, stage 1 (padded prefill)",
    "ours-s12": "ours, stages 1+2 (padded prefill)",
    "ours-s1-packed": "ours, stage 1, packed prefill",
    "ours-s12-packed": "ours, stages 1+2, packed prefill",
    CONTROL_ROW: "control: fixed top-k again (the same work as `topk`)",
}
PAPER_VISUAL_TOKENS = 120  # "Ours" in the paper's Table 6 (60 text tokens + 120 visual tokens)
PAPER_TEXT_TOKENS = 60


# ---- timing one generate call ---------------------------------------------------------------------------------


class StepClock(LogitsProcessor):
    """Called once per generated token, right after the forward that produced its logits: a timestamp each."""

    def __init__(self, sync: Callable[[], None], clock: Callable[[], float]):
        self.sync = sync
        self.clock = clock
        self.marks: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.sync()
        self.marks.append(self.clock())
        return scores


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); False where the C library has none.

    Memory an earlier call freed otherwise stays in the process: a later call reuses it without raising the RSS, and
    shows less extra memory than it needs (0 MB for some rows, depending on what ran before them)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


class MemoryMeter:
    """Peak memory of one call: CUDA allocator statistics, or on CPU the process RSS sampled every ``interval`` s.

    ``extra`` is the peak above the level at entry (activations, KV cache, temporaries; the weights are already
    there). On CPU the heap's free pages are handed back first (``release_freed_memory``), so every call starts from
    the same level and its own allocations show; a sampler can miss a spike shorter than the interval, but large
    tensors live much longer.
    """

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.cuda = device.type == "cuda"
        self.device = device
        self.interval = interval
        self.peak: int | None = None
        self.extra: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int | None:
        statm = Path("/proc/self/statm")
        if not statm.is_file():
            return None
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak or 0, self.rss() or 0)

    def __enter__(self) -> MemoryMeter:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            self._base = self.rss()
            if self._base is not None:
                self.peak = self._base
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak or 0, self.rss() or 0)
        if self.peak is not None and self._base is not None:
            self.extra = self.peak - self._base


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _fixed_length(new_tokens: int) -> dict[str, Any]:
    """Greedy generation of exactly ``new_tokens`` tokens per sample."""
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0)


def run_once(
    model,
    batch: PromptBatch,
    pruning: PruningConfig,
    new_tokens: int,
    clock: Callable[[], float] = time.perf_counter,
    packed: bool = False,
) -> RunResult:
    """One ``model.generate`` call producing exactly ``new_tokens`` tokens per sample, timed step by step.

    ``clock`` is wall time, or the process's CPU time (``time.process_time``), which on a CPU shared with other jobs
    counts our work and not the time slices they take (with one thread: otherwise idle threads spinning count too).
    ``packed``: the prefill runs packed where the samples differ in length, else on the left-padded batch.
    """
    sync = device_sync(model.device)
    steps = StepClock(sync, clock)
    llm_starts: list[float] = []

    def mark_llm_start(module, args) -> None:
        sync()
        llm_starts.append(clock())

    language_model = model.get_model() if hasattr(model, "get_model") else model.model
    handle = language_model.register_forward_pre_hook(mark_llm_start)
    try:
        with MemoryMeter(model.device) as memory:
            sync()
            start = clock()
            out = model.generate(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                images=batch.pixel_values,
                image_sizes=batch.image_sizes,
                pruning=pruning,
                return_stats=True,
                use_cache=True,
                logits_processor=LogitsProcessorList([steps]),
                packed_prefill=packed,
                **_fixed_length(new_tokens),
            )
            sync()
            end = clock()
    finally:
        handle.remove()
    if len(steps.marks) != new_tokens or not llm_starts:
        raise RuntimeError(
            f"expected {new_tokens} decoding steps and an LLM forward, saw {len(steps.marks)} steps and "
            f"{len(llm_starts)} forwards ({pruning.describe()})"
        )
    first, last = steps.marks[0], steps.marks[-1]
    return RunResult(
        prefill_s=first - start,
        vision_s=llm_starts[0] - start,
        llm_prefill_s=first - llm_starts[0],
        decode_s_per_token=(last - first) / (new_tokens - 1),
        total_s=end - start,
        throughput=batch.size * new_tokens / (end - start),
        peak_bytes=memory.peak,
        extra_bytes=memory.extra,
        token_stats=out.token_stats,
    )


# ---- ideal costs ------------------------------------------------------------------------------------------------


def vision_ops(tower, crops: int, visual_layer: int) -> float:
    """OPs (2 per multiply-add) of the tower layers stage 1 runs, on all 1+n tokens of every crop.

    select_visual_tokens runs layers up to the later of the select layer and the scoring layer; norms, GELU and the
    CLS scoring (a few matrix-vector products) are left out, as they are below 1 % of a layer.
    """
    cfg = tower.config
    width, inner, patch = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    patches = (cfg.image_size // patch) ** 2
    tokens = patches + 1
    select = tower.select_layer
    select_index = select if select >= 0 else cfg.num_hidden_layers + 1 + select
    layers = max(select_index, visual_layer)
    per_layer = 2 * tokens * (4 * width * width + 2 * width * inner) + 4 * tokens * tokens * width
    embedding = 2 * patches * 3 * patch * patch * width
    return crops * (embedding + layers * per_layer)


def projector_ops(projector: torch.nn.Module, tokens: int) -> float:
    return tokens * sum(
        2 * m.in_features * m.out_features for m in projector.modules() if isinstance(m, torch.nn.Linear)
    )


def ideal_cost(model, stats: list[dict[str, Any]], crops: list[int], visual_layer: int, hardware: str) -> IdealCost:
    """OPs of a prefill: LLM by eval.roofline, each sample at its own length and, separately, at the padded length.

    Stage 1 keeps different counts per sample, so a batch is padded to its longest prompt; the difference between the
    two LLM figures is padding, which a ragged (varlen) kernel would not compute.
    """
    llm_config = model.config.to_dict()
    llm = [prefill_cost(llm_config, tokens=int(s["prompt"]), hardware=hardware) for s in stats]
    longest = max(int(s["prompt"]) for s in stats)
    return IdealCost(
        vision=vision_ops(model.get_vision_tower(), sum(crops[: len(stats)]), visual_layer),
        projector=sum(projector_ops(model.get_model().mm_projector, int(s["visual_after"])) for s in stats),
        llm=sum(cost.ops for cost in llm),
        llm_seconds=sum(cost.seconds for cost in llm),
        llm_padded=prefill_cost(llm_config, tokens=longest, batch=len(stats)).ops,
    )


# ---- the suite ------------------------------------------------------------------------------------------------


def _mean(stats: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in stats if isinstance(s.get(key), (int, float))]
    return float(statistics.fmean(values)) if values else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0 or numerator <= 0:
        return None
    return numerator / denominator


def timed_rows(base: PruningConfig, plan: RowPlan, control: bool = False) -> dict[str, tuple[PruningConfig, bool]]:
    """Every row's pruning settings and whether its prefill is packed (``control``: and top-k's again)."""
    configs = row_configs(base, plan)
    rows = {name: (config, False) for name, config in configs.items()}
    rows.update({name: (configs[padded], True) for name, padded in PACKED_ROWS.items()})
    if control:
        rows[CONTROL_ROW] = rows["topk"]
    return rows


def run_order(names: list[str], repeat: int) -> list[str]:
    """The rows' order in one repeat: shuffled, with the repeat as the seed (the same order on every run of the
    suite). Drift hits the rows alike in expectation, and no row always runs next to the same one: on this project's
    CPU machine the same work timed at two fixed places of the order differed by 2-8 % (``--control``)."""
    order = list(names)
    random.Random(repeat).shuffle(order)
    return order


def summarise(name: str, batch: int, runs: list[RunResult], ideal: IdealCost, config: PruningConfig) -> Row:
    """Medians of the timed runs; token figures from the first run (every run keeps the same tokens)."""
    stats = runs[0].token_stats
    extra = [r.extra_bytes for r in runs if r.extra_bytes is not None]
    peak = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    return Row(
        config=name,
        batch=batch,
        pruning=config.describe(),
        visual_tokens=_mean(stats, "visual_after"),
        prompt_tokens=_mean(stats, "prompt"),
        kv_final=_mean(stats, "kv_final"),
        prefill_s=statistics.median(r.prefill_s for r in runs),
        vision_s=statistics.median(r.vision_s for r in runs),
        llm_prefill_s=statistics.median(r.llm_prefill_s for r in runs),
        decode_s_per_token=statistics.median(r.decode_s_per_token for r in runs),
        total_s=statistics.median(r.total_s for r in runs),
        throughput_tok_s=statistics.median(r.throughput for r in runs),
        peak_bytes=max(peak) if peak else None,
        extra_bytes=max(extra) if extra else None,
        prompt_tokens_max=max(int(s["prompt"]) for s in stats),
        ideal_ops=ideal,
        repeats=runs,
        token_stats=stats,
    )


def paired_ratios(base: list[RunResult], row: list[RunResult]) -> list[float] | None:
    """``base``'s prefill time over ``row``'s, repeat by repeat (None where the repeats do not pair up)."""
    if not base or len(base) != len(row):
        return None
    ratios = [_ratio(b.prefill_s, r.prefill_s) for b, r in zip(base, row)]
    return None if None in ratios else ratios


def paired_speedup(base: list[RunResult], row: list[RunResult]) -> float | None:
    """Median over repeats of ``base``'s prefill time over ``row``'s in the same repeat. The rows of a repeat run one
    after the other, so a slow spell of a shared machine hits both: steadier than the ratio of the medians."""
    ratios = paired_ratios(base, row)
    return None if ratios is None else statistics.median(ratios)


def paired_figures(base: Row | None, row: Row | None) -> tuple[float | None, list[float] | None]:
    """The median and [lowest, highest] of ``paired_ratios`` of two rows (None, None where either is missing)."""
    ratios = None if base is None or row is None else paired_ratios(base.repeats, row.repeats)
    return (None, None) if ratios is None else (statistics.median(ratios), [min(ratios), max(ratios)])


def ratios_to(base: Row, row: Row) -> Ratios:
    """``row`` against ``base``, the 'none' row of the same batch size."""
    measured = _ratio(base.prefill_s, row.prefill_s)
    ideal = _ratio(base.ideal_ops.total, row.ideal_ops.total)
    return Ratios(
        prefill_speedup=measured,
        llm_prefill_speedup=_ratio(base.llm_prefill_s, row.llm_prefill_s),
        decode_speedup=_ratio(base.decode_s_per_token, row.decode_s_per_token),
        throughput_ratio=_ratio(row.throughput_tok_s, base.throughput_tok_s),
        extra_memory_ratio=_ratio(row.extra_bytes, base.extra_bytes),
        ideal_prefill_speedup=ideal,
        ideal_padded_prefill_speedup=_ratio(base.ideal_ops.total_padded, row.ideal_ops.total_padded),
        ideal_llm_prefill_speedup=_ratio(base.ideal_ops.llm, row.ideal_ops.llm),
        ideal_llm_roofline_time_speedup=_ratio(base.ideal_ops.llm_seconds, row.ideal_ops.llm_seconds),
        prefill_vs_ideal=_ratio(measured, ideal),
        prefill_speedup_paired=paired_speedup(base.repeats, row.repeats),
    )


def add_ratios(rows: list[Row]) -> None:
    """Sets every row's ratios to the 'none' row of its batch size."""
    baseline = {row.batch: row for row in rows if row.config == "none"}
    for row in rows:
        row.ratios = ratios_to(baseline[row.batch], row)


def batch_scaling(rows: list[Row]) -> dict[str, dict[str, float | None]]:
    """Throughput at each batch size over throughput at the smallest, per row."""
    out: dict[str, dict[str, float | None]] = {}
    for name in (*ROWS, CONTROL_ROW):
        mine = sorted((r for r in rows if r.config == name), key=lambda r: r.batch)
        if mine:
            out[name] = {str(r.batch): _ratio(r.throughput_tok_s, mine[0].throughput_tok_s) for r in mine}
    return out


def headline(rows: list[Row], scaling: dict[str, dict[str, float | None]]) -> Headline:
    """The acceptance figures: ours-s1 vs none at each batch size against the ideal, and throughput scaling."""
    smallest = str(min(r.batch for r in rows))
    largest = str(max(r.batch for r in rows))
    prefill = {}
    by_key = {(r.config, r.batch): r for r in rows}
    prefill: dict[str, dict[str, PrefillHeadline]] = {}
    for name in ("ours-s1", "ours-s1-packed"):
        for ours in (r for r in rows if r.config == name):
            ratios = ours.ratios
            vs_ideal = ratios.prefill_vs_ideal
            topk = by_key.get(("topk", ours.batch))
            control = by_key.get((CONTROL_ROW, ours.batch))
            padded = by_key.get((PACKED_ROWS.get(name, name), ours.batch))
            vs_topk, vs_topk_range = paired_figures(topk, ours)
            topk_control, topk_control_range = paired_figures(topk, control)
            prefill.setdefault(name, {})[str(ours.batch)] = PrefillHeadline(
                visual_tokens=ours.visual_tokens,
                prefill_speedup=ratios.prefill_speedup,
                ideal_prefill_speedup=ratios.ideal_prefill_speedup,
                prefill_vs_ideal=vs_ideal,
                within_15_percent_of_ideal=vs_ideal is not None and abs(vs_ideal - 1) <= 0.15,
                ideal_padded_prefill_speedup=ratios.ideal_padded_prefill_speedup,
                llm_prefill_speedup=ratios.llm_prefill_speedup,
                ideal_llm_prefill_speedup=ratios.ideal_llm_prefill_speedup,
                topk_prefill_speedup=None if topk is None else topk.ratios.prefill_speedup,
                extra_mb=None if ours.extra_bytes is None else ours.extra_bytes / 2**20,
                padded_extra_mb=None if padded is None or padded.extra_bytes is None else padded.extra_bytes / 2**20,
                prefill_speedup_paired=ratios.prefill_speedup_paired,
                vs_topk_paired=vs_topk,
                vs_topk_paired_range=vs_topk_range,
                topk_control_paired=topk_control,
                topk_control_paired_range=topk_control_range,
            )
    scaling_to_largest = {name: values[largest] for name, values in scaling.items()}
    return Headline(
        prefill.get("ours-s1", {}),
        ThroughputScaling(smallest, largest, scaling_to_largest),
        prefill.get("ours-s1-packed", {}),
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_suite(
    model,
    prompts: PromptBatch,
    plans: dict[int, RowPlan],
    repeats: int,
    warmup: int,
    new_tokens: int,
    hardware: str,
    clock: Callable[[], float] = time.perf_counter,
    control: bool = False,
) -> tuple[list[Row], dict[str, RowSettings]]:
    """Rows at every batch size, and the settings of each row (per batch size: alpha and k may differ); ``control``
    adds top-k's row a second time (``CONTROL_ROW``).

    Warm-up runs every row ``warmup`` times at the smallest batch size before anything is timed: first calls pay
    for thread pools, kernel selection and first-touch of the weights, which later shapes do not pay again.
    """
    _, crops = flatten_crops(prompts.pixel_values)
    base = model.pruning_config
    rows: list[Row] = []
    settings: dict[str, RowSettings] = {}
    smallest = min(plans)
    for config, packed in timed_rows(base, plans[smallest], control).values():
        for _ in range(warmup):
            run_once(model, prompts.first(smallest), config, new_tokens, clock, packed)
    for batch, plan in plans.items():
        configs = timed_rows(base, plan, control)
        inputs = prompts.first(batch)
        for name, (config, _) in configs.items():
            settings.setdefault(name, RowSettings(ROW_TITLES[name])).pruning[str(batch)] = config.describe()
        runs: dict[str, list[RunResult]] = {name: [] for name in configs}
        for repeat in range(repeats):
            for name in run_order(list(configs), repeat):
                config, packed = configs[name]
                result = run_once(model, inputs, config, new_tokens, clock, packed)
                runs[name].append(result)
                _log(f"batch {batch} repeat {repeat + 1}/{repeats} {name:<9} prefill {result.prefill_s:8.3f} s, "
                     f"decode {1000 * result.decode_s_per_token:8.1f} ms/token")  # fmt: skip
        for name, (config, _) in configs.items():
            stats = runs[name][0].token_stats
            ideal = ideal_cost(model, stats, crops, config.visual_layer, hardware)
            rows.append(summarise(name, batch, runs[name], ideal, config))
    add_ratios(rows)
    return rows, settings


# ---- a queue of requests: grouping by length against packing ------------------------------------------------------

QUEUE_MODES = {  # name -> (grouped, packed)
    "question order, padded": (False, False),
    "question order, packed": (False, True),
    "grouped by length, padded": (True, False),
    "grouped by length, packed": (True, True),
}


def run_queue(
    model,
    prompts: PromptBatch,
    config: PruningConfig,
    batch: int,
    grouped: bool,
    packed: bool,
    new_tokens: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, int]:
    """(seconds, LLM prefill token positions) to answer every prompt, ``batch`` per ``generate`` call.

    Grouped: the images of the whole queue go through the tower first (``merge_for_generation``), then the language
    model answers the requests ``batch`` at a time, shortest prompts first, as ``generate_answers(group_size=)``.
    """
    sync = device_sync(model.device)
    sync()
    start = clock()
    positions = 0
    if grouped:
        merged, resolved = model.merge_for_generation(
            prompts.input_ids, prompts.attention_mask, prompts.pixel_values, prompts.image_sizes, config
        )
        for rows in length_groups([s["prompt"] for s in merged.token_stats], batch):
            part = merged.select(rows)
            model.generate_merged(part, resolved, packed_prefill=packed, **_fixed_length(new_tokens))
            mask = part.attention_mask
            positions += int(mask.sum()) if packed else mask.numel()
    else:
        for begin in range(0, prompts.size, batch):
            part = prompts.rows(begin, begin + batch)
            out = model.generate(
                part.input_ids,
                attention_mask=part.attention_mask,
                images=part.pixel_values,
                image_sizes=part.image_sizes,
                pruning=config,
                return_stats=True,
                packed_prefill=packed,
                **_fixed_length(new_tokens),
            )
            lengths = [s["prompt"] for s in out.token_stats]
            positions += sum(lengths) if packed else len(lengths) * max(lengths)
    sync()
    return clock() - start, positions


def run_queue_suite(
    model,
    prompts: PromptBatch,
    config: PruningConfig,
    batch: int,
    repeats: int,
    new_tokens: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[QueueRow]:
    """Every queue mode ``repeats`` times, in the rows' shuffled order (``run_order``); medians, speedups against the
    first mode."""
    runs: dict[str, list[float]] = {name: [] for name in QUEUE_MODES}
    positions: dict[str, int] = {}
    for repeat in range(repeats):
        for name in run_order(list(QUEUE_MODES), repeat):
            seconds, positions[name] = run_queue(model, prompts, config, batch, *QUEUE_MODES[name], new_tokens, clock)
            runs[name].append(seconds)
            _log(f"queue of {prompts.size}, batch {batch}, repeat {repeat + 1}/{repeats} {name}: {seconds:8.3f} s")
    rows = [
        QueueRow(name, *QUEUE_MODES[name], prompts.size, batch, statistics.median(times), positions[name], times)
        for name, times in runs.items()
    ]
    for row in rows:
        row.speedup = _ratio(rows[0].seconds, row.seconds)
    return rows


def queue_markdown(queue: list[QueueRow], clock: str) -> list[str]:
    first = queue[0]
    unit = "CPU s" if clock == "cpu" else "s"
    return [
        f"A queue of {first.requests} requests answered {first.batch} per call by `ours-s1` (grouped: the images of "
        "the whole queue encoded first, then batches of similar prompt length):",
        "",
        format_table(
            ["Batches", f"Total {unit}", "Speedup", "LLM prefill positions", "Requests / s"],
            [[row.mode, _fmt(row.seconds, 2), _fmt(row.speedup), row.llm_prefill_tokens,
              _fmt(row.requests / row.seconds)] for row in queue],
        ),
        "",
    ]  # fmt: skip


# ---- reports ----------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value * scale:.{digits}f}"


def _span(values: list[float] | None) -> str:
    return "-" if values is None else f"{values[0]:.3f}-{values[1]:.3f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def markdown(report: SpeedReport) -> str:
    setup, rows = report.setup, report.rows
    threads = f"{setup.threads} threads, " if setup.threads else ""
    lines = [
        "# Speed suite",
        "",
        f"Command: `{report.command}`",
        "",
        f"Device: {setup.device} ({setup.dtype}, {threads}{setup.clock} clock); "
        f"model: {setup.model}; "
        f"{setup.text_tokens} text tokens + 1 image per prompt; {setup.new_tokens} new tokens per call; "
        f"{setup.repeats} timed repeat(s) per row and batch size after {setup.warmup} warm-up run(s) per row "
        f"at batch size {min(setup.batch_sizes)}; medians.",
        "",
        f"Calibration: {setup.calibration_note}",
        "",
    ]
    header = ["Batch", "Row", "Visual tok", "Prompt", "Longest", "KV final", "Prefill s", "Speedup", "Ideal",
              "Ideal, padded", "LLM prefill s", "LLM speedup", "LLM ideal", "Decode ms/tok", "Decode speedup", "Extra MB",
              "Mem ratio", "Tok/s", "Tok/s ratio"]  # fmt: skip
    table = []
    for row in rows:
        ratios = row.ratios
        table.append([
            row.batch, row.config, _fmt(row.visual_tokens, 1), _fmt(row.prompt_tokens, 1), row.prompt_tokens_max,
            _fmt(row.kv_final, 1), _fmt(row.prefill_s, 3), _fmt(ratios.prefill_speedup),
            _fmt(ratios.ideal_prefill_speedup), _fmt(ratios.ideal_padded_prefill_speedup), _fmt(row.llm_prefill_s, 3),
            _fmt(ratios.llm_prefill_speedup), _fmt(ratios.ideal_llm_prefill_speedup),
            _fmt(row.decode_s_per_token, 1, 1000), _fmt(ratios.decode_speedup), _mb(row.extra_bytes),
            _fmt(ratios.extra_memory_ratio), _fmt(row.throughput_tok_s), _fmt(ratios.throughput_ratio),
        ])  # fmt: skip
    lines += [format_table(header, table), ""]
    scaling = report.batch_scaling
    sizes = sorted({row.batch for row in rows})
    lines += [
        "Throughput relative to batch size " + str(sizes[0]) + " (generated tokens per second):",
        "",
        format_table(["Row", *[f"batch {b}" for b in sizes]],
                     [[name, *[_fmt(values.get(str(b))) for b in sizes]] for name, values in scaling.items()]),
        "",
    ]  # fmt: skip
    lines += [
        "Ours (stage 1) against no pruning, prefill:",
        "",
        format_table(
            ["Batch", "Visual tok", "Speedup", "Ideal", "Measured / ideal", "Within 15 %", "Ideal, padded batch",
             "LLM speedup", "LLM ideal"],
            [
                [b, _fmt(h.visual_tokens, 1), _fmt(h.prefill_speedup), _fmt(h.ideal_prefill_speedup),
                 _fmt(h.prefill_vs_ideal), "yes" if h.within_15_percent_of_ideal else "no",
                 _fmt(h.ideal_padded_prefill_speedup), _fmt(h.llm_prefill_speedup),
                 _fmt(h.ideal_llm_prefill_speedup)]
                for b, h in report.headline.ours_s1_prefill.items()
            ],
        ),
        "",
    ]  # fmt: skip
    if report.headline.ours_s1_packed_prefill:
        padded = report.headline.ours_s1_prefill
        lines += [
            "Packed against padded prefill (ours, stage 1), speedups over `none`:",
            "",
            format_table(
                ["Batch", "Padded", "Packed", "Top-k", "Ideal (unpadded)", "Ideal, padded batch",
                 "Packed / ideal", "Packed / top-k", "Packed, paired", "Packed / top-k, paired", "Extra MB padded",
                 "Extra MB packed"],
                [
                    [b, _fmt(padded[b].prefill_speedup if b in padded else None), _fmt(h.prefill_speedup),
                     _fmt(h.topk_prefill_speedup), _fmt(h.ideal_prefill_speedup),
                     _fmt(h.ideal_padded_prefill_speedup), _fmt(h.prefill_vs_ideal),
                     _fmt(_ratio(h.prefill_speedup, h.topk_prefill_speedup)), _fmt(h.prefill_speedup_paired),
                     _fmt(h.vs_topk_paired), _fmt(h.padded_extra_mb, 0), _fmt(h.extra_mb, 0)]
                    for b, h in report.headline.ours_s1_packed_prefill.items()
                ],
            ),
            "",
        ]  # fmt: skip
    control = {b: h for b, h in report.headline.ours_s1_packed_prefill.items() if h.topk_control_paired is not None}
    if control:
        lines += [
            f"Control: top-k against itself (`{CONTROL_ROW}`, the same work in the same repeat) beside packed against "
            "top-k; paired medians and the lowest and highest per-repeat ratio:",
            "",
            format_table(
                ["Batch", "Top-k / itself, paired", "Range", "Top-k / packed, paired", "Range"],
                [
                    [b, _fmt(h.topk_control_paired, 3), _span(h.topk_control_paired_range),
                     _fmt(h.vs_topk_paired, 3), _span(h.vs_topk_paired_range)]
                    for b, h in control.items()
                ],
            ),
            "",
        ]  # fmt: skip
    if report.queue:
        lines += queue_markdown(report.queue, setup.clock)
    table = []
    for name, info in report.configs.items():
        settings = info.pruning
        same = len(set(settings.values())) == 1
        text = next(iter(settings.values())) if same else "; ".join(f"batch {b}: {d}" for b, d in settings.items())
        table.append([f"`{name}`", info.title, text])
    lines += [
        format_table(["Row", "Meaning", "Pruning"], table),
        "",
        "Speedup = time of `none` / time of the row, same batch size. Ideal = ratio of OPs (tower + projector + LLM "
        "prefill, each sample at its own length; the LLM part is eval.roofline's count); 'padded batch' counts the "
        "LLM at the batch's longest prompt, as a left-padded batch computes it; a packed prefill computes the "
        "unpadded one. 'Paired' = the median over repeats of the two rows' ratio within one repeat (the rows of a "
        "repeat run back to back). Extra MB = peak memory "
        "above the level at the start of the call (weights excluded). "
        + ("Times are process CPU seconds (tokens per CPU second)." if setup.clock == "cpu" else "Times are wall "
           "seconds."),
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def plot(report: SpeedReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row.batch for row in report.rows})
    names = list(report.configs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        mine = {row.batch: row for row in report.rows_named(name)}
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(sizes))]
        speedups = [mine[b].ratios.prefill_speedup or 0 for b in sizes]
        ideals = [mine[b].ratios.ideal_prefill_speedup or 0 for b in sizes]
        padded = [mine[b].ratios.ideal_padded_prefill_speedup or 0 for b in sizes]
        bars = axes[0].bar(xs, speedups, width, label=name)
        axes[0].scatter(xs, ideals, marker="_", s=300, color="black", zorder=3)
        axes[0].scatter(xs, padded, marker="_", s=300, color="grey", zorder=3)
        axes[1].bar(xs, [1000 * mine[b].decode_s_per_token for b in sizes], width, color=bars[0].get_facecolor())
        axes[2].plot(sizes, [mine[b].throughput_tok_s for b in sizes], marker="o", label=name)
    titles = ("prefill speedup vs none (ideal OPs: black; padded batch: grey)", "decode ms / token")
    for axis, title in zip(axes[:2], titles):
        axis.set_xticks(range(len(sizes)), [f"batch {b}" for b in sizes])
        axis.set_title(title)
    axes[0].legend(fontsize=8)
    axes[2].set_xlabel("batch size")
    axes[2].set_xticks(sizes)
    per = "CPU second" if report.setup.clock == "cpu" else "second"
    axes[2].set_title(f"throughput (generated tokens per {per})")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{report.setup.model} on {report.setup.device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line ------------------------------------------------------------------------------------------------


def calibration_note(plans: dict[int, RowPlan], n: int, target: float | None) -> str:
    parts = [
        f"batch {b}: mean i* {p.inflection_mean:.1f} of {n}, alpha {p.alpha} keeps {p.visual_tokens:.1f} per image, "
        f"top-k k = {p.topk}" + ("" if p.reachable else " (target out of reach: mean i* above it)")
        for b, p in plans.items()
    ]
    how = (
        f"alpha calibrated per batch size so that ours keeps {target:g} visual tokens per image on average"
        if target is not None
        else "alpha from the checkpoint"
    )
    return f"{how}; the top-k row keeps ours' mean count per crop. " + "; ".join(parts) + "."


def load_model(args: argparse.Namespace, device: str, dtype: torch.dtype):
    """(model, image processor, description) from a checkpoint or a random-weight geometry."""
    if args.model_path:
        _, model, processor, _ = load_pretrained_model(
            args.model_path, args.model_base, None, device=device, dtype=dtype, vision_tower=args.vision_tower
        )
        if processor is None:
            raise ValueError(
                f"--model-path {args.model_path} is a plain language model: the suite needs a vision tower"
            )
        return model, processor, f"checkpoint {args.model_path}"
    geometry = get_geometry(args.geometry, args.llm_layers)
    _, model, processor, _ = build_random_llava(geometry, device, dtype, args.seed, args.cls_logit_std)
    layers = geometry.llm["num_hidden_layers"]
    return model, processor, f"{geometry.name} geometry, random weights, {layers} LLM layers"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_argument_group("model (a checkpoint, or random weights on a real geometry)")
    source.add_argument("--model-path", default=None, help="anything load_pretrained_model loads")
    source.add_argument("--model-base", default=None)
    source.add_argument("--vision-tower", default=None, help="local CLIP folder overriding mm_vision_tower")
    source.add_argument("--geometry", default="llava-v1.5-7b", help="random-weight geometry (without --model-path)")
    source.add_argument("--llm-layers", type=int, default=None, help="LLM depth of the random model (default: full)")
    source.add_argument("--cls-logit-std", type=float, default=2.0, help="spread of the random CLS scores")
    source.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("workload")
    run.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    run.add_argument("--repeats", type=int, default=3, help="timed runs per row and batch size (median)")
    run.add_argument("--warmup", type=int, default=1, help="untimed runs per row first, at the smallest batch size")
    run.add_argument("--new-tokens", type=int, default=16, help="tokens generated per call (>= 2)")
    run.add_argument("--text-tokens", type=int, default=PAPER_TEXT_TOKENS, help="text tokens per prompt (Table 6)")
    run.add_argument("--target-visual-tokens", type=float, default=None,
                     help=f"calibrate alpha to this mean (default {PAPER_VISUAL_TOKENS} with random weights, "
                          "the checkpoint's alpha otherwise; 0 = keep alpha)")  # fmt: skip
    run.add_argument(
        "--group-window",
        type=int,
        default=0,
        help="also time a queue of this many batches of the largest batch size (ours-s1): question order against "
        "grouped by prompt length, padded against packed (0: skip)",
    )
    run.add_argument(
        "--control",
        action="store_true",
        help=f"also time top-k a second time in every repeat ('{CONTROL_ROW}'): its paired ratio to top-k is what "
        "the machine's noise alone gives two rows that do the same work",
    )
    run.add_argument("--image-folder", default=None, help="real images (default: synthetic shapes)")
    run.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="default: fp16 on GPU")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="'cpu': process CPU time, steadier on a shared CPU machine (CPU device; use --threads 1)",
    )
    run.add_argument("--hardware", default="a100-40gb", help="eval.hardware preset for the roofline-time ideal")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="output/speed", help="folder for speed.json, speed.md, speed.png")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-sizes and --repeats must be >= 1, --warmup >= 0")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (decode time is measured between tokens), got {args.new_tokens}")
    if args.group_window < 0:
        parser.error(f"--group-window must be >= 0, got {args.group_window}")
    if args.text_tokens < 1:
        parser.error(f"--text-tokens must be >= 1, got {args.text_tokens}")
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        parser.error("--clock cpu measures CPU work; use it with --device cpu")
    if args.target_visual_tokens is not None and args.target_visual_tokens < 0:
        parser.error(f"--target-visual-tokens must be >= 0, got {args.target_visual_tokens}")
    if args.model_path is None and args.target_visual_tokens is None:
        args.target_visual_tokens = float(PAPER_VISUAL_TOKENS)
    if args.target_visual_tokens == 0:
        args.target_visual_tokens = None
    if not args.no_plot:
        from importlib.util import find_spec

        if find_spec("matplotlib") is None:
            parser.error("the plot needs matplotlib (pip install matplotlib), or pass --no-plot")
    return args


def main(argv: list[str] | None = None) -> SpeedReport:
    args = parse_args(argv)
    command = "python -m eval.tools.speed " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    model, processor, description = load_model(args, args.device, dtype)
    sizes = sorted(set(args.batch_sizes))
    count = sizes[-1] * max(1, args.group_window)
    images = (
        folder_images(args.image_folder, count)
        if args.image_folder
        else synthetic_images(count, tuple(args.image_size), args.seed)
    )
    prompts = build_prompt_batch(model, processor, images, args.text_tokens, args.seed)
    base = model.pruning_config
    inflection, crops, n = inflection_points(model, prompts, base)
    plans = {b: plan_rows(inflection, crops, n, base, b, args.target_visual_tokens) for b in sizes}
    for plan in plans.values():
        _log(f"{description}; batch {plan.batch}: alpha {plan.alpha}, top-k {plan.topk}, "
             f"{plan.visual_tokens:.1f} visual tokens per image expected")  # fmt: skip
    rows, configs = run_suite(
        model,
        prompts,
        plans,
        args.repeats,
        args.warmup,
        args.new_tokens,
        args.hardware,
        CLOCKS[args.clock],
        args.control,
    )
    queue = []
    if args.group_window:
        ours = row_configs(base, plans[sizes[-1]])["ours-s1"]
        queue = run_queue_suite(model, prompts, ours, sizes[-1], args.repeats, args.new_tokens, CLOCKS[args.clock])
    scaling = batch_scaling(rows)
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    setup = Setup(
        model=description,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads() if model.device.type == "cpu" else None,
        clock=args.clock,
        torch=torch.__version__,
        text_tokens=args.text_tokens,
        new_tokens=args.new_tokens,
        batch_sizes=sizes,
        repeats=args.repeats,
        warmup=args.warmup,
        hardware=args.hardware,
        target_visual_tokens=args.target_visual_tokens,
        patches_per_crop=n,
        plans=plans,
        calibration_note=calibration_note(plans, n, args.target_visual_tokens),
    )
    report = SpeedReport(command, setup, configs, rows, scaling, headline(rows, scaling), queue)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / "speed.md").write_text(markdown(report), encoding="utf-8")
    if not args.no_plot:
        plot(report, out / "speed.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()

"""What the speed suite (``eval.tools.speed``) measures and reports, as types: one timed call, the ideal cost of a
prefill, a row (one pruning setting at one batch size) with its ratios to the unpruned row, the headline figures and
the whole report. ``to_json`` gives the layout of ``speed.json`` (docs/speed.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from eval.tools.speed_models import RowPlan


@dataclass
class RunResult:
    """One ``model.generate`` call."""

    prefill_s: float  # call start -> first logits
    vision_s: float  # call start -> the LLM's first forward (tower, projector, merge, cache setup)
    llm_prefill_s: float  # the LLM's prefill forward (+ first-token sampling)
    decode_s_per_token: float
    total_s: float
    throughput: float  # generated tokens per second, whole batch
    peak_bytes: int | None
    extra_bytes: int | None
    token_stats: list[dict[str, Any]] = field(default_factory=list)  # per sample, as generate returns them

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"token_stats": None}  # the row holds the first run's statistics


@dataclass
class IdealCost:
    """OPs of one batch's prefill."""

    vision: float
    projector: float
    llm: float  # every sample at its own prompt length
    llm_seconds: float  # the same on the roofline of --hardware
    llm_padded: float  # every sample at the batch's longest prompt: what a left-padded batch computes

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm

    @property
    def total_padded(self) -> float:
        return self.vision + self.projector + self.llm_padded

    def to_json(self) -> dict[str, float]:
        return asdict(self) | {"total": self.total, "total_padded": self.total_padded}


@dataclass
class Ratios:
    """A row against the ``none`` row of the same batch size: speedups for times, plain ratios for the rest; None
    where a figure is missing or not positive."""

    prefill_speedup: float | None
    llm_prefill_speedup: float | None
    decode_speedup: float | None
    throughput_ratio: float | None
    extra_memory_ratio: float | None
    ideal_prefill_speedup: float | None
    ideal_padded_prefill_speedup: float | None
    ideal_llm_prefill_speedup: float | None
    ideal_llm_roofline_time_speedup: float | None
    prefill_vs_ideal: float | None  # measured prefill speedup / ideal prefill speedup
    prefill_speedup_paired: float | None = None  # median over repeats of none's prefill / the row's, same repeat


@dataclass
class Row:
    """One pruning setting at one batch size: medians over the timed runs, token means over the samples."""

    config: str  # the row's name (``none``, ``topk``, ``ours-s1``, ``ours-s12``, ``ours-s1-packed``, ...)
    batch: int
    pruning: str  # PruningConfig.describe()
    visual_tokens: float | None
    prompt_tokens: float | None
    kv_final: float | None
    prefill_s: float
    vision_s: float
    llm_prefill_s: float
    decode_s_per_token: float
    total_s: float
    throughput_tok_s: float
    peak_bytes: int | None
    extra_bytes: int | None
    prompt_tokens_max: int
    ideal_ops: IdealCost
    repeats: list[RunResult]
    token_stats: list[dict[str, Any]]  # the first run's, per sample
    ratios: Ratios | None = None  # set once every row of the batch size is measured

    def to_json(self) -> dict[str, Any]:
        plain = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return plain | {
            "ideal_ops": self.ideal_ops.to_json(),
            "repeats": [run.to_json() for run in self.repeats],
            "ratios": None if self.ratios is None else asdict(self.ratios),
        }


@dataclass
class RowSettings:
    """What a row means and, per batch size, its pruning settings (alpha and k may differ between batch sizes)."""

    title: str
    pruning: dict[str, str] = field(default_factory=dict)  # batch size -> PruningConfig.describe()


@dataclass
class PrefillHeadline:
    """ours-s1 against none at one batch size, measured and ideal."""

    visual_tokens: float | None
    prefill_speedup: float | None
    ideal_prefill_speedup: float | None
    prefill_vs_ideal: float | None
    within_15_percent_of_ideal: bool
    ideal_padded_prefill_speedup: float | None
    llm_prefill_speedup: float | None
    ideal_llm_prefill_speedup: float | None
    topk_prefill_speedup: float | None = None  # fixed top-k at the same mean count, same batch size
    extra_mb: float | None = None  # peak memory above the call's start (the row's)
    padded_extra_mb: float | None = None  # the same for the padded row (a packed row's counterpart)
    prefill_speedup_paired: float | None = None  # Ratios.prefill_speedup_paired
    vs_topk_paired: float | None = None  # median over repeats of top-k's prefill / ours, same repeat
    vs_topk_paired_range: list[float] | None = None  # [lowest, highest] of those per-repeat ratios
    topk_control_paired: float | None = None  # with --control: the same for top-k over its second run (the noise)
    topk_control_paired_range: list[float] | None = None


@dataclass
class ThroughputScaling:
    """Throughput at the largest batch size over throughput at the smallest, per row."""

    smallest: str
    largest: str
    ratios: dict[str, float | None]  # row name -> ratio

    def to_json(self) -> dict[str, Any]:
        return {"from": self.smallest, "to": self.largest, **self.ratios}


@dataclass
class Headline:
    """The acceptance figures."""

    ours_s1_prefill: dict[str, PrefillHeadline]  # batch size -> figures, padded prefill
    throughput_scaling: ThroughputScaling
    ours_s1_packed_prefill: dict[str, PrefillHeadline] = field(default_factory=dict)  # the same, packed prefill

    def to_json(self) -> dict[str, Any]:
        return {
            "ours_s1_prefill": {batch: asdict(h) for batch, h in self.ours_s1_prefill.items()},
            "ours_s1_packed_prefill": {batch: asdict(h) for batch, h in self.ours_s1_packed_prefill.items()},
            "throughput_scaling": self.throughput_scaling.to_json(),
        }


@dataclass
class Setup:
    """How the suite ran."""

    model: str
    device: str
    dtype: str
    threads: int | None  # torch CPU threads; None on a GPU
    clock: str
    torch: str
    text_tokens: int
    new_tokens: int
    batch_sizes: list[int]
    repeats: int
    warmup: int
    hardware: str
    target_visual_tokens: float | None
    patches_per_crop: int
    plans: dict[int, RowPlan]
    calibration_note: str

    def to_json(self) -> dict[str, Any]:
        plain = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return plain | {"plans": {str(batch): asdict(plan) for batch, plan in self.plans.items()}}


@dataclass
class QueueRow:
    """A queue of requests answered by one row's settings, in batches formed one way (``--group-window``)."""

    mode: str
    grouped: bool  # batches of similar prompt lengths (images of the whole queue encoded first), else question order
    packed: bool  # packed prefill
    requests: int
    batch: int
    seconds: float  # median over the repeats, whole queue
    llm_prefill_tokens: int  # token positions the LLM prefill computes: padded batches count rows x longest
    runs: list[float] = field(default_factory=list)
    speedup: float | None = None  # against the first mode (question order, padded)


@dataclass
class SpeedReport:
    command: str
    setup: Setup
    configs: dict[str, RowSettings]  # row name -> settings
    rows: list[Row]
    batch_scaling: dict[str, dict[str, float | None]]  # row name -> batch size -> throughput over the smallest's
    headline: Headline
    queue: list[QueueRow] = field(default_factory=list)

    def rows_named(self, name: str) -> list[Row]:
        return sorted((row for row in self.rows if row.config == name), key=lambda row: row.batch)

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": "speed",
            "command": self.command,
            "setup": self.setup.to_json(),
            "configs": {name: asdict(settings) for name, settings in self.configs.items()},
            "rows": [row.to_json() for row in self.rows],
            "batch_scaling": self.batch_scaling,
            "headline": self.headline.to_json(),
            "queue": [asdict(row) for row in self.queue],
        }

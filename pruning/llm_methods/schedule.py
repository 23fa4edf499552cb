"""Per-layer reduction schedules (Zhao et al., "Accelerating Multimodal Large Language Models by Searching Optimal
Vision Token Reduction", arXiv 2412.00556, CVPR 2025): before each decoder layer l >= 1, the visual tokens still
held are ranked by the attention they received at layer l - 1 and only as many as a schedule file gives for layer l
go on. The paper's finding behind it: the ranking by attention is much the same in every layer but the first, so
the tokens a deeper layer needs are among those a shallower one kept, and the count never has to grow with depth.

The schedule comes from G-Search (``python -m eval.tools.gsearch``: the fewest tokens per layer, shallow to deep,
without a drop on a calibration set) or P-Sigmoid (``python -m eval.tools.psigmoid``: a sigmoid over depth tuned by
Bayesian optimisation for a budget), or is written by hand. No official code was found (the paper links none);
docs/schedules.md has the rule as implemented and what could not be checked against the paper.

The score is FastV's (pruning/llm_methods/fastv.py, ``last_row_attention``): the last prompt token's softmax row at
layer l - 1, averaged over heads, recomputed in fp32 for that one row while the model keeps SDPA. Scores are computed
only before the layers where some row's count falls, so a schedule that drops to R at layer K alone is FastV at K.

A schedule file is a JSON object::

    {"unit": "fraction", "keep": [1.0, 1.0, 0.5, 0.25, ...], ...}   # any other keys: where it came from

``keep`` has one entry per decoder layer, the visual tokens that enter that layer: with ``"unit": "fraction"`` a
fraction of the visual tokens the sample brought into the LLM (after any vision-side method, so with stage 1 the
schedule starts from the sample's adaptive count), rounded as FastV rounds, round(n * f); with ``"unit": "count"`` a
count, capped at what the sample brought. Layer 0 keeps everything (no earlier layer ranks the tokens), and the
entries never grow with depth (a dropped token cannot come back).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.config import PruningConfig, PruningConfigError
from pruning.llm import LayerDropper, LayerView, register_llm_method
from pruning.llm_methods.common import keep_top_visual, last_row_attention
from pruning.registry import Param

UNITS = ("fraction", "count")

SCHEDULE = Param(
    "schedule",
    str,
    None,
    "JSON file with the visual tokens entering each decoder layer (fractions of those entering the LLM, or counts); "
    "written by python -m eval.tools.gsearch or eval.tools.psigmoid (docs/schedules.md)",
    optional=True,
)


@dataclass(frozen=True)
class Schedule:
    """A checked schedule: ``keep[l]`` for every decoder layer l, in ``unit``; ``source`` is the file (for errors)."""

    unit: str
    keep: tuple[float, ...]
    source: str = "schedule"
    extra: Mapping[str, Any] = field(default_factory=dict)  # the file's other keys: where it came from

    def counts(self, visual: int) -> list[int]:
        """The visual tokens entering each layer for a sample that brought ``visual`` into the LLM."""
        if self.unit == "fraction":
            return [round(visual * Fraction(str(value))) for value in self.keep]
        if visual > self.keep[0]:
            raise PruningConfigError(
                f"{self.source}: layer 0 keeps {int(self.keep[0])} visual tokens but a sample brings {visual} into "
                f"the LLM; nothing ranks them before layer 0, so give it at least the largest count "
                f"({SCHEDULE.cli_flag})"
            )
        return [min(int(value), visual) for value in self.keep]


def _fail(source: str, problem: str) -> PruningConfigError:
    return PruningConfigError(f"{source}: {problem} ({SCHEDULE.cli_flag})")


def check_schedule(data: Any, source: str = "schedule") -> Schedule:
    """The schedule in a parsed file, or ``PruningConfigError`` naming the file and the layer."""
    if not isinstance(data, dict) or "unit" not in data or "keep" not in data:
        raise _fail(
            source,
            "expected a JSON object with 'unit' ('fraction' or 'count') and 'keep' (one entry per decoder layer)",
        )
    unit, keep = data["unit"], data["keep"]
    if unit not in UNITS:
        raise _fail(source, f"'unit' must be 'fraction' or 'count', got {unit!r}")
    if not isinstance(keep, list) or not keep:
        raise _fail(source, f"'keep' must be a non-empty list, one entry per decoder layer, got {keep!r}")
    for layer, value in enumerate(keep):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if unit == "fraction" and not (number and 0 <= value <= 1):
            raise _fail(source, f"layer {layer} keeps {value!r}; a fraction must be a number in [0, 1]")
        if unit == "count" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise _fail(source, f"layer {layer} keeps {value!r}; a count must be an integer >= 0")
    if unit == "fraction" and keep[0] != 1:
        raise _fail(
            source, f"layer 0 keeps {keep[0]!r}; nothing ranks the visual tokens before layer 0, so it must be 1"
        )
    for layer in range(1, len(keep)):
        if keep[layer] > keep[layer - 1]:
            raise _fail(
                source,
                f"layer {layer} keeps {keep[layer]!r}, more than layer {layer - 1}'s {keep[layer - 1]!r}; a dropped "
                "token cannot come back, so the entries must not grow with depth",
            )
    extra = {key: value for key, value in data.items() if key not in ("unit", "keep")}
    return Schedule(unit, tuple(keep), source, extra)


def read_schedule(path: str | Path) -> Schedule:
    """Read and check a schedule file; every problem is a ``PruningConfigError`` naming the file (and the layer)."""
    path = Path(path)
    if not path.is_file():
        raise PruningConfigError(f"schedule file {str(path)!r} not found ({SCHEDULE.cli_flag})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(str(path), f"not a readable JSON file: {err}") from None
    return check_schedule(data, str(path))


def write_schedule(path: str | Path, unit: str, keep: Sequence[float], **extra: Any) -> Schedule:
    """Check and write a schedule file (``extra``: where it came from, JSON-serialisable); returns the schedule."""
    data = {"unit": unit, "keep": list(keep), **extra}
    schedule = check_schedule(data, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return schedule


def _check(config: PruningConfig) -> None:
    if config.schedule is None:
        raise PruningConfigError(f"llm_pruning='schedule' needs a schedule file ({SCHEDULE.cli_flag} FILE)")
    read_schedule(config.schedule)


@register_llm_method(
    "schedule",
    params=(SCHEDULE,),
    description="Per-layer schedule (G-Search / P-Sigmoid, arXiv 2412.00556): before each layer l, keep the visual "
    "tokens that received the most attention at layer l-1 (the last prompt token's, mean over heads), as many as the "
    "schedule file gives for layer l (a fraction of those entering the LLM, or a count); text tokens all go on.",
    check=_check,
    detail=lambda c: f"schedule={c.schedule}",
)
class ScheduleDropper(LayerDropper):
    def __init__(self, config: PruningConfig):
        super().__init__(config)
        self.schedule = read_schedule(config.schedule)
        self.plan: list[list[int]] | None = None  # per row, the visual tokens entering each layer

    def check_model(self, layers: Sequence[nn.Module]) -> None:
        if len(self.schedule.keep) != len(layers):
            raise PruningConfigError(
                f"{self.schedule.source} lists {len(self.schedule.keep)} layers; this model has {len(layers)} decoder "
                f"layers ({SCHEDULE.cli_flag})"
            )

    def keep(self, view: LayerView) -> torch.Tensor | None:
        if view.index == 0:
            self.plan = [self.schedule.counts(n) for n in view.visual.sum(dim=1).tolist()]
            return None
        held = view.visual.sum(dim=1).tolist()
        counts = [min(plan[view.index], n) for plan, n in zip(self.plan, held)]
        if counts == held:
            return None
        scores = last_row_attention(
            view.layers[view.index - 1], view.previous_input, view.position_embeddings, view.valid
        )
        return keep_top_visual(scores, view.visual, view.valid, counts)

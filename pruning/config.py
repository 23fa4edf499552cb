"""One configuration object for both pruning stages.

It lives in the model config under the key ``pruning`` (absent = both stages off), round-trips through
``config.json``, and can be overridden from every command line with the flags added by ``add_pruning_args``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

VISUAL_STRATEGIES = ("longtail", "topk", "ratio", "alpha_times", "random", "none")
VISUAL_SCORES = ("full", "heads")
VISUAL_MODES = ("select", "inside")
CROP_BUDGETS = ("per_crop", "global")
KV_STRATEGIES = ("h2o", "none")


class PruningConfigError(ValueError):
    """A pruning setting that is out of range or inconsistent; the message names the setting."""


@dataclass(frozen=True)
class PruningConfig:
    # stage 1: visual tokens, inside the vision tower
    visual_pruning: str = "none"
    alpha: float = 0.24
    visual_layer: int = 16
    visual_topk: int | None = None
    visual_ratio: float | None = None
    visual_min_keep: int = 1
    visual_score: str = "full"  # "full": paper eq. 1, one head of full width; "heads": mean of per-head softmax
    visual_mode: str = "select"  # "inside": tower layers after visual_layer see only CLS + kept tokens
    crop_budget: str = "per_crop"  # LLaVA-1.6: score each crop alone, or pool one budget over all crops
    seed: int = 0  # for the "random" strategy
    # stage 2: KV eviction in the LLM
    kv_pruning: str = "none"
    heavy_ratio: float = 0.5
    recent_ratio: float = 0.5
    heavy_budget: int | None = None
    recent_budget: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ---- checks -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        _one_of("visual_pruning", self.visual_pruning, VISUAL_STRATEGIES)
        _one_of("visual_score", self.visual_score, VISUAL_SCORES)
        _one_of("visual_mode", self.visual_mode, VISUAL_MODES)
        _one_of("crop_budget", self.crop_budget, CROP_BUDGETS)
        _one_of("kv_pruning", self.kv_pruning, KV_STRATEGIES)
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0 < self.alpha <= 1):
            raise PruningConfigError(f"alpha must be in (0, 1], got {self.alpha!r}")
        if not isinstance(self.visual_layer, int) or self.visual_layer < 0:
            raise PruningConfigError(f"visual_layer must be a non-negative integer, got {self.visual_layer!r}")
        if not isinstance(self.visual_min_keep, int) or self.visual_min_keep < 1:
            raise PruningConfigError(f"visual_min_keep must be an integer >= 1, got {self.visual_min_keep!r}")
        if self.visual_pruning == "topk" and (self.visual_topk is None or self.visual_topk < 1):
            raise PruningConfigError(f"visual_pruning='topk' needs visual_topk >= 1, got {self.visual_topk!r}")
        if self.visual_pruning in ("ratio", "random") and self.visual_ratio is None and self.visual_topk is None:
            raise PruningConfigError(f"visual_pruning={self.visual_pruning!r} needs visual_ratio (or visual_topk)")
        if self.visual_ratio is not None and not (0 < self.visual_ratio <= 1):
            raise PruningConfigError(f"visual_ratio must be in (0, 1], got {self.visual_ratio!r}")
        for name in ("heavy_ratio", "recent_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise PruningConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("heavy_budget", "recent_budget"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise PruningConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if (self.heavy_budget is None) != (self.recent_budget is None):
            raise PruningConfigError("heavy_budget and recent_budget must be given together (absolute budgets)")
        if self.kv_pruning == "h2o" and self.heavy_budget is None and self.heavy_ratio + self.recent_ratio <= 0:
            raise PruningConfigError("kv_pruning='h2o' needs heavy_ratio + recent_ratio > 0")
        if self.kv_pruning == "h2o" and self.heavy_budget == 0 and self.recent_budget == 0:
            raise PruningConfigError(
                "kv_pruning='h2o' with heavy_budget 0 and recent_budget 0 would evict every key; "
                "give heavy_budget + recent_budget >= 1"
            )

    # ---- views ---------------------------------------------------------------------------------------------
    @property
    def visual_enabled(self) -> bool:
        return self.visual_pruning != "none"

    @property
    def kv_enabled(self) -> bool:
        return self.kv_pruning != "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> PruningConfig:
        """Build from a ``pruning`` section; unknown keys are an error naming ``source``."""
        if data is None:
            return cls()
        if isinstance(data, PruningConfig):
            return data
        if not isinstance(data, dict):
            raise PruningConfigError(f"{source}: 'pruning' must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PruningConfigError(f"{source}: unknown pruning keys {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**data)
        except PruningConfigError as err:
            raise PruningConfigError(f"{source}: {err}") from None

    def merged(self, **overrides: Any) -> PruningConfig:
        """A copy with the non-None overrides applied (None means 'keep')."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def describe(self) -> str:
        """Short human label, e.g. for table rows and logs."""
        parts = []
        if self.visual_enabled:
            detail = {
                "longtail": f"alpha={self.alpha}",
                "alpha_times": f"alpha={self.alpha}",
                "topk": f"k={self.visual_topk}",
                "ratio": f"ratio={self.visual_ratio}",
                "random": f"ratio={self.visual_ratio}" if self.visual_ratio is not None else f"k={self.visual_topk}",
            }[self.visual_pruning]
            parts.append(f"visual={self.visual_pruning}({detail}, layer {self.visual_layer})")
        if self.kv_enabled:
            if self.heavy_budget is not None:
                parts.append(f"kv=h2o(heavy={self.heavy_budget}, recent={self.recent_budget})")
            else:
                parts.append(f"kv=h2o(heavy={self.heavy_ratio}, recent={self.recent_ratio})")
        return ", ".join(parts) or "no pruning"


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PruningConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


# ---- command line -----------------------------------------------------------------------------------------
_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--visual-pruning", "visual_pruning", {"choices": VISUAL_STRATEGIES, "help": "stage 1 keep rule"}),
    ("--alpha", "alpha", {"type": float, "help": "stage 1 smoothing coefficient, keep k = ceil(i*/alpha)"}),
    ("--visual-layer", "visual_layer", {"type": int, "help": "CLIP layer whose CLS row scores the patches"}),
    ("--visual-topk", "visual_topk", {"type": int, "help": "kept patches for --visual-pruning topk"}),
    ("--visual-ratio", "visual_ratio", {"type": float, "help": "kept fraction for ratio / random"}),
    ("--visual-min-keep", "visual_min_keep", {"type": int, "help": "never keep fewer patches than this"}),
    ("--visual-score", "visual_score", {"choices": VISUAL_SCORES, "help": "full-width score (paper) or head mean"}),
    ("--visual-mode", "visual_mode", {"choices": VISUAL_MODES, "help": "'inside' runs later tower layers on kept"}),
    ("--crop-budget", "crop_budget", {"choices": CROP_BUDGETS, "help": "LLaVA-1.6: per crop or pooled"}),
    ("--kv-pruning", "kv_pruning", {"choices": KV_STRATEGIES, "help": "stage 2 KV-cache eviction"}),
    ("--heavy-ratio", "heavy_ratio", {"type": float, "help": "heavy-hitter budget as a fraction of the prompt"}),
    ("--recent-ratio", "recent_ratio", {"type": float, "help": "recent-window budget as a fraction of the prompt"}),
    ("--heavy-budget", "heavy_budget", {"type": int, "help": "absolute heavy-hitter budget (with --recent-budget)"}),
    ("--recent-budget", "recent_budget", {"type": int, "help": "absolute recent-window budget"}),
]


def add_pruning_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the pruning flags. Every flag defaults to None: 'keep what the checkpoint's config says'."""
    group = parser.add_argument_group("pruning (defaults: the checkpoint's config, else off)")
    for flag, dest, kwargs in _FLAGS:
        group.add_argument(flag, dest=dest, default=None, **kwargs)
    return parser


def pruning_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The pruning flags the user actually set."""
    return {dest: getattr(args, dest) for _, dest, _ in _FLAGS if getattr(args, dest, None) is not None}


def resolve_pruning(base: PruningConfig | dict | None, overrides: dict[str, Any] | None = None) -> PruningConfig:
    """Checkpoint config (or None) plus explicit overrides, validated as a whole."""
    config = PruningConfig.from_dict(base) if not isinstance(base, PruningConfig) else base
    try:
        return config.merged(**(overrides or {}))
    except PruningConfigError:
        raise
    except TypeError as err:
        raise PruningConfigError(str(err)) from None

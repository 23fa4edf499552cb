"""Which runs the comparison makes (``python -m eval.tools.compare``): one ``Row`` per method and budget.

Every row is a set of pruning settings (config keys) that also reads as the flags a user would put into
``PRUNING_ARGS`` to run it alone, and a run name in the scripts' ``CKPT`` convention (``<model>-<method>[-<budget>]``,
so the rows for no pruning and for ours share their answers with ``scripts/v1_5/eval/*.sh`` runs of the same
settings: ``llava-v1.5-7b``, ``llava-v1.5-7b-longtail``, ``llava-v1.5-7b-longtail-h2o``).

Rows, in the order they run:

- ``reference``: no pruning; ours (stage 1, the long-tail rule) and ours stages 1+2 (+ H2O KV eviction);
- ``matched``: top-k, random and pool at ours' mean count per image (per crop) on the same images (the paper's
  Table 1 comparison), known only once ours has run; run names ``<model>-<method>-matched``;
- one group per budget B (visual tokens per image, per crop for LLaVA-1.6): the fixed-budget vision-side methods at
  ``--visual-tokens B`` (PruMerge with ``--prumerge-adaptive false``) and the LLM-side methods at ``--llm-tokens B``;
- ``adaptive``: the methods that choose their own count (PruMerge, PruMerge+, Recoverable Compression, and the
  literal reading of ours' rule, ``alpha_times``).

Registered methods the plan does not run are listed with the reason (``not_planned``), so nothing is dropped
silently. Pure settings arithmetic: no model is needed here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pruning import registry

REFERENCE, MATCHED, ADAPTIVE = "reference", "matched", "adaptive"
OFF = {"visual_pruning": "none", "kv_pruning": "none", "llm_pruning": "none"}  # every row names all three
PDROP_OFFICIAL_LAYERS = (8, 16, 24)  # of LLaVA-1.5-7B's 32 decoder layers
PDROP_OFFICIAL_RATIOS = ("0.5", "0.25", "0.125")
OFFICIAL_DEPTH = 32


class PlanError(ValueError):
    """A comparison flag that cannot be planned; the message names the flag."""


@dataclass(frozen=True)
class Row:
    """One run of the comparison."""

    key: str  # the run name's suffix: "topk-64", "longtail", "none"
    method: str  # the comparison's method name (``METHODS``)
    label: str  # as printed: "ToMe", "ours, stage 1"
    group: str  # REFERENCE, MATCHED, ADAPTIVE, or the budget as text ("64")
    settings: dict[str, Any] = field(default_factory=dict)  # pruning config keys
    budget: int | None = None  # the fixed budget, when the method has one
    note: str = ""  # a setting that differs from the method's defaults, and why

    @property
    def family(self) -> str:
        if self.settings.get("llm_pruning", "none") != "none":
            return "llm"
        return "reference" if self.method in ("none", "longtail", "h2o") else "vision"

    def flags(self) -> list[str]:
        """The settings as command-line flags (what PRUNING_ARGS would hold)."""
        params = registry.parameters()
        out: list[str] = []
        for key, value in self.settings.items():
            flag = "--" + key.replace("_", "-") if key in OFF else params[key].cli_flag
            if flag is None:
                raise PlanError(f"setting {key!r} has no command-line flag")
            out += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
        return out

    def run_name(self, prefix: str) -> str:
        """``<prefix>-<key>``, the prefix alone for no pruning (the model's name: as the scripts' CKPT)."""
        return prefix if self.method == "none" else f"{prefix}-{self.key}"


@dataclass(frozen=True)
class Method:
    """A method of the comparison: its label, how it is set at a budget (fixed) or on its own (adaptive)."""

    name: str
    label: str
    fixed: Callable[[int, int], dict[str, Any]] | None = None  # (budget, LLM depth) -> settings
    adaptive: dict[str, Any] | None = None
    matched: bool = False  # also run at ours' mean count


def _vision(name: str, **extra: Any) -> Callable[[int, int], dict[str, Any]]:
    return lambda budget, depth: {**OFF, "visual_pruning": name, "visual_topk": budget, **extra}


def _llm(name: str) -> Callable[[int, int], dict[str, Any]]:
    def settings(budget: int, depth: int) -> dict[str, Any]:
        out = {**OFF, "llm_pruning": name, "llm_tokens": budget}
        if name == "pdrop":
            out.update(pdrop_schedule(depth))
        return out

    return settings


def pdrop_schedule(depth: int) -> dict[str, str]:
    """PyramidDrop's stages 8, 16, 24 of 32 layers, scaled to a decoder of ``depth`` layers (``round(l * depth /
    32)``, duplicates and layers beyond the decoder dropped, the ratios cut to match); unchanged at 32 layers."""
    layers = sorted({max(1, round(layer * depth / OFFICIAL_DEPTH)) for layer in PDROP_OFFICIAL_LAYERS})
    layers = [layer for layer in layers if layer < depth] or [1]
    return {"pdrop_layers": ",".join(map(str, layers)), "pdrop_ratios": ",".join(PDROP_OFFICIAL_RATIOS[: len(layers)])}


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("topk", "top-k (CLS score)", fixed=_vision("topk"), matched=True),
        Method("random", "random", fixed=_vision("random"), matched=True),
        Method("pool", "average pooling", fixed=_vision("pool"), matched=True),
        Method("divprune", "DivPrune", fixed=_vision("divprune")),
        Method("visionzip", "VisionZip", fixed=_vision("visionzip")),
        Method("tome", "ToMe", fixed=_vision("tome")),
        Method(
            "prumerge",
            "PruMerge",
            fixed=_vision("prumerge", prumerge_adaptive=False),
            adaptive={**OFF, "visual_pruning": "prumerge"},
        ),
        Method("prumerge_plus", "PruMerge+", adaptive={**OFF, "visual_pruning": "prumerge_plus"}),
        Method("recovery", "Recoverable Compression", adaptive={**OFF, "visual_pruning": "recovery"}),
        Method(
            "alpha_times",
            "k = ceil(alpha i*) (ours, literal reading)",
            adaptive={**OFF, "visual_pruning": "alpha_times"},
        ),
        Method("fastv", "FastV", fixed=_llm("fastv")),
        Method("pdrop", "PyramidDrop", fixed=_llm("pdrop")),
        Method("dart", "DART", fixed=_llm("dart")),
        Method("h2o", "ours, stages 1+2 (+ H2O)"),
    )
}
ALWAYS = ("none", "longtail")  # the reference and ours: every other row is compared with them

# Registered methods the comparison does not run, and why (a method registered later and not planned is listed too).
NOT_PLANNED = {
    ("visual_pruning", "ratio"): "the same selection as top-k at a count: ceil(ratio n) patches by the same CLS score",
    ("llm_pruning", "schedule"): "needs a per-layer schedule file (--schedule, written by eval.tools.gsearch / "
    "psigmoid); run it with PRUNING_ARGS",
}
LEFT_OUT = {
    "CrossGET": "needs its fine-tuned cross tokens (learned with the model); not training-free",
}


def parse_methods(text: str | None) -> list[str]:
    """``--methods a,b,c`` (default: all), checked against ``METHODS``; none and longtail always run."""
    if text is None:
        return list(METHODS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS and name not in ALWAYS]
    if unknown or not names:
        found = ", ".join(map(repr, unknown)) or "nothing"
        raise PlanError(
            f"--methods: unknown method {found}; choose from {', '.join(METHODS)} (none and longtail always run)"
        )
    return [name for name in METHODS if name in names]


def parse_budgets(text: str) -> list[int]:
    """``--budgets 64,128,192``: distinct integers >= 1 (the upper bound needs the tower: ``check_budgets``)."""
    budgets = []
    for item in (part.strip() for part in text.split(",")):
        if not item.lstrip("-").isdigit():
            raise PlanError(f"--budgets: {item!r} is not an integer (expected e.g. 64,128,192)")
        budget = int(item)
        if budget < 1:
            raise PlanError(f"--budgets: a budget must be >= 1 visual token, got {budget}")
        if budget not in budgets:
            budgets.append(budget)
    return budgets


def check_budgets(budgets: Iterable[int], patches: int) -> None:
    """Every budget must fit the visual tokens of one image (crop): a method cannot keep more than there are."""
    above = [budget for budget in budgets if budget > patches]
    if above:
        raise PlanError(
            f"--budgets: {', '.join(map(str, above))} is above the {patches} visual tokens per image (crop) of this "
            "model's vision tower"
        )


def reference_rows(methods: Sequence[str], alpha: float) -> list[Row]:
    rows = [
        Row("none", "none", "no pruning", REFERENCE, dict(OFF)),
        Row(
            "longtail",
            "longtail",
            "ours, stage 1 (long-tail)",
            REFERENCE,
            {**OFF, "visual_pruning": "longtail", "alpha": alpha},
        ),
    ]
    if "h2o" in methods:
        settings = {**OFF, "visual_pruning": "longtail", "alpha": alpha, "kv_pruning": "h2o"}
        rows.append(Row("longtail-h2o", "h2o", METHODS["h2o"].label, REFERENCE, settings))
    return rows


def matched_rows(methods: Sequence[str], count: int, grid_side: int | None, depth: int) -> list[Row]:
    """Top-k, random and pool at ``count`` (ours' mean per image or crop); pool at the nearest count that has a grid."""
    rows = []
    for name in methods:
        method = METHODS[name]
        if not method.matched or method.fixed is None:
            continue
        budget, note = count, ""
        if name == "pool" and grid_side is not None:
            budget = nearest_pool_count(count, grid_side)
            if budget != count:
                note = f"{budget}: the count nearest to {count} that has a pooling grid"
        rows.append(Row(f"{name}-matched", name, method.label, MATCHED, method.fixed(budget, depth), budget, note))
    return rows


def budget_rows(methods: Sequence[str], budgets: Sequence[int], depth: int) -> list[Row]:
    rows = []
    for budget in budgets:
        for name in methods:
            method = METHODS[name]
            if method.fixed is None:
                continue
            settings = method.fixed(budget, depth)
            note = ""
            if name == "pdrop" and depth != OFFICIAL_DEPTH:
                note = f"layers {settings['pdrop_layers']} of {depth} (the official 8,16,24 of 32, scaled)"
            if name == "prumerge":
                note = "fixed count (--prumerge-adaptive false): budget - 1 patches + the extra token"
            rows.append(Row(f"{name}-{budget}", name, method.label, str(budget), settings, budget, note))
    return rows


def adaptive_rows(methods: Sequence[str], alpha: float) -> list[Row]:
    rows = []
    for name in methods:
        method = METHODS[name]
        if method.adaptive is None:
            continue
        settings = dict(method.adaptive)
        if name == "alpha_times":
            settings["alpha"] = alpha
        rows.append(Row(name, name, method.label, ADAPTIVE, settings))
    return rows


def nearest_pool_count(count: int, side: int) -> int:
    """The count nearest to ``count`` (the smaller on ties) that pooling can lay out as rows x cols <= side x side."""
    feasible = {rows * cols for rows in range(1, side + 1) for cols in range(rows, side + 1)}
    return min(feasible, key=lambda value: (abs(value - count), value))


def not_planned() -> list[dict[str, str]]:
    """Every registered method the plan does not run, with the reason, and the papers' methods left out."""
    planned = {"none", "longtail", "h2o"} | {
        settings.get(key)
        for method in METHODS.values()
        for settings in (method.adaptive or {}, method.fixed(64, OFFICIAL_DEPTH) if method.fixed else {})
        for key in OFF
    }
    out = []
    for key in OFF:
        for name in registry.names(key):
            if name == registry.NONE or name in planned:
                continue
            reason = NOT_PLANNED.get((key, name), "registered after this comparison was written: not in its plan")
            out.append({"method": name, "selector": key, "reason": reason})
    out += [{"method": name, "selector": "-", "reason": reason} for name, reason in LEFT_OUT.items()]
    return out

"""The comparison's figures and report (``python -m eval.tools.compare``): token counts and prefill OPs from the
answers files, the metric from the scorer's result JSON, speed ratios to the unpruned row; Markdown, JSON, plot.

Token figures are means over the answers to questions with an image (the per-image means of the result JSONs,
``eval.common.token_means``): visual tokens reaching the LLM per image, the mean over the decoder layers of the
visual tokens entering each layer (equal to the former unless an LLM-side method drops tokens inside the LLM; the
design's "mean visual tokens over LLM layers"), the final KV length (the paper's "total tokens": KV entries per layer
once the answer is written, the first layers' for an LLM-side method), and the prefill OPs of the language model:
``eval.roofline``'s per-layer count (LLM-Viewer's, a multiply-add = 2 OPs) at each layer's own length, summed over
the layers, plus the LM head for one token (``eval.tools.gsearch.PrefillCost``, the schedules' count). Vision-tower
and projector OPs are not in it (ToMe's savings are in the tower).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.common import has_image, read_jsonl
from eval.tools.gsearch import PrefillCost

SPEED_BATCH_KEYS = ("1", "batch")  # batch 1 (each sample alone) and the whole speed batch


# ---- figures from the answers file --------------------------------------------------------------------------------


def layer_tokens(layers: int, prompt: int, visual: int, per_layer: Sequence[int] | None = None) -> list[int]:
    """The tokens entering each decoder layer at prefill: the prompt, less the visual tokens an LLM-side method
    dropped before that layer (``per_layer``: the visual tokens entering each layer, from the answers)."""
    return [prompt] * layers if per_layer is None else [prompt - (visual - v) for v in per_layer]


def _number(value: Any) -> float | None:
    if isinstance(value, list):
        value = sum(v for v in value if isinstance(v, (int, float)))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def answer_figures(answers_file: str | Path, cost: PrefillCost) -> dict[str, Any]:
    """Token means and prefill OPs over the answered questions with an image."""
    rows = [row for row in read_jsonl(answers_file) if row.get("error") is None and has_image(row)]
    if not rows:
        return {"answers": 0}
    visual, llm_visual, kv_final, prompt, ops = [], [], [], [], []
    for row in rows:
        tokens = row["tokens"]
        after = _number(tokens.get("visual_after"))
        per_layer = tokens.get("visual_per_layer")
        visual.append(after)
        llm_visual.append(statistics.fmean(per_layer) if per_layer else after)
        kv_final.append(_number(tokens.get("kv_final")))
        prompt.append(_number(tokens.get("prompt")))
        ops.append(cost.prefill(layer_tokens(cost.layers, int(tokens["prompt"]), int(after), per_layer)))
    return {
        "answers": len(rows),
        "visual_tokens": statistics.fmean(visual),
        "llm_visual_tokens": statistics.fmean(llm_visual),
        "kv_final": statistics.fmean(v for v in kv_final if v is not None),
        "prompt": statistics.fmean(v for v in prompt if v is not None),
        "prefill_gops": statistics.fmean(ops) / 1e9,
    }


# ---- speed ratios -------------------------------------------------------------------------------------------------


def speed_ratios(speed: Mapping[str, Mapping[str, Mapping[str, float]]], key: str) -> dict[str, dict[str, float]]:
    """Per batch key: the row's prefill and decode times and its ratios to the 'none' row's (speed-up = none / row
    for the prefill; decode time as a fraction of none's)."""
    out: dict[str, dict[str, float]] = {}
    base, mine = speed.get("none", {}), speed.get(key, {})
    for batch, times in mine.items():
        ref = base.get(batch)
        if ref is None:
            continue
        out[batch] = {
            "prefill_ms": 1000 * times["prefill_s"],
            "decode_ms_per_token": 1000 * times["decode_s"],
            "prefill_speedup": ref["prefill_s"] / times["prefill_s"],
            "decode_vs_none": times["decode_s"] / ref["decode_s"],
        }
    return out


# ---- the report ---------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def group_title(group: str, report: Mapping[str, Any]) -> str:
    if group == "reference":
        return "reference and ours"
    if group == "matched":
        return f"matched: ours' mean count ({report['matched_count']} per image) on the same images"
    if group == "adaptive":
        return "adaptive: each method's own count"
    return f"budget {group} visual tokens per image"


def markdown(report: Mapping[str, Any]) -> str:
    """The comparison table (one section per group), the rows that did not run, and how it was measured."""
    metric = report["benchmark"]["title"]
    batch = report["settings"]["speed_batch"]
    header = [
        "method",
        "flags",
        metric,
        "% of none",
        "visual tokens / image",
        "LLM tokens (mean over layers)",
        "KV final",
        "prefill GOPs",
        "prefill speed-up, b1",
        f"prefill speed-up, b{batch}",
        "decode ms/token, b1 (vs none)",
        f"decode ms/token, b{batch} (vs none)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    group = None
    for row in report["rows"]:
        if row["group"] != group:
            group = row["group"]
            lines.append(f"| **{group_title(group, report)}** |" + " |" * (len(header) - 1))
        lines.append("| " + " | ".join(_cells(row)) + " |")
    text = [
        f"**{metric}** ({report['benchmark']['headline']}) on {report['benchmark']['questions']} questions "
        f"about {report['benchmark']['images']} images, {report['model']['name']}.",
        "",
        *lines,
        "",
    ]
    failed = [row for row in report["rows"] if row.get("status") != "ok"]
    if failed or report["not_run"]:
        text += ["Not run here:", ""]
        text += [f"- {row['label']} (`{' '.join(row['flags'])}`): {row['status']}" for row in failed]
        text += [f"- `{item['method']}`: {item['reason']}" for item in report["not_run"]]
        text.append("")
    notes = [f"- {row['label']} {row['budget'] or ''}: {row['note']}" for row in report["rows"] if row.get("note")]
    if notes:
        text += ["Settings that differ from the methods' defaults:", "", *notes, ""]
    text.append(how_measured(report))
    return "\n".join(text) + "\n"


def _cells(row: Mapping[str, Any]) -> list[str]:
    figures, speed = row.get("figures") or {}, row.get("speed") or {}
    b1, bn = speed.get("1", {}), speed.get("batch", {})

    def decode(times: Mapping[str, float]) -> str:
        if not times:
            return "-"
        return f"{times['decode_ms_per_token']:.1f} ({times['decode_vs_none']:.2f}x)"

    label = row["label"] + (f" ({row['budget']})" if row.get("budget") else "")
    if row.get("status") != "ok":
        return [label, f"`{' '.join(row['flags'])}`", "not run"] + ["-"] * 9
    return [
        label,
        f"`{' '.join(row['flags'])}`",
        _fmt(row.get("metric"), 1),
        _fmt(row.get("retention"), 1),
        _fmt(figures.get("visual_tokens"), 1),
        _fmt(figures.get("llm_visual_tokens"), 1),
        _fmt(figures.get("kv_final"), 1),
        _fmt(figures.get("prefill_gops"), 3),
        _fmt(b1.get("prefill_speedup"), 2, "x"),
        _fmt(bn.get("prefill_speedup"), 2, "x"),
        decode(b1),
        decode(bn),
    ]


def how_measured(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    clock = "process CPU time" if s["clock"] == "cpu" else "wall time"
    threads = f", {s['threads']} torch thread(s)" if s.get("threads") else ""
    packing = (
        "where the prompts differ in length the LLM prefill runs packed, the model's default"
        if s.get("packed_prefill", True)
        else "the LLM prefill runs on the padded batch (packed_prefill off in the model's config)"
    )
    return (
        f"Speed: one `generate` call per row and batch, {s['speed_new_tokens']} new tokens, {clock}{threads}, "
        f"median of {s['speed_repeats']} runs (rows alternate within each run); batch 1 = each of the "
        f"{s['speed_batch']} speed questions alone (mean), b{s['speed_batch']} = the {s['speed_batch']} together "
        f"(left-padded; {packing}). Prefill = call start to the first logits (tower, projector and LLM prefill); "
        "speed-up = "
        "none's prefill time / the row's. Prefill GOPs: the LLM only (eval.roofline, each layer at its own length). "
        f"Device {report['machine']['device']}; wall time of the whole comparison {report['wall_s'] / 60:.1f} min."
    )


def write_json(report: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Metric vs tokens and prefill speed-up vs tokens (batch 1 and the speed batch), one line per method: circles
    for the vision side, squares for the LLM side, stars for ours; dashed: no pruning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report["rows"] if row.get("status") == "ok" and row.get("figures", {}).get("answers")]
    batch = report["settings"]["speed_batch"]
    panels = [("metric", report["benchmark"]["title"]), ("1", "prefill speed-up, batch 1"),
              ("batch", f"prefill speed-up, batch {batch}")]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6))
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["label"], []).append(row)
    palette = plt.get_cmap("tab20")
    shades = [palette(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]  # the dark ones first
    others = [label for label, mine in by_method.items() if mine[0]["family"] != "reference"]
    colours = {label: shades[i % len(shades)] for i, label in enumerate(others)}
    colours.update({label: ("black" if mine[0]["method"] == "longtail" else "dimgray")
                    for label, mine in by_method.items() if mine[0]["family"] == "reference"})  # fmt: skip
    for (what, title), axis in zip(panels, axes):
        for label, mine in by_method.items():
            points = sorted(
                (row["figures"]["llm_visual_tokens"], _panel_value(row, what))
                for row in mine
                if _panel_value(row, what) is not None
            )
            if not points or mine[0]["method"] == "none":
                continue
            xs, ys = zip(*points)
            marker = {"reference": "*", "llm": "s"}.get(mine[0]["family"], "o")
            axis.plot(xs, ys, label=label, color=colours[label], marker=marker,
                      markersize=13 if marker == "*" else 6, linestyle="-" if len(points) > 1 else "none")  # fmt: skip
        reference = next((_panel_value(row, what) for row in rows if row["method"] == "none"), None)
        if reference is not None:
            axis.axhline(reference, color="black", linestyle="--", linewidth=1, label="no pruning")
        axis.set_xlabel("visual tokens, mean over LLM layers")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(f"{report['model']['name']} on {report['benchmark']['title']} ({report['benchmark']['questions']} "
                 f"questions)", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel_value(row: Mapping[str, Any], what: str) -> float | None:
    if what == "metric":
        return row.get("metric")
    return (row.get("speed") or {}).get(what, {}).get("prefill_speedup")

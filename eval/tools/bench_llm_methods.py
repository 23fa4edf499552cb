"""Scoring overhead of the LLM-side baselines (``--llm-pruning``) at prefill, at equal final token counts.

    python -m eval.tools.bench_llm_methods --layers 6 --clock cpu    # Vicuna-7B layer geometry, fp32, 1 CPU thread
    python -m eval.tools.bench_llm_methods --layers 32 --device cuda --dtype float16

The decoder has Vicuna-7B's layer geometry (hidden 4096, 32 heads, MLP 11008; LLaVA-1.5-7B's LLM) with random
weights and a small vocabulary, fed a LLaVA-1.5-shaped prompt: 35 system tokens, 576 visual tokens, ``--text``
question tokens. Per method, one run records which tokens it keeps before which layer; then, alternating in every
repeat, the prefill is timed three ways: the method itself, the same drops replayed with no scoring (a dropper that
keeps the recorded tokens), and no dropping at all. The method minus its replay is the cost of its scoring at
exactly the same token counts per layer; the time spent inside the method's own ``keep`` calls is added up as well
(the scoring alone, free of the run-to-run noise of whole prefills). PyramidDrop's layers 8, 16, 24 of 32 are scaled
to the depth run (``round(l * layers / 32)``); FastV and DART act before layer 2 as officially.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, LlamaForCausalLM

from eval.tools.bench_kv import vicuna_7b_config
from pruning import LayerDropper, LayerView, PruningConfig, drop_tokens

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SYSTEM, VISUAL = 35, 576


def build_decoder(layers: int, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    config = vicuna_7b_config(layers, vocab=1024, max_positions=4096)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def methods(layers: int) -> dict[str, dict]:
    stages = sorted({max(1, round(layer * layers / 32)) for layer in (8, 16, 24)})
    pyramid = ",".join(map(str, stages))
    ratios = ",".join(["0.5", "0.25", "0.125"][: len(stages)])
    return {
        "fastv (K=2, R=0.5)": {"llm_pruning": "fastv"},
        "fastv, paper's query (K=2, R=0.5)": {"llm_pruning": "fastv", "fastv_query": "all"},
        f"pdrop (layers {pyramid}, ratios {ratios})": {
            "llm_pruning": "pdrop",
            "pdrop_layers": pyramid,
            "pdrop_ratios": ratios,
        },
        "dart (K=2, 128 + 4)": {"llm_pruning": "dart"},
    }


class Recorder(LayerDropper):
    """Runs a method and records the prompt indices it keeps before each layer."""

    def __init__(self, method: LayerDropper):
        super().__init__(method.config)
        self.method, self.kept = method, {}
        self.compact_positions, self.needs_norm = method.compact_positions, method.needs_norm

    def keep(self, view: LayerView) -> torch.Tensor | None:
        mask = self.method.keep(view)
        if mask is not None:
            self.kept[view.index] = [set(view.prompt_index[row][mask[row]].tolist()) for row in range(mask.shape[0])]
        return mask


class Timed(LayerDropper):
    """The method, with the time spent in its keep() calls (its scoring and selection) added up."""

    def __init__(self, method: LayerDropper, now: Callable[[], float]):
        super().__init__(method.config)
        self.method, self.now, self.spent = method, now, 0.0
        self.compact_positions, self.needs_norm = method.compact_positions, method.needs_norm

    def keep(self, view: LayerView) -> torch.Tensor | None:
        start = self.now()
        mask = self.method.keep(view)
        self.spent += self.now() - start
        return mask


class Replay(LayerDropper):
    """The recorded drops, with no scoring: the same tokens go on before the same layers."""

    def __init__(self, recorder: Recorder):
        super().__init__(recorder.config)
        self.kept = {
            index: [torch.tensor(sorted(kept)) for kept in rows] for index, rows in recorder.kept.items()
        }  # fmt: skip
        self.compact_positions = recorder.compact_positions

    def keep(self, view: LayerView) -> torch.Tensor | None:
        rows = self.kept.get(view.index)
        if rows is None:
            return None
        return torch.stack([torch.isin(view.prompt_index[r], rows[r].to(view.valid.device)) for r in range(len(rows))])


def prefill(model: LlamaForCausalLM, embeds: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor, dropper):
    inner = model.model
    cache = DynamicCache(config=model.config)
    if dropper is None:
        return inner(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, use_cache=True)
    with drop_tokens(inner.layers, dropper, mask, visual, norm=inner.norm, rotary_emb=inner.rotary_emb):
        return inner(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, use_cache=True)


def clock(kind: str, device: torch.device) -> Callable[[], float]:
    if kind == "cpu":
        return time.process_time
    if device.type == "cuda":
        return lambda: (torch.cuda.synchronize(), time.perf_counter())[1]
    return time.perf_counter


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    model = build_decoder(args.layers, dtype, args.device)
    length = 1 + SYSTEM + VISUAL + args.text
    generator = torch.Generator().manual_seed(1)
    embeds = (torch.randn(args.batch, length, 4096, generator=generator) * 0.02).to(device=device, dtype=dtype)
    mask = torch.ones(args.batch, length, dtype=torch.long, device=device)
    visual = torch.zeros(args.batch, length, dtype=torch.bool, device=device)
    visual[:, 1 + SYSTEM : 1 + SYSTEM + VISUAL] = True
    now = clock(args.clock, device)
    rows = []
    with torch.no_grad():
        for name, settings in methods(args.layers).items():
            config = PruningConfig(**settings)
            method = config.method("llm_pruning").implementation
            recorder = Recorder(method(config))
            prefill(model, embeds, mask, visual, recorder)
            variants = {
                "method": lambda method=method, config=config: Timed(method(config), now),
                "replay": lambda recorder=recorder: Replay(recorder),
                "none": lambda: None,
            }
            times: dict[str, list[float]] = {key: [] for key in (*variants, "scoring")}
            for repeat in range(args.warmup + args.repeats):
                for key, make in variants.items():
                    dropper = make()
                    start = now()
                    prefill(model, embeds, mask, visual, dropper)
                    if repeat >= args.warmup:
                        times[key].append(now() - start)
                        if key == "method":
                            times["scoring"].append(dropper.spent)
            best = {key: min(values) for key, values in times.items()}
            median = {key: statistics.median(values) for key, values in times.items()}
            kept = {
                index: len(sets[0] & set(range(1 + SYSTEM, 1 + SYSTEM + VISUAL)))
                for index, sets in recorder.kept.items()
            }
            rows.append(
                {
                    "method": name,
                    "visual kept (layer: count)": kept,
                    "prefill_ms": {key: 1000 * value for key, value in best.items()},
                    "median_ms": {key: 1000 * value for key, value in median.items()},
                    "scoring_ms": 1000 * median["scoring"],  # inside the method's runs: keep() calls
                    "scoring_share": median["scoring"] / median["replay"],
                    "overhead": best["method"] / best["replay"] - 1,
                    "median_overhead": median["method"] / median["replay"] - 1,
                }
            )
    return {"settings": vars(args), "prompt_tokens": length, "rows": rows}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"{s['layers']} Vicuna-7B-shaped layers, batch {s['batch']}, {result['prompt_tokens']}-token prompt, "
        f"{s['dtype']} on {s['device']}, {s['threads']} thread(s), {s['clock']} clock; prefill: best of "
        f"{s['repeats']} (method - replay: best, median in parentheses)",
        "",
        "| method | visual tokens kept (before layer: count) | prefill, method | prefill, same drops replayed | "
        "no dropping | method - replay | scoring inside the run (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        kept = ", ".join(f"{index}: {count}" for index, count in row["visual kept (layer: count)"].items())
        ms = row["prefill_ms"]
        lines.append(
            f"| {row['method']} | {kept} | {ms['method']:.0f} ms | {ms['replay']:.0f} ms | {ms['none']:.0f} ms | "
            f"{100 * row['overhead']:+.2f} % ({100 * row['median_overhead']:+.2f} %) | {row['scoring_ms']:.0f} ms = "
            f"{100 * row['scoring_share']:.2f} % of the prefill |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (Vicuna-7B has 32)")
    parser.add_argument("--text", type=int, default=40, help="question tokens after the image")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (1 thread)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.layers < 3:
        parser.error("--layers must be >= 3 (FastV and DART act before layer 2)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()

"""Speed and memory of the KV-eviction cache against a plain DynamicCache, as ratios measured in one run.

    python -m eval.tools.bench_kv                       # Vicuna-7B layer geometry, 2 layers, fp32 on CPU (a few minutes)
    python -m eval.tools.bench_kv --layers 4 --prompt 2048 --generated 1024 4096
    python -m eval.tools.bench_kv --batch 8 --prompt 256 --dtype bfloat16    # left-padded batch, prompts 256 down to 144

The model has Vicuna-7B's layer geometry (hidden 4096, 32 heads, MLP 11008) with random weights and a small vocabulary;
only the relative figures are meaningful. Reported:

* prefill overhead: one forward over a P-token prompt with the eviction cache (score accumulation, plus top-k
  eviction when the budget is below P) against the same forward with a DynamicCache;
* decode per token: the capped cache at its steady state (budget + 1 slots, one eviction per step) against a plain
  cache holding P + G tokens (what it replaces after G generated tokens) and a plain cache of the same length as
  the capped one (the eviction overhead, target <= +10 %). A capped layer's work does not depend on G, so it is
  measured once right after the prompt; the plain caches are filled with random keys of the stated length
  (attention cost does not depend on the values);
* KV memory: bytes held by each cache (the capped one counts its scores, positions and slot mask too).

With ``--batch N`` the prompts are left padded to P and have different lengths (P, then evenly down to about P/2), so
each sample has its own budget and the capped cache needs its slot mask; the plain caches carry the same left pads
(their attention mask too). ``--dtype`` matters: half-precision kernels on CPU are not the fp32 ones (a bf16
``scatter_`` once copied the whole K/V tensor per call, which only a bf16 batched run showed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from pruning.config import PruningConfig
from pruning.h2o import enable_kv_eviction, prefill_column_scores
from pruning.kv_cache import KVEvictionCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def vicuna_7b_config(layers: int, vocab: int, max_positions: int) -> LlamaConfig:
    """Vicuna-7B's decoder shape (lmsys/vicuna-7b-v1.5) at another depth and vocabulary, SDPA attention."""
    return LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )


def build_model(layers: int, vocab: int, max_positions: int, dtype: str = "float32") -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(vicuna_7b_config(layers, vocab, max_positions))
    return enable_kv_eviction(model.to(DTYPES[dtype]).eval())


def cache_bytes(cache: DynamicCache | KVEvictionCache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "scores", "positions", "valid"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def prompt_lengths(prompt: int, batch: int) -> list[int]:
    """P for the first sample, then evenly down towards P/2: a batch whose samples all have their own budget."""
    return [prompt - (i * prompt) // (2 * batch) for i in range(batch)]


def left_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    """[batch, width] long attention mask, ones at the right end of each row."""
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    return mask


def filled_plain_cache(model: LlamaForCausalLM, batch: int, length: int) -> DynamicCache:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(batch, config.num_key_value_heads, length, head_dim, dtype=model.dtype)
        cache.update(keys, torch.randn_like(keys), layer)
    return cache


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


class Runner:
    """Times forwards of one model with one clock."""

    def __init__(self, model: LlamaForCausalLM, clock: Callable[[], float]):
        self.model, self.clock = model, clock

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, cache: DynamicCache | KVEvictionCache, mask: torch.Tensor | None = None
    ) -> float:
        start = self.clock()
        self.model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        return self.clock() - start

    @torch.inference_mode()
    def scoring_alone(self, valid: torch.Tensor) -> float:
        """The score accumulation of one prefill by itself, on random queries and keys of the model's shapes: the
        part of the prefill overhead that grows with P, measured without the noise of the rest of the forward."""
        config = self.model.config
        head_dim = config.hidden_size // config.num_attention_heads
        batch, length = valid.shape
        query = torch.randn(batch, config.num_attention_heads, length, head_dim, dtype=self.model.dtype)
        key = torch.randn(batch, config.num_key_value_heads, length, head_dim, dtype=self.model.dtype)
        start = self.clock()
        for _ in range(config.num_hidden_layers):
            prefill_column_scores(query, key, valid, head_dim**-0.5)
        return self.clock() - start

    def decode(
        self, cache: DynamicCache | KVEvictionCache, steps: int, mask: torch.Tensor
    ) -> tuple[list[float], torch.Tensor]:
        """Feed `steps` tokens per sample; `mask` covers what the cache holds so far (its pads included), and comes
        back with the new tokens appended, as ``generate`` would grow it."""
        token = torch.full((mask.shape[0], 1), 7)
        times = []
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            times.append(self.forward(token, cache, mask))
        return times, mask


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Vicuna-7B has 32)")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt length P (of the longest sample)")
    parser.add_argument(
        "--batch", type=int, default=1, help="left-padded prompts of lengths P, then evenly down towards P/2"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model and cache dtype")
    parser.add_argument("--generated", type=int, nargs="+", default=[1024, 4096], help="generated lengths G")
    parser.add_argument("--heavy-ratio", type=float, default=0.5)
    parser.add_argument("--recent-ratio", type=float, default=0.5)
    parser.add_argument("--prefill-evict-ratio", type=float, default=0.1, help="also time a prefill that evicts")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu", help="process CPU time (robust to other jobs) or wall time"
    )
    args = parser.parse_args(argv)
    for name in ("layers", "prompt", "batch", "steps", "repeats", "vocab", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if min(args.generated) < 1:
        parser.error("--generated lengths must be >= 1")
    torch.set_num_threads(args.threads)

    model = build_model(args.layers, args.vocab, args.prompt + max(args.generated) + args.steps + 8, args.dtype)
    run = Runner(model, CLOCKS[args.clock])
    lengths = prompt_lengths(args.prompt, args.batch)
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    mask = left_padded_mask(lengths, args.prompt)
    paper = PruningConfig(kv_pruning="h2o", heavy_ratio=args.heavy_ratio, recent_ratio=args.recent_ratio)
    evicting = PruningConfig(
        kv_pruning="h2o", heavy_ratio=args.prefill_evict_ratio, recent_ratio=args.prefill_evict_ratio
    )
    print(
        f"# bench_kv: {args.layers} layers of Vicuna-7B geometry, {args.dtype}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock, batch {args.batch}, P={lengths}, heavy/recent={args.heavy_ratio}/{args.recent_ratio}"
    )

    # -- prefill, interleaved so that drift and other processes hit every variant alike
    variants = {
        "plain": lambda: DynamicCache(config=model.config),
        f"h2o {args.heavy_ratio}/{args.recent_ratio}": lambda: KVEvictionCache(paper, mask),
        f"h2o {args.prefill_evict_ratio}/{args.prefill_evict_ratio} (evicts)": lambda: KVEvictionCache(evicting, mask),
    }
    run.forward(prompt, DynamicCache(config=model.config), mask)  # warm-up
    prefill_runs: dict[str, list[float]] = {name: [] for name in variants}
    scoring: list[float] = []
    for _ in range(args.repeats):
        for name, make in variants.items():
            prefill_runs[name].append(run.forward(prompt, make(), mask))
        scoring.append(run.scoring_alone(mask.bool()))
    plain = prefill_runs["plain"]
    for name, values in prefill_runs.items():
        print(f"prefill {name:<28} {_times(values)}   overhead vs plain {_ratios(values, plain, -1)}")
    print(f"prefill scoring alone, all layers  {_times(scoring)}   = {_ratios(scoring, plain, 0)} of the plain prefill")

    # -- decode: capped steady state vs plain caches of the same and of the full length, one step of each in turn
    # The plain cache "of the same length" holds each sample's kept count, left padded to the capped slot width
    # minus one (the capped layer's spare slot), with those pads masked; the P+G ones keep the prompt's pads.
    capped = KVEvictionCache(paper, mask)
    run.forward(prompt, capped, mask)
    _, capped_mask = run.decode(capped, 2, mask)  # the first eviction (packing the layout) happens here, untimed
    slots = capped.layers[0].keys.shape[-2]
    same = f"plain, {slots - 1} tokens (same)"
    caches = {"capped": capped, same: filled_plain_cache(model, args.batch, slots - 1)}
    masks = {"capped": capped_mask, same: left_padded_mask(capped.kv_lengths(), slots - 1)}
    full = {g: f"plain, P+G = {args.prompt + g} tokens" for g in args.generated}
    for g, name in full.items():
        caches[name] = filled_plain_cache(model, args.batch, args.prompt + g)
        masks[name] = left_padded_mask([length + g for length in lengths], args.prompt + g)
    runs: dict[str, list[float]] = {name: [] for name in caches}
    for _ in range(args.steps * args.repeats):
        for name, cache in caches.items():
            times, masks[name] = run.decode(cache, 1, masks[name])
            runs[name] += times
    print(f"decode: the capped cache holds {capped.kv_lengths()} keys per head in {slots} slots")
    for name, cache in caches.items():
        print(f"decode {name:<32} {_times(runs[name])}   KV {cache_bytes(cache) / 2**20:8.1f} MiB")
    print(f"decode capped vs plain of the same length: time {_ratios(runs['capped'], runs[same], 1)}")
    for g, name in full.items():
        memory = cache_bytes(capped) / cache_bytes(caches[name])
        print(f"G={g}: capped vs plain of P+G: time {_ratios(runs['capped'], runs[name], 1)}, KV memory x{memory:.3f}")


def _times(values: list[float]) -> str:
    return f"best {min(values) * 1e3:8.1f} ms  median {statistics.median(values) * 1e3:8.1f} ms"


def _ratios(values: list[float], base: list[float], offset: int) -> str:
    """Ratio of best times (robust to other processes on the machine) and of medians: offset -1 prints it as +x %,
    0 as a percentage, 1 as a factor."""
    best, median = min(values) / min(base), statistics.median(values) / statistics.median(base)
    if offset == -1:
        return f"{best - 1:+.1%} (medians {median - 1:+.1%})"
    if offset == 0:
        return f"{best:.1%} (medians {median:.1%})"
    return f"x{best:.3f} (medians x{median:.3f})"


if __name__ == "__main__":
    main()

"""Roofline cost of a Llama-family decoder, the way LLM-Viewer computes it (the paper's Table 6).

Every op of one decoder layer gets an OP count (one multiply-add = 2 OPs) and the bytes it moves (weights,
activations read and written, KV cache read and written); its time is max(OPs / peak, bytes / bandwidth). Totals are
L times the layer sum plus the LM head, which LLM-Viewer evaluates for one token (and counts as H*V OPs, not 2*H*V).
The embedding is not modelled. Bit widths only scale bytes; the peak switches to INT8 when all widths are <= 8.
See docs/reproducing.md ("Table 6") for the checked numbers.

Known mismatch, documented and not fitted: the paper's "Ours" rows print load_weight (incl. LM head) in the
"Total Memory" column (13.2 / 6.6 / 3.3 G), while its LLaVA rows print memory access. ``Weights (G)`` shows the
former next to ``Total Memory (G)`` so the reader can see both.

Python API (also used by the speed suite for ideal prefill-time ratios)::

    from eval.roofline import prefill_cost
    cost = prefill_cost("vicuna-7b", tokens=636, bits=16, hardware="a100-40gb")
    cost.ops, cost.seconds, cost.memory_access, cost.store_act, cost.load_weight
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from eval.common import EvalInputError, format_table, read_json
from eval.hardware import HARDWARE, Hardware, get_hardware

# ---- bit widths ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bits:
    """Weight / activation / KV-cache bit widths (the paper's INT8 = W8A8KV8, INT4 = W4A4KV4)."""

    w: int = 16
    a: int = 16
    kv: int = 16

    def __post_init__(self) -> None:
        for name in ("w", "a", "kv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
                raise ValueError(f"{name}_bits must be an integer in 1..32, got {value!r}")

    @property
    def label(self) -> str:
        if self.w == self.a == self.kv:
            return f"FP{self.w}" if self.w >= 16 else f"INT{self.w}"
        return f"W{self.w}A{self.a}KV{self.kv}"


def as_bits(bits: int | Bits | Sequence[int]) -> Bits:
    """One width for all three (16, 8, 4), a ``Bits``, or a (w, a, kv) triple."""
    if isinstance(bits, Bits):
        return bits
    if isinstance(bits, int):
        return Bits(bits, bits, bits)
    if len(bits) != 3:
        raise ValueError(f"bits must be one width or (w, a, kv), got {bits!r}")
    return Bits(*bits)


# ---- model shapes -------------------------------------------------------------------------------------------

_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")

# The shape fields of the published config.json files (lmsys/vicuna-7b-v1.5, lmsys/vicuna-13b-v1.5,
# meta-llama/Meta-Llama-3-8B, Qwen/Qwen2-0.5B). Vicuna-7B has Llama-2-7B's shape, the model LLM-Viewer's UI runs.
PRESETS: dict[str, dict[str, int]] = {
    "vicuna-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000),
    "vicuna-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                       num_hidden_layers=40, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32, vocab_size=128256),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                       num_hidden_layers=24, vocab_size=151936),
}  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str = "config") -> ModelSpec:
        """Read a transformers config dict; LLaVA's ``llava_llama`` configs are Llama configs with extra keys.

        HF-format multimodal configs nest the language model under ``text_config``; that part is used then.
        """
        if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]
        missing = [key for key in _REQUIRED if config.get(key) is None]
        if missing:
            raise ValueError(
                f"{name}: config lacks {', '.join(missing)} (a decoder config needs {', '.join(_REQUIRED)})"
            )
        heads = config["num_attention_heads"]
        values = {key: config[key] for key in _REQUIRED}
        values["num_key_value_heads"] = config.get("num_key_value_heads") or heads
        values["head_dim"] = config.get("head_dim") or config["hidden_size"] // heads
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")
        if heads % values["num_key_value_heads"]:
            raise ValueError(f"{name}: num_attention_heads {heads} is not a multiple of num_key_value_heads")
        return cls(name=name, **values)


def load_model_spec(model: str | Path | Mapping[str, Any] | ModelSpec) -> ModelSpec:
    """A preset name, a config.json path (or the folder holding it), a config dict, or a ``ModelSpec``."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, Mapping):
        return ModelSpec.from_config(model)
    if str(model) in PRESETS:
        return ModelSpec.from_config(PRESETS[str(model)], name=str(model))
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model {str(model)!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json path")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return ModelSpec.from_config(config, name=str(path))


# ---- ops ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCost:
    """One op of one layer: OPs and bytes moved, LLM-Viewer's six quantities."""

    name: str
    ops: float
    load_weight: float = 0.0
    load_act: float = 0.0
    store_act: float = 0.0
    load_kv: float = 0.0
    store_kv: float = 0.0

    @property
    def memory_access(self) -> float:
        return self.load_weight + self.load_act + self.store_act + self.load_kv + self.store_kv

    def seconds(self, peak: float, bandwidth: float) -> float:
        return max(self.ops / peak, self.memory_access / bandwidth)


def _layer_ops(
    spec: ModelSpec, batch: int, q_len: int, kv_len: int, bits: Bits, flash_buffer: float | None
) -> list[OpCost]:
    """One decoder layer where ``q_len`` new tokens per sequence attend to ``kv_len`` keys (prefill: equal)."""
    hidden, inter, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_width, kv_width = spec.num_attention_heads * hd, spec.num_key_value_heads * hd
    w, a, kv = bits.w / 8, bits.a / 8, bits.kv / 8
    n = batch * q_len  # tokens through the linear layers

    def linear(name: str, d_in: int, d_out: int, to_cache: bool = False) -> OpCost:
        # k/v projections write straight into the KV cache, so their output is no stored activation
        out = n * d_out
        return OpCost(name, 2 * n * d_in * d_out, load_weight=d_in * d_out * w, load_act=n * d_in * a,
                      store_act=0 if to_cache else out * a, store_kv=out * kv if to_cache else 0)  # fmt: skip

    def elementwise(name: str, ops_per_element: int, inputs: int = 1) -> OpCost:
        # LLM-Viewer sizes every elementwise op, SiLU*mul included, by the hidden width
        elements = n * hidden
        return OpCost(name, ops_per_element * elements, load_act=inputs * elements * a, store_act=elements * a)

    scores = batch * spec.num_attention_heads * q_len * kv_len  # attention probabilities [b, heads, q, kv]
    matmul_ops = 2 * scores * hd
    kv_read = batch * kv_len * kv_width * kv
    if flash_buffer is None:
        attention = [
            # LLM-Viewer reads the query with the KV-head width here; equal to q_width for multi-head attention
            OpCost("qk_matmul", matmul_ops, load_act=n * kv_width * a, store_act=scores * a, load_kv=kv_read),
            OpCost("softmax", 5 * scores, load_act=scores * a, store_act=scores * a),
            OpCost("sv_matmul", matmul_ops, load_act=scores * a, store_act=n * q_width * a, load_kv=kv_read),
        ]
    else:
        # FlashAttention-2 tiling: Q is read and O written once; K and V are re-read for every block of query rows
        # that fits on chip. The score matrix never reaches memory. Our estimate; the paper did not use it.
        block_rows = min(math.ceil(flash_buffer / (kv * hd)), hd)
        attention = [
            OpCost("fused_attention", 2 * matmul_ops + 5 * scores, load_act=n * q_width * a,
                   store_act=n * q_width * a, load_kv=2 * math.ceil(q_len / block_rows) * kv_read),
        ]  # fmt: skip
    return [
        elementwise("attn_norm", 7),
        linear("q_proj", hidden, q_width),
        linear("k_proj", hidden, kv_width, to_cache=True),
        linear("v_proj", hidden, kv_width, to_cache=True),
        *attention,
        linear("out_proj", q_width, hidden),
        elementwise("attn_add", 1),
        elementwise("mlp_norm", 7),
        linear("gate_proj", hidden, inter),
        linear("up_proj", hidden, inter),
        elementwise("mlp_act", 2, inputs=2),
        linear("down_proj", inter, hidden),
        elementwise("mlp_add", 1),
    ]


def _lm_head(spec: ModelSpec, batch: int, bits: Bits) -> OpCost:
    """Logits for the last token of each sequence only; LLM-Viewer counts H*V OPs for it (not 2*H*V)."""
    hidden, vocab = spec.hidden_size, spec.vocab_size
    return OpCost("lm_head", batch * hidden * vocab, load_weight=hidden * vocab * bits.w / 8,
                  load_act=batch * hidden * bits.a / 8, store_act=batch * vocab * bits.a / 8)  # fmt: skip


@dataclass(frozen=True)
class RooflineCost:
    """Totals of one forward step; every quantity is L x (layer sum) + LM head, in plain units (OPs, B, s)."""

    stage: str  # "prefill" or "decode"
    model: ModelSpec
    hardware: Hardware
    bits: Bits
    batch: int
    tokens: int  # new tokens per sequence in this step (prefill: prompt length; decode: 1)
    context: int  # keys attended per sequence (prefill: prompt length; decode: KV-cache length)
    layer_ops: tuple[OpCost, ...]
    lm_head: OpCost

    def _total(self, field: str) -> float:
        per_layer = sum(getattr(op, field) for op in self.layer_ops)
        return self.model.num_hidden_layers * per_layer + getattr(self.lm_head, field)

    @property
    def peak(self) -> float:
        return self.hardware.peak(self.bits.w, self.bits.a, self.bits.kv)

    @property
    def ops(self) -> float:
        return self._total("ops")

    @property
    def load_weight(self) -> float:
        return self._total("load_weight")

    @property
    def load_act(self) -> float:
        return self._total("load_act")

    @property
    def store_act(self) -> float:
        return self._total("store_act")

    @property
    def load_kv(self) -> float:
        return self._total("load_kv")

    @property
    def store_kv(self) -> float:
        return self._total("store_kv")

    @property
    def memory_access(self) -> float:
        return self._total("memory_access")

    def op_seconds(self) -> dict[str, float]:
        """Time per op summed over the layers (plus ``lm_head``): where the step's time goes."""
        layers = self.model.num_hidden_layers
        out = {op.name: layers * op.seconds(self.peak, self.hardware.bandwidth) for op in self.layer_ops}
        out[self.lm_head.name] = self.lm_head.seconds(self.peak, self.hardware.bandwidth)
        return out

    @property
    def seconds(self) -> float:
        return sum(self.op_seconds().values())

    @property
    def kv_cache_bytes(self) -> float:
        """K and V of every layer for ``context`` positions per sequence, after this step."""
        kv_width = self.model.num_key_value_heads * self.model.head_dim
        return self.model.num_hidden_layers * 2 * self.batch * self.context * kv_width * self.bits.kv / 8


def _cost(stage: str, model: Any, tokens: int, context: int, bits: Any, hardware: Any, batch: int, flash: bool):
    spec, hw, widths = load_model_spec(model), get_hardware(hardware), as_bits(bits)
    for name, value in (("tokens", tokens), ("context", context), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    layer = _layer_ops(spec, batch, tokens, context, widths, hw.onchip_buffer if flash else None)
    return RooflineCost(stage, spec, hw, widths, batch, tokens, context, tuple(layer), _lm_head(spec, batch, widths))


def prefill_cost(
    model: str | Path | Mapping[str, Any] | ModelSpec,
    tokens: int,
    bits: int | Bits | Sequence[int] = 16,
    hardware: str | Hardware = "a100-40gb",
    batch: int = 1,
    flash_attention: bool = False,
) -> RooflineCost:
    """Prefill of ``tokens`` prompt tokens per sequence (all of them in every layer: pruning before the LLM)."""
    return _cost("prefill", model, tokens, tokens, bits, hardware, batch, flash_attention)


def decode_cost(
    model: str | Path | Mapping[str, Any] | ModelSpec,
    context: int,
    bits: int | Bits | Sequence[int] = 16,
    hardware: str | Hardware = "a100-40gb",
    batch: int = 1,
    flash_attention: bool = False,
) -> RooflineCost:
    """One generated token per sequence attending to ``context`` cached positions (stage 2 caps this)."""
    return _cost("decode", model, 1, context, bits, hardware, batch, flash_attention)


def paper_flops_t(fp16_ops: float, bits: int | Bits | Sequence[int]) -> float:
    """The paper's FLOPs column: the FP16 figure rounded to 0.1 T, then scaled by compute bits / 16, rounded again.

    Not LLM-Viewer's (its OPs do not depend on bit width); 8.5 -> 4.3 for INT8 only comes out this way (halving the
    exact 8.45 gives 4.2). Compute bits = the wider of weights and activations (a W4A16 kernel computes in FP16).
    """
    widths = as_bits(bits)
    fp16 = _half_up(Decimal(repr(fp16_ops / 1e12)))
    return float(_half_up(fp16 * max(widths.w, widths.a) / 16))


def _half_up(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


# ---- command line -------------------------------------------------------------------------------------------

EPILOG = """\
Reproduce the paper's Table 6 (A100-40GB, Vicuna-7B, 60 text tokens; LLaVA-1.5 = 576 visual, Ours = 120):
  python -m eval.roofline --text-tokens 60 --visual-tokens 576 120
Every LLaVA-1.5 figure (FLOPs, time, total memory, storing activation; FP16, INT8 = W8A8KV8, INT4 = W4A4KV4)
and the FP16/INT8 "Ours" figures at 180 tokens are reproduced, except one column, on purpose:
  the paper's "Ours" Total Memory (13.2 / 6.6 / 3.3 G) equals total weight bytes incl. the LM head
  ("Weights (G)"), not memory access as in its LLaVA rows (15.1 / 7.5 / 3.8 G at 180 tokens). No token count
  fits it under the LLaVA rows' definition; we print both columns and do not fit it. The garbled "2.4" of the
  INT4 "Ours" row is not reproduced either (LLM-Viewer gives 3.9 ms; 2.4 = memory access / bandwidth).
"FLOPs (T)" is LLM-Viewer's OPs (independent of bit width); "Paper FLOPs (T)" is the paper's own convention
(FP16 figure rounded, times bits/16, rounded). See docs/reproducing.md.
"""


@dataclass(frozen=True)
class Workload:
    """One row source: a prompt length for prefill and a KV-cache length for decode."""

    label: str
    tokens: int
    context: int


def _round_count(value: float) -> int:
    return max(1, int(Decimal(repr(value)).quantize(Decimal(1), rounding=ROUND_HALF_UP)))


def _result_workload(path: str, text_tokens: int | None) -> tuple[str, int, float | None, float]:
    """(label, prompt tokens, measured final KV length or None, generated) from a scorer result JSON."""
    data = read_json(path)
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, dict):
        raise EvalInputError(f"{path}: no 'tokens' statistics (expected a scorer result JSON)")
    key = "prompt" if text_tokens is None else "visual_after"
    value = _number(tokens.get(key))
    if value is None or value <= 0:
        raise EvalInputError(f"{path}: tokens.{key} must be a positive number, got {tokens.get(key)!r}")
    prompt = _round_count(value + (text_tokens or 0))
    return Path(path).stem, prompt, _number(tokens.get("kv_final")), _number(tokens.get("generated")) or 0.0


def _number(value: Any) -> float | None:
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if finite else None


def ratio_kv_budget(kv_ratio: float, prompt: int) -> int:
    """Stage 2's cap for a heavy + recent ratio, by the cache's own rule (ratios read as the decimals written, so
    0.29 x 100 gives 29 as in the cache, where floating point gives 28)."""
    # imported here: the pruning package loads torch and transformers (seconds), which nothing else here needs
    from pruning.config import PruningConfig
    from pruning.kv_cache import kv_budget

    budget, _ = kv_budget(PruningConfig(kv_pruning="h2o", heavy_ratio=kv_ratio, recent_ratio=0.0), prompt)
    return budget


def workloads(args: argparse.Namespace) -> list[Workload]:
    """Rows from --tokens, --text-tokens/--visual-tokens or --from-result, with the decode context of each."""

    def context(prompt: int, generated: float, measured: float | None = None) -> int:
        if args.context is not None:
            length = args.context
        elif measured is not None:
            length = measured  # the scorer's final KV length already reflects stage 2
        else:
            length = prompt + (args.generated if args.generated is not None else generated)
        if args.kv_budget is not None:
            length = min(length, args.kv_budget)
        if args.kv_ratio is not None:
            length = min(length, ratio_kv_budget(args.kv_ratio, prompt))
        return _round_count(length)

    sources = [bool(args.from_result), bool(args.tokens), bool(args.visual_tokens)]
    if sum(sources) > 1:
        raise ValueError("give only one of --tokens, --visual-tokens and --from-result")
    if args.from_result:
        rows = []
        for path in args.from_result:
            label, prompt, measured, generated = _result_workload(path, args.text_tokens)
            rows.append(Workload(label, prompt, context(prompt, generated, measured)))
        return rows
    if args.tokens:
        return [Workload(f"{n} tokens", n, context(n, 0)) for n in args.tokens]
    if args.visual_tokens and args.text_tokens is not None:
        return [
            Workload(f"{args.text_tokens} text + {v} visual", args.text_tokens + v, context(args.text_tokens + v, 0))
            for v in args.visual_tokens
        ]
    raise ValueError("give --tokens N, or --text-tokens T with --visual-tokens V, or --from-result")


def bit_settings(args: argparse.Namespace) -> list[Bits]:
    explicit = (args.w_bits, args.a_bits, args.kv_bits)
    if any(value is not None for value in explicit):
        if args.bits:
            raise ValueError("use either --bits or --w-bits/--a-bits/--kv-bits, not both")
        return [Bits(*(16 if value is None else value for value in explicit))]
    return [Bits(b, b, b) for b in (args.bits or [16, 8, 4])]


def row(workload: Workload, prefill: RooflineCost, decode: RooflineCost) -> dict[str, Any]:
    """Everything one printed row shows, in plain units (OPs, bytes, seconds)."""
    return {
        "label": workload.label,
        "model": prefill.model.name,
        "hardware": prefill.hardware.name,
        "quantization": prefill.bits.label,
        "w_bits": prefill.bits.w,
        "a_bits": prefill.bits.a,
        "kv_bits": prefill.bits.kv,
        "batch": prefill.batch,
        "tokens": prefill.tokens,
        "ops": prefill.ops,
        "paper_flops_t": paper_flops_t(prefill.ops, prefill.bits),  # LLM-Viewer's OPs are the FP16 OPs
        "prefill_seconds": prefill.seconds,
        "memory_access_bytes": prefill.memory_access,
        "stored_activation_bytes": prefill.store_act,
        "loaded_activation_bytes": prefill.load_act,
        "weight_bytes": prefill.load_weight,
        "kv_load_bytes": prefill.load_kv,
        "kv_store_bytes": prefill.store_kv,
        "decode_context": decode.context,
        "decode_seconds_per_token": decode.seconds,
        "kv_cache_bytes": decode.kv_cache_bytes,
    }


COLUMNS = [
    ("Row", lambda r: r["label"]),
    ("Prompt tokens", lambda r: str(r["tokens"])),
    ("Quantization", lambda r: r["quantization"]),
    ("FLOPs (T)", lambda r: f"{r['ops'] / 1e12:.1f}"),
    ("Paper FLOPs (T)", lambda r: f"{r['paper_flops_t']:.1f}"),
    ("Prefill Time (ms)", lambda r: f"{r['prefill_seconds'] * 1e3:.1f}"),
    ("Total Memory (G)", lambda r: f"{r['memory_access_bytes'] / 1e9:.1f}"),
    ("Storing Activation (G)", lambda r: f"{r['stored_activation_bytes'] / 1e9:.1f}"),
    ("Weights (G)", lambda r: f"{r['weight_bytes'] / 1e9:.1f}"),
    ("Decode KV len", lambda r: str(r["decode_context"])),
    ("Decode (ms/token)", lambda r: f"{r['decode_seconds_per_token'] * 1e3:.2f}"),
    ("KV cache (G)", lambda r: f"{r['kv_cache_bytes'] / 1e9:.3f}"),
]


def render(rows: list[dict[str, Any]]) -> str:
    """Markdown table in the paper's Table 6 units (T = 1e12 OPs, G = 1e9 B), LLM-Viewer's .1f rounding."""
    return format_table([title for title, _ in COLUMNS], [[cell(r) for _, cell in COLUMNS] for r in rows])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.roofline",
        description="LLM-Viewer roofline estimate of prefill and decode cost for a Llama-family LLM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="vicuna-7b", help=f"{' | '.join(PRESETS)} | path to config.json or folder")
    parser.add_argument("--hardware", default="a100-40gb", choices=list(HARDWARE))
    tokens = parser.add_argument_group("prompt length (one of)")
    tokens.add_argument("--tokens", type=int, nargs="+", help="prompt tokens per sequence (one row each)")
    tokens.add_argument("--visual-tokens", type=int, nargs="+", help="visual tokens, added to --text-tokens")
    tokens.add_argument("--text-tokens", type=int, help="text tokens (the paper assumes 60); with --from-result: "
                        "prompt = mean visual_after + this, the paper's Table 6 convention")  # fmt: skip
    tokens.add_argument("--from-result", nargs="+", metavar="RESULT_JSON",
                        help="scorer result JSONs: prompt = mean tokens.prompt, decode KV length = mean kv_final")  # fmt: skip
    bits = parser.add_argument_group("bit widths (default: rows for 16, 8 and 4)")
    bits.add_argument("--bits", type=int, nargs="+", choices=[16, 8, 4], help="W = A = KV bit width(s)")
    bits.add_argument("--w-bits", type=int, help="weight bits (others default to 16)")
    bits.add_argument("--a-bits", type=int, help="activation bits")
    bits.add_argument("--kv-bits", type=int, help="KV-cache bits")
    decode = parser.add_argument_group("decode step (per-token time and KV-cache size)")
    decode.add_argument("--batch", type=int, default=1, help="sequences per step (prefill and decode)")
    decode.add_argument("--generated", type=float, help="tokens generated so far: KV length = prompt + this")
    decode.add_argument("--context", type=int, help="KV length of the decode step, overriding everything else")
    decode.add_argument("--kv-budget", type=int, help="stage 2 cap on the KV length (absolute)")
    decode.add_argument("--kv-ratio", type=float, help="stage 2 cap as heavy+recent ratio of the prompt (paper 1.0)")
    parser.add_argument("--flash-attention", action="store_true", help="model fused attention (off in the paper)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("tokens", "visual_tokens"):
        if any(n < 1 for n in getattr(args, name) or []):
            parser.error(f"--{name.replace('_', '-')} must be positive integers")
    for name in ("batch", "context", "kv_budget", "text_tokens"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "text_tokens" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.kv_ratio is not None and not args.kv_ratio > 0:
        parser.error(f"--kv-ratio must be > 0, got {args.kv_ratio}")
    try:
        spec = load_model_spec(args.model)
        hardware = get_hardware(args.hardware)
        rows = []
        for workload in workloads(args):
            for widths in bit_settings(args):
                common = dict(bits=widths, hardware=hardware, batch=args.batch, flash_attention=args.flash_attention)
                prefill = prefill_cost(spec, workload.tokens, **common)
                rows.append(row(workload, prefill, decode_cost(spec, workload.context, **common)))
    except ValueError as err:  # EvalInputError included: a bad file or setting, named in the message
        parser.error(str(err))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        flash = "on" if args.flash_attention else "off"
        print(f"{spec.name} on {hardware.name} (batch {args.batch}, FlashAttention {flash})\n")
        print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The roofline model against the paper's Table 6 and the closed forms of reference/roofline.md."""

from __future__ import annotations

import json

import pytest

from eval.hardware import HARDWARE, get_hardware
from eval.roofline import (
    PRESETS,
    Bits,
    ModelSpec,
    decode_cost,
    load_model_spec,
    main,
    paper_flops_t,
    prefill_cost,
)
from pruning.config import PruningConfig
from pruning.kv_cache import kv_budget

# Paper Table 6, Vicuna-7B on A100: FLOPs (T), prefill (ms), total memory (G), storing activation (G)
LLAVA_ROWS = {16: ("8.5", "30.3", "22.2", "4.1"), 8: ("4.3", "15.2", "11.1", "2.0"), 4: ("2.1", "14.2", "5.6", "1.0")}
# "Ours" (180 tokens): the printed total memory is the weight bytes (see test_ours_total_memory_is_weights)
OURS_ROWS = {16: ("2.3", "9.7", "13.2", "0.8"), 8: ("1.2", "4.9", "6.6", "0.4")}


def table6_figures(tokens: int, bits: int) -> tuple[str, str, str, str]:
    cost = prefill_cost("vicuna-7b", tokens, bits, "a100-40gb")
    return (
        f"{paper_flops_t(cost.ops, bits):.1f}",
        f"{cost.seconds * 1e3:.1f}",
        f"{cost.memory_access / 1e9:.1f}",
        f"{cost.store_act / 1e9:.1f}",
    )


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_llava_rows_of_table6(bits):
    assert table6_figures(576 + 60, bits) == LLAVA_ROWS[bits]


@pytest.mark.parametrize("bits", [16, 8])
def test_ours_rows_of_table6_except_total_memory(bits):
    flops, time, _, act = table6_figures(120 + 60, bits)
    paper_flops, paper_time, _, paper_act = OURS_ROWS[bits]
    assert (flops, time, act) == (paper_flops, paper_time, paper_act)


@pytest.mark.parametrize("bits, printed, access", [(16, "13.2", "15.1"), (8, "6.6", "7.5"), (4, "3.3", "3.8")])
def test_ours_total_memory_is_weights(bits, printed, access):
    """The documented mismatch: the paper's 'Ours' memory column equals load_weight incl. the LM head."""
    cost = prefill_cost("vicuna-7b", 180, bits)
    assert f"{cost.load_weight / 1e9:.1f}" == printed
    assert f"{cost.memory_access / 1e9:.1f}" == access


def test_ours_int4_row_predictions():
    cost = prefill_cost("vicuna-7b", 180, 4)
    assert f"{paper_flops_t(cost.ops, 4):.1f}" == "0.6"
    assert f"{cost.store_act / 1e9:.1f}" == "0.2"
    assert f"{cost.seconds * 1e3:.1f}" == "3.9"  # LLM-Viewer's figure; the paper's garbled cell reads 2.4


def test_exact_values_of_reference():
    cost = prefill_cost("vicuna-7b", 636, 16)
    assert cost.ops == pytest.approx(8.453253840896e12, rel=1e-12)
    assert cost.seconds * 1e3 == pytest.approx(30.310, abs=5e-4)
    assert cost.memory_access / 1e9 == pytest.approx(22.207, abs=5e-4)
    assert cost.store_act / 1e9 == pytest.approx(4.054, abs=5e-4)
    per_layer_us = sum(t for name, t in cost.op_seconds().items() if name != "lm_head") / 32 * 1e6
    assert per_layer_us == pytest.approx(941.9, abs=0.05)
    assert cost.op_seconds()["lm_head"] * 1e3 == pytest.approx(0.17, abs=0.005)


@pytest.mark.parametrize("s", [1, 37, 636])
@pytest.mark.parametrize("bits", [Bits(16, 16, 16), Bits(8, 4, 2)])
def test_mha_closed_forms(s, bits):
    h, i, nh, layers, v = 4096, 11008, 32, 32, 32000
    w, a, kv = bits.w / 8, bits.a / 8, bits.kv / 8
    cost = prefill_cost("vicuna-7b", s, bits)
    assert cost.ops == layers * (2 * s * (4 * h * h + 3 * h * i) + 4 * h * s * s + 5 * nh * s * s + 18 * h * s) + h * v
    assert cost.store_act == pytest.approx(layers * a * (s * (9 * h + 2 * i) + 2 * nh * s * s) + v * a)
    assert cost.load_act == pytest.approx(layers * a * (s * (13 * h + i) + 2 * nh * s * s) + h * a)
    assert cost.load_weight == pytest.approx(layers * w * (4 * h * h + 3 * h * i) + h * v * w)
    assert cost.store_kv == pytest.approx(layers * kv * 2 * h * s)
    assert cost.load_kv == pytest.approx(layers * kv * 2 * h * s)
    parts = cost.load_weight + cost.load_act + cost.store_act + cost.load_kv + cost.store_kv
    assert cost.memory_access == pytest.approx(parts)


def test_ops_independent_of_bits_and_peak_rule():
    hw = get_hardware("a100-40gb")
    assert prefill_cost("vicuna-7b", 100, 4).ops == prefill_cost("vicuna-7b", 100, 16).ops
    assert hw.peak(8, 8, 8) == hw.peak(4, 4, 4) == 624e12
    assert hw.peak(8, 8, 16) == hw.peak(4, 16, 16) == 312e12


def test_weight_only_int4_does_not_fit_the_table():
    cost = prefill_cost("vicuna-7b", 636, (4, 16, 16))
    assert (f"{cost.seconds * 1e3:.1f}", f"{cost.memory_access / 1e9:.1f}") == ("30.2", "12.3")


def test_a100_80gb_entry_gives_a_different_time():
    assert f"{prefill_cost('vicuna-7b', 636, 16, 'a100-80gb').seconds * 1e3:.1f}" == "29.4"


def test_hardware_presets_are_sourced():
    assert set(HARDWARE) == {"a100-40gb", "a100-80gb", "h100-sxm", "rtx-4090"}
    a100 = HARDWARE["a100-40gb"]
    assert (a100.bandwidth, a100.fp16_ops, a100.int8_ops, a100.onchip_buffer) == (1555e9, 312e12, 624e12, 27648e3)
    assert all(hw.source for hw in HARDWARE.values())
    with pytest.raises(ValueError, match="unknown hardware 'v100'.*a100-40gb"):
        get_hardware("v100")


def test_gqa_kv_traffic_follows_kv_heads():
    spec = load_model_spec("llama3-8b")
    assert (spec.num_key_value_heads, spec.head_dim) == (8, 128)
    s, kv_width = 100, 8 * 128
    cost = prefill_cost(spec, s, 16)
    k_proj = next(op for op in cost.layer_ops if op.name == "k_proj")
    assert k_proj.ops == 2 * s * 4096 * kv_width
    assert (k_proj.store_act, k_proj.store_kv) == (0, s * kv_width * 2)
    assert cost.store_kv == 32 * 2 * s * kv_width * 2
    assert cost.kv_cache_bytes == cost.store_kv  # the prefill writes exactly the cache it leaves behind
    mha = ModelSpec(**{**spec.__dict__, "name": "mha", "num_key_value_heads": 32})
    assert prefill_cost(mha, s, 16).store_kv == 4 * cost.store_kv


def test_config_dict_and_paths(tmp_path):
    llava_config = {
        "model_type": "llava_llama",
        "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": 1024,
        **PRESETS["vicuna-7b"],
        "num_key_value_heads": None,
    }
    from_dict = load_model_spec(llava_config)
    preset = load_model_spec("vicuna-7b")
    assert (from_dict.num_key_value_heads, from_dict.head_dim) == (32, 128)
    assert {**from_dict.__dict__, "name": ""} == {**preset.__dict__, "name": ""}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(llava_config))
    assert load_model_spec(tmp_path / "ckpt").hidden_size == 4096
    assert load_model_spec(str(tmp_path / "ckpt" / "config.json")).num_hidden_layers == 32
    nested = {"model_type": "llava", "text_config": {**PRESETS["qwen2-0.5b"], "head_dim": 64}}
    assert load_model_spec(nested).head_dim == 64
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match=r"broken\.json: config lacks intermediate_size, num_hidden_layers"):
        load_model_spec(broken)
    with pytest.raises(ValueError, match="neither a preset"):
        load_model_spec(tmp_path / "nothing")


def test_explicit_head_dim_is_used():
    config = {**PRESETS["vicuna-7b"], "head_dim": 64, "num_attention_heads": 32}
    cost = prefill_cost(config, 10, 16)
    q_proj = next(op for op in cost.layer_ops if op.name == "q_proj")
    assert q_proj.ops == 2 * 10 * 4096 * 32 * 64


def test_batch_scales_everything_but_weights():
    one, two = prefill_cost("vicuna-7b", 64, 16, batch=1), prefill_cost("vicuna-7b", 64, 16, batch=2)
    assert two.ops == 2 * one.ops
    assert two.store_act == 2 * one.store_act
    assert two.load_weight == one.load_weight


def test_decode_step_and_kv_cache():
    short, long = decode_cost("vicuna-7b", 180, 16), decode_cost("vicuna-7b", 736, 16)
    assert long.kv_cache_bytes == 32 * 2 * 736 * 4096 * 2
    assert long.load_kv == pytest.approx(32 * 2 * 736 * 4096 * 2)  # qk and sv each read the whole cache
    assert short.seconds < long.seconds
    # one token per step: every linear layer is memory-bound, so the weights dominate the time
    assert long.seconds > long.load_weight / 1555e9
    assert decode_cost("vicuna-7b", 736, 16, batch=4).kv_cache_bytes == 4 * long.kv_cache_bytes


def test_flash_attention_keeps_ops_and_drops_score_traffic():
    plain, flash = prefill_cost("vicuna-7b", 636, 16), prefill_cost("vicuna-7b", 636, 16, flash_attention=True)
    assert flash.ops == plain.ops
    assert flash.store_act < plain.store_act
    assert flash.seconds < plain.seconds
    assert [op.name for op in flash.layer_ops].count("fused_attention") == 1


def test_paper_flops_rounds_half_up_after_rounding():
    assert paper_flops_t(8.453e12, 8) == 4.3  # halving the exact 8.45 would give 4.2
    assert paper_flops_t(8.453e12, 4) == 2.1
    assert paper_flops_t(2.349e12, 8) == 1.2
    assert paper_flops_t(2.349e12, 4) == 0.6
    assert paper_flops_t(2.349e12, (4, 16, 16)) == 2.3


def test_bad_arguments():
    with pytest.raises(ValueError, match="tokens must be a positive integer"):
        prefill_cost("vicuna-7b", 0)
    with pytest.raises(ValueError, match="w_bits must be an integer"):
        Bits(0, 16, 16)


def cli_rows(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_table6_markdown(capsys):
    assert main(["--text-tokens", "60", "--visual-tokens", "576", "120"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]
    assert [(r["Prompt tokens"], r["Quantization"]) for r in rows] == [
        (t, q) for t in ("636", "180") for q in ("FP16", "INT8", "INT4")
    ]
    columns = ("Paper FLOPs (T)", "Prefill Time (ms)", "Total Memory (G)", "Storing Activation (G)")
    for r, bits in zip(rows[:3], (16, 8, 4)):
        assert tuple(r[c] for c in columns) == LLAVA_ROWS[bits]
    for r, bits in zip(rows[3:5], (16, 8)):
        assert (r["Paper FLOPs (T)"], r["Prefill Time (ms)"], r["Storing Activation (G)"]) == tuple(
            OURS_ROWS[bits][i] for i in (0, 1, 3)
        )
        assert r["Weights (G)"] == OURS_ROWS[bits][2]
    assert rows[0]["FLOPs (T)"] == rows[1]["FLOPs (T)"] == "8.5"  # LLM-Viewer's OPs, kept apart from the paper's


def test_cli_json_fields(capsys):
    (row,) = cli_rows(capsys, "--tokens", "636", "--bits", "16")
    cost = prefill_cost("vicuna-7b", 636, 16)
    assert row["ops"] == cost.ops
    assert row["prefill_seconds"] == cost.seconds
    assert row["memory_access_bytes"] == cost.memory_access
    assert row["stored_activation_bytes"] == cost.store_act
    assert row["weight_bytes"] == cost.load_weight
    assert (row["paper_flops_t"], row["decode_context"]) == (8.5, 636)


def test_cli_explicit_bits_and_decode_cap(capsys):
    (row,) = cli_rows(capsys, "--tokens", "600", "--w-bits", "4", "--generated", "100", "--kv-ratio", "1.0")
    assert (row["quantization"], row["w_bits"], row["a_bits"], row["kv_bits"]) == ("W4A16KV16", 4, 16, 16)
    assert row["decode_context"] == 600  # stage 2 keeps the cache at the prompt length
    (uncapped,) = cli_rows(capsys, "--tokens", "600", "--w-bits", "4", "--generated", "100")
    assert uncapped["decode_context"] == 700
    assert uncapped["kv_cache_bytes"] > row["kv_cache_bytes"]


def test_kv_ratio_cap_is_the_caches_own_budget(capsys):
    # floor(0.29 * 100) is 28 in floating point; the cache reads 0.29 as written and keeps 29 keys
    (row,) = cli_rows(capsys, "--tokens", "100", "--bits", "16", "--generated", "50", "--kv-ratio", "0.29")
    assert (
        row["decode_context"] == kv_budget(PruningConfig(kv_pruning="h2o", heavy_ratio=0.0, recent_ratio=0.29), 100)[0]
    )
    assert row["decode_context"] == 29


def test_cli_from_result(tmp_path, capsys):
    result = tmp_path / "llava-v1.5-7b-longtail-h2o.json"
    tokens = {"visual_before": 576, "visual_after": 195.4, "prompt": 247.6, "generated": 2.0, "kv_final": 248.3}
    result.write_text(json.dumps({"benchmark": "pope", "headline": 86.5, "count": 10, "tokens": tokens}))
    (row,) = cli_rows(capsys, "--from-result", str(result), "--bits", "16")
    assert (row["label"], row["tokens"], row["decode_context"]) == ("llava-v1.5-7b-longtail-h2o", 248, 248)
    (paper,) = cli_rows(capsys, "--from-result", str(result), "--text-tokens", "60", "--bits", "16")
    assert paper["tokens"] == 255  # the paper's convention: mean visual tokens + 60 text tokens


def test_cli_errors_name_the_input(tmp_path, capsys):
    result = tmp_path / "bad.json"
    result.write_text(json.dumps({"benchmark": "pope", "tokens": {"visual_after": 10}}))
    with pytest.raises(SystemExit):
        main(["--from-result", str(result)])
    assert "bad.json: tokens.prompt must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tokens", "10", "--from-result", str(result)])
    assert "only one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--text-tokens", "60"])
    assert "give --tokens" in capsys.readouterr().err

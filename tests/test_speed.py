"""The speed suite in its minimal configuration (tiny models, one repeat): every row runs, every report is written,
every ratio is present and finite. No timing is asserted; speed is measured by the command (docs/speed.md)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from eval.roofline import prefill_cost
from eval.tools import speed
from eval.tools.speed_models import (
    build_prompt_batch,
    build_random_llava,
    flatten_crops,
    get_geometry,
    plan_rows,
    prompt_ids,
    synthetic_images,
)
from eval.tools.speed_results import Row, RunResult, SpeedReport
from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.multimodal_encoder.clip_encoder import VisionTowerError
from pruning import PruningConfig
from pruning.calibrate import alpha_for_target
from pruning.inflection import longtail_keep
from pruning.strategies import scoring_config

TIME_RATIOS = ("prefill_speedup", "llm_prefill_speedup", "decode_speedup", "throughput_ratio")
IDEAL_RATIOS = ("ideal_prefill_speedup", "ideal_llm_prefill_speedup", "ideal_llm_roofline_time_speedup")


def _run(model_path, out, *extra: str) -> SpeedReport:
    argv = ["--model-path", str(model_path), "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "0"]
    return speed.main([*argv, "--new-tokens", "3", "--text-tokens", "12", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def tiny_result(tiny_ckpt, tmp_path_factory) -> tuple[Path, SpeedReport]:
    out = tmp_path_factory.mktemp("speed")
    return out, _run(tiny_ckpt, out, "--target-visual-tokens", "30")


def test_writes_json_markdown_and_png(tiny_result):
    out, report = tiny_result
    written = json.loads((out / "speed.json").read_text())
    assert written == json.loads(json.dumps(report.to_json()))
    assert list(written) == ["suite", "command", "setup", "configs", "rows", "batch_scaling", "headline", "queue"]
    assert list(written["rows"][0]) == [*Row.__dataclass_fields__]  # a row's fields, in order, ratios last
    text = (out / "speed.md").read_text()
    assert report.command in text and "| Batch | Row |" in text
    for name in speed.ROWS:
        assert f"`{name}`" in text
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_row_at_every_batch_size_with_finite_ratios(tiny_result):
    _, report = tiny_result
    rows = {(row.config, row.batch): row for row in report.rows}
    assert set(rows) == {(name, batch) for name in speed.ROWS for batch in (1, 2)}
    for (name, _), row in rows.items():
        for key in (*TIME_RATIOS, *IDEAL_RATIOS, "prefill_vs_ideal"):
            value = getattr(row.ratios, key)
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, key, value)
        assert len(row.repeats) == 1 and len(row.token_stats) == row.batch
        if name == "none":
            assert all(getattr(row.ratios, key) == 1.0 for key in (*TIME_RATIOS, *IDEAL_RATIOS))
    for name, scaling in report.batch_scaling.items():
        assert scaling["1"] == 1.0 and math.isfinite(scaling["2"]), name
    head = report.headline
    assert set(head.ours_s1_prefill) == {"1", "2"}
    assert all(math.isfinite(h.prefill_vs_ideal) for h in head.ours_s1_prefill.values())
    scaling = head.throughput_scaling.to_json()
    assert scaling["to"] == "2" and set(scaling) >= set(speed.ROWS)


def test_rows_keep_the_planned_counts(tiny_result):
    """topk keeps ours' mean count; on LLaVA-1.5 the plan's prediction is exact; stage 2 caps the KV at P."""
    _, report = tiny_result
    rows = {(row.config, row.batch): row for row in report.rows}
    for batch in (1, 2):
        plan = report.setup.plans[batch]
        assert rows["none", batch].visual_tokens == report.setup.patches_per_crop == 64
        assert rows["ours-s1", batch].visual_tokens == plan.visual_tokens
        assert all(s["visual_after"] == plan.topk for s in rows["topk", batch].token_stats)
        assert rows["ours-s12", batch].visual_tokens == plan.visual_tokens
        s1, s12 = rows["ours-s1", batch], rows["ours-s12", batch]
        assert s1.kv_final == s1.prompt_tokens + 3  # P + G without eviction
        assert s12.kv_final == s12.prompt_tokens  # budget = (0.5 + 0.5) * P
        if plan.reachable:
            assert abs(plan.visual_tokens - 30) <= 1.5


def test_ideal_ratio_is_the_roofline_ops_ratio(tiny_result, tiny_model):
    _, report = tiny_result
    config = tiny_model[1].config.to_dict()
    rows = {(row.config, row.batch): row for row in report.rows}
    none, ours = rows["none", 1], rows["ours-s1", 1]
    expected = prefill_cost(config, int(none.prompt_tokens)).ops / prefill_cost(config, int(ours.prompt_tokens)).ops
    assert ours.ratios.ideal_llm_prefill_speedup == pytest.approx(expected)
    # vision work is the same in every row ('select' mode), so the end-to-end ideal is diluted by it
    assert 1 < ours.ratios.ideal_prefill_speedup < expected
    assert ours.ideal_ops.vision == none.ideal_ops.vision
    # a batch of one has no padding; at batch 2 the padded figure counts both samples at the longer prompt
    assert ours.ratios.ideal_padded_prefill_speedup == pytest.approx(ours.ratios.ideal_prefill_speedup)
    pair = rows["ours-s1", 2]
    longest = max(s["prompt"] for s in pair.token_stats)
    assert pair.prompt_tokens_max == longest
    assert pair.ideal_ops.llm_padded == pytest.approx(prefill_cost(config, longest, batch=2).ops)
    assert pair.ideal_ops.llm_padded >= pair.ideal_ops.llm


def test_vision_ops_by_hand():
    _, model, _, _ = build_random_llava(get_geometry("tiny"))
    tokens, width, inner = 65, 32, 128  # 112 px / 14 = 8 x 8 patches + CLS
    layer = 2 * tokens * (4 * width * width + 2 * width * inner) + 4 * tokens * tokens * width
    embedding = 2 * 64 * 3 * 14 * 14 * width
    # select layer -2 of 4 = hidden_states[3]: 3 layers run; a later scoring layer would extend that
    assert speed.vision_ops(model.get_vision_tower(), crops=2, visual_layer=2) == 2 * (embedding + 3 * layer)
    assert speed.vision_ops(model.get_vision_tower(), crops=1, visual_layer=4) == embedding + 4 * layer


def test_accepts_a_llava16_checkpoint(tmp_path):
    from llava.testing.tiny_llava import write_tiny_llava_next

    ckpt = write_tiny_llava_next(tmp_path / "llava-v1.6-mistral-tiny", seed=1, llm="mistral")
    report = speed.main(
        ["--model-path", str(ckpt), "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
         "--text-tokens", "8", "--image-size", "200", "120", "--no-plot", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    rows = {row.config: row for row in report.rows}
    assert set(rows) == set(speed.ROWS)
    assert len(rows["none"].token_stats[0]["crop_kept"]) > 1  # anyres: several crops per image
    assert rows["ours-s1"].visual_tokens < rows["none"].visual_tokens
    assert all(math.isfinite(rows[name].ratios.prefill_speedup) for name in rows)
    assert not (tmp_path / "out" / "speed.png").exists()


def test_the_calibrated_alpha_hits_the_target_with_the_largest_alpha():
    inflection = torch.tensor([10, 20])

    def mean_per_image(alpha: float) -> float:
        return float(longtail_keep(inflection, 64, alpha).sum()) / 2

    alpha = alpha_for_target(mean_per_image, 30, decimals=3)
    # ceil(10/a) = 20 and ceil(20/a) = 40 for a in [0.5, 0.5128...): the largest 3-decimal alpha there is 0.512
    assert alpha == 0.512
    assert longtail_keep(inflection, 64, alpha).tolist() == [20, 40]
    assert alpha_for_target(mean_per_image, 5, decimals=3) == 1.0  # below the mean i*: out of reach
    assert plan_rows(inflection, [1, 1], 64, PruningConfig(), batch=2, target=30).alpha == 0.512


def test_plan_rows_per_batch_and_bad_targets():
    inflection, crops, base = torch.tensor([10, 20, 40]), [1, 1, 1], PruningConfig(visual_pruning="longtail")
    first = plan_rows(inflection, crops, 64, base, batch=1, target=30)
    assert first.visual_tokens == 30 and first.topk == 30 and first.reachable
    unreachable = plan_rows(inflection, crops, 64, base, batch=3, target=12)
    assert unreachable.alpha == 1.0 and not unreachable.reachable
    assert unreachable.visual_tokens == pytest.approx(70 / 3)
    kept = plan_rows(inflection, crops, 64, base, batch=2, target=None)
    assert kept.alpha == 0.24 and kept.visual_tokens == (42 + 64) / 2 and kept.topk == 53
    with pytest.raises(ValueError, match="--target-visual-tokens 65"):
        plan_rows(inflection, crops, 64, base, batch=1, target=65)


def test_random_geometry_builds_the_requested_model():
    geometry = get_geometry("tiny", llm_layers=3)
    _, model, processor, context = build_random_llava(geometry, cls_logit_std=2.0)
    assert len(model.get_model().layers) == model.config.num_hidden_layers == 3
    assert model.get_vision_tower().num_patches == 64 and context == 2048
    prompts = build_prompt_batch(model, processor, synthetic_images(4, (160, 120)), text_tokens=10)
    flat, crops = flatten_crops(prompts.pixel_values)
    assert flat.shape == (4, 3, 112, 112) and crops == [1, 1, 1, 1]
    assert prompts.first(2).input_ids.shape == (2, 11) and prompts.first(2).image_sizes == [(160, 120)] * 2
    # the model's own setting scores nothing (pruning off); the scores of its scoring layer:
    scores = model.get_vision_tower().select(flat, scoring_config(model.pruning_config)).scores
    spread = scores.log().std(dim=-1)
    assert bool(((spread > 0.8) & (spread < 3.5)).all()), spread  # re-drawn q/k: a long tail, not a flat curve
    with pytest.raises(VisionTowerError, match="built in memory"):  # no folder: no CLIP text side
        model.get_vision_tower().select(flat, PruningConfig(visual_pruning="recovery"), texts=["a question"] * 4)
    with pytest.raises(ValueError, match="unknown geometry"):
        get_geometry("llava-v9")
    with pytest.raises(ValueError, match="llm_layers"):
        get_geometry("tiny", llm_layers=0)


def test_prompt_ids_are_text_plus_one_image_placeholder():
    ids = prompt_ids(3, text_tokens=60, vocab_size=32000)
    assert ids.shape == (3, 61) and (ids[:, 0] == 1).all()
    assert ((ids == IMAGE_TOKEN_INDEX).sum(dim=1) == 1).all()
    text = ids[ids != IMAGE_TOKEN_INDEX]
    assert int(text.min()) >= 1 and int(text.max()) < 32000


def test_random_weights_default_to_the_papers_count_and_bad_flags_fail(capsys):
    assert speed.parse_args(["--no-plot"]).target_visual_tokens == speed.PAPER_VISUAL_TOKENS
    assert speed.parse_args(["--no-plot", "--target-visual-tokens", "0"]).target_visual_tokens is None
    assert speed.parse_args(["--model-path", "x", "--no-plot"]).target_visual_tokens is None
    bad_flags = (["--new-tokens", "1"], ["--batch-sizes", "0"], ["--target-visual-tokens", "-3"], ["--clock", "cpu"])
    for bad in bad_flags:
        with pytest.raises(SystemExit):
            speed.parse_args([*bad, "--no-plot", "--device", "cuda" if bad[0] == "--clock" else "cpu"])
        assert bad[0] in capsys.readouterr().err


def _runs(*prefill: float) -> list[RunResult]:
    return [RunResult(p, p / 2, p / 2, 0.1, p + 1, 1.0, None, None) for p in prefill]


def test_paired_speedup_is_the_median_of_the_ratios_within_each_repeat():
    # a slow spell in repeat 2 hits both rows: the ratio within each repeat stays 2, the ratio of medians does not
    base, row = _runs(10.0, 30.0, 12.0), _runs(5.0, 15.0, 9.0)
    assert speed.paired_speedup(base, row) == pytest.approx(2.0)
    assert speed.paired_speedup(base, row[:2]) is None  # repeats that do not pair up
    assert speed.paired_speedup(base, _runs(5.0, 0.0, 9.0)) is None  # a time that is not positive


def test_cpu_memory_of_a_call_counts_what_it_allocates_even_where_an_earlier_call_freed_memory():
    """Blocks freed before the call (a hole the blocks allocated after them pin inside the heap) are handed back
    first, so the call's own 94 MB show; without it the call reused them and showed 0.03 MB."""
    if not speed.release_freed_memory():
        pytest.skip("this C library has no malloc_trim")

    def blocks(count: int) -> list[torch.Tensor]:
        return [torch.ones(16 * 1024) for _ in range(count)]  # 64 KB each, from the heap

    freed = blocks(2000)
    pinned = blocks(2000)  # above the first 2000 in the heap: keeps it from shrinking when they are freed
    del freed
    with speed.MemoryMeter(torch.device("cpu"), interval=0.001) as meter:
        new = blocks(1500)
        time.sleep(0.05)
    assert len(pinned) == 2000 and len(new) == 1500
    assert meter.extra >= 0.8 * 1500 * 64 * 1024


def test_the_run_order_moves_every_row_to_other_neighbours():
    names = [*speed.ROWS, speed.CONTROL_ROW]
    orders = [speed.run_order(names, repeat) for repeat in range(5)]
    assert all(sorted(order) == sorted(names) for order in orders)  # every row once per repeat
    assert orders == [speed.run_order(names, repeat) for repeat in range(5)]  # the same on every run
    for name in names:
        before = {order[order.index(name) - 1] if order.index(name) else None for order in orders}
        places = {order.index(name) for order in orders}
        assert len(before) >= 3 and len(places) >= 2, (name, before, places)  # no fixed neighbour, no fixed place


def test_the_report_carries_the_paired_figures(tiny_result):
    out, report = tiny_result
    rows = {(row.config, row.batch): row for row in report.rows}
    for (name, batch), row in rows.items():
        expected = speed.paired_speedup(rows[("none", batch)].repeats, row.repeats)
        assert row.ratios.prefill_speedup_paired == pytest.approx(expected), name
    for batch, head in report.headline.ours_s1_packed_prefill.items():
        ours, topk = rows[("ours-s1-packed", int(batch))], rows[("topk", int(batch))]
        assert head.vs_topk_paired == pytest.approx(speed.paired_speedup(topk.repeats, ours.repeats))
    assert "Packed / top-k, paired" in (out / "speed.md").read_text()

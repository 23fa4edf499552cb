"""Per-layer reduction schedules (issue #24): ``--llm-pruning schedule --schedule FILE``, G-Search and P-Sigmoid.

The method: a schedule that keeps everything equals the unpruned model; a schedule that drops to R at layer K equals
``fastv`` at K and R (answers, counts, logits); a schedule with several drops equals a hand-written eager decoder
that applies the rule (rank by the last token's attention at layer l - 1) before each layer; a batch of four equals
four single runs, with stage 1 and with stage 2; bad schedule files name the file and the layer.
G-Search (``eval.tools.gsearch.greedy_search``) on injected scoring functions whose optimum is known; P-Sigmoid
(``eval.tools.psigmoid``) reproducible with a seed, within its budget; both commands end to end on a tiny model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from eval.roofline import PRESETS, ModelSpec, prefill_cost
from eval.tools import gsearch, psigmoid, schedule_compare
from eval.tools.gsearch import (
    PrefillCost,
    SampleTokens,
    fraction_grid,
    greedy_search,
    open_calibration,
    schedule_config,
)
from eval.tools.psigmoid import optimise, p_sigmoid
from llava.eval import model_vqa_loader
from llava.inference import build_prompt, generate_answers
from pruning import PruningConfig, PruningConfigError, registry
from pruning.llm_methods.schedule import Schedule, ScheduleDropper, read_schedule, write_schedule
from tests.helpers import (
    DEEP_LAYERS,
    MIXED_QUESTIONS,
    MIXED_SIZES,
    batch_inputs,
    pope_fixture,
)

LAYERS = DEEP_LAYERS
VISUAL = 64  # the tiny tower's patches
NEW_TOKENS = 4
SIZES, QUESTIONS = MIXED_SIZES, MIXED_QUESTIONS


def schedule_file(tmp_path: Path, keep: list, unit: str = "fraction", name: str = "schedule.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"unit": unit, "keep": keep}), encoding="utf-8")
    return str(path)


def generate(model, tokenizer, processor, images, questions, config):
    """(sequences, logits [rows, steps, vocab], token statistics) of greedy decoding with ``config``."""
    input_ids, mask, pixels, sizes = batch_inputs(model, tokenizer, processor, images, questions)
    with torch.no_grad():
        out = model.generate(
            input_ids, attention_mask=mask, images=pixels, image_sizes=sizes, pruning=config, do_sample=False,
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_dict_in_generate=True, output_logits=True,
            return_stats=True,
        )  # fmt: skip
    return out.sequences, torch.stack(out.raw.logits, dim=1), out.token_stats


def answers(model, tokenizer, processor, images, config, questions=QUESTIONS):
    prompts = [build_prompt(q, "vicuna_v1", model_config=model.config) for q in questions]
    return generate_answers(model, tokenizer, processor, prompts, images, pruning=config, max_new_tokens=5)


# ---- the method against what it must equal ------------------------------------------------------------------------
@pytest.mark.parametrize(("unit", "keep"), [("fraction", [1.0] * LAYERS), ("count", [VISUAL] * LAYERS)])
def test_a_schedule_that_keeps_everything_equals_the_unpruned_model(deep, images, tmp_path, unit, keep) -> None:
    tokenizer, model, processor = deep
    config = PruningConfig(llm_pruning="schedule", schedule=schedule_file(tmp_path, keep, unit))
    sequences, logits, stats = generate(model, tokenizer, processor, images, QUESTIONS, config)
    plain_sequences, plain_logits, plain_stats = generate(model, tokenizer, processor, images, QUESTIONS, None)
    assert torch.equal(sequences, plain_sequences)
    torch.testing.assert_close(logits, plain_logits, atol=0, rtol=0)
    assert [s["visual_per_layer"] for s in stats] == [[VISUAL] * LAYERS] * len(images)
    assert [{k: v for k, v in s.items() if k != "visual_per_layer"} for s in stats] == plain_stats


FASTV_CASES = [
    ({"fastv_k": 2, "fastv_ratio": 0.5}, "fraction", [1, 1, 0.5, 0.5, 0.5, 0.5]),
    ({"fastv_k": 3, "fastv_ratio": 0.7}, "fraction", [1, 1, 1, 0.3, 0.3, 0.3]),
    ({"fastv_k": 1, "fastv_ratio": 1.0}, "fraction", [1, 0, 0, 0, 0, 0]),  # every visual token goes
    ({"fastv_k": 4, "llm_tokens": 9}, "count", [VISUAL] * 4 + [9, 9]),
]


@pytest.mark.parametrize(("fastv", "unit", "keep"), FASTV_CASES, ids=["K2-R0.5", "K3-R0.7", "K1-R1", "K4-9tokens"])
def test_a_schedule_that_drops_once_equals_fastv(deep, images, tmp_path, fastv, unit, keep) -> None:
    """Drop to R at layer K and nowhere else: FastV at K and R, answers, counts per layer and logits, batch of 4."""
    tokenizer, model, processor = deep
    schedule = PruningConfig(llm_pruning="schedule", schedule=schedule_file(tmp_path, keep, unit))
    fastv = PruningConfig(llm_pruning="fastv", **fastv)
    sequences, logits, stats = generate(model, tokenizer, processor, images, QUESTIONS, schedule)
    fastv_sequences, fastv_logits, fastv_stats = generate(model, tokenizer, processor, images, QUESTIONS, fastv)
    assert torch.equal(sequences, fastv_sequences)
    torch.testing.assert_close(logits, fastv_logits, atol=0, rtol=0)
    assert stats == fastv_stats
    assert stats[0]["visual_per_layer"] != [VISUAL] * LAYERS  # it did drop


# ---- the rule by hand: an eager decoder on one sample ------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_layer(model, index: int, hidden: torch.Tensor, positions: torch.Tensor):
    """One Llama decoder layer on an unpadded sequence [1, T, H], attention by hand: (output, probs [heads, T, T])."""
    inner = model.get_model()
    layer, config = inner.layers[index], model.config
    attn = layer.self_attn
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim, length = config.hidden_size // heads, hidden.shape[1]
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(1, length, heads, dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, kv_heads, dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    v = attn.v_proj(x).view(1, length, kv_heads, dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    cos, sin = inner.rotary_emb(hidden, positions[None])
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probs = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(dim)).masked_fill(~causal, -math.inf), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(1, length, -1)
    hidden = hidden + attn.o_proj(out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), probs[0]


def reference(model, embeds: torch.Tensor, visual: torch.Tensor, counts: list[int]):
    """The schedule's rule on one sample: before layer l >= 1 whose count is below the visual tokens held, keep the
    top counts[l] of them by the attention the last token paid them at layer l - 1 (mean over heads). Returns the
    prompt positions kept per dropping layer and the prefill logits."""
    positions = torch.arange(embeds.shape[0])
    hidden, kept, probs = embeds[None], {}, None
    for index in range(len(counts)):
        held = visual[positions]
        if index > 0 and counts[index] < int(held.sum()):
            received = probs.mean(dim=0)[-1].masked_fill(~held, -math.inf)
            top = set(received.topk(counts[index]).indices.tolist())
            keep = torch.tensor([not held[i] or i in top for i in range(len(positions))])
            positions, hidden = positions[keep], hidden[:, keep]
            kept[index] = set(positions[visual[positions]].tolist())
        hidden, probs = eager_layer(model, index, hidden, positions)
    inner = model.get_model()
    return kept, model.lm_head(inner.norm(hidden[:, -1]))[0]


def recording(monkeypatch) -> dict[int, set[int]]:
    """Swap the registered dropper for one that also records the prompt positions of the visual tokens it keeps
    before each layer (row 0)."""
    record: dict[int, set[int]] = {}

    class Recorder(ScheduleDropper):
        def keep(self, view):
            mask = super().keep(view)
            if mask is not None:
                record[view.index] = set(view.prompt_index[0][mask[0] & view.visual[0]].tolist())
            return mask

    method = registry.get("llm_pruning", "schedule")
    monkeypatch.setitem(
        registry._METHODS["llm_pruning"], "schedule", dataclasses.replace(method, implementation=Recorder)
    )
    return record


@pytest.mark.parametrize("keep", [[1, 1, 0.5, 0.5, 0.25, 0.1], [1, 0.75, 0.5, 0.25, 0.125, 0]])
def test_each_drop_keeps_the_tokens_the_previous_layer_attended_to_most(deep, images, tmp_path, monkeypatch, keep):
    tokenizer, model, processor = deep
    config = PruningConfig(llm_pruning="schedule", schedule=schedule_file(tmp_path, keep))
    record = recording(monkeypatch)
    input_ids, mask, pixels, sizes = batch_inputs(model, tokenizer, processor, images[1:2], QUESTIONS[1:2])
    with torch.no_grad():
        merged = model.merge_multimodal(input_ids, mask, None, pixels, sizes, "left", config)
        _, logits, stats = generate(model, tokenizer, processor, images[1:2], QUESTIONS[1:2], config)
        counts = [round(VISUAL * Fraction(str(f))) for f in keep]
        kept, first_logits = reference(model, merged.inputs_embeds[0], merged.visual_mask[0], counts)
    assert record == kept
    assert stats[0]["visual_per_layer"] == counts
    torch.testing.assert_close(logits[0, 0], first_logits, atol=1e-5, rtol=1e-5)


# ---- batches, stage 1, stage 2 ----------------------------------------------------------------------------------
BATCH_CASES = {
    "schedule": {},
    "with-stage1": {"visual_pruning": "longtail", "alpha": 0.4, "visual_layer": 2},
    "with-stage2": {"kv_pruning": "h2o", "heavy_ratio": 0.2, "recent_ratio": 0.2},
    "with-stages12": {"visual_pruning": "longtail", "alpha": 0.4, "visual_layer": 2, "kv_pruning": "h2o"},
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_a_batch_of_four_equals_four_single_runs(deep, images, tmp_path, case) -> None:
    tokenizer, model, processor = deep
    keep = [1, 0.8, 0.5, 0.5, 0.3, 0.1]
    config = PruningConfig(llm_pruning="schedule", schedule=schedule_file(tmp_path, keep), **BATCH_CASES[case])
    batch = answers(model, tokenizer, processor, images, config)
    for row, (image, question) in enumerate(zip(images, QUESTIONS)):
        single = answers(model, tokenizer, processor, [image], config, [question])[0]
        assert batch[row].text == single.text
        assert batch[row].token_stats == single.token_stats
    for answer in batch:  # the schedule starts from each sample's count as it entered the LLM (stage 1's, adaptive)
        stats = answer.token_stats
        assert stats["visual_per_layer"] == [round(stats["visual_after"] * Fraction(str(f))) for f in keep]
    if "visual_pruning" in BATCH_CASES[case]:
        assert len({a.token_stats["visual_after"] for a in batch}) > 1  # adaptive: the samples differ


# ---- bad schedule files -------------------------------------------------------------------------------------------
BAD_FILES = {
    "not-json": ("{unit: fraction", r"bad\.json: not a readable JSON file"),
    "no-keep": ({"unit": "fraction"}, r"bad\.json: expected a JSON object with 'unit' .* and 'keep'"),
    "unit": ({"unit": "percent", "keep": [1, 1]}, r"bad\.json: 'unit' must be 'fraction' or 'count', got 'percent'"),
    "empty": ({"unit": "fraction", "keep": []}, r"bad\.json: 'keep' must be a non-empty list"),
    "above-one": ({"unit": "fraction", "keep": [1, 1, 1.5]}, r"bad\.json: layer 2 keeps 1\.5; a fraction must be .*"),
    "negative": ({"unit": "count", "keep": [64, -3]}, r"bad\.json: layer 1 keeps -3; a count must be an integer >= 0"),
    "count-float": ({"unit": "count", "keep": [64, 3.5]}, r"bad\.json: layer 1 keeps 3\.5; a count must be an integer"),
    "text": ({"unit": "fraction", "keep": [1, "half"]}, r"bad\.json: layer 1 keeps 'half'; a fraction must be"),
    "layer0": ({"unit": "fraction", "keep": [0.5, 0.5]}, r"bad\.json: layer 0 keeps 0\.5; nothing ranks .* must be 1"),
    "grows": (
        {"unit": "fraction", "keep": [1, 0.4, 0.6]},
        r"bad\.json: layer 2 keeps 0\.6, more than layer 1's 0\.4; a dropped token cannot come back",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_schedule_file_names_the_file_and_the_layer(tmp_path, case) -> None:
    content, message = BAD_FILES[case]
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    with pytest.raises(PruningConfigError, match=message + r".*\(--schedule\)"):
        PruningConfig(llm_pruning="schedule", schedule=str(path))


def test_a_missing_or_unset_schedule_file_is_named(tmp_path) -> None:
    with pytest.raises(PruningConfigError, match=r"needs a schedule file \(--schedule FILE\)"):
        PruningConfig(llm_pruning="schedule")
    with pytest.raises(PruningConfigError, match=r"schedule file '.*nope\.json' not found \(--schedule\)"):
        PruningConfig(llm_pruning="schedule", schedule=str(tmp_path / "nope.json"))


def test_what_only_the_model_can_tell_is_checked_before_anything_runs(deep, images, tmp_path) -> None:
    tokenizer, model, processor = deep
    short = PruningConfig(llm_pruning="schedule", schedule=schedule_file(tmp_path, [1, 0.5, 0.5], name="short.json"))
    with pytest.raises(PruningConfigError, match=r"short\.json lists 3 layers; this model has 6 decoder layers"):
        answers(model, tokenizer, processor, images[:1], short, QUESTIONS[:1])
    few = PruningConfig(llm_pruning="schedule", schedule=schedule_file(tmp_path, [32] * 6, "count", name="few.json"))
    with pytest.raises(PruningConfigError, match=r"few\.json: layer 0 keeps 32 visual tokens but a sample brings 64"):
        answers(model, tokenizer, processor, images[:1], few, QUESTIONS[:1])


def test_write_schedule_refuses_what_read_schedule_refuses_and_round_trips(tmp_path) -> None:
    path = tmp_path / "s.json"
    written = write_schedule(path, "fraction", [1, 0.5, 0.25], method="gsearch", tolerance=1.0)
    assert read_schedule(path) == written and written.extra == {"method": "gsearch", "tolerance": 1.0}
    assert written.counts(63) == [63, 32, 16]  # round half to even, as FastV rounds n (1 - R)
    with pytest.raises(PruningConfigError, match=r"layer 2 keeps 0\.75, more than layer 1's 0\.5"):
        write_schedule(tmp_path / "t.json", "fraction", [1, 0.5, 0.75])
    assert not (tmp_path / "t.json").exists()


# ---- G-Search: the greedy rule on scoring functions whose optimum is known ------------------------------------------
def essential(needed: list[float]):
    """A calibration metric for which a schedule has no drop exactly when it keeps at least needed[l] at every layer
    (the paper's assumption when ``needed`` does not grow with depth): 100 then, less the more it falls short."""

    def score(keep: tuple[float, ...]) -> float:
        return 100.0 - 50.0 * sum(max(0.0, n - k) for n, k in zip(needed, keep))

    return score


GRID = fraction_grid(0.1)


@pytest.mark.parametrize(
    "needed",
    [
        [1.0, 0.6, 0.3, 0.3, 0.1, 0.1],  # a sigmoid-like fall
        [1.0, 1.0, 1.0, 0.5, 0.0, 0.0],
        [1.0, 0.2, 0.2, 0.2, 0.2, 0.2],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # nothing can go
    ],
)
def test_gsearch_finds_the_optimum_when_the_needed_tokens_never_grow(needed) -> None:
    calls = []
    score = essential(needed)
    found = greedy_search(len(needed), GRID, lambda keep: calls.append(keep) or score(keep), tolerance=0.0)
    assert found.keep == tuple(needed) and found.metric == found.baseline == 100.0
    assert len(calls) == len(set(calls)) == len(found.evaluations)  # no schedule scored twice
    assert len(calls) <= 1 + (len(needed) - 1) * math.ceil(math.log2(len(GRID)))  # bisection per layer


def test_gsearch_follows_the_greedy_rule_when_the_assumption_fails() -> None:
    """Layer 2 needs more than layer 1: the rule fixes layer 1 at what it needs while the deeper layers inherit its
    value, so layer 1 ends at the most any deeper layer needs (the suffix maximum), as the greedy order implies."""
    needed = [1.0, 0.3, 0.7, 0.2, 0.5, 0.1]
    found = greedy_search(len(needed), GRID, essential(needed), tolerance=0.0)
    assert found.keep == (1.0, 0.7, 0.7, 0.5, 0.5, 0.1)


def test_gsearch_tolerance_is_the_drop_it_accepts() -> None:
    needed = [1.0, 0.6, 0.3, 0.3, 0.1, 0.1]
    # 50 points per missing unit of fraction: a tolerance of 5 lets each layer give up 0.1 below what it needs
    found = greedy_search(len(needed), GRID, essential(needed), tolerance=5.0)
    assert found.metric >= found.baseline - 5.0
    assert found.keep == (1.0, 0.5, 0.3, 0.3, 0.1, 0.1)  # layer 1 takes the slack; later layers have none left
    with pytest.raises(ValueError, match="--tolerance must be >= 0"):
        greedy_search(3, GRID, essential([1, 1, 1]), tolerance=-1)


@pytest.fixture(scope="module")
def pope_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pope")
    pope_fixture(root)
    return root


def test_gsearch_through_the_tiny_model_reproduces_the_rule(deep_ckpt, pope_folder, tmp_path) -> None:
    """The whole path (schedule file -> the method in the model -> answers -> score) with a score injected that
    reads the counts each layer received: the optimum is known, and G-Search returns it."""
    needed = [1.0, 1.0, 0.5, 0.5, 0.2, 0.0]
    args = argparse.Namespace(
        model_path=str(deep_ckpt), model_base=None, device="cpu", load_8bit=False, load_4bit=False,
        use_flash_attn=False, vision_tower=None, benchmark="pope", data_dir=str(pope_folder), num_images=1,
        work_dir=str(tmp_path), batch_size=4, max_new_tokens=2, conv_mode=None,
        **{key: None for key in registry.defaults()},
    )  # fmt: skip

    def kept_enough(answers: Path) -> float:
        rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
        ok = [
            all(v >= round(row["tokens"]["visual_after"] * Fraction(str(n))) for v, n in zip(per_layer, needed))
            for row in rows
            for per_layer in [row["tokens"]["visual_per_layer"]]
        ]
        return 100.0 * sum(ok) / len(ok)

    calibration, base = open_calibration(args)
    calibration.score = kept_enough
    candidate = tmp_path / "candidate.json"
    found = greedy_search(
        calibration.layers, GRID, lambda keep: calibration.evaluate(schedule_config(base, keep, candidate)).metric, 0.0
    )
    assert found.keep == tuple(needed) and calibration.evaluations == len(found.evaluations)


# ---- P-Sigmoid ----------------------------------------------------------------------------------------------------
def test_the_p_sigmoid_family() -> None:
    keep = p_sigmoid(8, steepness=20.0, centre=0.5, floor=0.1)
    assert keep[0] == 1.0 and all(b <= a for a, b in zip(keep, keep[1:]))  # a valid schedule: never grows
    assert keep[1] > 0.99 and abs(keep[-1] - 0.1) < 1e-3  # everything early, the floor late
    assert p_sigmoid(8, 20.0, 0.5, 0.1)[4] == round(0.1 + 0.9 / (1 + math.exp(20.0 * (4 / 7 - 0.5))), 4)
    assert p_sigmoid(1, 5.0, 0.5, 0.0) == (1.0,)


def toy_cost(layers: int):
    return lambda schedule: sum(schedule.keep) / layers  # the mean fraction kept: a FLOPs-like budget quantity


def toy_objective(keep: tuple[float, ...]) -> float:
    """Shallow layers matter more; a known preference the optimiser should follow."""
    return sum(k * (len(keep) - i) ** 2 for i, k in enumerate(keep))


def test_p_sigmoid_search_is_reproducible_with_a_seed_and_respects_the_budget() -> None:
    layers, budget = 8, 0.45
    first = optimise(layers, toy_objective, toy_cost(layers), budget, trials=12, seed=3, progress=False)
    again = optimise(layers, toy_objective, toy_cost(layers), budget, trials=12, seed=3, progress=False)
    other = optimise(layers, toy_objective, toy_cost(layers), budget, trials=12, seed=4, progress=False)
    assert first.trials == again.trials and first.keep == again.keep and first.params == again.params
    assert [t["params"] for t in other.trials] != [t["params"] for t in first.trials]
    for trial in first.trials + other.trials:
        if trial["state"] == "complete":
            assert trial["cost"] <= budget and trial["keep"] == list(p_sigmoid(layers, **trial["params"]))
    assert first.cost <= budget and first.metric == max(t["metric"] or 0 for t in first.trials)
    assert first.cost > budget - 0.1  # the centre is fitted to the budget, not left far below it


def test_p_sigmoid_refuses_a_budget_no_schedule_meets() -> None:
    with pytest.raises(ValueError, match=r"the budget 0\.1 is below what any schedule reaches \(0\.125"):
        optimise(8, toy_objective, toy_cost(8), 0.1, trials=2, seed=0, progress=False)


# ---- the commands end to end ----------------------------------------------------------------------------------------
def test_the_commands_write_schedules_the_runner_reads(deep_ckpt, pope_folder, tmp_path, capsys) -> None:
    common = ["--model-path", str(deep_ckpt), "--benchmark", "pope", "--data-dir", str(pope_folder)]
    common += ["--work-dir", str(tmp_path), "--max-new-tokens", "2", "--device", "cpu"]
    g_out, p_out = tmp_path / "g.json", tmp_path / "p.json"
    g = gsearch.main([*common, "--out", str(g_out), "--step", "0.25", "--tolerance", "0"])
    p = psigmoid.main([*common, "--out", str(p_out), "--flops-ratio", "0.8", "--trials", "3", "--no-progress"])
    for path, report in ((g_out, g), (p_out, p)):
        schedule = read_schedule(path)
        assert len(schedule.keep) == LAYERS and schedule.extra["method"] == report["method"]
        assert schedule.extra["calibration"]["questions"] == 6 and report["search"]["evaluations"] >= 2
    assert g["metric"] >= g["baseline_metric"] and len(g["evaluated"]) == g["search"]["evaluations"]
    assert p["prefill_flops_ratio"] <= 0.8 and p["seed"] == 0
    answers = tmp_path / "answers.jsonl"
    argv = ["--model-path", str(deep_ckpt), "--question-file", str(pope_folder / "llava_pope_test.jsonl")]
    argv += ["--image-folder", str(pope_folder / "val2014"), "--answers-file", str(answers), "--temperature", "0"]
    argv += ["--max_new_tokens", "2", "--batch-size", "3", "--no-progress", "--llm-pruning", "schedule"]
    assert model_vqa_loader.main([*argv, "--schedule", str(p_out)]) == 6
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    counts = read_schedule(p_out).counts(VISUAL)
    assert all(row["tokens"]["visual_per_layer"] == counts for row in rows)


def test_the_commands_stop_on_bad_input_with_one_line(deep_ckpt, tmp_path, capsys) -> None:
    base = ["--model-path", str(deep_ckpt), "--work-dir", str(tmp_path), "--out", str(tmp_path / "s.json")]
    with pytest.raises(SystemExit, match=r"error: --benchmark and --data-dir go together"):
        gsearch.main([*base, "--benchmark", "pope"])
    with pytest.raises(SystemExit, match=r"error: .*the search sets --llm-pruning itself"):
        gsearch.main([*base, "--llm-pruning", "fastv"])
    with pytest.raises(SystemExit, match=r"error: --step must be in \(0, 1\]"):
        gsearch.main([*base, "--step", "0"])
    with pytest.raises(SystemExit, match=r"error: the budget must be in \(0, 1\] for --flops-ratio"):
        psigmoid.main([*base, "--flops-ratio", "1.5"])
    assert not (tmp_path / "s.json").exists()


# ---- the comparison's equal-FLOPs settings --------------------------------------------------------------------------
def test_the_comparison_predicts_the_counts_fastv_and_pyramiddrop_produce(deep, images) -> None:
    """Each baseline's setting for a budget is solved from its counts per layer; they must be the method's own."""
    tokenizer, model, processor = deep
    sample = SampleTokens(text=40, visual=VISUAL, visual_before=VISUAL)
    config = {"llm_pruning": "fastv", "fastv_k": 2, "fastv_ratio": 0.3}
    fastv = answers(model, tokenizer, processor, images[:1], config, QUESTIONS[:1])
    assert fastv[0].token_stats["visual_per_layer"] == schedule_compare.fastv_counts(2, 0.3, LAYERS)(sample)
    at, lam = [1, 3, 5], 0.6
    ratios = ",".join(f"{round(lam**p, 4):g}" for p in (1, 2, 3))
    config = {"llm_pruning": "pdrop", "pdrop_layers": "1,3,5", "pdrop_ratios": ratios}
    pdrop = answers(model, tokenizer, processor, images[:1], config, QUESTIONS[:1])
    assert pdrop[0].token_stats["visual_per_layer"] == schedule_compare.pdrop_counts(at, lam, LAYERS)(sample)
    assert schedule_compare.pdrop_layers(32) == [8, 16, 24] and schedule_compare.pdrop_layers(3) == [1, 2]


def test_the_comparison_solves_a_setting_to_the_closest_flops() -> None:
    ratio = lambda r: 1 - 0.6 * r  # noqa: E731  (FLOPs fall as R grows)
    assert schedule_compare.closest(ratio, 0.7, 0, 1, grows=False) == 0.5
    assert schedule_compare.closest(lambda x: x * x, 0.25, 0.0001, 1, grows=True) == 0.5
    assert schedule_compare.closest(ratio, 0.1, 0, 1, grows=False) == 1.0  # out of reach: the nearest end


def test_prefill_cost_counts_each_layer_at_its_own_tokens() -> None:
    spec = ModelSpec.from_config(PRESETS["vicuna-7b"], "vicuna-7b")
    cost = PrefillCost(spec)
    full = prefill_cost(spec, 612)
    assert cost.prefill([612] * 32) == pytest.approx(full.ops)  # no dropping: eval.roofline's own total
    sample = SampleTokens(text=36, visual=576, visual_before=576)
    half = Schedule("fraction", (1.0,) * 2 + (0.5,) * 30)
    expected = (2 * cost.layer(612) + 30 * cost.layer(324) + full.lm_head.ops) / full.ops
    assert cost.schedule_ratio([sample], half) == pytest.approx(expected)
    stats = {"prompt": 612, "visual_before": 576, "visual_after": 576, "visual_per_layer": [576] * 2 + [288] * 30}
    assert cost.measured_ratio([stats]) == pytest.approx(expected)


def test_the_comparison_command_runs_end_to_end(tiny_ckpt, tmp_path) -> None:
    """docs/schedules.md's command on the 2-layer tiny model, one budget, the smallest sets: every method measured
    on the test set, the LLM-side ones at the budget's FLOPs, the table, the JSON and the figure written."""
    out = tmp_path / "compare"
    argv = ["--model-path", str(tiny_ckpt), "--num-images", "1", "--test-images", "1", "--budgets", "0.9"]
    summary = schedule_compare.main([*argv, "--trials", "2", "--step", "0.5", "--out-dir", str(out), "--device", "cpu"])
    methods = [row["method"] for row in summary["rows"]]
    assert methods == ["LLaVA-1.5 (no pruning)", "G-Search", "ours, stage 1 + G-Search", *schedule_compare.METHODS]
    flops = {row["method"]: row["prefill_flops"] for row in summary["rows"]}
    assert flops["LLaVA-1.5 (no pruning)"] == 1.0
    for method in ("FastV", "PyramidDrop", "P-Sigmoid"):  # same visual count on both sets: the budget carries over
        assert abs(flops[method] - 0.9) < 0.03, method
    assert flops["ours, stage 1"] == flops["ours, stages 1+2"] < 1.0
    assert (out / "results.json").is_file() and (out / "schedules.png").stat().st_size > 10_000
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "| 90 % | P-Sigmoid |" in table and "| G-Search | [1, " in table

"""Vision-side baselines (pruning/baselines): PruMerge, PruMerge+, VisionZip, DivPrune, pooling.

Each against a batch-1 reference transcribed from its official code's selection rule (attention computed explicitly
or by the eager tower, loops allowed), on a tiny LLaVA whose CLIP tower has peaked CLS rows; a batch of four equals
four single runs; budget and parameter errors name their flag; every method runs through a benchmark runner's
flags with per-sample counts; LLaVA-1.6 runs them per crop.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from eval.common import INPUT_ERROR_STATUS
from llava.eval import model_vqa_loader
from llava.inference import build_prompt
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from llava.testing.tiny_llava import write_tiny_llava, write_tiny_llava_next
from pruning import PruningConfig, PruningConfigError, add_pruning_args, pruning_overrides, select_visual_tokens
from pruning.baselines.pool import pool_grid
from tests.helpers import batched_answers_equal_singles, load_on_cpu, mixed_images, random_image

PEAK = 1.5  # q/k weights scaled up: CLS rows from nearly flat to a few dominant patches (max / min > 50)
QUESTIONS = ["Is there a dog?", "What colour is the square in the middle of the picture?", "Count.", "Why?"]
N = 64  # the tiny tower: 112 px, patches of 14


def peak(tower_layers) -> None:
    with torch.no_grad():
        for layer in tower_layers:
            layer.self_attn.q_proj.weight.mul_(PEAK)
            layer.self_attn.k_proj.weight.mul_(PEAK)


@pytest.fixture(scope="module")
def peaked_ckpt(tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5 checkpoint whose CLIP folder has peaked CLS attention."""
    ckpt = write_tiny_llava(tmp_path_factory.mktemp("baselines") / "llava-v1.5-tiny", seed=0)
    clip_dir = ckpt.with_name(ckpt.name + "-clip")
    clip = CLIPModel.from_pretrained(clip_dir)
    peak(clip.vision_model.encoder.layers)
    clip.save_pretrained(clip_dir)
    return ckpt


@pytest.fixture(scope="module")
def peaked(peaked_ckpt):
    return load_on_cpu(peaked_ckpt)


@pytest.fixture(scope="module")
def images():
    return mixed_images()


@pytest.fixture(scope="module")
def pixels(peaked, images) -> torch.Tensor:
    _, model, processor = peaked
    return process_images(images, processor, model.config)


def select(model, pixels: torch.Tensor, **config):
    tower = model.get_vision_tower()
    with torch.no_grad():
        return select_visual_tokens(
            tower.vision_tower,
            pixels,
            PruningConfig(**config),
            select_layer=tower.select_layer,
            projector=model.get_model().mm_projector,
        )


def eager_tower(model):
    tower = copy.deepcopy(model.get_vision_tower().vision_tower)
    tower.set_attn_implementation("eager")
    return tower


def capture(module: torch.nn.Module, store: dict, key: str):
    return module.register_forward_hook(lambda _module, _inputs, output: store.__setitem__(key, output))


def test_the_tower_is_peaked(peaked, pixels) -> None:
    """The references below would be met trivially by flat CLS rows."""
    _, model, _ = peaked
    out = select(model, pixels, visual_pruning="prumerge")
    scores = out.scores
    assert float((scores.max(dim=1).values / scores.min(dim=1).values).min()) > 50
    assert len(set(out.kept.tolist())) > 1  # the adaptive count differs between images


# ---- PruMerge / PruMerge+ ------------------------------------------------------------------------------------------
def reference_prumerge(model, pixel: torch.Tensor, plus: bool) -> tuple[torch.Tensor, list[int]]:
    """The official token_prune_merge_advanced(_plus) (adaptive) for one image: hooks on the last layer's q_proj and
    k_proj, single-head attention of width C over all tokens, numpy IQR, topk, the double loop over kept tokens."""
    tower = model.get_vision_tower().vision_tower
    layer = tower.encoder.layers[-1]
    store: dict = {}
    handles = [capture(layer.self_attn.q_proj, store, "q"), capture(layer.self_attn.k_proj, store, "k")]
    with torch.no_grad():
        outs = tower(pixel[None], output_hidden_states=True)
    for handle in handles:
        handle.remove()
    features = outs.hidden_states[-2][:, 1:]  # [1, N, C]
    _, n, channels = features.shape
    attn = torch.softmax((store["q"] @ store["k"].transpose(-2, -1)) * channels**-0.5, dim=-1)
    cls_attn = attn[:, 0, 1:]
    values = cls_attn.float().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)
    idx = torch.topk(cls_attn, int(n * ratio), dim=1, largest=True).indices[0].tolist()
    if plus:
        step = int(1 / ratio)
        idx += [x for x in range(0, n - 1, int(step / 3)) if x not in idx]  # the official's arange(0, 575, ...)
    keys = store["k"][0, 1:]
    rest_of = [j for j in range(n) if j not in idx]
    x_kept, a_kept, k_kept = features[0, idx], cls_attn[0, idx], F.normalize(keys[idx], dim=-1)
    x_rest, a_rest, k_rest = features[0, rest_of], cls_attn[0, rest_of], F.normalize(keys[rest_of], dim=-1)
    tokens = []
    for i in range(len(idx)):
        others_x = torch.cat([x_kept[:i], x_kept[i + 1 :], x_rest])
        others_a = torch.cat([a_kept[:i], a_kept[i + 1 :], a_rest])
        others_k = torch.cat([k_kept[:i], k_kept[i + 1 :], k_rest])
        nearest = torch.topk(others_k @ k_kept[i], 32).indices
        tokens.append(x_kept[i] + (others_x[nearest] * others_a[nearest, None]).sum(dim=0))
    tokens.append((x_rest * a_rest[:, None]).sum(dim=0))
    return torch.stack(tokens), idx


@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
def test_prumerge_equals_the_official_rule(peaked, pixels, method) -> None:
    _, model, _ = peaked
    out = select(model, pixels, visual_pruning=method)
    for b in range(pixels.shape[0]):
        expected, idx = reference_prumerge(model, pixels[b], plus=method == "prumerge_plus")
        kept = int(out.kept[b])
        assert kept == len(idx) + 1 and len(idx) > 0
        assert out.indices[b, : len(idx)].tolist() == idx  # attention picks by descending score, then samples
        assert not out.mask[b, kept:].any()
        torch.testing.assert_close(out.features[b, :kept], expected, rtol=0, atol=1e-5)


def test_prumerge_fixed_budget_keeps_the_top_tokens_and_the_extra_one(peaked, pixels) -> None:
    _, model, _ = peaked
    fixed = select(model, pixels, visual_pruning="prumerge", prumerge_adaptive=False, visual_topk=12)
    adaptive = select(model, pixels, visual_pruning="prumerge")
    assert fixed.kept.tolist() == [12] * 4
    for b in range(4):
        best = torch.sort(adaptive.scores[b], descending=True, stable=True).indices[:11].tolist()
        assert fixed.indices[b, :11].tolist() == best


# ---- VisionZip -------------------------------------------------------------------------------------------------------
def reference_visionzip(model, pixel: torch.Tensor, dominant: int, contextual: int) -> tuple[torch.Tensor, list[int]]:
    """The official CLIPVisionTower_VisionZip.forward for one image with visionzip(model, dominant, contextual): the
    eager tower's attentions[-2], the head-mean keys of layers[-2] (its k_proj, hooked), then the transcribed rule."""
    tower = eager_tower(model)
    store: dict = {}
    handle = capture(tower.encoder.layers[-2].self_attn.k_proj, store, "k")
    with torch.no_grad():
        outs = tower(pixel[None], output_hidden_states=True, output_attentions=True)
    handle.remove()
    heads = tower.config.num_attention_heads
    raw = store["k"]  # [1, 1+n, D]
    metric = raw.view(1, raw.shape[1], heads, -1).transpose(1, 2).mean(1)  # the official raw_key_states.mean(1)
    attn_weights, hidden = outs.attentions[-2], outs.hidden_states[-2]
    dominant_num = dominant - 1  # visionzip() passes dominant - 1; CLS is the remaining dominant token
    topk = attn_weights[:, :, 0, 1:].sum(dim=1).topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(1, 1, dtype=topk.dtype), topk], dim=1)
    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(1, dominant_num + 1, hidden.shape[2])
    metric_filtered = metric[mask].view(1, hidden.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(1, hidden.shape[1] - (dominant_num + 1), -1)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, others], metric_normalized[:, target_indices].transpose(1, 2))
    assign = torch.zeros(1, int(others.sum()), contextual).scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign.transpose(1, 2), hidden_filtered[:, others]) / counts
    contextual_tokens = hidden_filtered[:, target_indices] + aggregated
    patches = sorted(i - 1 for i in topk[0].tolist())
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)[0], patches


@pytest.mark.parametrize(("config", "split"), [({}, (54, 10)), ({"visual_topk": 16}, (13, 3))])
def test_visionzip_equals_the_official_rule(peaked, pixels, config, split) -> None:
    _, model, _ = peaked
    out = select(model, pixels, visual_pruning="visionzip", **config)
    dominant, contextual = split
    assert out.kept.tolist() == [dominant + contextual] * 4
    for b in range(4):
        expected, patches = reference_visionzip(model, pixels[b], dominant, contextual)
        assert out.indices[b, 1:dominant].tolist() == patches
        torch.testing.assert_close(out.features[b], expected, rtol=0, atol=1e-5)


def test_visionzip_splits_budgets_as_the_paper() -> None:
    from pruning.baselines.visionzip import split

    def parts(tokens: int) -> tuple[int, int]:
        return split(PruningConfig(visual_pruning="visionzip", visual_topk=tokens), 576)

    assert [parts(t) for t in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert parts(2) == (1, 1) and parts(576) == (486, 90)


def test_visionzip_under_cls_patch_puts_cls_first_once(peaked, pixels) -> None:
    _, model, _ = peaked
    tower = model.get_vision_tower()
    config = PruningConfig(visual_pruning="visionzip", visual_topk=16)
    with torch.no_grad():
        patch = select_visual_tokens(tower.vision_tower, pixels, config, select_feature="patch")
        cls_patch = select_visual_tokens(tower.vision_tower, pixels, config, select_feature="cls_patch")
    torch.testing.assert_close(cls_patch.features, patch.features, rtol=0, atol=0)  # the same 16 tokens
    assert cls_patch.kept.tolist() == [15] * 4  # patches counted, CLS added by the select feature


# ---- DivPrune --------------------------------------------------------------------------------------------------------
def reference_divprune(model, pixel: torch.Tensor, keep: int) -> list[int]:
    """The official DivPrune on one image's projected tokens: 1 - cosine matrix, then the greedy loop."""
    tower = model.get_vision_tower().vision_tower
    with torch.no_grad():
        tokens = model.get_model().mm_projector(tower(pixel[None], output_hidden_states=True).hidden_states[-2][0, 1:])
        unit = tokens / tokens.norm(dim=1, keepdim=True)
        distance = 1.0 - unit @ unit.t()
    chosen: list[int] = []
    for i in range(keep):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(distance[chosen], dim=0).values
        chosen.append(int(torch.argmax(scores)))
    return sorted(chosen)


@pytest.mark.parametrize(("config", "keep"), [({}, 6), ({"visual_topk": 20}, 20)])
def test_divprune_equals_the_official_rule(peaked, pixels, config, keep) -> None:
    _, model, _ = peaked
    assert int(round(0.098 * N)) == 6
    out = select(model, pixels, visual_pruning="divprune", **config)
    plain = select(model, pixels)  # every patch, raster order
    assert out.kept.tolist() == [keep] * 4
    for b in range(4):
        expected = reference_divprune(model, pixels[b], keep)
        assert out.indices[b].tolist() == expected
        torch.testing.assert_close(out.features[b], plain.features[b, expected], rtol=0, atol=0)


def test_divprune_needs_the_projector(peaked, pixels) -> None:
    _, model, _ = peaked
    with pytest.raises(ValueError, match="divprune' compares the tokens the LLM receives"):
        select_visual_tokens(model.get_vision_tower().vision_tower, pixels, PruningConfig(visual_pruning="divprune"))


# ---- pooling ---------------------------------------------------------------------------------------------------------
def reference_pool(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Window means over a [side, side, C] grid, windows as adaptive average pooling defines them: [rows * cols, C]."""
    side = grid.shape[0]
    out = []
    for i in range(rows):
        for j in range(cols):
            r0, r1 = (i * side) // rows, -((-(i + 1) * side) // rows)
            c0, c1 = (j * side) // cols, -((-(j + 1) * side) // cols)
            out.append(grid[r0:r1, c0:c1].reshape(-1, grid.shape[-1]).mean(dim=0))
    return torch.stack(out)


@pytest.mark.parametrize(("tokens", "grid"), [(16, (4, 4)), (24, (4, 6)), (7, (1, 7)), (64, (8, 8))])
def test_pool_equals_window_means(peaked, pixels, tokens, grid) -> None:
    _, model, _ = peaked
    out = select(model, pixels, visual_pruning="pool", visual_topk=tokens)
    plain = select(model, pixels).features  # [4, 64, C]
    assert pool_grid(tokens, 8) == grid and out.kept.tolist() == [tokens] * 4
    for b in range(4):
        expected = reference_pool(plain[b].view(8, 8, -1), *grid)
        torch.testing.assert_close(out.features[b], expected, rtol=0, atol=1e-5)
    assert all(torch.equal(row, torch.sort(row).values) for row in out.indices)  # raster order on the grid
    assert pool_grid(128, 24) == (8, 16) and pool_grid(192, 24) == (12, 16) and pool_grid(144, 24) == (12, 12)


# ---- batching --------------------------------------------------------------------------------------------------------
CONFIGS = {
    "prumerge": {"visual_pruning": "prumerge"},
    "prumerge_fixed": {"visual_pruning": "prumerge", "prumerge_adaptive": False, "visual_topk": 9},
    "prumerge_plus": {"visual_pruning": "prumerge_plus"},
    "visionzip": {"visual_pruning": "visionzip", "visual_topk": 16},
    "divprune": {"visual_pruning": "divprune", "visual_topk": 10},
    "pool": {"visual_pruning": "pool", "visual_topk": 16},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_batch_of_four_equals_four_single_runs(peaked, images, name) -> None:
    tokenizer, model, processor = peaked
    pruning = PruningConfig(**CONFIGS[name])
    prompts = [build_prompt(q, "vicuna_v1", model_config=model.config) for q in QUESTIONS]
    batched = batched_answers_equal_singles(model, tokenizer, processor, prompts, images, pruning, 5)
    assert all(a.token_stats["visual_before"] == N > a.token_stats["visual_after"] for a in batched)


# ---- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"visual_pruning": "pool", "visual_topk": 0}, r"visual_topk must be >= 1, got 0 \(--visual-tokens\)"),
        ({"visual_pruning": "pool"}, r"visual_pruning='pool' needs visual_topk >= 1 \(--visual-tokens\)"),
        (
            {"visual_pruning": "prumerge", "prumerge_adaptive": False},
            r"visual_pruning='prumerge' needs visual_topk >= 1 \(--visual-tokens\)",
        ),
        ({"prumerge_neighbours": 0}, r"prumerge_neighbours must be >= 1, got 0 \(--prumerge-neighbours\)"),
        ({"prumerge_iqr_factor": -1.0}, r"prumerge_iqr_factor must be >= 0, got -1.0 \(--prumerge-iqr-factor\)"),
        ({"prumerge_plus_stride": 0}, r"prumerge_plus_stride must be >= 1, got 0 \(--prumerge-plus-stride\)"),
        ({"visionzip_contextual": 0}, r"visionzip_contextual must be >= 1, got 0 \(--visionzip-contextual\)"),
        ({"visionzip_dominant": 0}, r"visionzip_dominant must be >= 1, got 0 \(--visionzip-dominant\)"),
        ({"divprune_ratio": 0.0}, r"divprune_ratio must be in \(0, 1\], got 0.0 \(--divprune-ratio\)"),
        ({"divprune_ratio": 1.5}, r"divprune_ratio must be in \(0, 1\], got 1.5 \(--divprune-ratio\)"),
        (
            {"visual_pruning": "visionzip", "visual_topk": 64, "visionzip_dominant": 40},
            r"either from visual_topk \(--visual-tokens\) or from visionzip_dominant and visionzip_contextual",
        ),
    ],
)
def test_bad_settings_name_their_flag(config, message) -> None:
    with pytest.raises(PruningConfigError, match=message):
        PruningConfig(**config)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"visual_pruning": "pool", "visual_topk": 65}, r"visual_topk 65 is above the 64 patches"),
        ({"visual_pruning": "divprune", "visual_topk": 65}, r"visual_topk 65 is above the 64 patches"),
        ({"visual_pruning": "visionzip", "visual_topk": 65}, r"visual_topk 65 is above the 64 patches"),
        (
            {"visual_pruning": "prumerge", "prumerge_adaptive": False, "visual_topk": 65},
            r"visual_topk 65 is above the 64 patches",
        ),
        ({"visual_pruning": "pool", "visual_topk": 61}, r"61 has none; nearest: 56 or 64 \(--visual-tokens\)"),
        ({"visual_pruning": "visionzip", "visual_topk": 1}, r"needs visual_topk >= 2 .* \(--visual-tokens\)"),
        (
            {"visual_pruning": "visionzip", "visionzip_dominant": 60},
            r"59 dominant patches and 10 contextual tokens need 69 of the 64 patches of an image \(crop\) "
            r"\(--visionzip-dominant 60, --visionzip-contextual 10\)",
        ),
        ({"visual_pruning": "divprune", "divprune_ratio": 0.005}, r"= 0 tokens; raise divprune_ratio"),
    ],
)
def test_budgets_the_tower_cannot_meet_name_their_flag(peaked, pixels, config, message) -> None:
    _, model, _ = peaked
    with pytest.raises(PruningConfigError, match=message):
        select(model, pixels, **config)


def test_visual_tokens_and_its_alias_set_one_key() -> None:
    parser = add_pruning_args(argparse.ArgumentParser())
    assert pruning_overrides(parser.parse_args(["--visual-tokens", "64"])) == {"visual_topk": 64}
    assert pruning_overrides(parser.parse_args(["--visual-topk", "64"])) == {"visual_topk": 64}
    assert "--visual-tokens VISUAL_TOPK, --visual-topk VISUAL_TOPK" in parser.format_help()


# ---- every entry point: a runner with the method's flags ---------------------------------------------------------------
RUNNER_FLAGS = {
    "prumerge": ["--visual-pruning", "prumerge"],
    "prumerge_plus": ["--visual-pruning", "prumerge_plus", "--prumerge-plus-stride", "2"],
    "visionzip": ["--visual-pruning", "visionzip", "--visual-tokens", "16"],
    "divprune": ["--visual-pruning", "divprune", "--visual-topk", "12"],  # the alias
    "pool": ["--visual-pruning", "pool", "--visual-tokens", "16"],
}


def write_questions(tmp_path: Path, images) -> tuple[Path, Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"img_{i}.png")
    texts = [*QUESTIONS, "Hi?"]
    rows = [{"question_id": i, "image": f"img_{i % 4}.png", "text": text} for i, text in enumerate(texts)]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return questions, folder


def run_loader(ckpt: Path, questions: Path, folder: Path, answers: Path, *flags: str) -> int:
    argv = ["--model-path", str(ckpt), "--question-file", str(questions), "--image-folder", str(folder)]
    argv += ["--answers-file", str(answers), "--temperature", "0", "--conv-mode", "vicuna_v1", "--max_new_tokens", "3"]
    return model_vqa_loader.main([*argv, "--no-progress", "--batch-size", "3", *flags])


@pytest.mark.parametrize("name", list(RUNNER_FLAGS))
def test_each_method_runs_through_a_runner_flag(peaked_ckpt, peaked, images, pixels, tmp_path, name) -> None:
    _, model, _ = peaked
    questions, folder = write_questions(tmp_path, images)
    answers = tmp_path / "answers.jsonl"
    assert run_loader(peaked_ckpt, questions, folder, answers, *RUNNER_FLAGS[name]) == 5
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    overrides = pruning_overrides(add_pruning_args(argparse.ArgumentParser()).parse_args(RUNNER_FLAGS[name]))
    expected = select(model, pixels, **overrides).kept.tolist()  # per image, computed directly
    assert [row["tokens"]["visual_after"] for row in rows] == [expected[i % 4] for i in range(5)]
    assert all(row["tokens"]["visual_before"] == N and row["tokens"]["inflection"] is None for row in rows)
    record = json.loads((tmp_path / "answers.run.json").read_text(encoding="utf-8"))
    assert record["pruning"]["visual_pruning"] == name


def test_a_budget_above_the_patches_stops_the_runner_before_writing(peaked_ckpt, images, tmp_path) -> None:
    questions, folder = write_questions(tmp_path, images)
    answers = tmp_path / "answers.jsonl"
    with pytest.raises(
        SystemExit, match=r"error: .*visual_topk 65 is above the 64 patches .*\(--visual-tokens\)"
    ) as stop:
        run_loader(peaked_ckpt, questions, folder, answers, "--visual-pruning", "pool", "--visual-tokens", "65")
    assert stop.value.code == INPUT_ERROR_STATUS  # one error line, no traceback
    assert not answers.exists() or answers.read_text(encoding="utf-8") == ""


# ---- LLaVA-1.6: per crop -----------------------------------------------------------------------------------------------
NEXT_SIZES = [(120, 90), (64, 160), (400, 50), (40, 320)]  # 2x1, 1x2, 3x1, 1x3 grids (+ the base crop)


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    ckpt = write_tiny_llava_next(tmp_path_factory.mktemp("baselines16") / "llava-v1.6-vicuna-tiny", seed=1)
    tokenizer, model, processor, _ = load_pretrained_model(str(ckpt), device="cpu")
    peak(model.get_vision_tower().vision_tower.encoder.layers)
    return tokenizer, model, processor


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llava16_runs_each_crop_on_its_own_and_batches(next_model, name) -> None:
    tokenizer, model, processor = next_model
    pruning = PruningConfig(**CONFIGS[name])
    images = [random_image(20 + i, size) for i, size in enumerate(NEXT_SIZES)]
    prompts = [build_prompt(q, "vicuna_v1", model_config=model.config) for q in QUESTIONS]
    batched = batched_answers_equal_singles(model, tokenizer, processor, prompts, images, pruning, 4)
    tower = model.get_vision_tower()
    projector = model.get_model().mm_projector
    for answer, image in zip(batched, images):
        crops = process_images([image], processor, model.config)[0]  # [1 + grid crops, 3, H, W]
        with torch.no_grad():
            alone = [int(tower.select(crop[None], pruning, projector).kept[0]) for crop in crops]
        assert answer.token_stats["crop_kept"] == alone  # each crop on its own curve / budget
        assert answer.token_stats["visual_after"] < answer.token_stats["visual_before"]


def test_an_alias_cannot_take_another_parameters_flag() -> None:
    from pruning import Param, register_vision_method

    taken = Param("toy_budget", int, 1, "x", aliases=("--visual-tokens",))
    with pytest.raises(
        ValueError, match="flag --visual-tokens of parameter 'toy_budget' already belongs to 'visual_topk'"
    ):
        register_vision_method("toy_alias", params=(taken,), description="x")(lambda context: None)
    with pytest.raises(ValueError, match="alias '-x' must start with '--'"):
        Param("toy_budget", int, 1, "x", aliases=("-x",))

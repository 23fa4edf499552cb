"""Vision-side baselines ToMe (pruning/baselines/tome.py) and Recoverable Compression (pruning/baselines/recovery.py).

Each against a batch-1 reference transcribed from its official code (eager attention computed explicitly, Python
loops) on a tiny LLaVA whose CLIP tower has peaked CLS rows; a batch of four equals four single runs (LLaVA-1.5 and
1.6); errors name their flag; both run through a benchmark runner's flags with per-sample counts; Recovery reads the
question each image is asked with.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from llava.eval import model_vqa_loader
from llava.inference import build_prompt, generate_answers, image_questions
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from llava.model.multimodal_encoder.clip_encoder import VisionTowerError
from llava.testing.tiny_llava import write_tiny_llava, write_tiny_llava_next
from pruning import PruningConfig, PruningConfigError, add_pruning_args, pruning_overrides, select_visual_tokens
from pruning.baselines.recovery import local_outlier_factor
from pruning.baselines.tome import merge_schedule
from tests.helpers import batched_answers_equal_singles, load_on_cpu, mixed_images, random_image

PEAK = 1.5  # q/k weights scaled up: CLS rows from nearly flat to a few dominant patches
QUESTIONS = ["Is there a dog?", "What colour is the square in the middle of the picture?", "Count.", "Why?"]
N = 64  # the tiny tower: 112 px, patches of 14
LAYERS = 3  # the tiny tower has 4 layers; LLaVA's select layer -2 is the output of the third


def peak(clip_dir: Path) -> None:
    clip = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        for layer in clip.vision_model.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(PEAK)
            layer.self_attn.k_proj.weight.mul_(PEAK)
    clip.save_pretrained(clip_dir)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5 checkpoint whose CLIP folder has peaked CLS attention (and, as every tiny CLIP folder, a text
    tower, both projections and a small CLIP tokenizer)."""
    path = write_tiny_llava(tmp_path_factory.mktemp("tome_recovery") / "llava-v1.5-tiny", seed=0)
    peak(path.with_name(path.name + "-clip"))
    return path


@pytest.fixture(scope="module")
def clip_dir(ckpt) -> Path:
    return ckpt.with_name(ckpt.name + "-clip")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_on_cpu(ckpt)


@pytest.fixture(scope="module")
def images():
    return mixed_images()


@pytest.fixture(scope="module")
def pixels(loaded, images) -> torch.Tensor:
    _, model, processor = loaded
    return process_images(images, processor, model.config)


def select(model, pixels: torch.Tensor, texts=None, **config):
    tower = model.get_vision_tower()
    with torch.no_grad():
        return tower.select(pixels, PruningConfig(**config), model.get_model().mm_projector, texts)


def capture(module: torch.nn.Module, store: dict, key: str):
    return module.register_forward_hook(lambda _module, _inputs, output: store.__setitem__(key, output))


# ---- ToMe ------------------------------------------------------------------------------------------------------------
def reference_tome(clip: CLIPModel, pixel: torch.Tensor, target: int, prop_attn: bool):
    """The official ToMeBlock / ToMeAttention / bipartite_soft_matching / merge_wavg on one image of the CLIP tower, up
    to LLaVA's select layer: eager attention with the log-size bias, keys averaged over heads, A = even positions
    (CLS first, never merged), B = odd ones, the r best-matched A tokens summed into their B partners by size, the
    new order [unmerged A sorted, B]. Returns (CLS [D], patches [T, D] in raster order of their surviving patch,
    those patches)."""
    vision = clip.vision_model
    with torch.no_grad():
        x = vision.pre_layrnorm(vision.embeddings(pixel[None]))[0]  # [t, D]
        size = [1.0] * x.shape[0]
        origin = list(range(-1, N))
        rate = math.ceil((N - target) / LAYERS)
        for layer in vision.encoder.layers[:LAYERS]:
            attn = layer.self_attn
            heads, dim = attn.num_heads, attn.head_dim
            h = layer.layer_norm1(x)
            q, k, v = (proj(h).view(-1, heads, dim).transpose(0, 1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            logits = q @ k.transpose(1, 2) * dim**-0.5  # [H, t, t]
            if prop_attn:
                logits = logits + torch.tensor(size).log()[None, None, :]
            out = (logits.softmax(dim=-1) @ v).transpose(0, 1).reshape(x.shape)
            x = x + attn.out_proj(out)
            left = x.shape[0] - 1
            r = min(rate, left - target, left // 2)
            if r > 0:
                metric = k.mean(dim=0)
                metric = metric / metric.norm(dim=-1, keepdim=True)
                a_pos, b_pos = list(range(0, x.shape[0], 2)), list(range(1, x.shape[0], 2))
                scores = metric[a_pos] @ metric[b_pos].T
                scores[0, :] = -math.inf
                best, partner = scores.max(dim=-1)
                edges = torch.argsort(best, descending=True).tolist()
                kept_a, moved = sorted(edges[r:]), edges[:r]
                sums = [x[b] * size[b] for b in b_pos]
                sizes = [size[b] for b in b_pos]
                for a in moved:
                    j = int(partner[a])
                    sums[j] = sums[j] + x[a_pos[a]] * size[a_pos[a]]
                    sizes[j] += size[a_pos[a]]
                tokens = [x[a_pos[a]] for a in kept_a] + [s / z for s, z in zip(sums, sizes)]
                origin = [origin[a_pos[a]] for a in kept_a] + [origin[b] for b in b_pos]
                size = [size[a_pos[a]] for a in kept_a] + sizes
                x = torch.stack(tokens)
            x = x + layer.mlp(layer.layer_norm2(x))
    order = sorted(range(1, x.shape[0]), key=lambda i: origin[i])
    return x[0], x[order], [origin[i] for i in order]


@pytest.mark.parametrize(("target", "prop_attn"), [(16, True), (40, True), (16, False)])
def test_tome_equals_the_official_rule(loaded, clip_dir, pixels, target, prop_attn) -> None:
    _, model, _ = loaded
    tower = model.get_vision_tower()
    config = PruningConfig(visual_pruning="tome", visual_topk=target, tome_prop_attn=prop_attn)
    with torch.no_grad():
        out = select_visual_tokens(tower.vision_tower, pixels, config, select_feature="cls_patch")
    clip = CLIPModel.from_pretrained(clip_dir)
    assert out.kept.tolist() == [target] * 4
    for b in range(4):
        cls, patches, origin = reference_tome(clip, pixels[b], target, prop_attn)
        assert out.indices[b].tolist() == origin
        torch.testing.assert_close(out.features[b, 0], cls, rtol=0, atol=1e-5)  # ToMe's own CLS first
        torch.testing.assert_close(out.features[b, 1:], patches, rtol=0, atol=1e-5)


def test_tome_with_nothing_to_merge_is_the_plain_tower(loaded, pixels) -> None:
    _, model, _ = loaded
    plain = select(model, pixels)
    everything = select(model, pixels, visual_pruning="tome", visual_topk=N)
    torch.testing.assert_close(everything.features, plain.features, rtol=0, atol=1e-5)
    assert everything.indices.tolist() == [list(range(N))] * 4


def test_tome_merges_at_a_constant_rate() -> None:
    assert merge_schedule(576, 64, 23) == [23] * 22 + [6]  # LLaVA-1.5: ceil(512 / 23) = 23 per layer
    assert merge_schedule(576, 192, 23) == [17] * 22 + [10]
    assert merge_schedule(64, 16, 3) == [16, 16, 16] and merge_schedule(64, 64, 3) == [0, 0, 0]


# ---- Recoverable Compression -----------------------------------------------------------------------------------------
def reference_lof_ratio(values: torch.Tensor, neighbours: int) -> float:
    """The official find_max_derivative_position: the share of sklearn's LocalOutlierFactor(n_neighbors,
    contamination='auto').fit_predict outliers (-1: a local outlier factor above 1.5)."""
    factors = reference_lof(values, neighbours)
    return sum(value > 1.5 for value in factors) / len(factors)


def reference_lof(values: torch.Tensor, neighbours: int) -> list[float]:
    """sklearn's LocalOutlierFactor.fit on 1-D data, written out: -negative_outlier_factor_."""
    x = [float(v) for v in values.double()]
    m = len(x)
    k = max(1, min(neighbours, m - 1))
    near = [sorted((abs(x[p] - x[o]), o) for o in range(m) if o != p)[:k] for p in range(m)]
    kdist = [nb[-1][0] for nb in near]
    lrd = [1.0 / (np.mean([max(kdist[o], d) for d, o in near[p]]) + 1e-10) for p in range(m)]
    return [np.mean([lrd[o] for _, o in near[p]]) / lrd[p] for p in range(m)]


def complement(index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.tensor([j for j in range(size) if j not in set(index.tolist())], dtype=torch.long)


def reference_recovery(clip: CLIPModel, tokenizer, pixel: torch.Tensor, question: str, released: bool):
    """The official token_recycling_with_text_in_vision_and_clustring with get_score_by_text and CLIPTextEncoder for
    one image: hooks on the last layer's q_proj / k_proj, single-head attention of width C, the projected last-layer
    tokens against the text embedding of the last of 77 positions, LOF ratios, topk, the loop over centres. Returns
    (output tokens [t, C], kept patches in raster order, centre patches in output order, patches kept by the text)."""
    vision = clip.vision_model
    layer = vision.encoder.layers[-1]
    store: dict = {}
    handles = [capture(layer.self_attn.q_proj, store, "q"), capture(layer.self_attn.k_proj, store, "k")]
    with torch.no_grad():
        outs = vision(pixel[None], output_hidden_states=True)
        ids = tokenizer(question, max_length=77, truncation=True, padding="max_length", return_tensors="pt")
        text = clip.text_projection(clip.text_model(ids["input_ids"]).last_hidden_state[:, -1, :])  # [1, P]
        projected = clip.visual_projection(outs.hidden_states[-1])  # [1, 1+N, P]
    for handle in handles:
        handle.remove()
    features = outs.hidden_states[-2][:, 1:]  # [1, N, C]
    _, n, channels = features.shape
    patches = F.normalize(projected[:, 1:], p=2, dim=-1)
    similarity = F.normalize(text, p=2, dim=-1) @ patches.transpose(-2, -1) * projected.shape[-1] ** -0.5  # [1, 1, N]
    attn = torch.softmax((store["q"] @ store["k"].transpose(-2, -1)) * channels**-0.5, dim=-1)
    cls_attn = attn[:, 0, 1:]
    by_vision = torch.topk(cls_attn, int(n * reference_lof_ratio(cls_attn[0], 20)), dim=1).indices
    similarity = similarity[:, 0, :].clone()
    similarity[:, by_vision[0]] = similarity.min(dim=-1).values
    count = int((n - by_vision.shape[-1]) * reference_lof_ratio(similarity[0], 20))
    by_text = torch.topk(similarity, count, dim=1).indices
    kept = torch.sort(torch.cat([by_vision, by_text], dim=-1), dim=-1).values
    main = features[:, kept[0]]
    other = complement(kept[0], n)
    rest = len(other)
    other_attn = cls_attn[:, other]
    width = channels if released else rest  # the release's N = index.shape[-1] is the feature width
    left = min(rest, int(width * reference_lof_ratio(other_attn[0], 10)))
    idx = torch.topk(other_attn, left, dim=1).indices[0]
    x_other = features[0, other]
    text_score = 50 * similarity[0, other]
    keys = store["k"][0, 1:]
    key_other = keys[:rest] if released else keys[other]  # the release gathers the patch keys at list positions
    compl = complement(idx, rest)
    x_c, a_c, t_c, k_c = x_other[idx], other_attn[0, idx], text_score[idx], F.normalize(key_other[idx], dim=-1)
    x_n, a_n, t_n, k_n = x_other[compl], other_attn[0, compl], text_score[compl], F.normalize(key_other[compl], dim=-1)
    tokens = []
    for i in range(len(idx)):
        rest_x = torch.cat([x_c[:i], x_c[i + 1 :], x_n])
        rest_a = torch.cat([a_c[:i], a_c[i + 1 :], a_n])
        rest_k = torch.cat([k_c[:i], k_c[i + 1 :], k_n])
        rest_t = torch.cat([t_c[:i], t_c[i + 1 :], t_n])
        nearest = torch.topk(rest_k @ k_c[i] + rest_t, min(32, len(rest_x))).indices
        tokens.append(x_c[i] + (rest_x[nearest] * rest_a[nearest, None]).sum(dim=0))
    if tokens:
        tokens.append((x_n * a_n[:, None]).sum(dim=0))
        out = torch.cat([main[0], torch.stack(tokens)])
    else:
        out = main[0]
    return out, kept[0].tolist(), other[idx].tolist(), by_text.shape[-1]


@pytest.mark.parametrize("released", [False, True])
def test_recovery_equals_the_official_rule(loaded, clip_dir, pixels, released) -> None:
    _, model, _ = loaded
    out = select(model, pixels, QUESTIONS, visual_pruning="recovery", recovery_released_indexing=released)
    clip = CLIPModel.from_pretrained(clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    centres, text_picks = [], 0
    for b in range(4):
        expected, kept, centre, picked_by_text = reference_recovery(clip, tokenizer, pixels[b], QUESTIONS[b], released)
        count = int(out.kept[b])
        assert count == expected.shape[0]
        assert out.indices[b, : len(kept) + len(centre)].tolist() == kept + centre
        torch.testing.assert_close(out.features[b, :count], expected, rtol=0, atol=1e-5)
        centres.append(len(centre))
        text_picks += picked_by_text
    assert sum(c > 0 for c in centres) >= 2 and 0 in centres  # merging exercised, and its absence
    assert text_picks > 0


def test_recovery_keeps_text_picks_and_the_question_changes_them(loaded, pixels) -> None:
    """Two questions about the same images keep different patches; the visual filter alone would not."""
    _, model, _ = loaded
    first = select(model, pixels, ["Is there a dog?"] * 4, visual_pruning="recovery")
    second = select(
        model, pixels, ["What colour is the square in the middle of the picture?"] * 4, visual_pruning="recovery"
    )
    kept = [
        (set(a[: int(k)].tolist()), set(b[: int(j)].tolist()))
        for a, k, b, j in zip(first.indices, first.kept, second.indices, second.kept)
    ]
    assert any(one != two for one, two in kept)
    torch.testing.assert_close(first.scores, second.scores, rtol=0, atol=0)  # same CLS attention: the text decided


def test_lof_equals_its_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = [torch.rand(40, generator=generator), torch.softmax(3 * torch.randn(40, generator=generator), dim=0)]
    values = torch.stack(rows)
    values[1, :8] = values[1].min()  # duplicates, as the text filter's filled-in minimum makes
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[0, 30:] = False  # a shorter row, as the remaining patches of an image
    factor = local_outlier_factor(values, valid, 10)
    for row in range(2):
        m = int(valid[row].sum())
        expected = torch.tensor(reference_lof(values[row, :m], 10), dtype=torch.float64)
        torch.testing.assert_close(factor[row, :m], expected, rtol=1e-12, atol=0)
        assert not factor[row, m:].any()
    assert (factor[1] > 1.5).any() and not (factor[0] > 1.5).any()  # outliers in the peaked row only


# ---- batching, LLaVA-1.5 ---------------------------------------------------------------------------------------------
CONFIGS = {
    "tome": {"visual_pruning": "tome", "visual_topk": 16},
    "recovery": {"visual_pruning": "recovery"},
}
PROMPT_QUESTIONS = [*QUESTIONS[:3], "Why?\nAnswer the question using a single word or phrase."]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_batch_of_four_equals_four_single_runs(loaded, images, name) -> None:
    tokenizer, model, processor = loaded
    pruning = PruningConfig(**CONFIGS[name])
    prompts = [build_prompt(q, "vicuna_v1", model_config=model.config) for q in PROMPT_QUESTIONS]
    batched = batched_answers_equal_singles(model, tokenizer, processor, prompts, images, pruning, 5)
    assert all(a.token_stats["visual_before"] == N > a.token_stats["visual_after"] for a in batched)


def test_generate_answers_passes_each_images_question(loaded, images, pixels) -> None:
    tokenizer, model, processor = loaded
    pruning = PruningConfig(visual_pruning="recovery")
    questions = ["Is there a dog?", "What colour is the square in the middle of the picture?"]
    prompts = [build_prompt(q + "\nAnswer with one word.", "vicuna_v1", model_config=model.config) for q in questions]
    for b in range(4):
        answers = generate_answers(
            model, tokenizer, processor, prompts, [images[b]] * 2, max_new_tokens=2, pruning=pruning
        )
        direct = select(model, pixels[b : b + 1].expand(2, -1, -1, -1), questions, visual_pruning="recovery")
        assert [a.token_stats["visual_after"] for a in answers] == direct.kept.tolist()


def test_image_questions_takes_the_users_line_from_any_template() -> None:
    question = "What is shown?\nAnswer the question using a single word or phrase."
    for mode in ("vicuna_v1", "llava_v1", "v0", "llava_llama_2", "mistral_instruct", "chatml_direct", "phi3_v"):
        assert image_questions(build_prompt(question, mode)) == ["What is shown?"], mode
    assert image_questions(build_prompt("<image>\n<image>\nCompare them.", "vicuna_v1")) == ["Compare them."] * 2
    assert image_questions(build_prompt("What is in <image-placeholder>?", "vicuna_v1")) == ["What is in ?"]


# ---- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"visual_pruning": "tome"}, r"visual_pruning='tome' needs visual_topk >= 1 \(--visual-tokens\)"),
        ({"visual_pruning": "tome", "visual_topk": 0}, r"visual_topk must be >= 1, got 0 \(--visual-tokens\)"),
        ({"recovery_lof_neighbours": 0}, r"recovery_lof_neighbours must be >= 1, got 0 \(--recovery-lof-neighbours\)"),
        (
            {"recovery_merge_lof_neighbours": 0},
            r"recovery_merge_lof_neighbours must be >= 1, got 0 \(--recovery-merge-lof-neighbours\)",
        ),
        ({"recovery_neighbours": 0}, r"recovery_neighbours must be >= 1, got 0 \(--recovery-neighbours\)"),
        ({"recovery_text_weight": -1.0}, r"recovery_text_weight must be >= 0, got -1.0 \(--recovery-text-weight\)"),
        ({"tome_prop_attn": "yes"}, r"tome_prop_attn must be true or false, got 'yes' \(--tome-prop-attn\)"),
    ],
)
def test_bad_settings_name_their_flag(config, message) -> None:
    with pytest.raises(PruningConfigError, match=message):
        PruningConfig(**config)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"visual_topk": 65}, r"visual_topk 65 is above the 64 patches of an image \(crop\) \(--visual-tokens\)"),
        (
            {"visual_topk": 8},
            r"visual_topk 8 is out of reach .* the smallest reachable count is 15 \(--visual-tokens\)",
        ),
    ],
)
def test_tome_budgets_the_tower_cannot_meet_name_their_flag(loaded, pixels, config, message) -> None:
    _, model, _ = loaded
    with pytest.raises(PruningConfigError, match=message):
        select(model, pixels, visual_pruning="tome", **config)


def test_recovery_without_a_question_or_a_tokenizer_says_so(loaded, pixels, tmp_path) -> None:
    _, model, _ = loaded
    tower = model.get_vision_tower()
    with pytest.raises(ValueError, match="'recovery' is guided by the question, and none reached the vision tower"):
        select(model, pixels, visual_pruning="recovery")
    with pytest.raises(ValueError, match="'recovery' got 1 questions for 4 images"):
        select(model, pixels, ["Why?"], visual_pruning="recovery")
    bare = write_tiny_llava(tmp_path / "llava-v1.5-tiny", seed=0)
    bare_clip = bare.with_name(bare.name + "-clip")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare_clip / name).unlink()
    side = type(tower.text_side())(str(bare_clip), torch.device("cpu"), torch.float32)
    with pytest.raises(
        VisionTowerError, match=r"llava-v1.5-tiny-clip'.*has no tokenizer \(tokenizer.json or vocab.json\)"
    ):
        side.embed_texts(["Why?"])


# ---- every entry point: a runner with the method's flags -------------------------------------------------------------
RUNNER_FLAGS = {
    "tome": ["--visual-pruning", "tome", "--visual-tokens", "20", "--tome-prop-attn", "false"],
    "recovery": ["--visual-pruning", "recovery", "--recovery-neighbours", "8"],
}


@pytest.mark.parametrize("name", list(RUNNER_FLAGS))
def test_each_method_runs_through_a_runner_flag(ckpt, loaded, images, pixels, tmp_path, name) -> None:
    _, model, _ = loaded
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"img_{i}.png")
    rows = [{"question_id": i, "image": f"img_{i % 4}.png", "text": q} for i, q in enumerate([*QUESTIONS, "Hi?"])]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    argv = ["--model-path", str(ckpt), "--question-file", str(questions), "--image-folder", str(folder)]
    argv += ["--answers-file", str(answers), "--temperature", "0", "--conv-mode", "vicuna_v1", "--max_new_tokens", "3"]
    assert model_vqa_loader.main([*argv, "--no-progress", "--batch-size", "3", *RUNNER_FLAGS[name]]) == 5
    written = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    overrides = pruning_overrides(add_pruning_args(argparse.ArgumentParser()).parse_args(RUNNER_FLAGS[name]))
    texts = [row["text"] for row in rows]
    every = torch.cat([pixels, pixels[:1]])
    expected = select(model, every, texts, **overrides).kept.tolist()  # per question, computed directly
    assert [row["tokens"]["visual_after"] for row in written] == expected
    assert all(row["tokens"]["visual_before"] == N and row["tokens"]["inflection"] is None for row in written)
    record = json.loads((tmp_path / "answers.run.json").read_text(encoding="utf-8"))
    assert record["pruning"]["visual_pruning"] == name


# ---- LLaVA-1.6: per crop ---------------------------------------------------------------------------------------------
NEXT_SIZES = [(120, 90), (64, 160), (400, 50), (40, 320)]  # 2x1, 1x2, 3x1, 1x3 grids (+ the base crop)


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    path = write_tiny_llava_next(tmp_path_factory.mktemp("tome_recovery16") / "llava-v1.6-vicuna-tiny", seed=1)
    tokenizer, model, processor, _ = load_pretrained_model(str(path), device="cpu")
    with torch.no_grad():
        for layer in model.get_vision_tower().vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(PEAK)
            layer.self_attn.k_proj.weight.mul_(PEAK)
    return tokenizer, model, processor


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llava16_runs_each_crop_on_its_own_and_batches(next_model, name) -> None:
    tokenizer, model, processor = next_model
    pruning = PruningConfig(**CONFIGS[name])
    images = [random_image(20 + i, size) for i, size in enumerate(NEXT_SIZES)]
    prompts = [build_prompt(q, "vicuna_v1", model_config=model.config) for q in PROMPT_QUESTIONS]
    batched = batched_answers_equal_singles(model, tokenizer, processor, prompts, images, pruning, 4)
    tower = model.get_vision_tower()
    for answer, image, question in zip(batched, images, PROMPT_QUESTIONS):
        crops = process_images([image], processor, model.config)[0]  # [1 + grid crops, 3, H, W]
        with torch.no_grad():
            alone = [int(tower.select(crop[None], pruning, None, [question.split("\n")[0]]).kept[0]) for crop in crops]
        assert answer.token_stats["crop_kept"] == alone  # each crop on its own, with the image's question
        assert answer.token_stats["visual_after"] < answer.token_stats["visual_before"]

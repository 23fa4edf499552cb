"""Stage 1 inside a tiny random CLIP tower: scores, selection, bit-identity, batching, 'inside' mode, gradients."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from pruning.config import PruningConfig
from pruning.packing import PACK_MULTIPLE
from pruning.scoring import cls_patch_scores
from pruning.visual import raster_order_indices, select_visual_tokens
from pruning.visualize import grey_out_patches, plot_kept_patches, plot_similarity_curve, similarity_curve_figure

LAYERS = 4
GRID = 4  # image 56 / patch 14
N = GRID * GRID


def tiny_tower(attn_implementation: str = "sdpa") -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        attn_implementation=attn_implementation,
    )
    model = CLIPVisionModel(config).eval()
    # Larger-than-default random weights give peaked CLS rows, so score and selection checks are not trivially met.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                parameter.copy_(
                    1.0 + 0.1 * torch.randn(parameter.shape, generator=generator) if "weight" in name else 0
                )
            else:
                parameter.copy_(0.15 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def tower() -> CLIPVisionModel:
    return tiny_tower()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def reference_hidden_states(model: CLIPVisionModel, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states


def run(model: CLIPVisionModel, pixels: torch.Tensor, **config: object) -> object:
    with torch.no_grad():
        return select_visual_tokens(model, pixels, PruningConfig(**config))


# ---- scores ------------------------------------------------------------------------------------------------------
def full_attention(layer: torch.nn.Module, hidden: torch.Tensor, heads: int) -> torch.Tensor:
    """The layer's whole attention matrix [B, heads, 1+n, 1+n] built by hand (heads=1: full width, not split)."""
    tokens = layer.layer_norm1(hidden)
    queries, keys = layer.self_attn.q_proj(tokens), layer.self_attn.k_proj(tokens)
    batch, length, dim = queries.shape
    queries = queries.view(batch, length, heads, dim // heads).transpose(1, 2)
    keys = keys.view(batch, length, heads, dim // heads).transpose(1, 2)
    return queries @ keys.transpose(-1, -2) / math.sqrt(dim // heads)  # logits


@pytest.mark.parametrize("visual_layer", [0, 2, 3])
def test_full_scores_are_eq_1(tower: CLIPVisionModel, pixels: torch.Tensor, visual_layer: int) -> None:
    hidden = reference_hidden_states(tower, pixels)[visual_layer]
    layer = tower.encoder.layers[visual_layer]
    with torch.no_grad():
        logits = full_attention(layer, hidden, heads=1)[:, 0, 0, 1:]  # CLS row, patch keys
        expected = torch.softmax(logits, dim=-1)
        scores = cls_patch_scores(layer, hidden, mode="full")
    assert scores.dtype == torch.float32 and scores.shape == (4, N)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert float(scores.max() / scores.min()) > 10  # peaked rows: the check above is not met by uniform scores


def test_head_scores_are_the_models_own_cls_attention(pixels: torch.Tensor) -> None:
    eager = tiny_tower("eager")
    with torch.no_grad():
        output = eager(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        for visual_layer in (1, 3):
            layer = eager.encoder.layers[visual_layer]
            hidden = output.hidden_states[visual_layer]
            scores = cls_patch_scores(layer, hidden, mode="heads")
            by_hand = torch.softmax(full_attention(layer, hidden, heads=4), dim=-1)[:, :, 0, 1:].mean(dim=1)
            torch.testing.assert_close(scores, by_hand, atol=1e-5, rtol=0)
            torch.testing.assert_close(scores, output.attentions[visual_layer][:, :, 0, 1:].mean(1), atol=1e-5, rtol=0)
            full = cls_patch_scores(layer, hidden, mode="full")
            assert not torch.allclose(scores, full, atol=1e-3)  # the two modes are different quantities


def test_scores_are_fp32_for_a_half_precision_tower(pixels: torch.Tensor) -> None:
    model = tiny_tower().to(torch.bfloat16)
    hidden = reference_hidden_states(model, pixels.bfloat16())[2]
    scores = cls_patch_scores(model.encoder.layers[2], hidden)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(-1), torch.ones(4))


def test_bad_score_inputs(tower: CLIPVisionModel) -> None:
    with pytest.raises(ValueError, match="unknown visual score mode 'cosine'"):
        cls_patch_scores(tower.encoder.layers[0], torch.zeros(1, 5, 64), mode="cosine")
    with pytest.raises(ValueError, match=r"\[batch, 1 \+ n_patches, dim\]"):
        cls_patch_scores(tower.encoder.layers[0], torch.zeros(5, 64))


# ---- selection ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("visual_layer", [1, 3])
@pytest.mark.parametrize(
    "config", [{"visual_pruning": "none"}, {"visual_pruning": "topk", "visual_topk": N}], ids=["none", "topk=n"]
)
def test_keeping_everything_is_bit_identical_to_the_tower(
    tower: CLIPVisionModel, pixels: torch.Tensor, config: dict, visual_layer: int
) -> None:
    expected = reference_hidden_states(tower, pixels)[-2]
    selection = run(tower, pixels, visual_layer=visual_layer, **config)
    assert torch.equal(selection.features, expected[:, 1:])
    assert selection.mask.all() and selection.kept.tolist() == [N] * 4 and selection.n.tolist() == [N] * 4
    assert selection.indices.tolist() == [list(range(N))] * 4
    with torch.no_grad():
        with_cls = select_visual_tokens(
            tower, pixels, PruningConfig(visual_layer=visual_layer, **config), -2, "cls_patch"
        )
    assert torch.equal(with_cls.features, expected)
    inside = run(tower, pixels, visual_layer=visual_layer, visual_mode="inside", **config)
    assert torch.equal(inside.features, expected[:, 1:])  # nothing pruned: 'inside' runs the same layers


def test_kept_patches_are_the_top_k_in_raster_order(tower: CLIPVisionModel, pixels: torch.Tensor) -> None:
    hidden_states = reference_hidden_states(tower, pixels)
    selection = run(tower, pixels, visual_pruning="longtail", alpha=0.5, visual_layer=2)
    kept = selection.kept.tolist()
    assert len(set(kept)) > 1, "fixture should give samples different counts"
    assert selection.inflection.tolist() == [
        int(i) for i in torch.stack([_loop_inflection(row) for row in selection.scores])
    ]
    assert kept == [min(N, math.ceil(i / 0.5)) for i in selection.inflection.tolist()]
    assert selection.features.shape == (4, max(kept), 64)
    expected_scores = cls_patch_scores(tower.encoder.layers[2], hidden_states[2])
    assert torch.equal(selection.scores, expected_scores)
    for b, k in enumerate(kept):
        indices = selection.indices[b, :k]
        assert indices.tolist() == sorted(indices.tolist())  # raster order
        assert set(indices.tolist()) == set(torch.topk(selection.scores[b], k).indices.tolist())
        assert torch.equal(selection.features[b, :k], hidden_states[-2][b, 1 + indices])
        assert selection.mask[b].tolist() == [True] * k + [False] * (max(kept) - k)
        assert selection.indices[b, k:].tolist() == [-1] * (max(kept) - k)
        assert not selection.features[b, k:].any()  # zero padding


def _loop_inflection(row: torch.Tensor) -> torch.Tensor:
    d = sorted(row.tolist(), reverse=True)
    n = len(d)
    values = [(n - i) * (d[0] - d[i - 1]) for i in range(1, n)]
    return torch.tensor(values.index(max(values)) + 1)


@pytest.mark.parametrize("mode", ["select", "inside"])
@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_batch_equals_one_image_at_a_time(
    tower: CLIPVisionModel, pixels: torch.Tensor, mode: str, select_feature: str
) -> None:
    config = PruningConfig(visual_pruning="longtail", alpha=0.5, visual_layer=1, visual_mode=mode)
    with torch.no_grad():
        batch = select_visual_tokens(tower, pixels, config, select_feature=select_feature)
        assert len(set(batch.kept.tolist())) > 1
        extra = 1 if select_feature == "cls_patch" else 0
        for b in range(len(pixels)):
            single = select_visual_tokens(tower, pixels[b : b + 1], config, select_feature=select_feature)
            k = int(single.kept)
            assert int(batch.kept[b]) == k and int(batch.inflection[b]) == int(single.inflection)
            assert torch.equal(batch.indices[b, :k], single.indices[0])
            torch.testing.assert_close(batch.features[b, : extra + k], single.features[0], atol=1e-5, rtol=1e-5)
            assert batch.mask[b].sum() == extra + k


def test_inside_mode_runs_later_layers_on_kept_tokens_only(tower: CLIPVisionModel, pixels: torch.Tensor) -> None:
    config = {"visual_pruning": "topk", "visual_topk": 5, "visual_layer": 1}
    select = run(tower, pixels, **config)
    inside = run(tower, pixels, visual_mode="inside", **config)
    assert torch.equal(select.indices, inside.indices)
    assert not torch.allclose(select.features, inside.features, atol=1e-3)
    # By hand: hidden_states[1] cut to CLS + kept, then layers 1 and 2 (select layer -2 = hidden_states[3]).
    hidden = reference_hidden_states(tower, pixels)[1]
    with torch.no_grad():
        for b in range(len(pixels)):
            tokens = torch.cat([hidden[b : b + 1, :1], hidden[b : b + 1, 1 + inside.indices[b]]], dim=1)
            for layer in tower.encoder.layers[1:3]:
                tokens = layer(tokens, None)
            torch.testing.assert_close(inside.features[b], tokens[0, 1:], atol=1e-5, rtol=1e-5)
    # Pruning at the select layer itself leaves nothing to run: same as 'select'.
    at_select = run(tower, pixels, visual_mode="inside", **{**config, "visual_layer": 3})
    assert torch.equal(at_select.features, run(tower, pixels, **{**config, "visual_layer": 3}).features)


def test_inside_mode_packs_rows_of_different_lengths(pixels: torch.Tensor) -> None:
    """The layers after the pruning layer run once on the kept tokens of all images back to back (each image
    attending to itself), and give what the padded batch with its padded keys masked out gives (eager attention has
    no packed variant and runs so)."""
    config = PruningConfig(visual_pruning="longtail", alpha=0.5, visual_layer=1, visual_mode="inside")
    packed_tower, padded_tower = tiny_tower("sdpa"), tiny_tower("eager")
    shapes = []
    handle = packed_tower.encoder.layers[1].register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    with torch.no_grad():
        packed = select_visual_tokens(packed_tower, pixels, config)
        padded = select_visual_tokens(padded_tower, pixels, config)
    handle.remove()
    kept = packed.kept.tolist()
    assert len(set(kept)) > 1 and kept == padded.kept.tolist()
    width = -(-sum(k + 1 for k in kept) // PACK_MULTIPLE) * PACK_MULTIPLE  # CLS + kept per image, then the filler
    assert tuple(shapes[-1][:2]) == (1, width)
    torch.testing.assert_close(packed.features, padded.features, atol=1e-5, rtol=1e-5)
    assert not packed.features[~packed.mask].any()  # zeros on padding


def test_inside_mode_through_the_flash_attention_path(pixels: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' flash_attention_2 path (its kernels the documented-API reference) gets the packed rows'
    cumulative lengths, not causal, and agrees with SDPA."""
    from tests.test_packed_prefill import VARLEN_CALLS, reference_flash_attn_func, reference_flash_attn_varlen_func

    config = PruningConfig(visual_pruning="longtail", alpha=0.5, visual_layer=1, visual_mode="inside")
    with torch.no_grad():
        expected = select_visual_tokens(tiny_tower("sdpa"), pixels, config)
    kernels = (reference_flash_attn_func, reference_flash_attn_varlen_func, None, flash_utils._pad_input,
               flash_utils._unpad_input)  # fmt: skip
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    model = tiny_tower("sdpa")
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    VARLEN_CALLS.clear()
    with torch.no_grad():
        flash = select_visual_tokens(model, pixels, config)
    assert flash.kept.tolist() == expected.kept.tolist()
    torch.testing.assert_close(flash.features, expected.features, atol=1e-5, rtol=1e-5)
    ends = torch.tensor([k + 1 for k in expected.kept.tolist()]).cumsum(0).tolist()
    cumulative = VARLEN_CALLS[-1]["cu_seqlens_q"].tolist()
    assert cumulative[: len(ends) + 1] == [0, *ends] and not VARLEN_CALLS[-1]["causal"]


def test_inside_mode_refuses_attention_without_a_mask(pixels: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """An attention with neither a packed variant nor a 4D mask would attend to padded keys: refused."""
    model = tiny_tower()
    monkeypatch.setattr(
        model.encoder.layers[1].self_attn, "config", SimpleNamespace(_attn_implementation="flex_attention")
    )
    config = PruningConfig(visual_pruning="longtail", alpha=0.5, visual_layer=1, visual_mode="inside")
    with torch.no_grad(), pytest.raises(ValueError, match="needs 'sdpa' or 'flash_attention_\\*'.*'flex_attention'"):
        select_visual_tokens(model, pixels, config)


def test_layers_after_the_select_layer_never_run(
    tower: CLIPVisionModel, pixels: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the last encoder layer ran, but hidden_states[-2] does not need it")

    monkeypatch.setattr(tower.encoder.layers[LAYERS - 1], "forward", must_not_run)
    selection = run(tower, pixels, visual_pruning="longtail", visual_layer=2)
    assert selection.features.shape[0] == 4
    with pytest.raises(AssertionError, match="last encoder layer ran"):  # the patch is live: -1 needs that layer
        select_visual_tokens(tower, pixels, PruningConfig(visual_layer=0), select_layer=-1)


def test_gradients_reach_the_tower_through_kept_tokens_only(pixels: torch.Tensor) -> None:
    model = tiny_tower().train()
    config = PruningConfig(visual_pruning="longtail", alpha=0.5, visual_layer=1)
    selection = select_visual_tokens(model, pixels, config)
    assert selection.features.requires_grad and not selection.scores.requires_grad
    selection.features.sum().backward()
    # d(sum)/d(hidden_states[3]) is 1 on kept tokens and 0 elsewhere; the last layer run (layers[2]) adds fc2's bias
    # to every token, so its gradient counts the kept tokens of the whole batch, in every coordinate.
    bias_grad = model.encoder.layers[2].mlp.fc2.bias.grad
    torch.testing.assert_close(bias_grad, torch.full_like(bias_grad, float(selection.kept.sum())))
    assert model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.encoder.layers[LAYERS - 1].mlp.fc2.bias.grad is None  # never ran


def test_random_strategy_is_reproducible(tower: CLIPVisionModel, pixels: torch.Tensor) -> None:
    config = {"visual_pruning": "random", "visual_topk": 6, "visual_layer": 2, "seed": 5}
    first, again = run(tower, pixels, **config), run(tower, pixels, **config)
    assert torch.equal(first.indices, again.indices) and first.kept.tolist() == [6] * 4
    top = run(tower, pixels, **{**config, "visual_pruning": "topk"})
    assert not torch.equal(first.indices, top.indices)


def test_raster_order_indices_ties_and_padding() -> None:
    ranking = torch.tensor([[0.1, 0.5, 0.5, 0.2], [0.9, 0.1, 0.8, 0.7]])
    indices, mask = raster_order_indices(ranking, torch.tensor([2, 3]))
    assert indices.tolist() == [[1, 2, -1], [0, 2, 3]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    indices, _ = raster_order_indices(torch.zeros(1, 4), torch.tensor([2]))
    assert indices.tolist() == [[0, 1]]  # equal ranks: the earlier patch wins


def test_bad_layers_are_named(tower: CLIPVisionModel, pixels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"visual_layer 4 needs encoder.layers\[4\].*4 layers"):
        run(tower, pixels, visual_pruning="longtail", visual_layer=4)
    # pruning off is upstream's plain path: nothing is scored, so any visual_layer is fine (a shallow tower loads)
    plain = run(tower, pixels, visual_layer=4)
    assert plain.kept.tolist() == [plain.n[0].item()] * 4 and plain.inflection is None and plain.scores is None
    with pytest.raises(ValueError, match="select_layer -6 is out of range"):
        select_visual_tokens(tower, pixels, PruningConfig(visual_layer=1), select_layer=-6)
    with pytest.raises(ValueError, match="after the select layer"):
        select_visual_tokens(
            tower,
            pixels,
            PruningConfig(visual_pruning="topk", visual_topk=3, visual_layer=3, visual_mode="inside"),
            select_layer=2,
        )
    with pytest.raises(ValueError, match="unknown select_feature 'cls'"):
        select_visual_tokens(tower, pixels, PruningConfig(), select_feature="cls")


def test_scoring_past_the_select_layer_still_returns_select_features(
    tower: CLIPVisionModel, pixels: torch.Tensor
) -> None:
    expected = reference_hidden_states(tower, pixels)
    with torch.no_grad():
        selection = select_visual_tokens(
            tower, pixels, PruningConfig(visual_pruning="topk", visual_topk=4, visual_layer=3), 2
        )
    assert torch.equal(selection.scores, cls_patch_scores(tower.encoder.layers[3], expected[3]))
    for b in range(4):
        assert torch.equal(selection.features[b], expected[2][b, 1 + selection.indices[b]])


# ---- pictures ----------------------------------------------------------------------------------------------------
def test_grey_out_patches_keeps_exactly_the_kept_cells(tmp_path: object) -> None:
    image = Image.fromarray(np.full((40, 40, 3), (250, 10, 10), dtype=np.uint8))
    out = np.asarray(grey_out_patches(image, torch.tensor([0, 3, -1]), grid_side=2))
    assert (out[:20, :20] == (250, 10, 10)).all() and (out[20:, 20:] == (250, 10, 10)).all()  # kept: 0, 3
    assert (out[:20, 20:] != (250, 10, 10)).any(axis=-1).all() and (out[20:, :20] != (250, 10, 10)).any(axis=-1).all()
    path = plot_kept_patches(image, [1], 2, tmp_path / "kept.png")
    assert np.asarray(Image.open(path)).shape == (40, 40, 3)
    with pytest.raises(ValueError, match="outside a 2x2 grid"):
        grey_out_patches(image, [4], 2)


@pytest.mark.parametrize("kept", [8, 3])
def test_similarity_curve_names_i_star_and_k_in_its_legend(kept: int) -> None:
    import matplotlib.pyplot as plt

    scores = torch.softmax(torch.randn(N, generator=torch.Generator().manual_seed(2)) * 3, dim=0)
    figure = similarity_curve_figure(scores, inflection=3, kept=kept)
    axes = figure.axes[0]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    lines = {line.get_label(): list(line.get_xdata()) for line in axes.get_lines()}
    plt.close(figure)
    assert f"kept count k = {kept}" in legend and lines[f"kept count k = {kept}"] == [kept, kept]
    assert "inflection i* = 3" in legend and lines["inflection i* = 3"] == [3, 3]


def test_plot_similarity_curve_writes_a_png(tmp_path: object) -> None:
    scores = torch.softmax(torch.randn(N, generator=torch.Generator().manual_seed(2)) * 3, dim=0)
    path = plot_similarity_curve(scores, inflection=3, kept=8, path=tmp_path / "curve" / "fig3.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="kept"):
        plot_similarity_curve(scores, inflection=3, kept=N + 1, path=tmp_path / "bad.png")

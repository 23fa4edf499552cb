"""The method registry: the config, its validation, the flags, --help and the docs table all come from what is
registered; a method registered from outside the package runs end to end through a benchmark runner's flags."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from llava.eval import model_vqa_loader
from pruning import (
    LayerDropper,
    LayerView,
    Param,
    PruningConfig,
    PruningConfigError,
    ReducedPatches,
    VisionContext,
    add_pruning_args,
    pruning_overrides,
    register_llm_method,
    register_vision_method,
    registry,
    resolve_pruning,
    select_visual_tokens,
)
from pruning.method_table import main as method_table_main
from pruning.registry import at_least
from tests.helpers import REPO, random_image

DEMO_CONFIG = REPO / "playground" / "checkpoints" / "llava-v1.5-demo" / "config.json"
LEGACY_FLAGS = {  # every flag before the registry, with the config key it set
    "--visual-pruning": ("visual_pruning", "topk"),
    "--alpha": ("alpha", 0.3),
    "--visual-layer": ("visual_layer", 3),
    "--visual-topk": ("visual_topk", 7),
    "--visual-ratio": ("visual_ratio", 0.25),
    "--visual-min-keep": ("visual_min_keep", 2),
    "--visual-score": ("visual_score", "heads"),
    "--visual-mode": ("visual_mode", "inside"),
    "--crop-budget": ("crop_budget", "global"),
    "--kv-pruning": ("kv_pruning", "h2o"),
    "--heavy-ratio": ("heavy_ratio", 0.2),
    "--recent-ratio": ("recent_ratio", 0.1),
    "--heavy-budget": ("heavy_budget", 5),
    "--recent-budget": ("recent_budget", 3),
}


def parser() -> argparse.ArgumentParser:
    return add_pruning_args(argparse.ArgumentParser(prog="x"))


# ---- the config ------------------------------------------------------------------------------------------------------
def test_a_checkpoint_pruning_section_loads_unchanged_and_round_trips() -> None:
    section = json.loads(DEMO_CONFIG.read_text(encoding="utf-8"))["pruning"]
    config = PruningConfig.from_dict(section, source=str(DEMO_CONFIG))
    assert {key: config.to_dict()[key] for key in section} == section  # every key as written
    added = {key: value for key, value in config.to_dict().items() if key not in section}
    assert added == {key: registry.defaults()[key] for key in added} and added["llm_pruning"] == "none"  # off
    assert PruningConfig.from_dict(config.to_dict()) == config
    assert PruningConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.alpha == 0.24 and config.visual_layer == 3 and not config.visual_enabled and not config.kv_enabled
    assert config.merged(visual_pruning="longtail", alpha=None).describe() == "visual=longtail(alpha=0.24, layer 3)"


def test_describe_and_views_are_as_before() -> None:
    assert PruningConfig().describe() == "no pruning"
    config = PruningConfig(visual_pruning="topk", visual_topk=105, visual_layer=3, kv_pruning="h2o")
    assert config.describe() == "visual=topk(k=105, layer 3), kv=h2o(heavy=0.5, recent=0.5)"
    assert config.visual_enabled and config.kv_enabled and not config.llm_enabled
    assert PruningConfig(visual_pruning="random", visual_ratio=0.5).describe() == "visual=random(ratio=0.5, layer 16)"
    budgets = PruningConfig(kv_pruning="h2o", heavy_budget=4, recent_budget=2)
    assert budgets.describe() == "kv=h2o(heavy=4, recent=2)"
    with pytest.raises(AttributeError, match="immutable"):
        config.alpha = 0.5
    with pytest.raises(AttributeError, match="no setting 'nope'"):
        _ = config.nope


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"alpha": 1.5}, r"cfg\.json: alpha must be in \(0, 1\], got 1\.5 \(--alpha\)"),
        ({"visual_topk": 0}, r"cfg\.json: visual_topk must be >= 1, got 0 \(--visual-tokens\)"),
        ({"visual_layer": "16"}, r"visual_layer must be an integer, got '16' \(--visual-layer\)"),
        ({"heavy_ratio": float("nan")}, r"heavy_ratio must be a finite number, got nan \(--heavy-ratio\)"),
        ({"visual_score": "cosine"}, r"visual_score must be one of full, heads, got 'cosine' \(--visual-score\)"),
        ({"visual_pruning": "magic"}, r"unknown visual_pruning 'magic'; choose one of longtail, .*none"),
        ({"llm_pruning": "magic"}, r"unknown llm_pruning 'magic'; choose one of .*none"),
        ({"toy_keep": 3}, r"cfg\.json: unknown pruning keys \['toy_keep'\]; known keys are \["),
        ({"visual_pruning": "topk"}, r"visual_pruning='topk' needs visual_topk >= 1 \(--visual-tokens\)"),
        ({"kv_pruning": "h2o", "heavy_budget": 2}, r"heavy_budget and recent_budget must be given together"),
    ],
)
def test_bad_sections_name_the_source_the_key_and_the_flag(section: dict, message: str) -> None:
    with pytest.raises(PruningConfigError, match=message):
        PruningConfig.from_dict(section, source="cfg.json")


def test_every_legacy_flag_sets_the_same_key() -> None:
    argv = [str(token) for flag, (_, value) in LEGACY_FLAGS.items() for token in (flag, value)]
    overrides = pruning_overrides(parser().parse_args(argv))
    assert overrides == {key: value for key, value in LEGACY_FLAGS.values()}
    assert pruning_overrides(parser().parse_args([])) == {}  # unset flags keep the checkpoint's values
    resolved = resolve_pruning(
        {"alpha": 0.5, "visual_layer": 2}, pruning_overrides(parser().parse_args(["--alpha", "0.3"]))
    )
    assert (resolved.alpha, resolved.visual_layer) == (0.3, 2)


def test_help_groups_flags_by_family_and_method_with_descriptions() -> None:
    text = parser().format_help()
    for sel in registry.SELECTORS:
        assert f"{sel.flag}: {registry.FAMILIES[sel.family]}" in text
        for method in registry.methods(sel.key):
            assert f"{sel.flag} {method.name}:" in text
            assert " ".join(method.description.split()[:6]) in " ".join(text.split())
    for flag in LEGACY_FLAGS:
        assert flag in text
    assert f"--llm-pruning {{{','.join(registry.names('llm_pruning'))}}}" in text


# ---- registering -----------------------------------------------------------------------------------------------------
def test_parameters_are_declared_once_and_flags_do_not_collide() -> None:
    def reduce(context):  # noqa: ANN001, ANN202
        raise AssertionError("never run")

    with pytest.raises(ValueError, match="'alpha' is already declared differently"):
        register_vision_method("dup", params=(Param("alpha", float, 0.5, "other"),), description="x")(reduce)
    with pytest.raises(ValueError, match="flag --alpha of parameter 'my_alpha' already belongs to 'alpha'"):
        register_vision_method("dup", params=(Param("my_alpha", float, 0.5, "x", flag="--alpha"),), description="x")(
            reduce
        )
    with pytest.raises(ValueError, match="registered twice"):
        register_vision_method("longtail", description="x")(reduce)
    with pytest.raises(PruningConfigError, match="toy_default must be >= 1, got 0"):
        Param("toy_default", int, 0, "a default that fails its own check", check=at_least(1))
    assert "dup" not in registry.names("visual_pruning")


def test_docs_method_table_is_what_the_command_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert method_table_main([]) == 0
    printed = capsys.readouterr().out
    assert printed == registry.markdown_tables()
    docs = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
    begin, end = "<!-- method-table: begin -->\n", "<!-- method-table: end -->"
    assert docs.count(begin) == 1 and docs.count(end) == 1
    assert docs[docs.index(begin) + len(begin) : docs.index(end)] == printed


# ---- a vision-side method from outside the package ------------------------------------------------------------------
TOY_KEEP = Param("toy_keep", int, 4, "patches the toy method keeps", check=at_least(1))


def first_patches(context: VisionContext) -> ReducedPatches:
    """Keep the first toy_keep patches of the select-layer features, in raster order."""
    features = context.features()[:, 1:]  # [B, n, C]
    batch, n = features.shape[:2]
    keep = min(context.config.toy_keep, n)
    indices = torch.arange(keep, device=features.device).expand(batch, keep)
    return ReducedPatches(features[:, :keep], torch.ones(batch, keep, dtype=torch.bool), indices)


@pytest.fixture
def toy_vision():
    register_vision_method("toy", params=(TOY_KEEP,), description="Test method: the first toy_keep patches.")(
        first_patches
    )
    yield
    registry.unregister("visual_pruning", "toy")
    assert "toy_keep" not in registry.parameters()


def test_a_vision_method_sees_the_tower_lazily_and_its_result_is_checked(tiny_model, images, toy_vision) -> None:
    _, model, processor, _ = tiny_model
    from llava.mm_utils import process_images

    tower = model.get_vision_tower()
    pixels = process_images(images[:2], processor, model.config)
    config = PruningConfig(visual_pruning="toy", toy_keep=5)
    with torch.no_grad():
        out = select_visual_tokens(tower.vision_tower, pixels, config, select_layer=-2, select_feature="cls_patch")
        plain = tower.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    assert out.kept.tolist() == [5, 5] and out.n.tolist() == [64, 64] and out.inflection is None
    torch.testing.assert_close(out.features, plain[:, :6], rtol=0, atol=0)  # CLS, then the first 5 patches
    with pytest.raises(PruningConfigError, match="toy_keep must be >= 1, got 0 \\(--toy-keep\\)"):
        PruningConfig(visual_pruning="toy", toy_keep=0)

    def bad(context: VisionContext) -> ReducedPatches:
        features = context.features()[:, 1:3]
        return ReducedPatches(features, torch.tensor([[False, True]] * features.shape[0]), torch.zeros(2, 2).long())

    register_vision_method("bad", description="Returns a mask with padding first.")(bad)
    try:
        with pytest.raises(ValueError, match="visual_pruning 'bad' returned a mask that is not a prefix"):
            select_visual_tokens(tower.vision_tower, pixels, PruningConfig(visual_pruning="bad"))
    finally:
        registry.unregister("visual_pruning", "bad")


def short_questions(tmp_path: Path) -> tuple[Path, Path]:
    """Five questions of different lengths over four images of different sizes."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(120, 90), (64, 160), (112, 112), (200, 50)]):
        random_image(i, size).save(folder / f"img_{i}.png")
    texts = ["Is there a dog?", "What colour is the square in the middle of the picture?", "Count.", "Why?", "Hi?"]
    rows = [{"question_id": i, "image": f"img_{i % 4}.png", "text": text} for i, text in enumerate(texts)]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return questions, folder


def answer(tiny_ckpt: Path, questions: Path, folder: Path, answers: Path, *flags: str) -> list[dict]:
    argv = ["--model-path", str(tiny_ckpt), "--question-file", str(questions), "--image-folder", str(folder)]
    argv += ["--answers-file", str(answers), "--temperature", "0", "--conv-mode", "vicuna_v1", "--max_new_tokens", "5"]
    assert model_vqa_loader.main([*argv, "--no-progress", "--batch-size", "3", *flags]) == 5
    return [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]


def test_a_vision_method_from_outside_runs_through_a_runner_flag(tiny_ckpt, tmp_path, toy_vision, capsys) -> None:
    questions, folder = short_questions(tmp_path)
    with pytest.raises(SystemExit):
        model_vqa_loader.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--visual-pruning toy: Test method: the first toy_keep patches." in text and "--toy-keep" in text

    plain = answer(tiny_ckpt, questions, folder, tmp_path / "none.jsonl")
    toy = answer(tiny_ckpt, questions, folder, tmp_path / "toy.jsonl", "--visual-pruning", "toy", "--toy-keep", "7")
    for row, base in zip(toy, plain):
        assert row["tokens"]["visual_before"] == 64 and row["tokens"]["visual_after"] == 7
        assert row["tokens"]["inflection"] is None  # the toy computes no i*
        assert row["tokens"]["prompt"] == base["tokens"]["prompt"] - 64 + 7
    record = json.loads((tmp_path / "toy.run.json").read_text(encoding="utf-8"))
    assert record["pruning"]["visual_pruning"] == "toy" and record["pruning"]["toy_keep"] == 7

    # keeping every patch, the toy's features are exactly the unpruned ones
    every = answer(tiny_ckpt, questions, folder, tmp_path / "all.jsonl", "--visual-pruning", "toy", "--toy-keep", "64")
    assert [r["text"] for r in every] == [r["text"] for r in plain]
    assert [r["tokens"]["prompt"] for r in every] == [r["tokens"]["prompt"] for r in plain]


# ---- an LLM-side method from outside the package ---------------------------------------------------------------------
TOY_LAYER = Param("toy_drop_layer", int, 1, "decoder layer before which visual tokens are dropped", check=at_least(0))
TOY_DROP_KEEP = Param("toy_drop_keep", int, 8, "visual tokens kept from that layer on", check=at_least(0))


class FirstVisualTokens(LayerDropper):
    """Before layer toy_drop_layer, keep the first toy_drop_keep visual tokens of each row and every text token."""

    def keep(self, view: LayerView) -> torch.Tensor | None:
        if view.index != self.config.toy_drop_layer:
            return None
        rank = torch.cumsum(view.visual.long(), dim=1)  # 1 for the first visual token of a row
        return view.valid & (~view.visual | (rank <= self.config.toy_drop_keep))


@pytest.fixture
def toy_llm():
    register_llm_method(
        "toy_drop", params=(TOY_LAYER, TOY_DROP_KEEP), description="Test method: the first visual tokens go on."
    )(FirstVisualTokens)
    yield
    registry.unregister("llm_pruning", "toy_drop")


def test_an_llm_method_from_outside_runs_through_a_runner_flag(tiny_ckpt, tmp_path, toy_llm) -> None:
    questions, folder = short_questions(tmp_path)
    plain = answer(tiny_ckpt, questions, folder, tmp_path / "none.jsonl")
    flags = ("--llm-pruning", "toy_drop", "--toy-drop-layer", "1", "--toy-drop-keep")
    dropped = answer(tiny_ckpt, questions, folder, tmp_path / "drop.jsonl", *flags, "5")
    for row, base in zip(dropped, plain):
        assert row["tokens"]["visual_per_layer"] == [64, 5]  # the tiny LLM has two layers
        assert row["tokens"]["prompt"] == base["tokens"]["prompt"] and row["tokens"]["visual_after"] == 64
        assert "visual_per_layer" not in base["tokens"]
    # dropping nothing goes through the engine's masks and gathers and must change nothing (batch of 3, padded)
    kept = answer(tiny_ckpt, questions, folder, tmp_path / "keep.jsonl", *flags, "64")
    assert [r["text"] for r in kept] == [r["text"] for r in plain]
    assert all(r["tokens"]["visual_per_layer"] == [64, 64] for r in kept)


def test_readme_pruning_flags_table_is_true() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Pruning flags") : readme.index("## Evaluate, train, reproduce")]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]  # the flag column
    flags = set(re.findall(r"--[a-z][a-z-]*", " ".join(rows)))
    registered = {sel.flag for sel in registry.SELECTORS} | {p.cli_flag for p in registry.parameters().values()}
    assert flags == registered - {None}  # every registered flag is listed, nothing else
    for sel in registry.SELECTORS:
        assert f"`{sel.flag} {{{','.join(registry.names(sel.key))}}}`" in table

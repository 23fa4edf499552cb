"""Entry points meet user mistakes with one ``error:`` line and exit status 2, before the model loads (issue #19)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.tools import calibrate, visualize
from llava.eval import run_llava
from llava.serve import cli
from llava.utils import USER_ERROR_STATUS
from tests.helpers import REPO, random_image

DEMO = REPO / "playground" / "checkpoints" / "llava-v1.5-demo"
IMAGE = REPO / "playground" / "demo" / "images" / "green_triangle.png"


@pytest.fixture
def no_model_loading(monkeypatch):
    """Every case below must stop before the (slow) model load."""
    import llava.utils

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was noticed")

    monkeypatch.setattr(llava.utils, "load_from_args", fail)
    monkeypatch.setattr(run_llava, "load_from_args", fail)
    monkeypatch.setattr(cli, "load_from_args", fail)


def cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    return {
        "missing image": (["--image-file", str(tmp_path / "nope.png")], "image file not found"),
        "corrupt image": (["--image-file", str(corrupt)], "cannot read image"),
        "missing model": (["--model-path", str(tmp_path / "no-model"), "--image-file", str(IMAGE)], "not found"),
        "alpha 0": (["--image-file", str(IMAGE), "--alpha", "0"], "alpha must be in (0, 1], got 0.0"),
        "alpha -1": (["--image-file", str(IMAGE), "--alpha", "-1"], "alpha must be in (0, 1], got -1.0"),
        "visual layer 99": (
            ["--image-file", str(IMAGE), "--visual-pruning", "longtail", "--visual-layer", "99"],
            "--visual-layer 99: the vision tower",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing image", "corrupt image", "missing model", "alpha 0", "alpha -1", "visual layer 99"]
)
@pytest.mark.parametrize("entry", ["run_llava", "cli"])
def test_user_mistakes_stop_with_one_error_line(entry, case, tmp_path, capsys, no_model_loading) -> None:
    argv, message = cases(tmp_path)[case]
    argv = ["--model-path", str(DEMO), "--device", "cpu", *argv]
    if entry == "run_llava":
        argv += ["--query", "What is this?"]
    with pytest.raises(SystemExit) as stop:
        (run_llava.main if entry == "run_llava" else cli.main)(argv)
    assert stop.value.code == USER_ERROR_STATUS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_no_traceback_from_the_command_line(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llava.eval.run_llava", "--model-path", str(DEMO), "--device", "cpu"]
        + ["--image-file", str(tmp_path / "nope.png"), "--query", "Hi"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == USER_ERROR_STATUS
    assert done.stderr.strip().startswith("error: image file not found") and "Traceback" not in done.stderr


def test_a_corrupt_question_line_names_line_and_column_even_with_skip_errors(tmp_path, capsys) -> None:
    from llava.eval import model_vqa_loader

    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "image": "a.png", "text": "Hi?"}\n{"question_id": 2, "text": oops}\n')
    argv = ["--model-path", str(DEMO), "--question-file", str(questions), "--answers-file", str(tmp_path / "a.jsonl")]
    for extra in ([], ["--skip-errors"]):
        with pytest.raises(SystemExit) as stop:
            model_vqa_loader.main([*argv, *extra])
        assert stop.value.code == USER_ERROR_STATUS
        assert f"{questions}:2: not valid JSON (Expecting value at column 28)" in capsys.readouterr().err
    # the help says so instead of promising to skip it
    with pytest.raises(SystemExit):
        model_vqa_loader.main(["--help"])
    assert "a line that is not JSON at all still stops the run" in " ".join(capsys.readouterr().out.split())


def test_a_shallow_tower_loads_and_answers_with_pruning_off(tmp_path, capsys) -> None:
    """Issue #19 item 4: with pruning off the tower runs upstream's plain path (no layer scored), so a tower with
    fewer layers than the config's visual_layer (a 12-layer ViT-B under visual_layer 16) loads and answers."""
    from llava.model.builder import load_pretrained_model
    from llava.testing.tiny_llava import write_tiny_llava

    ckpt = write_tiny_llava(tmp_path / "llava-shallow", pruning={"visual_layer": 16})  # the tiny tower has 4 layers
    _, model, _, _ = load_pretrained_model(str(ckpt), device="cpu")
    assert model.pruning_config.visual_layer == 16 and not model.pruning_config.visual_enabled
    image = tmp_path / "img.png"
    random_image(0).save(image)
    argv = ["--model-path", str(ckpt), "--device", "cpu", "--image-file", str(image), "--query", "Colour?"]
    run_llava.main([*argv, "--max_new_tokens", "2", "--show-tokens", "--visual-layer", "99"])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["visual_before"] == stats["visual_after"] == 64 and stats["inflection"] is None
    # stage 1 on such a tower still needs a layer to score: named before the model loads
    with pytest.raises(SystemExit, match="--visual-layer 16: the vision tower .* has 4 layers"):
        run_llava.main([*argv, "--visual-pruning", "longtail"])


def test_loading_a_release_checkpoint_reports_nothing_alarming() -> None:
    """Issue #19 item 3: the tower weights released checkpoints carry (model.vision_tower.*) and the text tower of a
    full CLIP folder are expected when loading; no UNEXPECTED load report for them."""
    import logging

    from transformers.utils import logging as hf_logging

    from llava.model.builder import checkpoint_tensors, load_pretrained_model

    assert checkpoint_tensors(DEMO, "model.vision_tower.")  # the release layout carries the tower ...
    records: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = hf_logging.get_logger("transformers")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # what a user sees by default
    logger.addHandler(handler)
    try:
        load_pretrained_model(str(DEMO), device="cpu")
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    assert not [r for r in records if "UNEXPECTED" in r or "LOAD REPORT" in r], records  # ... and says nothing of it


@pytest.mark.parametrize("tool", ["visualize", "calibrate"])
def test_pruning_tools_name_bad_values_before_loading(tool, tmp_path, capsys, no_model_loading, monkeypatch) -> None:
    module = {"visualize": visualize, "calibrate": calibrate}[tool]
    monkeypatch.setattr(module, "load_from_args", lambda *a, **k: pytest.fail("model loaded"))
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "image": "green_triangle.png", "text": "?"}\n')
    common = ["--model-path", str(DEMO), "--device", "cpu", "--alpha", "0", "--visual-pruning", "longtail"]
    extra = {
        "visualize": ["--image-file", str(IMAGE), "--out", str(tmp_path / "figs")],
        "calibrate": ["--question-file", str(questions), "--image-folder", str(IMAGE.parent)],
    }[tool]
    with pytest.raises(SystemExit) as stop:
        module.main([*common, *extra])
    assert stop.value.code == USER_ERROR_STATUS
    assert capsys.readouterr().err.strip() == "error: alpha must be in (0, 1], got 0.0 (--alpha)"

"""The web demo (issue #25, ``python -m llava.serve.gradio_web_server``): controls read off the method registry, one
request's answers, pictures and counts against ``run_llava``'s for the same inputs (LLaVA-1.5 and, per crop, 1.6),
bad input ending in a message, and the page itself driven in headless Chromium (skipped where none is installed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava.eval import run_llava
from llava.mm_utils import get_model_name_from_path
from llava.serve.controls import config_from_values, parameter_controls, selector_controls, unpruned
from llava.serve.demo_session import DemoModel, DemoState, check_image, counts_table, run_request
from llava.serve.gradio_web_server import PageUpdates
from llava.serve.pruning_view import curves_layout, kept_layout, kept_picture
from llava.testing.tiny_llava import write_tiny_llava_next
from llava.utils import default_conv_mode
from pruning import Param, PruningConfig, PruningConfigError, ReducedPatches, register_vision_method, registry
from pruning.registry import at_least
from tests.helpers import REPO, random_image

DEMO = REPO / "playground" / "checkpoints" / "llava-v1.5-demo"
TRIANGLE = REPO / "playground" / "demo" / "images" / "green_triangle.png"
QUESTION = "What colour is the triangle?\nAnswer the question using a single word or phrase."


def run_llava_answer(capsys, model_path: Path, image: Path, question: str, *flags: str) -> tuple[str, dict]:
    """What ``run_llava --show-tokens`` prints: the answer, then the token statistics as JSON."""
    capsys.readouterr()
    argv = ["--model-path", str(model_path), "--image-file", str(image), "--query", question, "--temperature", "0"]
    run_llava.main([*argv, "--show-tokens", *flags])
    lines = capsys.readouterr().out.strip().splitlines()
    return "\n".join(lines[:-1]), json.loads(lines[-1])


def demo_model(loaded, model_path: Path, max_image_pixels: int = 4096 * 4096) -> DemoModel:
    tokenizer, model, processor, _ = loaded
    conv_mode = default_conv_mode(get_model_name_from_path(str(model_path)), model.config)  # as run_llava chooses
    return DemoModel(tokenizer, model, processor, conv_mode, max_image_pixels)


def finish(demo: DemoModel, image, question, config, max_new_tokens: int = 6) -> tuple[DemoState, list[DemoState]]:
    states = list(run_request(demo, str(image) if image else None, question, config, 0.0, max_new_tokens))
    return states[-1], states


def control_values(controls, **chosen) -> list:
    return [chosen.get(control.key, control.default) for control in controls]


# ---- controls ---------------------------------------------------------------------------------------------------
def test_controls_come_from_the_registry_and_a_new_method_appears() -> None:
    base = PruningConfig()
    first_k = Param("web_first_k", int, 8, "patches kept", check=at_least(1))
    extra = (Param("web_note", str, "x", "a note"), Param("web_flag", bool, True, "a switch"))

    @register_vision_method("web_first", params=(first_k, *extra), description="The first web_first_k patches.")
    def first_patches(context) -> ReducedPatches:
        features = context.features()[:, 1:]
        keep = min(context.config.web_first_k, features.shape[1])
        indices = torch.arange(keep).expand(features.shape[0], keep)
        return ReducedPatches(features[:, :keep], torch.ones(features.shape[0], keep, dtype=torch.bool), indices)

    try:
        selectors, params = selector_controls(base), parameter_controls(base)
        assert [c.key for c in selectors] == [s.key for s in registry.SELECTORS]
        assert all(c.choices == registry.names(c.key) for c in selectors)
        flagged = [name for name, p in registry.parameters().items() if p.cli_flag]
        assert [c.key for c in params] == flagged  # every flag once, config-only keys (seed) left out
        kinds = {c.key: c.kind for c in params}
        assert kinds["alpha"] == "slider" and kinds["visual_topk"] == "number" and kinds["visual_score"] == "dropdown"
        assert (kinds["web_note"], kinds["web_flag"]) == ("text", "checkbox")

        control = next(c for c in params if c.key == "web_first_k")
        assert (control.kind, control.label, control.integer) == ("number", "--web-first-k", True)
        assert control.visible_for({"visual_pruning": "web_first"})
        assert not control.visible_for({"visual_pruning": "longtail"})
        controls = selectors + params
        config = config_from_values(
            base, controls, control_values(controls, visual_pruning="web_first", web_first_k=5.0)
        )
        assert (config.visual_pruning, config.web_first_k) == ("web_first", 5)
    finally:
        registry.unregister("visual_pruning", "web_first")
    assert "web_first" not in selector_controls(base)[0].choices


def test_control_values_are_checked_and_only_the_chosen_methods_read() -> None:
    base = PruningConfig(visual_layer=3)
    controls = selector_controls(base) + parameter_controls(base)
    with pytest.raises(PruningConfigError, match=r"visual_topk must be >= 1, got 0 \(--visual-tokens\)"):
        config_from_values(base, controls, control_values(controls, visual_pruning="topk", visual_topk=0))
    with pytest.raises(PruningConfigError, match=r"visual_topk must be an integer, got 2.5 \(--visual-tokens\)"):
        config_from_values(base, controls, control_values(controls, visual_pruning="topk", visual_topk=2.5))
    with pytest.raises(PruningConfigError, match=r"alpha must be a number, got 'abc' \(--alpha\)"):
        config_from_values(base, controls, control_values(controls, visual_pruning="longtail", alpha="abc"))
    # a bad value in a box the chosen method does not read is ignored; an emptied optional box means unset
    config = config_from_values(base, controls, control_values(controls, visual_pruning="longtail", visual_topk=0))
    assert (config.visual_pruning, config.visual_topk, config.visual_layer) == ("longtail", None, 3)
    with_topk = base.merged(visual_topk=64)
    values = control_values(controls, visual_pruning="ratio", visual_topk=None, visual_ratio=0.2)
    config = config_from_values(with_topk, controls, values)
    assert config.visual_topk is None
    values = control_values(controls, visual_pruning="topk", visual_topk=64, kv_pruning="h2o")
    config = config_from_values(base, controls, values)
    assert unpruned(config).describe() == "no pruning" and unpruned(config).visual_layer == 3


# ---- one request, LLaVA-1.5 -----------------------------------------------------------------------------------
def test_a_request_counts_what_run_llava_counts(tiny_ckpt, tiny_model, capsys, tmp_path) -> None:
    demo = demo_model(tiny_model, tiny_ckpt)
    image = tmp_path / "photo.png"
    random_image(3, (150, 100)).save(image)
    config = demo.model.pruning_config.merged(visual_pruning="longtail", kv_pruning="h2o")
    final, states = finish(demo, image, "What is in the image?", config)

    assert final.done and final.error is None and final.note is None
    text, stats = run_llava_answer(capsys, tiny_ckpt, image, "What is in the image?", "--max_new_tokens", "6",
                                   "--visual-pruning", "longtail", "--kv-pruning", "h2o")  # fmt: skip
    assert (final.pruned.text, final.pruned.stats) == (text, stats)
    text, stats = run_llava_answer(capsys, tiny_ckpt, image, "What is in the image?", "--max_new_tokens", "6")
    assert (final.plain.text, final.plain.stats) == (text, stats)

    # the picture shows the selection the answer used
    (view,) = final.views
    assert view.selected == final.pruned.stats["visual_after"] == len(view.shown) < view.candidates
    assert view.inflection == final.pruned.stats["inflection"] and view.curve.shape == (view.candidates,)
    picture = kept_picture(view, scale_to=view.view.width)
    cell = view.view.width // view.grid_side
    pruned = next(i for i in range(view.candidates) if i not in view.shown)
    for index, should_change in ((view.shown[0], False), (pruned, True)):
        row, col = divmod(index, view.grid_side)
        box = (col * cell, row * cell, (col + 1) * cell, (row + 1) * cell)
        assert (picture.crop(box).tobytes() != view.view.crop(box).tobytes()) == should_change
    table = counts_table(final.pruned, final.plain)
    assert f"| visual tokens after | {final.pruned.stats['visual_after']} | {stats['visual_after']} |" in table
    assert f"| final KV entries per layer | {final.pruned.stats['kv_final']} | {stats['kv_final']} |" in table


class SpacedDecode:
    """A tokenizer that decodes every token as a word of its own. The streamer hands on whole words only, and the
    tiny model's random tokens form none, so this makes each generated token visible as it comes."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        return "".join(self._tokenizer.decode([i], **kwargs) + " " for i in ids)


def test_answers_stream_while_they_are_generated(tiny_ckpt, tiny_model, tmp_path) -> None:
    tokenizer, model, processor, context = tiny_model
    demo = demo_model((SpacedDecode(tokenizer), model, processor, context), tiny_ckpt)
    image = tmp_path / "photo.png"
    random_image(3, (150, 100)).save(image)
    final, states = finish(demo, image, "What is in the image?", model.pruning_config.merged(visual_pruning="topk",
                                                                                         visual_topk=8))  # fmt: skip
    assert final.done and final.pruned.stats["generated"] >= 3
    before_stats = [s.pruned_text for s in states if s.pruned is None and s.pruned_text]
    assert len(set(before_stats)) >= 3  # the text grew token by token before the statistics arrived
    assert all(b.startswith(a) for a, b in zip(before_stats, before_stats[1:]))
    assert final.pruned_text == final.pruned.text  # the page ends on generate_answers' own text


def test_pictures_are_drawn_once_per_request() -> None:
    unchanged = object()
    page = PageUpdates(7, unchanged)
    config = PruningConfig()
    state = DemoState(config=config, step="answering")
    first = page.values(state)
    assert first[3] is None and first[0].endswith("(request 7)")  # no pictures yet: the last request's go
    state.pruned_text = "a"
    assert page.values(state)[3:6] == (unchanged, unchanged, unchanged)
    error = page.values(DemoState(config=config, error="no image"))
    assert error[0] == "**error:** no image (request 7)" and error[1:] == ("", "", None, None, "", "", "")


def test_bad_input_ends_with_a_message_and_the_next_request_runs(tiny_ckpt, tiny_model, tmp_path) -> None:
    demo = demo_model(tiny_model, tiny_ckpt, max_image_pixels=200 * 200)
    good = tmp_path / "good.png"
    random_image(1, (150, 100)).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot an image at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:300])
    large = tmp_path / "large.png"
    Image.new("RGB", (400, 300)).save(large)
    config = demo.model.pruning_config.merged(visual_pruning="longtail")
    cases = [
        (None, "What?", config, "no image: upload one or pick an example"),
        (corrupt, "What?", config, "the file is not an image that can be read"),
        (truncated, "What?", config, "the image file is damaged"),
        (large, "What?", config, "400 x 300 = 120,000 pixels, this server accepts at most 40,000 (--max-image-pixels)"),
        (good, "  ", config, "no question"),
        (good, "What?", config.merged(visual_pruning="tome", visual_topk=2), "visual_topk 2 is out of reach"),
        (good, "What?", config.merged(visual_layer=99), "visual_layer 99 needs encoder.layers[99]"),
    ]
    for image, question, settings, message in cases:
        final, _ = finish(demo, image, question, settings)
        assert final.error is not None and message in final.error, (image, final.error)
        assert "Traceback" not in final.error and "internal error" not in final.error
    final, _ = finish(demo, good, "What?", config)
    assert final.done
    with pytest.raises(ValueError, match="no image"):
        check_image("", 10)


# ---- LLaVA-1.6: per crop ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny16(tmp_path_factory) -> Path:
    return write_tiny_llava_next(tmp_path_factory.mktemp("web16") / "llava-v1.6-mistral-7b-tiny", llm="mistral")


def test_llava16_pictures_are_per_crop_and_match_the_answer(tiny16, capsys, tmp_path) -> None:
    from llava.model.builder import load_pretrained_model

    demo = demo_model(load_pretrained_model(str(tiny16), None, None, device="cpu"), tiny16)
    image = tmp_path / "wide.png"
    random_image(5, (420, 60)).save(image)  # a 3 x 1 grid, padding above and below
    base = demo.model.pruning_config
    settings = {
        "longtail": base.merged(visual_pruning="longtail"),
        "global": base.merged(visual_pruning="longtail", crop_budget="global"),
        "random": base.merged(visual_pruning="random", visual_topk=10),
        "prumerge": base.merged(visual_pruning="prumerge"),
    }
    for name, config in settings.items():
        final, _ = finish(demo, image, "What is this?", config, max_new_tokens=3)
        stats = final.pruned.stats
        assert final.done and final.note is None, (name, final.note)
        assert [v.title for v in final.views] == ["base view"] + [f"crop row 1, column {c}" for c in (1, 2, 3)]
        assert [v.selected for v in final.views] == stats["crop_kept"]
        assert all(v.candidates < v.grid_side**2 for v in final.views[1:])  # unpad: only the image's rows compete
        assert all(set(v.shown) <= set(range(v.grid_side**2)) for v in final.views)
        if name == "longtail":
            _, expected = run_llava_answer(capsys, tiny16, image, "What is this?", "--max_new_tokens", "3",
                                           "--visual-pruning", "longtail")  # fmt: skip
            assert stats == expected
            assert [v.inflection for v in final.views] == stats["crop_inflection"]
            assert all(v.curve is not None and v.curve.shape == (v.candidates,) for v in final.views)
        if name == "random":  # the same draw for the picture, the answer and the next request
            again, _ = finish(demo, image, "What is this?", config, max_new_tokens=3)
            assert [v.shown for v in again.views] == [v.shown for v in final.views]
        if name == "prumerge":
            assert all(v.curve is None for v in final.views) and curves_layout(final.views) is None
    # the page's picture: the base view, then the three grid crops side by side as they lie in the image
    base, crop = kept_picture(final.views[0]), kept_picture(final.views[1])
    assert kept_layout(final.views).size == (base.width + 16 + 3 * crop.width + 4, max(base.height, crop.height))


@pytest.mark.parametrize("family", ["internvl2", "phi3v"])
def test_other_families_answer_and_count_without_pictures(family, capsys, tmp_path) -> None:
    from llava.model.builder import load_pretrained_model
    from llava.testing.tiny_internvl import write_tiny_internvl
    from llava.testing.tiny_phi3v import write_tiny_phi3v

    writer = {"internvl2": write_tiny_internvl, "phi3v": write_tiny_phi3v}[family]
    checkpoint = writer(tmp_path / f"{family}-tiny")
    demo = demo_model(load_pretrained_model(str(checkpoint), None, None, device="cpu"), checkpoint)
    config = demo.model.pruning_config.merged(visual_pruning="topk", visual_topk=8)
    final, _ = finish(demo, TRIANGLE, "What is this?", config, max_new_tokens=3)
    assert final.done and final.views == [] and not demo.draws_patches
    _, stats = run_llava_answer(capsys, checkpoint, TRIANGLE, "What is this?", "--max_new_tokens", "3",
                                "--visual-pruning", "topk", "--visual-tokens", "8")  # fmt: skip
    assert final.pruned.stats == stats


# ---- the page in a browser ----------------------------------------------------------------------------------------
CHROMIUM = os.environ.get("LLAVA_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with status {process.returncode}:\n{process.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"the server did not answer at {url} within {timeout} s")


@pytest.fixture(scope="module")
def server():
    """The demo server on the demo checkpoint, on a free loopback port, with a small image limit for the test."""
    port = free_port()
    command = [sys.executable, "-m", "llava.serve.gradio_web_server", "--port", str(port)]
    command += ["--max-image-pixels", "200000"]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, process)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_request(page, number: int) -> str:
    """The status line once request ``number`` has finished (done or an error)."""
    page.wait_for_function(
        """n => { const t = document.querySelector('#status').innerText.trim();
                  return t.includes(`(request ${n})`) && (t.startsWith('done') || t.startsWith('error')); }""",
        arg=number,
        timeout=60_000,
    )
    return page.inner_text("#status").strip()


def choose(page, selector: str, method: str) -> None:
    """Pick ``method`` in the dropdown of ``--<selector>``."""
    page.click(f"#control-{selector} input")
    page.get_by_role("option", name=method, exact=True).click()


def table_rows(page) -> dict[str, list[str]]:
    rows = page.locator("#token-counts tr").all_inner_texts()
    return {cells[0]: cells[1:] for cells in (row.split("\t") for row in rows) if cells}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_the_page_in_chromium(server, capsys, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    url, process = server
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot an image at all" * 8)
    large = tmp_path / "large.png"
    Image.new("RGB", (600, 400), (30, 160, 40)).save(large)  # 240,000 pixels, the server takes 200,000
    text, stats = run_llava_answer(capsys, DEMO, TRIANGLE, QUESTION, "--visual-pruning", "longtail",
                                   "--kv-pruning", "h2o")  # fmt: skip
    _, topk_stats = run_llava_answer(capsys, DEMO, TRIANGLE, QUESTION, "--visual-pruning", "topk",
                                     "--visual-tokens", "64")  # fmt: skip

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.goto(url)
            page.fill("#question textarea", QUESTION)
            page.click("#run")  # no image yet
            assert wait_for_request(page, 1) == "error: no image: upload one or pick an example (request 1)"

            page.set_input_files("#image-file input[type=file]", str(corrupt))
            page.wait_for_function("document.querySelector('#status').innerText.includes('not an image')")
            page.click("#run")
            assert "error: the file is not an image that can be read" in wait_for_request(page, 2)

            page.click("#image-file button[aria-label='Clear']")
            page.set_input_files("#image-file input[type=file]", str(large))
            page.wait_for_function("document.querySelector('#status').innerText.includes('too large')")
            page.click("#run")
            assert "600 x 400 = 240,000 pixels, this server accepts at most 200,000" in wait_for_request(page, 3)

            # a bundled example image, the page's starting method (the paper's stage 1 at the checkpoint's alpha),
            # stage 2 switched on
            page.click("#image-file button[aria-label='Clear']")
            page.set_input_files("#image-file input[type=file]", str(TRIANGLE))
            page.wait_for_selector("#image-preview img")
            choose(page, "kv-pruning", "h2o")
            page.wait_for_selector("#control-heavy-ratio", state="visible")
            page.click("#run")
            status = wait_for_request(page, 4)
            assert status.startswith("done") and "visual=longtail(alpha=0.24, layer 3), kv=h2o" in status
            assert page.input_value("#answer-pruned textarea") == text == "green"
            assert page.input_value("#answer-plain textarea")
            assert page.locator("#kept-patches img").count() == 1 and page.locator("#cls-curve img").count() == 1
            assert "image: 96 tokens kept from 576 patches, i* = 23" in page.inner_text("#kept-notes")
            shown = json.loads(page.inner_text("#token-stats .cm-content"))
            assert shown["with_pruning"] == stats
            rows = table_rows(page)
            assert rows["visual tokens before"][0] == str(stats["visual_before"])
            assert rows["visual tokens after"][0] == str(stats["visual_after"])
            assert rows["prompt tokens P"][0] == str(stats["prompt"])
            assert rows["final KV entries per layer"][0] == str(stats["kv_final"])
            assert float(rows["time (s)"][0]) >= 0

            # a fixed budget: an invalid one is refused in the page, a valid one runs
            choose(page, "kv-pruning", "none")
            choose(page, "visual-pruning", "topk")
            page.wait_for_selector("#control-visual-topk", state="visible")
            assert not page.is_visible("#control-alpha")
            budget = page.locator("#control-visual-topk").locator("input, textarea")
            budget.fill("0")
            budget.press("Tab")
            page.click("#run")
            assert wait_for_request(page, 5) == "error: visual_topk must be >= 1, got 0 (--visual-tokens) (request 5)"
            budget.fill("64")
            budget.press("Tab")
            page.click("#run")
            assert wait_for_request(page, 6).startswith("done")
            assert json.loads(page.inner_text("#token-stats .cm-content"))["with_pruning"] == topk_stats
        finally:
            browser.close()
    assert process.poll() is None  # the server kept serving through every bad request

"""A web page that shows what pruning keeps: upload or pick an image, ask a question, choose the pruning method and its
settings, and see side by side the answer with and without pruning, the image with the pruned patches greyed out
(per crop for LLaVA-1.6), the sorted CLS curve with i* and k marked, and the token counts and times.

    python -m llava.serve.gradio_web_server                       # the bundled demo checkpoint, http://127.0.0.1:7860
    python -m llava.serve.gradio_web_server --model-path liuhaotian/llava-v1.5-7b --port 8000

One process loads the model and serves the page (upstream ran a controller, model workers and this server; see
docs/web_demo.md for why one process is enough here). The pruning flags set the page's starting values; the
method list and every parameter control come from the method registry. Needs the [serve] extra (gradio).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from llava.conversation import conv_templates
from llava.mm_utils import get_model_name_from_path
from llava.serve.controls import Control, config_from_values, method_summary, parameter_controls, selector_controls
from llava.serve.demo_session import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DemoInputError,
    DemoModel,
    DemoState,
    check_image,
    counts_table,
    run_request,
)
from llava.serve.pruning_view import curves_layout, kept_layout
from llava.utils import (
    add_model_args,
    check_before_loading,
    default_conv_mode,
    load_from_args,
    quiet_transformers,
    run_entry_point,
)
from pruning import PruningConfig, PruningConfigError, add_pruning_args, pruning_overrides

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "playground" / "checkpoints" / "llava-v1.5-demo"
EXAMPLE_IMAGES = REPO / "playground" / "demo" / "images"
SHORT = "\nAnswer the question using a single word or phrase."
# questions of the kinds the demo checkpoint was trained on (docs/demo.md); other images get OTHER_QUESTION
EXAMPLE_QUESTIONS = {
    "green_triangle.png": "What colour is the triangle?" + SHORT,
    "red_circle_blue_square.png": "What shape is the blue object?" + SHORT,
    "three_dots.png": "Is there a red circle in the image?" + SHORT,
    "wide_banner.png": "Is there a red circle in the image?" + SHORT,
}
OTHER_QUESTION = "Describe the image."
MAX_UPLOAD = "50mb"  # gradio refuses larger uploads before they reach the model; --max-image-pixels checks the rest

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, require_model_path=False)
    parser.set_defaults(model_path=str(DEMO_MODEL))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: as run_llava chooses)")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"refuse larger uploads, width x height (default {DEFAULT_MAX_IMAGE_PIXELS:,})",
    )
    parser.add_argument(
        "--examples-dir", default=str(EXAMPLE_IMAGES), help="images offered as examples (default: the bundled ones)"
    )
    add_pruning_args(parser)  # the page's starting values
    args = parser.parse_args(argv)
    if args.max_image_pixels < 1:
        parser.error(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    if args.conv_mode is not None and args.conv_mode not in conv_templates:
        parser.error(f"unknown --conv-mode {args.conv_mode!r}; choose one of {', '.join(conv_templates)}")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    return args


def starting_config(model_config: PruningConfig, overrides: dict[str, Any]) -> PruningConfig:
    """The page's first settings: the checkpoint's, the flags given, and the paper's stage 1 where neither chose a
    vision-side method (the point of the page is to show what pruning keeps)."""
    if "visual_pruning" not in overrides and not model_config.visual_enabled:
        return model_config.merged(visual_pruning="longtail")
    return model_config


def examples(folder: str) -> list[list[str]]:
    """[image path, question] rows for the images in ``folder`` (none when it does not exist)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    return [[str(path), EXAMPLE_QUESTIONS.get(path.name, OTHER_QUESTION)] for path in images]


# ---- the page -------------------------------------------------------------------------------------------------
OUTPUTS = ("status", "answer_pruned", "answer_plain", "kept", "curves", "notes", "counts", "stats")


class PageUpdates:
    """One request's states as the values of OUTPUTS, in that order. The pictures are drawn once, when stage 1 has
    run, and sent once (``unchanged`` afterwards, gradio's skip marker), not again with every streamed token.
    Every status line ends with the request's number, so a reader (or a test) sees which click it answers."""

    def __init__(self, number: int, unchanged: Any) -> None:
        self.number = number
        self.unchanged = unchanged
        self.drawn: list | None = None  # the views whose pictures were sent

    def values(self, state: DemoState) -> tuple[Any, ...]:
        tag = f"(request {self.number})"
        if state.error is not None:
            return (f"**error:** {state.error} {tag}", "", "", None, None, "", "", "")
        kept = curves = notes = self.unchanged
        if self.drawn is not state.views:
            self.drawn = state.views
            kept = kept_layout(state.views) if state.views else None
            curves = curves_layout(state.views) if state.views else None
            notes = "\n".join(f"- {view.caption}" for view in state.views)
            if state.views and curves is None:
                notes += f"\n\n`{state.config.visual_pruning}` computes no CLS curve with an inflection point."
        status = f"**{state.step}** — {state.config.describe()} {tag}"
        if state.note:
            status += f"\n\n**warning:** {state.note}"
        stats = ""
        if state.pruned is not None:
            runs = {"with_pruning": state.pruned.stats}
            if state.plain is not None:
                runs["without_pruning"] = state.plain.stats
            # one line per run, each as run_llava --show-tokens prints it
            stats = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in runs.items()) + "\n}"
        return (
            status,
            state.pruned_text,
            state.plain_text,
            kept,
            curves,
            notes,
            counts_table(state.pruned, state.plain),
            stats,
        )


def build_page(demo: DemoModel, initial: PruningConfig, example_rows: list[list[str]]):
    """The gradio Blocks of the demo (not launched)."""
    import gradio as gr

    selectors = selector_controls(initial)
    params = parameter_controls(initial)
    controls = selectors + params
    chosen = {c.key: c.default for c in selectors}

    with gr.Blocks(title="LLaVA-LongTail: what pruning keeps") as page:
        gr.Markdown(
            "## What pruning keeps\nUpload an image (or pick an example), ask a question, choose a method. The page "
            "shows the answer with and without pruning, the patches that reach the LLM, the sorted CLS curve with "
            "the inflection point i* and the kept count k, and the token counts."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image_file = gr.File(label="image", file_types=["image"], type="filepath", elem_id="image-file")
                preview = gr.Image(label="uploaded image", interactive=False, height=180, elem_id="image-preview")
                question = gr.Textbox(label="question", lines=2, elem_id="question")
                run = gr.Button("Run", variant="primary", elem_id="run")
                if example_rows:
                    gr.Examples(example_rows, inputs=[image_file, question], label="examples")
            with gr.Column(scale=1):
                components, summaries = [], []
                for control in selectors:
                    components.append(_component(gr, control, True))
                    summaries.append(gr.Markdown(method_summary(control.key, control.default)))
                with gr.Accordion("method parameters", open=True):
                    components += [_component(gr, control, control.visible_for(chosen)) for control in params]
                with gr.Accordion("generation", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="temperature", elem_id="temperature")
                    max_new_tokens = gr.Number(value=512, precision=0, label="max new tokens", elem_id="max-new-tokens")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            answer_pruned = gr.Textbox(label="answer with pruning", lines=2, elem_id="answer-pruned")
            answer_plain = gr.Textbox(label="answer without pruning", lines=2, elem_id="answer-plain")
        with gr.Row():
            picture = {"format": "png", "interactive": False, "height": 420}
            kept = gr.Image(label="kept patches (pruned ones greyed out)", elem_id="kept-patches", **picture)
            curves = gr.Image(label="sorted CLS similarity, i* and k", elem_id="cls-curve", **picture)
        notes = gr.Markdown(elem_id="kept-notes")
        with gr.Row():
            counts = gr.Markdown(elem_id="token-counts")
            stats = gr.Code(
                label="token statistics (as run_llava --show-tokens prints them)",
                language="json",
                wrap_lines=True,
                elem_id="token-stats",
            )

        outputs = [status, answer_pruned, answer_plain, kept, curves, notes, counts, stats]
        selector_components = components[: len(selectors)]

        def show_methods(*names: str) -> list[Any]:
            now = {c.key: name for c, name in zip(selectors, names)}
            visibility = [gr.update(visible=c.visible_for(now)) for c in params]
            texts = [method_summary(c.key, name) if name else "" for c, name in zip(selectors, names)]
            return visibility + texts

        for component in selector_components:
            component.change(show_methods, selector_components, components[len(selectors) :] + summaries)

        def show_preview(path: str | None):
            if not path:
                return None, ""
            try:
                return check_image(path, demo.max_image_pixels), ""
            except DemoInputError as err:
                return None, f"**error:** {err}"

        image_file.change(show_preview, image_file, [preview, status])

        requests = gr.State(0)

        def answer(count, path, text, temp, new_tokens, *values):
            page = PageUpdates(count + 1, gr.skip())
            try:
                config = config_from_values(initial, controls, list(values))
            except PruningConfigError as err:
                yield (*page.values(DemoState(config=initial, error=str(err))), page.number)
                return
            for state in run_request(demo, path, text, config, temp, new_tokens):
                yield (*page.values(state), page.number)

        inputs = [requests, image_file, question, temperature, max_new_tokens, *components]
        run.click(answer, inputs, [*outputs, requests])
        question.submit(answer, inputs, [*outputs, requests])
    return page


def _component(gr, control: Control, visible: bool):
    common = {"label": control.label, "info": control.info, "elem_id": control.elem_id, "visible": visible}
    if control.kind in ("method", "dropdown"):
        return gr.Dropdown(choices=list(control.choices), value=control.default, **common)
    if control.kind == "checkbox":
        return gr.Checkbox(value=control.default, **common)
    if control.kind == "text":
        return gr.Textbox(value=control.default, **common)
    if control.kind == "number" and control.optional:  # gradio's number box sends 0 when left empty
        value = "" if control.default is None else str(control.default)
        return gr.Textbox(value=value, placeholder="unset", **common)
    if control.kind == "slider":
        low, high, step = control.bounds
        return gr.Slider(low, high, value=control.default, step=step, **common)
    return gr.Number(value=control.default, precision=0 if control.integer else None, **common)


def serve(args: argparse.Namespace) -> None:
    if find_spec("gradio") is None:
        raise SystemExit(
            "error: the web demo needs gradio, from the [serve] extra: pip install -e '.[serve]' -c torch-constraint.txt"
        )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the page works offline
    overrides = pruning_overrides(args)
    check_before_loading(args, overrides)  # bad settings fail here, not after the model loaded
    quiet_transformers()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    tokenizer, model, processor, _ = load_from_args(args, overrides)
    conv_mode = args.conv_mode or default_conv_mode(get_model_name_from_path(args.model_path), model.config)
    demo = DemoModel(tokenizer, model, processor, conv_mode, args.max_image_pixels)
    initial = starting_config(model.pruning_config, overrides)
    page = build_page(demo, initial, examples(args.examples_dir))
    print(f"model: {args.model_path} ({conv_mode}); open http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    page.queue(default_concurrency_limit=1)  # one model, one request at a time; the rest wait in the queue
    page.launch(
        server_name=args.host,
        server_port=args.port,
        max_file_size=MAX_UPLOAD,
        ssr_mode=False,
        show_error=False,
        quiet=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Bad settings or a missing checkpoint end with one ``error:`` line and status 2, before the page starts."""
    run_entry_point(lambda args: serve(parse_args(args)), argv)


if __name__ == "__main__":
    main()

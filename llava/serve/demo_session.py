"""One request of the web demo, without the web: check the image and the question, draw what stage 1 keeps, stream
the answer with the chosen pruning and then without, and count the tokens of both.

The answers go through ``llava.inference.build_prompt`` and ``generate_answers``, exactly as ``llava.eval.run_llava``
does (same default conversation mode), so the token statistics are the ones ``run_llava --show-tokens`` prints for
the same image, question and settings. ``run_request`` yields a ``DemoState`` after every step and every streamed
piece of text; a user's mistake ends the run with ``DemoState.error`` set, never with an exception.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image, UnidentifiedImageError
from transformers import TextIteratorStreamer

from llava.inference import build_prompt, generate_answers, image_questions
from llava.mm_utils import load_image
from llava.model.anyres import AnyresInputError
from llava.model.llava_arch import MultimodalInputError
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from llava.serve.controls import unpruned
from llava.serve.pruning_view import CropView, check_against_stats, crop_views, reset_random_draw
from llava.utils import user_errors
from pruning import PruningConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class DemoInputError(ValueError):
    """A request the demo cannot run (no image, an unreadable or too large image, no question); shown in the page."""


@dataclass
class DemoModel:
    """A loaded checkpoint and what every request shares."""

    tokenizer: Any
    model: Any
    processor: Any
    conv_mode: str
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @property
    def draws_patches(self) -> bool:
        """Kept-patch pictures and curves need LLaVA's CLIP tower; other families show answers and counts only."""
        tower = getattr(self.model, "get_vision_tower", None)
        return tower is not None and isinstance(tower(), CLIPVisionTower)


@dataclass
class AnswerRun:
    text: str
    stats: dict[str, Any]
    seconds: float


@dataclass
class DemoState:
    """What the page shows at one moment of a request."""

    config: PruningConfig
    step: str = ""
    error: str | None = None
    note: str | None = None
    views: list[CropView] = field(default_factory=list)
    pruned_text: str = ""
    plain_text: str = ""
    pruned: AnswerRun | None = None
    plain: AnswerRun | None = None

    @property
    def done(self) -> bool:
        return self.error is None and self.plain is not None


def demo_errors() -> tuple[type[Exception], ...]:
    """Mistakes in a request, as opposed to bugs: their message goes to the page as it is."""
    return (*user_errors(), DemoInputError, AnyresInputError, MultimodalInputError)


def check_image(path: str | None, max_pixels: int) -> Image.Image:
    """The uploaded image as RGB, or a ``DemoInputError`` that says what is wrong with it. The size is read from the
    file's header before any pixel is decoded, so a huge image is refused without filling the memory."""
    if not path:
        raise DemoInputError("no image: upload one or pick an example")
    try:
        with Image.open(path) as header:
            width, height = header.size
    except Image.DecompressionBombError:
        raise DemoInputError(f"the image is too large to open safely (more than {max_pixels:,} pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise DemoInputError("the file is not an image that can be read (PNG, JPEG, WebP, ...)") from None
    if width * height > max_pixels:
        raise DemoInputError(
            f"the image is too large: {width} x {height} = {width * height:,} pixels, this server accepts at most "
            f"{max_pixels:,} (--max-image-pixels)"
        )
    try:
        return load_image(path)  # decodes every pixel: a truncated file fails here
    except user_errors():
        raise DemoInputError("the image file is damaged: its pixels cannot be decoded") from None


def stream_answer(
    demo: DemoModel,
    prompt: str,
    image: Image.Image,
    config: PruningConfig,
    temperature: float,
    max_new_tokens: int,
) -> Iterator[str | AnswerRun]:
    """Yield the answer's text as it grows, then the finished ``AnswerRun`` (text, token statistics, seconds).

    ``generate_answers`` runs in a thread and feeds a streamer; an error there is raised here."""
    streamer = TextIteratorStreamer(demo.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outcome: dict[str, Any] = {}

    def generate() -> None:
        start = time.perf_counter()
        try:
            reset_random_draw(demo.model, config)  # the 'random' rule draws what the pictures show
            outcome["answer"] = generate_answers(
                demo.model,
                demo.tokenizer,
                demo.processor,
                [prompt],
                [image],
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                pruning=config,
                generate_kwargs={"streamer": streamer},
            )[0]
        except Exception as err:  # re-raised in the request's thread, which reports it
            outcome["error"] = err
            streamer.end()  # generate never started or stopped half-way: release the reader
        outcome["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=generate, name="demo-generate", daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        if piece:
            text += piece
            yield text
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    answer = outcome["answer"]
    yield AnswerRun(answer.text, answer.token_stats, outcome["seconds"])


def run_request(
    demo: DemoModel,
    image_path: str | None,
    question: str | None,
    config: PruningConfig,
    temperature: float = 0.0,
    max_new_tokens: int = 512,
) -> Iterator[DemoState]:
    """Run one request and yield the page's state after each step; errors end it with ``error`` set."""
    state = DemoState(config=config, step="checking the image")
    try:
        image = check_image(image_path, demo.max_image_pixels)
        if not question or not question.strip():
            raise DemoInputError("no question: type one")
        if not 0 <= temperature <= 2:
            raise DemoInputError(f"temperature must be in [0, 2], got {temperature}")
        if max_new_tokens is None or not 1 <= max_new_tokens <= 4096 or int(max_new_tokens) != max_new_tokens:
            raise DemoInputError(f"max new tokens must be an integer in [1, 4096], got {max_new_tokens}")
        max_new_tokens = int(max_new_tokens)
        prompt = build_prompt(question, demo.conv_mode, num_images=1, model_config=demo.model.config)
        if demo.draws_patches:
            state = replace(state, step="stage 1: scoring the patches")
            yield state
            state.views = crop_views(demo.model, demo.processor, image, image_questions(prompt)[0], config)
        state = replace(state, step=f"answering with pruning ({config.describe()})")
        yield state
        for part in stream_answer(demo, prompt, image, config, temperature, max_new_tokens):
            if isinstance(part, AnswerRun):
                state = replace(state, pruned=part, pruned_text=part.text)
            else:
                state = replace(state, pruned_text=part)
            yield state
        if state.views:
            state.note = check_against_stats(state.views, state.pruned.stats)
        state = replace(state, step="answering without pruning")
        yield state
        for part in stream_answer(demo, prompt, image, unpruned(config), temperature, max_new_tokens):
            if isinstance(part, AnswerRun):
                state = replace(state, plain=part, plain_text=part.text)
            else:
                state = replace(state, plain_text=part)
            yield state
        yield replace(state, step="done")
    except demo_errors() as err:
        yield replace(state, error=str(err))
    except ValueError as err:  # e.g. a setting the model refuses while generating; the message names it
        logger.warning("request refused: %s", err)
        yield replace(state, error=str(err))
    except Exception as err:  # a bug: the page says so, the log has the traceback, the server goes on
        logger.exception("request failed")
        yield replace(state, error=f"internal error ({type(err).__name__}: {err}); the server log has the details")


STAT_ROWS = (
    ("visual_before", "visual tokens before"),
    ("visual_after", "visual tokens after"),
    ("inflection", "i* (inflection point)"),
    ("crop_kept", "kept per crop"),
    ("prompt", "prompt tokens P"),
    ("generated", "generated tokens"),
    ("kv_final", "final KV entries per layer"),
    ("visual_per_layer", "visual tokens per LLM layer"),
)


def counts_table(pruned: AnswerRun | None, plain: AnswerRun | None) -> str:
    """The token counts of both runs as a Markdown table (the rows the statistics have), with the time."""
    runs = [run for run in (pruned, plain) if run is not None]
    if not runs:
        return ""
    header = "| | with pruning | without pruning |\n|---|---:|---:|"
    lines = [header]
    for key, label in STAT_ROWS:
        if any(key in run.stats for run in runs):
            cells = [_cell(run.stats.get(key)) if run else "" for run in (pruned, plain)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    times = [f"{run.seconds:.2f}" if run else "" for run in (pruned, plain)]
    lines.append("| time (s) | " + " | ".join(times) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value)

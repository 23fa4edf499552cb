"""Prefill and decode times of the comparison's rows, side by side in one process (``python -m eval.tools.compare``).

The prompts are real benchmark questions (the first ones about distinct images), built exactly as
``llava.inference.generate_answers`` builds them (template, tokenizer, left padding, the checkpoint's image
preprocessing, each image's question for text-guided methods), once, outside the timed calls. Each timed call is
one ``model.generate`` with exactly ``new_tokens`` new tokens; a logits processor stamps the clock after every
forward: prefill = call start to the first logits (tower, projector, merge and LLM prefill), decode = the mean time
per later token. Within every repeat the rows run one after another (in reverse order on odd repeats), so drift on a
shared machine hits them alike; each figure is the median over repeats. Batch 1 is each speed question alone
(the mean over them), the batch is all of them together: left-padded, and where their prompts differ in length the
language model's prefill runs packed (``generate``'s default, the model config's ``packed_prefill``).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessorList

from eval.tools.speed import StepClock, device_sync
from llava.constants import IMAGE_TOKEN_INDEX
from llava.inference import build_prompt, image_questions, left_pad, pad_token_id
from llava.mm_utils import process_images, tokenizer_image_token
from pruning import PruningConfig

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Inputs:
    """One batch, ready for ``model.generate``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: Any
    image_sizes: list[tuple[int, int]]
    image_texts: list[str]
    pad_id: int


def build_inputs(
    model, tokenizer, processor, conv_mode: str, texts: Sequence[str], images: Sequence[Image.Image]
) -> Inputs:
    prompts = [build_prompt(text, conv_mode, num_images=1, model_config=model.config) for text in texts]
    ids = [tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX) for prompt in prompts]
    pad = pad_token_id(tokenizer)
    input_ids, attention_mask = left_pad(ids, pad)
    pixels = process_images(list(images), processor, model.config)
    if isinstance(pixels, list):
        pixels = [p.to(device=model.device, dtype=model.dtype) for p in pixels]
    else:
        pixels = pixels.to(device=model.device, dtype=model.dtype)
    questions = [question for prompt in prompts for question in image_questions(prompt)]
    return Inputs(
        input_ids.to(model.device), attention_mask.to(model.device), pixels, [im.size for im in images], questions, pad
    )


def time_call(
    model, inputs: Inputs, config: PruningConfig, new_tokens: int, clock: Callable[[], float]
) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) of one generate call."""
    sync = device_sync(model.device)
    stamps = StepClock(sync, clock)
    sync()
    start = clock()
    model.generate(
        inputs.input_ids,
        attention_mask=inputs.attention_mask,
        images=inputs.pixel_values,
        image_sizes=inputs.image_sizes,
        image_texts=inputs.image_texts,
        pruning=config,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=inputs.pad_id,
        logits_processor=LogitsProcessorList([stamps]),
    )
    marks = stamps.marks
    if len(marks) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} decoding steps, saw {len(marks)} ({config.describe()})")
    return marks[0] - start, (marks[-1] - marks[0]) / max(1, new_tokens - 1)


def measure(
    model,
    singles: Sequence[Inputs],
    batch: Inputs,
    configs: Mapping[str, PruningConfig],
    repeats: int,
    warmup: int,
    new_tokens: int,
    clock: Callable[[], float],
    errors: tuple[type[Exception], ...] = (ValueError,),
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str]]:
    """({row: {"1" | "batch": {"prefill_s", "decode_s"}}}, {row: error}) for every config; a config that fails on
    these inputs (one of ``errors``: a setting the model refuses) gets its message instead of times."""
    failed: dict[str, str] = {}
    names = list(configs)
    with torch.inference_mode():
        for name in names:
            try:
                for _ in range(warmup):
                    time_call(model, batch, configs[name], new_tokens, clock)
                    time_call(model, singles[0], configs[name], new_tokens, clock)
            except errors as err:
                failed[name] = str(err).splitlines()[0]
        runs: dict[str, dict[str, list[tuple[float, float]]]] = {name: {"batch": [], "1": []} for name in names}
        alive = [name for name in names if name not in failed]
        for repeat in range(repeats):
            order = alive if repeat % 2 == 0 else alive[::-1]
            for name in order:
                runs[name]["batch"].append(time_call(model, batch, configs[name], new_tokens, clock))
                singles_times = [time_call(model, one, configs[name], new_tokens, clock) for one in singles]
                runs[name]["1"].append(
                    (statistics.fmean(t[0] for t in singles_times), statistics.fmean(t[1] for t in singles_times))
                )
            log(f"speed: repeat {repeat + 1}/{repeats} done ({len(alive)} rows)")
    out = {
        name: {
            key: {
                "prefill_s": statistics.median(t[0] for t in times),
                "decode_s": statistics.median(t[1] for t in times),
            }
            for key, times in runs[name].items()
        }
        for name in alive
    }
    return out, failed

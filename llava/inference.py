"""Batched inference: prompts + images in, answers + per-sample token statistics out.

Batches are left-padded with per-sample attention masks, so greedy answers equal batch-size-1 answers (tested);
when the samples differ in length the language model's prefill runs packed (llava/model/generation.py), so a batch
computes only its real tokens. ``group_size`` encodes a window of requests first and answers them in batches of
similar length. Every runner (run_llava, cli, the benchmark runners) goes through `generate_answers`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from PIL import Image

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
)
from llava.conversation import SeparatorStyle, conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from pruning import PruningConfig


@dataclass
class Answer:
    text: str
    token_stats: dict[str, Any] = field(default_factory=dict)


def image_token_text(model_config) -> str:
    if getattr(model_config, "mm_use_im_start_end", False):
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return DEFAULT_IMAGE_TOKEN


def build_prompt(question: str, conv_mode: str, num_images: int = 1, model_config=None) -> str:
    """One user turn wrapped in the conversation template, with ``<image>`` in front as upstream's runners do.

    An ``<image-placeholder>`` in the question marks where the image goes instead (upstream run_llava).
    """
    if conv_mode not in conv_templates:
        raise ValueError(f"unknown --conv-mode {conv_mode!r}; choose one of {', '.join(sorted(conv_templates))}")
    image_text = image_token_text(model_config)
    question = question.replace(DEFAULT_IMAGE_TOKEN, "").strip() if num_images == 0 else question
    if num_images and IMAGE_PLACEHOLDER in question:
        question = question.replace(IMAGE_PLACEHOLDER, image_text)
    elif num_images and DEFAULT_IMAGE_TOKEN not in question:
        question = "\n".join([image_text] * num_images) + "\n" + question
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def image_questions(prompt: str) -> list[str]:
    """The question each ``<image>`` of a full prompt is asked with, for text-guided vision-side methods: the first
    non-empty line of the user message that holds the image (its text between the chat template's markers around
    the tag), image tags removed: for ``USER: <image>``, ``Is there a dog?``, ``Answer with one word. ASSISTANT:`` on
    three lines, ``Is there a dog?``. Recoverable Compression's official code embeds the first line of the whole
    decoded prompt instead, which on LLaVA's templates is the system prompt (docs/baselines.md)."""
    markers = [(m.start(), m.end()) for m in _template_markers().finditer(prompt)]
    questions = []
    for tag in re.finditer(re.escape(DEFAULT_IMAGE_TOKEN), prompt):
        start = max((end for begin, end in markers if end <= tag.start()), default=0)
        stop = min((begin for begin, end in markers if begin >= tag.end()), default=len(prompt))
        message = prompt[start:stop]
        for token in (DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN):
            message = message.replace(token, "")
        questions.append(next((" ".join(line.split()) for line in message.splitlines() if line.strip()), ""))
    return questions


@cache
def _template_markers() -> re.Pattern:
    """Role and separator strings of every conversation template (``USER:``, ``###``, ``[/INST]``, ``<|im_end|>``)."""
    markers = {"[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"}
    for conv in conv_templates.values():
        colon = ":" if conv.sep_style in (SeparatorStyle.SINGLE, SeparatorStyle.TWO) else ""
        markers.update(role + colon for role in conv.roles if role.strip())
        markers.update(sep.strip() for sep in (conv.sep, conv.sep2) if sep and sep.strip())
    return re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and attention mask, padded on the left (what batched generation needs)."""
    longest = max(len(tokens) for tokens in token_lists)
    ids = torch.full((len(token_lists), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), longest), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, longest - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[row, longest - len(tokens) :] = 1
    return ids, mask


def pad_token_id(tokenizer) -> int:
    """Upstream v1 batches padded with unk (id 0 for Llama)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.unk_token_id is not None:
        return tokenizer.unk_token_id
    return 0


def generate_answers(
    model,
    tokenizer,
    image_processor,
    prompts: list[str],
    images: list[Image.Image | list[Image.Image] | None],
    temperature: float = 0.0,
    top_p: float | None = None,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    pruning: PruningConfig | None = None,
    seed: int | None = None,
    generate_kwargs: dict[str, Any] | None = None,
    packed_prefill: bool | None = None,
    group_size: int | None = None,
) -> list[Answer]:
    """Answer a batch of full prompts (already wrapped in a template) about their images (None = text only).

    ``generate_kwargs`` go to ``model.generate`` as well (e.g. a ``logits_processor``, as ``llava.lmms.scoring`` uses).
    Each image's question (``image_questions``) goes with it to the vision tower, for text-guided vision-side methods.
    ``packed_prefill``: pack the prefill of samples of different lengths (default: the model config's
    ``packed_prefill``, on). ``group_size``: the prompts are a window of requests; their images go through the
    vision tower together, then the language model answers them ``group_size`` at a time, shortest prompts first
    (batches of similar lengths pad little). Answers come back in the order of ``prompts``.
    """
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image entries")
    token_lists, flat_images, sizes, questions = [], [], [], []
    for index, (prompt, image) in enumerate(zip(prompts, images)):
        tokens = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)
        sample_images = [] if image is None else image if isinstance(image, list) else [image]
        tags = sum(1 for t in tokens if t == IMAGE_TOKEN_INDEX)
        if tags != len(sample_images):
            raise ValueError(
                f"prompt {index} has {tags} <image> tag(s) but {len(sample_images)} image(s) were given: {prompt[:80]!r}"
            )
        token_lists.append(tokens)
        flat_images.extend(sample_images)
        questions.extend(image_questions(prompt))  # one per <image>, as the tags counted above
        sizes.extend(img.size for img in sample_images)
    input_ids, attention_mask = left_pad(token_lists, pad_token_id(tokenizer))
    device = model.device
    pixel_values = None
    if flat_images:
        pixel_values = process_images(flat_images, image_processor, model.config)
        if isinstance(pixel_values, list):
            pixel_values = [p.to(device=device, dtype=model.dtype) for p in pixel_values]
        else:
            pixel_values = pixel_values.to(device=device, dtype=model.dtype)
    if seed is not None:
        torch.manual_seed(seed)
    generation_kwargs: dict[str, Any] = {
        "do_sample": temperature > 0,
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        "use_cache": True,
        "pad_token_id": pad_token_id(tokenizer),
    }
    if temperature > 0:
        generation_kwargs["temperature"] = temperature
        if top_p is not None:
            generation_kwargs["top_p"] = top_p
    generation_kwargs.update(generate_kwargs or {})
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if group_size is not None and len(prompts) > group_size:
        merged, resolved = model.merge_for_generation(
            input_ids, attention_mask, pixel_values, sizes or None, pruning, questions or None
        )
        return _answer_in_groups(model, tokenizer, merged, resolved, group_size, packed_prefill, generation_kwargs)
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        images=pixel_values,
        image_sizes=sizes or None,
        pruning=pruning,
        return_stats=True,
        image_texts=questions or None,
        packed_prefill=packed_prefill,
        **generation_kwargs,
    )
    texts = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
    return [Answer(text.strip(), stats) for text, stats in zip(texts, out.token_stats)]


def length_groups(lengths: list[int], group_size: int) -> list[list[int]]:
    """Indices in groups of ``group_size``, shortest first (ties keep their order)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + group_size] for start in range(0, len(order), group_size)]


def _answer_in_groups(model, tokenizer, merged, pruning, group_size, packed_prefill, generation_kwargs) -> list[Answer]:
    answers: list[Answer | None] = [None] * len(merged.token_stats)
    for rows in length_groups([stats["prompt"] for stats in merged.token_stats], group_size):
        out = model.generate_merged(
            merged.select(rows), pruning, return_stats=True, packed_prefill=packed_prefill, **generation_kwargs
        )
        texts = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        for row, text, stats in zip(rows, texts, out.token_stats, strict=True):
            answers[row] = Answer(text.strip(), stats)
    return answers

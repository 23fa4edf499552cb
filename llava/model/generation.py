"""`generate` for LLaVA models: images in, new tokens out (as upstream), batch > 1 with left padding, and the
per-sample token statistics the paper reports. The configured LLM-side methods (pruning/llm.py) run here: the
``--kv-pruning`` policy's cache and the ``--llm-pruning`` dropper's hooks on the decoder layers.

When the samples of a batch differ in length (stage 1 keeps a count per image), the language model's prefill runs
packed (pruning/packing.py): on the concatenated real tokens, each sample with its own positions and attention, so a
batch costs what its samples cost alone; decoding continues as the usual padded batch from the caches the prefill
filled. ``packed_prefill=False`` (or ``"packed_prefill": false`` in the checkpoint's config.json) turns it off."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from llava.constants import IMAGE_TOKEN_INDEX
from pruning import PruningConfig, drop_tokens
from pruning.packing import lengths_differ, unsupported_reason
from pruning.packing import packed_prefill as packed_prefill_hooks


class PromptTruncatedWarning(UserWarning):
    """A prompt (text + visual tokens) longer than ``tokenizer_model_max_length`` lost its end before generation."""


@dataclass
class LlavaGenerateOutput:
    sequences: torch.Tensor  # [B, G] new tokens only (finished samples padded with pad_token_id)
    # per row: visual_before, visual_after, inflection, prompt, generated, kv_final (+ visual_per_layer with
    # --llm-pruning)
    token_stats: list[dict[str, Any]]
    raw: Any = None  # what transformers' generate returned (a ModelOutput when return_dict_in_generate=True)


def generated_lengths(sequences: torch.Tensor, eos_token_id) -> list[int]:
    """Tokens each sample generated, its first end-of-sequence token included."""
    eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    eos = [e for e in eos if e is not None]
    lengths = []
    for row in sequences:
        hits = torch.isin(row, torch.tensor(eos, device=row.device)).nonzero() if eos else torch.empty(0)
        lengths.append(int(hits[0, 0]) + 1 if len(hits) else int(row.shape[0]))
    return lengths


def final_kv_length(prompt: int, generated: int, budget: int | None) -> int:
    """The paper's "total tokens": KV entries per layer once every token the sample read or wrote is in the cache,
    i.e. min(P + G, budget) (the plain cache physically holds one less: the last token is never fed back)."""
    total = prompt + generated
    return total if budget is None else min(total, budget)


def generation_setting(kwargs: dict[str, Any], default_config, name: str, default: Any) -> Any:
    """The value transformers' generate will use: the call's argument, else its generation_config's, else the
    model's generation_config (e.g. num_beams from a checkpoint's generation_config.json)."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    value = getattr(kwargs.get("generation_config") or default_config, name, None)
    return default if value is None else value


def warn_truncated_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_stats: list[dict[str, Any]], limit: int | None
) -> None:
    """merge_multimodal cuts every sequence to ``limit`` tokens, as upstream does for training; for generation that
    drops the end of the prompt (the question, the answer cue), so say so with the counts."""
    for sample, stats in enumerate(token_stats):
        ids = input_ids[sample] if attention_mask is None else input_ids[sample][attention_mask[sample].bool()]
        text = int((ids != IMAGE_TOKEN_INDEX).sum())
        full = text + int(stats["visual_after"])
        if full > stats["prompt"]:
            warnings.warn(
                f"sample {sample}: the prompt has {full} tokens ({text} text + {stats['visual_after']} visual) but "
                f"the model's tokenizer_model_max_length is {limit}: its last {full - stats['prompt']} tokens (the "
                "end of the question and the answer cue) are dropped before generating. Shorten the prompt, prune "
                "more visual tokens, or raise tokenizer_model_max_length in the checkpoint's config.json.",
                PromptTruncatedWarning,
                stacklevel=2,
            )


def use_packed_prefill(
    requested: bool | None, config, decoder: torch.nn.Module, attention_mask: torch.Tensor, kwargs: dict[str, Any]
) -> bool:
    """Whether this call's prefill runs packed: asked for (the call's ``packed_prefill``, else the config's
    ``packed_prefill``, default on), samples of different lengths, and a decoder that can (``unsupported_reason``).
    A call that asks for per-layer hidden states or attentions gets the padded prefill, whose outputs it expects.
    Asked for explicitly on a decoder that cannot, it is an error naming the reason."""
    wanted = requested if requested is not None else getattr(config, "packed_prefill", True)
    if not wanted or not lengths_differ(attention_mask):
        return False
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return False
    reason = unsupported_reason(decoder)
    if reason is not None and requested:
        raise ValueError(f"packed_prefill=True: {reason}; pass packed_prefill=False")
    return reason is None


def generate_with_methods(
    generate: Callable[..., Any],
    model: torch.nn.Module,
    decoder: torch.nn.Module,
    merged,
    pruning: PruningConfig,
    return_stats: bool,
    packed_prefill: bool | None,
    kwargs: dict[str, Any],
    config=None,
):
    """The language-model half of every family's multimodal ``generate``: the ``--kv-pruning`` policy's cache, the
    ``--llm-pruning`` dropper's hooks on ``decoder``'s layers and the packed prefill around
    ``generate(inputs_embeds=..., attention_mask=..., **kwargs)``, then per-sample token statistics.

    ``model`` owns the generation config and the attention the KV policy prepares; ``decoder`` holds ``layers``,
    ``norm`` and ``rotary_emb`` (e.g. ``LlamaModel``); ``merged`` is left-padded ``MergedInputs``; ``config`` (default
    ``model.config``) holds the checkpoint's ``packed_prefill`` setting."""
    generation_config = model.generation_config
    repeats = generation_setting(kwargs, generation_config, "num_return_sequences", 1)
    rows_mask = merged.attention_mask.repeat_interleave(repeats, dim=0)
    policy = dropper = None
    if pruning.kv_enabled:
        policy = pruning.method("kv_pruning").implementation(pruning)
        num_beams = generation_setting(kwargs, generation_config, "num_beams", 1)
        if num_beams > 1 and not policy.supports_beam_search:
            source = "num_beams" if kwargs.get("num_beams") is not None else "generation_config.num_beams"
            raise ValueError(
                f"beam search is not supported with KV eviction (--kv-pruning {pruning.kv_pruning}): {source} is "
                f"{num_beams}; use num_beams=1"
            )
        if "past_key_values" in kwargs:
            raise ValueError(
                f"--kv-pruning {pruning.kv_pruning} builds its own cache; do not pass past_key_values with it"
            )
        policy.prepare(model)
        kwargs["past_key_values"] = policy.make_cache(rows_mask)
    if pruning.llm_enabled:  # with a KV policy too: each shortened layer's cache learns its own prompt
        dropper = pruning.method("llm_pruning").implementation(pruning)
    dropping = (
        drop_tokens(
            decoder.layers,
            dropper,
            rows_mask,
            merged.visual_mask.repeat_interleave(repeats, dim=0),
            norm=decoder.norm,
            rotary_emb=decoder.rotary_emb,
        )
        if dropper is not None
        else nullcontext()
    )
    packing = (
        packed_prefill_hooks(decoder)
        if use_packed_prefill(packed_prefill, config or model.config, decoder, rows_mask, kwargs)
        else nullcontext()
    )
    with dropping as dropped, packing:
        out = generate(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask, **kwargs)
    if not return_stats:
        return out
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    lengths = generated_lengths(sequences, kwargs.get("eos_token_id", generation_config.eos_token_id))
    budgets = policy.budgets(kwargs["past_key_values"]) if policy is not None else [None] * len(lengths)
    per_layer = dropped.visual_per_layer() if dropper is not None else None
    per_sample = len(lengths) // len(merged.token_stats)  # num_return_sequences rows per sample
    stats = []
    for row, length in enumerate(lengths):
        sample = dict(merged.token_stats[row // per_sample])
        sample["generated"] = length
        sample["kv_final"] = final_kv_length(sample["prompt"], length, budgets[row])
        if per_layer is not None:
            sample["visual_per_layer"] = per_layer[row]
        stats.append(sample)
    return LlavaGenerateOutput(sequences=sequences, token_stats=stats, raw=out)


class LlavaGenerationMixin:
    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: torch.Tensor | list | None = None,
        image_sizes: list | None = None,
        pruning: PruningConfig | dict | None = None,
        return_stats: bool = False,
        image_texts: Sequence[str] | None = None,
        packed_prefill: bool | None = None,
        **kwargs: Any,
    ):
        """Generate from token ids (with IMAGE_TOKEN_INDEX placeholders) and images.

        Returns only the new tokens, like upstream. ``pruning`` overrides the model's pruning config for this call;
        ``return_stats=True`` returns a LlavaGenerateOutput with per-sample token statistics; ``image_texts`` (the
        question per image, in image order) reach text-guided vision-side methods; ``packed_prefill`` (default: the
        config's ``packed_prefill``, on) packs the prefill of samples that differ in length.
        """
        if "inputs_embeds" in kwargs:
            raise ValueError("LLaVA generate builds inputs_embeds itself; pass token ids (and images) instead")
        if inputs is None:
            raise ValueError("generate needs input ids")
        attention_mask = kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)  # recomputed from the merged attention mask
        merged, pruning = self.merge_for_generation(inputs, attention_mask, images, image_sizes, pruning, image_texts)
        return self.generate_merged(merged, pruning, return_stats, packed_prefill, **kwargs)

    @torch.no_grad()
    def merge_for_generation(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: torch.Tensor | list | None,
        image_sizes: list | None = None,
        pruning: PruningConfig | dict | None = None,
        image_texts: Sequence[str] | None = None,
    ):
        """The first half of ``generate``: (left-padded merged inputs, the pruning config in force)."""
        pruning = (
            self.pruning_config
            if pruning is None
            else PruningConfig.from_dict(
                pruning.to_dict() if isinstance(pruning, PruningConfig) else pruning, source="generate(pruning=...)"
            )
        )
        merged = self.merge_multimodal(
            inputs, attention_mask, None, images, image_sizes, "left", pruning, image_texts=image_texts
        )
        limit = getattr(self.config, "tokenizer_model_max_length", None)
        warn_truncated_prompts(inputs, attention_mask, merged.token_stats, limit)
        return merged, pruning

    @torch.no_grad()
    def generate_merged(
        self,
        merged,
        pruning: PruningConfig,
        return_stats: bool = False,
        packed_prefill: bool | None = None,
        **kwargs: Any,
    ):
        """``generate`` from inputs already merged (``merge_multimodal(..., "left", pruning)``, or a
        ``MergedInputs.select`` of them): the language-model half, for callers that encode a window of requests
        first and batch them by length (``llava.inference.generate_answers(group_size=...)``)."""
        return generate_with_methods(
            super().generate, self, self.get_model(), merged, pruning, return_stats, packed_prefill, kwargs
        )

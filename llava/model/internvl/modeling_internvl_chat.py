"""InternVL2-1B as released: InternViT + pixel shuffle + ``mlp1`` + Qwen2, with both pruning stages.

Module names are the release's (``vision_model``, ``mlp1``, ``language_model``), so ``model.safetensors`` loads
without renaming. The language model is transformers' ``Qwen2ForCausalLM`` (SDPA or flash-attention).

Prompts carry one ``IMAGE_TOKEN_INDEX`` per image (what ``llava.mm_utils.tokenizer_image_token`` makes of ``<image>``),
and each becomes ``<img>``, the image's kept tokens (every tile's in raster order, tiles in order, the thumbnail
last), ``</img>``: the official layout, whatever stage 1 keeps. Prompts expanded the official way
(``<img>`` + ``<IMG_CONTEXT>`` x 256 x tiles + ``</img>``, see ``prompting.expand_image_tokens``) are accepted too;
each such block is read as the image's placeholder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2ForCausalLM

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.generation import generate_with_methods
from llava.model.internvl.configuration_internvl_chat import InternVLChatConfig
from llava.model.internvl.modeling_intern_vit import InternVisionEmbeddings, InternVisionEncoderLayer, InternVisionModel
from llava.model.internvl.vision import select_tile_tokens
from llava.model.llava_arch import ImageFeatures, LlavaCausalLMOutput, MultimodalInputError
from pruning import PruningConfig


@dataclass
class MergedInputs:
    """A padded batch of prompts with their images merged in."""

    inputs_embeds: torch.Tensor  # [B, L, hidden]
    attention_mask: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L], 0 at each sample's first real token
    labels: torch.Tensor | None  # [B, L]
    visual_mask: torch.Tensor  # [B, L] bool: the positions holding image tokens (not <img> / </img>)
    token_stats: list[dict[str, Any]]  # per sample: visual_before, visual_after, inflection, prompt, crops, ...

    def select(self, rows: Sequence[int]) -> MergedInputs:
        """The samples ``rows`` as a batch of their own, left padding cut to its longest prompt."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask[index]
        start = mask.shape[1] - int(mask.sum(dim=1).max())
        if bool(mask[:, :start].any()):
            raise ValueError("MergedInputs.select needs left-padded inputs (merge_for_generation)")
        return MergedInputs(
            self.inputs_embeds[index, start:],
            mask[:, start:],
            self.position_ids[index, start:],
            None if self.labels is None else self.labels[index, start:],
            self.visual_mask[index, start:],
            [self.token_stats[row] for row in rows],
        )


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    config: InternVLChatConfig
    base_model_prefix = "internvl_chat"
    main_input_name = "input_ids"
    _no_split_modules = ["InternVisionEncoderLayer", "Qwen2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: InternVLChatConfig):
        super().__init__(config)
        vision_hidden = config.vision_config.hidden_size
        merged = vision_hidden * config.merge_factor**2
        llm_hidden = config.llm_config.hidden_size
        self.vision_model = InternVisionModel(config.vision_config)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(merged), nn.Linear(merged, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden)
        )
        self.language_model = Qwen2ForCausalLM(config.llm_config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, InternVisionEmbeddings):
            std = self.config.vision_config.initializer_range
            nn.init.normal_(module.class_embedding, std=std)
            nn.init.normal_(module.position_embedding, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            nn.init.constant_(module.ls1, self.config.vision_config.initializer_factor)
            nn.init.constant_(module.ls2, self.config.vision_config.initializer_factor)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ---- pruning configuration -------------------------------------------------------------------------------
    @property
    def pruning_config(self) -> PruningConfig:
        return PruningConfig.from_dict(self.config.pruning, source="model config")

    def set_pruning(self, pruning: PruningConfig | dict | None) -> PruningConfig:
        """Change both stages' settings for later calls; stored in the config so it is saved with the model."""
        pruning = PruningConfig.from_dict(pruning.to_dict() if isinstance(pruning, PruningConfig) else pruning)
        self.config.pruning = pruning.to_dict()
        return pruning

    def random_generator(self, pruning: PruningConfig) -> torch.Generator | None:
        """One generator per seed, so the 'random' rule draws new tokens for each batch but is reproducible."""
        if pruning.visual_pruning != "random":
            return None
        if getattr(self, "_generator_seed", None) != pruning.seed:
            self._generator = torch.Generator().manual_seed(pruning.seed)
            self._generator_seed = pruning.seed
        return self._generator

    # ---- images ----------------------------------------------------------------------------------------------
    def image_features(self, images: Sequence[torch.Tensor] | torch.Tensor, pruning: PruningConfig | None = None):
        """Each image's kept tokens, projected: ``images`` holds one [tiles, 3, S, S] stack per image (a list, or
        one [B, tiles, 3, S, S] tensor). All tiles of the batch go through the tower together."""
        pruning = pruning or self.pruning_config
        stacks = _tile_stacks(images, self.config.tile_size)
        counts = [stack.shape[0] for stack in stacks]
        pixels = torch.cat(stacks).to(
            device=self.device, dtype=self.vision_model.embeddings.patch_embedding.weight.dtype
        )
        tiles = select_tile_tokens(
            self.vision_model,
            pixels,
            pruning,
            self.config.select_layer,
            self.config.downsample_ratio,
            tiles_per_image=counts,
            generator=self.random_generator(pruning),
        )
        kept = tiles.kept.tolist()
        per_tile = list(torch.split(self.mlp1(tiles.features[tiles.mask]), kept))  # [k_t, hidden] each
        inflection = tiles.inflection.tolist() if tiles.inflection is not None else [None] * len(kept)
        result = ImageFeatures(features=[], n=[], kept=[], inflection=[], extra=[])
        start = 0
        for count in counts:
            span = slice(start, start + count)
            result.features.append(torch.cat(per_tile[span]))
            result.n.append(tiles.n * count)
            result.kept.append(sum(kept[span]))
            # the whole-image view: the thumbnail (last) when there is one, else the first tile
            whole = start + count - 1 if count > 1 and self.config.use_thumbnail else start
            result.inflection.append(inflection[whole])
            result.extra.append({"crops": count, "crop_kept": kept[span], "crop_inflection": inflection[span]})
            start += count
        return result

    # ---- merge -----------------------------------------------------------------------------------------------
    def image_token_ids(self) -> tuple[int, int, int]:
        """(``<img>``, ``</img>``, ``<IMG_CONTEXT>``) ids, set from the tokenizer when the checkpoint is loaded."""
        ids = (self.config.img_start_token_id, self.config.img_end_token_id, self.config.img_context_token_id)
        if any(i is None for i in ids):
            raise MultimodalInputError(
                "the model config has no img_start/img_end/img_context token ids: load the checkpoint with "
                "llava.model.builder.load_pretrained_model, which reads them from its tokenizer"
            )
        return ids

    def merge_multimodal(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images,
        padding_side: str = "right",
        pruning: PruningConfig | None = None,
    ) -> MergedInputs:
        """Replace each image placeholder by ``<img>`` + the image's kept tokens + ``</img>``; re-pad the batch."""
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        start_id, end_id, context_id = self.image_token_ids()
        ids_per_sample, labels_per_sample, expanded = [], [], []
        for b in range(batch):
            ids, lab, runs = _collapse_expanded(input_ids[b][attention_mask[b]], start_id, end_id, context_id)
            if labels is not None:
                lab = labels[b][attention_mask[b]][lab]
            ids_per_sample.append(ids)
            labels_per_sample.append(lab if labels is not None else None)
            expanded.extend(runs)
        tags = [int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in ids_per_sample]
        encoded = self.image_features(images, pruning) if images is not None and len(images) else None
        num_images = len(encoded.features) if encoded is not None else 0
        if sum(tags) != num_images:
            per_sample = ", ".join(f"sample {b}: {t}" for b, t in enumerate(tags))
            raise MultimodalInputError(
                f"the prompts contain {sum(tags)} image placeholders ({per_sample}) but {num_images} images were given"
            )
        for index, run in enumerate(expanded):
            if run is not None and run != encoded.n[index]:
                raise MultimodalInputError(
                    f"image {index}: the prompt holds {run} <IMG_CONTEXT> tokens but the image has {encoded.n[index]} "
                    "tokens (256 per tile): expand the prompt with the tile counts of these pixel values"
                )

        embed = self.get_input_embeddings()
        wrappers = embed(torch.tensor([start_id, end_id], device=input_ids.device))  # [2, hidden]
        sequences, seq_labels, visual_masks, stats = [], [], [], []
        image_idx = 0
        for ids, lab in zip(ids_per_sample, labels_per_sample):
            positions = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
            text = embed(ids.masked_fill(ids == IMAGE_TOKEN_INDEX, 0))
            pieces, piece_labels, visual, start = [], [], [], 0
            sample = {"visual_before": 0, "visual_after": 0, "inflection": []}
            extra: dict[str, list] = {}
            for pos in positions:
                feats = encoded.features[image_idx].to(text.dtype)
                pieces += [text[start:pos], wrappers[:1], feats, wrappers[1:]]
                visual += [False] * (pos - start + 1) + [True] * feats.shape[0] + [False]
                if lab is not None:
                    ignored = torch.full((feats.shape[0] + 2,), IGNORE_INDEX, dtype=lab.dtype, device=lab.device)
                    piece_labels += [lab[start:pos], ignored]
                sample["visual_before"] += encoded.n[image_idx]
                sample["visual_after"] += encoded.kept[image_idx]
                sample["inflection"].append(encoded.inflection[image_idx])
                for key, value in encoded.extra[image_idx].items():
                    extra.setdefault(key, []).extend(value if isinstance(value, list) else [value])
                image_idx += 1
                start = pos + 1
            pieces.append(text[start:])
            visual += [False] * (ids.shape[0] - start)
            if lab is not None:
                piece_labels.append(lab[start:])
            inflection = sample["inflection"]
            sample["inflection"] = inflection[0] if len(inflection) == 1 else (inflection or None)
            sequence = torch.cat(pieces)
            sample["prompt"] = int(sequence.shape[0])
            sample.update(extra)
            sequences.append(sequence)
            seq_labels.append(torch.cat(piece_labels) if lab is not None else None)
            visual_masks.append(torch.tensor(visual, dtype=torch.bool, device=sequence.device))
            stats.append(sample)
        return _pad(sequences, seq_labels if labels is not None else None, visual_masks, stats, padding_side)

    # ---- forward / generate ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: Sequence[torch.Tensor] | torch.Tensor | None = None,
        pruning: PruningConfig | dict | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        """The language model's output for prompts with images (right-padded when the prompts differ in length), with
        the per-sample token statistics (``token_stats``) when images were merged."""
        token_stats = None
        if inputs_embeds is None and input_ids is not None and _has_images(images):
            merged = self.merge_multimodal(input_ids, attention_mask, labels, images, "right", _pruning(self, pruning))
            input_ids, inputs_embeds, token_stats = None, merged.inputs_embeds, merged.token_stats
            attention_mask, position_ids, labels = merged.attention_mask, merged.position_ids, merged.labels
        output = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if token_stats is None:
            return output
        return LlavaCausalLMOutput(**output, token_stats=token_stats)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: Sequence[torch.Tensor] | torch.Tensor | None = None,
        image_sizes: list | None = None,
        pruning: PruningConfig | dict | None = None,
        return_stats: bool = False,
        image_texts: Sequence[str] | None = None,
        packed_prefill: bool | None = None,
        **kwargs: Any,
    ):
        """New tokens for left-padded prompts and their images, as ``LlavaLlamaForCausalLM.generate``: the same
        arguments (``image_sizes`` is not needed: the tiles carry the layout; ``image_texts`` is not read: the
        vision-side methods of InternVL2 are keep rules), ``pruning`` overrides the model's
        settings for this call, ``return_stats=True`` adds per-sample token statistics, ``packed_prefill`` packs
        the prefill of samples that differ in length (llava/model/generation.py). Stops at ``<|im_end|>``
        unless ``eos_token_id`` says otherwise, as the official ``chat``."""
        if "inputs_embeds" in kwargs:
            raise ValueError("InternVL generate builds inputs_embeds itself; pass token ids (and images) instead")
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            raise ValueError("generate needs input ids")
        attention_mask = kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)  # recomputed from the merged attention mask
        merged, pruning = self.merge_for_generation(inputs, attention_mask, images, None, pruning)
        return self.generate_merged(merged, pruning, return_stats, packed_prefill, **kwargs)

    @torch.no_grad()
    def merge_for_generation(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images,
        image_sizes: list | None = None,
        pruning: PruningConfig | dict | None = None,
        image_texts: Sequence[str] | None = None,
    ) -> tuple[MergedInputs, PruningConfig]:
        """The first half of ``generate``: (left-padded merged inputs, the pruning config in force)."""
        pruning = _pruning(self, pruning)
        images = images if _has_images(images) else None
        return self.merge_multimodal(inputs, attention_mask, None, images, "left", pruning), pruning

    @torch.no_grad()
    def generate_merged(
        self,
        merged: MergedInputs,
        pruning: PruningConfig,
        return_stats: bool = False,
        packed_prefill: bool | None = None,
        **kwargs: Any,
    ):
        """``generate`` from inputs already merged (``merge_for_generation``, or a ``select`` of them)."""
        language_model = self.language_model
        return generate_with_methods(
            language_model.generate,
            language_model,
            language_model.model,
            merged,
            pruning,
            return_stats,
            packed_prefill,
            kwargs,
            config=self.config,
        )


def _pad(
    sequences: list[torch.Tensor],
    labels: list[torch.Tensor] | None,
    visual: list[torch.Tensor],
    stats: list[dict[str, Any]],
    side: str,
) -> MergedInputs:
    """Pad per-sample sequences [L_b, hidden] on ``side`` ('left' for generation)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    batch, longest = len(sequences), max(seq.shape[0] for seq in sequences)
    first = sequences[0]
    embeds = first.new_zeros(batch, longest, first.shape[1])
    mask = torch.zeros(batch, longest, dtype=torch.long, device=first.device)
    positions = torch.zeros(batch, longest, dtype=torch.long, device=first.device)
    visual_mask = torch.zeros(batch, longest, dtype=torch.bool, device=first.device)
    padded_labels = None
    if labels is not None:
        padded_labels = torch.full((batch, longest), IGNORE_INDEX, dtype=labels[0].dtype, device=first.device)
    for b, seq in enumerate(sequences):
        length = seq.shape[0]
        span = slice(longest - length, longest) if side == "left" else slice(0, length)
        embeds[b, span], mask[b, span], visual_mask[b, span] = seq, 1, visual[b]
        positions[b, span] = torch.arange(length, device=first.device)
        if padded_labels is not None:
            padded_labels[b, span] = labels[b]
    return MergedInputs(embeds, mask, positions, padded_labels, visual_mask, stats)


def _pruning(model: InternVLChatModel, pruning: PruningConfig | dict | None) -> PruningConfig:
    if pruning is None:
        return model.pruning_config
    if isinstance(pruning, PruningConfig):
        return pruning
    return PruningConfig.from_dict(pruning, source="pruning argument")


def _has_images(images) -> bool:
    if images is None:
        return False
    return len(images) > 0


def _tile_stacks(images, tile_size: int) -> list[torch.Tensor]:
    """One [tiles, 3, S, S] tensor per image, from a list of them (or of single [3, S, S] tiles) or a 5-D tensor."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 5:
            raise MultimodalInputError(
                f"InternVL images are one [tiles, 3, {tile_size}, {tile_size}] stack per image (a list, or a "
                f"[B, tiles, 3, H, W] tensor); got a tensor of shape {tuple(images.shape)}"
            )
        images = list(images)
    stacks = []
    for index, image in enumerate(images):
        stack = image.unsqueeze(0) if image.ndim == 3 else image
        if stack.ndim != 4 or tuple(stack.shape[1:]) != (3, tile_size, tile_size):
            raise MultimodalInputError(
                f"image {index}: expected [tiles, 3, {tile_size}, {tile_size}] pixel values (llava.model.internvl."
                f"InternVLImageProcessor), got {tuple(image.shape)}"
            )
        stacks.append(stack)
    return stacks


def _collapse_expanded(ids: torch.Tensor, start_id: int, end_id: int, context_id: int):
    """Official expanded blocks ``<img> <IMG_CONTEXT> x N </img>`` -> one IMAGE_TOKEN_INDEX each.

    Returns (ids, the input position of each id kept, N per placeholder in order: None for a plain IMAGE_TOKEN_INDEX).
    A ``<IMG_CONTEXT>`` outside such a block is an error.
    """
    is_context = ids == context_id
    if not bool(is_context.any()):
        tags = int((ids == IMAGE_TOKEN_INDEX).sum())
        return ids, torch.arange(ids.shape[0], device=ids.device), [None] * tags
    values = ids.tolist()
    out, keep, runs = [], [], []
    i = 0
    while i < len(values):
        token = values[i]
        if token == start_id and i + 1 < len(values) and values[i + 1] == context_id:
            j = i + 1
            while j < len(values) and values[j] == context_id:
                j += 1
            if j == len(values) or values[j] != end_id:
                raise MultimodalInputError("an <img> <IMG_CONTEXT>... block in the prompt is not closed by </img>")
            out.append(IMAGE_TOKEN_INDEX)
            keep.append(i)
            runs.append(j - i - 1)
            i = j + 1
            continue
        if token == context_id:
            raise MultimodalInputError("<IMG_CONTEXT> outside an <img> ... </img> block in the prompt")
        if token == IMAGE_TOKEN_INDEX:
            runs.append(None)
        out.append(token)
        keep.append(i)
        i += 1
    device = ids.device
    return torch.tensor(out, dtype=ids.dtype, device=device), torch.tensor(keep, device=device), runs

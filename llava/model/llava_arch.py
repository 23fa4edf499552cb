"""The multimodal parts shared by every LLaVA language model: tower + projector, and the merge of image features
into the token sequence.

Differences from upstream, on purpose: images may keep different numbers of tokens per sample (stage 1), the merge
re-pads left or right on request (left for generation, so batch > 1 works), and every merge reports per-sample
token statistics, which travel in the return values (``forward``'s ``LlavaCausalLMOutput.token_stats``,
``generate(..., return_stats=True)``). LLaVA-1.6's multi-crop (anyres) images are laid out by llava/model/anyres.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.anyres import (
    assemble_image,
    crop_candidates,
    crops_per_image,
    image_grid,
    merge_type_of,
    normalise_image_sizes,
    select_crop_tokens,
)
from llava.model.multimodal_encoder.clip_encoder import build_vision_tower
from llava.model.multimodal_projector.builder import build_vision_projector
from pruning import PruningConfig


class MultimodalInputError(ValueError):
    """Prompts and images do not fit together (e.g. two <image> tags, one image)."""


@dataclass
class ImageFeatures:
    """Projected features of each image (variable length) and per-image stage-1 statistics."""

    features: list[torch.Tensor]  # one [k_i, hidden] tensor per image
    n: list[int]
    kept: list[int]
    inflection: list[int | None]  # None when the vision-side method computes no i*
    extra: list[dict[str, Any]] = field(default_factory=list)  # per-image extras (e.g. per-crop counts)


@dataclass
class MergedInputs:
    inputs_embeds: torch.Tensor  # [B, L, hidden]
    attention_mask: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor | None  # [B, L]
    token_stats: list[dict[str, Any]]  # per sample: visual_before, visual_after, inflection, prompt
    visual_mask: torch.Tensor  # [B, L] bool: the positions that hold image features (LLM-side methods read it)

    def select(self, rows: Sequence[int]) -> MergedInputs:
        """The samples ``rows`` as a batch of their own, left padding cut to its longest prompt (generation inputs:
        padded on the left, as ``merge_multimodal(..., "left")`` returns them)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask[index]
        start = mask.shape[1] - int(mask.sum(dim=1).max())
        if bool(mask[:, :start].any()):
            raise ValueError("MergedInputs.select needs left-padded inputs (merge_multimodal(..., 'left'))")
        labels = None if self.labels is None else self.labels[index, start:]
        return MergedInputs(
            self.inputs_embeds[index, start:],
            mask[:, start:],
            self.position_ids[index, start:],
            labels,
            [self.token_stats[row] for row in rows],
            self.visual_mask[index, start:],
        )


@dataclass
class LlavaCausalLMOutput(CausalLMOutputWithPast):
    """The language model's output plus, when images were merged in this call, per-sample token statistics."""

    token_stats: list[dict[str, Any]] | None = None


def check_pruning_section(config) -> None:
    """A bad ``pruning`` section must fail when the config is loaded, naming the setting."""
    PruningConfig.from_dict(getattr(config, "pruning", None), source="model config")


class LlavaMetaModel:
    """Mixin placed before the language model's base class (e.g. LlamaModel)."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in (getattr(config, "mm_patch_merge_type", None) or ""):
                self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))

    def get_vision_tower(self):
        tower = getattr(self, "vision_tower", None)
        if isinstance(tower, list):
            tower = tower[0]
        return tower

    def initialize_vision_modules(self, model_args, fsdp=None) -> None:
        """Build (or reuse) the tower and projector for training; load a pretrained projector if given."""
        config = self.config
        config.mm_vision_tower = model_args.vision_tower
        config.mm_vision_select_layer = model_args.mm_vision_select_layer
        config.mm_vision_select_feature = getattr(model_args, "mm_vision_select_feature", "patch")
        config.mm_patch_merge_type = getattr(model_args, "mm_patch_merge_type", "flat")
        config.mm_projector_type = getattr(model_args, "mm_projector_type", "linear")
        config.use_mm_proj = True
        if self.get_vision_tower() is None or self.get_vision_tower().vision_tower_name != model_args.vision_tower:
            tower = build_vision_tower(config, delay_load=True)
            self.vision_tower = [tower] if fsdp else tower
        tower = self.get_vision_tower()
        tower.load_model()
        config.mm_hidden_size = tower.hidden_size
        if getattr(self, "mm_projector", None) is None:
            self.mm_projector = build_vision_projector(config)
        else:
            for param in self.mm_projector.parameters():
                param.requires_grad = True  # may have been frozen by LoRA
        if "unpad" in config.mm_patch_merge_type and getattr(self, "image_newline", None) is None:
            std = 1 / torch.sqrt(torch.tensor(config.hidden_size, dtype=torch.float32))
            self.image_newline = nn.Parameter(torch.randn(config.hidden_size) * std)
        adapter = getattr(model_args, "pretrain_mm_mlp_adapter", None)
        if adapter:
            weights = torch.load(adapter, map_location="cpu", weights_only=True)
            prefix = "mm_projector."
            state = {k.split(prefix, 1)[1]: v for k, v in weights.items() if prefix in k}
            if not state:
                raise ValueError(f"{adapter}: no 'mm_projector.*' weights found")
            self.mm_projector.load_state_dict(state)


class LlavaMetaForCausalLM:
    """Mixin for the causal LM class: encoding images and merging them into the sequence.

    Place it before the language model's causal-LM class (e.g. LlamaForCausalLM): its ``forward`` merges the images
    and hands everything else to that class's ``forward``.
    """

    # Released LLaVA checkpoints carry the vision tower's weights (model.vision_tower.*) although the tower is built
    # from its own folder after loading (and a tuned tower read from the checkpoint then): expected, not reported.
    _keys_to_ignore_on_load_unexpected = [r"^model\.vision_tower\."]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.Tensor | list | None = None,
        image_sizes: list | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        token_stats = None
        if inputs_embeds is None and images is not None:
            merged = self._merge_for_forward(input_ids, attention_mask, labels, images, image_sizes)
            if merged is not None:
                input_ids, inputs_embeds, token_stats = None, merged.inputs_embeds, merged.token_stats
                position_ids, attention_mask, labels = merged.position_ids, merged.attention_mask, merged.labels
        output = super().forward(
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

    def get_model(self):
        return self.model

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    # ---- pruning configuration -------------------------------------------------------------------------------
    @property
    def pruning_config(self) -> PruningConfig:
        return PruningConfig.from_dict(getattr(self.config, "pruning", None), source="model config")

    def set_pruning(self, pruning: PruningConfig | dict | None) -> PruningConfig:
        """Change both stages' settings for later calls; stored in the config so it is saved with the model."""
        pruning = PruningConfig.from_dict(pruning.to_dict() if isinstance(pruning, PruningConfig) else pruning)
        self.config.pruning = pruning.to_dict()
        tower = self.get_vision_tower()
        if tower is not None:
            tower.pruning = pruning
        return pruning

    # ---- images ----------------------------------------------------------------------------------------------
    def encode_images(
        self, images: torch.Tensor, pruning: PruningConfig | None = None, texts: Sequence[str] | None = None
    ) -> ImageFeatures:
        """[num_images, 3, H, W] -> projected, per-image kept features (``texts``: the question per image)."""
        projector = self.get_model().mm_projector
        out = self.get_vision_tower().select(images, pruning or self.pruning_config, projector, texts)
        kept = out.kept.tolist()
        # the kept rows only, as anyres does (per-image counts pad out.features; the projector acts on each token alone)
        valid = torch.arange(out.features.shape[1], device=out.kept.device)[None] < out.kept[:, None]
        features = list(projector(out.features[valid]).split(kept))
        return ImageFeatures(
            features=features,
            n=out.n.tolist(),
            kept=kept,
            inflection=out.inflection.tolist() if out.inflection is not None else [None] * len(kept),
            extra=[{} for _ in kept],
        )

    def image_features(
        self, images, image_sizes=None, pruning: PruningConfig | None = None, texts: Sequence[str] | None = None
    ) -> ImageFeatures:
        """Per-image features for a batch given as a tensor or a list of tensors.

        [N, 3, H, W] (or a list of [3, H, W] under the flat merge) is one crop per image, as in LLaVA-1.5; a
        [N, crops, 3, H, W] tensor or a list of [crops, 3, H, W] tensors is LLaVA-1.6's anyres input. ``texts``, the
        question per image, reach text-guided vision-side methods.
        """
        if _is_multi_crop(images, self.config):
            return self.encode_anyres(crops_per_image(images), image_sizes, pruning, texts)
        if isinstance(images, (list, tuple)):
            images = torch.stack(list(images))
        if images.ndim != 4:
            raise MultimodalInputError(f"images must be [num_images, 3, H, W], got shape {tuple(images.shape)}")
        return self.encode_images(images, pruning, texts)

    def encode_anyres(
        self,
        images: list[torch.Tensor],
        image_sizes=None,
        pruning: PruningConfig | None = None,
        texts: Sequence[str] | None = None,
    ) -> ImageFeatures:
        """LLaVA-1.6: all crops through the tower in one batch (stage 1 per crop or pooled), then each image's kept
        tokens laid out by mm_patch_merge_type (see llava/model/anyres.py)."""
        pruning = pruning or self.pruning_config
        merge_type = merge_type_of(self.config)
        counts = [image.shape[0] for image in images]
        sizes = normalise_image_sizes(image_sizes, len(images)) if merge_type != "flat" else [None] * len(images)
        tower = self.get_vision_tower()
        crop_pixels = tower.config.image_size
        grids = [
            image_grid(self.config, sizes[i], crop_pixels, counts[i], i)
            if merge_type != "flat" and counts[i] > 1
            else None
            for i in range(len(images))
        ]
        model = self.get_model()
        newline = getattr(model, "image_newline", None)
        if merge_type == "spatial_unpad" and newline is None:
            raise MultimodalInputError("mm_patch_merge_type 'spatial_unpad' needs the model's image_newline parameter")
        side = tower.num_patches_per_side
        candidates: list = []
        for count, grid, size in zip(counts, grids, sizes):
            unpadded = merge_type == "spatial_unpad" and grid is not None
            candidates += [None] + (crop_candidates(grid, side, size) if unpadded else [None] * (count - 1))
        selected = select_crop_tokens(tower, model.mm_projector, torch.cat(images), counts, pruning, candidates, texts)
        result = ImageFeatures(features=[], n=[], kept=[], inflection=[], extra=[])
        for tokens, grid, size in zip(selected, grids, sizes):
            image = assemble_image(tokens, merge_type, side, grid, size, newline)
            result.features.append(image.features)
            result.n.append(image.full_length)
            result.kept.append(int(image.features.shape[0]))
            result.inflection.append(tokens.inflection[0])
            result.extra.append(
                {
                    "crops": len(tokens.features),
                    "crop_kept": [int(f.shape[0]) for f in tokens.features],
                    "crop_inflection": list(tokens.inflection),
                    "newlines": image.newlines,
                }
            )
        return result

    # ---- merge -----------------------------------------------------------------------------------------------
    def merge_multimodal(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images,
        image_sizes=None,
        padding_side: str | None = None,
        pruning: PruningConfig | None = None,
        image_texts: Sequence[str] | None = None,
    ) -> MergedInputs:
        """Replace each IMAGE_TOKEN_INDEX by that image's kept features; re-pad the batch. ``image_texts``: the
        question each image is asked with (in image order), for text-guided vision-side methods."""
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        ids_per_sample = [input_ids[b][attention_mask[b]] for b in range(batch)]
        labels_per_sample = [labels[b][attention_mask[b]] for b in range(batch)] if labels is not None else None
        tags = [int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in ids_per_sample]

        encoded = self.image_features(images, image_sizes, pruning, image_texts) if images is not None else None
        num_images = len(encoded.features) if encoded is not None else 0
        consume_dummy = False
        if sum(tags) != num_images:
            # upstream's training collator gives text-only samples a dummy image that must be skipped
            if num_images == batch and all(t <= 1 for t in tags):
                consume_dummy = True
            else:
                per_sample = ", ".join(f"sample {b}: {t}" for b, t in enumerate(tags))
                raise MultimodalInputError(
                    f"the prompts contain {sum(tags)} <image> tags ({per_sample}) but {num_images} images were given"
                )

        embed = self.get_model().embed_tokens
        max_len = getattr(self.config, "tokenizer_model_max_length", None)
        sequences, seq_labels, visual_masks, stats = [], [], [], []
        image_idx = 0
        for b in range(batch):
            ids = ids_per_sample[b]
            lab = labels_per_sample[b] if labels_per_sample is not None else None
            positions = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
            text_embeds = embed(ids.masked_fill(ids == IMAGE_TOKEN_INDEX, 0))
            pieces, piece_labels, piece_visual = [], [], []
            start = 0
            sample_stats = {"visual_before": 0, "visual_after": 0, "inflection": []}
            extra: dict[str, list] = {}
            for pos in positions:
                pieces.append(text_embeds[start:pos])
                piece_visual.append(torch.zeros(pos - start, dtype=torch.bool, device=ids.device))
                if lab is not None:
                    piece_labels.append(lab[start:pos])
                feats = encoded.features[image_idx]
                pieces.append(feats.to(text_embeds.dtype))
                piece_visual.append(torch.ones(feats.shape[0], dtype=torch.bool, device=ids.device))
                if lab is not None:
                    piece_labels.append(torch.full((feats.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device))
                sample_stats["visual_before"] += encoded.n[image_idx]
                sample_stats["visual_after"] += encoded.kept[image_idx]
                sample_stats["inflection"].append(encoded.inflection[image_idx])
                for key, value in encoded.extra[image_idx].items():
                    extra.setdefault(key, []).extend(value if isinstance(value, list) else [value])
                image_idx += 1
                start = pos + 1
            pieces.append(text_embeds[start:])
            piece_visual.append(torch.zeros(ids.shape[0] - start, dtype=torch.bool, device=ids.device))
            if lab is not None:
                piece_labels.append(lab[start:])
            if not positions and consume_dummy:
                pieces.append(encoded.features[image_idx][:0].to(text_embeds.dtype))
                image_idx += 1
            seq = torch.cat(pieces)
            seq_lab = torch.cat(piece_labels) if lab is not None else None
            visual = torch.cat(piece_visual)
            if max_len is not None and seq.shape[0] > max_len:
                seq, visual = seq[:max_len], visual[:max_len]
                seq_lab = seq_lab[:max_len] if seq_lab is not None else None
            inflection = sample_stats["inflection"]
            sample_stats["inflection"] = inflection[0] if len(inflection) == 1 else (inflection or None)
            sample_stats["prompt"] = int(seq.shape[0])
            sample_stats.update(extra)
            sequences.append(seq)
            seq_labels.append(seq_lab)
            visual_masks.append(visual)
            stats.append(sample_stats)

        side = padding_side or getattr(self.config, "tokenizer_padding_side", None) or "right"
        return _pad_sequences(sequences, seq_labels if labels is not None else None, visual_masks, side, stats)

    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None
    ):
        """Upstream's 6-tuple interface: (None, position_ids, attention_mask, past_key_values, inputs_embeds, labels).
        The token statistics are in ``merge_multimodal``'s result (and in ``forward``'s output)."""
        merged = self._merge_for_forward(input_ids, attention_mask, labels, images, image_sizes)
        if merged is None:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        return None, merged.position_ids, merged.attention_mask, past_key_values, merged.inputs_embeds, merged.labels

    def _merge_for_forward(self, input_ids, attention_mask, labels, images, image_sizes) -> MergedInputs | None:
        """The merge a forward call does; None where there is nothing to merge (no tower or images, a decode step)."""
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            return None
        return self.merge_multimodal(input_ids, attention_mask, labels, images, image_sizes)


def _is_multi_crop(images, config) -> bool:
    if isinstance(images, torch.Tensor):
        return images.ndim == 5
    if any(image.ndim == 4 for image in images):
        return True
    # one [3, H, W] crop per image: LLaVA-1.5's path, unless the merge type adds structure (a newline under unpad)
    return merge_type_of(config) != "flat"


def _pad_sequences(
    sequences: list[torch.Tensor],
    labels: list[torch.Tensor] | None,
    visual: list[torch.Tensor],
    side: str,
    stats: list[dict[str, Any]],
) -> MergedInputs:
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    batch = len(sequences)
    longest = max(seq.shape[0] for seq in sequences)
    hidden = sequences[0].shape[1]
    ref = sequences[0]
    embeds = ref.new_zeros(batch, longest, hidden)
    mask = torch.zeros(batch, longest, dtype=torch.long, device=ref.device)
    visual_mask = torch.zeros(batch, longest, dtype=torch.bool, device=ref.device)
    positions = torch.zeros(batch, longest, dtype=torch.long, device=ref.device)
    padded_labels = (
        torch.full((batch, longest), IGNORE_INDEX, dtype=labels[0].dtype, device=ref.device) if labels else None
    )
    for b, seq in enumerate(sequences):
        length = seq.shape[0]
        span = slice(longest - length, longest) if side == "left" else slice(0, length)
        embeds[b, span] = seq
        mask[b, span] = 1
        visual_mask[b, span] = visual[b].to(ref.device)
        positions[b, span] = torch.arange(length, device=ref.device)
        if padded_labels is not None:
            padded_labels[b, span] = labels[b]
    return MergedInputs(embeds, mask, positions, padded_labels, stats, visual_mask)

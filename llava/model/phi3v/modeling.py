"""Phi-3-vision on transformers 5.23: transformers' Phi-3 language model plus our image embedding, under the
release's state-dict names (``model.vision_embed_tokens.*``, ``model.layers.*``, ``lm_head``).

The image side follows the official ``image_embedding_phi3_v.py`` (hub commit c45209e9):

- every image comes as ``[1 + crops, 3, 336, 336]``: the global view, then the HD crops row-major;
- the CLIP ViT-L/14-336 tower (``img_processor``) gives ``hidden_states[-2]`` without CLS: 24 x 24 patches per crop;
- each 2 x 2 block of patches is concatenated into one token (order: top-left, top-right, bottom-left,
  bottom-right; 1024 -> 4096 channels): 12 x 12 merged tokens per crop;
- layout ``sub_glb``: the crops' merged tokens on the image's grid (rows run across crops) with ``sub_GN`` closing
  every row, then ``glb_GN``, then the global view's 12 x 12 tokens with ``sub_GN`` closing every row;
- ``img_projection`` (Linear, GELU, Linear) maps every token, separators included, to the LLM width.

Stage 1 (visual pruning) keeps a subset of each crop's merged tokens; the layout rules for a sparse grid are in
``layout_image`` and docs/method.md. Pruning off, the sequence is exactly the official one.

Prompts: ``IMAGE_TOKEN_INDEX`` marks each image, as for LLaVA (``llava.mm_utils.tokenizer_image_token``, one BOS at
the front). The official processor tokenizes every text chunk between images with its own BOS, so each image is
followed by a BOS token (``[1, 32010, 29871, 13] + image + [1, 29871, 13, ...]`` for ``<|user|>\n<|image_1|>\n...``).
``merge_multimodal`` inserts that BOS after every image that lacks one, so ids from our shared tokenization and ids
tokenized chunk by chunk as the official processor does give the same, official, sequence. The BOS is text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3ForCausalLM, Phi3Model

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.generation import LlavaGenerationMixin
from llava.model.llava_arch import ImageFeatures, LlavaMetaForCausalLM, MultimodalInputError
from llava.model.phi3v.config import Phi3VConfig
from llava.model.phi3v.image_processing import HDGrid, hd_grid
from pruning import PruningConfig, VisionContext, apply_strategy, cls_patch_scores, raster_order_indices
from pruning.strategies import is_keep_rule
from pruning.visual import gather_patches, with_cls


@dataclass
class CropSelection:
    """The merged tokens kept from each crop of a batch of crops, before projection.

    ``tokens[c]`` [k_c, 4C] in raster order of the crop's merged grid, ``indices[c]`` [k_c] their positions
    (0 .. side^2 - 1), ``inflection[c]`` the crop's i* (None when stage 1 did not score).
    """

    tokens: list[torch.Tensor]
    indices: list[torch.Tensor]
    inflection: list[int | None]


@dataclass
class LaidOutImage:
    tokens: torch.Tensor  # [length, 4C]: merged tokens and separators in sequence order (before projection)
    full_length: int  # the official (unpruned) length
    separators: int  # sub_GN + glb_GN tokens in ``tokens``


class Phi3VImageEmbedding(nn.Module):
    """The release's ``model.vision_embed_tokens``: tower, separators and projector (no copy of the word
    embeddings: the release ties ``wte`` to ``model.embed_tokens``)."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        clip = CLIPVisionConfig(**config.clip_config_dict())
        clip._attn_implementation = "eager" if config._attn_implementation == "eager" else "sdpa"
        self.img_processor = CLIPVisionModel(clip)
        merged = config.image_dim_out * 4
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged))
        self.img_projection = nn.Sequential(
            nn.Linear(merged, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.select_layer = config.tower_select_layer
        self.pruning = PruningConfig()

    # ---- geometry --------------------------------------------------------------------------------------------
    @property
    def crop_size(self) -> int:
        return self.img_processor.config.image_size

    @property
    def patch_side(self) -> int:
        """Patches per crop side (24 for ViT-L/14-336)."""
        return self.img_processor.config.image_size // self.img_processor.config.patch_size

    @property
    def merged_side(self) -> int:
        """Merged tokens per crop side (12)."""
        return self.patch_side // 2

    @property
    def dtype(self) -> torch.dtype:
        return self.img_projection[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_projection[0].weight.device

    # ---- tower -----------------------------------------------------------------------------------------------
    def select_hidden_index(self) -> int:
        layers = len(self.img_processor.encoder.layers)
        index = self.select_layer + layers + 1 if self.select_layer < 0 else self.select_layer
        if not 1 <= index <= layers:
            raise ValueError(f"img_processor.layer_idx {self.select_layer} is out of range for {layers} tower layers")
        return index

    def vision_context(self, crops: torch.Tensor, pruning: PruningConfig) -> VisionContext:
        """The tower on a batch of crops, run lazily (pruning.visual): only the layers a caller asks for run."""
        pixels = crops.to(device=self.device, dtype=self.img_processor.dtype)
        return VisionContext(
            self.img_processor, pixels, pruning, self.select_hidden_index(), self.random_generator(pruning)
        )

    def merge_2x2(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, side^2, C] patches -> [N, (side/2)^2, 4C]: each 2 x 2 block concatenated in the official order
        (top-left, top-right, bottom-left, bottom-right)."""
        count, _, channels = patches.shape
        half = self.merged_side
        blocks = patches.reshape(count, half, 2, half, 2, channels).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(count, half * half, 4 * channels)

    def merged_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """[N, side^2] patch scores -> [N, (side/2)^2]: a merged token scores the sum over its four patches (the CLS
        attention mass on the block; docs/method.md, 'Phi-3-vision')."""
        return self.merge_2x2(scores[..., None]).sum(dim=-1)

    def select_crops(self, crops: torch.Tensor, counts: Sequence[int], pruning: PruningConfig) -> CropSelection:
        """Each crop's kept merged tokens in raster order of its merged grid (``counts``: crops per image).

        Stage 1 runs per crop, the global view included, as LLaVA-1.6 does: the patches are scored at
        ``visual_layer`` (CLS similarity, ``pruning.cls_patch_scores``), a merged token scores the sum of its four
        patches, and the configured keep rule (``pruning.apply_strategy``) decides on each crop's curve of merged
        scores, so i* and k count merged tokens. ``crop_budget: global`` pools the crops' budgets within an image
        (the best sum-of-k_c tokens over its crops). With ``visual_pruning: none`` every token is kept and nothing is
        scored.
        """
        context = self.vision_context(crops, pruning)
        if not pruning.visual_enabled:  # upstream's plain path: the tower to the select layer, no scoring, no i*
            merged = self.merge_2x2(context.features()[:, 1:])  # [N, 144, 4C]
            positions = torch.arange(merged.shape[1], device=merged.device)
            return CropSelection(list(merged), [positions] * merged.shape[0], [None] * merged.shape[0])
        _check_keep_rule(pruning, len(context.layers), context.select_index)
        hidden = context.hidden_states(pruning.visual_layer)  # [N, 1 + 576, D], before the select layer is run
        patch_scores = cls_patch_scores(context.layers[pruning.visual_layer], hidden, mode=pruning.visual_score)
        decision = apply_strategy(self.merged_scores(patch_scores), pruning, context.generator)  # row = crop
        keep = decision.keep if pruning.crop_budget == "per_crop" else _pooled_keep(decision, counts)
        indices, mask = raster_order_indices(decision.ranking, keep)  # [N, k_max]
        if pruning.visual_mode == "inside":
            tokens = self._run_kept_blocks(context, hidden, indices, mask, pruning.visual_layer)
        else:
            tokens = gather_patches(self.merge_2x2(context.features()[:, 1:]), indices, mask)  # [N, k_max, 4C]
        kept = keep.tolist()
        return CropSelection(
            [tokens[c, : kept[c]] for c in range(len(kept))],
            [indices[c, : kept[c]] for c in range(len(kept))],
            decision.inflection.tolist(),
        )

    def _run_kept_blocks(
        self, context: VisionContext, hidden: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, start: int
    ) -> torch.Tensor:
        """'inside' mode: the tower layers from ``start`` to the select layer see CLS + the four patches of every
        kept merged token only (padded rows' keys masked out); returns the merged tokens [N, k_max, 4C]."""
        half, side = self.merged_side, self.patch_side
        index = indices.clamp(min=0)
        top_left = 2 * (index // half) * side + 2 * (index % half)  # [N, k_max]
        offsets = torch.tensor([0, 1, side, side + 1], device=indices.device)  # the merge order: tl, tr, bl, br
        patches = (top_left[..., None] + offsets).flatten(1)  # [N, 4 k_max]
        patch_mask = mask.repeat_interleave(4, dim=1)
        tokens = torch.cat([hidden[:, :1], gather_patches(hidden[:, 1:], patches, patch_mask)], dim=1)
        tokens = context.run_rows(tokens, start, context.select_index, with_cls(patch_mask))
        count, _, dim = tokens.shape
        return tokens[:, 1:].reshape(count, -1, 4 * dim)

    def random_generator(self, pruning: PruningConfig) -> torch.Generator | None:
        """One CPU generator per seed, so the 'random' rule draws new patterns for each batch, reproducibly."""
        if pruning.visual_pruning != "random":
            return None
        if getattr(self, "_generator_seed", None) != pruning.seed:
            self._generator = torch.Generator().manual_seed(pruning.seed)
            self._generator_seed = pruning.seed
        return self._generator

    # ---- layout ----------------------------------------------------------------------------------------------
    def layout_image(
        self, tokens: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], grid: HDGrid
    ) -> LaidOutImage:
        """One image's kept merged tokens (crop 0 = global view, then the crops row-major) in the 'sub_glb' order.

        A row of the sub-image grid (12 * cols tokens wide, running across crops) or of the global view is closed
        by ``sub_GN`` after its last kept token; a row with nothing kept leaves no trace. ``glb_GN`` always sits
        between the two parts. With every token kept this is the official sequence.
        """
        half = self.merged_side
        sub_cols = grid.cols * half
        crop_row = torch.arange(grid.crops, device=self.device) // grid.cols
        crop_col = torch.arange(grid.crops, device=self.device) % grid.cols
        sub_tokens, sub_keys = [], []
        for crop, (feats, index) in enumerate(zip(tokens[1:], indices[1:])):
            index = index.to(self.device)
            row = crop_row[crop] * half + index // half
            col = crop_col[crop] * half + index % half
            sub_tokens.append(feats)
            sub_keys.append(row * sub_cols + col)
        sub = self._rows_closed(torch.cat(sub_tokens), torch.cat(sub_keys), sub_cols)
        glb = self._rows_closed(tokens[0], indices[0].to(self.device), half)
        separator = self.glb_GN.reshape(1, -1).to(sub[0].dtype)
        sequence = torch.cat([sub[0], separator, glb[0]])
        full = (grid.crops + 1) * half * half + 1 + (grid.rows + 1) * half
        return LaidOutImage(sequence, full, sub[1] + 1 + glb[1])

    def _rows_closed(self, feats: torch.Tensor, keys: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
        """Tokens sorted by key = row * width + col, each non-empty row followed by sub_GN; (sequence, separators)."""
        if feats.shape[0] == 0:  # a crop budget pooled away from every token of this part
            return feats, 0
        order = torch.argsort(keys)
        feats, rows = feats[order], (keys[order] // width)
        counts = torch.bincount(rows).tolist()
        newline = self.sub_GN.reshape(1, -1).to(feats.dtype)
        pieces = []
        for run in torch.split(feats, [c for c in counts if c > 0]):
            pieces += [run, newline]
        return torch.cat(pieces), len(pieces) // 2

    # ---- whole images ----------------------------------------------------------------------------------------
    def forward(self, crops: list[torch.Tensor], grids: list[HDGrid], pruning: PruningConfig) -> list[dict]:
        """Project every image's laid-out tokens; one dict per image with the tokens and stage-1 statistics."""
        selection = self.select_crops(torch.cat(crops), [image.shape[0] for image in crops], pruning)
        out, start = [], 0
        for image, grid in zip(crops, grids):
            span = slice(start, start + image.shape[0])
            start += image.shape[0]
            laid = self.layout_image(selection.tokens[span], selection.indices[span], grid)
            out.append(
                {
                    "features": self.img_projection(laid.tokens.to(self.dtype)),
                    "full_length": laid.full_length,
                    "separators": laid.separators,
                    "crop_kept": [int(t.shape[0]) for t in selection.tokens[span]],
                    "crop_inflection": selection.inflection[span],
                }
            )
        return out


class Phi3VModel(Phi3Model):
    """Phi-3's decoder plus the release's ``vision_embed_tokens``."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)

    def get_vision_tower(self) -> Phi3VImageEmbedding:
        return self.vision_embed_tokens


class Phi3VForCausalLM(LlavaGenerationMixin, LlavaMetaForCausalLM, Phi3ForCausalLM):
    """transformers' Phi3ForCausalLM with images merged the LLaVA way (``LlavaMetaForCausalLM.merge_multimodal``:
    left or right padding, per-sample token statistics) and LLaVA's ``generate`` (both pruning stages)."""

    config_class = Phi3VConfig
    config: Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        Phi3ForCausalLM.__init__(self, config)
        self.model = Phi3VModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def merge_multimodal(
        self,
        input_ids,
        attention_mask,
        labels,
        images,
        image_sizes=None,
        padding_side=None,
        pruning=None,
        image_texts: Sequence[str] | None = None,
    ):
        """LLaVA's merge, after inserting the BOS the official processor puts after every image (module docstring)."""
        input_ids, attention_mask, labels = bos_after_images(
            input_ids, attention_mask, labels, self.config.bos_token_id
        )
        return super().merge_multimodal(
            input_ids, attention_mask, labels, images, image_sizes, padding_side, pruning, image_texts
        )

    def image_features(
        self, images, image_sizes=None, pruning: PruningConfig | None = None, texts: Sequence[str] | None = None
    ) -> ImageFeatures:
        """Per-image projected tokens in the official layout, with stage-1 statistics (``texts`` is not read: the
        vision-side methods of Phi-3-vision are keep rules).

        ``images``: a list of [1 + crops, 3, 336, 336] tensors or a [B, 1 + crops, 3, 336, 336] tensor;
        ``image_sizes``: each image's original (width, height), from which the crop grid is found again.
        """
        pruning = pruning or self.pruning_config
        crops = _crop_stacks(images)
        sizes = _original_sizes(image_sizes, len(crops))
        embed = self.get_model().vision_embed_tokens
        grids = [
            hd_grid(width, height, stack.shape[0] - 1, embed.crop_size) for stack, (width, height) in zip(crops, sizes)
        ]
        for index, stack in enumerate(crops):
            if tuple(stack.shape[1:]) != (3, embed.crop_size, embed.crop_size):
                raise MultimodalInputError(
                    f"image {index}: crops must be [3, {embed.crop_size}, {embed.crop_size}], got {tuple(stack.shape[1:])}"
                )
        encoded = embed(crops, grids, pruning)
        result = ImageFeatures(features=[], n=[], kept=[], inflection=[], extra=[])
        for image, grid in zip(encoded, grids):
            result.features.append(image["features"])
            result.n.append(image["full_length"])
            result.kept.append(int(image["features"].shape[0]))
            result.inflection.append(image["crop_inflection"][0])
            result.extra.append(
                {
                    "crops": grid.crops + 1,
                    "crop_grid": [grid.rows, grid.cols],
                    "crop_kept": image["crop_kept"],
                    "crop_inflection": image["crop_inflection"],
                    "newlines": image["separators"],
                }
            )
        return result


def _pooled_keep(decision, counts: Sequence[int]) -> torch.Tensor:
    """crop_budget 'global': an image keeps the sum of its crops' k_c, taken as the best-ranked tokens over all its
    crops; returns how many of them fall in each crop (each crop's share is then its own best-ranked tokens)."""
    keep = torch.zeros_like(decision.keep)
    start = 0
    for count in counts:
        ranking = decision.ranking[start : start + count]  # [crops, n]
        budget = int(decision.keep[start : start + count].sum())
        best = torch.sort(ranking.flatten(), descending=True, stable=True).indices[:budget]
        keep[start : start + count] = torch.bincount(best // ranking.shape[1], minlength=count)
        start += count
    return keep


def _check_keep_rule(pruning: PruningConfig, num_layers: int, select_index: int) -> None:
    """Stage 1 on Phi-3-vision ranks merged tokens by CLS score: keep rules only."""
    if not is_keep_rule(pruning.visual_pruning):
        raise MultimodalInputError(
            f"visual_pruning {pruning.visual_pruning!r} is not supported on Phi-3-vision: a merged token is four patches "
            "concatenated, so only the CLS-score keep rules (scored per merged token) carry over; docs/models.md"
        )
    if not 0 <= pruning.visual_layer < num_layers:
        raise MultimodalInputError(
            f"visual_layer {pruning.visual_layer} needs encoder.layers[{pruning.visual_layer}], but the Phi-3-vision "
            f"tower has {num_layers} layers (valid: 0..{num_layers - 1})"
        )
    if pruning.visual_mode == "inside" and pruning.visual_layer > select_index:
        raise MultimodalInputError(
            f"visual_mode 'inside' prunes at hidden_states[{pruning.visual_layer}], after the select layer "
            f"hidden_states[{select_index}]; use a visual_layer <= {select_index} or visual_mode 'select'"
        )


def bos_after_images(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None, bos_id: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Insert ``bos_id`` after every IMAGE_TOKEN_INDEX not already followed by it (label IGNORE_INDEX).

    Rows come back right-padded (merge_multimodal re-pads them as asked); unchanged inputs come back as they are.
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows, label_rows, changed = [], [], False
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][mask[b]]
        lab = labels[b][mask[b]] if labels is not None else None
        following = torch.cat([ids[1:], ids.new_full((1,), -1)])
        missing = (ids == IMAGE_TOKEN_INDEX) & (following != bos_id)
        if bool(missing.any()):
            changed = True
            # each position is followed by one more slot where a BOS is missing
            slots = torch.stack([ids, torch.where(missing, bos_id, -1)], dim=1).flatten()
            keep = torch.stack([torch.ones_like(missing), missing], dim=1).flatten()
            ids = slots[keep]
            if lab is not None:
                lab = torch.stack([lab, torch.full_like(lab, IGNORE_INDEX)], dim=1).flatten()[keep]
        rows.append(ids)
        label_rows.append(lab)
    if not changed:
        return input_ids, attention_mask, labels
    longest = max(len(r) for r in rows)
    new_ids = input_ids.new_zeros(len(rows), longest)
    new_mask = torch.zeros(len(rows), longest, dtype=torch.long, device=input_ids.device)
    new_labels = None if labels is None else labels.new_full((len(rows), longest), IGNORE_INDEX)
    for b, ids in enumerate(rows):
        new_ids[b, : len(ids)] = ids
        new_mask[b, : len(ids)] = 1
        if new_labels is not None:
            new_labels[b, : len(ids)] = label_rows[b]
    return new_ids, new_mask, new_labels


def _crop_stacks(images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 5:
            raise MultimodalInputError(
                f"Phi-3-vision images must be [B, 1 + crops, 3, H, W] or a list of [1 + crops, 3, H, W], "
                f"got {tuple(images.shape)}"
            )
        return list(images)
    stacks = list(images)
    for index, stack in enumerate(stacks):
        if not isinstance(stack, torch.Tensor) or stack.ndim != 4 or stack.shape[0] < 2:
            shape = tuple(stack.shape) if isinstance(stack, torch.Tensor) else type(stack).__name__
            raise MultimodalInputError(
                f"image {index}: expected [1 + crops, 3, H, W] (global view + at least one crop), got {shape}"
            )
    return stacks


def _original_sizes(image_sizes, count: int) -> list[tuple[int, int]]:
    if image_sizes is None:
        raise MultimodalInputError(
            "Phi-3-vision needs image_sizes, each image's original (width, height), to lay its crops out"
        )
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
    if len(sizes) != count:
        raise MultimodalInputError(f"got {len(sizes)} image_sizes for {count} images")
    try:
        return [(int(w), int(h)) for w, h in sizes]
    except (TypeError, ValueError) as err:
        raise MultimodalInputError(f"image_sizes must be (width, height) pairs, got {image_sizes!r}") from err

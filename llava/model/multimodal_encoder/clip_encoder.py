"""The CLIP vision tower, emitting (optionally pruned) patch features.

Upstream ran the whole tower with ``output_hidden_states=True`` and sliced ``hidden_states[select_layer]``.
Here the tower runs layer by layer only as far as it must (``pruning.select_visual_tokens``), scores the patches
at ``visual_layer`` when stage 1 is on, and returns the kept features in raster order with per-sample statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from llava.mm_utils import check_image_processor_backend, load_image_processor
from llava.utils import looks_like_hub_id
from pruning import PruningConfig, select_visual_tokens


class CLIPVisionTowerModel(CLIPVisionModel):
    """transformers' CLIPVisionModel, loading quietly from a full CLIP folder (openai/clip-vit-large-patch14-336 holds
    the text tower and both projections too: expected, not an alarming load report)."""

    _keys_to_ignore_on_load_unexpected = [
        r"^text_model\.",
        r"^text_projection\.",
        r"^visual_projection\.",
        r"^logit_scale$",
    ]


# transformers 5 finds how to read a checkpoint's names (it drops CLIPVisionModel's "vision_model." level) by class
# name: the subclass reads them as its parent does
register_checkpoint_conversion_mapping(
    CLIPVisionTowerModel.__name__, get_checkpoint_conversion_mapping(CLIPVisionModel.__name__)
)


class VisionTowerError(OSError):
    """The vision tower named in the config cannot be found or loaded; the message names it."""


@dataclass
class TowerOutput:
    """Kept features of a batch of images (zero-padded at the end) and what stage 1 did to each."""

    features: torch.Tensor  # [num_images, k_max, C]
    mask: torch.Tensor  # [num_images, k_max] bool, True on real tokens
    indices: torch.Tensor  # [num_images, k_max] patch index of each kept token, -1 on padding
    n: torch.Tensor  # [num_images] patch tokens before stage 1
    kept: torch.Tensor  # [num_images] patch tokens after stage 1
    inflection: torch.Tensor | None  # [num_images] i* (1-based) of a scoring method; None with pruning off
    scores: torch.Tensor | None  # [num_images, n] CLS similarity, fp32


def resolve_tower_path(name: str) -> str:
    """A local folder as is; a hub id ('org/name') as is, for transformers' cache; anything else is an error."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise VisionTowerError(f"vision tower folder {expanded} has no config.json")
        return expanded
    if not looks_like_hub_id(name):
        raise VisionTowerError(
            f"vision tower folder not found: {name!r} (from mm_vision_tower in the model config). "
            "Pass an existing local CLIP folder, e.g. load_pretrained_model(..., vision_tower=PATH) or --vision-tower PATH."
        )
    return name


class CLIPVisionTower(nn.Module):
    def __init__(self, vision_tower: str, args, delay_load: bool = False):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = getattr(args, "mm_vision_select_layer", -2)
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(
                f"unknown mm_vision_select_feature {self.select_feature!r}; expected 'patch' or 'cls_patch'"
            )
        self.pruning = PruningConfig.from_dict(getattr(args, "pruning", None), source="model config")
        self._attn_implementation = getattr(args, "_attn_implementation", None) or "sdpa"
        # 'pil' unless the config says otherwise: upstream's pixels whether or not torchvision is installed
        self.image_processor_backend = check_image_processor_backend(
            getattr(args, "image_processor_backend", None), source="image_processor_backend in the model config"
        )
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()

    def load_model(self, device_map=None, dtype: torch.dtype | None = None) -> None:
        if self.is_loaded:
            return
        path = resolve_tower_path(self.vision_tower_name)
        attn = (
            self._attn_implementation if self._attn_implementation in ("sdpa", "eager", "flash_attention_2") else "sdpa"
        )
        try:
            self.image_processor = load_image_processor(path, self.image_processor_backend)
            self.vision_tower = CLIPVisionTowerModel.from_pretrained(
                path, device_map=device_map, dtype=dtype, attn_implementation=attn
            )
        except OSError as err:
            raise VisionTowerError(
                f"could not load the vision tower {self.vision_tower_name!r}: {err}. "
                "Without network access, point mm_vision_tower at a local CLIP folder (--vision-tower PATH)."
            ) from err
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    # ---- forward ---------------------------------------------------------------------------------------------
    def select(
        self, images: torch.Tensor, pruning: PruningConfig | None = None, projector: nn.Module | None = None
    ) -> TowerOutput:
        """Run the tower on [num_images, 3, H, W] and return the kept select-layer features (still unprojected;
        ``projector`` is there for methods that compare tokens in the LLM's input space)."""
        if not self.is_loaded:
            raise VisionTowerError(f"vision tower {self.vision_tower_name!r} is not loaded; call load_model() first")
        pruning = pruning or self.pruning
        trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            selection = select_visual_tokens(
                self.vision_tower,
                images.to(device=self.device, dtype=self.dtype),
                pruning,
                select_layer=self.select_layer,
                select_feature=self.select_feature,
                generator=self.random_generator(pruning),
                projector=projector,
            )
        return TowerOutput(
            features=selection.features.to(images.dtype),
            mask=selection.mask,
            indices=selection.indices,
            n=selection.n,
            kept=selection.kept,
            inflection=selection.inflection,
            scores=selection.scores,
        )

    def forward(self, images):
        """Upstream-compatible: a tensor of features for a batch, or a list for a list of images."""
        if isinstance(images, list):
            return [self.select(image.unsqueeze(0)).features[0] for image in images]
        return self.select(images).features

    def random_generator(self, pruning: PruningConfig) -> torch.Generator | None:
        """One generator per seed, so the 'random' rule draws new patches for each batch but is reproducible."""
        if pruning.visual_pruning != "random":
            return None
        if getattr(self, "_generator_seed", None) != pruning.seed:
            self._generator = torch.Generator().manual_seed(pruning.seed)  # the random rule draws on the CPU
            self._generator_seed = pruning.seed
        return self._generator

    # ---- properties ------------------------------------------------------------------------------------------
    @property
    def config(self) -> CLIPVisionConfig:
        if not self.is_loaded:
            raise VisionTowerError(f"vision tower {self.vision_tower_name!r} is not loaded")
        return self.vision_tower.config

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2


def build_vision_tower(vision_tower_cfg, **kwargs) -> CLIPVisionTower:
    """Any local CLIP folder or hub id (upstream accepted only openai/laion/ShareGPT4V names)."""
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if not name:
        raise ValueError("the model config has no mm_vision_tower")
    if isinstance(name, Path):
        name = str(name)
    return CLIPVisionTower(name, args=vision_tower_cfg, **kwargs)

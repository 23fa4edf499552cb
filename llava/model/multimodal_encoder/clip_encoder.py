"""The CLIP vision tower, emitting (optionally pruned) patch features.

Upstream ran the whole tower with ``output_hidden_states=True`` and sliced ``hidden_states[select_layer]``.
Here the tower runs layer by layer only as far as it must (``pruning.select_visual_tokens``), scores the patches
at ``visual_layer`` when stage 1 is on, and returns the kept features in raster order with per-sample statistics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.utils import cached_file

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


class CLIPTextSideModel(CLIPTextModelWithProjection):
    """transformers' CLIPTextModelWithProjection, loading quietly from a full CLIP folder (the vision tower and the
    visual projection are there too)."""

    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$"]


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


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class CLIPTextSide:
    """CLIP's text tower, text projection and visual projection from the vision tower's folder (``openai/clip-vit-
    large-patch14-336`` holds them all), for text-guided vision-side methods (``pruning.visual.TextTower``).

    Nothing is read until a method calls it, so runs whose method never does never load it. Loaded once, on the
    device and in the dtype of the vision tower at that moment; frozen, outside the LLaVA model's state dict.
    """

    def __init__(self, path: str | None, device: torch.device, dtype: torch.dtype):
        self.path, self.device, self.dtype = path, device, dtype
        self._parts: tuple | None = None

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, P]: as the official Recoverable Compression, the texts padded to the text tower's length (77), no
        attention mask, the final-layer-normed hidden state of the last position, text-projected."""
        tokenizer, model, _ = self._load()
        length = model.config.max_position_embeddings
        ids = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model.text_model(input_ids=ids["input_ids"].to(self.device)).last_hidden_state  # [B, L, H]
            return model.text_projection(hidden[:, -1])

    def project_patches(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vision tokens [B, t, D] -> [B, t, P] with CLIP's visual projection."""
        _, _, projection = self._load()
        return hidden @ projection.to(device=hidden.device, dtype=hidden.dtype).T

    def _load(self) -> tuple:
        if self._parts is None:
            try:
                if self.path is None:
                    raise OSError("the tower was built in memory, not read from a folder")
                # transformers 5 builds an empty CLIP tokenizer for a folder without one: every text would be unknown
                if not any(
                    cached_file(self.path, f, _raise_exceptions_for_missing_entries=False) for f in TOKENIZER_FILES
                ):
                    raise OSError(f"it has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
                tokenizer = AutoTokenizer.from_pretrained(self.path)
                config = AutoConfig.from_pretrained(self.path)
                if not isinstance(config, CLIPConfig):
                    raise ValueError(
                        f"its config.json is a {type(config).__name__}, not a full CLIP model (CLIPConfig)"
                    )
                # a CLIPConfig's projection width is the top-level one (its text_config may keep a default 512)
                config.text_config.projection_dim = config.projection_dim
                model = CLIPTextSideModel.from_pretrained(self.path, config=config.text_config, dtype=self.dtype)
                projection = read_weight(self.path, "visual_projection.weight")
            except (OSError, ValueError, KeyError) as err:
                raise VisionTowerError(
                    f"a text-guided vision-side method needs CLIP's text tower, its tokenizer and its visual "
                    f"projection from the vision tower's folder {self.path!r}: {err}"
                ) from err
            model.requires_grad_(False)
            self._parts = (tokenizer, model.to(self.device).eval(), projection.to(self.device, self.dtype))
        return self._parts


def read_weight(path: str, name: str) -> torch.Tensor:
    """One tensor of a checkpoint folder (or hub id) without loading the rest: safetensors or .bin, sharded or not."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        file = cached_file(path, single, _raise_exceptions_for_missing_entries=False)
        if file is None:
            index_file = cached_file(path, index, _raise_exceptions_for_missing_entries=False)
            if index_file is None:
                continue
            shard = json.loads(Path(index_file).read_text())["weight_map"].get(name)
            if shard is None:
                raise KeyError(f"{index} in {path!r} has no {name!r}")
            file = cached_file(path, shard)
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as handle:
                if name not in handle.keys():
                    raise KeyError(f"{file} has no {name!r}")
                return handle.get_tensor(name)
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        if name not in state:
            raise KeyError(f"{file} has no {name!r}")
        return state[name]
    raise OSError(f"{path!r} has no model.safetensors or pytorch_model.bin (nor their sharded index)")


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
        self._text_side: CLIPTextSide | None = None
        self._tower_path = path
        self.is_loaded = True

    def load_from_memory(self, vision_tower: CLIPVisionModel, image_processor) -> None:
        """Use a CLIP vision model built in memory instead of reading a folder (the speed suite's random weights on a
        real geometry). With no folder there is no text side: a text-guided method fails with VisionTowerError."""
        self.image_processor = image_processor
        self.vision_tower = vision_tower.requires_grad_(False)
        self._text_side = None
        self._tower_path = None
        self.is_loaded = True

    # ---- forward ---------------------------------------------------------------------------------------------
    def select(
        self,
        images: torch.Tensor,
        pruning: PruningConfig | None = None,
        projector: nn.Module | None = None,
        texts: Sequence[str] | None = None,
    ) -> TowerOutput:
        """Run the tower on [num_images, 3, H, W] and return the kept select-layer features (still unprojected;
        ``projector`` is there for methods that compare tokens in the LLM's input space, ``texts``, the question per
        image, for text-guided methods)."""
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
                text=texts,
                projector=projector,
                text_tower=self.text_side(),
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

    def text_side(self) -> CLIPTextSide:
        """CLIP's text side of this tower's folder; nothing is read before a method calls it."""
        if self._text_side is None:
            self._text_side = CLIPTextSide(self._tower_path, self.device, self.dtype)
        return self._text_side

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

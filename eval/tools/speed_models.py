"""What the speed suite (``eval.tools.speed``) runs: random-weight LLaVA models on a real geometry, the prompts and
images, and the four pruning rows.

Speed does not depend on the weights, so a LLaVA-1.5-7B-shaped model (CLIP ViT-L/14-336 + 2-layer MLP projector +
Vicuna-7B decoder layers) with random weights times like the release checkpoint, layer for layer. Writing 7B random
weights to disk only to read them back would take minutes and 28 GB, so the model is assembled here from configs:
the same ``LlavaLlamaForCausalLM`` and ``CLIPVisionTower`` classes the loader builds, with the tower's CLIP model
created in place instead of read from a folder. The LLM depth can be reduced (``llm_layers``) to fit a CPU budget;
every per-layer figure is unchanged by that.

One deliberate change to the random weights: with the default initialisation the CLS row of the scoring layer is
almost flat (logit spread ~0.02), so the long-tail rule would keep nearly every patch, which no trained CLIP does.
The scoring layer's q/k projections are re-drawn so that the CLS logits spread by ``cls_logit_std`` (2.0 gives a
long-tailed curve whose inflection point sits at 25-45 of 576 patches, i.e. ~100-175 tokens kept at alpha = 0.24,
around the paper's 127). Only the kept *counts* depend on this; the suite calibrates alpha to its target count anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from llava.constants import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from pruning import PruningConfig
from pruning.calibrate import alpha_for_target
from pruning.inflection import longtail_keep

RANDOM_TOWER = "random-weights:clip-vit-large-patch14-336-geometry"


@dataclass(frozen=True)
class Geometry:
    """Shapes of a LLaVA-1.5-style model: CLIP vision config, Llama decoder config, projector, scoring layer."""

    name: str
    vision: dict[str, Any]
    llm: dict[str, Any]
    projector: str = "mlp2x_gelu"
    visual_layer: int = 16
    extra: dict[str, Any] = field(default_factory=dict)


# openai/clip-vit-large-patch14-336, the tower of every LLaVA-1.5
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
GEOMETRIES: dict[str, Geometry] = {
    # openai/clip-vit-large-patch14-336 + lmsys/vicuna-7b-v1.5, as liuhaotian/llava-v1.5-7b combines them
    "llava-v1.5-7b": Geometry(
        name="llava-v1.5-7b",
        vision=CLIP_L_336,
        llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    ),
    # the same tower with lmsys/vicuna-13b-v1.5
    "llava-v1.5-13b": Geometry(
        name="llava-v1.5-13b",
        vision=CLIP_L_336,
        llm=dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    ),
    # llava.testing.tiny_llava's default sizes: for tests and smoke runs (milliseconds per forward)
    "tiny": Geometry(
        name="tiny",
        vision=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    image_size=112, patch_size=14, projection_dim=32, hidden_act="quick_gelu"),
        llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=400, max_position_embeddings=2048, rms_norm_eps=1e-5),
        visual_layer=2,
    ),
}  # fmt: skip


def get_geometry(name: str, llm_layers: int | None = None) -> Geometry:
    """A preset, with the LLM depth optionally reduced (or increased) to ``llm_layers``."""
    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}; choose one of {', '.join(GEOMETRIES)}")
    geometry = GEOMETRIES[name]
    if llm_layers is None:
        return geometry
    if isinstance(llm_layers, bool) or not isinstance(llm_layers, int) or llm_layers < 1:
        raise ValueError(f"llm_layers must be a positive integer, got {llm_layers!r}")
    return replace(geometry, llm={**geometry.llm, "num_hidden_layers": llm_layers})


def llava_config(geometry: Geometry) -> LlavaConfig:
    """The ``config.json`` a release checkpoint of this geometry carries (upstream's mm_* keys)."""
    return LlavaConfig(
        **geometry.llm,
        mm_vision_tower=RANDOM_TOWER,
        mm_hidden_size=geometry.vision["hidden_size"],
        mm_projector_type=geometry.projector,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        pruning={"visual_layer": geometry.visual_layer},
        attn_implementation="sdpa",
        **geometry.extra,
    )


def image_processor(geometry: Geometry) -> CLIPImageProcessorPil:
    """The preprocessing of openai/clip-vit-large-patch14-336 at this geometry's image size."""
    size = geometry.vision["image_size"]
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_convert_rgb=True,
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
        rescale_factor=1 / 255,
    )


def sharpen_cls_scores(vision_model: CLIPVisionModel, layer_index: int, logit_std: float) -> None:
    """Re-draw one layer's q/k projections so that q_cls . k_j / sqrt(D) has a spread of about ``logit_std``.

    On a layer-normed input (unit variance per channel), entries of std sqrt(logit_std / D) give q and k entries of
    variance logit_std, hence dot products over D channels, scaled by 1/sqrt(D), of std ~logit_std.
    """
    if not math.isfinite(logit_std) or logit_std <= 0:
        raise ValueError(f"cls_logit_std must be a positive number, got {logit_std!r}")
    layers = getattr(vision_model, "vision_model", vision_model).encoder.layers  # transformers 5 has no wrapper
    if not 0 <= layer_index < len(layers):
        raise ValueError(f"visual_layer {layer_index} is outside the tower's {len(layers)} layers")
    attention = layers[layer_index].self_attn
    width = vision_model.config.hidden_size
    with torch.no_grad():
        for projection in (attention.q_proj, attention.k_proj):
            projection.weight.normal_(0.0, math.sqrt(logit_std / width))
            projection.bias.zero_()


def build_random_llava(
    geometry: Geometry,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    cls_logit_std: float = 2.0,
) -> tuple[None, LlavaLlamaForCausalLM, CLIPImageProcessorPil, int]:
    """``(tokenizer, model, image_processor, context_len)`` like ``load_pretrained_model``; there is no tokenizer.

    Parameters are created on ``device`` in ``dtype`` directly: a full 7B model drawn on the CPU in fp32 first would
    take 28 GB and minutes.
    """
    torch.manual_seed(seed)
    config = llava_config(geometry)
    vision_config = CLIPVisionConfig(**geometry.vision, attn_implementation="sdpa")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaLlamaForCausalLM(config)
            clip = CLIPVisionModel(vision_config)
            sharpen_cls_scores(clip, geometry.visual_layer, cls_logit_std)
    finally:
        torch.set_default_dtype(default_dtype)
    tower = model.get_vision_tower()  # built with delay_load: it takes the CLIP model made here instead of a folder
    tower.load_from_memory(clip, image_processor(geometry))
    model.set_pruning(PruningConfig.from_dict(config.pruning))
    model.eval()
    return None, model, tower.image_processor, geometry.llm["max_position_embeddings"]


# ---- prompts and images ----------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def synthetic_images(count: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """Coloured shapes on a plain background: objects and background, like a photo, without any data set."""
    rng = torch.Generator().manual_seed(seed)

    def uniform(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    width, height = size
    images = []
    for _ in range(count):
        image = Image.new("RGB", size, tuple(uniform(0, 255) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(uniform(3, 8)):
            x0, y0 = uniform(0, width - 2), uniform(0, height - 2)
            box = (x0, y0, uniform(x0 + 1, width - 1), uniform(y0 + 1, height - 1))
            colour = tuple(uniform(0, 255) for _ in range(3))
            (draw.ellipse if uniform(0, 1) else draw.rectangle)(box, fill=colour)
        images.append(image)
    return images


def folder_images(folder: str | Path, count: int) -> list[Image.Image]:
    """The first ``count`` images of a folder, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--image-folder {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < count:
        raise ValueError(f"--image-folder {folder}: {len(files)} image(s), the largest batch needs {count}")
    return [Image.open(p).convert("RGB") for p in files[:count]]


def prompt_ids(count: int, text_tokens: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[count, text_tokens + 1] ids: BOS, text, one image placeholder mid-prompt (where LLaVA's template puts it).

    Only lengths matter for speed, so the text is random ids above the special ones (0-2) and needs no tokenizer;
    every sample has the same text length, so only stage 1 makes prompt lengths differ within a batch.
    """
    if vocab_size < 4:
        raise ValueError(f"vocab_size {vocab_size} leaves no ids above the special ones (0-2)")
    rng = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab_size, (count, text_tokens), generator=rng)
    text[:, 0] = 1
    split = max(1, text_tokens // 2)
    image = torch.full((count, 1), IMAGE_TOKEN_INDEX, dtype=torch.long)
    return torch.cat([text[:, :split], image, text[:, split:]], dim=1)


def flatten_crops(pixel_values: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """[crops, 3, H, W] for the tower and the number of crops of each image (1 for LLaVA-1.5, more for anyres)."""
    if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 4:
        return pixel_values, [1] * pixel_values.shape[0]
    per_image = [p if p.ndim == 4 else p.unsqueeze(0) for p in pixel_values]
    return torch.cat(per_image), [p.shape[0] for p in per_image]


@dataclass
class PromptBatch:
    """Prompts (one image placeholder each) and their processed images; a smaller batch is the first samples."""

    input_ids: torch.Tensor  # [batch, L]
    pixel_values: torch.Tensor | list[torch.Tensor]  # what process_images returned, on the model's device
    image_sizes: list[tuple[int, int]]

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.ones_like(self.input_ids)  # every prompt has the same length: no padding

    def first(self, size: int) -> PromptBatch:
        return self.rows(0, size)

    def rows(self, start: int, stop: int) -> PromptBatch:
        return PromptBatch(self.input_ids[start:stop], self.pixel_values[start:stop], self.image_sizes[start:stop])


def build_prompt_batch(model, processor, images: list[Image.Image], text_tokens: int, seed: int = 0) -> PromptBatch:
    """Pixels through the checkpoint's own preprocessing (pad, anyres, ...), as llava.inference does."""
    pixels = process_images(images, processor, model.config)
    device, dtype = model.device, model.dtype
    pixels = [p.to(device, dtype) for p in pixels] if isinstance(pixels, list) else pixels.to(device, dtype)
    ids = prompt_ids(len(images), text_tokens, model.config.vocab_size, seed).to(device)
    return PromptBatch(ids, pixels, [image.size for image in images])


# ---- the four rows ---------------------------------------------------------------------------------------------


@dataclass
class RowPlan:
    """What the pruned rows use at one batch size, and what stage 1 will keep there."""

    batch: int
    alpha: float
    topk: int  # per crop, for the 'topk' row: ours' mean count per crop on the same images
    visual_tokens: float  # per image, predicted for 'ours'
    inflection_mean: float
    reachable: bool  # the target (if any) is met within 5 % (or 1 token)


def inflection_points(model, prompts: PromptBatch, base: PruningConfig) -> tuple[torch.Tensor, list[int], int]:
    """(i* of every crop, crops per image, patches per crop) from one pass of the model's own image merge.

    The merge is the model's (LLaVA-1.5 or 1.6), so i* is what its stage 1 sees; LLaVA-1.6 reports it per crop
    (``crop_inflection``), on the crop's unpadded patches.
    """
    ids, pixels, sizes = prompts.input_ids, prompts.pixel_values, prompts.image_sizes
    longtail = base.merged(visual_pruning="longtail")
    with torch.inference_mode():
        merged = model.merge_multimodal(ids, prompts.attention_mask, None, pixels, sizes, "left", longtail)
    per_image = [s.get("crop_inflection") or [s["inflection"]] for s in merged.token_stats]
    inflection = torch.tensor([i for crops in per_image for i in crops], dtype=torch.long)
    return inflection, [len(crops) for crops in per_image], model.get_vision_tower().num_patches


def plan_rows(
    inflection: torch.Tensor, crops: list[int], n: int, base: PruningConfig, batch: int, target: float | None
) -> RowPlan:
    """alpha and top-k for the first ``batch`` images: each batch size keeps ``target`` tokens per image on average.

    Without a target, alpha is the checkpoint's (``base.alpha``) and only top-k follows ours' count. Exact for
    LLaVA-1.5; for LLaVA-1.6 the prediction leaves out the newline tokens and counts a crop's cap as n even where
    unpad leaves fewer patches, so the reported rows carry the counts actually kept.
    """
    if target is not None and not 1 <= target <= n * max(crops):
        raise ValueError(f"--target-visual-tokens {target:g} is outside 1..{n * max(crops)} visual tokens per image")
    mine = inflection[: sum(crops[:batch])]
    min_keep = base.visual_min_keep

    def mean_per_image(alpha: float) -> float:
        return float(longtail_keep(mine, n, alpha, min_keep).sum()) / batch

    # 3 decimals: the alphas the suite reports and docs/speed.md quotes
    alpha = base.alpha if target is None else alpha_for_target(mean_per_image, target, decimals=3)
    kept = longtail_keep(mine, n, alpha, min_keep)
    per_image = float(kept.sum()) / batch
    return RowPlan(
        batch=batch,
        alpha=alpha,
        topk=max(1, round(float(kept.float().mean()))),
        visual_tokens=per_image,
        inflection_mean=float(mine.float().mean()),
        reachable=target is None or abs(per_image - target) <= max(1.0, 0.05 * target),
    )


def row_configs(base: PruningConfig, plan: RowPlan) -> dict[str, PruningConfig]:
    """The four rows; every other setting (scoring layer, score mode, stage 2 ratios) is the checkpoint's."""
    off = base.merged(visual_pruning="none", kv_pruning="none")
    ours = off.merged(visual_pruning="longtail", alpha=plan.alpha)
    return {
        "none": off,
        "topk": off.merged(visual_pruning="topk", visual_topk=plan.topk),
        "ours-s1": ours,
        "ours-s12": ours.merged(kv_pruning="h2o"),
    }

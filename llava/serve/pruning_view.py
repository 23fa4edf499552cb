"""What the web demo draws for one image: per crop, the picture as the tower saw it with the pruned patches greyed
out (paper Fig. 6) and the sorted CLS curve with i* and k marked (Fig. 3), from pruning/visualize.py.

The pictures come from the vision-side pass the model itself runs for a prompt: ``CLIPVisionTower.select`` for
LLaVA-1.5, ``select_crop_tokens`` with ``encode_anyres``'s candidates for LLaVA-1.6, with the same question text and,
for the 'random' rule, the same draw (``reset_random_draw``). The server checks the kept counts against the token
statistics of the answer (``check_against_stats``), so a picture never shows a selection the answer did not use.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from llava.mm_utils import get_anyres_image_grid_shape, process_images
from llava.model.anyres import crop_candidates, image_grid, merge_type_of, select_crop_tokens
from pruning import PruningConfig
from pruning.strategies import is_keep_rule, scoring_config
from pruning.visualize import grey_out_patches, similarity_curve_figure, tower_view

_GAP = 16  # pixels between LLaVA-1.6's base view and its grid crops


@dataclass
class CropView:
    """One crop (the whole image for LLaVA-1.5) as stage 1 left it."""

    title: str  # "image", "base view", "crop row 1, column 2"
    position: tuple[int, int] | None  # (row, column) of a LLaVA-1.6 grid crop, 0-based; None: the whole image
    view: Image.Image  # the crop as the tower saw it (after resize / pad / crop)
    grid_side: int  # patches per side
    selected: int  # tokens the vision-side method kept for this crop (the count in the token statistics)
    shown: list[int]  # grid position of each kept token that reaches the LLM (under unpad: those in the image);
    # a merging method names a representative patch per token, so a position can repeat
    candidates: int  # patches that could be kept (fewer than grid_side**2 where unpad cuts padding away)
    inflection: int | None  # i* on this crop's curve (None: the method computes none)
    curve: torch.Tensor | None  # [candidates] CLS scores of a keep rule, for the Fig. 3 curve

    @property
    def caption(self) -> str:
        text = f"{self.title}: {len(self.shown)} tokens kept from {self.candidates} patches"
        return text + (f", i* = {self.inflection}" if self.inflection else "")


def reset_random_draw(model, config: PruningConfig) -> None:
    """Start the 'random' rule's generator again at its seed, as a freshly loaded model (``run_llava``) draws.
    Models without LLaVA's CLIP tower (InternVL2) keep their own generator as it is."""
    get_tower = getattr(model, "get_vision_tower", None)
    draw = getattr(get_tower(), "random_generator", None) if get_tower is not None else None
    generator = draw(config) if draw is not None else None
    if generator is not None:
        generator.manual_seed(config.seed)


def crop_views(model, processor, image: Image.Image, text: str, config: PruningConfig) -> list[CropView]:
    """Stage 1 on one image with ``config`` (``text``: the question, for text-guided methods), per crop."""
    tower = model.get_vision_tower()
    projector = model.get_model().mm_projector
    pixels = process_images([image], processor, model.config)
    if isinstance(pixels, list) or pixels.ndim == 5:
        return _anyres_views(model, processor, pixels[0], image.size, text, config)
    reset_random_draw(model, config)
    with torch.no_grad():
        out = tower.select(pixels.to(device=tower.device, dtype=tower.dtype), config, projector, [text])
    kept = int(out.kept[0])
    n = tower.num_patches
    scoring = is_keep_rule(config.visual_pruning) and out.scores is not None
    inflection = int(out.inflection[0]) if out.inflection is not None else None
    return [
        CropView(
            title="image",
            position=None,
            view=tower_view(pixels[0], processor.image_mean, processor.image_std),
            grid_side=tower.num_patches_per_side,
            selected=kept,
            shown=out.indices[0][:kept].tolist(),
            candidates=n,
            inflection=inflection,
            curve=out.scores[0].float().cpu() if scoring else None,
        )
    ]


def _anyres_views(
    model, processor, crops: torch.Tensor, size: tuple[int, int], text: str, config: PruningConfig
) -> list[CropView]:
    """LLaVA-1.6: the crops of one image through ``select_crop_tokens`` with the candidates ``encode_anyres``
    gives it (under spatial_unpad, the grid crops' patches inside the image)."""
    tower = model.get_vision_tower()
    side, count = tower.num_patches_per_side, crops.shape[0]
    crops = crops.to(device=tower.device, dtype=tower.dtype)
    merge_type = merge_type_of(model.config)
    grid = image_grid(model.config, size, tower.config.image_size, count, 0) if count > 1 else None
    unpad = merge_type == "spatial_unpad" and grid is not None
    candidates = [None] + (crop_candidates(grid, side, size) if unpad else [None] * (count - 1))
    reset_random_draw(model, config)
    with torch.no_grad():
        projector = model.get_model().mm_projector
        tokens = select_crop_tokens(tower, projector, crops, [count], config, candidates, [text])[0]
        curves = tower.select(crops, scoring_config(config)).scores if is_keep_rule(config.visual_pruning) else None
    cols = grid[0] if grid is not None else _grid_columns(model.config, size, tower.config.image_size, count)
    views = []
    for crop in range(count):
        mask = candidates[crop]
        allowed = torch.ones(side * side, dtype=torch.bool) if mask is None else mask.cpu()
        picked = tokens.indices[crop].cpu()
        shown = picked[allowed[picked]].tolist()
        inflection = tokens.inflection[crop]
        curve = None
        if curves is not None and inflection:
            curve = curves[crop].float().cpu()[allowed]
        position = None if crop == 0 else divmod(crop - 1, cols)
        title = "base view" if position is None else f"crop row {position[0] + 1}, column {position[1] + 1}"
        views.append(
            CropView(
                title=title,
                position=position,
                view=tower_view(crops[crop], processor.image_mean, processor.image_std),
                grid_side=side,
                selected=int(picked.numel()),
                shown=shown,
                candidates=int(allowed.sum()),
                inflection=inflection,
                curve=curve,
            )
        )
    return views


def _grid_columns(model_config, size: tuple[int, int], crop_pixels: int, count: int) -> int:
    """Crops across, for the titles of a 'flat' layout (which needs no grid itself)."""
    pinpoints = getattr(model_config, "image_grid_pinpoints", None)
    if count <= 1 or pinpoints is None:
        return 1
    return get_anyres_image_grid_shape(size, pinpoints, crop_pixels)[0]


def check_against_stats(views: list[CropView], stats: dict[str, Any]) -> str | None:
    """What differs between the pictures and an answer's token statistics (None when they agree): the per-crop
    counts for LLaVA-1.6 (``crop_kept``), the image's count for LLaVA-1.5 (``visual_after``)."""
    selected = [view.selected for view in views]
    expected = stats.get("crop_kept", [stats.get("visual_after")])
    if selected != list(expected):
        return f"the pictures show {selected} kept tokens per crop, the answer used {list(expected)}"
    return None


def kept_picture(view: CropView, scale_to: int = 336) -> Image.Image:
    """The crop with the pruned patches greyed out, enlarged (nearest neighbour) when the tower's input is small."""
    picture = grey_out_patches(view.view, view.shown, view.grid_side)
    if picture.width < scale_to:
        factor = -(-scale_to // picture.width)
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    return picture


def curve_picture(view: CropView) -> Image.Image | None:
    """The Fig. 3 curve of one crop as an image, or None when the method scores no CLS curve (or finds no i*)."""
    if view.curve is None or not view.inflection or not view.shown:
        return None
    import matplotlib.pyplot as plt  # the [serve] extra; similarity_curve_figure selected the Agg backend

    figure = similarity_curve_figure(view.curve, view.inflection, len(view.shown))
    if view.title != "image":  # LLaVA-1.6: say which crop
        figure.axes[0].set_title(view.title)
        figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def kept_layout(views: list[CropView]) -> Image.Image:
    """Every crop's kept-patch picture in one image: LLaVA-1.5's single picture, or LLaVA-1.6's base view on the
    left and the grid crops to its right where they lie in the image (a thin line between crops)."""
    pictures = [kept_picture(view) for view in views]
    grid = [(view.position, picture) for view, picture in zip(views, pictures) if view.position is not None]
    if not grid:
        return pictures[0]
    base = pictures[0]
    width, height = grid[0][1].size
    rows = 1 + max(row for (row, _), _ in grid)
    cols = 1 + max(col for (_, col), _ in grid)
    left = base.width + _GAP
    canvas = Image.new("RGB", (left + cols * (width + 2) - 2, max(base.height, rows * (height + 2) - 2)), "white")
    canvas.paste(base, (0, 0))
    for (row, col), picture in grid:
        canvas.paste(picture, (left + col * (width + 2), row * (height + 2)))
    return canvas


def curves_layout(views: list[CropView]) -> Image.Image | None:
    """The Fig. 3 curves of the crops that have one, two to a row (None when the method scores no CLS curve)."""
    pictures = [picture for view in views if (picture := curve_picture(view)) is not None]
    if not pictures:
        return None
    width, height = pictures[0].size
    cols = min(2, len(pictures))
    rows = -(-len(pictures) // cols)
    canvas = Image.new("RGB", (cols * width, rows * height), "white")
    for index, picture in enumerate(pictures):
        canvas.paste(picture, ((index % cols) * width, (index // cols) * height))
    return canvas

"""Pictures of stage 1 (paper Fig. 3 and Fig. 6), for the docs and for eyeballing a checkpoint. The command that
draws them for one image with a checkpoint's tower is ``python -m eval.tools.visualize``.

matplotlib is an optional extra (``pip install .[plot]``), so it is imported inside the plotting function, with the
file-only Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

_PRUNED_GREY = 128  # pruned patches are blended towards this grey
_PRUNED_BLEND = 0.8  # share of grey in a pruned patch: dark enough to read as removed, faint content stays visible


def similarity_curve_figure(scores_1d: torch.Tensor | Sequence[float], inflection: int, kept: int):
    """The CLS-similarity curve sorted descending, with the split point i* and the kept count k marked and both
    named in the legend (Fig. 3). Returns the matplotlib Figure; the caller saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = torch.as_tensor(scores_1d, dtype=torch.float64).flatten().sort(descending=True).values.tolist()
    n = len(curve)
    if not 1 <= inflection <= n or not 1 <= kept <= n:
        raise ValueError(f"need 1 <= inflection, kept <= n = {n}, got inflection={inflection}, kept={kept}")
    positions = range(1, n + 1)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(positions, curve, color="tab:blue", linewidth=1.5, label="CLS similarity, sorted")
    axes.fill_between(positions[:kept], curve[:kept], color="tab:blue", alpha=0.15, label="kept patches (rank <= k)")
    axes.axvline(inflection, color="tab:red", linestyle="--", linewidth=1, label=f"inflection i* = {inflection}")
    # drawn even where k = i*: the legend then still says what k is
    axes.axvline(kept, color="tab:green", linestyle=":", linewidth=1.5, label=f"kept count k = {kept}")
    axes.set_xlabel("patch rank (1 = most similar to CLS)")
    axes.set_ylabel("similarity")
    axes.set_xlim(1, max(n, 2))
    axes.legend(loc="upper right", frameon=False)
    figure.tight_layout()
    return figure


def plot_similarity_curve(
    scores_1d: torch.Tensor | Sequence[float], inflection: int, kept: int, path: str | Path
) -> Path:
    """Save the Fig. 3 curve (``similarity_curve_figure``) as a PNG."""
    import matplotlib.pyplot as plt

    figure = similarity_curve_figure(scores_1d, inflection, kept)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path


def grey_out_patches(pil_image: Image.Image, indices: torch.Tensor | Sequence[int], grid_side: int) -> Image.Image:
    """The image with every patch not in ``indices`` (raster order over a grid_side x grid_side grid; -1 = padding,
    ignored) blended to grey. Pass the image as the tower saw it (after resize/crop/pad), or the grid will not match.
    """
    if grid_side < 1:
        raise ValueError(f"grid_side must be >= 1, got {grid_side}")
    kept = {int(i) for i in torch.as_tensor(indices).flatten().tolist() if int(i) >= 0}
    out_of_range = sorted(i for i in kept if i >= grid_side * grid_side)
    if out_of_range:
        raise ValueError(f"patch indices {out_of_range[:5]} are outside a {grid_side}x{grid_side} grid")
    image = pil_image.convert("RGB")
    grey = Image.new("RGB", image.size, (_PRUNED_GREY,) * 3)
    faded = Image.blend(image, grey, _PRUNED_BLEND)
    width, height = image.size
    for index in range(grid_side * grid_side):
        if index in kept:
            continue
        row, col = divmod(index, grid_side)
        box = (col * width // grid_side, row * height // grid_side)
        box += ((col + 1) * width // grid_side, (row + 1) * height // grid_side)
        image.paste(faded.crop(box), box[:2])
    return image


def plot_kept_patches(
    pil_image: Image.Image, indices: torch.Tensor | Sequence[int], grid_side: int, path: str | Path
) -> Path:
    """Save the kept-patch picture (Fig. 6) pixel for pixel, with no axes in the way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grey_out_patches(pil_image, indices, grid_side).save(path)
    return path


def tower_view(pixel_values: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]) -> Image.Image:
    """Undo the processor's normalisation: the [3, H, W] crop exactly as the tower saw it."""
    mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
    pixels = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))

"""VisionZip (Yang et al., arXiv 2412.04467), after the official code: dvlab-research/VisionZip (now
JIA-Lab-research/VisionZip) at 3151f6df4fca36a4cd1c985e5956e725b1f9ad02, ``visionzip/clip_encoder.py``,
``visionzip/utils.py``, ``visionzip/main.py``.

Per image, from the tower layer that produces LLaVA's select-layer features (the official reads
``attentions[-2]`` and ``encoder.layers[-2]``'s keys, the layer whose output is hidden_states[-2]):

- Dominant tokens: CLS plus the ``dominant - 1`` patches with the largest CLS attention summed over heads (the
  layer's own per-head softmax over all 1 + n keys), in raster order (``visionzip(model, dominant=54)`` keeps CLS +
  53 patches).
- Contextual tokens: the R = n - (dominant - 1) other patches, in raster order, are compared by their keys averaged
  over heads (L2-normalised); ``contextual`` targets are taken at the stride ``max(1, R // contextual)``; every
  other token goes to its most similar target (first on ties), and each target becomes
  ``x_target + mean(x assigned)`` (the mean is 0 when nothing is assigned).
- Output: [CLS, dominant patches, contextual tokens], select-layer features, ``dominant + contextual`` tokens.

Budgets: the README's 54 + 10 for 64 tokens (our default); with ``--visual-tokens T`` the split keeps that ratio,
``contextual = round(10 T / 64)``, which gives the paper's 108 + 20 for 128 and 162 + 30 for 192.

Deviations (docs/baselines.md): scores and keys are computed in fp32 from the layer's weights (no
``output_attentions``, no eager attention, no monkey-patching); under ``mm_vision_select_feature cls_patch`` the CLS
token is the one ``select_visual_tokens`` puts first instead of a second copy; on LLaVA-1.6 each crop's tokens go
through this repository's layout (the official VisionZip appends CLS and contextual tokens after the grid and drops
the newlines).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pruning.baselines.common import fp32, gather_rows, token_budget
from pruning.config import PruningConfig, PruningConfigError
from pruning.registry import Param, at_least
from pruning.scoring import cls_patch_scores
from pruning.strategies import VISUAL_TOPK
from pruning.visual import ReducedPatches, VisionContext, register_vision_method

VISIONZIP_DOMINANT = Param(
    "visionzip_dominant", int, 54, "dominant tokens per image (crop), CLS included", check=at_least(1)
)
VISIONZIP_CONTEXTUAL = Param(
    "visionzip_contextual", int, 10, "contextual tokens merged from the rest", check=at_least(1)
)


def _check_split(config: PruningConfig) -> None:
    chosen = (config.visionzip_dominant, config.visionzip_contextual)
    if config.visual_topk is not None and chosen != (VISIONZIP_DOMINANT.default, VISIONZIP_CONTEXTUAL.default):
        raise PruningConfigError(
            f"visual_pruning='visionzip' takes its budget either from visual_topk ({VISUAL_TOPK.cli_flag}) or from "
            f"visionzip_dominant and visionzip_contextual ({VISIONZIP_DOMINANT.cli_flag}, "
            f"{VISIONZIP_CONTEXTUAL.cli_flag}), not both; got {config.visual_topk} and {chosen}"
        )


def split(config: PruningConfig, n: int) -> tuple[int, int]:
    """(dominant with CLS, contextual) for a tower of n patches, checked."""
    budget = token_budget(config, n, "visionzip")
    if budget is None:
        dominant, contextual = config.visionzip_dominant, config.visionzip_contextual
        source = f"{VISIONZIP_DOMINANT.cli_flag} {dominant}, {VISIONZIP_CONTEXTUAL.cli_flag} {contextual}"
    else:
        contextual = max(1, (5 * budget + 16) // 32)  # round(budget * 10 / 64), halves up
        dominant = budget - contextual
        source = f"{VISUAL_TOPK.cli_flag} {budget}"
        if dominant < 1:
            raise PruningConfigError(
                f"visual_pruning 'visionzip' needs visual_topk >= 2 (CLS and one contextual token), got {budget} "
                f"({VISUAL_TOPK.cli_flag})"
            )
    if dominant - 1 + contextual > n:
        raise PruningConfigError(
            f"visual_pruning 'visionzip': {dominant - 1} dominant patches and {contextual} contextual tokens need "
            f"{dominant - 1 + contextual} of the {n} patches of an image (crop) ({source})"
        )
    return dominant, contextual


@register_vision_method(
    "visionzip",
    params=(VISIONZIP_DOMINANT, VISIONZIP_CONTEXTUAL, VISUAL_TOPK),
    description="VisionZip: CLS and the patches with the most CLS attention (dominant), the rest merged into "
    "contextual tokens by key similarity; 54 + 10 by default, visual_topk split in that ratio.",
    check=_check_split,
    detail=lambda c: f"k={c.visual_topk}" if c.visual_topk else f"{c.visionzip_dominant}+{c.visionzip_contextual}",
    reads_text=False,
)
def visionzip(context: VisionContext) -> ReducedPatches:
    n = context.num_patches
    dominant, contextual = split(context.config, n)
    if context.select_index < 1:
        raise ValueError(
            "visionzip scores with the layer that produces the select-layer features; select layer 0 has none"
        )
    layer = context.layers[context.select_index - 1]
    hidden = context.hidden_states(context.select_index - 1)  # that layer's input [B, 1+n, D]
    features = context.features()  # [B, 1+n, C]
    batch = features.shape[0]
    device = features.device

    scores = cls_patch_scores(layer, hidden, mode="heads")  # [B, n]: per-head CLS rows, averaged (sum / heads)
    metric = _head_mean_keys(layer, hidden)[:, 1:]  # [B, n, head_dim]
    positions = torch.arange(n, device=device)
    top = torch.topk(scores, dominant - 1, dim=-1).indices  # [B, dominant - 1]
    is_dominant = torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, top, True)
    # dominant patches in raster order, then the rest in raster order
    order = torch.sort(torch.where(is_dominant, positions, n + positions), dim=-1).values % n
    dominant_indices, rest = order[:, : dominant - 1], order[:, dominant - 1 :]  # [B, d-1], [B, R]

    remaining = rest.shape[1]
    step = max(1, remaining // contextual)
    targets = torch.arange(0, remaining, step, device=device)[:contextual]  # positions within the rest
    is_target = torch.zeros(remaining, dtype=torch.bool, device=device)
    is_target[targets] = True
    others = torch.nonzero(~is_target).flatten()
    with torch.no_grad():
        rest_metric = F.normalize(gather_rows(metric, rest), dim=-1)  # [B, R, head_dim]
        similarity = rest_metric[:, others] @ rest_metric[:, targets].transpose(1, 2)  # [B, R - c, c]
        assign = F.one_hot(similarity.argmax(dim=-1), contextual).float()  # [B, R - c, c]
        counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [B, c, 1]
    rest_features = gather_rows(features[:, 1:].float(), rest)  # [B, R, C]
    merged = rest_features[:, targets] + torch.bmm(assign.transpose(1, 2), rest_features[:, others]) / counts

    patches = gather_rows(features[:, 1:].float(), dominant_indices)
    parts = [patches, merged]
    index_parts = [dominant_indices, rest[:, targets]]
    if context.select_feature != "cls_patch":  # CLS is a dominant token; cls_patch puts it first already
        # laid out at the patch CLS attends to most (it has no patch of its own)
        parts.insert(0, features[:, :1].float())
        index_parts.insert(0, scores.argmax(dim=-1, keepdim=True))
    tokens = torch.cat(parts, dim=1).to(features.dtype)
    indices = torch.cat(index_parts, dim=1)
    mask = torch.ones(indices.shape, dtype=torch.bool, device=device)
    return ReducedPatches(tokens, mask, indices, scores=scores)


def _head_mean_keys(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's keys (``k_proj`` of the layer-normed input, bias included) averaged over heads: [B, 1+n, head_dim]."""
    attn = layer.self_attn
    norm = layer.layer_norm1
    with torch.no_grad():
        tokens = F.layer_norm(hidden.float(), norm.normalized_shape, fp32(norm.weight), fp32(norm.bias), norm.eps)
        keys = F.linear(tokens, fp32(attn.k_proj.weight), fp32(attn.k_proj.bias))  # [B, 1+n, D]
        batch, length, dim = keys.shape
        return keys.view(batch, length, attn.num_heads, dim // attn.num_heads).mean(dim=2)

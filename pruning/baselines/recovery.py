"""Recoverable Compression (Chen et al., AAAI 2025, arXiv 2409.01179; the authors of the paper this repository
implements), after the official code: banjiuyufen/Recoverable-Compression at
d927594467a0eff8bdf35e9c933f1423a4b1b760, ``llava/model/multimodal_encoder/clip_encoder.py``
(``token_recycling_with_text_in_vision_and_clustring``, the method its ``CLIPVisionTower.forward`` calls,
``get_score_by_text``, ``CLIPTextEncoder``, ``find_max_derivative_position``), built on LLaVA-PruMerge.

Per image, with ``a`` the CLS attention of the last tower layer and the unit keys of that layer (PruMerge's,
``pruning.baselines.prumerge.cls_attention_and_keys``), ``x`` the select-layer features, and the question's CLIP text
embedding ``t``:

1. visual filter: the ``k_v`` patches of largest ``a``, ``k_v`` = the number of Local Outlier Factor outliers of ``a``
   (sklearn's LocalOutlierFactor, 20 neighbours, contamination 'auto': LOF > 1.5);
2. text recovery: ``s_j = cos(t, P h_j) / sqrt(P)`` with ``h`` the last layer's output and ``P`` CLIP's visual
   projection; the visually kept patches get the minimum of ``s``; the ``int((n - k_v) o_t / n)`` other patches of
   largest ``s`` are kept too, ``o_t`` the LOF outliers (20 neighbours) of the filled-in ``s``;
3. secondary recovery: among the R remaining patches, the LOF outliers of their ``a`` (10 neighbours) become merge
   centres (largest ``a`` first); each centre i adds ``sum a_j x_j`` over the 32 other remaining patches j of largest
   ``cos(k_i, k_j) + 50 s_j``; one extra token ``sum a_j x_j`` over the remaining patches that are not centres;
4. output: [kept patches in raster order, the centres, the extra token] (the extra token only when there are
   centres, as the official).

Deviations (docs/baselines.md): the question itself is embedded (the official embeds the first line of the whole
decoded prompt, which on LLaVA-1.5's templates is the system prompt); LOF is computed per image in torch; two
indexing slips of the official code are corrected unless ``--recovery-released-indexing true``: it takes
``int(D o / R)`` centres (D the feature width, 1024, where the count of outliers was meant) and the keys of the
remaining patches by their position in the remaining list instead of their patch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pruning.baselines.common import gather_rows
from pruning.baselines.prumerge import cls_attention_and_keys
from pruning.registry import Param, at_least
from pruning.visual import ReducedPatches, VisionContext, register_vision_method

LOF_THRESHOLD = 1.5  # sklearn's contamination='auto': an outlier has a local outlier factor above 1.5
LOF_EPSILON = 1e-10  # sklearn's guard in the local reachability density

RECOVERY_LOF_NEIGHBOURS = Param(
    "recovery_lof_neighbours", int, 20, "LOF neighbours of the visual and the text filter", check=at_least(1)
)
RECOVERY_MERGE_LOF_NEIGHBOURS = Param(
    "recovery_merge_lof_neighbours",
    int,
    10,
    "LOF neighbours choosing the merge centres among the rest",
    check=at_least(1),
)
RECOVERY_NEIGHBOURS = Param(
    "recovery_neighbours",
    int,
    32,
    "tokens each merge centre absorbs (key cosine + weighted text score)",
    check=at_least(1),
)
RECOVERY_TEXT_WEIGHT = Param(
    "recovery_text_weight", float, 50.0, "weight of the text score when a centre picks its tokens", check=at_least(0)
)
RECOVERY_RELEASED_INDEXING = Param(
    "recovery_released_indexing",
    bool,
    False,
    "reproduce the released code's two indexing slips (int(D r) centres, keys by position in the rest)",
)


@register_vision_method(
    "recovery",
    params=(
        RECOVERY_LOF_NEIGHBOURS,
        RECOVERY_MERGE_LOF_NEIGHBOURS,
        RECOVERY_NEIGHBOURS,
        RECOVERY_TEXT_WEIGHT,
        RECOVERY_RELEASED_INDEXING,
    ),
    description="Recoverable Compression: CLS-attention outliers (LOF) of the last tower layer, plus the patches "
    "whose CLIP embedding is an outlier in similarity to the question, the rest merged around outlier centres "
    "(adaptive count; needs the question and the CLIP text tower).",
    detail=lambda c: "adaptive, released indexing" if c.recovery_released_indexing else "adaptive",
)
def recovery(context: VisionContext) -> ReducedPatches:
    config = context.config
    features = context.features()[:, 1:]  # [B, n, C]
    batch, n, channels = features.shape
    device = features.device
    similarity = text_similarity(context)  # [B, n]
    cls_attention, keys = cls_attention_and_keys(context)  # [B, n], unit keys [B, n, D]
    everything = torch.ones(batch, n, dtype=torch.bool, device=device)

    # 1. visual filter; 2. text recovery among the others
    visual_count = [int(n * (count / n)) for count in lof_outlier_counts(cls_attention, everything, config)]
    visual = top_mask(cls_attention, visual_count, everything)
    filled = torch.where(visual, similarity.min(dim=-1, keepdim=True).values, similarity)
    text_outliers = lof_outlier_counts(filled, everything, config)
    text_count = [int((n - v) * (count / n)) for v, count in zip(visual_count, text_outliers)]
    kept = visual | top_mask(filled, text_count, ~visual)

    # 3. secondary recovery: merge centres among the rest
    rest = ~kept
    rest_size = rest.sum(dim=1).tolist()
    rest_outliers = lof_outlier_counts(cls_attention, rest, config, merge=True)
    if config.recovery_released_indexing:
        centre_count = [
            min(size, int(channels * (count / size))) if size else 0 for size, count in zip(rest_size, rest_outliers)
        ]
    else:
        centre_count = [int(size * (count / size)) if size else 0 for size, count in zip(rest_size, rest_outliers)]
    centre = top_mask(cls_attention, centre_count, rest)

    # output slots: kept patches by position, centres by descending a, then the extra token
    positions = torch.arange(n, device=device)
    order_a = torch.sort(cls_attention, dim=-1, descending=True, stable=True).indices
    rank_a = torch.empty_like(order_a).scatter_(1, order_a, positions.expand(batch, n))
    slot_key = torch.where(kept, positions, torch.where(centre, n + rank_a, 3 * n))
    slots = torch.sort(slot_key, dim=-1).indices  # [B, n]
    kept_count = kept.sum(dim=1)
    centres = torch.tensor(centre_count, device=device)
    tokens = kept_count + centres
    extra = (centres > 0) | (tokens == 0)  # the official adds it only after centres; never leave an image empty
    length = int((tokens + extra.long()).max())
    width = min(length, n)
    indices = slots[:, :width]
    values = features.float()
    out = torch.zeros(batch, length, channels, device=device)
    out[:, :width] = gather_rows(values, indices)

    if int(centres.max()) > 0:
        key_of = keys
        if config.recovery_released_indexing:
            # the official gathers the layer's patch keys at positions in the remaining list, not at the patches
            in_rest = (torch.cumsum(rest.long(), dim=1) - 1).clamp(min=0)
            key_of = gather_rows(keys, in_rest)
        merged = merge_centres(values, key_of, cls_attention, similarity, rest, indices, kept_count, centres, config)
        is_centre = (positions[:width] >= kept_count[:, None]) & (positions[:width] < tokens[:, None])
        out[:, :width] = torch.where(is_centre.unsqueeze(-1), merged, out[:, :width])

    leftover = rest & ~centre
    extra_token = torch.einsum("bn,bnc->bc", torch.where(leftover, cls_attention, 0.0), values)  # [B, C]
    extra_index = torch.where(
        leftover.any(dim=1),
        torch.where(leftover, cls_attention, -1.0).argmax(dim=1),
        torch.full((batch,), n - 1, device=device),
    )
    full_indices = torch.full((batch, length), -1, dtype=torch.long, device=device)
    full_indices[:, :width] = indices
    slot = torch.arange(length, device=device).unsqueeze(0)
    at_extra = extra.unsqueeze(1) & (slot == tokens.unsqueeze(1))
    out = torch.where(at_extra.unsqueeze(-1), extra_token.unsqueeze(1), out)
    full_indices = torch.where(at_extra, extra_index.unsqueeze(1), full_indices)
    mask = slot < (tokens + extra.long()).unsqueeze(1)
    full_indices = torch.where(mask, full_indices, -1)
    out = torch.where(mask.unsqueeze(-1), out, 0.0)
    return ReducedPatches(out.to(features.dtype), mask, full_indices, scores=cls_attention)


def text_similarity(context: VisionContext) -> torch.Tensor:
    """s [B, n] fp32: cosine of each patch's CLIP embedding (the last layer's output, no post-layernorm, projected as
    the official's ``CLIPVisionModelWithProjection(...).last_hidden_state``) with its question's, over sqrt(P)."""
    texts = context.text
    batch = context.pixel_values.shape[0]
    if texts is None:
        raise ValueError(
            "visual_pruning 'recovery' is guided by the question, and none reached the vision tower: pass text= (one "
            "question per image) to select_visual_tokens; generate_answers and every runner pass it, a forward pass "
            "(training, model(...)) does not"
        )
    if len(texts) != batch:
        raise ValueError(f"visual_pruning 'recovery' got {len(texts)} questions for {batch} images")
    if context.text_tower is None:
        raise ValueError(
            "visual_pruning 'recovery' needs CLIP's text tower to embed the question: pass text_tower= to "
            "select_visual_tokens (the CLIP vision tower of a LLaVA model passes its folder's)"
        )
    hidden = context.hidden_states(len(context.layers))[:, 1:]  # [B, n, D]
    with torch.no_grad():
        patches = F.normalize(context.text_tower.project_patches(hidden).float(), dim=-1)  # [B, n, P]
        question = F.normalize(context.text_tower.embed_texts(list(texts)).float(), dim=-1)  # [B, P]
        return torch.einsum("bnp,bp->bn", patches, question.to(patches.device)) * patches.shape[-1] ** -0.5


def top_mask(values: torch.Tensor, counts: Sequence[int], allowed: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: the counts[b] allowed entries of row b with the largest values (the earlier one on ties)."""
    batch, n = values.shape
    ranked = torch.where(allowed, values.float(), -math.inf)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=values.device).expand(batch, n))
    return allowed & (rank < torch.tensor(list(counts), device=values.device).unsqueeze(1))


def lof_outlier_counts(values: torch.Tensor, valid: torch.Tensor, config, merge: bool = False) -> list[int]:
    """Per row, how many valid entries sklearn's ``LocalOutlierFactor(n_neighbors=k).fit_predict`` marks -1."""
    neighbours = config.recovery_merge_lof_neighbours if merge else config.recovery_lof_neighbours
    factor = local_outlier_factor(values, valid, neighbours)
    return (valid & (factor > LOF_THRESHOLD)).sum(dim=1).tolist()


def local_outlier_factor(values: torch.Tensor, valid: torch.Tensor, neighbours: int) -> torch.Tensor:
    """The local outlier factor of every valid entry of each row of values [B, n] (1-D samples), in float64.

    As sklearn's ``LocalOutlierFactor.fit``: k = max(1, min(neighbours, m - 1)) for the m valid entries of a row,
    the k nearest other entries N(p), ``reach(p, o) = max(kdist(o), |p - o|)``,
    ``lrd(p) = 1 / (mean_{o in N(p)} reach(p, o) + 1e-10)``, ``lof(p) = mean_{o in N(p)} lrd(o) / lrd(p)``.
    Rows with fewer than two valid entries have no outlier (sklearn refuses them); invalid entries get 0.
    """
    batch, n = values.shape
    x = values.double()
    size = valid.sum(dim=1)  # [B]
    k = (size - 1).clamp(min=1).clamp(max=neighbours)  # [B]
    k_max = int(k.max()) if n > 1 else 0
    if k_max == 0:
        return torch.zeros(batch, n, dtype=torch.float64, device=values.device)
    pair = valid.unsqueeze(2) & valid.unsqueeze(1) & ~torch.eye(n, dtype=torch.bool, device=values.device)
    distance = torch.where(pair, (x.unsqueeze(2) - x.unsqueeze(1)).abs(), math.inf)  # [B, n, n]
    near, index = torch.topk(distance, k_max, dim=-1, largest=False)  # [B, n, k_max], nearest first
    used = torch.arange(k_max, device=values.device) < k.view(batch, 1, 1)  # [B, 1, k_max]
    k_distance = torch.gather(near, 2, (k - 1).view(batch, 1, 1).expand(batch, n, 1)).squeeze(-1)  # [B, n]
    flat = index.reshape(batch, n * k_max)
    reach = torch.maximum(near, torch.gather(k_distance, 1, flat).view(batch, n, k_max))
    kf = k.to(torch.float64).view(batch, 1)
    lrd = 1.0 / (torch.where(used, reach, 0.0).sum(dim=-1) / kf + LOF_EPSILON)  # [B, n]
    neighbour_lrd = torch.gather(lrd, 1, flat).view(batch, n, k_max)
    factor = torch.where(used, neighbour_lrd, 0.0).sum(dim=-1) / kf / lrd
    return torch.where(valid & (size >= 2).unsqueeze(1), factor, 0.0)


def merge_centres(
    values: torch.Tensor,
    keys: torch.Tensor,
    cls_attention: torch.Tensor,
    similarity: torch.Tensor,
    rest: torch.Tensor,
    slots: torch.Tensor,
    kept_count: torch.Tensor,
    centres: torch.Tensor,
    config,
) -> torch.Tensor:
    """[B, width, C]: at the centre slots, ``x_i + sum a_j x_j`` over the ``recovery_neighbours`` remaining patches
    j != i of largest ``cos(k_i, k_j) + w s_j``; other slots hold garbage the caller ignores."""
    batch, n = cls_attention.shape
    width = slots.shape[1]
    with torch.no_grad():
        score = torch.einsum("bkd,bnd->bkn", gather_rows(keys, slots), keys)  # [B, width, n]
        score = score + config.recovery_text_weight * similarity.unsqueeze(1)
        candidate = rest.unsqueeze(1).expand(batch, width, n).clone()
        candidate.scatter_(2, slots.unsqueeze(-1), False)  # not itself
        score = torch.where(candidate, score, -math.inf)
        count = min(config.recovery_neighbours, n - 1)
        best, nearest = torch.topk(score, count, dim=-1)  # [B, width, count]
        weight = torch.where(
            torch.isfinite(best), torch.gather(cls_attention.unsqueeze(1).expand(batch, width, n), 2, nearest), 0.0
        )
        weights = torch.zeros(batch, width, n, device=values.device).scatter_(2, nearest, weight)
    return gather_rows(values, slots) + torch.bmm(weights, values)

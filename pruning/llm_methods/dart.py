"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv 2502.11494, EMNLP 2025): before decoder layer K, a few pivot tokens are chosen (the image tokens and the text
tokens after the image whose layer K-1 keys have the largest L1 norm); each pivot in turn keeps the visual tokens
least similar to it (cosine of the hidden states after the model's final norm), so duplicates of what is kept go.

Official code followed: ZichenWen1/DART at 5a19452fc173017191c247848673e0bde755695a (read from the fork
xqy1111111/DART, whose history holds that commit; the official repository could not be fetched here),
``llava/model/language_model/modeling_llama_self.py`` (``DART.forward`` and ``get_retained_image_token``: keys of
layer K-1 after RoPE, ``self.norm`` on layer K-1's output, ``TOKEN_TOPK = max_num_trunction // (pivots)``, the
pivots visited in the order of a Python set) and ``scripts/v1_5/eval/*.sh`` (``--pruned_layer 2
--max_num_trunction 128 --pivot_image_token 4 --pivot_text_token 4``). Deviations and equations: docs/baselines.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pruning.config import PruningConfig, PruningConfigError
from pruning.llm import LayerDropper, LayerView, register_llm_method
from pruning.llm_methods.common import LLM_TOKENS, check_layer, layer_keys, token_budget
from pruning.registry import Param, at_least

DEFAULT_TOKENS = 128  # the official --max_num_trunction for LLaVA-1.5

DART_K = Param(
    "dart_k",
    int,
    2,
    "K: decoder layer before which visual tokens are dropped (pivots from layer K-1)",
    check=at_least(1),
)
DART_PIVOT_IMAGE = Param(
    "dart_pivot_image",
    int,
    4,
    "pivot tokens among the visual tokens (largest L1 norm of their keys)",
    check=at_least(0),
)
DART_PIVOT_TEXT = Param(
    "dart_pivot_text", int, 4, "pivot tokens among the text tokens after the image", check=at_least(0)
)


def _check(config: PruningConfig) -> None:
    if config.dart_pivot_image + config.dart_pivot_text < 1:
        raise PruningConfigError(
            f"llm_pruning='dart' needs at least one pivot token ({DART_PIVOT_IMAGE.cli_flag}, "
            f"{DART_PIVOT_TEXT.cli_flag}), got 0 and 0"
        )


def set_order(positions: list[int]) -> list[int]:
    """The official loop visits its pivots as ``list(set(image_indices + query_indices))`` iterates: CPython's order
    for a set of ints built in that insertion order (hash-table slots, i.e. roughly position mod the table size).
    Which pivot goes first decides which takes a token two pivots both want, so the order is kept."""
    return list(set(positions))


@register_llm_method(
    "dart",
    params=(DART_K, DART_PIVOT_IMAGE, DART_PIVOT_TEXT, LLM_TOKENS),
    description="DART: before layer K, pick pivots (the visual and after-image text tokens whose layer K-1 keys have "
    "the largest L1 norm); each pivot in turn keeps the llm_tokens // pivots visual tokens least similar to it "
    "(cosine after the final norm); keeps the image pivots too (128 // 8 per pivot + 4 by default).",
    check=_check,
    detail=lambda c: (
        f"K={c.dart_k}, tokens={c.llm_tokens or DEFAULT_TOKENS}, pivots={c.dart_pivot_image}+{c.dart_pivot_text}"
    ),
)
class DART(LayerDropper):
    needs_norm = True

    def check_model(self, layers: Sequence[nn.Module]) -> None:
        check_layer(self.config, DART_K, self.config.dart_k, layers)

    def keep(self, view: LayerView) -> torch.Tensor | None:
        if view.index != self.config.dart_k:
            return None
        config = self.config
        budgets = token_budget(config, view.visual)
        visual, valid = view.visual, view.valid
        rows, length = visual.shape
        # keys of layer K-1 over all heads (their L1 norm ranks the pivots); features after the final norm
        keys = layer_keys(view.layers[view.index - 1], view.previous_input, view.position_embeddings)
        key_norms = keys.float().abs().sum(dim=(1, 3))  # [rows, length]
        features = view.norm(view.hidden).float()
        columns = torch.arange(length, device=visual.device)
        last_visual = torch.where(visual, columns, -1).amax(dim=1, keepdim=True)
        text = valid & ~visual & (columns[None, :] > last_visual)  # the tokens after the image: the question
        first = valid.long().argmax(dim=1)
        position = (view.prompt_index - view.prompt_index[torch.arange(rows), first][:, None]).tolist()
        pivots = config.dart_pivot_image + config.dart_pivot_text
        kept = torch.zeros_like(visual)
        orders, per_pivot = [], []
        for row in range(rows):
            n = int(visual[row].sum())
            image_pivots = min(config.dart_pivot_image, n)
            budget = DEFAULT_TOKENS if budgets is None else budgets[row]
            per_pivot.append(max(0, min(budget, n - image_pivots)) // pivots)
            image = key_norms[row].masked_fill(~visual[row], -math.inf).topk(image_pivots).indices.tolist()
            words = int(text[row].sum())
            query = key_norms[row].masked_fill(~text[row], -math.inf).topk(min(config.dart_pivot_text, words))
            query = query.indices.tolist()
            kept[row, image] = True
            by_position = {position[row][c]: c for c in image + query}
            orders.append([by_position[p] for p in set_order([position[row][c] for c in image + query])])
        available = visual & ~kept
        steps = max((len(order) for order in orders), default=0)
        for step in range(steps):  # one pivot per row at a time, all rows together
            pivot = torch.tensor([order[step] if step < len(order) else -1 for order in orders], device=visual.device)
            take = min(max(per_pivot), length)
            if take == 0:
                break
            anchor = features[torch.arange(rows), pivot.clamp(min=0)]  # [rows, hidden]
            similarity = F.cosine_similarity(anchor[:, None, :], features, dim=-1)  # [rows, length]
            ranked = (-similarity).masked_fill(~available, -math.inf).topk(take, dim=1)
            wanted = torch.tensor(per_pivot, device=visual.device)[:, None]
            chosen = torch.zeros_like(visual).scatter_(
                1,
                ranked.indices,
                (torch.arange(take, device=visual.device)[None, :] < wanted) & ranked.values.isfinite(),
            )
            chosen &= (pivot >= 0)[:, None]
            kept |= chosen
            available &= ~chosen
        return valid & (~visual | kept)

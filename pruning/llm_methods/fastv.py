"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764): before decoder layer K the
image tokens are ranked by the attention they received at layer K-1 and only the top (1 - R) of them go on.

Official code followed: pkunlp-icler/FastV at d1659729b5bf1be225e99ee15783deeea80f63b1,
``src/transformers/src/transformers/models/llama/modeling_llama.py`` (``LlamaModel.forward``, the in-place branch),
the llava-hf port ``src/FastV/llava-hf/.../modeling_llama.py`` (``fastv_forward``: kept = round(N * (1 - R))) and
``src/FastV/lmms-eval/fastv_kvcache.py`` (prune once at prefill, decode on the kept KV cache). The score is row -1 of
layer K-1's attention probabilities, averaged over heads, over the image columns. The paper's formula (attention
received from *all* tokens) is ``--fastv-query all``. Deviations and equations: docs/baselines.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import nn

from pruning.config import PruningConfig
from pruning.llm import LayerDropper, LayerView, register_llm_method
from pruning.llm_methods.common import (
    LLM_TOKENS,
    all_rows_attention,
    check_layer,
    keep_top_visual,
    last_row_attention,
    token_budget,
)
from pruning.registry import Param, at_least, in_range

FASTV_K = Param(
    "fastv_k", int, 2, "K: decoder layer before which image tokens are dropped (scored at layer K-1)", check=at_least(1)
)
FASTV_RATIO = Param(
    "fastv_ratio", float, 0.5, "R: fraction of the visual tokens dropped at layer K (unless --llm-tokens)",
    check=in_range(0, 1),
)  # fmt: skip
FASTV_QUERY = Param(
    "fastv_query",
    str,
    "last",
    "whose attention ranks the image tokens: the last prompt token's (official code) or all tokens' (the paper)",
    choices=("last", "all"),
)


def kept_count(config: PruningConfig, visual_count: int) -> int:
    """round(n * (1 - R)), the llava-hf port's rule (the eval scripts pass rank = (1 - R) * 576); R read as written."""
    return round(visual_count * (1 - Fraction(str(config.fastv_ratio))))


@register_llm_method(
    "fastv",
    params=(FASTV_K, FASTV_RATIO, LLM_TOKENS, FASTV_QUERY),
    description="FastV: before layer K, keep the visual tokens that received the most attention at layer K-1 (from "
    "the last prompt token, averaged over heads): round(n (1 - R)) of them, or llm_tokens; text tokens all go on.",
    detail=lambda c: (
        f"K={c.fastv_k}, "
        + (f"tokens={c.llm_tokens}" if c.llm_tokens is not None else f"R={c.fastv_ratio}")
        + ("" if c.fastv_query == "last" else ", query=all")
    ),
)
class FastV(LayerDropper):
    def check_model(self, layers: Sequence[nn.Module]) -> None:
        check_layer(self.config, FASTV_K, self.config.fastv_k, layers)

    def keep(self, view: LayerView) -> torch.Tensor | None:
        if view.index != self.config.fastv_k:
            return None
        counts = token_budget(self.config, view.visual)
        if counts is None:
            counts = [kept_count(self.config, n) for n in view.visual.sum(dim=1).tolist()]
        score = last_row_attention if self.config.fastv_query == "last" else all_rows_attention
        layer = view.layers[view.index - 1]
        scores = score(layer, view.previous_input, view.position_embeddings, view.valid)
        return keep_top_visual(scores, view.visual, view.valid, counts)

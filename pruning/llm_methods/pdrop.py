"""PyramidDrop (Xing et al., arXiv 2410.17247, CVPR 2025): the decoder is cut into stages; before the first layer of
each stage the visual tokens still held are ranked by the attention the last instruction token pays them, computed
with that layer's own query / key projections, and only a fixed fraction of the image's tokens goes on.

Official code followed: Cooperx521/PyramidDrop at 6444f304aee4b7edcb022839fb9e8cd07859704a,
``llava/model/modeling_llama_pdrop.py`` (``pdrop_forward``: rank after layer ``l - 1`` for ``l`` in ``layer_list``;
``pdrop_rank_drop``: the last prompt token's softmax row of ``layers[l]`` on its normed input, mean over heads,
top ``int(n * ratio)`` image tokens, positions renumbered 0..L'-1, decode positions shifted by the tokens dropped)
and ``scripts/v1_5/pdrop_eval/*.sh`` (``--layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"``).
Deviations and equations: docs/baselines.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pruning.config import PruningConfig, PruningConfigError
from pruning.llm import LayerDropper, LayerView, register_llm_method
from pruning.llm_methods.common import (
    LLM_TOKENS,
    check_layer,
    fraction_of,
    keep_top_visual,
    last_row_attention,
    token_budget,
)
from pruning.registry import Param


def parse_layers(text: str) -> list[int]:
    """'8,16,24' -> [8, 16, 24]; ValueError unless strictly increasing integers >= 1."""
    layers = [int(item) for item in text.split(",")]
    if not layers or layers[0] < 1 or any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(text)
    return layers


def parse_ratios(text: str) -> list[float]:
    """'0.5,0.25,0.125' -> [0.5, 0.25, 0.125]; ValueError unless non-increasing numbers in (0, 1]."""
    ratios = [float(item) for item in text.split(",")]
    if not ratios or not all(0 < r <= 1 for r in ratios) or any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(text)
    return ratios


def _checked(parse, expected: str):  # noqa: ANN001, ANN202
    def check(value: str) -> str | None:
        try:
            parse(value)
        except ValueError:
            return f"must be {expected}"
        return None

    return check


PDROP_LAYERS = Param(
    "pdrop_layers",
    str,
    "8,16,24",
    "decoder layers before which the visual tokens are ranked and cut (comma-separated, increasing)",
    check=_checked(parse_layers, "comma-separated increasing layer indices >= 1, e.g. '8,16,24'"),
)
PDROP_RATIOS = Param(
    "pdrop_ratios",
    str,
    "0.5,0.25,0.125",
    "fraction of the visual tokens entering the LLM kept from each of those layers on (lambda, lambda^2, ...)",
    check=_checked(parse_ratios, "comma-separated non-increasing fractions in (0, 1], e.g. '0.5,0.25,0.125'"),
)


def _check(config: PruningConfig) -> None:
    layers, ratios = parse_layers(config.pdrop_layers), parse_ratios(config.pdrop_ratios)
    if len(layers) != len(ratios):
        raise PruningConfigError(
            f"llm_pruning='pdrop' needs one ratio per layer: pdrop_layers {config.pdrop_layers!r} has {len(layers)}, "
            f"pdrop_ratios {config.pdrop_ratios!r} has {len(ratios)} ({PDROP_LAYERS.cli_flag}, "
            f"{PDROP_RATIOS.cli_flag})"
        )


def stage_counts(config: PruningConfig, visual_count: int, budget: int | None) -> list[int]:
    """Visual tokens kept from each stage's layer on: int(n * ratio_s) (official), or with a budget B after the first
    layer, int(B * ratio_s / ratio_1), the same pyramid scaled to B."""
    ratios = parse_ratios(config.pdrop_ratios)
    if budget is None:
        return [fraction_of(visual_count, r) for r in ratios]
    return [budget] + [fraction_of(budget, r / ratios[0]) for r in ratios[1:]]


@register_llm_method(
    "pdrop",
    params=(PDROP_LAYERS, PDROP_RATIOS, LLM_TOKENS),
    description="PyramidDrop: before each of pdrop_layers, keep the visual tokens the last prompt token attends to "
    "most (that layer's projections, mean over heads): int(n * ratio) of the n that entered the LLM, or llm_tokens "
    "after the first layer and the same pyramid below; positions renumbered after each cut.",
    check=_check,
    detail=lambda c: (
        f"layers={c.pdrop_layers}, "
        + (f"tokens={c.llm_tokens}" if c.llm_tokens is not None else f"ratios={c.pdrop_ratios}")
    ),
)
class PyramidDrop(LayerDropper):
    compact_positions = True  # the official code re-numbers position_ids after every cut

    def __init__(self, config: PruningConfig):
        super().__init__(config)
        self.layers = parse_layers(config.pdrop_layers)
        self.plan: list[list[int]] | None = None  # per row, the visual tokens kept at each stage

    def check_model(self, layers: Sequence[nn.Module]) -> None:
        check_layer(self.config, PDROP_LAYERS, self.layers[-1], layers)

    def keep(self, view: LayerView) -> torch.Tensor | None:
        if self.plan is None:  # the first layer: the tokens as they entered the LLM
            budgets = token_budget(self.config, view.visual) or [None] * view.visual.shape[0]
            entering = view.visual.sum(dim=1).tolist()
            self.plan = [stage_counts(self.config, n, b) for n, b in zip(entering, budgets)]
        if view.index not in self.layers:
            return None
        stage = self.layers.index(view.index)
        held = view.visual.sum(dim=1).tolist()
        counts = [min(plan[stage], n) for plan, n in zip(self.plan, held)]
        scores = last_row_attention(view.layers[view.index], view.hidden, view.position_embeddings, view.valid)
        return keep_top_visual(scores, view.visual, view.valid, counts)

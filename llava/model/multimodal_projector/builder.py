"""The projector between the vision tower and the LLM (upstream's `mm_projector_type` names)."""

from __future__ import annotations

import re

from torch import nn

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


class IdentityMap(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self) -> dict:
        return {"mm_projector_type": "identity"}


def build_vision_projector(config, delay_load: bool = False, **kwargs) -> nn.Module:
    """'linear', 'mlp{N}x_gelu' (Linear, GELU, Linear, ... so state-dict keys are mm_projector.0/.2/...) or 'identity'."""
    projector_type = getattr(config, "mm_projector_type", "linear")
    mm_hidden_size = config.mm_hidden_size
    hidden_size = config.hidden_size
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    match = _MLP_GELU.match(projector_type)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"mm_projector_type {projector_type!r}: depth must be >= 1")
        modules: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(1, depth):
            modules += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*modules)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise ValueError(
                f"mm_projector_type 'identity' needs mm_hidden_size == hidden_size, got {mm_hidden_size} vs {hidden_size}"
            )
        return IdentityMap()
    raise ValueError(f"unknown mm_projector_type {projector_type!r}; expected 'linear', 'mlp<N>x_gelu' or 'identity'")

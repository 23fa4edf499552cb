"""InternViT (InternViT-300M-448px), with the official module and parameter names so the released
``vision_model.*`` weights load as they are.

Follows OpenGVLab/InternVL ``modeling_intern_vit.py``: a CLS token, a learned position embedding interpolated
(bicubic, in fp32) to the patch grid of the input, pre-norm layers with fused ``qkv`` (bias) and layer scale
(``ls1``, ``ls2``), no final norm. Attention runs on ``torch.nn.functional.scaled_dot_product_attention``; it takes an
optional key mask, or a packed layout (``pruning.packing``) under which stage 1's 'inside' mode runs the later layers
on the kept tokens of tiles with different counts back to back.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from llava.model.internvl.configuration_internvl_chat import InternVisionConfig
from pruning.packing import PackedLayout, packed_sdpa


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_patches + 1, self.embed_dim))

    def patch_positions(self, height: int, width: int) -> torch.Tensor:
        """[1, height * width, D] position embeddings of a height x width patch grid (bicubic from the trained grid,
        in fp32 as the official code; the trained size gives the trained embeddings exactly)."""
        side = self.image_size // self.patch_size
        table = self.position_embedding[:, 1:]
        if (height, width) == (side, side):
            return table
        grid = table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, D, side, side]
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1 + n, D]: CLS, then the patches in raster order."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # [B, D, h, w]
        batch, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(batch, 1, -1).to(dtype)
        positions = torch.cat([self.position_embedding[:, :1], self.patch_positions(height, width)], dim=1)
        return torch.cat([cls, patches], dim=1) + positions.to(dtype)


class InternAttention(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(
                f"vision_config.hidden_size {self.embed_dim} is not divisible by num_attention_heads {self.num_heads}"
            )
        self.scale = self.head_dim**-0.5
        self.is_causal = False  # what packed_sdpa reads
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packed: PackedLayout | None = None,
    ) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]. ``attention_mask``: additive [B, 1, N, N] or None (every token sees every token).
        ``packed``: the rows of ``hidden_states`` [1, T, D] are that layout's sequences back to back, each attending
        to itself only (``pruning.packing.packed_sdpa``)."""
        batch, length, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each [B, heads, N, head_dim]
        if packed is not None:
            out, _ = packed_sdpa(self, query, key, value, None, scaling=self.scale, **packed.attention_kwargs())
            return self.proj(out.reshape(batch, length, dim))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))

    def scoring_view(self, norm: nn.Module) -> SimpleNamespace:
        """The layer as ``pruning.cls_patch_scores`` reads a CLIP layer: ``layer_norm1`` and separate q/k projections
        (row slices of the fused qkv, no copies)."""
        dim = self.embed_dim
        bias = self.qkv.bias

        def rows(start: int) -> SimpleNamespace:
            return SimpleNamespace(
                weight=self.qkv.weight[start : start + dim], bias=None if bias is None else bias[start : start + dim]
            )

        attn = SimpleNamespace(q_proj=rows(0), k_proj=rows(dim), num_heads=self.num_heads)
        return SimpleNamespace(layer_norm1=norm, self_attn=attn)


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packed: PackedLayout | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), attention_mask, packed) * self.ls1
        return hidden_states + self.mlp(self.norm2(hidden_states)) * self.ls2

    def scoring_view(self) -> SimpleNamespace:
        return self.attn.scoring_view(self.norm1)


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class InternVisionModel(nn.Module):
    """``vision_model``: embeddings + encoder. Callers run ``encoder.layers`` themselves when they need to stop or
    prune part-way (llava/model/internvl/vision.py); ``forward`` runs everything."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """[B, 3, H, W] -> hidden_states[num_layers] (default: the last layer's output), [B, 1 + n, D]."""
        hidden = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:num_layers]:
            hidden = layer(hidden)
        return hidden

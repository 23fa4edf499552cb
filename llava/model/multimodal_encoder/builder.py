"""Upstream's import path for the tower builder."""

from llava.model.multimodal_encoder.clip_encoder import build_vision_tower

__all__ = ["build_vision_tower"]

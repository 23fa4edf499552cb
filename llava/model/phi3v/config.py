"""Phi-3-vision's ``config.json`` as released (microsoft/Phi-3-vision-128k-instruct), read without remote code.

The release is a Phi-3-mini config plus two sections for the image side, ``embd_layer`` and ``img_processor``.
Three keys need care on transformers 5.23:

- ``rope_scaling {"type": "su", ...}``: Phi3Config only accepts the name ``longrope`` (the same LongRoPE: short
  factors up to ``original_max_position_embeddings``, long factors beyond, attention scale
  sqrt(1 + ln(s) / ln(4096)) with s = max / original); building it from ``su`` fails with a KeyError.
- ``sliding_window: 131072`` equals ``max_position_embeddings``: a window as long as the context never slides, so it
  is read as None (plain causal attention, which stage 2's KV eviction needs).
- ``_attn_implementation: flash_attention_2`` and ``auto_map``: dropped; the loader chooses the attention backend and
  no remote code is used.

The CLIP tower is not described by the release config: the remote code hard-codes ViT-L/14-336
(``CLIP_VIT_LARGE_PATCH14_336_CONFIG``), which is ``CLIP_VIT_L14_336`` here. ``img_processor.clip_config`` is our own
extension (absent from the release) that replaces it, so that tests can build a tiny tower.
"""

from __future__ import annotations

from typing import Any

from transformers import Phi3Config

from llava.model.llava_arch import check_pruning_section

MODEL_TYPE = "phi3_v"
ARCHITECTURE = "Phi3VForCausalLM"

# image_embedding_phi3_v.py, CLIP_VIT_LARGE_PATCH14_336_CONFIG
CLIP_VIT_L14_336: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 336,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}

# The one image-embedding setup the release uses and the remote code implements (it asserts on the others).
RELEASED_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}
RELEASED_TOWER = "openai/clip-vit-large-patch14-336"
_DROPPED_KEYS = ("auto_map", "_attn_implementation", "transformers_version", "model_type")


class Phi3VConfigError(ValueError):
    """A Phi-3-vision config.json we cannot load faithfully; the message names the file and the key."""


class Phi3VConfig(Phi3Config):
    model_type = MODEL_TYPE

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_pruning_section(self)

    # ---- the image side ------------------------------------------------------------------------------------
    def clip_config_dict(self) -> dict[str, Any]:
        """The tower's CLIPVisionConfig fields: the hard-coded ViT-L/14-336 unless img_processor.clip_config says."""
        override = (getattr(self, "img_processor", None) or {}).get("clip_config")
        return dict(override) if override else dict(CLIP_VIT_L14_336)

    @property
    def image_dim_out(self) -> int:
        return int(self.img_processor["image_dim_out"])

    @property
    def tower_select_layer(self) -> int:
        """hidden_states index of the features (the remote code's ``layer_idx``, default -2)."""
        return int(self.img_processor.get("layer_idx", -2))


def phi3v_config(raw: dict[str, Any], source: str = "config.json") -> Phi3VConfig:
    """A Phi3VConfig from the released config.json dict (see the module docstring for what is converted)."""
    check_phi3v_sections(raw, source)
    fields = {k: v for k, v in raw.items() if k not in _DROPPED_KEYS}
    rope = fields.get("rope_scaling")
    if isinstance(rope, dict):
        rope = dict(rope)
        kind = rope.get("type", rope.get("rope_type"))
        if kind == "yarn":
            raise Phi3VConfigError(
                f"{source}: rope_scaling type 'yarn' is not supported (Phi-3-vision uses 'su' = LongRoPE; transformers "
                "would read 'yarn' as LongRoPE with another attention scale)"
            )
        if kind == "su":
            rope.pop("type", None)
            rope["rope_type"] = "longrope"
        fields["rope_scaling"] = rope
    window, longest = fields.get("sliding_window"), fields.get("max_position_embeddings")
    if window is not None and longest is not None and window >= longest:
        fields["sliding_window"] = None
    try:
        return Phi3VConfig(**fields)
    except (KeyError, ValueError, TypeError) as err:
        raise Phi3VConfigError(f"{source}: cannot build the Phi-3 language model config ({err})") from err


def check_phi3v_sections(raw: dict[str, Any], source: str) -> None:
    """The image sections must be the released setup; anything else is an error naming the key."""
    embd = raw.get("embd_layer")
    if not isinstance(embd, dict):
        raise Phi3VConfigError(f"{source}: a Phi-3-vision config needs an 'embd_layer' section (got {embd!r})")
    for key, expected in RELEASED_EMBD_LAYER.items():
        if embd.get(key) != expected:
            raise Phi3VConfigError(
                f"{source}: embd_layer.{key} is {embd.get(key)!r}; only the released setting {expected!r} is "
                "implemented (as in the official image_embedding_phi3_v.py)"
            )
    tower = raw.get("img_processor")
    if not isinstance(tower, dict):
        raise Phi3VConfigError(f"{source}: a Phi-3-vision config needs an 'img_processor' section (got {tower!r})")
    if tower.get("name") != "clip_vision_model":
        raise Phi3VConfigError(f"{source}: img_processor.name must be 'clip_vision_model', got {tower.get('name')!r}")
    if "clip_config" not in tower and tower.get("model_name") != RELEASED_TOWER:
        raise Phi3VConfigError(
            f"{source}: img_processor.model_name must be {RELEASED_TOWER!r} (the tower is hard-coded), "
            f"got {tower.get('model_name')!r}"
        )
    for key in ("image_dim_out", "num_img_tokens"):
        if not isinstance(tower.get(key), int):
            raise Phi3VConfigError(f"{source}: img_processor.{key} must be an integer, got {tower.get(key)!r}")
    if tower.get("type_feature", "patch") != "patch":
        raise Phi3VConfigError(
            f"{source}: img_processor.type_feature must be 'patch' (the HD transform merges patch grids), "
            f"got {tower.get('type_feature')!r}"
        )
    clip = {**CLIP_VIT_L14_336, **(tower.get("clip_config") or {})}
    if clip["hidden_size"] != tower["image_dim_out"]:
        raise Phi3VConfigError(
            f"{source}: img_processor.image_dim_out {tower['image_dim_out']} differs from the tower width "
            f"{clip['hidden_size']}"
        )
    side = clip["image_size"] // clip["patch_size"]
    if side % 2 or clip["image_size"] % clip["patch_size"]:
        raise Phi3VConfigError(f"{source}: the tower's patch grid ({side} per side) must be even for the 2x2 merge")
    if tower["num_img_tokens"] != (side // 2) ** 2:
        raise Phi3VConfigError(
            f"{source}: img_processor.num_img_tokens {tower['num_img_tokens']} differs from the merged grid "
            f"{side // 2} x {side // 2} of the tower"
        )

"""InternVL2's configuration as released (``config.json`` with ``vision_config`` and ``llm_config``), on transformers 5.

Field names and defaults are the official ones (OpenGVLab/InternVL, ``configuration_intern_vit.py`` and
``configuration_internvl_chat.py``), so a released ``config.json`` means what it meant to the remote code. Only the
parts InternVL2-1B uses are supported: InternViT with LayerNorm and no q/k normalisation (InternViT-300M-448px), a
Qwen2 language model, pixel shuffle v2. Anything else is refused with the setting named (see ``check_supported``).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig, Qwen2Config

from pruning import PruningConfig

# the released special tokens (tokenizer ids 151646-151648 in InternVL2-1B)
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# InternViT's normalisation (the official IMAGENET_MEAN / IMAGENET_STD)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SUPPORTED_LLM_ARCHITECTURES = ("Qwen2ForCausalLM",)
MODEL_TYPE = "internvl_chat"  # the release's config.json
ARCHITECTURE = "InternVLChatModel"
HF_MODEL_TYPE = "internvl"  # transformers' own conversion ("-hf" repositories): another layout, not read here


class InternVLConfigError(ValueError):
    """A config.json this loader cannot honour; the message names the setting."""


class InternVisionConfig(PreTrainedConfig):
    """InternViT (``vision_config``). Defaults are the official class's (InternViT-6B); the release sets its own."""

    model_type = "intern_vit_6b"

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    use_flash_attn: bool = True
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 0.1


class InternVLChatConfig(PreTrainedConfig):
    """The whole model (``model_type`` "internvl_chat"). ``pruning`` is this project's section (absent = off)."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {"vision_config": InternVisionConfig, "llm_config": Qwen2Config}

    vision_config: dict | PreTrainedConfig | None = None
    llm_config: dict | PreTrainedConfig | None = None
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    pad2square: bool = False
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    ps_version: str = "v1"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    pruning: dict | None = None
    # set from the tokenizer when the checkpoint loads (the official code reads them at chat time)
    img_start_token_id: int | None = None
    img_end_token_id: int | None = None
    img_context_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        # the official class forces an untied head whatever the file says (the release has its own lm_head)
        self.tie_word_embeddings = False
        self.llm_config.tie_word_embeddings = False
        self.hidden_size = self.llm_config.hidden_size
        PruningConfig.from_dict(self.pruning, source="model config")  # a bad section fails at load, named

    # ---- geometry ----------------------------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        """Pixels per side of one tile (``force_image_size``, else the tower's own size), as the official code."""
        return int(self.force_image_size or self.vision_config.image_size)

    @property
    def merge_factor(self) -> int:
        """Patches merged per side by the pixel shuffle: 2 for downsample_ratio 0.5."""
        return round(1 / self.downsample_ratio)

    @property
    def patches_per_side(self) -> int:
        return self.tile_size // self.vision_config.patch_size

    @property
    def num_image_token(self) -> int:
        """Tokens per tile reaching the LLM (256 for a 448 tile): the official ``num_image_token``."""
        return (self.patches_per_side // self.merge_factor) ** 2


def is_internvl_config(config: dict[str, Any]) -> bool:
    """Whether a config.json belongs to the InternVL family: the release, or transformers' converted layout (which the
    loader refuses with an explanation rather than letting another route misread it)."""
    model_type = config.get("model_type")
    return model_type in (MODEL_TYPE, HF_MODEL_TYPE) or ARCHITECTURE in (config.get("architectures") or [])


def check_supported(raw: dict[str, Any], source: str) -> None:
    """Refuse, naming the key, a released config whose model this implementation does not reproduce."""
    llm = raw.get("llm_config")
    vision = raw.get("vision_config")
    if not isinstance(llm, dict) or not isinstance(vision, dict):
        raise InternVLConfigError(f"{source}: an InternVL config needs 'llm_config' and 'vision_config' sections")
    architectures = llm.get("architectures") or [None]
    if architectures[0] not in SUPPORTED_LLM_ARCHITECTURES:
        raise InternVLConfigError(
            f"{source}: llm_config.architectures {architectures} is not supported; this loader implements "
            f"InternVL2-1B's {', '.join(SUPPORTED_LLM_ARCHITECTURES)} (InternLM2 / Phi-3 / Llama based InternVL "
            "checkpoints are not)"
        )
    checks = [
        ("vision_config.norm_type", vision.get("norm_type", "rms_norm"), "layer_norm"),
        ("vision_config.qk_normalization", vision.get("qk_normalization", True), False),
        ("ps_version", raw.get("ps_version", "v1"), "v2"),
        ("pad2square", raw.get("pad2square", False), False),
        ("use_backbone_lora", raw.get("use_backbone_lora", 0), 0),
        ("use_llm_lora", raw.get("use_llm_lora", 0), 0),
    ]
    for name, found, wanted in checks:
        if found != wanted:
            raise InternVLConfigError(
                f"{source}: {name} is {found!r}; this loader supports {wanted!r} (InternViT-300M-448px, "
                "pixel shuffle v2, merged weights)"
            )
    ratio = raw.get("downsample_ratio", 0.5)
    if not isinstance(ratio, (int, float)) or ratio <= 0 or abs(1 / ratio - round(1 / ratio)) > 1e-9:
        raise InternVLConfigError(f"{source}: downsample_ratio must be 1/m for an integer m, got {ratio!r}")
    select_layer = raw.get("select_layer", -1)
    layers = vision.get("num_hidden_layers", 48)
    if not isinstance(select_layer, int) or select_index(select_layer, layers) is None:
        raise InternVLConfigError(
            f"{source}: select_layer {select_layer!r} names no encoder layer's output of a {layers}-layer tower"
        )


def select_index(select_layer: int, num_layers: int) -> int | None:
    """hidden_states index 1..num_layers of the official ``hidden_states[select_layer]`` (-1: the last layer's
    output); None when it names the embeddings or nothing."""
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    return index if 1 <= index <= num_layers else None

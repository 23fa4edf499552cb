"""InternVL2-1B's chat template ("Hermes-2" in its config) and the official image-token expansion.

The official template (OpenGVLab/InternVL ``internvl/conversation.py``) is ChatML in the MPT separator style with
``<|im_end|>`` as separator and no newline after it:

    <|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n<image>\\n{question}<|im_end|><|im_start|>assistant\\n

which is ``llava.conversation``'s MPT style with these strings: ``conv_templates["Hermes-2"]``, the default
template of InternVL checkpoints (``llava.utils.default_conv_mode``), so every entry point builds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import conv_hermes_2
from llava.model.internvl.configuration_internvl_chat import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

SYSTEM_PREFIX = "<|im_start|>system\n"
# the official system message (kept by InternVL "to avoid changes in benchmark performance")
HERMES_2_SYSTEM_MESSAGE = conv_hermes_2.system.removeprefix(SYSTEM_PREFIX)
STOP_TOKEN = conv_hermes_2.sep  # "<|im_end|>": the official chat stops generating there

# config.json "template" -> its name in llava.conversation.conv_templates; only the one InternVL2-1B ships with
TEMPLATES = {"Hermes-2": "Hermes-2"}


def hermes_2_prompt(question: str, system_message: str | None = None) -> str:
    """One user turn with the answer turn open; ``<image>\\n`` in front unless the question places ``<image>``."""
    conv = conv_hermes_2.copy()
    if system_message is not None:
        conv.system = SYSTEM_PREFIX + system_message
    if DEFAULT_IMAGE_TOKEN not in question:
        question = f"{DEFAULT_IMAGE_TOKEN}\n{question}"
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def expand_image_tokens(prompt: str, tiles_per_image: Sequence[int], num_image_token: int = 256) -> str:
    """The official expansion: the i-th ``<image>`` becomes ``<img>`` + ``<IMG_CONTEXT>`` x num_image_token x tiles_i
    + ``</img>``."""
    if prompt.count(DEFAULT_IMAGE_TOKEN) != len(tiles_per_image):
        raise ValueError(
            f"the prompt has {prompt.count(DEFAULT_IMAGE_TOKEN)} <image> tags but {len(tiles_per_image)} tile counts "
            "were given"
        )
    for tiles in tiles_per_image:
        block = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * tiles) + IMG_END_TOKEN
        prompt = prompt.replace(DEFAULT_IMAGE_TOKEN, block, 1)
    return prompt

"""Chat templates, byte for byte as upstream LLaVA: the checkpoints were trained on exactly these strings.

`conv_templates[name].copy()` gives a fresh conversation; `append_message(role, None)` leaves the assistant turn
open, which is how every runner builds its prompt. A first message given as a tuple `(text, image, mode)` carries
an image: `get_prompt` moves `<image>` to the front of that turn (or uses the `<Image>...</Image>` form for the
mmtag templates).
"""

from __future__ import annotations

import dataclasses
from enum import Enum, auto
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN

Message = Any  # str, None (open turn) or a (text, image, image_process_mode) tuple


class SeparatorStyle(Enum):
    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()
    PHI3 = auto()


@dataclasses.dataclass
class Conversation:
    system: str
    roles: tuple[str, str]
    messages: list[list[Message]] = dataclasses.field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    def get_prompt(self) -> str:
        messages = self._messages_with_image_first()
        style = self.sep_style
        if style == SeparatorStyle.SINGLE:
            ret = self.system + self.sep
            for role, message in messages:
                ret += f"{role}: {_text(message)}{self.sep}" if message else f"{role}:"
        elif style == SeparatorStyle.TWO:
            seps = [self.sep, self.sep2]
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                ret += f"{role}: {_text(message)}{seps[i % 2]}" if message else f"{role}:"
        elif style == SeparatorStyle.MPT:
            ret = self.system + self.sep
            for role, message in messages:
                ret += f"{role}{_text(message)}{self.sep}" if message else role
        elif style == SeparatorStyle.LLAMA_2:
            ret = self._llama_2_prompt(messages)
        elif style == SeparatorStyle.PHI3:  # "<|user|>\n{text}<|end|>\n", the open turn "<|assistant|>\n"
            ret = self.system
            for role, message in messages:
                ret += f"{role}\n{_text(message)}{self.sep}" if message else f"{role}\n"
        elif style == SeparatorStyle.PLAIN:
            seps = [self.sep, self.sep2 or ""]  # upstream crashed on a filled answer turn (sep2 is None)
            ret = self.system
            for i, (_, message) in enumerate(messages):
                if message:
                    ret += _text(message) + seps[i % 2]
        else:
            raise ValueError(f"unknown separator style {style!r}")
        return ret

    def _messages_with_image_first(self) -> list[list[Message]]:
        messages = [list(m) for m in self.messages]
        if not messages or not isinstance(messages[0][1], tuple):
            return messages
        role, (text, *_) = messages[0]
        text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if "mmtag" in self.version:
            messages[0] = [role, text]
            messages.insert(0, [self.roles[0], "<Image><image></Image>"])
            messages.insert(1, [self.roles[1], "Received."])
        else:
            messages[0] = [role, f"{DEFAULT_IMAGE_TOKEN}\n{text}"]
        return messages

    def _llama_2_prompt(self, messages: list[list[Message]]) -> str:
        ret = ""
        for i, (role, message) in enumerate(messages):
            if i == 0:
                if not message:
                    raise ValueError("llama_2 conversations must start with a non-empty user message")
                if role != self.roles[0]:
                    raise ValueError(f"llama_2 conversations must start with {self.roles[0]!r}, got {role!r}")
            if not message:
                continue
            text = _text(message)
            if i == 0 and self.system:
                text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
            if i % 2 == 0:
                ret += f"{self.sep}[INST] {text} [/INST]"
            else:
                ret += f" {text} {self.sep2}"
        # Upstream strips the characters of sep ("<", "s", ">"), not the prefix; kept for identical prompts.
        return ret.lstrip(self.sep)

    def append_message(self, role: str, message: Message) -> None:
        self.messages.append([role, message])

    def copy(self) -> Conversation:
        return dataclasses.replace(self, messages=[[role, message] for role, message in self.messages])

    def get_images(self) -> list[Any]:
        """The images attached to user turns, in order (what a server passes to process_images)."""
        return [m[1] for i, (_, m) in enumerate(self.messages[self.offset :]) if i % 2 == 0 and isinstance(m, tuple)]

    def dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, _text(m) if isinstance(m, tuple) else m] for role, m in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


def _text(message: Message) -> str:
    return message[0] if isinstance(message, tuple) else message


_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# No space after "natural language." in upstream: the checkpoints saw it that way.
_MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)

conv_vicuna_v0 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("Human", "Assistant"),
    messages=[
        ["Human", "What are the key differences between renewable and non-renewable energy sources?"],
        [
            "Assistant",
            "Renewable energy sources are those that can be replenished naturally in a relatively "
            "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
            "Non-renewable energy sources, on the other hand, are finite and will eventually be "
            "depleted, such as coal, oil, and natural gas. Here are some key differences between "
            "renewable and non-renewable energy sources:\n"
            "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
            "energy sources are finite and will eventually run out.\n"
            "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
            "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
            "and other negative effects.\n"
            "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
            "have lower operational costs than non-renewable sources.\n"
            "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
            "locations than non-renewable sources.\n"
            "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
            "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
            "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
            "non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
        ],
    ],
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_vicuna_v1 = Conversation(
    system=_USER_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="v1",
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llama_2 = Conversation(
    system=_LLAMA_2_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_llava_llama_2 = Conversation(
    system="You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)

conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_mpt = Conversation(
    system="<|im_start|>system\n"
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)

conv_llava_v0 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("Human", "Assistant"),
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_llava_v0_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("Human", "Assistant"),
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0_mmtag",
)

conv_llava_v1 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="v1",
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llava_v1_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1_mmtag",
)

# InternVL2-1B's "Hermes-2" (its config.json's "template"): ChatML in the MPT style, "<|im_end|>" with no newline after
# it, as OpenGVLab/InternVL's internvl/conversation.py (llava/model/internvl/conversation.py)
conv_hermes_2 = Conversation(
    system="<|im_start|>system\n你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="hermes_2",
)

# Phi-3-vision's chat template (tokenizer_config.json of microsoft/Phi-3-vision-128k-instruct), no system turn
conv_phi3_v = Conversation(
    system="",
    roles=("<|user|>", "<|assistant|>"),
    sep_style=SeparatorStyle.PHI3,
    sep="<|end|>\n",
    version="phi3_v",
)

default_conversation = conv_vicuna_v1

conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "vicuna_v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
    "Hermes-2": conv_hermes_2,
    "phi3_v": conv_phi3_v,
}


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of a template, with the valid names in the error for a typo in --conv-mode."""
    if name not in conv_templates:
        raise KeyError(f"unknown conversation template {name!r}; choose one of {', '.join(sorted(conv_templates))}")
    return conv_templates[name].copy()

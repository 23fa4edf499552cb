"""Prompt strings of the templates the checkpoints were trained on, written out by hand."""

import pytest

from llava.conversation import (
    Conversation,
    SeparatorStyle,
    conv_templates,
    default_conversation,
    get_conv_template,
)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def build(name: str, *turns: object) -> Conversation:
    conv = conv_templates[name].copy()
    for i, message in enumerate(turns):
        conv.append_message(conv.roles[i % 2], message)
    return conv


def test_template_names_cover_upstream_keys():
    expected = {
        "default", "v0", "vicuna_v0", "v1", "vicuna_v1", "llama_2", "mistral_instruct", "chatml_direct",
        "mistral_direct", "plain", "v0_plain", "llava_v0", "v0_mmtag", "llava_v1", "v1_mmtag", "llava_llama_2", "mpt",
    }  # fmt: skip
    assert set(conv_templates) == expected | {"Hermes-2", "phi3_v"}  # + InternVL2-1B's and Phi-3-vision's (issue #22)
    assert default_conversation is conv_templates["vicuna_v1"] is conv_templates["v1"]
    assert conv_templates["mistral_direct"] is conv_templates["chatml_direct"]


def test_vicuna_v1_single_turn_with_image():
    prompt = build("vicuna_v1", "<image>\nWhat is shown?", None).get_prompt()
    assert prompt == VICUNA_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT:"


def test_vicuna_v1_multi_turn_uses_eos_between_rounds():
    prompt = build("vicuna_v1", "Hi there", "Hello!", "And now?", None).get_prompt()
    assert prompt == VICUNA_SYSTEM + " USER: Hi there ASSISTANT: Hello!</s>USER: And now? ASSISTANT:"


def test_vicuna_v1_without_image_and_closed_last_turn():
    prompt = build("vicuna_v1", "Count to 3.", "1 2 3").get_prompt()
    assert prompt == VICUNA_SYSTEM + " USER: Count to 3. ASSISTANT: 1 2 3</s>"


def test_llava_v1_differs_only_in_system_prompt():
    llava = build("llava_v1", "<image>\nQ?", None).get_prompt()
    vicuna = build("vicuna_v1", "<image>\nQ?", None).get_prompt()
    assert llava == LLAVA_SYSTEM + " USER: <image>\nQ? ASSISTANT:"
    assert llava.removeprefix(LLAVA_SYSTEM) == vicuna.removeprefix(VICUNA_SYSTEM)


def test_image_tuple_moves_image_token_to_the_front():
    prompt = build("vicuna_v1", ("What is this?\n<image>", object(), "Default"), None).get_prompt()
    assert prompt == VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"
    without_tag = build("vicuna_v1", ("What is this?", object(), "Default"), None).get_prompt()
    assert without_tag == prompt


def test_mmtag_image_tuple_adds_received_turn():
    conv = build("v1_mmtag", ("<image>\nDescribe.", object(), "Pad"), None)
    assert conv.get_prompt() == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
        "the visual content that the user provides, and assist the user with a variety of tasks using natural "
        "language.The visual content will be provided with the following format: <Image>visual content</Image>. "
        "USER: <Image><image></Image> ASSISTANT: Received.</s>USER: Describe. ASSISTANT:"
    )


def test_plain_template_is_bare_text():
    assert build("plain", "<image>\n", None).get_prompt() == "<image>\n\n"
    assert build("plain", "<image>", "a cat on a mat").get_prompt() == "<image>\na cat on a mat"


def test_llama_2_wraps_system_and_instructions():
    system = conv_templates["llama_2"].system
    assert "while being safe.  Your answers" in system
    prompt = build("llama_2", "<image>\nWhat?", "A dog.", "Color?", None).get_prompt()
    assert prompt == (
        f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\nWhat? [/INST] A dog. </s><s>[INST] Color? [/INST]"
    )


def test_llava_llama_2_system():
    prompt = build("llava_llama_2", "Hi", None).get_prompt()
    assert prompt == (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language.\n"
        "<</SYS>>\n\nHi [/INST]"
    )


def test_llama_2_rejects_conversation_not_opened_by_user():
    conv = conv_templates["llama_2"].copy()
    conv.append_message("ASSISTANT", "hello")
    with pytest.raises(ValueError, match="must start with 'USER'"):
        conv.get_prompt()


def test_mistral_instruct_has_no_system_block():
    prompt = build("mistral_instruct", "<image>\nQ1", "A1", "Q2", None).get_prompt()
    assert prompt == "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]"


def test_chatml_direct():
    assert build("chatml_direct", "<image>\nQ?", None).get_prompt() == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert build("chatml_direct", "Q?", "A.", "Q2", None).get_prompt() == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nQ?<|im_end|>"
        "<|im_start|>assistant\nA.<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
    )


def test_vicuna_v0_single_style_keeps_example_turns():
    conv = conv_templates["v0"].copy()
    assert conv.sep_style is SeparatorStyle.SINGLE and conv.offset == 2
    conv.append_message("Human", "Q")
    conv.append_message("Assistant", None)
    prompt = conv.get_prompt()
    assert prompt.startswith(LLAVA_SYSTEM + "###Human: What are the key differences")
    assert prompt.endswith("instability.\n###Human: Q###Assistant:")


def test_copy_does_not_share_messages_with_template():
    before = len(conv_templates["vicuna_v1"].messages)
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message("USER", "x")
    assert len(conv_templates["vicuna_v1"].messages) == before == 0
    again = conv.copy()
    again.append_message("ASSISTANT", "y")
    assert len(conv.messages) == 1


def test_get_images_and_dict_flatten_tuples():
    image = object()
    conv = build("vicuna_v1", ("<image>\nQ", image, "Pad"), "A")
    assert conv.get_images() == [image]
    assert conv.dict()["messages"] == [["USER", "<image>\nQ"], ["ASSISTANT", "A"]]


def test_get_conv_template_names_the_choices():
    assert get_conv_template("vicuna_v1").get_prompt() == VICUNA_SYSTEM + " "
    with pytest.raises(KeyError, match="vicuna_v1"):
        get_conv_template("vicuna-v1")

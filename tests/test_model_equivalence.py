"""Pruning off, our LlavaLlamaForCausalLM must compute exactly what transformers' LlavaForConditionalGeneration
computes with the same weights."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlavaForConditionalGeneration
from transformers import LlavaConfig as HFLlavaConfig

from llava.constants import IMAGE_TOKEN_INDEX
from llava.inference import build_prompt
from llava.mm_utils import process_images, tokenizer_image_token


def to_transformers_llava(model) -> LlavaForConditionalGeneration:
    """Copy our weights into transformers' own LLaVA; the image token gets a new id = old vocab size."""
    cfg = model.config
    tower = model.get_vision_tower()
    vocab = cfg.vocab_size
    text_cfg = LlamaConfig(
        vocab_size=vocab + 1,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    hf_cfg = HFLlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_id=vocab,
        vision_feature_layer=cfg.mm_vision_select_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    hf = LlavaForConditionalGeneration(hf_cfg).eval()
    copy_weights_into(model, hf)
    return hf


def copy_weights_into(model, hf) -> None:
    """Copy tower, projector and LLM weights of our model into a transformers LLaVA(-NeXT) model whose vocabulary has
    one extra row (the image token)."""
    tower = model.get_vision_tower()
    hf.model.vision_tower.load_state_dict(tower.vision_tower.state_dict())
    proj = model.get_model().mm_projector
    hf.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
    lm_state = {
        k: v
        for k, v in model.get_model().state_dict().items()
        if not k.startswith(("mm_projector", "vision_tower", "image_newline"))
    }
    embed = lm_state.pop("embed_tokens.weight")
    lm_state["embed_tokens.weight"] = torch.cat([embed, torch.zeros(1, embed.shape[1])])
    missing, unexpected = hf.model.language_model.load_state_dict(lm_state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    hf.lm_head.weight.data = torch.cat([model.lm_head.weight.data, torch.zeros(1, model.config.hidden_size)])


def expand_image_tokens(ids: list[int], n_tokens: int, image_id: int) -> torch.Tensor:
    out: list[int] = []
    for token in ids:
        out.extend([image_id] * n_tokens if token == IMAGE_TOKEN_INDEX else [token])
    return torch.tensor([out])


def test_logits_and_greedy_equal_transformers_llava(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    hf = to_transformers_llava(model)
    vocab = model.config.vocab_size
    n_patches = model.get_vision_tower().num_patches
    for image, question in zip(images[:2], ["What is in the image?", "Describe the colours. 你好"]):
        prompt = build_prompt(question, "vicuna_v1", model_config=model.config)
        ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)
        pixels = process_images([image], processor, model.config)
        with torch.no_grad():
            ours = model(torch.tensor([ids]), images=pixels).logits
            theirs = hf(input_ids=expand_image_tokens(ids, n_patches, vocab), pixel_values=pixels).logits
        assert ours.shape[1] == theirs.shape[1] == len(ids) - 1 + n_patches
        torch.testing.assert_close(ours, theirs[..., :vocab], atol=1e-4, rtol=1e-4)

        new = model.generate(torch.tensor([ids]), images=pixels, do_sample=False, max_new_tokens=12, pad_token_id=0)
        hf_ids = expand_image_tokens(ids, n_patches, vocab)
        ref = hf.generate(input_ids=hf_ids, pixel_values=pixels, do_sample=False, max_new_tokens=12, pad_token_id=0)
        assert new.tolist() == ref[:, hf_ids.shape[1] :].tolist()

"""LLaVA on a Mistral language model (llava-v1.6-mistral-7b): upstream's class names, config keys and state-dict
names, on transformers' Mistral."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, MistralForCausalLM, MistralModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava.model.generation import LlavaGenerationMixin
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel
from pruning import PruningConfig


class LlavaMistralConfig(MistralConfig):
    model_type = "llava_mistral"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # a bad pruning section must fail at load time, naming the setting
        PruningConfig.from_dict(getattr(self, "pruning", None), source="model config")


class LlavaMistralModel(LlavaMetaModel, MistralModel):
    config_class = LlavaMistralConfig
    config: LlavaMistralConfig

    def __init__(self, config: MistralConfig):
        super().__init__(config)


class LlavaMistralForCausalLM(LlavaGenerationMixin, LlavaMetaForCausalLM, MistralForCausalLM):
    config_class = LlavaMistralConfig
    config: LlavaMistralConfig

    def __init__(self, config):
        MistralForCausalLM.__init__(self, config)
        self.model = LlavaMistralModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.Tensor | list | None = None,
        image_sizes: list | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None and images is not None:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels) = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
                )
            )
        return MistralForCausalLM.forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


AutoConfig.register("llava_mistral", LlavaMistralConfig)
AutoModelForCausalLM.register(LlavaMistralConfig, LlavaMistralForCausalLM)

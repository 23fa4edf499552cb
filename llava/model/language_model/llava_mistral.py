"""LLaVA on a Mistral language model (llava-v1.6-mistral-7b): upstream's class names, config keys and state-dict
names, on transformers' Mistral."""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, MistralForCausalLM, MistralModel

from llava.model.generation import LlavaGenerationMixin
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel, check_pruning_section


class LlavaMistralConfig(MistralConfig):
    model_type = "llava_mistral"
    keys_to_ignore_at_inference = ["past_key_values", "token_stats"]  # the Trainer's eval loop gathers the rest

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_pruning_section(self)


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


AutoConfig.register("llava_mistral", LlavaMistralConfig)
AutoModelForCausalLM.register(LlavaMistralConfig, LlavaMistralForCausalLM)

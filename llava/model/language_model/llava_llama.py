"""LLaVA on a Llama/Vicuna language model: upstream's class names, config keys and state-dict names."""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel

from llava.model.generation import LlavaGenerationMixin
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel, check_pruning_section


class LlavaConfig(LlamaConfig):
    model_type = "llava_llama"
    keys_to_ignore_at_inference = ["past_key_values", "token_stats"]  # the Trainer's eval loop gathers the rest

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_pruning_section(self)


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig
    config: LlavaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)


class LlavaLlamaForCausalLM(LlavaGenerationMixin, LlavaMetaForCausalLM, LlamaForCausalLM):
    config_class = LlavaConfig
    config: LlavaConfig

    def __init__(self, config):
        LlamaForCausalLM.__init__(self, config)
        self.model = LlavaLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)

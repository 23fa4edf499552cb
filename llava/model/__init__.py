"""LLaVA model classes (imported plainly: a failure here shows its real cause)."""

from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM"]

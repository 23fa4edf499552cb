"""Phi-3-vision (microsoft/Phi-3-vision-128k-instruct) as released, on transformers 5.23 without remote code:
config (config.py), HD-transform preprocessing (image_processing.py), the model (modeling.py), loading a release
folder (loader.py); tiny random checkpoints for tests are written by llava.testing.tiny_phi3v. See docs/models.md."""

from llava.model.phi3v.config import Phi3VConfig, Phi3VConfigError, phi3v_config
from llava.model.phi3v.image_processing import HDGrid, Phi3VImageError, Phi3VImageProcessor, hd_grid, num_image_tokens
from llava.model.phi3v.loader import is_phi3v_config, load_phi3v
from llava.model.phi3v.modeling import Phi3VForCausalLM

__all__ = [
    "HDGrid",
    "Phi3VConfig",
    "Phi3VConfigError",
    "Phi3VForCausalLM",
    "Phi3VImageError",
    "Phi3VImageProcessor",
    "hd_grid",
    "is_phi3v_config",
    "load_phi3v",
    "num_image_tokens",
    "phi3v_config",
]

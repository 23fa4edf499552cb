"""InternVL2-1B (OpenGVLab/InternVL2-1B) as released, on transformers 5 without remote code, with both pruning
stages (docs/models.md): configuration_internvl_chat (config.json), modeling_intern_vit (InternViT),
modeling_internvl_chat (the model), vision (tiles, pixel shuffle, stage 1), image_processing (dynamic tiling),
conversation (Hermes-2), tokenization, builder (loading a release folder); llava.testing.tiny_internvl writes test
checkpoints."""

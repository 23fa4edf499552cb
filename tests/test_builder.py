"""Loading routes chosen from the files present, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from llava.constants import IMAGE_TOKEN_INDEX
from llava.inference import build_prompt
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import CheckpointError, load_pretrained_model
from llava.model.multimodal_encoder.clip_encoder import VisionTowerError
from tests.helpers import random_image


def _inputs(tokenizer, model, processor):
    prompt = build_prompt("What is this?", "vicuna_v1", model_config=model.config)
    ids = torch.tensor([tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)])
    return ids, process_images([random_image(7)], processor, model.config)


def _write_base_llm(model, folder):
    """A Vicuna-like base: the language model alone, model_type llama, with the tokenizer."""
    cfg = model.config.to_dict()
    for key in [
        k
        for k in cfg
        if k.startswith(("mm_", "image_", "tokenizer_", "pruning", "use_mm", "tune_", "freeze_", "unfreeze_"))
    ]:
        cfg.pop(key)
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    from transformers import LlamaConfig

    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "transformers_version"}))
    state = {k: v for k, v in model.state_dict().items() if "mm_projector" not in k and "vision_tower" not in k}
    llm.load_state_dict(state)
    llm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_setup(tiny_ckpt, tmp_path_factory):
    """Base LLM folder + a LoRA folder in upstream's layout, and the merged reference model."""
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_ckpt), None, None, device="cpu")
    root = tmp_path_factory.mktemp("lora")
    base = _write_base_llm(model, root / "vicuna-tiny")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_ckpt / name, base / name)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.get_model().mm_projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a "trained" projector differing from the base
    lora_cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_cfg)
    lora_dir = root / "llava-v1.5-tiny-lora"
    peft_model.save_pretrained(lora_dir)
    non_lora = {k: v.clone() for k, v in peft_model.named_parameters() if "mm_projector" in k}
    assert all(k.startswith("base_model.model.model.mm_projector.") for k in non_lora)
    torch.save(non_lora, lora_dir / "non_lora_trainables.bin")
    model.config.save_pretrained(lora_dir)
    merged = peft_model.merge_and_unload()
    ids, pixels = _inputs(tokenizer, merged, processor)
    with torch.no_grad():
        reference = merged(ids, images=pixels).logits
    return base, lora_dir, reference


def test_lora_folder_plus_base_equals_merged_model(lora_setup):
    base, lora_dir, reference = lora_setup
    tokenizer, model, processor, _ = load_pretrained_model(str(lora_dir), str(base), None, device="cpu")
    ids, pixels = _inputs(tokenizer, model, processor)
    with torch.no_grad():
        logits = model(ids, images=pixels).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_lora_without_base_names_the_fix(lora_setup):
    _, lora_dir, _ = lora_setup
    with pytest.raises(CheckpointError, match="--model-base"):
        load_pretrained_model(str(lora_dir), None, None, device="cpu")


def test_lora_missing_non_lora_trainables_is_named(lora_setup, tmp_path):
    base, lora_dir, _ = lora_setup
    broken = tmp_path / "broken-lora"
    shutil.copytree(lora_dir, broken)
    (broken / "non_lora_trainables.bin").unlink()
    with pytest.raises(CheckpointError, match="non_lora_trainables.bin"):
        load_pretrained_model(str(broken), str(base), None, device="cpu")


def test_projector_only_folder_plus_base(tiny_ckpt, lora_setup, tmp_path):
    base, _, _ = lora_setup
    tokenizer, full, processor, _ = load_pretrained_model(str(tiny_ckpt), None, None, device="cpu")
    proj_dir = tmp_path / "llava-tiny-pretrain"
    proj_dir.mkdir()
    full.config.save_pretrained(proj_dir)
    torch.save(
        {f"model.mm_projector.{k}": v for k, v in full.get_model().mm_projector.state_dict().items()},
        proj_dir / "mm_projector.bin",
    )
    _, model, _, _ = load_pretrained_model(str(proj_dir), str(base), None, device="cpu")
    ids, pixels = _inputs(tokenizer, model, processor)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, images=pixels).logits, full(ids, images=pixels).logits)


def test_folder_without_config(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained_model(str(tmp_path), None, None, device="cpu")


def test_missing_folder():
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained_model("./does/not/exist", None, None, device="cpu")


def test_vision_tower_path_that_does_not_exist(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["mm_vision_tower"] = str(tmp_path / "no-such-clip")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(VisionTowerError, match="no-such-clip"):
        load_pretrained_model(str(ckpt), None, None, device="cpu")


def test_unknown_pruning_strategy_in_config_is_named(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["pruning"] = {"visual_pruning": "magic"}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="magic"):
        load_pretrained_model(str(ckpt), None, None, device="cpu")
    config["pruning"] = {"visual_pruning": "longtail", "alpha": 1.5}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="alpha"):
        load_pretrained_model(str(ckpt), None, None, device="cpu")


def test_two_image_tags_one_image(tiny_model):
    tokenizer, model, processor, _ = tiny_model
    prompt = build_prompt("<image>\nCompare with <image>", "vicuna_v1", model_config=model.config)
    ids = torch.tensor([tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)])
    pixels = process_images([random_image(1)], processor, model.config)
    with pytest.raises(ValueError, match="2 <image> tags"):
        model.generate(ids, images=pixels, max_new_tokens=2)


def test_relative_tower_path_is_found_next_to_the_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_ckpt, shipped / "models" / "llava-tiny")
    shutil.copytree(tiny_ckpt.with_name(tiny_ckpt.name + "-clip"), shipped / "models" / "llava-tiny-clip")
    config_file = shipped / "models" / "llava-tiny" / "config.json"
    config = json.loads(config_file.read_text())
    config["mm_vision_tower"] = "models/llava-tiny-clip"  # relative to the folder the checkpoint was shipped in
    config_file.write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, model, _, _ = load_pretrained_model(str(shipped / "models" / "llava-tiny"), None, None, device="cpu")
    assert model.get_vision_tower().is_loaded
